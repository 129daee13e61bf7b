"""FuseAttention on attention as other people write it.

Small modules copying transformers' own attention code (``repeat_kv`` and
``eager_attention_forward`` of ``models/llama/modeling_llama.py``, ``sdpa_attention_forward``
of ``integrations/sdpa_attention.py``, SigLIP's bidirectional attention), with every causal
mask spelling we know of, through both frontends: each is one fused kernel (causal bound,
additive mask and GQA repeat as expected) and the built module equals PyTorch. Then the
real thing: transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``SiglipVisionModel``
(eager and sdpa) with every layer fused and the built module equal to PyTorch, and
bluelower's own families (llama, qwen2, siglip, idefics3) with every layer fused in every
entry, in their own spelling and in an SDPA one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm import relax

from bluelower.lowering.frontend.torch_export import import_torch_program
from bluelower.passes.fuse_attention import FuseAttention
from bluelower.passes.instruments import pass_stats

from hf_tiny import export, hf_model

B, H, T, D = 1, 4, 8, 16


# --- transformers' attention code, as the modules to export -------------------------------


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' ``repeat_kv`` (models/llama/modeling_llama.py)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(query, key, value, attention_mask, scaling, n_rep):
    """transformers' ``eager_attention_forward`` (eval: no dropout)."""
    key_states = repeat_kv(key, n_rep)
    value_states = repeat_kv(value, n_rep)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous()


def siglip_eager_attention_forward(query, key, value, attention_mask, scaling, training=False):
    """transformers' SigLIP ``eager_attention_forward`` (models/siglip/modeling_siglip.py)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=0.0, training=training)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2).contiguous()


class SiglipEager(torch.nn.Module):
    def forward(self, q, k, v):
        return siglip_eager_attention_forward(q, k, v, None, D**-0.5)


def causal_mask(kind: str, t: int, device, positions=None):
    """The causal masks of the wild: ``(kind of mask, tensor)`` for a [T, T] attention."""
    i = torch.arange(t, device=device)
    if kind == "positions":  # BlueLM-V / bluelower's families: from the positions of the rows
        return "bool", i[None, :] <= positions[:, None]
    if kind == "tril":
        return "bool", torch.tril(torch.ones(t, t, dtype=torch.bool, device=device))
    if kind == "triu":  # additive -inf above the diagonal
        return "add", torch.triu(torch.full((t, t), float("-inf"), device=device), diagonal=1)
    if kind == "finfo":  # additive finfo.min, as transformers' sdpa/eager masks are
        return "add", torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(torch.float32).min)[None, None]
    raise KeyError(kind)


class Eager(torch.nn.Module):
    """``eager_attention_forward`` over q [B, H, T, D], k/v [B, KV, T, D] and a mask:
    none, an additive input, or one built in the graph (``causal_mask``) and applied with
    ``masked_fill`` (bool) / ``+`` (additive), or with ``torch.where(m, s, finfo.min)``."""

    def __init__(self, kv_heads: int, mask: str | None = None):
        super().__init__()
        self.rep, self.mask = H // kv_heads, mask
        if mask == "buffer":  # GPT-2's registered lower-triangular bias
            self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, q, k, v, extra=None):
        scaling = D**-0.5
        if self.mask in (None, "input"):
            return eager_attention_forward(q, k, v, extra, scaling, self.rep)
        s = torch.matmul(q, repeat_kv(k, self.rep).transpose(2, 3)) * scaling
        if self.mask == "buffer":
            s = s.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        elif self.mask == "where":
            i = torch.arange(T, device=q.device)
            s = torch.where(i[None, :] <= i[:, None], s, torch.finfo(s.dtype).min)
        else:
            positions = extra + torch.arange(T, device=q.device) if self.mask == "positions" else None
            kind, m = causal_mask(self.mask, T, q.device, positions)
            s = s.masked_fill(~m, float("-inf")) if kind == "bool" else s + m
        p = F.softmax(s, dim=-1)
        return torch.matmul(p, repeat_kv(v, self.rep)).transpose(1, 2).contiguous()


class Sdpa(torch.nn.Module):
    """``F.scaled_dot_product_attention`` as ``sdpa_attention_forward`` calls it: K/V repeated
    (``repeat_kv``) or ``enable_gqa``; ``is_causal``, a boolean or an additive ``attn_mask``."""

    def __init__(self, kv_heads: int, mask: str = "is_causal", gqa: str = "repeat"):
        super().__init__()
        self.rep, self.mask, self.gqa = H // kv_heads, mask, gqa

    def forward(self, q, k, v, attn_mask=None):
        kw = {}
        if self.rep > 1 and self.gqa == "enable_gqa":
            kw["enable_gqa"] = True
        elif self.rep > 1:
            k, v = repeat_kv(k, self.rep), repeat_kv(v, self.rep)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.mask == "is_causal",
                                             scale=D**-0.5, **kw)
        return out.transpose(1, 2).contiguous()


class PerHeadBias(torch.nn.Module):
    """An ALiBi-like additive bias per head: not one mask for all heads (the kernel's)."""

    def forward(self, q, k, v):
        slopes = torch.arange(1, H + 1, device=q.device, dtype=torch.float32).view(1, H, 1, 1) / H
        i = torch.arange(T, device=q.device)
        bias = slopes * (i[None, :] - i[:, None]).to(torch.float32)
        s = torch.matmul(q, k.transpose(-1, -2)) * D**-0.5 + bias
        return torch.matmul(F.softmax(s, dim=-1), v)


def _inputs(kv_heads: int, extra: str | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, kv_heads, T, D, generator=g), torch.randn(B, kv_heads, T, D, generator=g)
    if extra == "additive":  # transformers' 4-D float mask: 0 / finfo.min, a padded key
        keep = torch.tril(torch.ones(T, T, dtype=torch.bool))
        keep[:, 0] = True
        keep[:, 1] = False
        keep[1, 1] = True
        return q, k, v, torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None]
    if extra == "bool":
        keep = torch.rand(T, T, generator=g) > 0.4
        keep[:, 0] = True  # no row masked everywhere
        return q, k, v, keep[None, None]
    if extra == "start":
        return q, k, v, torch.zeros(1, dtype=torch.int64)
    return q, k, v


