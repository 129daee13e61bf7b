"""Hand-scheduled TIR kernels for linear layers on CPUs (x86 AVX2/AVX-512, aarch64 NEON).

Every builder returns a ``tvm.tirx.PrimFunc`` *without* a global symbol (a private
function) in destination-passing style: inputs first, the output buffer last. Add it to a
Relax module with ``gv = bb.add_func(func, "int4_linear_1x2560x2560")`` and call it with
``relax.call_tir(gv, (x, packed, scales[, mins][, bias]), R.Tensor((M, N), out_dtype))`` (in
TVM 0.27 the third argument is positional ``out_ty``; there is no ``out_sinfo=`` keyword). To build it alone, give it a symbol:
``tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target)``.

All kernels compute ``y[M, N] = x[M, K] @ W^T (+ bias[N])`` with ``x`` float32 and
accumulate in float32; ``out_dtype`` may be ``"float32"`` or ``"float16"``.

Weight layouts are the ones produced by :mod:`bluelower.lowering.kernels.quant`:

* INT4: ``packed`` uint8 ``[N//32, K, 16]`` (layout ``k1``) or ``[N//32, K//4, 64]``
  (layout ``k4``) + ``scales`` float16 ``[N//32, K//gs, 32]``; asymmetric
  (``int4_linear(asym=True)``, GGUF Q4_1's rule ``w = s * u + m``) + ``mins`` float16
  ``[N//32, K//gs, 32]``.
* INT8: ``packed`` int8 ``[N//32, K, 32]`` + ``scales`` float32 ``[N]`` (per channel) or
  float16 ``[N//32, K//gs, 32]`` (``int8_linear(group_size=gs)``, GGUF Q8_0's rule).
* FP32: ``W`` float32 ``[N, K]`` (PyTorch layout, never transposed in memory).

Schedules (see docs/kernels.md for the measurements):

* ``M == 1`` (decode GEMV), INT4/INT8: ``parallel`` over 32-row blocks; for each ``k``
  one contiguous load of the block's codes (16 B INT4, 32 B INT8), unpack with
  AND/shift, int->float convert, FMA with broadcast ``x[k]`` into 32 float lanes
  (vectorized over output rows, so no horizontal reduction), with a software prefetch
  ``PREFETCH_BYTES`` ahead in the block's stream. INT4 sums ``x * u`` per
  group with the unsigned code ``u = q + 8`` and applies ``s * (acc - 8 * sum(x_group))``
  once per group, so the inner loop is convert + FMA only; the asymmetric format applies
  ``s * acc + m * sum(x_group)``, group-wise INT8 ``s * acc``.
* ``M == 1`` INT4 layout ``k4`` (x86 AVX512-VNNI only): ``x`` quantized to int8 per
  group in the prologue; per 4 k-steps one 64-byte load, AND/shift and two ``vpdpbusd``
  into 2 x 16 int32 lanes; int32 -> float once per group (asymmetric: plus
  ``m * sum(x_group)`` on the float ``x``).
* ``M == 1`` FP32: vectorized along K (16 lanes) for 4 rows at a time, horizontal
  reduction at the end; weights read row-contiguously.
* ``M > 1`` (prefill GEMM), INT4/INT8: ``parallel`` over 32-row blocks of W; per K chunk
  (a group; 32 wide for per-channel INT8) the block's weights are dequantized once into a
  chunk x 32 float tile in L1 and reused by all M rows through an ``m_tile x 32``
  register tile, so each weight is read from memory once per call, not once per row.
* ``M > 1`` FP32: ``x`` is copied to a K-major ``xT`` once; ``parallel`` over 32-row
  blocks of W with an ``8 (rows of W) x 16 (rows of x)`` register tile, W broadcast along
  its rows (never transposed).

Divisibility: ``N % 32 == 0`` for every kernel; INT4 and group-wise INT8
``K % group_size == 0`` and ``group_size % 4 == 0``; per-channel INT8 and FP32
``K % 32 == 0``; ``1 <= m_tile <= 7``. Violations raise ``ValueError``. Any ``M >= 1``.
"""

from __future__ import annotations

import functools

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .host import host_target  # noqa: F401 (re-exported: kernels.host_target)
from .quant import BLOCK_ROWS

