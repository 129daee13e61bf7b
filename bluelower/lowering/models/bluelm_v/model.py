"""BlueLM-V in plain PyTorch, written to export cleanly.

Three parts, with Hugging Face-style parameter names so that SigLIP / LLaMA safetensors
load as they are:

* ``vision_tower.vision_model.*``: a SigLIP ViT (Conv2d patch embedding, learned
  position embeddings, pre-LayerNorm blocks, bidirectional MHA, GELU(tanh) MLP, final
  LayerNorm).
* ``multi_modal_projector.*``: the 2x2 token downsampler (pad the 27x27 grid to 28x28,
  concatenate each 2x2 group, fuse with a linear layer: 196 tokens) and a 2-layer GELU MLP
  to the decoder width.
* ``language_model.*``: a LLaMA-style decoder (embedding, RMSNorm, RoPE, GQA, SwiGLU,
  untied lm_head) with an explicit static KV cache that goes in and comes out
  (updated with ``scatter``: ``index_copy`` does not import into Relax).

The compiled entry points are methods: :meth:`BlueLMV.encode_image`, :meth:`BlueLMV.embed`,
:meth:`BlueLMV.prefill`, :meth:`BlueLMV.decode`. Tensors created inside them take the
device of an input, so the model traces on ``meta`` tensors.

KV cache layout: ``[num_layers, 2 (k, v), num_kv_heads, capacity, head_dim]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig, ModelConfig, ProjectorConfig, VisionConfig

# ----------------------------------------------------------------------------- vision


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_tokens, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, C]
        return x + self.position_embedding.weight.unsqueeze(0)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = h // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipVisionTower(nn.Module):
    """Holds ``vision_model`` so names match transformers' ``SiglipVisionModel``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)


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


# ---------------------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables [T, head_dim] for int64 positions [T] (the HF LLaMA convention)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = positions.to(torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class LlamaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, positions, layer_cache):
        """x [T, hidden]; layer_cache [2, kv_heads, capacity, head_dim] -> (out, new layer cache)."""
        t = x.shape[0]
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(t, hq, d).transpose(0, 1)  # [hq, T, d]
        k = self.k_proj(x).view(t, hk, d).transpose(0, 1)
        v = self.v_proj(x).view(t, hk, d).transpose(0, 1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        capacity = layer_cache.shape[2]
        index = positions.view(1, 1, t, 1).expand(2, hk, t, d)
        layer_cache = layer_cache.scatter(2, index, torch.stack((k, v)))
        keys, values = layer_cache[0], layer_cache[1]  # [hk, C, d]
        rep = hq // hk
        keys = keys.unsqueeze(1).expand(hk, rep, capacity, d).reshape(hq, capacity, d)
        values = values.unsqueeze(1).expand(hk, rep, capacity, d).reshape(hq, capacity, d)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * (1.0 / math.sqrt(d))  # [hq, T, C]
        key_pos = torch.arange(capacity, device=x.device)
        allowed = key_pos.unsqueeze(0) <= positions.unsqueeze(1)  # causal, offset by the cache fill
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, values).transpose(0, 1).reshape(t, hq * d)
        return self.o_proj(out), layer_cache


class LlamaMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, positions, layer_cache):
        attn, layer_cache = self.self_attn(self.input_layernorm(x), cos, sin, positions, layer_cache)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), layer_cache


class LlamaModel(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, kv_cache, start_pos):
        """x [T, hidden] embeddings at positions start_pos.. ; returns normed hidden, new cache."""
        t = x.shape[0]
        positions = start_pos + torch.arange(t, device=x.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, positions, kv_cache[i])
            new_layers.append(layer_cache)
        return self.norm(x), torch.stack(new_layers)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


# ------------------------------------------------------------------------------ model


class BlueLMV(nn.Module):
    """The whole model; each entry method is one compiled function (the family's ModelSpec,
    ``bluelm_v/__init__.py``, lists them with the weights each reads)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVisionTower(cfg.vision)
        self.multi_modal_projector = MultiModalProjector(cfg.vision, cfg.projector, cfg.decoder.hidden_size)
        self.language_model = LlamaForCausalLM(cfg.decoder)

    # Entry points ---------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, 384, 384] (normalized) -> image tokens [B, 196, llm_width]."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] int64 -> embeddings [T, llm_width]."""
        return self.language_model.model.embed_tokens(token_ids)

    def prefill(self, embeddings, kv_cache, start_pos, num_valid):
        """One prefill chunk.

        embeddings [T, width] at positions start_pos[0] .. start_pos[0]+T-1 (rows past
        num_valid are padding); returns the logits [1, vocab] of row num_valid-1 and the
        updated cache.
        """
        hidden, kv_cache = self.language_model.model(embeddings, kv_cache, start_pos)
        last = hidden.index_select(0, num_valid - 1)
        return self.language_model.lm_head(last), kv_cache

    def decode(self, token, kv_cache, position):
        """token [1] int64 at position[0] -> logits [1, vocab], updated cache."""
        x = self.language_model.model.embed_tokens(token)
        hidden, kv_cache = self.language_model.model(x, kv_cache, position)
        return self.language_model.lm_head(hidden), kv_cache

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