# --- importing, fusing, running -------------------------------------------------------------


def _import(module, inputs, frontend: str):
    if frontend == "torch":
        return import_torch_program(export(module, inputs))
    import onnx
    import onnxsim
    from tvm.relax.frontend.onnx import from_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(module.eval(), inputs, path, opset_version=17, dynamo=False, do_constant_folding=False)
        proto, ok = onnxsim.simplify(onnx.load(path))
        assert ok
        return from_onnx(proto)


def _kernel_args(mod) -> list:
    return [json.loads(str(f.attrs["bluelower.kernel_args"])) for gv, f in mod.functions_items()
            if gv.name_hint.startswith("fused_attention")]


def _run(mod, inputs) -> list:
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    return [o.numpy() for o in out] if not hasattr(out, "numpy") else [out.numpy()]


def _fused(module, inputs, frontend: str = "torch"):
    """``(stats, kernel args, fused module)`` of ``module`` imported through ``frontend``."""
    fused = FuseAttention()(relax.transform.DeadCodeElimination()(_import(module, inputs, frontend)))
    return pass_stats(fused)["FuseAttention"], _kernel_args(fused), fused


def _check_against_torch(module, inputs, fused, rtol=1e-5, atol=1e-5):
    with torch.no_grad():
        want = module(*inputs)
    want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    for got, ref in zip(_run(fused, inputs), want):
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * max(1.0, float(np.abs(ref).max())))


