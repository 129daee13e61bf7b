"""The fused attention kernel's grouped schedule (GQA group per task, block-wise online softmax)
against a float64 NumPy reference: odd sizes, positions around the key block (64), a
capacity that is not a multiple of the block, INT8 and fp32 caches, and the causal bound
(rows beyond ``pos`` hold NaN: reading one would poison the output)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tvm

from bluelower.lowering.kernels import host_target
from bluelower.lowering.kernels.attention import (ATT_BLOCK, KV_SCALE_BYTES, dequantize_kv_rows, fused_attention,
                                                  quantize_kv_rows)

TARGET = host_target()
D, REP, KVH, CAP = 80, 4, 2, 2011  # head_dim 80, GQA rep 4; capacity 2011 = 31 blocks of 64 + 27
QH = KVH * REP
assert CAP % ATT_BLOCK


def _compile(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]


def _reference(q, k, v, pos, scale, rep, mask=None, causal=True):
    """q [B*QH, T, D], k/v [B, KVH, S, D] -> float64 attention."""
    rows, tq, _ = q.shape
    qh = k.shape[1] * rep
    out = np.zeros(q.shape, np.float64)
    for bh in range(rows):
        b, h = divmod(bh, qh)
        for t in range(tq):
            n = min(int(pos[t]) + 1, k.shape[2]) if causal else k.shape[2]
            s = k[b, h // rep, :n].astype(np.float64) @ q[bh, t].astype(np.float64) * scale
            if mask is not None:
                s = s + mask[t, :n]
            p = np.exp(s - s.max())
            out[bh, t] = p @ v[b, h // rep, :n].astype(np.float64) / p.sum()
    return out


def _poison_beyond(cache, limit, int8):
    """NaN in every K/V row at position > limit (INT8: the row's float32 scale bytes)."""
    c = cache.copy()
    if int8:
        nan = np.full(c[..., limit + 1:, :KV_SCALE_BYTES].shape[:-1] + (1,), np.nan, "<f4").view(np.int8)
        c[..., limit + 1:, -KV_SCALE_BYTES:] = nan.reshape(c[..., limit + 1:, -KV_SCALE_BYTES:].shape)
    else:
        c[..., limit + 1:, :] = np.nan
    return c


def _cache(rng, int8):
    kv = rng.standard_normal((2, 2, KVH, CAP, D)).astype(np.float32)  # [layers, k|v, kv_heads, capacity, D]
    if int8:
        q8 = quantize_kv_rows(kv)
        return q8, dequantize_kv_rows(q8)
    return kv, kv


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_decode_positions_and_causal_bound(int8):
    rng = np.random.default_rng(0)
    cache, deq = _cache(rng, int8)
    width = D + KV_SCALE_BYTES if int8 else D
    shape = (2, 2, KVH, CAP, width)
    f = _compile(fused_attention(rows=QH, q_heads=QH, rep=REP, q_len=1, head_dim=D, kv_len=CAP, k_shape=shape,
                                 k_prefix=(1, 0), v_shape=shape, v_prefix=(1, 1), scale=D ** -0.5, causal=True,
                                 kv_int8=int8))
    q = rng.standard_normal((QH, 1, D)).astype(np.float32)
    for p in (0, 1, 63, 64, 65, 2000, CAP - 1):
        pos = np.array([p], np.int64)
        ct = tvm.runtime.tensor(_poison_beyond(cache, p, int8))
        out = tvm.runtime.tensor(np.zeros((QH, 1, D), np.float32))
        f(tvm.runtime.tensor(q), ct, ct, tvm.runtime.tensor(pos), out)
        ref = _reference(q[None].reshape(QH, 1, D), deq[1, 0][None], deq[1, 1][None], pos, D ** -0.5, REP)
        got = out.numpy()
        assert np.isfinite(got).all(), f"pos {p}: a key beyond pos was read"
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5, err_msg=f"pos {p}")


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_prefill_chunk_matches_reference_and_rowwise(int8):
    # 6 query positions per call: TQ = 2 positions per task (R = 8 rows), straddling the 64-key
    # block edge, so one task's rows have different causal bounds within a block
    rng = np.random.default_rng(1)
    cache, deq = _cache(rng, int8)
    width = D + KV_SCALE_BYTES if int8 else D
    shape = (2, 2, KVH, CAP, width)
    Tq = 6
    kw = dict(rows=QH, q_heads=QH, rep=REP, q_len=Tq, head_dim=D, kv_len=CAP, k_shape=shape, k_prefix=(0, 0),
              v_shape=shape, v_prefix=(0, 1), scale=0.3, causal=True, kv_int8=int8)
    q = rng.standard_normal((QH, Tq, D)).astype(np.float32)
    pos = np.array([61, 62, 63, 64, 65, 66], np.int64)
    ct = tvm.runtime.tensor(_poison_beyond(cache, int(pos.max()), int8))
    outs = {}
    for sch in ("grouped", "rowwise"):
        out = tvm.runtime.tensor(np.zeros((QH, Tq, D), np.float32))
        _compile(fused_attention(schedule=sch, **kw))(tvm.runtime.tensor(q), ct, ct, tvm.runtime.tensor(pos), out)
        outs[sch] = out.numpy()
    ref = _reference(q, deq[0, 0][None], deq[0, 1][None], pos, 0.3, REP)
    np.testing.assert_allclose(outs["grouped"], ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(outs["grouped"], outs["rowwise"], rtol=2e-5, atol=2e-5)


def test_masked_batched_odd_head_dim():
    # non-causal, additive mask [T, S], batch 2 with its own K/V per batch, head_dim 12 (4-lane
    # chunks), kv_len 70 (one full block + 6), MHA (rep 1): TQ = 3 rows per task
    rng = np.random.default_rng(2)
    B, H, Tq, S, Dh = 2, 3, 3, 70, 12
    k = rng.standard_normal((B, H, S, Dh)).astype(np.float32)
    v = rng.standard_normal((B, H, S, Dh)).astype(np.float32)
    q = rng.standard_normal((B * H, Tq, Dh)).astype(np.float32)
    mask = np.where(rng.random((Tq, S)) < 0.3, -1e9, rng.standard_normal((Tq, S))).astype(np.float32)
    f = _compile(fused_attention(rows=B * H, q_heads=H, rep=1, q_len=Tq, head_dim=Dh, kv_len=S, k_shape=k.shape,
                                 k_prefix=(), v_shape=v.shape, v_prefix=(), scale=0.25, additive_mask=mask.shape))
    out = tvm.runtime.tensor(np.zeros(q.shape, np.float32))
    f(*[tvm.runtime.tensor(a) for a in (q, k, v, mask)], out)
    ref = _reference(q, k, v, None, 0.25, 1, mask=mask, causal=False)
    np.testing.assert_allclose(out.numpy(), ref, rtol=2e-5, atol=2e-5)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="schedule"):
        fused_attention(rows=4, q_heads=4, rep=1, q_len=1, head_dim=4, kv_len=8, k_shape=(4, 8, 4), k_prefix=(),
                        v_shape=(4, 8, 4), v_prefix=(), scale=1.0, schedule="fast")


