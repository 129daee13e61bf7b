"""QuantizeKVCache (--quant w4a16kv8): golden rewrite, kernel numerics, tiny build, sizes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from bluelower.lowering.kernels.attention import (dequantize_kv_rows, fused_attention, kv_cache_write,
                                                  kv_cache_write_int8, quantize_kv_rows)
from bluelower.passes.ir_utils import result, without_results
from bluelower.passes.quantize_kv_cache import QuantizeKVCache

# 2 layers, k/v, 1 KV head, capacity 8, head_dim 4; one new row per step (decode-shaped)
CACHE, CACHE8 = (2, 2, 1, 8, 4), (2, 2, 1, 8, 8)
UPDATE = (2, 1, 1, 4)


def _write():
    return kv_cache_write(cache_shape=CACHE, prefix=(1,), axis=2, update_shape=UPDATE)


def _write8():
    return kv_cache_write_int8(cache_shape=CACHE8, prefix=(1,), axis=2, update_shape=UPDATE, index_dtype="int64")  # as the pass calls it


_ATT = dict(rows=2, q_heads=2, rep=2, q_len=1, head_dim=4, kv_len=8, k_prefix=(1, 0), v_prefix=(1, 1), scale=0.5,
            causal=True)


def _att():
    return fused_attention(k_shape=CACHE, v_shape=CACHE, **_ATT)


def _att8():
    # as QuantizeKVCache calls the builder (the stamp records the arguments given)
    return fused_attention(k_shape=CACHE8, v_shape=CACHE8, kv_int8=True, additive_mask=None, dtype="float32", **_ATT)


@I.ir_module
class Before:
    @T.prim_func(private=True)
    def kv_cache_write(cache: T.Buffer((2, 2, 1, 8, 4), "float32"), index: T.Buffer((2, 1, 1, 4), "int64"),
                       update: T.Buffer((2, 1, 1, 4), "float32")):
        T.evaluate(0)  # stub: replaced by the kernel builder's output

    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((2, 1, 4), "float32"), k: T.Buffer((2, 2, 1, 8, 4), "float32"),
                        v: T.Buffer((2, 2, 1, 8, 4), "float32"), pos: T.Buffer((1,), "int64"),
                        out: T.Buffer((2, 1, 4), "float32")):
        T.evaluate(0)

    @R.function
    def main(cache: R.Tensor((2, 2, 1, 8, 4), "float32"), index: R.Tensor((2, 1, 1, 4), "int64"),
             new: R.Tensor((2, 1, 1, 4), "float32"), q: R.Tensor((2, 1, 4), "float32"),
             pos: R.Tensor((1,), "int64")):
        cls = Before
        with R.dataflow():
            cache1 = R.call_tir_inplace(cls.kv_cache_write, (cache, index, new),
                                        out_ty=R.Tensor((2, 2, 1, 8, 4), "float32"), inplace_indices=[0])
            att = R.call_tir(cls.fused_attention, (q, cache1, cache1, pos), out_ty=R.Tensor((2, 1, 4), "float32"))
            out = (att, cache1)
            R.output(out)
        return out


@I.ir_module
class Expected:
    @T.prim_func(private=True)
    def kv_cache_write_int8(cache: T.Buffer((2, 2, 1, 8, 8), "int8"), index: T.Buffer((2, 1, 1, 4), "int64"),
                            update: T.Buffer((2, 1, 1, 4), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True)
    def fused_attention_kv8(q: T.Buffer((2, 1, 4), "float32"), k: T.Buffer((2, 2, 1, 8, 8), "int8"),
                            v: T.Buffer((2, 2, 1, 8, 8), "int8"), pos: T.Buffer((1,), "int64"),
                            out: T.Buffer((2, 1, 4), "float32")):
        T.evaluate(0)

    @R.function
    def main(cache: R.Tensor((2, 2, 1, 8, 8), "int8"), index: R.Tensor((2, 1, 1, 4), "int64"),
             new: R.Tensor((2, 1, 1, 4), "float32"), q: R.Tensor((2, 1, 4), "float32"),
             pos: R.Tensor((1,), "int64")):
        cls = Expected
        with R.dataflow():
            # the cache is one int8 buffer; the write quantizes, the attention dequantizes
            cache1 = R.call_tir_inplace(cls.kv_cache_write_int8, (cache, index, new),
                                        out_ty=R.Tensor((2, 2, 1, 8, 8), "int8"), inplace_indices=[0])
            att = R.call_tir(cls.fused_attention_kv8, (q, cache1, cache1, pos), out_ty=R.Tensor((2, 1, 4), "float32"))
            out = (att, cache1)
            R.output(out)
        return out


def _with(mod, **kernels):
    mod = tvm.IRModule(dict(mod.functions_items()))
    for name, func in kernels.items():
        mod.update_func(mod.get_global_var(name), func)
    return mod


def _before():
    return _with(Before, kv_cache_write=_write(), fused_attention=_att())


def test_golden_rewrite():
    after = QuantizeKVCache()(_before())
    sink = result(after, "kv_cache")
    expected = _with(Expected, kv_cache_write_int8=_write8(), fused_attention_kv8=_att8())
    tvm.ir.assert_structural_equal(without_results(after), expected)
    assert sink["shape"] == [2, 2, 1, 8, 8] and sink["dtype"] == "int8" and sink["functions"] == {"main": 0}
    assert sink["bytes_per_token"] == 2 * 2 * 1 * (4 + 4)


def test_other_cache_use_leaves_module_alone():
    @I.ir_module
    class Escapes:
        @T.prim_func(private=True)
        def kv_cache_write(cache: T.Buffer((2, 2, 1, 8, 4), "float32"), index: T.Buffer((2, 1, 1, 4), "int64"),
                           update: T.Buffer((2, 1, 1, 4), "float32")):
            T.evaluate(0)

        @R.function
        def main(cache: R.Tensor((2, 2, 1, 8, 4), "float32"), index: R.Tensor((2, 1, 1, 4), "int64"),
                 new: R.Tensor((2, 1, 1, 4), "float32")):
            cls = Escapes
            with R.dataflow():
                cache1 = R.call_tir_inplace(cls.kv_cache_write, (cache, index, new),
                                            out_ty=R.Tensor((2, 2, 1, 8, 4), "float32"), inplace_indices=[0])
                layer = R.take(cache1, R.const(0, "int64"), axis=0)  # a float read the kernels do not own
                out = (layer, cache1)
                R.output(out)
            return out

    mod = _with(Escapes, kv_cache_write=_write())
    tvm.ir.assert_structural_equal(without_results(QuantizeKVCache()(mod)), mod)


def _compile_kernel(func):
    return tvm.compile(func.with_attr("global_symbol", "f"), target="llvm")["f"]


def test_write_kernel_matches_numpy_and_checks_capacity():
    rng = np.random.default_rng(0)
    cache = np.zeros(CACHE8, np.int8)
    upd = rng.standard_normal(UPDATE).astype(np.float32)
    upd[1] = 0  # a zero row: scale 0, codes 0
    idx = np.full(UPDATE, 5, np.int64)
    f = _compile_kernel(_write8())
    c = tvm.runtime.tensor(cache)
    f(c, tvm.runtime.tensor(idx), tvm.runtime.tensor(upd))
    expected = cache.copy()
    expected[1, :, :, 5] = quantize_kv_rows(upd[:, :, 0])
    np.testing.assert_array_equal(c.numpy(), expected)
    back = dequantize_kv_rows(c.numpy()[1, :, :, 5])
    assert np.abs(back - upd[:, :, 0]).max() <= np.abs(upd).max() / 127 / 2 + 1e-6
    with pytest.raises(Exception, match="beyond its capacity"):
        f(c, tvm.runtime.tensor(np.full(UPDATE, 8, np.int64)), tvm.runtime.tensor(upd))


@pytest.mark.parametrize("causal", [True, False])
def test_int8_attention_close_to_fp32(causal):
    rng = np.random.default_rng(1)
    L, H, C, D, QH, Tq = 2, 2, 32, 16, 4, 3
    kw = dict(rows=QH, q_heads=QH, rep=QH // H, q_len=Tq, head_dim=D, kv_len=C, k_prefix=(1, 0), v_prefix=(1, 1),
              scale=D ** -0.5, causal=causal)
    f32 = _compile_kernel(fused_attention(k_shape=(L, 2, H, C, D), v_shape=(L, 2, H, C, D), **kw))
    i8 = _compile_kernel(fused_attention(k_shape=(L, 2, H, C, D + 4), v_shape=(L, 2, H, C, D + 4), kv_int8=True, **kw))
    cache = rng.standard_normal((L, 2, H, C, D)).astype(np.float32)
    q = rng.standard_normal((QH, Tq, D)).astype(np.float32)
    pos = [tvm.runtime.tensor(np.array([7, 20, 31], np.int64))] if causal else []

    def run(f, c):
        out = tvm.runtime.tensor(np.zeros((QH, Tq, D), np.float32))
        f(tvm.runtime.tensor(q), tvm.runtime.tensor(c), tvm.runtime.tensor(c), *pos, out)
        return out.numpy()

    qc = quantize_kv_rows(cache)
    ref, got, deq = run(f32, cache), run(i8, qc), run(f32, dequantize_kv_rows(qc))
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    assert rel(got, ref) < 2e-2  # the INT8 rounding
    assert rel(got, deq) < 1e-5  # the kernel's own arithmetic: exactly the stored values


def test_rewritten_module_runs_close_to_fp32():
    rng = np.random.default_rng(2)
    cache = rng.standard_normal(CACHE).astype(np.float32)
    new = rng.standard_normal(UPDATE).astype(np.float32)
    q = rng.standard_normal((2, 1, 4)).astype(np.float32)
    index, pos = np.full(UPDATE, 6, np.int64), np.array([6], np.int64)
    args = [tvm.runtime.tensor(x) for x in (index, new, q, pos)]
    vm = lambda m: relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())  # noqa: E731
    ref = vm(_before())["main"](tvm.runtime.tensor(cache), *args)
    out = vm(QuantizeKVCache()(_before()))["main"](tvm.runtime.tensor(quantize_kv_rows(cache)), *args)
    a, b = out[0].numpy(), ref[0].numpy()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2
    stored = out[1].numpy()
    assert stored.dtype == np.int8 and stored.shape == CACHE8
    np.testing.assert_array_equal(stored[1, :, :, 6], quantize_kv_rows(new[:, :, 0]))  # the new row, quantized
    np.testing.assert_array_equal(stored[0], quantize_kv_rows(cache)[0])  # other layers untouched


def test_bluelm_v_3b_cache_bytes():
    from bluelower.lowering.models import load_config
    from bluelower.lowering.quant.modes import kv_cache_bytes

    cfg = load_config("bluelm-v-3b")
    d = cfg.decoder
    kv8, fp32 = (kv_cache_bytes(d.num_layers, d.num_kv_heads, d.head_dim, cfg.runtime.kv_capacity, dtype)
                 for dtype in ("int8", "float32"))
    assert cfg.runtime.kv_capacity == 2048 and d.head_dim == 80
    assert kv8["bytes"] == 2048 * d.num_layers * 2 * d.num_kv_heads * (80 + 4) == 88_080_384  # 84 MiB
    assert fp32["bytes"] == 335_544_320  # 320 MiB
    print(f"bluelm-v-3b KV cache @2048: int8 {kv8['bytes']} B vs fp32 {fp32['bytes']} B")


def test_pass_applies_to_w4a16kv8_only():
    from bluelower.passes.pipeline import BuildContext, build_pipeline

    spec = next(p for p in build_pipeline() if p.name == "QuantizeKVCache")
    for quant in ("fp32", "w8", "w4a16"):
        assert spec.make(BuildContext(target=tvm.target.Target("llvm"), quant=quant)) is None
    assert spec.make(BuildContext(target=tvm.target.Target("llvm"), quant="w4a16kv8")) is not None


@pytest.fixture(scope="module")
def tiny_kv8_build(build_tiny):
    return build_tiny("w4a16kv8")[0]


def test_tiny_build_int8_cache_generates(tiny_kv8_build):
    from bluelower.reports.eval_quant import check_reference
    from bluelower.runtime_stubs.generate import CompiledModel
    from bluelower.lowering.models import load_config

    cfg = load_config("tiny")
    manifest = json.load(open(os.path.join(tiny_kv8_build, "manifest.json")))
    d = cfg.decoder
    shape = [d.num_layers, 2, d.num_kv_heads, cfg.runtime.kv_capacity, d.head_dim + 4]
    assert manifest["kv_cache"]["shape"] == shape and manifest["kv_cache"]["dtype"] == "int8"
    assert "layout" in manifest["kv_cache"]
    for f in ("prefill", "decode"):
        assert manifest["functions"][f]["inputs"][1] == {"name": "kv_cache", "shape": shape, "dtype": "int8"}
    stats = next(p["stats"] for p in manifest["passes"] if p["name"] == "QuantizeKVCache")
    assert stats["layers"] == d.num_layers and stats["bytes_per_token"] == d.num_layers * 2 * d.num_kv_heads * (d.head_dim + 4)

    model = CompiledModel(tiny_kv8_build)
    model.reset_cache()
    assert model.kv.dtype == "int8"
    rows = np.random.default_rng(3).standard_normal((model.chunk, cfg.decoder.hidden_size)).astype(np.float32)
    ref = check_reference(tiny_kv8_build)  # dequantized weights, cache rows stored through INT8
    ref.reset_cache()
    tokens, ref_tokens = [], []
    for backend, out in ((model, tokens), (ref, ref_tokens)):
        logits = backend.prefill_chunk(rows, 0, 10)
        for step in range(6):
            out.append(int(np.argmax(logits[0])))
            logits = backend.decode_step(out[-1], 10 + step)
    assert model.kv.numpy()[..., : d.head_dim].any()  # the cache holds codes now
    assert tokens == ref_tokens
