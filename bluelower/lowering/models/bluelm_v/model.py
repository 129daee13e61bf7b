"""BlueLM-V in plain PyTorch, written to export cleanly.

Three parts, with Hugging Face-style parameter names so that SigLIP / LLaMA safetensors
load as they are:

* ``vision_tower.vision_model.*``: the ``siglip`` family's ViT (Conv2d patch embedding,
  learned position embeddings, pre-LayerNorm blocks, bidirectional MHA, GELU(tanh) MLP,
  final LayerNorm).
* ``multi_modal_projector.*``: the 2x2 token downsampler (pad the 27x27 grid to 28x28,
  concatenate each 2x2 group, fuse with a linear layer: 196 tokens) and a 2-layer GELU MLP
  to the decoder width.
* ``language_model.*``: the ``llama`` family's decoder (embedding, RMSNorm, RoPE, GQA,
  SwiGLU, untied lm_head) with an explicit static KV cache that goes in and comes out
  (updated with ``scatter``: ``index_copy`` does not import into Relax).

The compiled entry points are methods: :meth:`BlueLMV.encode_image`, :meth:`BlueLMV.embed`,
:meth:`BlueLMV.prefill`, :meth:`BlueLMV.decode`. Tensors created inside them take the
device of an input, so the model traces on ``meta`` tensors.

KV cache layout: ``[num_layers, 2 (k, v), num_kv_heads, capacity, head_dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, ProjectorConfig, VisionConfig
from ..llama.model import LlamaForCausalLM
from ..siglip.model import SiglipVisionModel

# -------------------------------------------------------------------------- projector


class TokenDownsampler(nn.Module):
    """Pad the g x g token grid to a multiple of ``f``, concatenate each f x f group
    (row-major inside the group), fuse with a linear layer."""

    def __init__(self, vision: VisionConfig, cfg: ProjectorConfig):
        super().__init__()
        self.grid = vision.grid
        self.factor = cfg.downsample_factor
        self.out_grid = cfg.out_grid(vision)
        self.downsample = nn.Linear(vision.hidden_size * self.factor**2, cfg.downsample_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        g, f, og = self.grid, self.factor, self.out_grid
        x = x.view(b, g, g, c)
        pad = og * f - g
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))  # zero rows/cols at the bottom/right
        x = x.view(b, og, f, og, f, c).permute(0, 1, 3, 2, 4, 5).reshape(b, og * og, f * f * c)
        return self.downsample(x)


class MultiModalProjector(nn.Module):
    def __init__(self, vision: VisionConfig, cfg: ProjectorConfig, llm_width: int):
        super().__init__()
        self.token_downsampler = TokenDownsampler(vision, cfg)
        self.linear_1 = nn.Linear(cfg.downsample_size, llm_width)
        self.linear_2 = nn.Linear(llm_width, llm_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_downsampler(x)
        return self.linear_2(F.gelu(self.linear_1(x)))


# ------------------------------------------------------------------------------ model


class BlueLMV(nn.Module):
    """The whole model; each entry method is one compiled function (the family's ModelSpec,
    ``bluelm_v/__init__.py``, lists them with the weights each reads)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVisionModel(cfg)  # the siglip family's tower (vision_model.*)
        self.multi_modal_projector = MultiModalProjector(cfg.vision, cfg.projector, cfg.decoder.hidden_size)
        self.language_model = LlamaForCausalLM(cfg)  # the llama family's decoder (model.*, lm_head)

    # Entry points ---------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, 384, 384] (normalized) -> image tokens [B, 196, llm_width]."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] int64 -> embeddings [T, llm_width]."""
        return self.language_model.embed(token_ids)

    def prefill(self, embeddings, kv_cache, start_pos, num_valid):
        """One prefill chunk (the llama family's): embeddings [T, width] at positions
        start_pos[0] .. (rows past num_valid are padding) -> logits [1, vocab] of row
        num_valid-1, the updated cache."""
        return self.language_model.prefill(embeddings, kv_cache, start_pos, num_valid)

    def decode(self, token, kv_cache, position):
        """token [1] int64 at position[0] -> logits [1, vocab], updated cache."""
        return self.language_model.decode(token, kv_cache, position)

    @property
    def decoder_model(self):
        return self.language_model.decoder_model

    # Shapes ---------------------------------------------------------------------

    def kv_cache_shape(self) -> tuple:
        d, r = self.cfg.decoder, self.cfg.runtime
        return (d.num_layers, 2, d.num_kv_heads, r.kv_capacity, d.head_dim)

    def new_kv_cache(self, device="cpu") -> torch.Tensor:
        return torch.zeros(self.kv_cache_shape(), dtype=torch.float32, device=device)


def entry_example_inputs(cfg: ModelConfig, entry: str, device="cpu") -> tuple:
    """Example (shape-defining) inputs of one entry function."""
    d, r, v = cfg.decoder, cfg.runtime, cfg.vision
    cache = torch.zeros((d.num_layers, 2, d.num_kv_heads, r.kv_capacity, d.head_dim), device=device)
    # distinct tensor objects: torch.export treats one object passed twice as one input
    def one():
        return torch.ones(1, dtype=torch.int64, device=device)

    if entry == "encode_image":
        return (torch.zeros(r.image_batch, v.num_channels, v.image_size, v.image_size, device=device),)
    if entry == "embed":
        return (torch.zeros(r.prefill_chunk, dtype=torch.int64, device=device),)
    if entry == "prefill":
        return (torch.zeros(r.prefill_chunk, d.hidden_size, device=device), cache, 0 * one(), one() * r.prefill_chunk)
    if entry == "decode":
        return (one(), cache, one())
    raise KeyError(entry)