# --- kv_cache_write (fp32): one capacity check per element, one assert per call ----------


def test_kv_cache_write_checks_every_element_with_one_assert():
    from bluelower.lowering.kernels.attention import kv_cache_write

    cs, us = (3, 2, 2, 16, 6), (2, 2, 5, 6)  # [L, k|v, heads, capacity, D]; 5 new rows at axis 2
    func = kv_cache_write(cache_shape=cs, prefix=(1,), axis=2, update_shape=us)
    asserts = [line for line in str(func).splitlines() if line.strip().startswith("assert")]
    # one assert at the top level of the body, not one inside the element loop (LLVM compile time)
    assert len(asserts) == 1 and len(asserts[0]) - len(asserts[0].lstrip()) == 4, asserts
    f = _compile(func)
    rng = np.random.default_rng(3)
    upd = rng.standard_normal(us).astype(np.float32)
    idx = np.broadcast_to(np.arange(9, 14, dtype=np.int64)[None, None, :, None], us).copy()
    idx[1, 1, 4, 5] = 15  # scatter semantics: an element may go elsewhere in its row's column
    cache = np.zeros(cs, np.float32)
    c = tvm.runtime.tensor(cache)
    f(c, tvm.runtime.tensor(idx), tvm.runtime.tensor(upd))
    expected = cache.copy()
    for i0, i1, i2, i3 in np.ndindex(*us):
        expected[1, i0, i1, idx[i0, i1, i2, i3], i3] = upd[i0, i1, i2, i3]
    np.testing.assert_array_equal(c.numpy(), expected)
    for where, value in (((1, 1, 4, 5), 16), ((0, 0, 0, 0), -1)):  # the last element / a negative one
        bad = idx.copy()
        bad[where] = value
        before = c.numpy()
        with pytest.raises(Exception, match="beyond its capacity"):
            f(c, tvm.runtime.tensor(bad), tvm.runtime.tensor(upd))
        np.testing.assert_array_equal(c.numpy(), before)  # nothing written