# name -> (module, inputs, expected kernel: causal bound, additive mask, GQA rep)
CASES = {
    "eager_gqa_no_mask": (lambda: Eager(2), lambda: _inputs(2), dict(causal=False, mask=False, rep=2)),
    "eager_mha_mask_input": (lambda: Eager(4, "input"), lambda: _inputs(4, "additive"), dict(causal=False, mask=True, rep=1)),
    "eager_gqa_mask_input": (lambda: Eager(2, "input"), lambda: _inputs(2, "additive"), dict(causal=False, mask=True, rep=2)),
    "eager_mqa_mask_input": (lambda: Eager(1, "input"), lambda: _inputs(1, "additive"), dict(causal=False, mask=True, rep=4)),
    "eager_positions": (lambda: Eager(2, "positions"), lambda: _inputs(2, "start"), dict(causal=True, mask=False, rep=2)),
    "eager_tril": (lambda: Eager(2, "tril"), lambda: _inputs(2), dict(causal=True, mask=False, rep=2)),
    "eager_triu_additive": (lambda: Eager(4, "triu"), lambda: _inputs(4), dict(causal=True, mask=False, rep=1)),
    "eager_finfo_additive": (lambda: Eager(1, "finfo"), lambda: _inputs(1), dict(causal=True, mask=False, rep=4)),
    "eager_where_finfo": (lambda: Eager(2, "where"), lambda: _inputs(2), dict(causal=True, mask=False, rep=2)),
    "eager_buffer": (lambda: Eager(4, "buffer"), lambda: _inputs(4), dict(causal=True, mask=False, rep=1)),
    "sdpa_is_causal_repeat": (lambda: Sdpa(2), lambda: _inputs(2), dict(causal=True, mask=False, rep=2)),
    "sdpa_is_causal_mha": (lambda: Sdpa(4), lambda: _inputs(4), dict(causal=True, mask=False, rep=1)),
    "sdpa_is_causal_enable_gqa": (lambda: Sdpa(2, gqa="enable_gqa"), lambda: _inputs(2), dict(causal=True, mask=False, rep=2)),
    "sdpa_mqa_enable_gqa": (lambda: Sdpa(1, gqa="enable_gqa"), lambda: _inputs(1), dict(causal=True, mask=False, rep=4)),
    "sdpa_bool_mask": (lambda: Sdpa(2, "mask"), lambda: _inputs(2, "bool"), dict(causal=False, mask=True, rep=2)),
    "sdpa_float_mask": (lambda: Sdpa(4, "mask"), lambda: _inputs(4, "additive"), dict(causal=False, mask=True, rep=1)),
    "siglip_bidirectional": (lambda: SiglipEager(), lambda: _inputs(4), dict(causal=False, mask=False, rep=1)),
}
# The TorchScript ONNX exporter has no enable_gqa (torch raises); everything else goes both ways.
ONNX_CASES = [c for c in CASES if "enable_gqa" not in c]


def _check_case(name: str, frontend: str):
    make, inputs, want = CASES[name]
    module, args = make().eval(), inputs()
    stats, kernels, fused = _fused(module, args, frontend)
    assert stats["fused"] == 1 and "unmatched" not in stats, stats
    (kernel,) = kernels
    assert kernel["causal"] == want["causal"]
    assert (kernel["additive_mask"] is not None) == want["mask"]
    assert kernel["rep"] == want["rep"] and kernel["q_heads"] == H  # K/V read un-repeated
    assert kernel["scale"] == pytest.approx(D**-0.5, rel=1e-6)
    _check_against_torch(module, args, fused)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_export_forms(name):
    _check_case(name, "torch")


@pytest.mark.parametrize("name", ONNX_CASES)
def test_onnx_forms(name):
    _check_case(name, "onnx")


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_per_head_mask_is_reported_not_fused(frontend):
    module, args = PerHeadBias().eval(), _inputs(4)
    stats, kernels, fused = _fused(module, args, frontend)
    assert stats["fused"] == 0 and not kernels
    (line,) = stats["unmatched"]
    assert line.startswith("main/") and "per-head or per-batch mask [1, 4, 8, 8]" in line
    _check_against_torch(module, args, fused)  # left as it was


def test_where_fill_that_is_not_minus_infinity_is_reported():
    class FillMinus100(torch.nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-1, -2) * D**-0.5
            s = s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device)), -100.0)
            return F.softmax(s, -1) @ v

    stats, _kernels, _fused_mod = _fused(FillMinus100().eval(), _inputs(4))
    assert stats["fused"] == 0 and "fills -100" in stats["unmatched"][0]


