"""Linear kernels over int8 activations: integer dot products (the ``w4a8`` / ``w8a8`` modes).

The activations of a linear layer are quantized **per token** (one row of ``x``): dynamic,
symmetric int8 with one float32 scale per row, by a small pre-pass kernel
(:func:`quantize_act_int8`, shared by the layers that read the same ``x``: q/k/v, gate/up).
The linear kernel then multiplies int8 activation codes with the weights' integer codes in
int32 accumulators and scales once per weight group:

* activation rows (:func:`quantize_act_rows` is the numpy reference, bit for bit)::

      amax = max_k |x[m, k]|;  inv = float32(127 / amax) (0 for a zero row)
      xq[m, k] = clip(round_half_even(x[m, k] * inv), -127, 127)   (int8)
      sx[m] = amax / 127                                          (float32)

  the rule of the INT8 KV cache rows (``kv_cache_write_int8``).

* the weight formats (``kernels/quant.py``) with every integer sum exact in int32, per
  group ``g`` of ``gs`` columns (per-channel INT8: the whole row)::

      D[m, n, g] = sum_{k in g} code(n, k) * xq[m, k]     X[m, g] = sum_{k in g} xq[m, k]
      int4 (u = q + 8):      acc += f32(s[n, g]) * f32(D_u - 8 X)          (= s * sum q * xq)
      int4_asym (u):         acc += f32(s[n, g]) * f32(D_u) + f32(m[n, g]) * f32(X)
      int8_group (q):        acc += f32(s[n, g]) * f32(D_q)
      int8 per channel (q):  acc  = f32(D_q) * s[n]
      y[m, n] = acc * sx[m] (+ bias[n])

  :func:`a8_linear_reference` computes the same integers with numpy (int64) and the same
  float32 operations in the same order; the kernels equal it bit for bit in the integers
  and up to the rounding of the float32 scaling (a fused multiply-add where LLVM contracts
  one), so with power-of-two scales the results are bit-identical (tests).

Weight layout ``k4`` (4 consecutive k of one output row in each 32-bit lane, rows blocked
by 32): INT4 ``uint8 [N//32, K//4, 64]`` (:func:`~.quant.int4_k1_to_k4`: byte ``4r + j``
holds rows ``r`` (low nibble) and ``r + 16`` (high nibble) at ``k = 4 kq + j``), INT8
``int8 [N//32, K//4, 128]`` (:func:`int8_k1_to_k4`: byte ``4r + j`` is row ``r`` at
``k = 4 kq + j``). One layout for every ISA, so a host and a phone build store the same
bytes.

The dot product per ISA (:data:`ISAS`, :func:`dot_isa` picks it from the target):

* ``vnni`` (x86 AVX512-VNNI): ``vpdpbusd``, unsigned weight bytes x signed activations,
  16 int32 lanes (16 rows x 4 k) per instruction; INT8 weights enter as ``q ^ 0x80``
  (``q + 128``) and the sum is corrected by ``128 X``.
* ``dotprod`` (Armv8.4 ``sdot``): signed x signed, 4 int32 lanes (4 rows x 4 k) per
  instruction on a 16-byte piece of the ``k4`` vector.
* ``i8mm`` (Armv8.6 ``smmla``): a 2 x 8 by 8 x 2 int8 matrix product per instruction (two
  rows of ``x`` x two rows of W, 8 k); the two k-quads of a row pair are interleaved with a
  32-bit zip, so the ``k4`` layout serves it too. GEMV (``M == 1``) uses ``sdot``.
* ``generic``: the same integer sums in plain TIR (LLVM vectorizes what it can).

Schedule (one helper, :func:`_a8_gemm`): ``parallel`` over 32-row blocks of W; per K chunk
(a weight group; 32 columns for per-channel INT8) and per tile of ``m_tile`` rows of ``x``
(2 for ``i8mm``: a row pair) an int32 register tile ``m_tile x 32`` accumulates the chunk's
dot products, then is scaled into a float32 accumulator ``[M, 32]``; the chunk's weights
(``gs * 16`` bytes) stay in L1 across the row tiles, so each weight is read from memory once
per call. ``M == 1`` (decode) is the same loop with one row and a software prefetch along
the block's stream.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from .linear import PREFETCH_BYTES, check_linear_args, finish_kernel, prefetch, vpdpbusd
from .attention import MIN_AMAX  # rows this small quantize to zero codes (127 / amax would overflow)
from .quant import BLOCK_ROWS, k1_to_k4_lanes, k4_to_k1_lanes

__all__ = [
    "ISAS",
    "dot_isa",
    "quantize_act_int8",
    "int4_a8_linear",
    "int8_a8_linear",
    "quantize_act_rows",
    "act_sums",
    "a8_linear_reference",
    "int8_k1_to_k4",
    "int8_k4_to_k1",
    "default_m_tile",
]

ISAS = ("generic", "vnni", "dotprod", "i8mm")
"""The integer dot-product instruction families the kernels are written for."""

_R = BLOCK_ROWS  # 32 output rows per block
_H = BLOCK_ROWS // 2
_KC8 = 32  # K chunk of the per-channel INT8 kernel (int32 sums folded into an int32 accumulator)
_FORMATS = ("int4", "int4_asym", "int8", "int8_group")


def dot_isa(target) -> str:
    """The dot-product family a TVM ``llvm`` target supports: ``i8mm`` / ``dotprod`` on
    aarch64 (from ``mattr`` / ``mcpu``), ``vnni`` on x86 with AVX512-VNNI (and AVX512-BW),
    else ``generic`` (e.g. the shipped ``host`` SoC, baseline x86-64)."""
    from tvm.target import codegen

    t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if t.kind.name != "llvm":
        return "generic"

    def has(feature: str) -> bool:
        return bool(codegen.llvm_cpu_has_features(feature, t))

    triple = str(t.attrs.get("mtriple", "") or "")
    if triple.startswith("aarch64") or triple.startswith("arm64"):
        return "i8mm" if has("i8mm") and has("dotprod") else "dotprod" if has("dotprod") else "generic"
    if not triple or triple.startswith("x86_64"):
        return "vnni" if has("avx512vnni") and has("avx512bw") else "generic"
    return "generic"


def default_m_tile(isa: str) -> int:
    """Rows of ``x`` per int32 register tile: what the ISA's register file holds
    (AVX-512: 2 zmm per row; NEON: 8 q-registers per row; ``i8mm``: one row pair)."""
    return {"vnni": 6, "dotprod": 3, "i8mm": 2, "generic": 4}[isa]


# ------------------------------------------------------------------ numpy references


def quantize_act_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference of :func:`quantize_act_int8`: float32 ``x[..., K]`` -> ``(xq int8
    [..., K], sx float32 [...])``, bit for bit."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1)
    big = amax > np.float32(MIN_AMAX)
    inv = np.where(big, np.float32(127) / np.where(big, amax, np.float32(1)), np.float32(0)).astype(np.float32)
    xq = np.clip(np.round(x * inv[..., None]), -127, 127).astype(np.int8)
    return xq, (amax / np.float32(127)).astype(np.float32)


def int8_k1_to_k4(packed: np.ndarray) -> np.ndarray:
    """Repack an INT8 weight from ``[NB, K, 32]`` to the dot-product layout ``[NB, K//4, 128]``."""
    packed = np.asarray(packed, dtype=np.int8)
    nb, k, r = packed.shape
    if r != _R or k % 4:
        raise ValueError(f"expected an INT8 weight [N//32, K, 32] with K % 4 == 0, got {packed.shape}")
    return k1_to_k4_lanes(packed)


def int8_k4_to_k1(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`int8_k1_to_k4`."""
    packed = np.asarray(packed, dtype=np.int8)
    nb, kq, lanes = packed.shape
    if lanes != 4 * _R:
        raise ValueError(f"expected an INT8 'k4' weight [N//32, K//4, 128], got {packed.shape}")
    return k4_to_k1_lanes(packed)


def _codes(fmt: str, packed: np.ndarray) -> np.ndarray:
    """Integer codes ``[N, K]`` (int64) the kernel multiplies: INT4 the unsigned ``u``,
    INT8 the signed ``q``."""
    from .quant import unblocked, unpack_int4_nibbles

    if fmt.startswith("int4"):
        return unpack_int4_nibbles(packed).astype(np.int64)
    return unblocked(int8_k4_to_k1(packed) if np.shape(packed)[-1] == 4 * _R else packed).astype(np.int64)


def a8_linear_reference(xq: np.ndarray, sx: np.ndarray, fmt: str, parts, group_size: int | None = None,
                        bias: np.ndarray | None = None) -> np.ndarray:
    """NumPy reference of the kernels' arithmetic: ``xq`` int8 ``[M, K]``, ``sx`` float32
    ``[M]``, ``parts`` the packed weight (``packed, scales[, mins]``, any layout) of format
    ``fmt`` (``int4``, ``int4_asym``, ``int8``, ``int8_group``). Integer sums in int64 (exact,
    as the kernels' int32), then the float32 scaling in the kernels' order (module docstring)."""
    from .quant import unblocked

    if fmt not in _FORMATS:
        raise ValueError(f"unknown format {fmt!r} (valid: {', '.join(_FORMATS)})")
    xq = np.asarray(xq).astype(np.int64)
    sx = np.asarray(sx, np.float32)
    c = _codes(fmt, parts[0])  # [N, K]
    m, k = xq.shape
    n = c.shape[0]
    if fmt == "int8":
        acc = (xq @ c.T).astype(np.float32) * np.asarray(parts[1], np.float32)[None, :]
    else:
        gs = int(group_size)
        g = k // gs
        s = unblocked(np.asarray(parts[1])).astype(np.float32)  # [N, G]
        mn = unblocked(np.asarray(parts[2])).astype(np.float32) if fmt == "int4_asym" else None
        acc = np.zeros((m, n), np.float32)
        for j in range(g):
            d = xq[:, j * gs:(j + 1) * gs] @ c[:, j * gs:(j + 1) * gs].T  # [M, N]
            xs = xq[:, j * gs:(j + 1) * gs].sum(axis=1)[:, None]  # [M, 1]
            if fmt == "int4":
                term = s[None, :, j] * (d - 8 * xs).astype(np.float32)
            elif fmt == "int4_asym":
                term = s[None, :, j] * d.astype(np.float32) + mn[None, :, j] * xs.astype(np.float32)
            else:
                term = s[None, :, j] * d.astype(np.float32)
            acc = (acc + term.astype(np.float32)).astype(np.float32)
    y = (acc * sx[:, None]).astype(np.float32)
    if bias is not None:
        y = (y + np.asarray(bias, np.float32)[None, :]).astype(np.float32)
    return y


# ------------------------------------------------------------------ the activation pre-pass


_QL = 16  # lanes of the pre-pass's max reduction


@functools.lru_cache(maxsize=None)
def quantize_act_int8(M: int, K: int, sum_group: int = 32) -> tirx.PrimFunc:
    """``(x float32 [M, K]) -> (xq int8 [M, K], sx float32 [M], xs int32 [M, K // sum_group])``:
    per-row dynamic int8 (module docstring; bit for bit :func:`quantize_act_rows`) and the
    sums of the codes over each group of ``sum_group`` columns (what the linear kernels'
    zero points and mins multiply; ``sum_group`` = the weights' group size, 32 for per-channel
    INT8). ``K % 16 == 0``, ``K % sum_group == 0``. Parallel over rows."""
    if K % _QL or K <= 0 or M <= 0:
        raise ValueError(f"quantize_act_int8: need M > 0 and K a positive multiple of {_QL}, got {M} x {K}")
    if sum_group <= 0 or K % sum_group:
        raise ValueError(f"quantize_act_int8: sum_group must divide K = {K}, got {sum_group}")
    KO = K // _QL
    G = K // sum_group

    # one input: the root block keeps relax.RewriteDataflowReshape's reshape analysis off it
    @T.prim_func(private=True, s_tir=True)
    def f(x: T.Buffer((M, K), "float32"), xq: T.Buffer((M, K), "int8"), sx: T.Buffer((M,), "float32"),
          xs: T.Buffer((M, G), "int32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):
            for m in T.parallel(M):
                am = T.alloc_buffer((_QL,), "float32", scope="global")
                inv = T.alloc_buffer((1,), "float32", scope="global")
                for l in T.vectorized(_QL):
                    am[l] = T.float32(0)
                for ko in range(KO):
                    for l in T.vectorized(_QL):
                        am[l] = T.max(am[l], T.abs(x[m, ko * _QL + l]))
                for l in range(1, _QL):
                    am[0] = T.max(am[0], am[l])
                inv[0] = T.if_then_else(am[0] > T.float32(MIN_AMAX), T.float32(127) / am[0], T.float32(0))
                for ko in range(KO):
                    for l in T.vectorized(_QL):
                        xq[m, ko * _QL + l] = T.Cast("int8", T.max(T.min(T.round(x[m, ko * _QL + l] * inv[0]),
                                                                         T.float32(127)), T.float32(-127)))
                sx[m] = am[0] / T.float32(127)
                for g in range(G):
                    xs[m, g] = 0
                    for k in range(sum_group):
                        xs[m, g] = xs[m, g] + T.Cast("int32", xq[m, g * sum_group + k])

    return f.with_attr("bluelower.kernel", f"quantize_act_int8_{M}x{K}_s{sum_group}")


def act_sums(xq: np.ndarray, sum_group: int = 32) -> np.ndarray:
    """NumPy reference of :func:`quantize_act_int8`'s third output: int32 ``[..., K // sum_group]``."""
    xq = np.asarray(xq)
    return xq.reshape(*xq.shape[:-1], -1, sum_group).astype(np.int32).sum(axis=-1, dtype=np.int32)


# ------------------------------------------------------------------ the linear kernels


def _check_isa(isa: str, what: str) -> None:
    if isa not in ISAS:
        raise ValueError(f"{what}: isa must be one of {', '.join(ISAS)}, got {isa!r}")


def _m_tile(m_tile, isa: str) -> int:
    mt = default_m_tile(isa) if m_tile is None else m_tile
    if isa == "i8mm" and mt != 2:
        raise ValueError(f"isa 'i8mm' computes row pairs: m_tile must be 2, got {mt!r}")
    if not isinstance(mt, int) or not 1 <= mt <= 7:  # the int32 tile stays a (< 1 KB) register alloca
        raise ValueError(f"m_tile must be an int in [1, 7], got {mt!r}")
    return mt


@functools.lru_cache(maxsize=None)
def int4_a8_linear(M: int, N: int, K: int, group_size: int = 32, asym: bool = False, isa: str = "generic",
                   out_dtype: str = "float32", bias: bool = False, m_tile: int | None = None) -> tirx.PrimFunc:
    """``y[M, N] = (sx * xq)[M, K] @ dequant(W)^T (+ bias)`` with INT4 group-wise weights in
    layout ``k4`` and int8 activation rows.

    Parameters (in call order): ``xq`` int8 ``[M, K]``, ``sx`` float32 ``[M]`` (from
    :func:`quantize_act_int8`), ``packed`` uint8 ``[N//32, K//4, 64]``, ``scales`` float16
    ``[N//32, K//group_size, 32]``, with ``asym`` ``mins`` float16 (same shape), optional
    ``bias`` float32 ``[N]``, output ``y`` ``[M, N]``. ``isa``: :data:`ISAS`.
    ``N % 32 == 0``, ``K % group_size == 0``, ``group_size % 4 == 0``."""
    check_linear_args(M, N, K, out_dtype, group_size if group_size > 0 else 1, "int4_a8_linear")
    if group_size <= 0 or group_size % 4:
        raise ValueError(f"int4_a8_linear: group_size must be a positive multiple of 4, got {group_size}")
    if isa == "i8mm" and group_size % 8:
        isa = "dotprod"  # smmla consumes 8 k at a time
    _check_isa(isa, "int4_a8_linear")
    fmt = "int4_asym" if asym else "int4"
    f = _a8_gemm(M, N, K, group_size, fmt, isa, out_dtype, bias, _m_tile(m_tile, isa if M > 1 else "dotprod"))
    name = f"int4_a8_linear_{M}x{N}x{K}_g{group_size}" + ("_asym" if asym else "") + f"_{isa}"
    return finish_kernel(f, name, bias=bias, mins=asym)


@functools.lru_cache(maxsize=None)
def int8_a8_linear(M: int, N: int, K: int, group_size: int | None = None, isa: str = "generic",
                   out_dtype: str = "float32", bias: bool = False, m_tile: int | None = None) -> tirx.PrimFunc:
    """``y[M, N] = (sx * xq)[M, K] @ dequant(W)^T (+ bias)`` with INT8 weights in layout
    ``k4`` (:func:`int8_k1_to_k4`) and int8 activation rows.

    Parameters: ``xq`` int8 ``[M, K]``, ``sx`` float32 ``[M]``, ``xs`` int32 ``[M, K // gs]``
    (:func:`quantize_act_int8` with ``sum_group`` = ``group_size``, or 32 per channel), ``packed`` int8
    ``[N//32, K//4, 128]``, ``scales`` float32 ``[N]`` (per channel, ``group_size=None``,
    ``K % 32 == 0``) or float16 ``[N//32, K//group_size, 32]`` (group-wise), optional
    ``bias``, output ``y``."""
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0 or group_size % 4):
        raise ValueError(f"int8_a8_linear: group_size must be None or a positive multiple of 4, got {group_size!r}")
    check_linear_args(M, N, K, out_dtype, _KC8 if group_size is None else group_size, "int8_a8_linear")
    if isa == "i8mm" and (group_size or _KC8) % 8:
        isa = "dotprod"
    _check_isa(isa, "int8_a8_linear")
    fmt = "int8" if group_size is None else "int8_group"
    f = _a8_gemm(M, N, K, group_size or _KC8, fmt, isa, out_dtype, bias, _m_tile(m_tile, isa if M > 1 else "dotprod"))
    name = f"int8_a8_linear_{M}x{N}x{K}" + ("" if group_size is None else f"_g{group_size}") + f"_{isa}"
    return finish_kernel(f, name, bias=bias)


# --- the dot products of one k-quad (4 columns) of a block, per ISA ---------------------------


def _sdot(acc, a_i8x16, b_i32):
    """``acc[i] += sum_j a[4i + j] * b[j]`` (signed bytes) for 4 int32 lanes; ``b`` broadcast."""
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot", acc, a_i8x16,
                                   T.reinterpret("int8x16", T.broadcast(b_i32, 4)))


def _smmla(acc, a_i8x16, b_i8x16):
    """``acc[2i + j] += sum_k a[8i + k] * b[8j + k]`` (int8 2x8 times 8x2 into 2x2 int32)."""
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.smmla", acc, a_i8x16, b_i8x16)


def _nib(v, high: bool, lanes: int):
    return T.shift_right(v, T.broadcast(T.uint8(4), lanes)) if high else T.bitwise_and(v, T.broadcast(T.uint8(15), lanes))


def _a8_gemm(M, N, K, KC, fmt, isa, out_dtype, has_bias, MT):
    """The schedule of every int8-activation linear kernel (module docstring).

    ``fmt``: ``int4`` / ``int4_asym`` (uint8 ``k4`` weights, per-group float16 scales[, mins]),
    ``int8_group`` (int8 ``k4``, per-group float16 scales) or ``int8`` (per-channel float32
    scales, chunks of ``KC`` columns summed in int32). ``MT`` rows of ``x`` per register tile."""
    NB = N // _R
    NC = K // KC  # chunks (groups)
    QC = KC // 4  # k-quads per chunk
    KQ = K // 4
    int4 = fmt.startswith("int4")
    per_channel = fmt == "int8"
    wshape, wdtype = ((NB, KQ, 4 * _H), "uint8") if int4 else ((NB, KQ, 4 * _R), "int8")
    sshape, sdtype = ((N,), "float32") if per_channel else ((NB, NC, _R), "float16")
    # the zero point of the unsigned operand the ISA multiplies: INT4 u = q + 8; INT8 on vnni q ^ 0x80
    zp = 8 if fmt == "int4" else (128 if isa == "vnni" and not int4 else 0)
    if M == 1 and isa == "i8mm":
        isa = "dotprod"  # a single row: no row pair for smmla
    pairs = isa == "i8mm"
    MO = M // MT
    MREM = M - MO * MT
    gemv = M == 1
    pf = PREFETCH_BYTES // wshape[2]  # prefetch distance in k-quads (GEMV)
    pf_lines = max(1, wshape[2] // 64)

    def combine(s, mn, b, c, r, dot, xsum):
        """The chunk's float32 term of lane ``r`` (module docstring)."""
        if fmt == "int4":
            return T.Cast("float32", s[b, c, r]) * T.Cast("float32", dot - xsum * 8)
        if fmt == "int4_asym":
            return T.Cast("float32", s[b, c, r]) * T.Cast("float32", dot) + T.Cast("float32", mn[b, c, r]) * T.Cast(
                "float32", xsum)
        return T.Cast("float32", s[b, c, r]) * T.Cast("float32", _minus_zp(dot, xsum))

    def _minus_zp(dot, xsum):
        """The signed codes' sum from the unsigned operand's (``D_u - zp X``)."""
        return dot - xsum * zp if zp != 0 else dot

    @T.macro
    def quad(tile, w, xq, b, kq, m0, mt):
        """Accumulate k-quad ``kq`` of block ``b`` for rows ``m0 .. m0 + mt - 1`` into ``tile``."""
        if isa == "vnni":
            for mi in T.unroll(mt):
                if int4:
                    tile[mi, T.ramp(0, 1, _H)] = vpdpbusd(tile[mi, T.ramp(0, 1, _H)],
                                                           _nib(w[b, kq, T.ramp(0, 1, 64)], False, 64),
                                                           T.reinterpret("int32", xq[m0 + mi, T.ramp(kq * 4, 1, 4)]))
                    tile[mi, T.ramp(_H, 1, _H)] = vpdpbusd(tile[mi, T.ramp(_H, 1, _H)],
                                                            _nib(w[b, kq, T.ramp(0, 1, 64)], True, 64),
                                                            T.reinterpret("int32", xq[m0 + mi, T.ramp(kq * 4, 1, 4)]))
                else:
                    for h in T.unroll(2):
                        tile[mi, T.ramp(h * _H, 1, _H)] = vpdpbusd(
                            tile[mi, T.ramp(h * _H, 1, _H)],
                            T.bitwise_xor(T.reinterpret("uint8x64", w[b, kq, T.ramp(h * 64, 1, 64)]),
                                          T.broadcast(T.uint8(128), 64)),
                            T.reinterpret("int32", xq[m0 + mi, T.ramp(kq * 4, 1, 4)]))
        elif isa in ("dotprod", "i8mm"):  # i8mm: the odd last row of x (no row pair) takes sdot
            if int4:
                for j in T.unroll(4):  # 16 bytes: rows 4j..4j+3 (low nibbles), 16+4j.. (high)
                    for mi in T.unroll(mt):
                        tile[mi, T.ramp(4 * j, 1, 4)] = _sdot(
                            tile[mi, T.ramp(4 * j, 1, 4)],
                            T.reinterpret("int8x16", _nib(w[b, kq, T.ramp(16 * j, 1, 16)], False, 16)),
                            T.reinterpret("int32", xq[m0 + mi, T.ramp(kq * 4, 1, 4)]))
                        tile[mi, T.ramp(_H + 4 * j, 1, 4)] = _sdot(
                            tile[mi, T.ramp(_H + 4 * j, 1, 4)],
                            T.reinterpret("int8x16", _nib(w[b, kq, T.ramp(16 * j, 1, 16)], True, 16)),
                            T.reinterpret("int32", xq[m0 + mi, T.ramp(kq * 4, 1, 4)]))
            else:
                for j in T.unroll(8):
                    for mi in T.unroll(mt):
                        tile[mi, T.ramp(4 * j, 1, 4)] = _sdot(
                            tile[mi, T.ramp(4 * j, 1, 4)], w[b, kq, T.ramp(16 * j, 1, 16)],
                            T.reinterpret("int32", xq[m0 + mi, T.ramp(kq * 4, 1, 4)]))
        else:
            for mi in T.unroll(mt):
                if int4:
                    for r in T.vectorized(_H):
                        tile[mi, r] = tile[mi, r] + (
                            T.Cast("int32", T.bitwise_and(w[b, kq, 4 * r], T.uint8(15))) * T.Cast("int32", xq[m0 + mi, kq * 4])
                            + T.Cast("int32", T.bitwise_and(w[b, kq, 4 * r + 1], T.uint8(15))) * T.Cast("int32", xq[m0 + mi, kq * 4 + 1])
                            + T.Cast("int32", T.bitwise_and(w[b, kq, 4 * r + 2], T.uint8(15))) * T.Cast("int32", xq[m0 + mi, kq * 4 + 2])
                            + T.Cast("int32", T.bitwise_and(w[b, kq, 4 * r + 3], T.uint8(15))) * T.Cast("int32", xq[m0 + mi, kq * 4 + 3]))
                    for r in T.vectorized(_H):
                        tile[mi, _H + r] = tile[mi, _H + r] + (
                            T.Cast("int32", T.shift_right(w[b, kq, 4 * r], T.uint8(4))) * T.Cast("int32", xq[m0 + mi, kq * 4])
                            + T.Cast("int32", T.shift_right(w[b, kq, 4 * r + 1], T.uint8(4))) * T.Cast("int32", xq[m0 + mi, kq * 4 + 1])
                            + T.Cast("int32", T.shift_right(w[b, kq, 4 * r + 2], T.uint8(4))) * T.Cast("int32", xq[m0 + mi, kq * 4 + 2])
                            + T.Cast("int32", T.shift_right(w[b, kq, 4 * r + 3], T.uint8(4))) * T.Cast("int32", xq[m0 + mi, kq * 4 + 3]))
                else:
                    for r in T.vectorized(_R):
                        tile[mi, r] = tile[mi, r] + (
                            T.Cast("int32", w[b, kq, 4 * r]) * T.Cast("int32", xq[m0 + mi, kq * 4])
                            + T.Cast("int32", w[b, kq, 4 * r + 1]) * T.Cast("int32", xq[m0 + mi, kq * 4 + 1])
                            + T.Cast("int32", w[b, kq, 4 * r + 2]) * T.Cast("int32", xq[m0 + mi, kq * 4 + 2])
                            + T.Cast("int32", w[b, kq, 4 * r + 3]) * T.Cast("int32", xq[m0 + mi, kq * 4 + 3]))

    def _w8(w, b, kq, j, high: bool):
        """The 16 operand bytes (4 rows x 4 k) of quad ``kq``, piece ``j``, rows 16.. if ``high``."""
        if int4:
            return _nib(w[b, kq, T.ramp(16 * j, 1, 16)], high, 16)
        return T.reinterpret("uint8x16", w[b, kq, T.ramp((64 if high else 0) + 16 * j, 1, 16)])

    @T.macro
    def pair_step(ptile, w, xq, b, kq, m0, j, high):
        for p in T.unroll(2):  # W rows (4j + 2p, 4j + 2p + 1) (+ 16 if high): a 32-bit zip of the two quads
            ptile[(8 if high else 0) + 2 * j + p, T.ramp(0, 1, 4)] = _smmla(
                ptile[(8 if high else 0) + 2 * j + p, T.ramp(0, 1, 4)],
                T.reinterpret("int8x16", T.Shuffle(
                    [T.reinterpret("int64", xq[m0, T.ramp(kq * 4, 1, 8)]),
                     T.reinterpret("int64", xq[m0 + 1, T.ramp(kq * 4, 1, 8)])], [0, 1])),
                T.reinterpret("int8x16", T.Shuffle(
                    [T.reinterpret("int32x4", _w8(w, b, kq, j, high)),
                     T.reinterpret("int32x4", _w8(w, b, kq + 1, j, high))],
                    [2 * p, 4 + 2 * p, 2 * p + 1, 5 + 2 * p])))

    @T.macro
    def octet_pair(ptile, w, xq, b, kq, m0):
        """``i8mm``: k-quads ``kq, kq + 1`` (8 k) of block ``b`` for the row pair ``m0, m0 + 1``
        into ``ptile[16 row pairs of W, 4]`` (lanes: (m0, n), (m0, n+1), (m0+1, n), (m0+1, n+1))."""
        for j in T.unroll(4):  # 16 bytes of each quad: rows 4j..4j+3 (and 16 + 4j.. in the high nibbles)
            pair_step(ptile, w, xq, b, kq, m0, j, False)
            pair_step(ptile, w, xq, b, kq, m0, j, True)

    def _out(v, bias, n):
        return v + bias[n] if has_bias else v

    @T.prim_func(private=True)
    def f(
        xq: T.Buffer((M, K), "int8"),
        sx: T.Buffer((M,), "float32"),
        xs: T.Buffer((M, NC), "int32"),
        w: T.Buffer(wshape, wdtype),
        s: T.Buffer(sshape, sdtype),
        mn: T.Buffer(sshape, "float16"),
        bias: T.Buffer((N,), "float32"),
        y: T.Buffer((M, N), out_dtype),
    ):
        T.func_attr({"tir.noalias": True})
        xt = T.alloc_buffer((M,), "int32")
        if per_channel and zp != 0:  # the row's code sum (the zero point's factor)
            for m in range(M):
                xt[m] = 0
                for c in range(NC):
                    xt[m] = xt[m] + xs[m, c]
        for b in T.parallel(NB):
            acc = T.decl_buffer((M, _R), "float32")
            iacc = T.decl_buffer((M, _R) if per_channel else (1, _R), "int32")
            tile = T.alloc_buffer((MT, _R), "int32", scope="global")
            ptile = T.alloc_buffer((_H, 4), "int32", scope="global")
            for m in range(M):
                for r in T.vectorized(_R):
                    acc[m, r] = T.float32(0)
                    if per_channel:
                        iacc[m, r] = 0
            for c in range(NC):
                if pairs:
                    for mo in range(M // 2):
                        for i in T.unroll(_H):
                            for l in T.vectorized(4):
                                ptile[i, l] = 0
                        for o in range(QC // 2):
                            octet_pair(ptile, w, xq, b, c * QC + 2 * o, mo * 2)
                        # pair (8h + 2j + p) lanes [(m0, n), (m0, n+1), (m0+1, n), (m0+1, n+1)], n = 16h + 4j + 2p:
                        # two pairs give 4 consecutive columns of both rows (a 64-bit zip)
                        for g4 in T.unroll(8):
                            tile[0, T.ramp(4 * g4, 1, 4)] = T.Shuffle(
                                [ptile[2 * g4, T.ramp(0, 1, 4)], ptile[2 * g4 + 1, T.ramp(0, 1, 4)]], [0, 1, 4, 5])
                            tile[1, T.ramp(4 * g4, 1, 4)] = T.Shuffle(
                                [ptile[2 * g4, T.ramp(0, 1, 4)], ptile[2 * g4 + 1, T.ramp(0, 1, 4)]], [2, 3, 6, 7])
                        for mi in T.unroll(2):
                            for r in T.vectorized(_R):
                                if per_channel:
                                    iacc[mo * 2 + mi, r] = iacc[mo * 2 + mi, r] + tile[mi, r]
                                else:
                                    acc[mo * 2 + mi, r] = acc[mo * 2 + mi, r] + combine(
                                        s, mn, b, c, r, tile[mi, r], xs[mo * 2 + mi, c])
                    for mr in range(M % 2):  # an odd last row: sdot
                        for r in T.vectorized(_R):
                            tile[0, r] = 0
                        for q in range(QC):
                            quad(tile, w, xq, b, c * QC + q, M - 1, 1)
                        for r in T.vectorized(_R):
                            if per_channel:
                                iacc[M - 1, r] = iacc[M - 1, r] + tile[0, r]
                            else:
                                acc[M - 1, r] = acc[M - 1, r] + combine(s, mn, b, c, r, tile[0, r], xs[M - 1, c])
                else:
                    for mo in range(MO):
                        for mi in T.unroll(MT):
                            for r in T.vectorized(_R):
                                tile[mi, r] = 0
                        for q in range(QC):
                            if gemv:
                                for line in T.unroll(pf_lines):
                                    T.evaluate(prefetch(T.address_of(w[b, c * QC + q + pf, 64 * line])))
                            quad(tile, w, xq, b, c * QC + q, mo * MT, MT)
                        for mi in T.unroll(MT):
                            for r in T.vectorized(_R):
                                if per_channel:
                                    iacc[mo * MT + mi, r] = iacc[mo * MT + mi, r] + tile[mi, r]
                                else:
                                    acc[mo * MT + mi, r] = acc[mo * MT + mi, r] + combine(
                                        s, mn, b, c, r, tile[mi, r], xs[mo * MT + mi, c])
                    for mr in range(MREM):
                        for r in T.vectorized(_R):
                            tile[0, r] = 0
                        for q in range(QC):
                            quad(tile, w, xq, b, c * QC + q, MO * MT + mr, 1)
                        for r in T.vectorized(_R):
                            if per_channel:
                                iacc[MO * MT + mr, r] = iacc[MO * MT + mr, r] + tile[0, r]
                            else:
                                acc[MO * MT + mr, r] = acc[MO * MT + mr, r] + combine(
                                    s, mn, b, c, r, tile[0, r], xs[MO * MT + mr, c])
            for m in range(M):
                if per_channel:
                    for r in T.vectorized(_R):
                        acc[m, r] = T.Cast("float32", _minus_zp(iacc[m, r], xt[m])) * s[b * _R + r]
                for r in T.vectorized(_R):
                    y[m, b * _R + r] = T.Cast(out_dtype, _out(acc[m, r] * sx[m], bias, b * _R + r))

    return f