@pytest.mark.parametrize("q_len", [1, 128])
def test_grouped_compiles_for_aarch64(q_len):
    from bluelower.lowering.kernels import AARCH64_TARGET

    cs = (2, 2, 8, 256, D + KV_SCALE_BYTES)
    func = fused_attention(rows=32, q_heads=32, rep=4, q_len=q_len, head_dim=D, kv_len=256, k_shape=cs,
                           k_prefix=(1, 0), v_shape=cs, v_prefix=(1, 1), scale=D ** -0.5, causal=True, kv_int8=True)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=AARCH64_TARGET)
    assert ex is not None


@pytest.mark.parametrize("layer", [0, 1, 5])
def test_per_layer_kernels_are_stamped_from_one_parse(layer):
    """The builders parse once per shape and specialize the layer constants: the result must be
    structurally equal to a direct build of that layer's kernel (names, attrs, body)."""
    import tvm_ffi

    from bluelower.lowering.kernels.attention import kv_cache_write, kv_cache_write_int8

    cs8, cs = (6, 2, KVH, 64, 16 + KV_SCALE_BYTES), (6, 2, KVH, 64, 16)
    cases = [
        (kv_cache_write, dict(cache_shape=cs, prefix=(layer,), axis=2, update_shape=(2, KVH, 3, 16))),
        (kv_cache_write_int8, dict(cache_shape=cs8, prefix=(layer,), axis=2, update_shape=(2, KVH, 3, 16))),
    ]
    for kv_int8, shape in ((False, cs), (True, cs8)):
        for q_len in (1, 3):
            cases.append((fused_attention, dict(rows=QH, q_heads=QH, rep=REP, q_len=q_len, head_dim=16, kv_len=64,
                                                k_shape=shape, k_prefix=(layer, 0), v_shape=shape, v_prefix=(layer, 1),
                                                scale=0.25, causal=True, kv_int8=kv_int8)))
    for builder, kw in cases:
        stamped, direct = builder(**kw), builder.direct(**kw)
        assert json.loads(str(stamped.attrs["bluelower.stamp"]))["values"] == [
            v for key in ("prefix", "k_prefix", "v_prefix") for v in kw.get(key, ())]
        stamped = stamped.without_attr("bluelower.stamp")  # which generic kernel it came from
        assert tvm_ffi.structural_equal(stamped, direct), (builder.__name__, kw)
        assert stamped.attrs.get("bluelower.kernel_args") == direct.attrs.get("bluelower.kernel_args")
        assert all(isinstance(p, tvm.tirx.Var) and not str(p.name).startswith("bluelower_prefix")
                   for p in stamped.params)
