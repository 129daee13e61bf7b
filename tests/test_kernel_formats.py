"""The weight formats that carry GGUF bits (kernels/quant.py): packers are lossless (GGUF
Q4_0 / Q4_1 / Q8_0 dequantize bit for bit as ``gguf.quants`` does), the quantizers keep
their documented error bounds, and the scale search never loses to the plain rule."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from bluelower.lowering.kernels import quant as Q
from bluelower.lowering.kernels import (
    dequantize_int4_asym,
    dequantize_int4_asym_rows,
    dequantize_int4_groupwise,
    dequantize_int4_rows,
    dequantize_int8_groupwise,
    dequantize_int8_groupwise_rows,
    int4_layout,
    pack_int4_asym,
    pack_int4_asym_rows,
    pack_int4_groupwise,
    pack_int4_rows,
    pack_int8_groupwise,
    pack_int8_groupwise_rows,
    q4_0_as_asym,
    quantize_int4_asym,
    quantize_int4_asym_rows,
    quantize_int4_groupwise,
    quantize_int8_groupwise,
    quantize_int8_groupwise_rows,
    unpack_int4_nibbles,
)

N, K = 64, 256


def _weights(seed=0, shape=(N, K)):
    """Heavy-tailed like LLM weights (Student-t, 4 dof), rows of different magnitude."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=shape) * 0.02 * rng.uniform(0.2, 3.0, (shape[0], 1))
    return w.astype(np.float32)


