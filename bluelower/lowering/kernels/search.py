"""The INT4 scale search (``search=True`` on :mod:`.quant`'s INT4 quantizers) as a compiled
TIR kernel, and the numpy reference it equals bit for bit.

The search tries, per group of ``gs`` weights, the candidate ranges of
:data:`.quant.SEARCH_SHRINK` and keeps the one with the least squared error (the rule is
in :mod:`.quant`'s docstring). In numpy it made weight conversion the slowest stage of a
compile (0.3 s per million weights, ~13 minutes for the 3B decoder on 2 cores); the kernel
does the same arithmetic in registers, 16 groups per vector, one pass over each group per
candidate, in parallel over blocks of groups.

**The same bits on every machine.** A build must not depend on the machine that compiled
it, and TVM's LLVM backend fuses a multiply feeding an add into an FMA where the CPU has
one (measured: 985 of 4096 ``a*b + c`` differ from numpy's unfused result with
``mcpu=skylake-avx512``, none on the baseline target). So every product whose result is
added is exact in its type, and an FMA rounds it the same as the unfused pair:

* the reconstruction ``u * s + m``: ``u`` an integer code (|u| <= 15, 4 bits) times a
  float16-rounded scale (11 significant bits) is exact in float32;
* the squared error ``err + d * d``: accumulated in float64, where the square of a float32
  ``d`` is exact (48 bits);
* the shrunk range ``lo = mn + a * span``, ``hi = mx - b * span``: in float64 (a float32
  times a float32 is exact), rounded once to float32.

The remaining operations (subtract, divide, min/max, ``nearbyint``, the float16
round trip) are correctly rounded IEEE operations in both, and the error sums run in the
same order (element 0 first). :func:`search_asym_reference` / :func:`search_sym_reference`
are these rules in numpy; tests/test_quant_search.py checks the kernel equals them bit for
bit, including ties, zero groups and float16 subnormal scales.

Candidates (``CANDIDATES``): asymmetric, the plain range ``(a, b) = (0, 0)`` first, then
for each shrink ``c = 1 - f``: from the top ``(0, c)``, from the bottom ``(c, 0)``, both
ends ``(c/2, c/2)``; symmetric, ``s = f16(amax / qmax)`` first, then ``f16(amax *
float32(f / qmax))``. Ties keep the earlier candidate, so the plain rule wins them.

Small inputs (fewer than :data:`KERNEL_MIN_GROUPS` groups) use the reference (same bits;
no kernel build for a tiny model's weights).
"""

from __future__ import annotations

import functools
import threading

import numpy as np

SEARCH_SHRINK = tuple(1.0 - 0.025 * i for i in range(17))
"""Range shrink factors the INT4 scale search tries per group (1.0 first: the plain rule)."""

LANES = 16
"""Groups per vector in the kernel (float32 lanes of one AVX-512 register; 4 NEON registers)."""

KERNEL_MIN_GROUPS = 1 << 12
"""Below this many groups the numpy reference runs (the kernel's build costs ~1 s once)."""

_BLOCK_GROUPS = 1 << 16  # groups per kernel call: a transposed copy of ~8 MB for gs 32


def _asym_coefficients() -> np.ndarray:
    rows = [(0.0, 0.0)]
    for f in SEARCH_SHRINK[1:]:
        c = np.float32(1.0 - f)
        h = np.float32(c / np.float32(2.0))
        rows += [(0.0, c), (c, 0.0), (h, h)]
    return np.asarray(rows, dtype=np.float32)


CANDIDATES_ASYM = _asym_coefficients()
"""``[candidates, 2]`` float32 ``(a, b)``: the range ``[mn + a * span, mx - b * span]``."""


def sym_factors(qmax: int) -> np.ndarray:
    """The symmetric candidates' factors: ``s_0 = f16(amax / qmax)``; ``s_j = f16(amax *
    factor_j)`` for ``j >= 1`` (``factor_0`` is unused)."""
    return np.asarray([0.0] + [f / qmax for f in SEARCH_SHRINK[1:]], dtype=np.float32)


def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _inverse(s):
    return np.divide(np.float32(1.0), s, out=np.zeros_like(s), where=s != 0)


# ------------------------------------------------------------------ the reference (numpy)


