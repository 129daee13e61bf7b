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
Two schedules: ``grouped`` (the default; one task per KV head's GQA group and a few query
positions, keys in blocks of ``ATT_BLOCK`` with vectorized dots, exps and V accumulation,
see :func:`_grouped_attention` and docs/kernels.md) and ``rowwise`` (the first, scalar
kernel: one task per query row; kept as a reference and for the benchmark).

``kv_cache_write``: ``cache[prefix, ..., index[j], ...] = update[j]`` (a scatter along
``axis`` of the slice ``cache[prefix]``), written in place; every index is checked against
the capacity first (a run-time error, never an out-of-bounds write).
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

__all__ = ["fused_attention", "kv_cache_write", "kv_cache_write_int8", "quantize_kv_rows", "dequantize_kv_rows",
           "KV_SCALE_BYTES"]

KV_SCALE_BYTES = 4  # INT8 cache rows: head_dim int8 codes, then the row's float32 scale (little-endian bytes)

_NEG_BIG = -3.4028234663852886e38  # finite "-inf" start for the running max: no inf - inf



# --- one parse per shape, stamped per layer ------------------------------------------------
#
# The passes ask for one kernel per layer: the layer (and k-or-v) is a constant leading index
# into the whole KV cache. The kernels differ only in those constants, and TVMScript parsing
# costs ~0.5-1.5 s a kernel (mostly ``inspect.stack()``): ~130 attention + ~130 cache-write
# kernels for the 3B decoder were ~5 min of a compile. So each builder below is parsed once
# per shape with int32 *variables* in place of the prefix (made parameters afterwards), and
# every layer's kernel is that one specialized to its constants (``PrimFunc.specialize``, a
# few ms). The result is structurally equal to a direct build (tests/test_attention_kernel.py).

_WELL_FORMED = [True]  # False only while a builder runs with variable prefixes (free vars until made params)

# Every per-layer kernel also records (attr ``bluelower.stamp``) how to rebuild the generic
# kernel it was specialized from (prefix as trailing int32 parameters): ``{"builder": name,
# "args": its keyword arguments with every prefix constant 0, "values": [prefix constants],
# "id": structural hash of the generic kernel}``. ``ShareLayerKernels``
# (passes/share_layer_kernels.py) calls the generic kernel with the constants as arguments
# instead, so the build compiles one kernel per shape, not one per layer. The stamp is all it
# needs: a module re-parsed from TVMScript in another process shares its kernels the same way.
_GENERIC_BUILDERS: dict = {}  # builder name -> its memoized generic build (filled at import)


def generic_kernel(stamp):
    """``(PrimFunc, prefix vars)`` of the generic kernel a ``bluelower.stamp`` (dict or JSON string)
    describes, rebuilt from the stamp alone (memoized per shape). None when the stamp names no
    known builder, or the rebuilt kernel is not the stamped one (other kernel code made it)."""
    if isinstance(stamp, str):
        stamp = json.loads(stamp)
    generic = _GENERIC_BUILDERS.get(stamp.get("builder"))
    if generic is None or not isinstance(stamp.get("args"), dict):
        return None
    func, pvars, stamp_id = generic(_frozen_args(stamp["args"]), len(stamp["values"]))
    return (func, pvars) if stamp_id == stamp.get("id") else None


def _pfx(prefix) -> tuple:
    return tuple(x if isinstance(x, tirx.Var) else int(x) for x in prefix)


