"""Idefics3 (SmolVLM) in plain PyTorch, written to export cleanly.

Parameter names are Hugging Face ``Idefics3ForConditionalGeneration``'s:

* ``model.vision_model.*``: the SigLIP-style tower (``siglip/model.py`` without the head). HF
  computes its position ids by bucketing each patch's fractional coordinate; for an image
  of the configured size they are 0..N-1 on the grids :func:`full_image_position_ids_are_arange`
  accepts, the only case this module computes (``from_hf_config`` refuses the others).
* ``model.connector.modality_projection.proj.weight``: the pixel shuffle (each f x f block of
  the token grid concatenated in HF's order) and one linear layer without bias to the text
  width.
* ``model.text_model.*`` and ``lm_head.weight``: the ``llama`` decoder (``llama/model.py``) with
  its static KV cache; a tied lm_head reads ``model.text_model.embed_tokens.weight``.

Entries: ``encode_image`` (pixel_values [B, 3, S, S] -> image features [B, tokens, text
hidden]), ``embed``, ``prefill``, ``decode``; the runtime writes the image features into the
embedding rows of the image placeholder tokens (``runtime.image_token_id``) before prefill.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig, ProjectorConfig, VisionConfig
from ..llama.model import CausalLMEntries, LlamaModel, lm_logits
from ..siglip.model import SiglipVisionTransformer


class Idefics3SimpleMLP(nn.Module):
    def __init__(self, vision: VisionConfig, projector: ProjectorConfig, text_width: int):
        super().__init__()
        self.proj = nn.Linear(vision.hidden_size * projector.downsample_factor**2, text_width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Idefics3Connector(nn.Module):
    def __init__(self, vision: VisionConfig, projector: ProjectorConfig, text_width: int):
        super().__init__()
        self.grid, self.factor = vision.grid, projector.downsample_factor
        self.modality_projection = Idefics3SimpleMLP(vision, projector, text_width)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[B, g*g, C] -> [B, (g/f)^2, C*f*f], the views and permutes of HF's ``pixel_shuffle``."""
        b, seq, c = x.shape
        g, f = self.grid, self.factor
        x = x.view(b, g, g // f, c * f)
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(b, g // f, g // f, c * f * f)
        x = x.permute(0, 2, 1, 3)
        return x.reshape(b, seq // (f * f), c * f * f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(self.pixel_shuffle(x))


class Idefics3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg.vision)
        self.connector = Idefics3Connector(cfg.vision, cfg.projector, cfg.decoder.hidden_size)
        self.text_model = LlamaModel(cfg.decoder, o_proj_bias=cfg.decoder.attention_bias)


class Idefics3ForConditionalGeneration(CausalLMEntries):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder
        self.model = Idefics3Model(cfg)
        self.lm_head = None if d.tie_word_embeddings else nn.Linear(d.hidden_size, d.vocab_size, bias=False)

    @property
    def decoder_model(self) -> LlamaModel:
        return self.model.text_model

    def logits(self, hidden):
        return lm_logits(hidden, self.lm_head, self.model.text_model.embed_tokens)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] (normalized, the configured size) -> image features
        [B, (S/patch/f)^2, text hidden]."""
        return self.model.connector(self.model.vision_model(pixel_values))


def full_image_position_ids_are_arange(grid: int) -> bool:
    """Whether ``Idefics3VisionEmbeddings`` gives a full ``grid`` x ``grid`` image the position
    ids 0..grid^2-1 (its float32 bucketing, replayed: on some grids, e.g. 19 or 29, a
    coordinate falls into the bucket below and ids repeat)."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    coords = torch.arange(grid, dtype=torch.float32) * (1.0 / torch.tensor([grid]))
    buckets = torch.bucketize(torch.clamp(coords, max=1.0 - 1e-6), boundaries, right=True)
    return bool(torch.equal(buckets, torch.arange(grid)))


def entry_example_inputs(cfg: ModelConfig, entry: str, device="cpu") -> tuple:
    from ..llama.model import text_example_inputs
    from ..siglip.model import image_example_inputs

    if entry == "encode_image":
        return image_example_inputs(cfg, device)
    return text_example_inputs(cfg, entry, device)
