"""A SigLIP vision tower in plain PyTorch, written to export cleanly.

Parameter names are Hugging Face ``SiglipVisionModel``'s as its checkpoints store them
(``vision_model.embeddings.patch_embedding.*``, ``vision_model.embeddings.position_embedding.weight``,
``vision_model.encoder.layers.N.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}.*``,
``vision_model.post_layernorm.*`` and, with ``use_head``, the attention-pooling
``vision_model.head.{probe,attention.in_proj_weight,attention.in_proj_bias,attention.out_proj.*,layernorm.*,mlp.*}``).
The blocks: Conv2d patch embedding, learned position embeddings (one per patch of the
configured image size: no interpolation), pre-LayerNorm encoder layers with bidirectional
MHA and a GELU(tanh) MLP, a final LayerNorm. :class:`SiglipVisionTransformer` is also the
vision tower of ``idefics3`` (without the head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, VisionConfig


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_tokens, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values)  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, C]
        # position ids 0..N-1: the table added as it is (no lookup of constant ids)
        return x + self.position_embedding.weight.unsqueeze(0)


def multi_head_attention(q, k, v, num_heads: int) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v per head: q [B, Tq, C], k / v [B, Tk, C] -> [B, Tq, C]."""
    b, tq, c = q.shape
    tk, d = k.shape[1], c // num_heads
    q = q.view(b, tq, num_heads, d).transpose(1, 2)
    k = k.view(b, tk, num_heads, d).transpose(1, 2)
    v = v.view(b, tk, num_heads, d).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (d**-0.5)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).reshape(b, tq, c)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = multi_head_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
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


class PoolingAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` (batch_first, packed q/k/v projection) under its
    parameter names, written out: the probe attends over the tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * h, h))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * h))
        self.out_proj = nn.Linear(h, h)

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1]
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:h], b[:h])
        k = F.linear(x, w[h : 2 * h], b[h : 2 * h])
        v = F.linear(x, w[2 * h :], b[2 * h :])
        return self.out_proj(multi_head_attention(q, k, v, self.num_heads))


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.attention = PoolingAttention(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] -> pooled [B, C]."""
        probe = self.probe.expand(x.shape[0], 1, x.shape[2])
        h = self.attention(probe, x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class SiglipVisionTransformer(nn.Module):
    """pixel_values [B, C, S, S] -> last hidden state [B, (S/patch)^2, hidden]; the pooling
    head (``head``) exists with ``with_head``."""

    def __init__(self, cfg: VisionConfig, with_head: bool = False):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if with_head:
            self.head = SiglipMultiheadAttentionPoolingHead(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipVisionModel(nn.Module):
    """HF ``SiglipVisionModel``: ``vision_model`` and the entry ``encode_image``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = SiglipVisionTransformer(cfg.vision, with_head=cfg.vision.use_head)

    def encode_image(self, pixel_values: torch.Tensor):
        """pixel_values [B, C, S, S] (normalized) -> last_hidden_state [B, tokens, hidden];
        with the head, the tuple (last_hidden_state, pooler_output [B, hidden])."""
        hidden = self.vision_model(pixel_values)
        if self.cfg.vision.use_head:
            return hidden, self.vision_model.head(hidden)
        return hidden

    def forward(self, pixel_values: torch.Tensor):
        return self.encode_image(pixel_values)


def image_example_inputs(cfg: ModelConfig, device="cpu") -> tuple:
    v, r = cfg.vision, cfg.runtime
    return (torch.zeros(r.image_batch, v.num_channels, v.image_size, v.image_size, device=device),)
