"""PlanKVCache: golden rewrite, numerics, no whole-cache copy in the lowered decode, capacity check."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from bluelower.lowering.kernels.attention import kv_cache_write
from bluelower.passes.plan_kv_cache import PlanKVCache
from bluelower.passes.ir_utils import without_results


# 2 layers, k/v, 1 KV head, capacity 8, head_dim 4; one new row per step (decode-shaped)
@I.ir_module
class FunctionalCache:
    @R.function
    def main(cache: R.Tensor((2, 2, 1, 8, 4), "float32"), index: R.Tensor((2, 1, 1, 4), "int64"),
             new0: R.Tensor((2, 1, 1, 4), "float32"), new1: R.Tensor((2, 1, 1, 4), "float32")):
        with R.dataflow():
            layer0 = R.take(cache, R.const(0, "int64"), axis=0)
            updated0 = R.scatter_elements(layer0, index, new0, axis=2, reduction="update")
            keys0 = R.take(updated0, R.const(0, "int64"), axis=0)
            layer1 = R.take(cache, R.const(1, "int64"), axis=0)
            updated1 = R.scatter_elements(layer1, index, new1, axis=2, reduction="update")
            stacked = R.concat((updated0, updated1), axis=0)
            new_cache = R.reshape(stacked, R.shape([2, 2, 1, 8, 4]))
            out = (keys0, new_cache)
            R.output(out)
        return out


@I.ir_module
class InPlaceCache:
    @T.prim_func(private=True)
    def kv_cache_write(cache: T.Buffer((2, 2, 1, 8, 4), "float32"), index: T.Buffer((2, 1, 1, 4), "int64"),
                       update: T.Buffer((2, 1, 1, 4), "float32")):
        T.evaluate(0)  # stub: replaced by the kernel builder's output

    @T.prim_func(private=True)
    def kv_cache_write1(cache: T.Buffer((2, 2, 1, 8, 4), "float32"), index: T.Buffer((2, 1, 1, 4), "int64"),
                        update: T.Buffer((2, 1, 1, 4), "float32")):
        T.evaluate(0)

    @R.function
    def main(cache: R.Tensor((2, 2, 1, 8, 4), "float32"), index: R.Tensor((2, 1, 1, 4), "int64"),
             new0: R.Tensor((2, 1, 1, 4), "float32"), new1: R.Tensor((2, 1, 1, 4), "float32")):
        cls = InPlaceCache
        with R.dataflow():
            # the running cache value is the parameter itself: only the new rows are written
            cache1 = R.call_tir_inplace(cls.kv_cache_write, (cache, index, new0),
                                        out_ty=R.Tensor((2, 2, 1, 8, 4), "float32"), inplace_indices=[0])
            layer0 = R.take(cache1, R.const(0, "int64"), axis=0)
            keys0 = R.take(layer0, R.const(0, "int64"), axis=0)
            cache2 = R.call_tir_inplace(cls.kv_cache_write1, (cache1, index, new1),
                                        out_ty=R.Tensor((2, 2, 1, 8, 4), "float32"), inplace_indices=[0])
            out = (keys0, cache2)
            R.output(out)
        return out


def _writer(layer):
    return kv_cache_write(cache_shape=(2, 2, 1, 8, 4), prefix=(layer,), axis=2, update_shape=(2, 1, 1, 4))


def test_golden_in_place_rewrite():
    after = PlanKVCache()(FunctionalCache)
    expected = InPlaceCache.clone() if hasattr(InPlaceCache, "clone") else InPlaceCache
    expected = tvm.IRModule(dict(expected.functions_items()))
    expected.update_func(expected.get_global_var("kv_cache_write"), _writer(0))
    expected.update_func(expected.get_global_var("kv_cache_write1"), _writer(1))
    tvm.ir.assert_structural_equal(without_results(after), expected)


def _vm(mod):
    return relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())


def _inputs(position):
    rng = np.random.default_rng(1)
    cache = rng.standard_normal((2, 2, 1, 8, 4)).astype(np.float32)
    index = np.full((2, 1, 1, 4), position, np.int64)
    return cache, index, rng.standard_normal((2, 1, 1, 4)).astype(np.float32), \
        rng.standard_normal((2, 1, 1, 4)).astype(np.float32)


def test_in_place_matches_functional_and_returns_the_same_buffer():
    ref_keys, ref_cache = [x.numpy() for x in _vm(FunctionalCache)["main"](*map(tvm.runtime.tensor, _inputs(5)))]
    args = [tvm.runtime.tensor(a) for a in _inputs(5)]
    keys, cache = _vm(PlanKVCache()(FunctionalCache))["main"](*args)
    np.testing.assert_array_equal(keys.numpy(), ref_keys)
    np.testing.assert_array_equal(cache.numpy(), ref_cache)
    np.testing.assert_array_equal(args[0].numpy(), ref_cache)  # written in place: the input is the result


def test_write_beyond_capacity_is_a_runtime_error():
    vm = _vm(PlanKVCache()(FunctionalCache))
    args = [tvm.runtime.tensor(a) for a in _inputs(8)]  # position == capacity
    before = args[0].numpy().copy()
    with pytest.raises(Exception, match="beyond its capacity"):
        vm["main"](*args)
    np.testing.assert_array_equal(args[0].numpy(), before)  # nothing was written


# --- the ONNX spellings: stacked by concat(expand_dims(layer, 0)), one layer by expand_dims ---


@I.ir_module
class OnnxStackedCache:
    @R.function
    def main(cache: R.Tensor((2, 2, 1, 8, 4), "float32"), index: R.Tensor((2, 1, 1, 4), "int64"),
             new0: R.Tensor((2, 1, 1, 4), "float32"), new1: R.Tensor((2, 1, 1, 4), "float32")):
        with R.dataflow():
            layer0 = R.take(cache, R.const(0, "int64"), axis=0)
            updated0 = R.scatter_elements(layer0, index, new0, axis=2, reduction="update")
            keys0 = R.take(updated0, R.const(0, "int64"), axis=0)
            layer1 = R.take(cache, R.const(1, "int64"), axis=0)
            updated1 = R.scatter_elements(layer1, index, new1, axis=2, reduction="update")
            e0 = R.expand_dims(updated0, axis=[0])
            e1 = R.expand_dims(updated1, axis=[0])
            new_cache = R.concat((e0, e1), axis=0)
            out = (keys0, new_cache)
            R.output(out)
        return out


@I.ir_module
class OneLayerCache:  # the ONNX import of a 1-layer model: no concat, the index computed from the shape
    @R.function
    def main(cache: R.Tensor((1, 2, 1, 8, 4), "float32"), index: R.Tensor((2, 1, 1, 4), "int64"),
             new0: R.Tensor((2, 1, 1, 4), "float32")):
        with R.dataflow():
            shape = R.shape_to_tensor(R.shape_of(cache))
            neg = R.less(R.const(0, "int64"), R.const(0, "int64"))
            wrapped = R.add(R.const(0, "int64"), R.take(shape, R.const(0, "int64"), axis=0, mode="wrap"))
            i = R.where(neg, wrapped, R.const(0, "int64"))
            layer0 = R.take(cache, i, axis=0)
            updated0 = R.scatter_elements(layer0, index, new0, axis=2, reduction="update")
            keys0 = R.take(updated0, R.const(0, "int64"), axis=0)
            new_cache = R.expand_dims(updated0, axis=[0])
            out = (keys0, new_cache)
            R.output(out)
        return out


@I.ir_module
class OneLayerInPlace:
    @T.prim_func(private=True)
    def kv_cache_write(cache: T.Buffer((1, 2, 1, 8, 4), "float32"), index: T.Buffer((2, 1, 1, 4), "int64"),
                       update: T.Buffer((2, 1, 1, 4), "float32")):
        T.evaluate(0)

    @R.function
    def main(cache: R.Tensor((1, 2, 1, 8, 4), "float32"), index: R.Tensor((2, 1, 1, 4), "int64"),
             new0: R.Tensor((2, 1, 1, 4), "float32")):
        cls = OneLayerInPlace
        with R.dataflow():
            cache1 = R.call_tir_inplace(cls.kv_cache_write, (cache, index, new0),
                                        out_ty=R.Tensor((1, 2, 1, 8, 4), "float32"), inplace_indices=[0])
            layer0 = R.take(cache1, R.const(0, "int64"), axis=0)
            keys0 = R.take(layer0, R.const(0, "int64"), axis=0)
            out = (keys0, cache1)
            R.output(out)
        return out


def test_golden_onnx_stacking():
    expected = tvm.IRModule(dict(InPlaceCache.functions_items()))
    expected.update_func(expected.get_global_var("kv_cache_write"), _writer(0))
    expected.update_func(expected.get_global_var("kv_cache_write1"), _writer(1))
    tvm.ir.assert_structural_equal(without_results(PlanKVCache()(OnnxStackedCache)), expected)


def test_golden_one_layer():
    after = PlanKVCache()(OneLayerCache)
    expected = tvm.IRModule(dict(OneLayerInPlace.functions_items()))
    expected.update_func(expected.get_global_var("kv_cache_write"),
                         kv_cache_write(cache_shape=(1, 2, 1, 8, 4), prefix=(0,), axis=2, update_shape=(2, 1, 1, 4)))
    tvm.ir.assert_structural_equal(without_results(after), expected)
    args = [tvm.runtime.tensor(a) for a in _inputs(3)[:3]]
    args[0] = tvm.runtime.tensor(args[0].numpy()[:1].copy())
    ref = [x.numpy() for x in _vm(OneLayerCache)["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])]
    got = [x.numpy() for x in _vm(after)["main"](*args)]
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


@I.ir_module
class ReadsOldCache:  # an attention over the cache as it was (a past-keys read) besides the update
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


@I.ir_module
class LayerTwice:
    @R.function
    def main(cache: R.Tensor((2, 2, 1, 8, 4), "float32"), index: R.Tensor((2, 1, 1, 4), "int64"),
             new0: R.Tensor((2, 1, 1, 4), "float32")):
        with R.dataflow():
            a = R.scatter_elements(R.take(cache, R.const(0, "int64"), axis=0), index, new0, axis=2, reduction="update")
            b = R.scatter_elements(R.take(cache, R.const(0, "int64"), axis=0), index, new0, axis=2, reduction="update")
            new_cache = R.concat((R.expand_dims(a, axis=[0]), R.expand_dims(b, axis=[0])), axis=0)
            R.output(new_cache)
        return new_cache


@pytest.mark.parametrize("mod, reason", [
    (ReadsOldCache, "the cache is also read as it was before its update (layer0)"),
    (LayerTwice, "layer(s) [0] written more than once"),
])
def test_unplanned_function_is_left_alone_with_the_reason(mod, reason):
    after = PlanKVCache()(mod)
    tvm.ir.assert_structural_equal(without_results(after), mod)
    from bluelower.passes.instruments import pass_stats

    stats = pass_stats(after)["PlanKVCache"]
    assert stats["in_place_writes"] == 0 and stats["not_planned"] == {"main": reason}


# --- the model -------------------------------------------------------------------------


def tiny_variant(tmp_path, shape: str) -> str:
    """A copy of the tiny config with multi-head (``mha``), multi-query (``mqa``) attention or
    one decoder layer (``1layer``); returns the JSON path."""
    import json
    import os

    from bluelower.lowering.models.bluelm_v import SPEC

    with open(os.path.join(SPEC.config_dir, "tiny.json"), encoding="utf-8") as fh:
        data = json.load(fh)
    data["name"] = f"tiny-{shape}"
    data["decoder"].update({"mha": dict(num_kv_heads=4), "mqa": dict(num_kv_heads=1), "1layer": dict(num_layers=1)}[shape])
    path = tmp_path / f"tiny-{shape}.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
@pytest.mark.parametrize("shape", ["mha", "mqa", "1layer"])
def test_every_shape_is_planned_through_both_frontends(shape, frontend, tmp_path):
    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.models import load_config
    from bluelower.passes.instruments import pass_stats

    cfg = load_config(tiny_variant(tmp_path, shape))
    mod, _ = import_model(cfg, frontend, entries=["prefill", "decode"])
    mod = relax.transform.DeadCodeElimination(["prefill", "decode"])(relax.transform.CanonicalizeBindings()(mod))
    stats = pass_stats(PlanKVCache()(mod))["PlanKVCache"]
    layers = cfg.decoder.num_layers
    assert stats["per_function"] == {"prefill": layers, "decode": layers} and "not_planned" not in stats




def _lowered_decode(disabled=()):
    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.models import load_config, spec_for
    from bluelower.passes.pipeline import BuildContext, run_pipeline

    cfg = load_config("tiny")
    mod, _ = import_model(cfg, "torch", entries=["decode"])
    ctx = BuildContext(target=tvm.target.Target("llvm"), quant="fp32", spec=spec_for(cfg), entry_functions=("decode",))
    mod, stats = run_pipeline(mod, ctx, disabled=disabled)
    d, r = cfg.decoder, cfg.runtime
    return mod, (d.num_layers, 2, d.num_kv_heads, r.kv_capacity, d.head_dim), stats


def _whole_cache_copies(mod, cache_shape):
    """PrimFuncs (other than ours) that take a whole-cache buffer, and cache-sized allocations."""
    shape = tuple(cache_shape)
    nbytes = int(np.prod(shape)) * 4
    copies = []
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            kernel = str(func.attrs["bluelower.kernel"]) if func.attrs and "bluelower.kernel" in func.attrs else ""
            if kernel.startswith(("kv_cache_write", "attention_")):
                continue
            for p in func.params:
                buf = p if isinstance(p, tvm.tirx.Buffer) else None
                if buf is not None and tuple(int(x) for x in buf.shape) == shape:
                    copies.append(gv.name_hint)
    text = mod["decode"].script(show_meta=False)
    allocs = [line for line in text.splitlines()
              if ("alloc_storage(" in line or "alloc_tensor(" in line)
              and (f"R.shape([{nbytes}])" in line or str(list(shape))[1:-1] in line)]
    return copies, allocs


def test_lowered_decode_has_no_whole_cache_copy():
    mod, cache_shape, stats = _lowered_decode()
    copies, allocs = _whole_cache_copies(mod, cache_shape)
    assert copies == [] and allocs == []
    lines = mod["decode"].script(show_meta=False).splitlines()
    assert next(l for l in lines if l.strip().startswith("gv:")).endswith(", kv_cache")  # returns the buffer it got
    plan = next(s["stats"] for s in stats if s["name"] == "PlanKVCache")
    assert plan["per_function"] == {"decode": cache_shape[0]}
    # the check sees the copy when the pass is off
    mod, _, _ = _lowered_decode(disabled=("PlanKVCache",))
    copies, allocs = _whole_cache_copies(mod, cache_shape)
    assert copies or allocs


def test_decode_at_capacity_raises(tiny_build_torch):
    from bluelower.runtime_stubs.generate import CompiledModel

    model = CompiledModel(tiny_build_torch)
    model.reset_cache()
    model.decode_step(5, model.capacity - 1)  # the last row is fine
    with pytest.raises(Exception, match="beyond its capacity"):
        model.decode_step(5, model.capacity)


# --- decode time vs cache fill: in place vs copying ------------------------------------


@pytest.fixture(scope="module")
def kv2048_decode():
    """A tiny decoder with a 4 MiB fp32 KV cache (2 layers x k/v x 8 KV heads x 2048 x 16),
    16 query heads (GQA 2): ``decode`` lowered and built twice, with PlanKVCache (in place)
    and without it (the importer's functional update: a new cache every step). Only
    ``decode`` is imported and built (seconds, not a whole compile)."""
    import json
    import os

    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.models import spec_for
    from bluelower.lowering.models.bluelm_v import SPEC, config_from_dict
    from bluelower.passes.pipeline import BuildContext, run_pipeline

    with open(os.path.join(SPEC.config_dir, "tiny.json"), encoding="utf-8") as fh:
        data = json.load(fh)
    data["name"] = "tiny-kv2048"
    data["decoder"].update(num_layers=2, hidden_size=128, num_heads=16, num_kv_heads=8, head_dim=16)
    data["runtime"]["kv_capacity"] = 2048
    cfg = config_from_dict(data)
    d, r = cfg.decoder, cfg.runtime
    shape = (d.num_layers, 2, d.num_kv_heads, r.kv_capacity, d.head_dim)
    imported, _ = import_model(cfg, "torch", entries=["decode"])
    builds = {}
    for label, disabled in (("in_place", ()), ("copying", ("PlanKVCache",))):
        ctx = BuildContext(target=tvm.target.Target("llvm"), quant="fp32", spec=spec_for(cfg), entry_functions=("decode",))
        mod, _ = run_pipeline(imported, ctx, disabled=disabled)
        vm = relax.VirtualMachine(relax.build(mod, target="llvm"), tvm.cpu())
        rng = np.random.default_rng(0)
        params = [tvm.runtime.tensor((0.1 * rng.standard_normal([int(s) for s in p.ty.shape.values]))
                                     .astype(str(p.ty.dtype))) for p in mod["decode"].params[3:]]
        builds[label] = (mod, vm, params)
    return shape, builds


def _step_times(builds, shape, fills, rounds, steps):
    """``{(build, fill): seconds}``: the minimum over ``rounds`` of the lower quartile of
    ``steps`` decode steps; the four (build, fill) series are interleaved round by round so
    that a burst of load on the shared machine hits all of them alike. Not the median: the
    copying build's steps are bimodal (~2 ms, or ~10 ms when the new cache lands on fresh
    pages; measured), and a median of a few steps flips between the modes."""
    import time

    kv = {label: tvm.runtime.tensor(np.zeros(shape, np.float32)) for label in builds}
    token = tvm.runtime.tensor(np.array([7], np.int64))
    best = {}
    for _ in range(rounds):
        for label, (_mod, vm, params) in builds.items():
            for fill in fills:
                position = tvm.runtime.tensor(np.array([fill], np.int64))
                kv[label] = vm["decode"](token, kv[label], position, *params)[1]  # warm up
                samples = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    kv[label] = vm["decode"](token, kv[label], position, *params)[1]
                    samples.append(time.perf_counter() - t0)
                m = float(np.percentile(samples, 25))
                best[(label, fill)] = min(best.get((label, fill), m), m)
    return best


def test_decode_time_grows_with_fill_only_by_the_attention_reads(kv2048_decode):
    """In place, a decode step at fill 2000 costs more than at fill 16 only by the
    attention's extra key/value reads; copying, every step also pays a whole-cache copy,
    the same at both fills. Margins are wide (minimum over rounds of lower quartiles,
    ratios, up to three measurements): the test runs on a loaded 2-core machine."""
    shape, builds = kv2048_decode
    cache_bytes = int(np.prod(shape)) * 4
    # structure: the in-place decode has no kernel taking the whole cache other than the
    # per-layer row writes and the fused attention, and no cache-sized allocation
    mod = builds["in_place"][0]
    assert _whole_cache_copies(mod, shape) == ([], [])
    kernels = {gv.name_hint: str(f.attrs["bluelower.kernel"]) for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "bluelower.kernel" in f.attrs}
    assert sum(k.startswith("attention_") for k in kernels.values()) >= 1
    # one row write per layer: calls of the (ShareLayerKernels: one shared) write kernel
    calls = []
    relax.analysis.post_order_visit(mod["decode"], lambda e: calls.append(e.op.name_hint) if (
        isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar)) else None)
    assert sum(kernels.get(c, "").startswith("kv_cache_write") for c in calls) == shape[0]
    copies, allocs = _whole_cache_copies(builds["copying"][0], shape)
    assert copies or allocs  # the check sees the copy when there is one

    lo, hi = 16, 2000
    for attempt in range(3):  # a retry only re-measures: the minima can only get closer to the truth
        t = _step_times(builds, shape, (lo, hi), rounds=6, steps=16)
        if attempt:
            t = {k: min(v, best[k]) for k, v in t.items()}
        best = t
        in_lo, in_hi = t[("in_place", lo)], t[("in_place", hi)]
        copy_extra_lo = t[("copying", lo)] - in_lo  # the whole-cache copy, at fill 16
        copy_extra_hi = t[("copying", hi)] - in_hi  # ... and at fill 2000
        ok = (
            # in place at fill 16 is much cheaper than copying (measured 7x to 90x, with load)
            t[("copying", lo)] > 2.0 * in_lo
            # a copy costs the whole capacity regardless of fill (measured ratio 0.95 to 1.46)
            and 0.5 < copy_extra_hi / copy_extra_lo < 2.0
            # model: from fill 16 to 2000 the attention reads (2000-16)/2048 of the cache
            # once more; the copy reads and writes the whole cache twice (scatter, stack), 4x
            # the traffic; so the in-place growth is ~1/4 of the copy's cost (measured 0.02 to 0.26)
            and in_hi - in_lo < 0.75 * copy_extra_lo
        )
        if ok:
            break
    detail = {f"{k[0]}@{k[1]}": round(v * 1e3, 3) for k, v in best.items()}  # ms
    print("decode step ms (min over rounds of the lower quartile):", detail)
    assert t[("copying", lo)] > 2.0 * in_lo, detail
    assert 0.5 < copy_extra_hi / copy_extra_lo < 2.0, detail
    assert in_hi - in_lo < 0.75 * copy_extra_lo, (detail, f"cache {cache_bytes} bytes")
