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


def _run(func, args, dev):
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
        _run(f, [tvm.runtime.tensor(a, dev) for a in args] + [y], dev)
        alone.append(y.numpy())
    outs = [tvm.runtime.tensor(np.zeros(a.shape, "float32"), dev) for a in alone]
    _run(merged, [tvm.runtime.tensor(a, dev) for args in inputs for a in args] + outs, dev)
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
    _run(fused, [tvm.runtime.tensor(a, dev) for a in args_g + args_u] + outs, dev)
    g, u, h = (o.numpy() for o in outs)
    assert np.abs(h).max() > 0 and np.array_equal(h, _silu_times(g, u))


def test_kernel_that_is_not_block_parallel_is_refused():
    @T.prim_func(private=True)
    def serial(x: T.Buffer((4,), "float32"), y: T.Buffer((4,), "float32")):
        for i in range(4):
            y[i] = x[i]

    why = merge_block_parallel([serial.with_attr("bluelower.kernel", "copy"), int4_linear(1, 32, 32, 32)], "m")
    assert why == "copy: its body does not end in one parallel loop"


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
