"""A LLaMA-style causal LM in plain PyTorch, written to export cleanly.

Parameter names are Hugging Face ``LlamaForCausalLM``'s (``model.embed_tokens.weight``,
``model.layers.N.self_attn.{q,k,v,o}_proj.*``, ``model.layers.N.mlp.{gate,up,down}_proj.weight``,
``model.layers.N.{input,post_attention}_layernorm.weight``, ``model.norm.weight``,
``lm_head.weight``), so a checkpoint loads by name; ``Qwen2ForCausalLM`` has the same names
plus q/k/v biases. What the module computes, from ``DecoderConfig``:

* RMSNorm, SwiGLU MLP, RoPE (the HF convention: halves rotated) with ``rope_theta`` and
  ``rope_scaling`` ``linear`` (frequencies / factor) or ``llama3`` (Llama 3.1's smoothed
  per-frequency scaling); ``head_dim`` may differ from hidden / heads.
* GQA / MQA / MHA attention over an explicit static KV cache
  ``[num_layers, 2 (k, v), num_kv_heads, capacity, head_dim]`` that goes in and comes out,
  updated with ``scatter`` (what PlanKVCache makes in-place); the causal mask is computed
  from positions, so rows past ``num_valid`` (padding) never influence valid rows.
* Biases: ``attention_bias`` puts one on q/k/v; ``o_proj_bias`` (the module's argument: Llama's
  ``attention_bias`` covers o_proj too, Qwen2's does not) on o_proj.
* ``tie_word_embeddings``: the logits read the token-embedding table (no ``lm_head`` module).

Tensors created inside an entry take an input's device (the model traces on ``meta``);
RoPE frequencies are computed in the graph from ``arange`` (a constant made on ``meta`` has
no values).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig, ModelConfig
from . import kv_cache_shape


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


def rope_inv_freq(cfg: DecoderConfig, device) -> torch.Tensor:
    """The RoPE inverse frequencies [head_dim / 2], as transformers' ``ROPE_INIT_FUNCTIONS``
    compute them (``default``, ``linear``, ``llama3``), in float32."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = context / low, context / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by factor, short ones kept, the band between interpolated
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, cfg: DecoderConfig):
    """cos/sin tables [T, head_dim] for int64 positions [T]."""
    inv_freq = rope_inv_freq(cfg, positions.device)
    freqs = positions.to(torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class LlamaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, o_proj_bias: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=o_proj_bias)

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
        # the GQA repeat as FuseAttention recognizes it (and reads the cache un-repeated)
        rep = hq // hk
        keys = keys.unsqueeze(1).expand(hk, rep, capacity, d).reshape(hq, capacity, d)
        values = values.unsqueeze(1).expand(hk, rep, capacity, d).reshape(hq, capacity, d)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.scale  # [hq, T, C]
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
    def __init__(self, cfg: DecoderConfig, o_proj_bias: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, o_proj_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, positions, layer_cache):
        attn, layer_cache = self.self_attn(self.input_layernorm(x), cos, sin, positions, layer_cache)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), layer_cache


class LlamaModel(nn.Module):
    """The decoder stack (HF ``LlamaModel``): embedding table, layers, final norm."""

    def __init__(self, cfg: DecoderConfig, o_proj_bias: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, o_proj_bias) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, kv_cache, start_pos):
        """x [T, hidden] embeddings at positions start_pos.. ; returns normed hidden, new cache."""
        t = x.shape[0]
        positions = start_pos + torch.arange(t, device=x.device)
        cos, sin = rope_cos_sin(positions, self.cfg)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, positions, kv_cache[i])
            new_layers.append(layer_cache)
        return self.norm(x), torch.stack(new_layers)


class CausalLMEntries(nn.Module):
    """The text entries of the bundle's calling convention over a :class:`LlamaModel`
    (``decoder_model``) and the logits of its hidden states (``logits``)."""

    decoder_model: LlamaModel

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] int64 -> embeddings [T, hidden]."""
        return self.decoder_model.embed_tokens(token_ids)

    def prefill(self, embeddings, kv_cache, start_pos, num_valid):
        """One prefill chunk.

        embeddings [T, hidden] at positions start_pos[0] .. start_pos[0]+T-1 (rows past
        num_valid are padding); returns the logits [1, vocab] of row num_valid-1 and the
        updated cache.
        """
        hidden, kv_cache = self.decoder_model(embeddings, kv_cache, start_pos)
        last = hidden.index_select(0, num_valid - 1)
        return self.logits(last), kv_cache

    def decode(self, token, kv_cache, position):
        """token [1] int64 at position[0] -> logits [1, vocab], updated cache."""
        x = self.decoder_model.embed_tokens(token)
        hidden, kv_cache = self.decoder_model(x, kv_cache, position)
        return self.logits(hidden), kv_cache

    def new_kv_cache(self, device="cpu") -> torch.Tensor:
        return torch.zeros(kv_cache_shape(self.cfg), dtype=torch.float32, device=device)


def lm_logits(hidden: torch.Tensor, lm_head: nn.Module | None, embed_tokens: nn.Embedding) -> torch.Tensor:
    """The logits through ``lm_head``, or through the token table when it is tied (None)."""
    if lm_head is None:
        return F.linear(hidden, embed_tokens.weight)
    return lm_head(hidden)


class LlamaForCausalLM(CausalLMEntries):
    """HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (``o_proj_bias`` False and
    ``attention_bias`` True) with the entries ``embed``, ``prefill``, ``decode``."""

    def __init__(self, cfg: ModelConfig, o_proj_bias: bool = False):
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder
        self.model = LlamaModel(d, o_proj_bias)
        self.lm_head = None if d.tie_word_embeddings else nn.Linear(d.hidden_size, d.vocab_size, bias=False)

    @property
    def decoder_model(self) -> LlamaModel:
        return self.model

    def logits(self, hidden):
        return lm_logits(hidden, self.lm_head, self.model.embed_tokens)


def text_example_inputs(cfg: ModelConfig, entry: str, device="cpu") -> tuple:
    """Example (shape-defining) inputs of ``embed``, ``prefill`` or ``decode``."""
    d, r = cfg.decoder, cfg.runtime
    cache = torch.zeros(kv_cache_shape(cfg), device=device)

    # distinct tensor objects: torch.export treats one object passed twice as one input
    def one():
        return torch.ones(1, dtype=torch.int64, device=device)

    if entry == "embed":
        return (torch.zeros(r.prefill_chunk, dtype=torch.int64, device=device),)
    if entry == "prefill":
        return (torch.zeros(r.prefill_chunk, d.hidden_size, device=device), cache, 0 * one(), one() * r.prefill_chunk)
    if entry == "decode":
        return (one(), cache, one())
    raise KeyError(entry)
