"""TIR kernels for attention and the in-place KV-cache write.

Both builders return a private ``tvm.tirx.PrimFunc`` (no global symbol); the passes add
them to the module (``FuseAttention``: ``R.call_tir``; ``PlanKVCache``:
``R.call_tir_inplace``).

``fused_attention``: ``out[bh, t] = softmax(q[bh, t] . K^T * scale (+ mask)) . V`` for
every query row, in one pass over the keys (online softmax: running max, running sum,
rescaled accumulator), so no ``[heads, T, S]`` score tensor exists. K and V are read
straight from their source tensors (e.g. the whole KV cache) through constant leading
indices (``k_prefix``/``v_prefix``: layer, k-or-v), with the GQA head mapping
``kv_head = (bh % q_heads) // rep`` instead of a materialized repeat. With ``causal`` the
kernel takes ``pos [T]`` (int64, the absolute position of each query row) and reads only
keys ``0 .. pos[t]`` (the loop bound comes from ``pos``, not the capacity).

``kv_cache_write``: ``cache[prefix, ..., index[j], ...] = update[j]`` (a scatter along
``axis`` of the slice ``cache[prefix]``), written in place; every index is checked against
the capacity first (a run-time error, never an out-of-bounds write).
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.script import tirx as T

__all__ = ["fused_attention", "kv_cache_write"]

_NEG_BIG = -3.4028234663852886e38  # finite "-inf" start for the running max: no inf - inf


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def fused_attention(
    *,
    rows: int,
    q_heads: int,
    rep: int,
    q_len: int,
    head_dim: int,
    kv_len: int,
    k_shape: tuple,
    k_prefix: tuple,
    v_shape: tuple,
    v_prefix: tuple,
    scale: float,
    causal: bool = False,
    additive_mask: tuple | None = None,
    dtype: str = "float32",
) -> tirx.PrimFunc:
    """The fused attention kernel.

    Parameters (call order): ``q [rows, q_len, head_dim]`` (``rows = batch * q_heads``),
    ``k`` ``k_shape``, ``v`` ``v_shape``, then ``pos [q_len]`` int64 when ``causal``, then
    ``mask`` (shape ``additive_mask``, broadcast to ``[q_len, kv_len]``) when given, and
    the output ``[rows, q_len, head_dim]``. ``k_shape = k_prefix-dims + [batch?] + [kv_heads,
    kv_len, head_dim]`` (a batch dim of 1 is broadcast).
    """
    D, Tq, S, BH = head_dim, q_len, kv_len, rows
    k_batch = len(k_shape) - len(k_prefix) - 3
    v_batch = len(v_shape) - len(v_prefix) - 3
    if k_batch not in (0, 1) or v_batch not in (0, 1):
        raise ValueError(f"fused_attention: unsupported K/V layouts {k_shape} / {v_shape}")
    scale = float(scale)
    dt = dtype
    ks, vs = tuple(int(x) for x in k_shape), tuple(int(x) for x in v_shape)

    def src_index(prefix, nbatch, shape, bh, s, d):
        b = bh // q_heads
        kvh = (bh % q_heads) // rep
        batch = ()
        if nbatch == 1:
            batch = (b,) if int(shape[len(prefix)]) > 1 else (0,)
        return tuple(prefix) + batch + (kvh, s, d)

    def k_at(bh, s, d):
        return src_index(k_prefix, k_batch, k_shape, bh, s, d)

    def v_at(bh, s, d):
        return src_index(v_prefix, v_batch, v_shape, bh, s, d)

    mask_shape = tuple(additive_mask) if additive_mask is not None else (1,)
    mask_rank = len(mask_shape)

    def mask_at(t, s):
        # right-aligned broadcast of the mask to [q_len, kv_len]
        idx = [0] * mask_rank
        if mask_rank >= 1 and mask_shape[-1] != 1:
            idx[-1] = s
        if mask_rank >= 2 and mask_shape[-2] != 1:
            idx[-2] = t
        return tuple(idx)

    has_mask = additive_mask is not None

    def n_keys(pos, t):
        # causal: keys 0 .. pos[t] only (clamped to the buffer), else all of them
        return T.min(T.Cast("int32", pos[t]) + 1, S) if causal else S

    def scaled_score(dot, mask, t, s):
        x = dot * T.float32(scale)
        return x + T.Cast("float32", mask[mask_at(t, s)]) if has_mask else x

    @T.prim_func(private=True)
    def attention(
        q: T.Buffer((BH, Tq, D), dt),
        k: T.Buffer(ks, dt),
        v: T.Buffer(vs, dt),
        pos: T.Buffer((Tq,), "int64"),
        mask: T.Buffer(mask_shape, dt),
        out: T.Buffer((BH, Tq, D), dt),
    ):
        T.func_attr({"tir.noalias": True})
        for row in T.parallel(BH * Tq):
            acc = T.alloc_buffer((D,), "float32", scope="global")
            st = T.alloc_buffer((3,), "float32", scope="global")  # running max, running sum, dot
            bh = row // Tq
            t = row % Tq
            for d in range(D):
                acc[d] = T.float32(0)
            st[0] = T.float32(_NEG_BIG)
            st[1] = T.float32(0)
            for s in range(n_keys(pos, t)):
                st[2] = T.float32(0)
                for d in range(D):
                    st[2] = st[2] + T.Cast("float32", q[bh, t, d]) * T.Cast("float32", k[k_at(bh, s, d)])
                score = scaled_score(st[2], mask, t, s)
                m_new = T.max(st[0], score)
                corr = T.exp(st[0] - m_new)
                p = T.exp(score - m_new)
                st[1] = st[1] * corr + p
                for d in range(D):
                    acc[d] = acc[d] * corr + p * T.Cast("float32", v[v_at(bh, s, d)])
                st[0] = m_new
            for d in range(D):
                out[bh, t, d] = T.Cast(dt, acc[d] / st[1])

    params = [p for p in attention.params]
    drop = set()
    if not causal:
        drop.add(3)
    if not has_mask:
        drop.add(4)
    if drop:
        keep = [p for i, p in enumerate(params) if i not in drop]
        attention = tirx.PrimFunc(keep, attention.body, attention.ret_type, attention.attrs)
    kind = "causal" if causal else ("masked" if has_mask else "full")
    # opaque (8): keep the kernel whole, FuseOps must not merge neighbours into it
    return attention.with_attr("op_pattern", 8).with_attr("bluelower.kernel", f"attention_{kind}_{BH}x{Tq}x{S}x{D}")


def kv_cache_write(*, cache_shape: tuple, prefix: tuple, axis: int, update_shape: tuple, dtype: str = "float32",
                   index_dtype: str = "int64") -> tirx.PrimFunc:
    """In-place ``cache[prefix][... index[j] (at axis) ...] = update[j]``.

    Parameters (call order): ``cache`` (written in place: call with
    ``R.call_tir_inplace(..., inplace_indices=[0])``), ``index`` and ``update`` of shape
    ``update_shape``. Every index must lie in ``[0, cache_shape[len(prefix) + axis])``;
    otherwise the call fails with a run-time error before anything is written.
    """
    cap = int(cache_shape[len(prefix) + axis])
    n = _prod(update_shape)
    rank = len(update_shape)
    cs, us = tuple(int(x) for x in cache_shape), tuple(int(x) for x in update_shape)
    strides = [_prod(update_shape[i + 1:]) for i in range(rank)]

    def unflat(j):
        return tuple((j // strides[i]) % int(update_shape[i]) for i in range(rank))

    @T.prim_func(private=True)
    def write(
        cache: T.Buffer(cs, dtype),
        index_: T.Buffer(us, index_dtype),
        update: T.Buffer(us, dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for j in range(n):
            assert 0 <= index_[unflat(j)] and index_[unflat(j)] < T.int64(cap), (
                "KV cache write beyond its capacity: a position is >= kv_capacity"
            )
        for j in range(n):
            cache[tuple(prefix) + _with_axis(unflat(j), axis, index_[unflat(j)])] = update[unflat(j)]

    # opaque (8): FuseOps must not merge a producer into the in-place write
    return write.with_attr("op_pattern", 8).with_attr("bluelower.kernel", f"kv_cache_write_{'x'.join(str(int(s)) for s in update_shape)}")


def _with_axis(idx: tuple, axis: int, value) -> tuple:
    out = list(idx)
    out[axis] = value
    return tuple(out)
