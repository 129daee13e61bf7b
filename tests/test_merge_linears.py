"""MergeSiblingLinears / kernels.merge: linear kernels that read one activation run as one
kernel, one parallel region, with bit-identical results."""

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from bluelower.lowering.kernels import host_target, int4_linear, int8_linear
from bluelower.lowering.kernels.linear_a8 import int4_a8_linear, int8_a8_linear
from bluelower.lowering.kernels.merge import merge_block_parallel, merge_gated_pair
from bluelower.runtime_stubs.generate import CompiledModel


def _run(func, args):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), host_target())
    lib["main"](*args)


def _data(param, rng):
    shape, dtype = tuple(int(d) for d in param.shape), str(param.dtype)
    if dtype == "uint8":
        return rng.integers(0, 256, shape).astype(dtype)
    if dtype == "int8":
        return rng.integers(-127, 128, shape).astype(dtype)
    if dtype == "int32":
        return rng.integers(-999, 1000, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


KERNELS = {
    # q/k/v-like (k and v are one cached PrimFunc object: the merge copies it) and gate/up-like
    "int4_gemv": lambda: [int4_linear(1, n, 128, 32) for n in (128, 64, 64)],
    "int4_asym_gemv": lambda: [int4_linear(1, n, 128, 32, asym=True) for n in (96, 96)],
    "int4_asym_gemm": lambda: [int4_linear(5, n, 128, 32, asym=True) for n in (128, 32, 32)],
    "int8_group_gemv": lambda: [int8_linear(1, n, 128, group_size=32) for n in (64, 32)],
    "int4_a8_gemv": lambda: [int4_a8_linear(1, n, 128, 32, asym=True) for n in (128, 64, 64)],
    "int8_a8_gemm": lambda: [int8_a8_linear(3, n, 128, 32) for n in (64, 64)],
}


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_merged_kernel_is_bit_identical(kind):
    funcs = KERNELS[kind]()
    merged = merge_block_parallel(funcs, "merged")
    assert not isinstance(merged, str), merged
    assert list(merged.attrs["bluelower.merged"]) == [str(f.attrs["bluelower.kernel"]) for f in funcs]
    dev, rng = tvm.cpu(), np.random.default_rng(0)
    inputs = [[_data(p, rng) for p in list(f.params)[:-1]] for f in funcs]
    n_act = 3 if "a8" in kind else 1
    for other in inputs[1:]:  # the siblings read one activation
        other[:n_act] = inputs[0][:n_act]
    alone = []
    for f, args in zip(funcs, inputs):
        y = tvm.runtime.tensor(np.zeros([int(d) for d in f.params[-1].shape], "float32"), dev)
        _run(f, [tvm.runtime.tensor(a, dev) for a in args] + [y])
        alone.append(y.numpy())
    outs = [tvm.runtime.tensor(np.zeros(a.shape, "float32"), dev) for a in alone]
    _run(merged, [tvm.runtime.tensor(a, dev) for args in inputs for a in args] + outs)
    for a, b in zip(alone, outs):
        assert np.abs(a).max() > 0 and np.array_equal(a, b.numpy())


def _silu_times(g, u):
    """``silu(g) * u`` as TVM legalizes and builds it (sigmoid, two multiplies)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    gv, uv = (relax.Var(n, relax.TensorType(g.shape, "float32")) for n in ("g", "u"))
    with bb.function("main", [gv, uv]):
        with bb.dataflow():
            s = bb.emit(relax.op.sigmoid(gv))
            out = bb.emit_output(relax.op.multiply(bb.emit(relax.op.multiply(gv, s)), uv))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), host_target()), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(g), tvm.runtime.tensor(u)).numpy()


@pytest.mark.parametrize("kind", ["int4_asym_gemv", "int4_gemm", "int4_a8_gemv"])
def test_gated_pair_fuses_silu_bit_identically(kind):
    make = {"int4_asym_gemv": lambda: int4_linear(1, 96, 128, 32, asym=True),
            "int4_gemm": lambda: int4_linear(4, 96, 128, 32),
            "int4_a8_gemv": lambda: int4_a8_linear(1, 96, 128, 32)}[kind]
    gate, up = make(), make()  # one cached object twice, as QuantizeWeights leaves gate/up
    fused = merge_gated_pair(gate, up, "gated")
    assert not isinstance(fused, str), fused
    dev, rng = tvm.cpu(), np.random.default_rng(3)
    args_g = [_data(p, rng) * (np.float32(0.3) if str(p.dtype) == "float32" else 1) for p in list(gate.params)[:-1]]
    args_u = [_data(p, rng) for p in list(up.params)[:-1]]
    n_act = 3 if "a8" in kind else 1
    args_u[:n_act] = args_g[:n_act]
    shape = [int(d) for d in gate.params[-1].shape]
    outs = [tvm.runtime.tensor(np.zeros(shape, "float32"), dev) for _ in range(3)]
    _run(fused, [tvm.runtime.tensor(a, dev) for a in args_g + args_u] + outs)
    g, u, h = (o.numpy() for o in outs)
    assert np.abs(h).max() > 0 and np.array_equal(h, _silu_times(g, u))


def test_kernel_that_is_not_block_parallel_is_refused():
    @T.prim_func(private=True)
    def serial(x: T.Buffer((4,), "float32"), y: T.Buffer((4,), "float32")):
        for i in range(4):
            y[i] = x[i]

    why = merge_block_parallel([serial.with_attr("bluelower.kernel", "copy"), int4_linear(1, 32, 32, 32)], "m")
    assert why == "copy: its body does not end in one parallel loop"


def _layer(merged: bool, silu: bool):
    """x -> q/k/v (three INT4 GEMVs on x), y -> gate/up (+ silu(g) * u when ``silu``), and z ->
    one GEMV that shares nothing; ``merged``: as MergeSiblingLinears should leave it."""
    from tvm import relax

    K = 64
    qkv = [int4_linear(1, n, K, 32) for n in (64, 32, 32)]
    gate_up = [int4_linear(1, 96, K, 32, asym=True)] * 2
    alone = int4_linear(1, 32, K, 32)
    act = {n: relax.Var(n, relax.TensorType((1, K), "float32")) for n in ("x", "y", "z")}

    def weights(f, tag):
        return [relax.Var(f"{tag}_{p.name}", relax.TensorType(tuple(int(d) for d in p.shape), str(p.dtype)))
                for p in list(f.params)[1:-1]]

    w = {t: weights(f, t) for t, f in zip(("q", "k", "v", "g", "u", "o"), qkv + gate_up + [alone])}
    bb = relax.BlockBuilder()
    with bb.function("main", list(act.values()) + [p for t in w for p in w[t]]):
        with bb.dataflow():
            def ty(f):
                return relax.TensorType(tuple(int(d) for d in f.params[-1].shape), "float32")

            if merged:
                name = "int4_linear_1x64x64_g32_k1_and_2"
                gv = bb.add_func(merge_block_parallel(qkv, name), name)
                t = bb.emit(relax.call_tir(gv, [a for tag in "qkv" for a in [act["x"], *w[tag]]], [ty(f) for f in qkv]))
                outs = [bb.emit(relax.TupleGetItem(t, i)) for i in range(3)]
            else:
                gvs = [bb.add_func(f, f"int4_linear_1x{int(f.params[-1].shape[1])}x64") for f in qkv]
                outs = [bb.emit(relax.call_tir(g, [act["x"], *w[tag]], ty(f))) for g, tag, f in zip(gvs, "qkv", qkv)]
            gname = "int4_linear_1x96x64_g32_k1_asym"
            if merged and silu:
                gv = bb.add_func(merge_gated_pair(*gate_up, gname + "_and_1_silu"), gname + "_and_1_silu")
                t = bb.emit(relax.call_tir(gv, [a for tag in "gu" for a in [act["y"], *w[tag]]], [ty(gate_up[0])] * 3))
                outs.append(bb.emit(relax.TupleGetItem(t, 2)))
            elif merged:
                gv = bb.add_func(merge_block_parallel(gate_up, gname + "_and_1"), gname + "_and_1")
                t = bb.emit(relax.call_tir(gv, [a for tag in "gu" for a in [act["y"], *w[tag]]], [ty(gate_up[0])] * 2))
                outs += [bb.emit(relax.TupleGetItem(t, i)) for i in range(2)]
            else:
                gv = bb.add_func(gate_up[0], gname)
                g, u = (bb.emit(relax.call_tir(gv, [act["y"], *w[tag]], ty(gate_up[0]))) for tag in "gu")
                if silu:
                    outs.append(bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(g, bb.emit(relax.op.sigmoid(g)))), u)))
                else:
                    outs += [g, u]
            gv = bb.add_func(alone, "int4_linear_1x32x64")
            outs.append(bb.emit(relax.call_tir(gv, [act["z"], *w["o"]], ty(alone))))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("silu", [False, True])
def test_golden(silu):
    from bluelower.passes.merge_sibling_linears import MergeSiblingLinears

    after = MergeSiblingLinears()(_layer(merged=False, silu=silu))
    expected = _layer(merged=True, silu=silu)
    names = {gv.name_hint for gv, _f in after.functions_items()}
    assert names == {gv.name_hint for gv, _f in expected.functions_items()}, names
    tvm.ir.assert_structural_equal(tvm.IRModule(dict(after.functions_items())), expected)


def _stats(manifest_dir, name):
    import json
    import os

    with open(os.path.join(manifest_dir, "manifest.json")) as f:
        manifest = json.load(f)
    return next(p["stats"] for p in manifest["passes"] if p["name"] == name)


@pytest.mark.parametrize("quant, vit", [("w4a16kv8", 0), ("w4a8kv8", 1)])
def test_build_merges_qkv_and_gate_up_with_same_results(build_tiny, quant, vit):
    merged_dir, _ = build_tiny(quant)
    plain_dir, _ = build_tiny(quant, disable=("MergeSiblingLinears",))
    stats = _stats(merged_dir, "MergeSiblingLinears")
    # tiny: 2 decoder layers x (q/k/v, gate/up) in prefill and decode; in w4a8kv8 (the ViT's
    # linear layers are w8a8 kernels) also 2 ViT layers x q/k/v in the image entries
    # (encode_image and its tiled blocks stage). o/down/lm_head read activations nothing else reads
    assert stats["groups"] == 2 * 2 * 2 + vit * 2 * 2, stats
    assert stats["calls_merged"] == 2 * 2 * 5 + vit * 2 * 2 * 3, stats
    assert stats["silu_fused"] == 2 * 2, stats  # each layer's silu(gate) * up: in the gate/up kernel
    assert "not_merged" not in stats
    assert _stats(plain_dir, "MergeSiblingLinears") == {"skipped": "disabled by --disable-pass"}

    a, b = CompiledModel(merged_dir), CompiledModel(plain_dir)
    ids = np.random.default_rng(0).integers(0, 64, size=(a.chunk,)).astype(np.int64)
    for m in (a, b):
        m.reset_cache()
    rows = a.embed_chunk(ids)
    assert np.array_equal(a.prefill_chunk(rows, 0, 7), b.prefill_chunk(rows, 0, 7))
    for step, tok in enumerate((3, 17, 42)):
        assert np.array_equal(a.decode_step(tok, 7 + step), b.decode_step(tok, 7 + step)), step
    if vit:  # the image entries' merged q/k/v, both ways the runtime calls them
        patches = np.random.default_rng(1).standard_normal((a.image_batch, 3, a.image_size, a.image_size)).astype(np.float32)
        for x, y in zip(a.encode_outputs(patches), b.encode_outputs(patches)):
            assert np.array_equal(x, y)
        assert np.array_equal(a.encode_batch_unsplit(patches), b.encode_batch_unsplit(patches))