__all__ = [
    "int4_linear",
    "int8_linear",
    "fp32_linear",
    "host_target",
    "AARCH64_TARGET",
    "DEFAULT_M_TILE",
    "PREFETCH_BYTES",
]

AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-x4"}
"""The phone target the kernels must compile for (Cortex-X4: NEON/SVE2, dotprod, i8mm, fp16)."""

DEFAULT_M_TILE = 4
"""Rows of ``x`` per register tile in the GEMM kernels (``m_tile * 32`` float accumulators)."""

_R = BLOCK_ROWS  # 32 output rows per block
_H = BLOCK_ROWS // 2  # 16 bytes per k for INT4
_KC = 32  # K chunk of the GEMM kernels (INT8 / FP32)


PREFETCH_BYTES = 2048
"""Software-prefetch distance of the GEMV kernels along a block's weight stream.

Measured on the 2-core x86 machine (docs/kernels.md): without it the INT4 GEMV reads
cold weights at ~14 GB/s, with 1-4 KB ahead at ~18-19 GB/s (the unpack work per byte
otherwise keeps too few cache misses in flight). Prefetching past the end of a buffer is
harmless (``llvm.prefetch`` never faults).
"""

_PF_INT8 = PREFETCH_BYTES // _R  # in k-steps (32 bytes per k) for the per-channel INT8 GEMV
_PF_K4 = PREFETCH_BYTES // 64  # in k-quads (64 bytes per 4 k) for the INT4 "k4" layout


def prefetch(addr):
    """``llvm.prefetch(addr, read, locality=3, data)``; lowers to PREFETCHT0 / PRFM PLDL1KEEP."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", addr, 0, 3, 1)


def check_linear_args(M: int, N: int, K: int, out_dtype: str, k_multiple: int, what: str) -> None:
    for name, v in (("M", M), ("N", N), ("K", K)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{what}: {name} must be a positive int, got {v!r}")
    if N % _R != 0:
        raise ValueError(f"{what}: N = {N} must be a multiple of {_R}")
    if K % k_multiple != 0:
        raise ValueError(f"{what}: K = {K} must be a multiple of {k_multiple}")
    if out_dtype not in ("float32", "float16"):
        raise ValueError(f"{what}: out_dtype must be 'float32' or 'float16', got {out_dtype!r}")


def _check_m_tile(m_tile: int) -> None:
    # The register tile (m_tile x 32 float32) must stay below TVM's 1024-byte stack-alloca
    # limit: a "global"-scope allocation that small becomes an LLVM alloca that SROA turns
    # into registers; anything larger (or any "local"-scope buffer, in TVM 0.27) becomes a
    # TVMBackendAllocWorkspace call, and the tile is then stored to memory every k-step.
    if not isinstance(m_tile, int) or not 1 <= m_tile <= 7:
        raise ValueError(f"m_tile must be an int in [1, 7], got {m_tile!r}")


def finish_kernel(func: tirx.PrimFunc, name: str, *, bias: bool, mins: bool = False) -> tirx.PrimFunc:
    """Drop the optional parameters a variant does not use (kernels are written with all of
    them: ``bias``, the asymmetric INT4 ``mn``) and tag the function."""
    unused = {p for p, used in (("bias", bias), ("mn", mins)) if not used}
    params = [p for p in func.params if getattr(p, "name", "") not in unused]
    if len(params) != len(func.params):
        func = tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)
    return func.with_attr("bluelower.kernel", name)


def _nibble(byte, high: bool):
    """The unsigned INT4 code ``u`` in a packed byte: the low nibble holds rows 0..15 of the
    block, the high nibble rows 16..31."""
    return T.shift_right(byte, T.uint8(4)) if high else T.bitwise_and(byte, T.uint8(15))


def _dequant_int4(scale, byte, high: bool, mn=None):
    """float32 weight of one nibble, as every kernel computes it: ``s * (u - 8)``, or with the
    group's min ``mn`` (asymmetric) ``s * u + m``."""
    u = T.Cast("float32", _nibble(byte, high))
    if mn is None:
        return T.Cast("float32", scale) * (u - T.float32(8))
    return T.Cast("float32", scale) * u + T.Cast("float32", mn)


def _group_value(buf, b, g, r):
    """``buf[b, g, r]``, or None without the buffer (a macro's optional per-group input)."""
    return None if buf is None else buf[b, g, r]


