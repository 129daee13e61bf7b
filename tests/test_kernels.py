"""Tests for bluelower.lowering.kernels: quantizers, TIR linear kernels, Relax call_tir path."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from bluelower.lowering.kernels import (
    AARCH64_TARGET,
    BLOCK_ROWS,
    dequantize_int4_groupwise,
    dequantize_int8_per_channel,
    fp32_linear,
    host_target,
    int4_linear,
    int8_linear,
    packed_nbytes,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    unpack_int4_codes,
)
from bluelower.lowering.kernels.quant import int4_k1_to_k4, int4_k4_to_k1, int4_layout


def _has_vnni():
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_vnni" in flags


needs_vnni = pytest.mark.skipif(not _has_vnni(), reason="host CPU lacks AVX512-VNNI")

TARGET = host_target()


def _rng(seed=0):
    return np.random.default_rng(seed)


def _build_run(func, args, out_shape, out_dtype="float32"):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    lib = tvm.compile(mod, target=TARGET)
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype=out_dtype))
    lib["main"](*tensors, out)
    return out.numpy()


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_roundtrip_error_bound(group_size):
    rng = _rng(1)
    N, K = 64, 256
    w = rng.standard_normal((N, K)).astype(np.float32) * rng.uniform(0.01, 3, (N, 1)).astype(np.float32)
    packed, scales = quantize_int4_groupwise(w, group_size)
    assert packed.dtype == np.uint8 and packed.shape == (N // 32, K, 16)
    assert scales.dtype == np.float16 and scales.shape == (N // 32, K // group_size, 32)
    wd = dequantize_int4_groupwise(packed, scales, group_size)
    # per-element error <= s/2 (+ tiny float16 slack on s)
    s = scales.astype(np.float32).transpose(0, 2, 1).reshape(N, K // group_size)
    s_el = np.repeat(s, group_size, axis=1)
    assert np.all(np.abs(wd - w) <= s_el * 0.5 * (1 + 1e-3) + 1e-7)
    q = unpack_int4_codes(packed)
    assert q.min() >= -7 and q.max() <= 7
    # the group max maps to +-7 exactly
    gmax = np.abs(q.reshape(N, -1, group_size)).max(axis=2)
    assert np.all(gmax == 7)
    # storage is 4.5 bits/weight at group 32
    if group_size == 32:
        assert packed_nbytes(packed, scales) * 8 / (N * K) == pytest.approx(4.5)


def test_int4_layout_is_documented_one():
    N, K = 32, 32
    w = np.zeros((N, K), np.float32)
    w[:, 0] = np.arange(N) - 16  # row r gets value r-16 in column 0; row-max is |r-16|
    w[:, 1] = 16.0  # make every row's group max 16 -> scale 16/7
    packed, scales = quantize_int4_groupwise(w, 32)
    q = unpack_int4_codes(packed)
    # byte j at k holds rows j (low nibble) and j+16 (high nibble), codes stored as q+8
    assert packed[0, 0, 3] & 0xF == q[3, 0] + 8
    assert packed[0, 0, 3] >> 4 == q[19, 0] + 8
    assert np.all(q[:, 1] == 7)


def test_int4_zero_group_and_clipping():
    w = np.zeros((32, 64), np.float32)
    w[5, 40] = -3.0
    packed, scales = quantize_int4_groupwise(w, 32)
    wd = dequantize_int4_groupwise(packed, scales, 32)
    assert np.all(np.isfinite(wd))
    assert wd[5, 40] == pytest.approx(-3.0, rel=1e-3)
    assert np.count_nonzero(wd) == 1


def test_int4_k4_layout_roundtrip():
    rng = _rng(3)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    p1, s1 = quantize_int4_groupwise(w, 32)
    p4, s4 = quantize_int4_groupwise(w, 32, layout="k4")
    assert p4.shape == (2, 32, 64) and p4.dtype == np.uint8
    assert int4_layout(p1) == "k1" and int4_layout(p4) == "k4"
    np.testing.assert_array_equal(int4_k1_to_k4(p1), p4)
    np.testing.assert_array_equal(int4_k4_to_k1(p4), p1)
    np.testing.assert_array_equal(s1, s4)
    np.testing.assert_array_equal(dequantize_int4_groupwise(p4, s4), dequantize_int4_groupwise(p1, s1))
    q = unpack_int4_codes(p1)
    # byte [b, kq, 4r + j] holds rows r / r+16 at k = 4 kq + j
    assert p4[1, 5, 4 * 3 + 2] & 0xF == q[32 + 3, 4 * 5 + 2] + 8
    assert p4[1, 5, 4 * 3 + 2] >> 4 == q[32 + 19, 4 * 5 + 2] + 8
    with pytest.raises(ValueError, match="layout"):
        quantize_int4_groupwise(w, 32, layout="k2")


def test_int8_roundtrip_error_bound():
    rng = _rng(2)
    w = rng.standard_normal((96, 160)).astype(np.float32)
    packed, scales = quantize_int8_per_channel(w)
    assert packed.dtype == np.int8 and packed.shape == (3, 160, 32)
    assert scales.dtype == np.float32 and scales.shape == (96,)
    wd = dequantize_int8_per_channel(packed, scales)
    assert np.all(np.abs(wd - w) <= scales[:, None] * 0.5 * (1 + 1e-5))
    assert np.abs(packed).max() == 127


def test_quantizer_shape_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4_groupwise(np.zeros((40, 64), np.float32))
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4_groupwise(np.zeros((32, 48), np.float32), 32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_per_channel(np.zeros((32,), np.float32))


# ---------------------------------------------------------------- kernels vs numpy


SHAPES = [(1, 64, 96), (1, 96, 320), (7, 96, 128), (17, 32, 64)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_matches_numpy(M, N, K, bias):
    rng = _rng(M * 1000 + N + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    packed, scales = quantize_int4_groupwise(w, 32)
    ref = x @ dequantize_int4_groupwise(packed, scales, 32).T + (b if bias else 0)
    args = [x, packed, scales] + ([b] if bias else [])
    y = _build_run(int4_linear(M, N, K, 32, bias=bias), args, (M, N))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_int4_linear_group64_fp16_out():
    rng = _rng(7)
    M, N, K = 2, 64, 192
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    packed, scales = quantize_int4_groupwise(w, 64)
    ref = x @ dequantize_int4_groupwise(packed, scales, 64).T
    for m in (1, M):
        y = _build_run(int4_linear(m, N, K, 64, out_dtype="float16"), [x[:m], packed, scales], (m, N), "float16")
        np.testing.assert_allclose(y.astype(np.float32), ref[:m], rtol=2e-3, atol=2e-3 * np.abs(ref).max())


@pytest.mark.parametrize("M,N,K", [(3, 64, 96), (17, 32, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_k4_gemm_matches_numpy(M, N, K, bias):
    rng = _rng(M + 5 * N + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    packed, scales = quantize_int4_groupwise(w, 32, layout="k4")
    ref = x @ dequantize_int4_groupwise(packed, scales, 32).T + (b if bias else 0)
    args = [x, packed, scales] + ([b] if bias else [])
    y = _build_run(int4_linear(M, N, K, 32, bias=bias, layout="k4"), args, (M, N))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@needs_vnni
@pytest.mark.parametrize("N,K,gs", [(64, 96, 32), (96, 320, 32), (64, 256, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_k4_vnni_gemv(N, K, gs, bias):
    """The VNNI GEMV quantizes x to int8 per group: compare with that exact reference,
    and loosely with the float result."""
    rng = _rng(N + K + gs)
    x = rng.standard_normal((1, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    packed, scales = quantize_int4_groupwise(w, gs, layout="k4")
    wd = dequantize_int4_groupwise(packed, scales, gs)
    xg = x.reshape(K // gs, gs)
    sx = np.abs(xg).max(axis=1, keepdims=True) / 127
    xq = np.sign(xg) * np.floor(np.abs(xg) / sx + 0.5)  # round half away from zero
    x8 = (xq * sx).reshape(1, K).astype(np.float32)
    ref8 = x8 @ wd.T + (b if bias else 0)
    ref = x @ wd.T + (b if bias else 0)
    args = [x, packed, scales] + ([b] if bias else [])
    y = _build_run(int4_linear(1, N, K, gs, bias=bias, layout="k4"), args, (1, N))
    np.testing.assert_allclose(y, ref8, rtol=1e-4, atol=1e-4 * np.abs(ref8).max())
    assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_numpy(M, N, K, bias):
    rng = _rng(M * 7 + N + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    packed, scales = quantize_int8_per_channel(w)
    ref = x @ dequantize_int8_per_channel(packed, scales).T + (b if bias else 0)
    args = [x, packed, scales] + ([b] if bias else [])
    y = _build_run(int8_linear(M, N, K, bias=bias), args, (M, N))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_linear_matches_numpy(M, N, K, bias):
    rng = _rng(M * 13 + N + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    ref = x @ w.T + (b if bias else 0)
    args = [x, w] + ([b] if bias else [])
    y = _build_run(fp32_linear(M, N, K, bias=bias), args, (M, N))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("m_tile", [1, 3, 6])
def test_gemm_m_tiles(m_tile):
    rng = _rng(m_tile)
    M, N, K = 10, 64, 64
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    packed, scales = quantize_int4_groupwise(w, 32)
    ref = x @ dequantize_int4_groupwise(packed, scales, 32).T
    y = _build_run(int4_linear(M, N, K, 32, m_tile=m_tile), [x, packed, scales], (M, N))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_kernel_shape_errors():
    with pytest.raises(ValueError, match="N = 40"):
        int4_linear(1, 40, 64)
    with pytest.raises(ValueError, match="K = 48"):
        int4_linear(1, 64, 48, group_size=32)
    with pytest.raises(ValueError, match="K = 48"):
        int8_linear(4, 64, 48)
    with pytest.raises(ValueError, match="K = 40"):
        fp32_linear(1, 64, 40)
    with pytest.raises(ValueError, match="out_dtype"):
        fp32_linear(1, 64, 64, out_dtype="int8")
    with pytest.raises(ValueError, match="m_tile"):
        int8_linear(4, 64, 64, m_tile=0)
    with pytest.raises(ValueError, match="m_tile"):
        int4_linear(4, 64, 64, m_tile=8)
    with pytest.raises(ValueError, match="layout"):
        int4_linear(1, 64, 64, layout="k8")


def test_primfuncs_have_no_global_symbol():
    for f in (int4_linear(1, 32, 32), int8_linear(2, 32, 32), fp32_linear(1, 32, 32, bias=True)):
        assert f.attrs is None or "global_symbol" not in f.attrs
    assert len(fp32_linear(1, 32, 32, bias=True).params) == 4
    assert len(fp32_linear(1, 32, 32).params) == 3


# ---------------------------------------------------------------- Relax integration


@pytest.mark.parametrize("M", [1, 4])
def test_call_tir_in_relax(M):
    N, K = 64, 96
    rng = _rng(99)
    x_np = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b_np = rng.standard_normal(N).astype(np.float32)
    packed_np, scales_np = quantize_int4_groupwise(w, 32)
    w8_np, s8_np = quantize_int8_per_channel(w)

    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((M, K), "float32"))
    pk = relax.Var("packed", R.Tensor(packed_np.shape, "uint8"))
    sc = relax.Var("scales", R.Tensor(scales_np.shape, "float16"))
    w8 = relax.Var("w8", R.Tensor(w8_np.shape, "int8"))
    s8 = relax.Var("s8", R.Tensor(s8_np.shape, "float32"))
    bias = relax.Var("bias", R.Tensor((N,), "float32"))
    with bb.function("main", [x, pk, sc, w8, s8, bias]):
        gv4 = bb.add_func(int4_linear(M, N, K, 32, bias=True), f"int4_linear_{M}x{N}x{K}")
        gv8 = bb.add_func(int8_linear(M, N, K), f"int8_linear_{M}x{N}x{K}")
        with bb.dataflow():
            y4 = bb.emit(relax.call_tir(gv4, (x, pk, sc, bias), R.Tensor((M, N), "float32")))
            y8 = bb.emit(relax.call_tir(gv8, (x, w8, s8), R.Tensor((M, N), "float32")))
            out = bb.emit_output(relax.op.add(y4, y8))
        bb.emit_func_output(out)
    mod = bb.get()
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    res = vm["main"](*[tvm.runtime.tensor(a) for a in (x_np, packed_np, scales_np, w8_np, s8_np, b_np)])
    ref = (
        x_np @ dequantize_int4_groupwise(packed_np, scales_np, 32).T
        + b_np
        + x_np @ dequantize_int8_per_channel(w8_np, s8_np).T
    )
    np.testing.assert_allclose(res.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ---------------------------------------------------------------- phone target


@pytest.mark.parametrize("M", [1, 8])
def test_compiles_for_aarch64_cortex_x4(M):
    target = tvm.target.Target(AARCH64_TARGET)
    funcs = [int4_linear(M, 64, 128, 32, bias=True), int8_linear(M, 64, 128), fp32_linear(M, 64, 128)]
    if M > 1:  # the k4 GEMM is portable; the k4 GEMV uses x86 VNNI
        funcs.append(int4_linear(M, 64, 128, 32, layout="k4"))
    for f in funcs:
        mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
        ex = tvm.compile(mod, target=target)
        assert ex is not None


def test_block_rows_constant():
    assert BLOCK_ROWS == 32