def search_asym_reference(wg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The asymmetric search on float32 groups ``wg[G, gs]``: the chosen float16-rounded
    ``(scales, mins)`` as float32 ``[G]`` (module docstring)."""
    wg = np.ascontiguousarray(wg, dtype=np.float32)
    mn, mx = wg.min(axis=1), wg.max(axis=1)
    span = mx - mn
    mn64, mx64, span64 = mn.astype(np.float64), mx.astype(np.float64), span.astype(np.float64)
    best = bs = bm = None
    for a, b in CANDIDATES_ASYM:
        lo = (mn64 + np.float64(a) * span64).astype(np.float32)
        hi = (mx64 - np.float64(b) * span64).astype(np.float32)
        m = _f16(lo)
        s = _f16((hi - m) / np.float32(15.0))
        inv = _inverse(s)
        err = np.zeros(wg.shape[0], np.float64)
        for e in range(wg.shape[1]):
            u = np.clip(np.rint((wg[:, e] - m) * inv), np.float32(0), np.float32(15))
            d = (wg[:, e] - (u * s + m)).astype(np.float64)
            err += d * d
        if best is None:
            best, bs, bm = err, s, m
        else:
            better = err < best
            best, bs, bm = np.where(better, err, best), np.where(better, s, bs), np.where(better, m, bm)
    return bs, bm


def search_sym_reference(wg: np.ndarray, qmax: int, qmin: int) -> np.ndarray:
    """The symmetric search on float32 groups ``wg[G, gs]``: the chosen float16-rounded
    scales as float32 ``[G]`` (codes clipped to ``[qmin, qmax]``)."""
    wg = np.ascontiguousarray(wg, dtype=np.float32)
    amax = np.abs(wg).max(axis=1)
    factors = sym_factors(qmax)
    best = bs = None
    for j in range(len(SEARCH_SHRINK)):
        s = _f16(amax / np.float32(qmax)) if j == 0 else _f16(amax * factors[j])
        inv = _inverse(s)
        err = np.zeros(wg.shape[0], np.float64)
        for e in range(wg.shape[1]):
            t = np.clip(np.rint(wg[:, e] * inv), np.float32(qmin), np.float32(qmax))
            d = (wg[:, e] - t * s).astype(np.float64)
            err += d * d
        if best is None:
            best, bs = err, s
        else:
            better = err < best
            best, bs = np.where(better, err, best), np.where(better, s, bs)
    return bs


# ------------------------------------------------------------------ the kernel (TIR)


def _asym_kernel(gs: int, nc: int):
    from tvm.script import tirx as T

    L = LANES

    @T.prim_func
    def search_asym(wt_h: T.handle, coef: T.Buffer((nc, 2), "float32"), s_h: T.handle, m_h: T.handle):
        T.func_attr({"tir.noalias": True})
        nb = T.int32()
        wt = T.match_buffer(wt_h, (nb, gs, L), "float32")
        s_out = T.match_buffer(s_h, (nb, L), "float32")
        m_out = T.match_buffer(m_h, (nb, L), "float32")
        for blk in T.parallel(nb):
            mn = T.alloc_buffer((L,), "float32")
            mx = T.alloc_buffer((L,), "float32")
            cm = T.alloc_buffer((L,), "float32")
            cs = T.alloc_buffer((L,), "float32")
            ci = T.alloc_buffer((L,), "float32")
            d = T.alloc_buffer((L,), "float32")
            bs = T.alloc_buffer((L,), "float32")
            bm = T.alloc_buffer((L,), "float32")
            err = T.alloc_buffer((L,), "float64")
            best = T.alloc_buffer((L,), "float64")
            for l in T.vectorized(L):
                mn[l] = wt[blk, 0, l]
                mx[l] = wt[blk, 0, l]
            for e in range(1, gs):
                for l in T.vectorized(L):
                    mn[l] = T.min(mn[l], wt[blk, e, l])
                    mx[l] = T.max(mx[l], wt[blk, e, l])
            for j in range(nc):
                for l in T.vectorized(L):
                    cm[l] = T.Cast("float32", T.Cast("float16", T.Cast("float32", T.Cast("float64", mn[l]) + T.Cast(
                        "float64", coef[j, 0]) * T.Cast("float64", mx[l] - mn[l]))))
                    cs[l] = T.Cast("float32", T.Cast("float16", (T.Cast("float32", T.Cast("float64", mx[l]) - T.Cast(
                        "float64", coef[j, 1]) * T.Cast("float64", mx[l] - mn[l])) - cm[l]) / T.float32(15.0)))
                    ci[l] = T.if_then_else(cs[l] != T.float32(0), T.float32(1.0) / cs[l], T.float32(0))
                    err[l] = T.float64(0)
                for e in range(gs):
                    for l in T.vectorized(L):
                        d[l] = wt[blk, e, l] - (T.max(T.min(T.round((wt[blk, e, l] - cm[l]) * ci[l]), T.float32(15)),
                                                      T.float32(0)) * cs[l] + cm[l])
                        err[l] = err[l] + T.Cast("float64", d[l]) * T.Cast("float64", d[l])
                for l in T.vectorized(L):
                    bs[l] = T.Select(j == 0 or err[l] < best[l], cs[l], bs[l])
                    bm[l] = T.Select(j == 0 or err[l] < best[l], cm[l], bm[l])
                    best[l] = T.Select(j == 0 or err[l] < best[l], err[l], best[l])
            for l in T.vectorized(L):
                s_out[blk, l] = bs[l]
                m_out[blk, l] = bm[l]

    return search_asym


def _sym_kernel(gs: int, nc: int, qmax: int, qmin: int):
    from tvm.script import tirx as T

    L = LANES

    @T.prim_func
    def search_sym(wt_h: T.handle, factor: T.Buffer((nc,), "float32"), s_h: T.handle):
        T.func_attr({"tir.noalias": True})
        nb = T.int32()
        wt = T.match_buffer(wt_h, (nb, gs, L), "float32")
        s_out = T.match_buffer(s_h, (nb, L), "float32")
        for blk in T.parallel(nb):
            amax = T.alloc_buffer((L,), "float32")
            cs = T.alloc_buffer((L,), "float32")
            ci = T.alloc_buffer((L,), "float32")
            d = T.alloc_buffer((L,), "float32")
            bs = T.alloc_buffer((L,), "float32")
            err = T.alloc_buffer((L,), "float64")
            best = T.alloc_buffer((L,), "float64")
            for l in T.vectorized(L):
                amax[l] = T.abs(wt[blk, 0, l])
            for e in range(1, gs):
                for l in T.vectorized(L):
                    amax[l] = T.max(amax[l], T.abs(wt[blk, e, l]))
            for j in range(nc):
                for l in T.vectorized(L):
                    cs[l] = T.if_then_else(
                        j == 0, T.Cast("float32", T.Cast("float16", amax[l] / T.float32(qmax))),
                        T.Cast("float32", T.Cast("float16", amax[l] * factor[j])))
                    ci[l] = T.if_then_else(cs[l] != T.float32(0), T.float32(1.0) / cs[l], T.float32(0))
                    err[l] = T.float64(0)
                for e in range(gs):
                    for l in T.vectorized(L):
                        d[l] = wt[blk, e, l] - T.max(T.min(T.round(wt[blk, e, l] * ci[l]), T.float32(qmax)),
                                                     T.float32(qmin)) * cs[l]
                        err[l] = err[l] + T.Cast("float64", d[l]) * T.Cast("float64", d[l])
                for l in T.vectorized(L):
                    bs[l] = T.Select(j == 0 or err[l] < best[l], cs[l], bs[l])
                    best[l] = T.Select(j == 0 or err[l] < best[l], err[l], best[l])
            for l in T.vectorized(L):
                s_out[blk, l] = bs[l]

    return search_sym


_build_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _compiled(kind: str, gs: int, qmax: int = 0, qmin: int = 0, target: str | None = None):
    """The kernel built for this machine (``target``: a TVM target as JSON, for tests)."""
    import json

    import tvm

    from .host import host_target

    if kind == "asym":
        func = _asym_kernel(gs, len(CANDIDATES_ASYM))
    else:
        func = _sym_kernel(gs, len(SEARCH_SHRINK), qmax, qmin)
    tgt = host_target() if target is None else tvm.target.Target(json.loads(target))
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tgt)["main"]


def _kernel(kind: str, gs: int, qmax: int = 0, qmin: int = 0, target: str | None = None):
    with _build_lock:  # weights may be converted on worker threads: build each kernel once
        return _compiled(kind, gs, qmax, qmin, target)


def _run_blocks(wg: np.ndarray, run, outputs: int) -> list[np.ndarray]:
    """Call ``run(wt, *outs)`` on ``wg[G, gs]`` in blocks of at most :data:`_BLOCK_GROUPS`
    groups, each transposed to ``[blocks, gs, LANES]`` (zero groups pad the last block to
    a multiple of ``LANES``)."""
    import tvm

    g, gs = wg.shape
    res = [np.empty(g, np.float32) for _ in range(outputs)]
    for g0 in range(0, g, _BLOCK_GROUPS):
        part = wg[g0 : g0 + _BLOCK_GROUPS]
        n = part.shape[0]
        padded = -(-n // LANES) * LANES
        if padded != n:
            part = np.concatenate([part, np.zeros((padded - n, gs), np.float32)])
        nb = padded // LANES
        wt = np.ascontiguousarray(part.reshape(nb, LANES, gs).transpose(0, 2, 1))
        outs = [tvm.runtime.tensor(np.empty((nb, LANES), np.float32)) for _ in range(outputs)]
        run(tvm.runtime.tensor(wt), *outs)
        for r, o in zip(res, outs):
            r[g0 : g0 + n] = o.numpy().reshape(-1)[:n]
    return res


def search_asym(wg: np.ndarray, target: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search_asym_reference` on ``wg[G, gs]``, by the kernel for large inputs."""
    import tvm

    wg = np.ascontiguousarray(wg, dtype=np.float32)
    if wg.shape[0] < KERNEL_MIN_GROUPS and target is None:
        return search_asym_reference(wg)
    fn = _kernel("asym", wg.shape[1], target=target)
    coef = tvm.runtime.tensor(CANDIDATES_ASYM)
    s, m = _run_blocks(wg, lambda wt, so, mo: fn(wt, coef, so, mo), 2)
    return s, m


def search_sym(wg: np.ndarray, qmax: int, qmin: int, target: str | None = None) -> np.ndarray:
    """:func:`search_sym_reference` on ``wg[G, gs]``, by the kernel for large inputs."""
    import tvm

    wg = np.ascontiguousarray(wg, dtype=np.float32)
    if wg.shape[0] < KERNEL_MIN_GROUPS and target is None:
        return search_sym_reference(wg, qmax, qmin)
    fn = _kernel("sym", wg.shape[1], qmax, qmin, target)
    factor = tvm.runtime.tensor(sym_factors(qmax))
    (s,) = _run_blocks(wg, lambda wt, so: fn(wt, factor, so), 1)
    return s