def _gguf_fields(blocks: np.ndarray, kind: str, n: int, k: int):
    """Split GGUF blocks (uint8 [n, k // 32 * block bytes]) into (codes, d[, m]) as the file
    stores them: Q4 codes uint8 [n, k] (low nibbles = elements 0..15 of a block), Q8 int8."""
    nbytes = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    b = blocks.reshape(n, k // 32, nbytes)
    d = b[..., 0:2].copy().view(np.float16).reshape(n, k // 32)
    if kind == "Q8_0":
        return b[..., 2:].copy().view(np.int8).reshape(n, k), d
    qs = b[..., 4:] if kind == "Q4_1" else b[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    if kind == "Q4_1":
        return codes, d, b[..., 2:4].copy().view(np.float16).reshape(n, k // 32)
    return codes, d


def _gguf(kind: str, w: np.ndarray):
    t = getattr(GGMLQuantizationType, kind)
    blocks = quants.quantize(w, t)
    return _gguf_fields(blocks, kind, *w.shape), quants.dequantize(blocks, t)


def _bits_equal(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---------------------------------------------------------------- GGUF bits, repacked


@pytest.mark.parametrize("layout", ["k1", "k4"])
def test_gguf_q4_0_repacks_bit_exactly(layout):
    (codes, d), ref = _gguf("Q4_0", _weights(1))
    packed, scales = pack_int4_groupwise(codes, d, layout)
    assert int4_layout(packed) == layout
    assert _bits_equal(dequantize_int4_groupwise(packed, scales, 32), ref)
    assert np.array_equal(unpack_int4_nibbles(packed), codes)
    # as the asymmetric format (m = -8 d): the same float32 values; only a zero of a negative
    # d comes out +0 (d * 8 - 8 d) instead of -0 (d * 0)
    packed, scales, mins = pack_int4_asym(*q4_0_as_asym(codes, d), layout)
    asym = dequantize_int4_asym(packed, scales, mins, 32)
    assert np.array_equal(asym, ref)
    assert not ref[asym.view(np.uint32) != ref.view(np.uint32)].any()


@pytest.mark.parametrize("layout", ["k1", "k4"])
def test_gguf_q4_1_repacks_bit_exactly(layout):
    (codes, d, m), ref = _gguf("Q4_1", _weights(2))
    packed, scales, mins = pack_int4_asym(codes, d, m, layout)
    assert _bits_equal(dequantize_int4_asym(packed, scales, mins, 32), ref)
    assert np.array_equal(unpack_int4_nibbles(packed), codes)


def test_gguf_q8_0_repacks_bit_exactly():
    (codes, d), ref = _gguf("Q8_0", _weights(3))
    codes[0, :4] = [-128, 127, 0, -1]  # any int8 code is carried, not only the quantizer's range
    ref = ref.copy()
    ref[0, :4] = d[0, 0].astype(np.float32) * np.float32([-128, 127, 0, -1])
    packed, scales = pack_int8_groupwise(codes, d)
    assert _bits_equal(dequantize_int8_groupwise(packed, scales, 32), ref)


def test_gguf_row_layouts_repack_bit_exactly():
    w = _weights(4, (37, 96))  # a vocabulary needs no padding
    (c0, d0), ref0 = _gguf("Q4_0", w)
    assert _bits_equal(dequantize_int4_rows(*pack_int4_rows(c0, d0), 32), ref0)
    (c1, d1, m1), ref1 = _gguf("Q4_1", w)
    assert _bits_equal(dequantize_int4_asym_rows(*pack_int4_asym_rows(c1, d1, m1), 32), ref1)
    (c8, d8), ref8 = _gguf("Q8_0", w)
    assert _bits_equal(dequantize_int8_groupwise_rows(*pack_int8_groupwise_rows(c8, d8), 32), ref8)


def test_packers_store_the_given_values():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
    s = rng.standard_normal((N, K // 64)).astype(np.float16)
    m = rng.standard_normal((N, K // 64)).astype(np.float16)
    packed, scales, mins = pack_int4_asym(codes, s, m)
    want = (codes.astype(np.float32).reshape(N, K // 64, 64) * s.astype(np.float32)[:, :, None]
            + m.astype(np.float32)[:, :, None]).reshape(N, K)
    assert _bits_equal(dequantize_int4_asym(packed, scales, mins, 64), want)
    assert scales.shape == mins.shape == (N // 32, K // 64, 32) and scales.dtype == np.float16


def test_packers_refuse_what_would_be_rounded_or_is_malformed():
    codes = np.zeros((N, K), np.uint8)
    s16 = np.ones((N, K // 32), np.float16)
    with pytest.raises(ValueError, match="float16"):
        pack_int4_asym(codes, s16.astype(np.float32), s16)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4_groupwise(codes + 16, s16)
    with pytest.raises(ValueError, match="uint8"):
        pack_int4_groupwise(codes.astype(np.int8), s16)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int8_groupwise(np.zeros((48, K), np.int8), np.ones((48, K // 32), np.float16))
    with pytest.raises(ValueError, match="mins shape"):
        pack_int4_asym(codes, s16, s16[:, :4])
    with pytest.raises(ValueError, match="k4"):
        pack_int4_groupwise(np.zeros((N, 36), np.uint8), np.ones((N, 6), np.float16), "k4")  # group size 6
    with pytest.raises(ValueError, match="8188"):
        q4_0_as_asym(codes, np.full((N, K // 32), 10000, np.float16))


# ---------------------------------------------------------------- the quantizers


@pytest.mark.parametrize("group_size", [32, 64])
def test_asym_quantizer_error_bound(group_size):
    w = _weights(6)
    w[1, :group_size] = 3.0  # a constant group: s = 0, w' = m
    w[2, :group_size] = 0.0
    w[3, :group_size] = np.linspace(1000.0, 1000.01, group_size)  # a narrow range far from 0
    packed, scales, mins = quantize_int4_asym(w, group_size)
    wd = dequantize_int4_asym(packed, scales, mins, group_size)
    g = K // group_size
    s = Q.unblocked(scales).astype(np.float32)
    m = Q.unblocked(mins).astype(np.float32)
    lo = w.reshape(N, g, group_size).min(axis=2)
    bound = np.maximum(s / 2, np.abs(lo - m))[:, :, None] + np.abs(wd.reshape(N, g, group_size)) * 2.0 ** -24
    err = np.abs(w - wd).reshape(N, g, group_size)
    assert (err <= bound * (1 + 1e-6)).all()
    assert s[1, 0] == 0 and (wd[1, :group_size] == 3.0).all() and (wd[2, :group_size] == 0).all()
    # the same rule in the row layout
    pr, sr, mr = quantize_int4_asym_rows(w, group_size)
    assert _bits_equal(dequantize_int4_asym_rows(pr, sr, mr, group_size), wd)


@pytest.mark.parametrize("magnitude", [1e-3, 1e-5, 1e-7])
def test_error_bounds_with_subnormal_float16_scales(magnitude):
    """Scales below float16's normal range: the bounds plus ``qmax * 2^-25``."""
    w = (np.random.default_rng(11).standard_normal((N, K)) * magnitude).astype(np.float32)
    g = K // 32
    packed, scales, mins = quantize_int4_asym(w, 32)
    wd = dequantize_int4_asym(packed, scales, mins, 32)
    s = Q.unblocked(scales).astype(np.float32)
    m = Q.unblocked(mins).astype(np.float32)
    lo = w.reshape(N, g, 32).min(axis=2)
    bound = (np.maximum(s / 2, np.abs(lo - m)) + 15 * 2.0 ** -25)[:, :, None] + np.abs(wd.reshape(N, g, 32)) * 2.0 ** -24
    assert (np.abs(w - wd).reshape(N, g, 32) <= bound * (1 + 1e-6)).all()
    for quantize, dequantize, qmax in ((quantize_int4_groupwise, dequantize_int4_groupwise, 7),
                                       (quantize_int8_groupwise, dequantize_int8_groupwise, 127)):
        packed, scales = quantize(w, 32)
        s = Q.unblocked(scales).astype(np.float32)
        err = np.abs(w - dequantize(packed, scales, 32)).reshape(N, g, 32)
        assert (err <= (s[:, :, None] / 2 + qmax * 2.0 ** -25) * (1 + 1e-6)).all()


def test_int8_groupwise_quantizer_error_bound():
    w = _weights(7)
    packed, scales = quantize_int8_groupwise(w, 32)
    wd = dequantize_int8_groupwise(packed, scales, 32)
    s = Q.unblocked(scales).astype(np.float32)
    assert (np.abs(w - wd).reshape(N, K // 32, 32) <= s[:, :, None] / 2 * (1 + 1e-6)).all()
    assert packed.min() >= -127
    pr, sr = quantize_int8_groupwise_rows(w, 32)
    assert _bits_equal(dequantize_int8_groupwise_rows(pr, sr, 32), wd)


def _group_sq_error(w, wd, gs):
    d = (w - wd).astype(np.float64)  # the search's own error measure: float64 sums of float32 differences
    return (d * d).reshape(w.shape[0], -1, gs).sum(axis=2)


@pytest.mark.parametrize("asym", [False, True], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("layout", ["k1", "k4"])
def test_scale_search_never_worse_per_group_and_better_overall(asym, layout):
    w = _weights(8)
    if asym:
        plain = dequantize_int4_asym(*quantize_int4_asym(w, 32, layout), 32)
        searched = dequantize_int4_asym(*quantize_int4_asym(w, 32, layout, search=True), 32)
    else:
        plain = dequantize_int4_groupwise(*quantize_int4_groupwise(w, 32, layout), 32)
        searched = dequantize_int4_groupwise(*quantize_int4_groupwise(w, 32, layout, search=True), 32)
    e0, e1 = _group_sq_error(w, plain, 32), _group_sq_error(w, searched, 32)
    assert (e1 <= e0 * (1 + 1e-12)).all()
    assert e1.sum() < 0.9 * e0.sum()  # ~0.82 / ~0.83 measured on these weights


def test_search_false_is_the_plain_rule():
    w = _weights(9)
    for a, b in zip(quantize_int4_groupwise(w, 32), quantize_int4_groupwise(w, 32, search=False)):
        assert np.array_equal(a, b)
    u, s, m = quantize_int4_asym(w, 32)
    assert ((unpack_int4_nibbles(u) >= 0) & (unpack_int4_nibbles(u) <= 15)).all()
    assert s.dtype == m.dtype == np.float16
