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

from bluelower.errors import BlueLowerError
from bluelower.lowering.kernels.attention import (dequantize_kv_rows, fused_attention, kv_cache_write,
                                                  kv_cache_write_int8, quantize_kv_rows)
from bluelower.passes.instruments import pass_stats
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
    after = QuantizeKVCache(required=False)(mod)
    tvm.ir.assert_structural_equal(without_results(after), mod)
    assert pass_stats(after)["QuantizeKVCache"] == {
        "converted": 0, "reason": "main: the cache is used by layer (not a write, an attention or the result)"}
    # the build asked for the INT8 cache (the pipeline's QuantizeKVCache): one line, not a float32 build
    with pytest.raises(BlueLowerError) as info:
        QuantizeKVCache()(mod)
    assert str(info.value) == ("QuantizeKVCache: the INT8 KV cache (--quant w4a16kv8) cannot be built: main: the cache "
                               "is used by layer (not a write, an attention or the result); compile with --quant w4a16 "
                               "for a float32 cache")


def test_cache_update_not_in_place_is_named_with_plan_kv_cache_reason():
    from bluelower.passes.plan_kv_cache import PlanKVCache

    @I.ir_module
    class ReadsOldCache:
        @R.function
        def main(cache: R.Tensor((1, 2, 1, 8, 4), "float32"), index: R.Tensor((2, 1, 1, 4), "int64"),
                 new0: R.Tensor((2, 1, 1, 4), "float32")):
            with R.dataflow():
                layer0 = R.take(cache, R.const(0, "int64"), axis=0)
                past = R.take(layer0, R.const(0, "int64"), axis=0)
                updated0 = R.scatter_elements(layer0, index, new0, axis=2, reduction="update")
                new_cache = R.expand_dims(updated0, axis=[0])
                out = (past, new_cache)
                R.output(out)
            return out

    planned = PlanKVCache()(ReadsOldCache)
    with pytest.raises(BlueLowerError, match=r"cannot be built: main: its KV cache update is not in place \(the cache "
                                             r"is also read as it was before its update \(layer0\)\)"):
        QuantizeKVCache()(planned)
    assert "not in place" in pass_stats(QuantizeKVCache(required=False)(planned))["QuantizeKVCache"]["reason"]


def test_no_cache_is_no_error():
    @I.ir_module
    class Encoder:
        @R.function
        def main(x: R.Tensor((2, 4), "float32")):
            with R.dataflow():
                y = R.nn.softmax(x, axis=-1)
                R.output(y)
            return y

    stats = pass_stats(QuantizeKVCache()(Encoder))["QuantizeKVCache"]
    assert stats == {"converted": 0, "reason": "no KV cache found"}


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


# --- the reference of run --check: rows stored and read as the build does -----------------------


def _rows_of_every_kind(n: int, d: int) -> np.ndarray:
    """K/V rows: Gaussian, large, small, exact rounding ties (x * 127 / amax = k + 0.5), one
    non-zero value, all zero, negative amax."""
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((n, d)).astype(np.float32)
    rows[1::7] *= 1e3
    rows[2::7] *= 1e-30
    ties = rng.integers(-126, 126, (len(rows[3::7]), d)).astype(np.float32) + 0.5
    ties[:, 0] = 127
    rows[3::7] = ties / 127 * 2.5  # amax 2.5: x * 127 / 2.5 is the tie (to float32 rounding)
    rows[4::7] = 0
    rows[4::7, 3] = -0.75
    rows[5::7] = 0
    rows[6::7] = -np.abs(rows[6::7])
    return rows


def test_reference_rows_are_the_kernels_bit_for_bit():
    """The reference stores ``stored_kv_rows(rows)``: the write kernel's bytes decoded as the
    fused INT8 attention decodes them. Written by ``kv_cache_write_int8`` and read back by the
    attention (one key per head: its output is that V row, dequantized), bit for bit."""
    from bluelower.reports.eval_quant import stored_kv_rows

    heads, d = 70, 16
    rows = _rows_of_every_kind(heads, d)
    cache_shape = (1, 2, heads, 1, d + 4)
    update = np.stack([rows, rows[::-1]])[:, :, None, :]  # [k|v, heads, 1 position, d]
    write = _compile_kernel(kv_cache_write_int8(cache_shape=cache_shape, prefix=(0,), axis=2,
                                                update_shape=update.shape))
    cache = tvm.runtime.tensor(np.zeros(cache_shape, np.int8))
    write(cache, tvm.runtime.tensor(np.zeros(update.shape, np.int64)), tvm.runtime.tensor(update))
    np.testing.assert_array_equal(cache.numpy()[0, :, :, 0], quantize_kv_rows(update[:, :, 0]))

    attend = _compile_kernel(fused_attention(rows=heads, q_heads=heads, rep=1, q_len=1, head_dim=d, kv_len=1,
                                             k_shape=cache_shape, k_prefix=(0, 0), v_shape=cache_shape,
                                             v_prefix=(0, 1), scale=d**-0.5, causal=True, kv_int8=True))
    out = tvm.runtime.tensor(np.zeros((heads, 1, d), np.float32))
    q = np.random.default_rng(6).standard_normal((heads, 1, d)).astype(np.float32)
    attend(tvm.runtime.tensor(q), cache, cache, tvm.runtime.tensor(np.zeros(1, np.int64)), out)
    want = stored_kv_rows(update[1, :, 0])
    assert np.array_equal(out.numpy()[:, 0].view(np.uint32), want.view(np.uint32))  # bit for bit, zeros too