def _epilogue(value, n, bias, has_bias: bool, scales=None):
    """Output element ``n`` before the cast: ``value (* scales[n]) (+ bias[n])``."""
    if scales is not None:
        value = value * scales[n]
    return value + bias[n] if has_bias else value


# --------------------------------------------------------------------------------------
# INT4 group-wise (symmetric and asymmetric)
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # pure in its arguments; TVMScript parsing costs ~0.1-1 s a kernel
def int4_linear(
    M: int,
    N: int,
    K: int,
    group_size: int = 32,
    out_dtype: str = "float32",
    bias: bool = False,
    m_tile: int = DEFAULT_M_TILE,
    layout: str = "k1",
    asym: bool = False,
) -> tirx.PrimFunc:
    """``y[M, N] = x[M, K] @ dequant(W)^T (+ bias)`` with INT4 group-wise weights.

    Parameters (in call order): ``x`` float32 ``[M, K]``, ``packed`` uint8
    (``layout="k1"``: ``[N//32, K, 16]``; ``"k4"``: ``[N//32, K//4, 64]``, see
    :func:`~bluelower.lowering.kernels.quant.quantize_int4_groupwise`), ``scales``
    float16 ``[N//32, K//group_size, 32]``, with ``asym`` ``mins`` float16
    ``[N//32, K//group_size, 32]``, optional ``bias`` float32 ``[N]``, output
    ``y`` ``out_dtype`` ``[M, N]``. Dequantization happens in registers inside the
    reduction loop. ``M == 1`` selects the GEMV schedule, ``M > 1`` the tiled GEMM.
    Symmetric ``w = s * (u - 8)``; ``asym``: ``w = s * u + m``
    (:func:`~bluelower.lowering.kernels.quant.quantize_int4_asym`, GGUF Q4_1).

    ``layout="k1"`` kernels are portable (x86, aarch64). With ``layout="k4"`` the GEMV
    (``M == 1``) quantizes ``x`` to int8 per group (``sx = max|x_g| / 127``, round half
    away from zero) and uses AVX512-VNNI ``vpdpbusd``: about 1.7x the float GEMV's
    per-core throughput, with the extra error of 8-bit activations (like llama.cpp's
    q8_0 activations); it needs an x86 target with ``avx512vnni``. (Asymmetric: the min
    term ``m * sum(x_g)`` uses the float ``x``.) The ``k4`` GEMM (``M > 1``) is the float
    GEMM reading the ``k4`` layout, so one weight copy serves prefill and decode.
    """
    check_linear_args(M, N, K, out_dtype, group_size if group_size > 0 else 1, "int4_linear")
    if group_size <= 0 or group_size % 4 != 0:
        raise ValueError(f"int4_linear: group_size must be a positive multiple of 4, got {group_size}")
    if layout not in ("k1", "k4"):
        raise ValueError(f"int4_linear: layout must be 'k1' or 'k4', got {layout!r}")
    _check_m_tile(m_tile)
    if M == 1 and layout == "k1":
        f = _groupwise_gemv(N, K, group_size, out_dtype, bias, "int4_asym" if asym else "int4")
    elif M == 1:
        f = _int4_gemv_vnni(N, K, group_size, out_dtype, bias, asym)
    else:
        NB, G = N // _R, K // group_size
        wshape = (NB, K // 4, 4 * _H) if layout == "k4" else (NB, K, _H)
        dequant = _dequant_int4_k4 if layout == "k4" else _dequant_int4_k1
        f = _blocked_gemm(M, N, K, group_size, out_dtype, bias, m_tile, (wshape, "uint8"), ((NB, G, _R), "float16"),
                          dequant, per_row_scales=False, asym=asym)
    name = f"int4_linear_{M}x{N}x{K}_g{group_size}_{layout}" + ("_asym" if asym else "")
    return finish_kernel(f, name, bias=bias, mins=asym)


def _groupwise_gemv(N, K, gs, out_dtype, has_bias, fmt):
    """The decode GEMV of the group-wise formats read along K (``fmt``: ``"int4"``,
    ``"int4_asym"`` in layout k1, or ``"int8"``): per block and group, ``x * code`` summed
    into 32 float lanes (``accg``), then folded into the accumulators once per group:
    ``s * (accg - 8 * sum(x_g))`` (INT4, the zero point of the unsigned codes),
    ``s * accg + m * sum(x_g)`` (asymmetric) or ``s * accg`` (INT8)."""
    NB = N // _R
    G = K // gs
    int4, asym = fmt != "int8", fmt == "int4_asym"
    wshape, wdtype = ((NB, K, _H), "uint8") if int4 else ((NB, K, _R), "int8")
    step = _H if int4 else _R  # bytes of a block per k
    per_line = 64 // step  # k-steps per 64-byte line: one prefetch each
    ahead = PREFETCH_BYTES // step  # the prefetch distance in k-steps

    def group_term(s_, accg_, mn_, xs_):
        if asym:
            return T.Cast("float32", s_) * accg_ + T.Cast("float32", mn_) * xs_
        return T.Cast("float32", s_) * (accg_ - xs_) if int4 else T.Cast("float32", s_) * accg_

    @T.prim_func(private=True)
    def f(
        x: T.Buffer((1, K), "float32"),
        w: T.Buffer(wshape, wdtype),
        s: T.Buffer((NB, G, _R), "float16"),
        mn: T.Buffer((NB, G, _R), "float16"),
        bias: T.Buffer((N,), "float32"),
        y: T.Buffer((1, N), out_dtype),
    ):
        T.func_attr({"tir.noalias": True})
        if int4:
            # sum of x over each group (symmetric: times 8, the zero point of the unsigned codes)
            xs = T.alloc_buffer((G,), "float32")
            for g in range(G):
                xs[g] = T.float32(0)
                for k in range(gs):
                    xs[g] = xs[g] + x[0, g * gs + k]
                if not asym:
                    xs[g] = xs[g] * T.float32(8)
        for b in T.parallel(NB):
            acc = T.alloc_buffer((_R,), "float32", scope="global")
            accg = T.alloc_buffer((_R,), "float32", scope="global")
            for r in T.vectorized(_R):
                acc[r] = T.float32(0)
            for g in range(G):
                for r in T.vectorized(_R):
                    accg[r] = T.float32(0)
                for k in T.unroll(gs):
                    if k % per_line == 0:
                        T.evaluate(prefetch(T.address_of(w[b, g * gs + k + ahead, 0])))
                    if int4:
                        for r in T.vectorized(_H):
                            accg[r] = accg[r] + x[0, g * gs + k] * T.Cast("float32", _nibble(w[b, g * gs + k, r], False))
                        for r in T.vectorized(_H):
                            accg[_H + r] = accg[_H + r] + x[0, g * gs + k] * T.Cast(
                                "float32", _nibble(w[b, g * gs + k, r], True))
                    else:
                        for r in T.vectorized(_R):
                            accg[r] = accg[r] + x[0, g * gs + k] * T.Cast("float32", w[b, g * gs + k, r])
                for r in T.vectorized(_R):
                    acc[r] = acc[r] + group_term(s[b, g, r], accg[r], mn[b, g, r], xs[g] if int4 else None)
            for r in T.vectorized(_R):
                y[0, b * _R + r] = T.Cast(out_dtype, _epilogue(acc[r], b * _R + r, bias, has_bias))

    return f


def vpdpbusd(acc, a_u8x64, b_i32):
    """``acc[i] += sum_j a[4i+j] (u8) * b[j] (s8)`` for 16 int32 lanes; ``b`` broadcast.

    LLVM >= 21 declares the operands as ``<64 x i8>`` (TVM's bundled LLVM is 22)."""
    return T.call_llvm_pure_intrin(
        "int32x16",
        "llvm.x86.avx512.vpdpbusd.512",
        acc,
        a_u8x64,
        T.reinterpret("int8x64", T.broadcast(b_i32, 16)),
    )


def _int4_gemv_vnni(N, K, gs, out_dtype, has_bias, asym):
    NB = N // _R
    G = K // gs
    QG = gs // 4
    KQ = K // 4

    def group_term(s_, sx_, dot, mn_, xs_):
        if asym:
            return T.Cast("float32", s_) * sx_ * T.Cast("float32", dot) + T.Cast("float32", mn_) * xs_
        return T.Cast("float32", s_) * sx_ * (T.Cast("float32", dot) - xs_)

    @T.prim_func(private=True)
    def f(
        x: T.Buffer((1, K), "float32"),
        w: T.Buffer((NB, KQ, 4 * _H), "uint8"),
        s: T.Buffer((NB, G, _R), "float16"),
        mn: T.Buffer((NB, G, _R), "float16"),
        bias: T.Buffer((N,), "float32"),
        y: T.Buffer((1, N), out_dtype),
    ):
        T.func_attr({"tir.noalias": True})
        # x -> int8 per group (scale sx), plus per group 8 * sum(xq) (symmetric: the zero point
        # of u = q + 8, in units of sx) or sum(x) (asymmetric: what the min multiplies)
        xq = T.alloc_buffer((K,), "int8")
        sx = T.alloc_buffer((G,), "float32")
        xs = T.alloc_buffer((G,), "float32")
        for g in range(G):
            sx[g] = T.float32(0)
            for k in range(gs):
                sx[g] = T.max(sx[g], T.abs(x[0, g * gs + k]))
            sx[g] = sx[g] / T.float32(127)
            xs[g] = T.float32(0)
            for k in range(gs):
                xq[g * gs + k] = T.Cast("int8", T.round(x[0, g * gs + k] / T.max(sx[g], T.float32(1e-30))))
                xs[g] = xs[g] + (x[0, g * gs + k] if asym else T.Cast("float32", xq[g * gs + k]))
            if not asym:
                xs[g] = xs[g] * T.float32(8)
        for b in T.parallel(NB):
            acc = T.alloc_buffer((_R,), "float32", scope="global")
            lo = T.alloc_buffer((_H,), "int32", scope="global")
            hi = T.alloc_buffer((_H,), "int32", scope="global")
            for r in T.vectorized(_R):
                acc[r] = T.float32(0)
            for g in range(G):
                for r in T.vectorized(_H):
                    lo[r] = 0
                    hi[r] = 0
                for q in T.unroll(QG):
                    if q % 4 == 0:  # 4 k-quads = 256 bytes = 4 lines; prefetch one line per quad
                        T.evaluate(prefetch(T.address_of(w[b, g * QG + q + _PF_K4, 0])))
                        T.evaluate(prefetch(T.address_of(w[b, g * QG + q + _PF_K4 + 1, 0])))
                        T.evaluate(prefetch(T.address_of(w[b, g * QG + q + _PF_K4 + 2, 0])))
                        T.evaluate(prefetch(T.address_of(w[b, g * QG + q + _PF_K4 + 3, 0])))
                    lo[T.ramp(0, 1, _H)] = vpdpbusd(
                        lo[T.ramp(0, 1, _H)],
                        T.bitwise_and(w[b, g * QG + q, T.ramp(0, 1, 64)], T.broadcast(T.uint8(15), 64)),
                        T.reinterpret("int32", xq[T.ramp(g * gs + q * 4, 1, 4)]),
                    )
                    hi[T.ramp(0, 1, _H)] = vpdpbusd(
                        hi[T.ramp(0, 1, _H)],
                        T.shift_right(w[b, g * QG + q, T.ramp(0, 1, 64)], T.broadcast(T.uint8(4), 64)),
                        T.reinterpret("int32", xq[T.ramp(g * gs + q * 4, 1, 4)]),
                    )
                for r in T.vectorized(_H):
                    acc[r] = acc[r] + group_term(s[b, g, r], sx[g], lo[r], mn[b, g, r], xs[g])
                for r in T.vectorized(_H):
                    acc[_H + r] = acc[_H + r] + group_term(s[b, g, _H + r], sx[g], hi[r], mn[b, g, _H + r], xs[g])
            for r in T.vectorized(_R):
                y[0, b * _R + r] = T.Cast(out_dtype, _epilogue(acc[r], b * _R + r, bias, has_bias))

    return f


# --- the blocked GEMM (M > 1) and the dequantization of one K chunk per weight format ---------
#
# Every dequant macro takes (wd, w, s, mn, b, g, gs): the float tile, the weight, scales, mins
# (None but for the asymmetric INT4 format), the block, the chunk and its width.


@T.macro
def _dequant_int4_k1(wd, w, s, mn, b, g, gs):
    for k in range(gs):
        for r in T.vectorized(_H):
            wd[k, r] = _dequant_int4(s[b, g, r], w[b, g * gs + k, r], False, _group_value(mn, b, g, r))
        for r in T.vectorized(_H):
            wd[k, _H + r] = _dequant_int4(s[b, g, _H + r], w[b, g * gs + k, r], True, _group_value(mn, b, g, _H + r))


@T.macro
def _dequant_int4_k4(wd, w, s, mn, b, g, gs):
    for q in range(gs // 4):
        for j in T.unroll(4):
            for r in T.vectorized(_H):
                wd[q * 4 + j, r] = _dequant_int4(s[b, g, r], w[b, g * (gs // 4) + q, r * 4 + j], False,
                                                 _group_value(mn, b, g, r))
            for r in T.vectorized(_H):
                wd[q * 4 + j, _H + r] = _dequant_int4(s[b, g, _H + r], w[b, g * (gs // 4) + q, r * 4 + j], True,
                                                      _group_value(mn, b, g, _H + r))


@T.macro
def _dequant_int8(wd, w, s, mn, b, g, gs):  # per-channel scales: applied once, in the epilogue
    for k in range(gs):
        for r in T.vectorized(_R):
            wd[k, r] = T.Cast("float32", w[b, g * gs + k, r])


@T.macro
def _dequant_int8_groupwise(wd, w, s, mn, b, g, gs):
    for k in range(gs):
        for r in T.vectorized(_R):
            wd[k, r] = T.Cast("float32", s[b, g, r]) * T.Cast("float32", w[b, g * gs + k, r])


def _blocked_gemm(M, N, K, KC, out_dtype, has_bias, MT, w_spec, s_spec, dequant, per_row_scales, asym=False):
    """The prefill GEMM of the quantized formats: ``parallel`` over 32-row blocks of W; per K
    chunk of ``KC`` columns ``dequant(wd, w, s, mn, b, chunk, KC)`` (a ``T.macro``) fills the
    float tile ``wd[KC, 32]`` once and every row of ``x`` reuses it through an ``MT x 32``
    register tile. ``w_spec`` / ``s_spec``: (shape, dtype) of the weight and scale parameters;
    with ``per_row_scales`` the scales are float32 ``[N]``, applied to the accumulators at the
    end; ``asym``: the ``mn`` parameter (float16, the scales' shape) is the groups' mins."""
    NB = N // _R
    MO = M // MT
    MREM = M - MO * MT
    (wshape, wdtype), (sshape, sdtype) = w_spec, s_spec

    @T.prim_func(private=True)
    def f(
        x: T.Buffer((M, K), "float32"),
        w: T.Buffer(wshape, wdtype),
        s: T.Buffer(sshape, sdtype),
        mn: T.Buffer(sshape, "float16"),
        bias: T.Buffer((N,), "float32"),
        y: T.Buffer((M, N), out_dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for b in T.parallel(NB):
            acc = T.decl_buffer((M, _R), "float32")
            wd = T.decl_buffer((KC, _R), "float32", scope="local")
            tile = T.alloc_buffer((MT, _R), "float32", scope="global")
            for m in range(M):
                for r in T.vectorized(_R):
                    acc[m, r] = T.float32(0)
            for g in range(K // KC):
                # dequantize this block's chunk once (L1-resident 32 x KC tile)
                dequant(wd, w, s, mn if asym else None, b, g, KC)
                for mo in range(MO):
                    for mi in T.unroll(MT):
                        for r in T.vectorized(_R):
                            tile[mi, r] = T.float32(0)
                    for k in range(KC):
                        for mi in T.unroll(MT):
                            for r in T.vectorized(_R):
                                tile[mi, r] = tile[mi, r] + x[mo * MT + mi, g * KC + k] * wd[k, r]
                    for mi in T.unroll(MT):
                        for r in T.vectorized(_R):
                            acc[mo * MT + mi, r] = acc[mo * MT + mi, r] + tile[mi, r]
                for mr in range(MREM):
                    for r in T.vectorized(_R):
                        tile[0, r] = T.float32(0)
                    for k in range(KC):
                        for r in T.vectorized(_R):
                            tile[0, r] = tile[0, r] + x[MO * MT + mr, g * KC + k] * wd[k, r]
                    for r in T.vectorized(_R):
                        acc[MO * MT + mr, r] = acc[MO * MT + mr, r] + tile[0, r]
            for m in range(M):
                for r in T.vectorized(_R):
                    y[m, b * _R + r] = T.Cast(out_dtype, _epilogue(acc[m, r], b * _R + r, bias, has_bias,
                                                                   s if per_row_scales else None))

    return f


# --------------------------------------------------------------------------------------
# INT8 per-channel and group-wise
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # pure in its arguments; TVMScript parsing costs ~0.1-1 s a kernel
def int8_linear(
    M: int,
    N: int,
    K: int,
    out_dtype: str = "float32",
    bias: bool = False,
    m_tile: int = DEFAULT_M_TILE,
    group_size: int | None = None,
) -> tirx.PrimFunc:
    """``y[M, N] = x[M, K] @ dequant(W)^T (+ bias)`` with INT8 weights.

    Parameters (in call order): ``x`` float32 ``[M, K]``, ``packed`` int8
    ``[N//32, K, 32]``, ``scales``, optional ``bias`` float32 ``[N]``, output ``y``
    ``out_dtype`` ``[M, N]``. ``group_size=None``: per-channel, ``scales`` float32 ``[N]``,
    ``K % 32 == 0``. ``group_size`` (a positive multiple of 4 dividing K; GGUF Q8_0: 32):
    group-wise, ``scales`` float16 ``[N//32, K//group_size, 32]``
    (:func:`~bluelower.lowering.kernels.quant.quantize_int8_groupwise`). ``N % 32 == 0``.
    """
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or group_size % 4):
        raise ValueError(f"int8_linear: group_size must be None or a positive multiple of 4, got {group_size!r}")
    check_linear_args(M, N, K, out_dtype, _KC if group_size is None else group_size, "int8_linear")
    _check_m_tile(m_tile)
    NB = N // _R
    if group_size is None and M == 1:
        f = _int8_gemv(N, K, out_dtype, bias)
    elif group_size is None:
        f = _blocked_gemm(M, N, K, _KC, out_dtype, bias, m_tile, ((NB, K, _R), "int8"), ((N,), "float32"),
                          _dequant_int8, per_row_scales=True)
    elif M == 1:
        f = _groupwise_gemv(N, K, group_size, out_dtype, bias, "int8")
    else:
        f = _blocked_gemm(M, N, K, group_size, out_dtype, bias, m_tile, ((NB, K, _R), "int8"),
                          ((NB, K // group_size, _R), "float16"), _dequant_int8_groupwise, per_row_scales=False)
    return finish_kernel(f, f"int8_linear_{M}x{N}x{K}" + ("" if group_size is None else f"_g{group_size}"), bias=bias)



def _int8_gemv(N, K, out_dtype, has_bias):
    NB = N // _R
    KO = K // _KC

    @T.prim_func(private=True)
    def f(
        x: T.Buffer((1, K), "float32"),
        w: T.Buffer((NB, K, _R), "int8"),
        s: T.Buffer((N,), "float32"),
        bias: T.Buffer((N,), "float32"),
        y: T.Buffer((1, N), out_dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for b in T.parallel(NB):
            acc = T.alloc_buffer((_R,), "float32", scope="global")
            for r in T.vectorized(_R):
                acc[r] = T.float32(0)
            for ko in range(KO):
                for ki in T.unroll(_KC):
                    if ki % 2 == 0:  # one 64-byte line holds 2 k-steps of a block
                        T.evaluate(prefetch(T.address_of(w[b, ko * _KC + ki + _PF_INT8, 0])))
                    for r in T.vectorized(_R):
                        acc[r] = acc[r] + x[0, ko * _KC + ki] * T.Cast("float32", w[b, ko * _KC + ki, r])
            for r in T.vectorized(_R):
                y[0, b * _R + r] = T.Cast(out_dtype, _epilogue(acc[r], b * _R + r, bias, has_bias, s))

    return f


# --------------------------------------------------------------------------------------
# FP32, weights [N, K]
# --------------------------------------------------------------------------------------

_FP32_GEMV_ROWS = 4
_FP32_GEMV_LANES = 16


@functools.lru_cache(maxsize=None)  # pure in its arguments; TVMScript parsing costs ~0.1-1 s a kernel
def fp32_linear(
    M: int,
    N: int,
    K: int,
    out_dtype: str = "float32",
    bias: bool = False,
) -> tirx.PrimFunc:
    """``y[M, N] = x[M, K] @ W[N, K]^T (+ bias)`` with float32 weights in PyTorch layout.

    Parameters (in call order): ``x`` float32 ``[M, K]``, ``W`` float32 ``[N, K]``,
    optional ``bias`` float32 ``[N]``, output ``y`` ``out_dtype`` ``[M, N]``.
    No transposed copy of ``W`` is materialized. Requires ``N % 32 == 0`` and
    ``K % 32 == 0``.
    """
    check_linear_args(M, N, K, out_dtype, _KC, "fp32_linear")
    if M == 1:
        f = _fp32_gemv(N, K, out_dtype, bias)
    else:
        f = _fp32_gemm(M, N, K, out_dtype, bias)
    return finish_kernel(f, f"fp32_linear_{M}x{N}x{K}", bias=bias)


def _fp32_gemv(N, K, out_dtype, has_bias):
    RB = _FP32_GEMV_ROWS
    L = _FP32_GEMV_LANES
    NB = N // RB
    KO = K // L

    @T.prim_func(private=True)
    def f(
        x: T.Buffer((1, K), "float32"),
        w: T.Buffer((N, K), "float32"),
        bias: T.Buffer((N,), "float32"),
        y: T.Buffer((1, N), out_dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for nb in T.parallel(NB):
            acc = T.alloc_buffer((RB, L), "float32", scope="global")
            tot = T.alloc_buffer((RB,), "float32", scope="global")
            for i in T.unroll(RB):
                for l in T.vectorized(L):
                    acc[i, l] = T.float32(0)
            for ko in range(KO):
                for i in T.unroll(RB):
                    for l in T.vectorized(L):
                        acc[i, l] = acc[i, l] + x[0, ko * L + l] * w[nb * RB + i, ko * L + l]
            for i in T.unroll(RB):
                tot[i] = T.float32(0)
                for l in T.unroll(L):
                    tot[i] = tot[i] + acc[i, l]
                y[0, nb * RB + i] = T.Cast(out_dtype, _epilogue(tot[i], nb * RB + i, bias, has_bias))

    return f


_FP32_GEMM_ROWS = 8  # rows of W per register tile
_FP32_GEMM_MLANES = 16  # rows of x per register tile (vector lanes)


def _fp32_gemm(M, N, K, out_dtype, has_bias):
    """Roles swapped: vectorize over M, broadcast W.

    ``x`` is first copied (in parallel) to ``xT[M/16, K, 16]`` (zero-padded rows), so each
    register tile is ``8 rows of W x 16 rows of x``: per k one 16-lane load of ``xT`` and 8
    broadcast-FMAs with ``W[n, k]`` read along its row. W is never transposed; the copy of
    x costs ``M * K`` moves, small next to the ``M * N * K`` FMAs.
    """
    NT = _FP32_GEMM_ROWS
    ML = _FP32_GEMM_MLANES
    MB = (M + ML - 1) // ML
    NS = _R // NT

    @T.prim_func(private=True)
    def f(
        x: T.Buffer((M, K), "float32"),
        w: T.Buffer((N, K), "float32"),
        bias: T.Buffer((N,), "float32"),
        y: T.Buffer((M, N), out_dtype),
    ):
        T.func_attr({"tir.noalias": True})
        xT = T.alloc_buffer((MB, K, ML), "float32")
        for mo in T.parallel(MB):
            for k in range(K):
                for l in range(ML):
                    if mo * ML + l < M:
                        xT[mo, k, l] = x[mo * ML + l, k]
                    else:
                        xT[mo, k, l] = T.float32(0)
        for b in T.parallel(N // _R):
            acc = T.alloc_buffer((NT, ML), "float32", scope="global")
            for mo in range(MB):
                for ns in range(NS):
                    for ni in T.unroll(NT):
                        for l in T.vectorized(ML):
                            acc[ni, l] = T.float32(0)
                    for k in range(K):
                        for ni in T.unroll(NT):
                            for l in T.vectorized(ML):
                                acc[ni, l] = acc[ni, l] + w[b * _R + ns * NT + ni, k] * xT[mo, k, l]
                    for ni in T.unroll(NT):
                        for l in range(ML):
                            if mo * ML + l < M:
                                y[mo * ML + l, b * _R + ns * NT + ni] = T.Cast(
                                    out_dtype, _epilogue(acc[ni, l], b * _R + ns * NT + ni, bias, has_bias))

    return f
