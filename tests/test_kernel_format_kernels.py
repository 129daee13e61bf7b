"""The kernels of the GGUF-carrying formats: asymmetric INT4 (``int4_linear(asym=True)``),
group-wise INT8 (``int8_linear(group_size=...)``) and their embedding gathers, against
numpy ``x @ dequant(W).T`` on the host build, and compiled for aarch64 (NEON, dotprod,
i8mm) with vector instructions in the hot loop."""

import re

import numpy as np
import pytest
import tvm

from bluelower.lowering.kernels import (
    dequantize_int4_asym,
    dequantize_int4_asym_rows,
    dequantize_int8_groupwise,
    dequantize_int8_groupwise_rows,
    embedding_gather,
    host_target,
    int4_linear,
    int8_linear,
    pack_int4_asym,
    pack_int4_groupwise,
    q4_0_as_asym,
    quantize_int4_asym,
    quantize_int4_asym_rows,
    quantize_int8_groupwise,
    quantize_int8_groupwise_rows,
)

TARGET = host_target()
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]}


def _has_vnni():
    try:
        with open("/proc/cpuinfo") as fh:
            return "avx512_vnni" in next(line for line in fh if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False


def _build(func, target=TARGET):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _run(func, args, out_shape, out_dtype="float32"):
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    _build(func)["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def _data(seed, M, N, K):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_t(4, size=(N, K)) * 0.05).astype(np.float32)
    return x, w, rng.standard_normal(N).astype(np.float32)


def _close(y, ref, rtol=1e-5):
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


# ---------------------------------------------------------------- asymmetric INT4


@pytest.mark.parametrize("M, layout", [(1, "k1"), (2, "k1"), (9, "k1"), (2, "k4"), (9, "k4")])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_asym_linear_matches_numpy(M, layout, bias):
    N, K, gs = 96, 320, 32
    x, w, b = _data(M + 10 * bias, M, N, K)
    packed, scales, mins = quantize_int4_asym(w, gs, layout)
    ref = x.astype(np.float64) @ dequantize_int4_asym(packed, scales, mins, gs).T.astype(np.float64) + (b if bias else 0)
    y = _run(int4_linear(M, N, K, gs, bias=bias, layout=layout, asym=True),
             [x, packed, scales, mins] + ([b] if bias else []), (M, N))
    _close(y, ref)


def test_int4_asym_group64_m_tile_fp16_out():
    M, N, K, gs = 7, 64, 256, 64
    x, w, _ = _data(3, M, N, K)
    packed, scales, mins = quantize_int4_asym(w, gs)
    ref = x @ dequantize_int4_asym(packed, scales, mins, gs).T
    y = _run(int4_linear(M, N, K, gs, "float16", m_tile=3, asym=True), [x, packed, scales, mins], (M, N), "float16")
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@pytest.mark.skipif(not _has_vnni(), reason="host CPU lacks AVX512-VNNI")
@pytest.mark.parametrize("gs", [32, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_asym_vnni_gemv(gs, bias):
    """x quantized to int8 per group for the codes' dot, the min term on the float x: compare
    with that exact reference, and loosely with the float result."""
    N, K = 64, 256
    x, w, b = _data(gs + bias, 1, N, K)
    packed, scales, mins = quantize_int4_asym(w, gs, "k4")
    wd = dequantize_int4_asym(packed, scales, mins, gs)
    xg = x.reshape(K // gs, gs)
    sx = np.abs(xg).max(axis=1, keepdims=True) / 127
    x8 = (np.sign(xg) * np.floor(np.abs(xg) / sx + 0.5) * sx).reshape(1, K)  # round half away from zero
    m = np.repeat(dequantize_int4_asym(packed, scales * 0, mins, gs)[:, ::gs], gs, axis=1)  # each weight's m
    ref8 = x8 @ (wd - m).T + x @ m.T + (b if bias else 0)
    ref = x @ wd.T + (b if bias else 0)
    y = _run(int4_linear(1, N, K, gs, bias=bias, layout="k4", asym=True),
             [x, packed, scales, mins] + ([b] if bias else []), (1, N))
    _close(y, ref8, rtol=1e-4)
    assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("layout", ["k1", "k4"])
def test_q4_0_through_the_asym_gemm_equals_the_symmetric_one(layout):
    """A Q4_0 weight as the symmetric and as the asymmetric format: the GEMM's dequantized
    tiles are the same float32 values, so the outputs are bit-identical."""
    M, N, K = 5, 64, 256
    x, _, _ = _data(4, M, N, K)
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
    d = (rng.standard_normal((N, K // 32)) * 0.01).astype(np.float16)
    sym = _run(int4_linear(M, N, K, 32, layout=layout), [x, *pack_int4_groupwise(codes, d, layout)], (M, N))
    asym = _run(int4_linear(M, N, K, 32, layout=layout, asym=True),
                [x, *pack_int4_asym(*q4_0_as_asym(codes, d), layout)], (M, N))
    assert np.array_equal(sym, asym)


# ---------------------------------------------------------------- group-wise INT8


@pytest.mark.parametrize("M", [1, 2, 9])
@pytest.mark.parametrize("gs", [32, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_groupwise_linear_matches_numpy(M, gs, bias):
    N, K = 96, 384
    x, w, b = _data(M + gs + bias, M, N, K)
    packed, scales = quantize_int8_groupwise(w, gs)
    ref = x.astype(np.float64) @ dequantize_int8_groupwise(packed, scales, gs).T.astype(np.float64) + (b if bias else 0)
    y = _run(int8_linear(M, N, K, bias=bias, group_size=gs), [x, packed, scales] + ([b] if bias else []), (M, N))
    _close(y, ref)


def test_argument_errors():
    with pytest.raises(ValueError, match="group_size"):
        int8_linear(1, 64, 128, group_size=30)
    with pytest.raises(ValueError, match="multiple of 64"):
        int8_linear(2, 64, 96, group_size=64)
    with pytest.raises(ValueError, match="even group size"):
        embedding_gather("int4_asym", 10, 64, 2, group_size=7)
    with pytest.raises(ValueError, match="unknown kind"):
        embedding_gather("int2", 10, 64, 2)


def test_parameters_and_names():
    f = int4_linear(2, 64, 128, 32, bias=True, asym=True)
    assert [p.name for p in f.params] == ["x", "w", "s", "mn", "bias", "y"]
    assert str(f.attrs["bluelower.kernel"]) == "int4_linear_2x64x128_g32_k1_asym"
    assert [p.name for p in int8_linear(1, 64, 128, group_size=32).params] == ["x", "w", "s", "y"]
    assert [p.name for p in embedding_gather("int4_asym", 10, 64, 2).params] == ["ids", "packed", "scales", "mins", "out"]
    assert [p.name for p in embedding_gather("int8_groupwise", 10, 64, 2).params] == ["ids", "packed", "scales", "out"]


# ---------------------------------------------------------------- embedding gathers


@pytest.mark.parametrize("width, pad", [(64, None), (63, 64)])
def test_embedding_gathers_are_bit_exact(width, pad):
    rng = np.random.default_rng(width)
    table = (rng.standard_normal((50, pad or width)) * 0.1).astype(np.float32)
    ids = np.array([3, 0, 49, 3, 17], np.int64)
    for kind, quantize, dequantize in (("int4_asym", quantize_int4_asym_rows, dequantize_int4_asym_rows),
                                       ("int8_groupwise", quantize_int8_groupwise_rows, dequantize_int8_groupwise_rows)):
        stored = quantize(table, 32)
        want = dequantize(*stored, 32)[ids, :width]
        got = _run(embedding_gather(kind, 50, width, len(ids), 32, pad), [ids, *stored], (len(ids), width))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), kind


def test_embedding_gather_checks_ids():
    table = np.ones((8, 32), np.float32)
    f = _build(embedding_gather("int8_groupwise", 8, 32, 2))["main"]
    with pytest.raises(Exception, match="out of range"):
        f(*[tvm.runtime.tensor(a) for a in (np.array([1, 8], np.int64), *quantize_int8_groupwise_rows(table, 32))],
          tvm.runtime.tensor(np.zeros((2, 32), np.float32)))


# ---------------------------------------------------------------- the phone target


def _hot_loop(asm: str) -> list:
    """The instructions of the largest loop (a label up to a branch back to it) in the assembly."""
    lines = asm.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^(\.L\w+):", l))}
    best = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s+(?:b(?:\.\w+)?|cbn?z|tbn?z)\s+(?:.*,\s*)?(\.L\w+)\s*$", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x.strip() for x in lines[labels[m.group(1)]:i + 1] if x.startswith("\t") and not x.strip().startswith(".")]
            best = max(best, body, key=len)
    return best


@pytest.mark.parametrize("name, func, unpack", [
    ("int4 asym GEMV k1", int4_linear(1, 64, 256, 32, bias=True, asym=True), r"(ushr|and)\tv\d+\.16b"),
    ("int4 asym GEMM k1", int4_linear(8, 64, 256, 32, asym=True), None),
    ("int4 asym GEMM k4", int4_linear(8, 64, 256, 32, layout="k4", asym=True), None),
    ("int8 group-wise GEMV", int8_linear(1, 64, 256, bias=True, group_size=32), r"[su]xtl2?\tv|scvtf\tv|sshll"),
    ("int8 group-wise GEMM", int8_linear(8, 64, 256, group_size=32), None),
])
def test_compiles_for_aarch64_with_vector_hot_loop(name, func, unpack):
    asm = _build(func, tvm.target.Target(AARCH64)).mod.inspect_source("asm")
    loop = _hot_loop(asm)
    fmla = [x for x in loop if re.match(r"fmla\tv\d+\.4s", x)]
    assert len(fmla) >= 8, (name, loop[:40])
    if unpack:
        assert any(re.search(unpack, x) for x in loop), (name, loop[:40])


def test_aarch64_embedding_gathers_compile():
    for kind in ("int4_asym", "int8_groupwise"):
        assert _build(embedding_gather(kind, 50, 64, 4), tvm.target.Target(AARCH64)) is not None