def test_following_the_build_accepts_rounding_ties_only():
    from bluelower.reports.eval_quant import follow_stored_rows, stored_kv_rows

    rows = _rows_of_every_kind(14, 16)
    stored = quantize_kv_rows(rows)
    np.testing.assert_array_equal(follow_stored_rows(rows, stored, ""), stored_kv_rows(rows))
    tie = stored.copy()
    tie[3, 1] += 1 if rows[3, 1] > 0 else -1  # row 3 holds ties: float noise may round either way
    assert follow_stored_rows(rows, tie, "").tolist() == dequantize_kv_rows(tie).tolist()
    for bug in ("code", "two", "scale"):
        wrong = stored.copy()
        if bug == "code":
            wrong[0, 2] += 1  # a Gaussian value is no tie
        elif bug == "two":
            wrong[3, 1] += 2
        else:
            wrong[0, -4:] = (np.frombuffer(wrong[0, -4:].tobytes(), "<f4") * 1.01).view(np.int8)
        with pytest.raises(BlueLowerError, match=r"INT8 KV cache row \(layer 0\) \[[03]\] is not the reference's"):
            follow_stored_rows(rows, wrong, "(layer 0) ")


def test_tiny_kv8_check_logits_within_float32_noise_for_many_tokens(tiny_kv8_build):
    """``run --check``'s reference of a w4a16kv8 build: its logits within float32
    summation-order noise of the build's at every step (measured: max relative 4.6e-6 over
    64 steps; following its own rounding only, 1.6e-5, and on SmolLM2 0.16 in the logits:
    float noise flips codes at rounding ties, and flips grow through the layers)."""
    from bluelower import api
    from bluelower.reports.eval_quant import check_reference
    from bluelower.runtime_stubs.generate import CompiledModel

    built, ref = CompiledModel(tiny_kv8_build), check_reference(tiny_kv8_build)
    rng = np.random.default_rng(8)
    rows = rng.standard_normal((built.chunk, 64)).astype(np.float32)
    logits = {}
    for name, backend in (("build", built), ("reference", ref)):
        backend.reset_cache()
        steps = [backend.prefill_chunk(rows, 0, built.chunk), backend.prefill_chunk(rows[::-1].copy(), built.chunk, 20)]
        tokens = [int(np.argmax(steps[-1][0]))] if name == "build" else tokens
        for j in range(96):
            steps.append(backend.decode_step(tokens[j], built.chunk + 20 + j))
            if name == "build":
                tokens.append(int(np.argmax(steps[-1][0])))
        logits[name] = steps
    rel = [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(logits["build"], logits["reference"])]
    assert max(rel) < 1e-5, max(rel)
    out = api.run(tiny_kv8_build, prompt_ids=[int(i) for i in rng.integers(3, 500, 90)], max_new_tokens=48, check=True)
    assert out["match"] and len(out["tokens"]) == 48


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
@pytest.mark.parametrize("shape", ["mha", "mqa", "1layer"])
def test_every_shape_gets_an_int8_cache_and_passes_check(shape, frontend, tmp_path):
    from bluelower import api

    from test_plan_kv_cache import tiny_variant

    out = str(tmp_path / "build")
    manifest = api.compile(tiny_variant(tmp_path, shape), out, quant="w4a16kv8", frontend=frontend)
    assert manifest["kv_cache"]["dtype"] == "int8"
    stats = next(p["stats"] for p in manifest["passes"] if p["name"] == "QuantizeKVCache")
    assert stats["converted"] == 1
    run = api.run(out, prompt_ids=[5, 9, 77, 3, 140, 8, 21], max_new_tokens=24, check=True)
    assert run["match"], (run["tokens"], run["reference_tokens"])


def test_w4a16kv8_build_without_an_in_place_cache_fails_in_one_line(tmp_path, monkeypatch):
    """A family whose attention also reads the cache as it was before the update: PlanKVCache
    cannot make it in place, so w4a16kv8 is one BlueLowerError naming the function and why."""
    from bluelower import api
    from bluelower.lowering.models.llama import model as llama_model

    forward = llama_model.LlamaAttention.forward

    def reads_old_cache(self, x, cos, sin, positions, layer_cache):
        out, new_cache = forward(self, x, cos, sin, positions, layer_cache)
        return out + 0 * layer_cache[0, :, :1].sum(), new_cache

    monkeypatch.setattr(llama_model.LlamaAttention, "forward", reads_old_cache)
    with pytest.raises(BlueLowerError) as info:
        api.compile("llama-tiny", str(tmp_path / "build"), quant="w4a16kv8")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("QuantizeKVCache: the INT8 KV cache (--quant w4a16kv8) cannot be built: ")
    assert "decode: its KV cache update is not in place (the cache is also read as it was before its update" in msg
    assert not os.path.exists(tmp_path / "build" / "manifest.json")


def test_rows_below_the_float32_range_of_127_over_amax():
    d = 8
    rows = np.zeros((2, 1, 1, d), np.float32)
    rows[0, 0, 0, 0] = 1e-38  # amax 1e-38: 127 / amax = inf
    rows[1, 0, 0, 2] = 2e-37
    shape = (1, 2, 1, 1, d + 4)
    write = _compile_kernel(kv_cache_write_int8(cache_shape=shape, prefix=(0,), axis=2, update_shape=rows.shape))
    cache = tvm.runtime.tensor(np.zeros(shape, np.int8))
    write(cache, tvm.runtime.tensor(np.zeros(rows.shape, np.int64)), tvm.runtime.tensor(rows))
    codes = cache.numpy()[0, :, 0, 0, :d]
    # below MIN_AMAX (127 / amax would overflow float32) a row is stored as zero codes, as numpy does
    assert (codes[0] == 0).all() and (codes[1] == 0).all()
    np.testing.assert_array_equal(cache.numpy()[0, :, 0, 0], quantize_kv_rows(rows)[:, 0, 0])