def _pj(x):
    return str(x.name) if isinstance(x, tirx.Var) else int(x)


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _plain(v):
    """A builder argument as JSON data (ints, floats, bools, strings, None, lists)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, str)) or v is None:
        return v
    if isinstance(v, (int, np.integer, tirx.IntImm)):
        return int(v)
    if isinstance(v, (float, np.floating, tirx.FloatImm)):
        return float(v)
    raise TypeError(f"kernel builder argument {v!r} ({type(v).__name__}) cannot be recorded in a stamp")


def _frozen_args(args: dict) -> tuple:
    return tuple(sorted((k, _freeze(v)) for k, v in args.items()))


def _stamped_per_prefix(*prefix_args):
    """Decorator: memoize a keyword-only kernel builder per shape; prefixes are specialized."""

    def deco(build):
        @functools.lru_cache(maxsize=None)
        def generic(frozen: tuple, nvars: int):
            kw = dict(frozen)
            pvars = [tirx.Var(f"bluelower_prefix{i}", "int32") for i in range(nvars)]
            n = 0
            for name in prefix_args:
                if kw.get(name) is not None:
                    kw[name] = tuple(pvars[n + i] for i in range(len(kw[name])))
                    n += len(kw[name])
            _WELL_FORMED[0] = False
            try:
                func = build(**kw)
            finally:
                _WELL_FORMED[0] = True
            func = tirx.PrimFunc(list(func.params) + pvars, func.body, func.ret_type, func.attrs)
            # the id is the code's: builders called with other but equivalent arguments share it
            stamp_id = f"{tvm_ffi.structural_hash(func.without_attr('bluelower.kernel_args')) & (2**64 - 1):016x}"
            return func, pvars, stamp_id

        _GENERIC_BUILDERS[build.__name__] = generic

        @functools.wraps(build)
        def wrapper(**kw):
            values = []
            for name in prefix_args:
                if kw.get(name) is not None:
                    values.extend(int(v) for v in kw[name])
                    kw[name] = tuple(0 for _ in kw[name])
            if not values:
                return build(**kw)
            # as the stamp records them: the stamp must rebuild exactly this generic kernel
            args = {k: _plain(v) for k, v in kw.items()}
            generic_func, pvars, stamp_id = generic(_frozen_args(args), len(values))
            func = generic_func.specialize({v: tirx.IntImm("int32", x) for v, x in zip(pvars, values)})
            if "bluelower.kernel_args" in func.attrs:
                names = {str(v.name): x for v, x in zip(pvars, values)}
                args = json.loads(str(func.attrs["bluelower.kernel_args"]))
                for key in prefix_args:
                    if isinstance(args.get(key), list):
                        args[key] = [names.get(x, x) if isinstance(x, str) else x for x in args[key]]
                func = func.with_attr("bluelower.kernel_args", json.dumps(args, sort_keys=True))
            stamp = {"builder": build.__name__, "args": args, "values": values, "id": stamp_id}
            return func.with_attr("bluelower.stamp", json.dumps(stamp, sort_keys=True))

        wrapper.direct = build  # the unstamped builder (tests compare the two)
        return wrapper

    return deco


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


@_stamped_per_prefix("k_prefix", "v_prefix")
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
    kv_int8: bool = False,
    schedule: str = "grouped",
) -> tirx.PrimFunc:
    """The fused attention kernel.

    Parameters (call order): ``q [rows, q_len, head_dim]`` (``rows = batch * q_heads``),
    ``k`` ``k_shape``, ``v`` ``v_shape``, then ``pos [q_len]`` int64 when ``causal``, then
    ``mask`` (shape ``additive_mask``, broadcast to ``[q_len, kv_len]``) when given, and
    the output ``[rows, q_len, head_dim]``. ``k_shape = k_prefix-dims + [batch?] + [kv_heads,
    kv_len, head_dim]`` (a batch dim of 1 is broadcast).

    With ``kv_int8`` K and V are the INT8 cache (``int8``, last dim ``head_dim + 4``: the
    row's codes, then its float32 scale, see :func:`kv_cache_write_int8`) and are
    dequantized in registers: ``dot = (q . codes_k) * scale_k``, ``acc += p * scale_v * codes_v``.
    """
    args = dict(rows=rows, q_heads=q_heads, rep=rep, q_len=q_len, head_dim=head_dim, kv_len=kv_len,
                k_shape=[int(x) for x in k_shape], k_prefix=[_pj(x) for x in k_prefix],
                v_shape=[int(x) for x in v_shape], v_prefix=[_pj(x) for x in v_prefix], scale=float(scale),
                causal=bool(causal), additive_mask=None if additive_mask is None else [int(x) for x in additive_mask],
                dtype=dtype)
    D, Tq, S, BH = head_dim, q_len, kv_len, rows
    k_batch = len(k_shape) - len(k_prefix) - 3
    v_batch = len(v_shape) - len(v_prefix) - 3
    if k_batch not in (0, 1) or v_batch not in (0, 1):
        raise ValueError(f"fused_attention: unsupported K/V layouts {k_shape} / {v_shape}")
    scale = float(scale)
    dt = dtype
    ks, vs = tuple(int(x) for x in k_shape), tuple(int(x) for x in v_shape)
    kv_dt = "int8" if kv_int8 else dt
    if kv_int8 and (ks[-1] != D + KV_SCALE_BYTES or vs[-1] != D + KV_SCALE_BYTES):
        raise ValueError(f"fused_attention(kv_int8): K/V rows must be head_dim + {KV_SCALE_BYTES} bytes, got {ks} / {vs}")

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

    if schedule not in ("grouped", "rowwise"):
        raise ValueError(f"fused_attention: schedule must be 'grouped' or 'rowwise', got {schedule!r}")
    if schedule == "grouped":
        attention = _grouped_attention(
            BH=BH, q_heads=q_heads, rep=rep, Tq=Tq, D=D, S=S, ks=ks, vs=vs, k_prefix=_pfx(k_prefix),
            v_prefix=_pfx(v_prefix), k_batch=k_batch, v_batch=v_batch, scale=scale, causal=causal,
            mask_shape=mask_shape, mask_at=mask_at, has_mask=has_mask, dt=dt, kv_int8=kv_int8)
    else:
        # INT8 K/V: the dot and the softmax weight of a key times its row's scale (st[3])
        def key_dot(k, bh, s, dot):
            return dot * _row_scale(k, k_at, D, bh, s) if kv_int8 else dot

        def v_weight(st, p):
            return st[3] if kv_int8 else p

        @T.prim_func(private=True, check_well_formed=_WELL_FORMED[0])
        def attention(
            q: T.Buffer((BH, Tq, D), dt),
            k: T.Buffer(ks, kv_dt),
            v: T.Buffer(vs, kv_dt),
            pos: T.Buffer((Tq,), "int64"),
            mask: T.Buffer(mask_shape, dt),
            out: T.Buffer((BH, Tq, D), dt),
        ):
            T.func_attr({"tir.noalias": True})
            for row in T.parallel(BH * Tq):
                acc = T.alloc_buffer((D,), "float32", scope="global")
                st = T.alloc_buffer((4 if kv_int8 else 3,), "float32", scope="global")  # max, sum, dot(, v scale)
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
                    score = scaled_score(key_dot(k, bh, s, st[2]), mask, t, s)
                    m_new = T.max(st[0], score)
                    corr = T.exp(st[0] - m_new)
                    p = T.exp(score - m_new)
                    st[1] = st[1] * corr + p
                    if kv_int8:
                        st[3] = p * _row_scale(v, v_at, D, bh, s)
                    for d in range(D):
                        acc[d] = acc[d] * corr + v_weight(st, p) * T.Cast("float32", v[v_at(bh, s, d)])
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
    if kv_int8:
        kind += "_kv8"
    if schedule == "rowwise":
        kind += "_rowwise"
        args["schedule"] = "rowwise"
    # opaque (8): keep the kernel whole, FuseOps must not merge neighbours into it
    attention = attention.with_attr("op_pattern", 8).with_attr("bluelower.kernel", f"attention_{kind}_{BH}x{Tq}x{S}x{D}")
    return attention if kv_int8 else attention.with_attr("bluelower.kernel_args", json.dumps(args, sort_keys=True))


# --- the grouped (GQA-group-per-task, block-wise) schedule --------------------------------

ATT_BLOCK = 64  # keys per block: scores, max, exp and sum run over a block at a time
_ATT_MAX_ROWS = 8  # query rows per task (rep heads x TQ positions); R x 16 lanes x 4 B <= 512 B of registers
_EXP_LO = -87.0  # fast_exp(x) = 0 below this (expf(-87) ~ 1.6e-38, the float32 normal range ends at ~1.2e-38)
_NEG_INF = float("-inf")


def _fast_exp(x):
    """``exp(x)`` for ``x <= 0`` as plain float arithmetic (Cephes ``expf``: ``2^n * p(f)``,
    ``|f| <= ln2/2``, a degree-7 polynomial; relative error ~1e-7), so a vectorized loop stays
    vectorized (``T.exp`` lowers to ``llvm.exp``, i.e. one libm ``expf`` call per lane). Exactly
    0 for ``x < -87`` and for ``-inf``."""
    ty = str(x.ty)
    lanes = int(ty.split("x")[1]) if "x" in ty else 1

    def c(value, dtype="float32"):
        v = tirx.const(value, dtype)
        return T.Broadcast(v, lanes) if lanes > 1 else v

    sfx = f"x{lanes}" if lanes > 1 else ""
    xc = T.max(x, c(_EXP_LO))
    n = T.floor(xc * c(1.44269504088896341) + c(0.5))
    f = xc - n * c(0.693359375) + n * c(2.12194440e-4)
    p = c(1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * f + c(k)
    y = p * (f * f) + f + c(1.0)
    two_n = T.reinterpret("float32" + sfx, T.shift_left(T.Cast("int32" + sfx, n) + c(127, "int32"), c(23, "int32")))
    return T.Select(x < c(_EXP_LO), c(0.0), y * two_n)


def _tree(vals, op):
    """Reduce ``vals`` (a power-of-two count) by halving: ``v[i] op v[i + n/2]`` level by level.
    Each level is a bundle of independent ops, which LLVM's SLP vectorizer turns into vector
    ops (a float sum written as a chain would stay scalar: no fast-math reassociation)."""
    vals = list(vals)
    while len(vals) > 1:
        h = len(vals) // 2
        vals = [op(vals[i], vals[i + h]) for i in range(h)] + vals[2 * h:]
    return vals[0]


def _lanes(D: int) -> int:
    return next(L for L in (16, 8, 4, 2, 1) if D % L == 0)


def _idx(xs):
    return [tirx.IntImm("int32", int(i)) for i in xs]


def _rows_hsum(vecs, L):
    """``R`` vectors of ``L`` lanes (``R``, ``L`` powers of two, ``R <= L``) -> one ``R``-lane
    vector of their lane sums, in row order, by shuffles: pairs of vectors are folded into one
    (each row keeps half as many partial sums) until one vector is left, then the partial sums
    are halved inside it. 4 rows x 16 lanes: 8 shuffles + 5 adds instead of 4 horizontal sums
    (~15 instructions each)."""
    vecs, P, G = list(vecs), L, 1  # P partial sums per row, G rows per vector
    while len(vecs) > 1:
        h = P // 2
        lo = [g * P + i for g in range(2 * G) for i in range(h)]
        hi = [g * P + h + i for g in range(2 * G) for i in range(h)]
        vecs = [tirx.Shuffle([a, b], _idx(lo)) + tirx.Shuffle([a, b], _idx(hi)) for a, b in zip(vecs[::2], vecs[1::2])]
        P, G = h, 2 * G
    v = vecs[0]
    while P > 1:
        h = P // 2
        v = (tirx.Shuffle([v], _idx(g * P + i for g in range(G) for i in range(h)))
             + tirx.Shuffle([v], _idx(g * P + h + i for g in range(G) for i in range(h))))
        P = h
    return v


def _grouped_attention(*, BH, q_heads, rep, Tq, D, S, ks, vs, k_prefix, v_prefix, k_batch, v_batch, scale, causal,
                       mask_shape, mask_at, has_mask, dt, kv_int8):
    """One task per (batch, KV head, block of TQ query positions): its ``R = rep * TQ`` query
    rows share every K/V row read. Keys run in blocks of ``ATT_BLOCK``: (1) per key, the dots
    of all R rows (vectorized over ``head_dim`` in ``L``-lane chunks, INT8 codes converted in
    registers; the R horizontal sums folded together by :func:`_rows_hsum`), times the K row
    scale and ``scale``, stored key-major ``sc[j, r]``; (2) block max per row, rescale factor,
    ``p = exp(score - max)`` over the whole block (vector :func:`_fast_exp`), block sums;
    (3) ``acc[r, d] = acc * corr + sum_j p[j, r] * V[j, d]`` (INT8: ``p`` times the V row
    scale), ``L`` lanes of ``d`` at a time with the ``R x L`` tile in registers. With
    ``causal`` a task reads keys ``0 .. max(pos[t])`` over its TQ positions; a row's keys
    beyond its own ``pos[t]`` get score ``-inf`` (``p = 0`` exactly)."""
    L = _lanes(D)
    DC = D // L
    BS = ATT_BLOCK
    TQ = max(d for d in range(1, Tq + 1) if Tq % d == 0 and d <= max(1, _ATT_MAX_ROWS // rep))
    R = rep * TQ
    NTB = Tq // TQ
    KVH = q_heads // rep
    B = BH // q_heads
    NT = B * KVH * NTB
    W = 16 * R // math.gcd(16, R)  # lanes of the softmax loops: lcm(16, R), divides BS * R
    kv_dt = "int8" if kv_int8 else dt
    shuffle_sum = R <= L and R & (R - 1) == 0
    row_select = causal and TQ > 1  # rows of a task with different causal bounds

    def kv_idx(prefix, nbatch, shape, b, kvh, s, d):
        batch = ()
        if nbatch == 1:
            batch = (b,) if int(shape[len(prefix)]) > 1 else (0,)
        return tuple(prefix) + batch + (kvh, s, d)

    def k_idx(b, kvh, s, d):
        return kv_idx(k_prefix, k_batch, ks, b, kvh, s, d)

    def v_idx(b, kvh, s, d):
        return kv_idx(v_prefix, v_batch, vs, b, kvh, s, d)

    # (TVM 0.27 lowers a scalar bound inside the kernel, ``x = ...``, to a 4-byte workspace
    # allocation per task plus a load at every use, so the task's coordinates, the key count
    # and the block bounds are written as inline expressions of ``task`` / ``blk`` instead.)
    def tb_of(task):
        return task % NTB

    def kvh_of(task):
        return task // NTB % KVH

    def b_of(task):
        return task // (KVH * NTB)

    def q_row(task, r):
        return b_of(task) * q_heads + kvh_of(task) * rep + r % rep

    def q_t(task, r):
        return tb_of(task) * TQ + r // rep

    def row_nk(pos, t):
        return T.min(T.Cast("int32", pos[t]) + 1, S) if causal else S

    def task_nk(pos, task):
        return _tree([row_nk(pos, tb_of(task) * TQ + i) for i in range(TQ)], T.max) if causal else S

    def block_n(pos, task, blk):
        return T.min(BS, task_nk(pos, task) - blk * BS)

    def kk(task, s, d):
        return k_idx(b_of(task), kvh_of(task), s, d)

    def vv(task, s, d):
        return v_idx(b_of(task), kvh_of(task), s, d)

    def k_mult(k, task, s):
        return _row_scale(k, k_idx, D, b_of(task), kvh_of(task), s) * T.float32(scale) if kv_int8 else T.float32(scale)

    def v_scale(v, task, s):
        return _row_scale(v, v_idx, D, b_of(task), kvh_of(task), s) if kv_int8 else T.float32(1)

    def rows(base):  # the R consecutive elements from ``base``: a vector index (a scalar one when R == 1)
        return tirx.Ramp(base, 1, R) if R > 1 else base

    def bc(x):
        return T.Broadcast(x, R) if R > 1 else x

    def vload(buf, base, n):
        return tirx.BufferLoad(buf, [tirx.Ramp(base, 1, n)] if n > 1 else [base])

    def dots(part):
        return _rows_hsum([vload(part, r * L, L) for r in range(R)], L)

    @T.prim_func(private=True, check_well_formed=_WELL_FORMED[0])
    def attention(
        q: T.Buffer((BH, Tq, D), dt),
        k: T.Buffer(ks, kv_dt),
        v: T.Buffer(vs, kv_dt),
        pos: T.Buffer((Tq,), "int64"),
        mask: T.Buffer(mask_shape, dt),
        out: T.Buffer((BH, Tq, D), dt),
    ):
        T.func_attr({"tir.noalias": True})
        for task in T.parallel(NT):
            acc = T.alloc_buffer((R, D), "float32", scope="global")
            qs = T.alloc_buffer((R * D,), "float32", scope="global")  # the task's query rows, contiguous
            sc = T.alloc_buffer((BS * R,), "float32", scope="global")  # [key, row]: scores, then p (x V row scale)
            svb = T.alloc_buffer((BS,), "float32", scope="global")  # V row scales of the block
            part = T.alloc_buffer((R * L,), "float32", scope="global")  # register tile: partial dots
            vt = T.alloc_buffer((R, L), "float32", scope="global")  # register tile: V accumulation
            mx = T.alloc_buffer((R,), "float32", scope="global")  # running max
            mn = T.alloc_buffer((R,), "float32", scope="global")  # the block's new running max
            sm = T.alloc_buffer((R,), "float32", scope="global")  # running sum
            cr = T.alloc_buffer((R,), "float32", scope="global")  # rescale of the block
            lim = T.alloc_buffer((R,), "int32", scope="global")  # causal: keys 0 .. lim[r] - 1 per row
            mrep = T.alloc_buffer((W,), "float32", scope="global")  # mx[l % R]
            sw = T.alloc_buffer((W,), "float32", scope="global")  # block sums, W lanes
            for r in T.unroll(R):
                mx[r] = T.float32(_NEG_BIG)
                sm[r] = T.float32(0)
                lim[r] = row_nk(pos, q_t(task, r))
                for d in T.vectorized(D):
                    acc[r, d] = T.float32(0)
                    qs[r * D + d] = T.Cast("float32", q[q_row(task, r), q_t(task, r), d])
            for blk in range((task_nk(pos, task) + BS - 1) // BS):
                for j in range(block_n(pos, task, blk)):
                    for r in T.unroll(R):
                        for l in T.vectorized(L):
                            part[r * L + l] = qs[r * D + l] * T.Cast(
                                "float32", k[kk(task, blk * BS + j, l)])
                    for dc in T.unroll(DC - 1):
                        for r in T.unroll(R):
                            for l in T.vectorized(L):
                                part[r * L + l] = part[r * L + l] + qs[r * D + (dc + 1) * L + l] * T.Cast(
                                    "float32", k[kk(task, blk * BS + j, (dc + 1) * L + l)])
                    if shuffle_sum:
                        sc[rows(j * R)] = dots(part) * bc(k_mult(k, task, blk * BS + j))
                    else:
                        for r in T.unroll(R):
                            sc[j * R + r] = _tree([part[r * L + i] for i in range(L)], lambda a, c: a + c) * k_mult(
                                k, task, blk * BS + j)
                    if has_mask:
                        for r in T.unroll(R):
                            sc[j * R + r] = sc[j * R + r] + T.Cast("float32", mask[mask_at(q_t(task, r), blk * BS + j)])
                    if row_select:
                        sc[rows(j * R)] = T.Select(bc(blk * BS + j) < lim[rows(0)], sc[rows(j * R)], bc(T.float32(_NEG_INF)))
                    svb[j] = v_scale(v, task, blk * BS + j)
                for j in range(block_n(pos, task, blk), BS):
                    sc[rows(j * R)] = bc(T.float32(_NEG_INF))
                    svb[j] = T.float32(0)
                mn[rows(0)] = T.max(mx[rows(0)], _tree([sc[rows(j * R)] for j in range(BS)], T.max))
                cr[rows(0)] = _fast_exp(mx[rows(0)] - mn[rows(0)])
                mx[rows(0)] = mn[rows(0)]
                for l in T.unroll(W):
                    mrep[l] = mx[l % R]
                    sw[l] = T.float32(0)
                for c in range(BS * R // W):
                    for l in T.vectorized(W):
                        sc[c * W + l] = _fast_exp(sc[c * W + l] - mrep[l])
                        sw[l] = sw[l] + sc[c * W + l]
                for r in T.unroll(R):
                    sm[r] = sm[r] * cr[r] + _tree([sw[r + R * i] for i in range(W // R)], lambda a, c: a + c)
                if kv_int8:
                    for j in range(block_n(pos, task, blk)):
                        sc[rows(j * R)] = sc[rows(j * R)] * bc(svb[j])
                for dc in range(DC):
                    for r in T.unroll(R):
                        for l in T.vectorized(L):
                            vt[r, l] = T.float32(0)
                    for j in range(block_n(pos, task, blk)):
                        for r in T.unroll(R):
                            for l in T.vectorized(L):
                                vt[r, l] = vt[r, l] + sc[j * R + r] * T.Cast("float32", v[vv(task, blk * BS + j, dc * L + l)])
                    for r in T.unroll(R):
                        for l in T.vectorized(L):
                            acc[r, dc * L + l] = acc[r, dc * L + l] * cr[r] + vt[r, l]
            for r in T.unroll(R):
                for d in T.vectorized(D):
                    out[q_row(task, r), q_t(task, r), d] = T.Cast(dt, acc[r, d] / sm[r])

    return attention


@_stamped_per_prefix("prefix")
def kv_cache_write(*, cache_shape: tuple, prefix: tuple, axis: int, update_shape: tuple, dtype: str = "float32",
                   index_dtype: str = "int64") -> tirx.PrimFunc:
    """In-place ``cache[prefix][... index[j] (at axis) ...] = update[j]``.

    Parameters (call order): ``cache`` (written in place: call with
    ``R.call_tir_inplace(..., inplace_indices=[0])``), ``index`` and ``update`` of shape
    ``update_shape``. Every index must lie in ``[0, cache_shape[len(prefix) + axis])``;
    otherwise the call fails with a run-time error before anything is written.

    Every element's index is checked (scatter semantics: the indices of a row need not
    agree), but into one "any out of range" flag with a single assert after the loop: an
    assert per element (a branch to an error exit per element) took LLVM 13 s per layer
    on an idle machine, ~6 min under load, for a 128-row chunk of the 3B decoder; the flag
    loop compiles in a fraction of a second. Both loops run over rows (all axes but the
    last) and then the contiguous last axis, so only the row index is divided out.
    """
    cap = int(cache_shape[len(prefix) + axis])
    rank = len(update_shape)
    cs, us = tuple(int(x) for x in cache_shape), tuple(int(x) for x in update_shape)
    D = us[-1]
    rows = _prod(us[:-1])
    strides = [_prod(us[i + 1:-1]) for i in range(rank - 1)]

    def at(r, d):
        return tuple((r // strides[i]) % us[i] for i in range(rank - 1)) + (d,)

    @T.prim_func(private=True, check_well_formed=_WELL_FORMED[0])
    def write(
        cache: T.Buffer(cs, dtype),
        index_: T.Buffer(us, index_dtype),
        update: T.Buffer(us, dtype),
    ):
        T.func_attr({"tir.noalias": True})
        bad = T.alloc_buffer((1,), "int32", scope="global")
        bad[0] = 0
        for r in range(rows):
            for d in range(D):
                bad[0] = bad[0] | T.Cast("int32", index_[at(r, d)] < T.Cast(index_dtype, 0)
                                         or index_[at(r, d)] >= T.Cast(index_dtype, cap))
        assert bad[0] == 0, "KV cache write beyond its capacity: a position is >= kv_capacity"
        for r in range(rows):
            for d in range(D):
                cache[tuple(prefix) + _with_axis(at(r, d), axis, index_[at(r, d)])] = update[at(r, d)]

    args = dict(cache_shape=list(cs), prefix=[_pj(x) for x in prefix], axis=int(axis), update_shape=list(us),
                dtype=dtype, index_dtype=index_dtype)
    # opaque (8): FuseOps must not merge a producer into the in-place write
    return (write.with_attr("op_pattern", 8)
            .with_attr("bluelower.kernel", f"kv_cache_write_{'x'.join(str(int(s)) for s in update_shape)}")
            .with_attr("bluelower.kernel_args", json.dumps(args, sort_keys=True)))


def _with_axis(idx: tuple, axis: int, value) -> tuple:
    out = list(idx)
    out[axis] = value
    return tuple(out)


# --- the INT8 KV cache (QuantizeKVCache, --quant w4a16kv8) ---------------------------------
#
# Layout: the cache is ONE int8 buffer ``[L, 2, kv_heads, capacity, head_dim + 4]``; each
# row (layer, k|v, head, position) holds ``head_dim`` symmetric INT8 codes and then the row's
# A row whose max |x| is at most this is stored as zero codes (its scale still amax / 127):
# 127 / amax would overflow float32 below ~3.7e-37 (0 * inf = NaN, clamped to code 127).
MIN_AMAX = 1e-36

# float32 scale as 4 little-endian bytes (its IEEE-754 bit pattern). ``scale = max|x| / 127``,
# ``code = clip(round(x / scale), -127, 127)``, ``x ~= code * scale``; an all-zero row (a
# never-written one, too) has scale 0 and dequantizes to 0.


def _row_scale(buf, at, D, *row):
    """The float32 scale stored in bytes ``D .. D+3`` of the row ``at(*row, .)`` of ``buf``."""
    bits = T.uint32(0)
    for i in range(KV_SCALE_BYTES):
        byte = T.Cast("uint32", T.Cast("uint8", buf[at(*row, D + i)]))
        bits = bits | (byte << T.uint32(8 * i)) if i else byte
    return T.reinterpret("float32", bits)


def _scale_byte(scale, i):
    return T.Cast("int8", T.Cast("uint8", (T.reinterpret("uint32", scale) >> T.uint32(8 * i)) & T.uint32(255)))


@_stamped_per_prefix("prefix")
def kv_cache_write_int8(*, cache_shape: tuple, prefix: tuple, axis: int, update_shape: tuple,
                        index_dtype: str = "int64") -> tirx.PrimFunc:
    """In-place quantizing write into the INT8 cache (layout above).

    Same call as :func:`kv_cache_write` (``cache`` int8 ``[..., head_dim + 4]``, ``index``,
    ``update`` float32 ``update_shape`` whose last axis is ``head_dim``): every update row
    (all axes but the last) is quantized on its own (per token, per head) and written with
    its scale at position ``index[row, 0]`` (the importers' index is the positions broadcast
    over ``head_dim``, so a row's positions agree; only ``index[row, 0]`` is read). Checks
    first that every row's position is within the capacity. (A per-element check that a
    row's positions agree made LLVM compile time explode with the row count, ~5 min for a
    64-row prefill chunk, so it is not emitted.)
    """
    cs, us = tuple(int(x) for x in cache_shape), tuple(int(x) for x in update_shape)
    rank = len(us)
    D = us[-1]
    if axis == rank - 1 or cs[-1] != D + KV_SCALE_BYTES:
        raise ValueError(f"kv_cache_write_int8: cache {cs} / update {us} / axis {axis} is not a row write")
    cap = int(cs[len(prefix) + axis])
    rows = _prod(us[:-1])
    strides = [_prod(us[i + 1:-1]) for i in range(rank - 1)]

    def row_idx(r):
        return tuple((r // strides[i]) % us[i] for i in range(rank - 1))

    def at(r, d, pos):
        return tuple(prefix) + _with_axis(row_idx(r) + (d,), axis, pos)

    @T.prim_func(private=True, check_well_formed=_WELL_FORMED[0])
    def write(
        cache: T.Buffer(cs, "int8"),
        index_: T.Buffer(us, index_dtype),
        update: T.Buffer(us, "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        for r in range(rows):
            assert 0 <= index_[row_idx(r) + (0,)] and index_[row_idx(r) + (0,)] < T.int64(cap), (
                "KV cache write beyond its capacity: a position is >= kv_capacity"
            )
        for r in range(rows):
            amax = T.alloc_buffer((1,), "float32", scope="global")
            amax[0] = T.float32(0)
            for d in range(D):
                amax[0] = T.max(amax[0], T.fabs(update[row_idx(r) + (d,)]))
            for d in range(D):
                cache[at(r, d, index_[row_idx(r) + (0,)])] = T.Cast("int8", T.max(T.min(T.round(
                    update[row_idx(r) + (d,)] * T.if_then_else(amax[0] > T.float32(MIN_AMAX), T.float32(127) / amax[0],
                                                                T.float32(0))), T.float32(127)), T.float32(-127)))
            for i in range(KV_SCALE_BYTES):
                cache[at(r, D + i, index_[row_idx(r) + (0,)])] = _scale_byte(amax[0] / T.float32(127), i)

    return (write.with_attr("op_pattern", 8)
            .with_attr("bluelower.kernel", f"kv_cache_write_int8_{'x'.join(str(s) for s in us)}"))


def quantize_kv_rows(x: np.ndarray) -> np.ndarray:
    """NumPy reference: float32 ``[..., head_dim]`` -> INT8 rows ``[..., head_dim + 4]``."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    big = amax > np.float32(MIN_AMAX)
    inv = np.where(big, np.float32(127) / np.where(big, amax, 1), np.float32(0)).astype(np.float32)
    codes = np.clip(np.round(x * inv), -127, 127).astype(np.int8)
    scale = (amax / np.float32(127)).astype("<f4")
    return np.concatenate([codes, scale.view(np.int8).reshape(*x.shape[:-1], KV_SCALE_BYTES)], axis=-1)


def dequantize_kv_rows(q: np.ndarray) -> np.ndarray:
    """NumPy reference: INT8 rows ``[..., head_dim + 4]`` -> float32 ``[..., head_dim]``."""
    q = np.ascontiguousarray(q, np.int8)
    scale = np.ascontiguousarray(q[..., -KV_SCALE_BYTES:]).view("<f4").astype(np.float32)
    return q[..., :-KV_SCALE_BYTES].astype(np.float32) * scale