# --- transformers' models ------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch, kv_heads", [("llama", 2), ("llama", 1), ("qwen2", 4), ("siglip", None)])
def test_transformers_models_fuse_every_layer(arch, kv_heads, attn):
    pytest.importorskip("transformers")
    layers = 2
    module, args = hf_model(arch, attn, layers=layers, **({} if kv_heads is None else {"kv_heads": kv_heads}))
    stats, kernels, fused = _fused(module, args)
    assert stats["per_function"] == {"main": layers + (arch == "siglip")}, stats  # SigLIP: + the pooling head
    assert "unmatched" not in stats
    if arch != "siglip":  # static causal LM forward: transformers' causal mask is the kernel's bound
        assert all(k["causal"] and k["additive_mask"] is None and k["rep"] == 4 // kv_heads for k in kernels)
    _check_against_torch(module, args, fused, rtol=1e-4, atol=1e-5)


# --- bluelower's own families ------------------------------------------------------------------


def _sdpa_llama_attention(self, x, cos, sin, positions, layer_cache):
    """The families' LlamaAttention.forward written with SDPA (a boolean mask from positions)."""
    t = x.shape[0]
    hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
    q = self.q_proj(x).view(t, hq, d).transpose(0, 1)
    k = self.k_proj(x).view(t, hk, d).transpose(0, 1)
    v = self.v_proj(x).view(t, hk, d).transpose(0, 1)
    from bluelower.lowering.models.llama.model import rotate_half

    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    index = positions.view(1, 1, t, 1).expand(2, hk, t, d)
    layer_cache = layer_cache.scatter(2, index, torch.stack((k, v)))
    keys, values = layer_cache[0][None], layer_cache[1][None]
    allowed = torch.arange(layer_cache.shape[2], device=x.device)[None, :] <= positions[:, None]
    keys, values = repeat_kv(keys, hq // hk), repeat_kv(values, hq // hk)
    out = F.scaled_dot_product_attention(q[None], keys, values, attn_mask=allowed, scale=self.scale)
    return self.o_proj(out[0].transpose(0, 1).reshape(t, hq * d)), layer_cache


def _sdpa_siglip_attention(q, k, v, num_heads: int):
    b, tq, c = q.shape
    d = c // num_heads
    q, k, v = (x.view(b, -1, num_heads, d).transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, tq, c)


def _family_fusion(name: str, frontend: str) -> tuple:
    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.models import load_config
    from bluelower.passes.plan_kv_cache import PlanKVCache

    cfg = load_config(name)
    mod, sigs = import_model(cfg, frontend)
    mod = relax.transform.DeadCodeElimination(list(sigs))(relax.transform.CanonicalizeBindings()(mod))
    fused = FuseAttention()(PlanKVCache()(mod))
    stats = pass_stats(fused)["FuseAttention"]
    if cfg.decoder is not None:  # prefill and decode read the cache itself, with the causal bound from positions
        cached = [k for k in _kernel_args(fused) if len(k["k_prefix"]) == 2]
        assert len(cached) == 2 * cfg.decoder.num_layers and all(k["causal"] and not k["additive_mask"] for k in cached)
        assert {k["rep"] for k in cached} == {cfg.decoder.num_heads // cfg.decoder.num_kv_heads}
    layers = {}
    if cfg.vision is not None:
        layers["encode_image"] = cfg.vision.num_layers + bool(getattr(cfg.vision, "use_head", False))
    if cfg.decoder is not None:
        layers.update(prefill=cfg.decoder.num_layers, decode=cfg.decoder.num_layers)
    return stats, {f: n for f, n in layers.items() if f in sigs}


@pytest.mark.parametrize("spelling", ["own", "sdpa"])
@pytest.mark.parametrize("frontend", ["torch", "onnx"])
@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "siglip-tiny", "idefics3-tiny"])
def test_families_fuse_every_layer_of_every_entry(name, frontend, spelling, monkeypatch):
    if spelling == "sdpa":
        from bluelower.lowering.models.llama import model as llama_model
        from bluelower.lowering.models.siglip import model as siglip_model

        monkeypatch.setattr(llama_model.LlamaAttention, "forward", _sdpa_llama_attention)
        monkeypatch.setattr(siglip_model, "multi_head_attention", _sdpa_siglip_attention)
    stats, layers = _family_fusion(name, frontend)
    assert "unmatched" not in stats, stats
    assert {f: stats["per_function"].get(f, 0) for f in layers} == layers
