"""Weight quantization for the compiler's CPU linear kernels (numpy only).

Everything here works on one weight tensor at a time, so a converter can stream a
checkpoint tensor by tensor and never hold more than one fp32 weight in memory.

Weights arrive in PyTorch ``nn.Linear`` layout ``W[N, K]`` (out_features x in_features)
and the kernels compute ``y = x @ W^T``. Each format has three entry points: a quantizer
(float32 weight -> stored tensors), a packer (integer codes and float16 scales, e.g. the
bits of a GGUF file, -> the same stored tensors, nothing rounded) and a dequantizer
(stored tensors -> the float32 weight the kernels compute with, bit for bit where a
kernel materializes it).

Packed layouts (the kernels in :mod:`bluelower.lowering.kernels.linear` read exactly
these; see ``docs/kernels.md``):

INT4, group-wise symmetric, ``R = BLOCK_ROWS = 32`` output rows per block::

    packed : uint8   [N // 32, K, 16]
        packed[b, k, j] = u(b*32 + j, k)  |  (u(b*32 + 16 + j, k) << 4)
        with u = q + 8 in [0, 15]  (q in [-8, 7], in practice [-7, 7])
    scales : float16 [N // 32, K // group_size, 32]
        scales[b, g, r] = scale of row b*32 + r, columns g*gs .. g*gs + gs - 1

  (This is layout ``"k1"``. Layout ``"k4"``, ``[N // 32, K // 4, 64]``, stores the same
  nibbles with 4 consecutive k of a row in one 32-bit lane -- byte ``[b, kq, 4*r + j]``
  holds rows ``r`` / ``r + 16`` at ``k = 4*kq + j`` -- for the ``vpdpbusd`` GEMV.)

  For one k, the 16 bytes hold the nibbles of all 32 rows of the block: the low
  nibbles are rows 0..15, the high nibbles rows 16..31. One 16-byte load, an AND and a
  shift give two 16-lane vectors of codes, so the GEMV inner loop is a broadcast of
  ``x[k]`` and FMAs into 32 row accumulators, reading the weights as one contiguous
  stream per block (no horizontal reduction, no gathers).

  ``w = s * (u - 8)``. GGUF ``Q4_0`` (``w = d * (q - 8)``, ``d`` float16 per 32 values
  along K) is this format with ``group_size = 32``: ``u = q``, ``s = d``
  (:func:`pack_int4_groupwise`), bit for bit.

INT4, group-wise asymmetric (GGUF ``Q4_1``'s rule), same ``packed`` layouts (k1 / k4)
holding ``u`` itself::

    packed : uint8   [N // 32, K, 16] or [N // 32, K // 4, 64]   (u in [0, 15])
    scales : float16 [N // 32, K // group_size, 32]              (s)
    mins   : float16 [N // 32, K // group_size, 32]              (m)
        w = s * u + m

  ``Q4_1`` (``w = d * q + m``) packs as ``u = q, s = d, m = m``; ``Q4_0`` also fits
  (``m = -8 d``, exact in float16 for ``|d| <= 8188``) and then dequantizes to the same
  float32 values as the symmetric format: ``s * u`` is exact in float32 (11 x 4 bits),
  and so is ``s * u - 8 s`` (a zero of a negative ``d`` is +0 here, -0 there).
  Storage: 4 bits per weight + 32 bits per group (5 bits per weight for
  ``group_size=32``, like ``Q4_1``).

INT8, per output channel symmetric::

    packed : int8    [N // 32, K, 32]      packed[b, k, r] = q(b*32 + r, k)
    scales : float32 [N]

INT8, group-wise symmetric (GGUF ``Q8_0``'s rule)::

    packed : int8    [N // 32, K, 32]                  (q, as per channel)
    scales : float16 [N // 32, K // group_size, 32]    (s, as INT4)
        w = s * q

  ``Q8_0`` (``w = d * q``, q int8, ``d`` float16 per 32) packs as ``q = q, s = d`` with
  ``group_size = 32``. Storage: 8.5 bits per weight for ``group_size=32``.

Every dequantization is float32 arithmetic on the widened float16 values: ``s * u``,
``s * q`` and ``s * (u - 8)`` are exact (at most 11 + 8 significant bits) and
``s * u + m`` is rounded once (a fused multiply-add gives the same value).

Quantization rules (exact):

* INT4: per (row, group) ``s = max|w| / 7``, rounded to float16 (the stored value);
  ``q = clip(rint(w / s16), -8, 7)`` with ``rint`` = round half to even and ``s16`` the
  float16 scale widened to float32. Because ``|w| / s16 <= 7 * (1 + 2^-11)`` the codes
  are in [-7, 7]; the clip to [-8, 7] only guards against float16 rounding. A group of
  zeros gets ``s = 0`` and ``q = 0``. Dequantized ``w' = s16 * q``; the error per
  element is at most ``s16 / 2`` (plus the float16 rounding of ``s``, relative 2^-11).
* INT4 asymmetric: per (row, group) ``m = min w`` rounded to float16 first, then
  ``s = (max w - m16) / 15`` rounded to float16, ``u = clip(rint((w - m16) / s16), 0, 15)``.
  Error per element at most ``max(s16 / 2, |min w - m16|)`` (the second term, at most
  ``2^-11 |min w|``, only when the min's float16 rounding exceeds half a step), plus the
  float32 rounding of ``s16 * u + m16`` (relative 2^-24). A constant group gets ``s = 0``
  (``w' = m16``).
* INT8 per channel: per row ``s = max|w| / 127`` (float32),
  ``q = clip(rint(w / s), -127, 127)``, ``w' = s * q``; error at most ``s / 2``.
* INT8 group-wise: per (row, group) ``s = max|w| / 127`` rounded to float16,
  ``q = clip(rint(w / s16), -127, 127)``; error at most ``s16 / 2``.

The float16 bounds assume scales in float16's normal range (``s >= 2^-14``, e.g. INT4
groups with ``max|w| >= 4.3e-4``); a smaller scale is rounded to the subnormal spacing
2^-24, which adds at most ``qmax * 2^-25`` (``qmax`` = 7, 15, 127) to the error.

Scale search (``search=True`` on the INT4 quantizers): the min/max rules above spend
code range on a group's extremes. With the search, each group tries its range shrunk by
the factors of :data:`SEARCH_SHRINK` (1.0, 0.975, ..., 0.6) and keeps the candidate with
the least squared error ``sum (w - w')^2`` (float32 differences, squared and summed in
float64, element 0 first), computed with the float16-rounded scale (and min) that is
stored; ties keep the earlier candidate, so factor 1.0 (the plain rule) wins them and the
search is never worse than the plain rule. Symmetric: ``s = f16(f * max|w| / 7)``
(codes clipped to [-8, 7]). Asymmetric: the range ``[lo, hi]`` is shrunk from the top
(``hi = max - c * range``, ``c = 1 - f``), from the bottom (``lo = min + c * range``) and
from both ends (``c / 2`` each; the shrunk bounds computed in float64 and rounded once to
float32), then ``m = f16(lo)`` and ``s = f16((hi - m) / 15)`` as above. Elements outside
the shrunk range are clipped, so the per-element bounds above no longer hold. The search
runs as a compiled kernel (:mod:`.search`: the same bits as its numpy reference on every
machine, FMA or not) at ~0.02 s per million weights on the 2-core x86 host (the numpy
version it replaced: 0.3 s); on heavy-tailed (Student-t, 4 dof) 2560 x 2560 weights it
lowers the squared error by 18 % (symmetric) / 16 % (asymmetric).
"""

from __future__ import annotations

import numpy as np

from .search import SEARCH_SHRINK, search_asym, search_sym  # noqa: F401 (SEARCH_SHRINK re-exported)

BLOCK_ROWS = 32
"""Output rows per packed block (the kernels' vector width along N)."""


_HALF = BLOCK_ROWS // 2
_ROWS_AT_ONCE = 1 << 21  # elements per block of rows: float temporaries of ~8 MB, not 4x the weight


def _check_weight(w: np.ndarray, group_size: int | None = None) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K] (out_features, in_features), got shape {w.shape}")
    n, k = w.shape
    if n % BLOCK_ROWS != 0:
        raise ValueError(f"N (out_features) = {n} must be a multiple of {BLOCK_ROWS}")
    if group_size is not None:
        if group_size <= 0 or k % group_size != 0:
            raise ValueError(f"K (in_features) = {k} must be a multiple of group_size = {group_size}")
    return np.ascontiguousarray(w, dtype=np.float32)


def _row_blocks(n: int, k: int):
    # in blocks of rows: the float temporaries stay ~8 MB, not 4x the weight (the 3B model's
    # 1 GB embedding table and lm_head are converted while other tensors are in flight)
    rows = max(1, _ROWS_AT_ONCE // max(k, 1))
    return range(0, n, rows), rows


def _inverse(s32: np.ndarray) -> np.ndarray:
    return np.divide(np.float32(1.0), s32, out=np.zeros_like(s32), where=s32 != 0)


def _f16(x: np.ndarray) -> np.ndarray:
    """float32 -> the float16 value that is stored -> float32."""
    return x.astype(np.float16).astype(np.float32)


def _check_finite(s16: np.ndarray, what: str) -> None:
    if not np.isfinite(s16).all():
        raise ValueError(f"{what} overflow float16 (a weight group beyond +-65504 * the code range)")


def _sym_codes(wg: np.ndarray, s32: np.ndarray, lo: int, hi: int) -> np.ndarray:
    t = wg * _inverse(s32)[:, :, None]
    np.rint(t, out=t)
    np.clip(t, lo, hi, out=t)
    return t


def _symmetric_codes(w: np.ndarray, group_size: int, qmax: int, qmin: int, search: bool = False):
    """The symmetric group-wise rule on float32 ``w[N, K]`` (INT4: ``qmax = 7, qmin = -8``; INT8:
    127, -127): codes int8 ``[N, K]`` and float16 scales ``[N, K // gs]``, ``s = max|w| / qmax``
    (``search``: the scale :mod:`.search` chooses)."""
    n, k = w.shape
    q = np.empty((n, k), np.int8)
    s16 = np.empty((n, k // group_size), np.float16)
    starts, rows = _row_blocks(n, k)
    for r0 in starts:
        wg = w[r0:r0 + rows].reshape(-1, k // group_size, group_size)
        if search:
            s16[r0:r0 + rows] = search_sym(wg.reshape(-1, group_size), qmax, qmin).reshape(wg.shape[:2])
        else:
            s16[r0:r0 + rows] = np.abs(wg).max(axis=2) / np.float32(qmax)
        s32 = s16[r0:r0 + rows].astype(np.float32)
        q[r0:r0 + rows] = _sym_codes(wg, s32, qmin, qmax).reshape(-1, k)
    _check_finite(s16, "scales")
    return q, s16


def _int4_codes(w: np.ndarray, group_size: int, search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The INT4 rule on float32 ``w[N, K]``: codes ``q`` int8 ``[N, K]`` and float16 scales ``[N, K // gs]``."""
    return _symmetric_codes(w, group_size, 7, -8, search)


def _asym_codes_for(wg, s32, m32):
    """Codes of the asymmetric rule for the float16-rounded ``s32``, ``m32`` per group."""
    u = (wg - m32[:, :, None]) * _inverse(s32)[:, :, None]
    np.rint(u, out=u)
    np.clip(u, 0, 15, out=u)
    return u


def _int4_asym_codes(w: np.ndarray, group_size: int, search: bool = False):
    """The asymmetric INT4 rule on float32 ``w[N, K]``: codes ``u`` uint8 ``[N, K]`` in [0, 15]
    and float16 scales and mins ``[N, K // gs]`` (``search``: the range :mod:`.search` chooses)."""
    n, k = w.shape
    u = np.empty((n, k), np.uint8)
    s16 = np.empty((n, k // group_size), np.float16)
    m16 = np.empty((n, k // group_size), np.float16)
    starts, rows = _row_blocks(n, k)
    for r0 in starts:
        wg = w[r0:r0 + rows].reshape(-1, k // group_size, group_size)
        if search:
            s32, m32 = (x.reshape(wg.shape[:2]) for x in search_asym(wg.reshape(-1, group_size)))
        else:
            m32 = _f16(wg.min(axis=2))
            s32 = _f16((wg.max(axis=2) - m32) / np.float32(15.0))
        u[r0:r0 + rows] = _asym_codes_for(wg, s32, m32).reshape(-1, k)
        s16[r0:r0 + rows], m16[r0:r0 + rows] = s32, m32
    _check_finite(s16, "INT4 scales")
    _check_finite(m16, "INT4 mins")
    return u, s16, m16


def _int8_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The INT8 rule on float32 ``w[N, K]``: codes ``q`` int8 ``[N, K]`` and float32 scales ``[N]``."""
    amax = np.abs(w).max(axis=1)
    s = (amax / 127.0).astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    q = np.clip(np.rint(w * inv[:, None]), -127, 127).astype(np.int8)
    return q, s


def _int8_group_codes(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The group-wise INT8 rule on float32 ``w[N, K]``: codes int8 ``[N, K]``, float16 scales ``[N, K // gs]``."""
    return _symmetric_codes(w, group_size, 127, -127)


# ------------------------------------------------------------------ packing (codes -> layouts)


def _check_codes(codes, dtype, lo: int, hi: int, group_size: int, rows_layout: bool = False) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if codes.dtype != dtype:
        raise ValueError(f"codes must be {np.dtype(dtype).name}, got {codes.dtype}")
    n, k = codes.shape
    if not rows_layout and n % BLOCK_ROWS != 0:
        raise ValueError(f"N (out_features) = {n} must be a multiple of {BLOCK_ROWS}")
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"K = {k} must be a multiple of group_size = {group_size}")
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes must lie in [{lo}, {hi}], got [{codes.min()}, {codes.max()}]")
    return np.ascontiguousarray(codes)


def _check_group_values(values, codes: np.ndarray, group_size: int, what: str) -> np.ndarray:
    """Per-(row, group) float16 values [N, K // gs], taken as they are (a float32 array would
    have to be rounded: not the file's bits)."""
    values = np.asarray(values)
    n, k = codes.shape
    if values.dtype != np.float16:
        raise ValueError(f"{what} must be float16 (the stored values), got {values.dtype}")
    if values.shape != (n, k // group_size):
        raise ValueError(f"{what} shape {values.shape} must be [N, K // group_size] = {(n, k // group_size)}")
    return np.ascontiguousarray(values)


def _blocked(per_row: np.ndarray) -> np.ndarray:
    """[N, X] -> [N // 32, X, 32]: the blocked layout of codes (X = K) and scales (X = groups)."""
    n, x = per_row.shape
    return np.ascontiguousarray(per_row.reshape(n // BLOCK_ROWS, BLOCK_ROWS, x).transpose(0, 2, 1))


def unblocked(blocked: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_blocked`."""
    nb, x, r = blocked.shape
    return np.ascontiguousarray(blocked.transpose(0, 2, 1).reshape(nb * r, x))


def _nibbles_blocked(u: np.ndarray, layout: str) -> np.ndarray:
    """Unsigned codes ``u[N, K]`` (0..15) -> packed uint8 in layout ``k1`` or ``k4``."""
    b = _blocked(u.astype(np.uint8, copy=False))  # [NB, K, 32]
    packed = np.ascontiguousarray(b[:, :, :_HALF] | (b[:, :, _HALF:] << 4))
    return int4_k1_to_k4(packed) if layout == "k4" else packed


def _check_layout(layout: str, group_size: int) -> None:
    if layout not in ("k1", "k4"):
        raise ValueError(f"layout must be 'k1' or 'k4', got {layout!r}")
    if layout == "k4" and group_size % 4 != 0:
        raise ValueError(f"layout 'k4' needs group_size % 4 == 0, got {group_size}")


def pack_int4_groupwise(codes: np.ndarray, scales: np.ndarray, layout: str = "k1") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 from its codes: ``codes`` uint8 ``[N, K]`` in 0..15 (``u = q + 8``; GGUF
    Q4_0's ``q`` as stored), ``scales`` float16 ``[N, K // group_size]`` (the group size is
    ``K // scales.shape[1]``). Returns ``(packed, scales)`` as :func:`quantize_int4_groupwise`;
    ``w = s * (u - 8)``, nothing rounded."""
    scales = np.asarray(scales)
    gs = _group_size_of(codes, scales)
    _check_layout(layout, gs)
    codes = _check_codes(codes, np.uint8, 0, 15, gs)
    return _nibbles_blocked(codes, layout), _blocked(_check_group_values(scales, codes, gs, "scales"))


def pack_int4_asym(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray,
                   layout: str = "k1") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric INT4 from its codes: ``codes`` uint8 ``[N, K]`` in 0..15, ``scales`` and
    ``mins`` float16 ``[N, K // group_size]`` (GGUF Q4_1's ``q``, ``d``, ``m`` as stored).
    Returns ``(packed, scales, mins)``: packed uint8 in ``layout`` (as the symmetric format),
    scales and mins float16 ``[N // 32, K // gs, 32]``; ``w = s * u + m``, nothing rounded."""
    scales = np.asarray(scales)
    gs = _group_size_of(codes, scales)
    _check_layout(layout, gs)
    codes = _check_codes(codes, np.uint8, 0, 15, gs)
    return (_nibbles_blocked(codes, layout), _blocked(_check_group_values(scales, codes, gs, "scales")),
            _blocked(_check_group_values(mins, codes, gs, "mins")))


def pack_int8_groupwise(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group-wise INT8 from its codes: ``codes`` int8 ``[N, K]`` (any of -128..127), ``scales``
    float16 ``[N, K // group_size]`` (GGUF Q8_0's ``q``, ``d`` as stored). Returns ``(packed
    int8 [N // 32, K, 32], scales float16 [N // 32, K // gs, 32])``; ``w = s * q``."""
    scales = np.asarray(scales)
    gs = _group_size_of(codes, scales)
    codes = _check_codes(codes, np.int8, -128, 127, gs)
    return _blocked(codes), _blocked(_check_group_values(scales, codes, gs, "scales"))


def q4_0_as_asym(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_0 ``(codes, d)`` as the asymmetric format's ``(codes, scales, mins)``:
    ``m = -8 d`` (exact in float16); the asymmetric kernels then compute exactly the
    symmetric ones' weights. Raises ``ValueError`` if some ``|d| > 8188`` (``-8 d`` overflows)."""
    d = np.asarray(scales)
    if d.dtype != np.float16:
        raise ValueError(f"scales must be float16 (the stored values), got {d.dtype}")
    with np.errstate(over="ignore"):
        m = (d * np.float16(-8)).astype(np.float16)
    if not np.isfinite(m[np.isfinite(d)]).all():
        raise ValueError("Q4_0 scale too large for an exact float16 min (|d| > 8188)")
    return np.asarray(codes), d, m


def _group_size_of(codes, scales) -> int:
    codes = np.asarray(codes)
    scales = np.asarray(scales)
    if codes.ndim != 2 or scales.ndim != 2 or scales.shape[0] != codes.shape[0] or scales.shape[1] == 0 \
            or codes.shape[1] % scales.shape[1]:
        raise ValueError(f"codes {codes.shape} and scales {scales.shape} must be [N, K] and [N, K // group_size]")
    return codes.shape[1] // scales.shape[1]


# ------------------------------------------------------------------ the quantizers (float -> layouts)


def quantize_int4_groupwise(
    w: np.ndarray, group_size: int = 32, layout: str = "k1", search: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w[N, K]`` (float) to symmetric group-wise INT4 in a blocked layout.

    Returns ``(packed, scales)``: ``scales`` float16 ``[N//32, K//group_size, 32]`` and
    ``packed`` uint8, two nibbles per byte (rows ``r`` and ``r+16`` of each 32-row block):

    * ``layout="k1"`` (portable float kernels): ``[N//32, K, 16]``,
      byte ``[b, k, r]`` = rows ``b*32+r`` / ``b*32+16+r`` at column ``k``.
    * ``layout="k4"`` (integer dot-product GEMV, AVX512-VNNI): ``[N//32, K//4, 64]``,
      byte ``[b, kq, 4*r + j]`` = rows ``b*32+r`` / ``b*32+16+r`` at column ``4*kq + j``
      (each 32-bit lane holds 4 consecutive k of one row, as ``vpdpbusd`` wants).

    ``search=True``: the error-minimizing scale search (module docstring). Storage: 4 bits
    per weight + 16 bits per group (4.5 bits/weight for ``group_size=32``). Raises
    ``ValueError`` if ``N % 32 != 0``, ``K % group_size != 0`` or (``k4``)
    ``group_size % 4 != 0``.
    """
    _check_layout(layout, group_size)
    w = _check_weight(w, group_size)
    q, s16 = _int4_codes(w, group_size, search)
    return _nibbles_blocked((q + 8).astype(np.uint8), layout), _blocked(s16)


def quantize_int4_asym(
    w: np.ndarray, group_size: int = 32, layout: str = "k1", search: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``w[N, K]`` to asymmetric group-wise INT4 (module docstring): ``(packed,
    scales, mins)`` in the layouts of :func:`pack_int4_asym`. ``search=True``: the
    error-minimizing range search. Same ``ValueError`` cases as :func:`quantize_int4_groupwise`."""
    _check_layout(layout, group_size)
    w = _check_weight(w, group_size)
    u, s16, m16 = _int4_asym_codes(w, group_size, search)
    return _nibbles_blocked(u, layout), _blocked(s16), _blocked(m16)


def quantize_int8_groupwise(w: np.ndarray, group_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w[N, K]`` to group-wise INT8 (``Q8_0``'s rule): ``(packed int8 [N//32, K, 32],
    scales float16 [N//32, K//group_size, 32])``. Raises ``ValueError`` if ``N % 32 != 0``
    or ``K % group_size != 0``."""
    w = _check_weight(w, group_size)
    q, s16 = _int8_group_codes(w, group_size)
    return _blocked(q), _blocked(s16)


def int4_k1_to_k4(packed: np.ndarray) -> np.ndarray:
    """Repack an INT4 weight from layout ``k1`` ``[NB, K, 16]`` to ``k4`` ``[NB, K//4, 64]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    nb, k, half = packed.shape
    if half != _HALF or k % 4 != 0:
        raise ValueError(f"expected a 'k1' INT4 weight [N//32, K, 16] with K % 4 == 0, got {packed.shape}")
    return k1_to_k4_lanes(packed)


def int4_k4_to_k1(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`int4_k1_to_k4`."""
    packed = np.asarray(packed, dtype=np.uint8)
    nb, kq, lanes = packed.shape
    if lanes != 4 * _HALF:
        raise ValueError(f"expected a 'k4' INT4 weight [N//32, K//4, 64], got {packed.shape}")
    return k4_to_k1_lanes(packed)


def k1_to_k4_lanes(packed: np.ndarray) -> np.ndarray:
    """``[NB, K, L]`` -> ``[NB, K//4, 4L]``: the 4 k of each 32-bit dot-product lane adjacent
    (the ``k4`` layout of the INT4 (L = 16 bytes) and INT8 (L = 32) weights; shape checked by
    the callers)."""
    nb, k, lanes = packed.shape
    return np.ascontiguousarray(packed.reshape(nb, k // 4, 4, lanes).transpose(0, 1, 3, 2).reshape(nb, k // 4, 4 * lanes))


def k4_to_k1_lanes(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`k1_to_k4_lanes`."""
    nb, kq, lanes4 = packed.shape
    lanes = lanes4 // 4
    return np.ascontiguousarray(packed.reshape(nb, kq, lanes, 4).transpose(0, 1, 3, 2).reshape(nb, kq * 4, lanes))


def int4_layout(packed: np.ndarray) -> str:
    """``"k1"`` or ``"k4"``, from the shape of a packed INT4 weight."""
    shape = np.shape(packed)
    if len(shape) == 3 and shape[2] == _HALF:
        return "k1"
    if len(shape) == 3 and shape[2] == 4 * _HALF:
        return "k4"
    raise ValueError(f"not a packed INT4 weight: shape {shape}")


def unpack_int4_nibbles(packed: np.ndarray) -> np.ndarray:
    """The unsigned INT4 codes ``u[N, K]`` (uint8, in [0, 15]) of a packed tensor (either layout)."""
    if int4_layout(packed) == "k4":
        packed = int4_k4_to_k1(packed)
    packed = np.asarray(packed, dtype=np.uint8)
    return unblocked(np.concatenate([packed & 0x0F, packed >> 4], axis=2))  # [NB, K, 32] -> [N, K]


def unpack_int4_codes(packed: np.ndarray) -> np.ndarray:
    """Return the signed INT4 codes ``q[N, K]`` (int8, in [-8, 7]) of a packed tensor (either layout)."""
    return unpack_int4_nibbles(packed).astype(np.int8) - np.int8(8)


def _apply_groups(codes: np.ndarray, group_size: int, scales: np.ndarray, mins: np.ndarray | None = None):
    """float32 ``codes[N, K] * s (+ m)`` with ``scales`` / ``mins`` float32 ``[N, K // gs]``."""
    n, k = codes.shape
    w = codes.reshape(n, k // group_size, group_size) * scales[:, :, None]
    return (w if mins is None else w + mins[:, :, None]).reshape(n, k)


def _group_values(blocked: np.ndarray, n: int, g: int, what: str, packed_shape) -> np.ndarray:
    """Blocked per-group values ``[N // 32, G, 32]`` -> float32 ``[N, G]``."""
    blocked = np.asarray(blocked)
    if blocked.shape != (n // BLOCK_ROWS, g, BLOCK_ROWS):
        raise ValueError(f"{what} shape {blocked.shape} does not match packed weight {packed_shape} "
                         f"with {g} groups per row")
    return unblocked(blocked).astype(np.float32)


def dequantize_int4_groupwise(packed: np.ndarray, scales: np.ndarray, group_size: int = 32) -> np.ndarray:
    """Reference dequantization: ``(packed, scales)`` -> float32 ``W'[N, K]``."""
    q = unpack_int4_codes(packed).astype(np.float32)
    n, k = q.shape
    return _apply_groups(q, group_size, _group_values(scales, n, k // group_size, "scales", np.shape(packed)))


def dequantize_int4_asym(packed: np.ndarray, scales: np.ndarray, mins: np.ndarray, group_size: int = 32) -> np.ndarray:
    """Reference dequantization of the asymmetric format: float32 ``W'[N, K] = s * u + m``."""
    u = unpack_int4_nibbles(packed).astype(np.float32)
    n, k = u.shape
    g = k // group_size
    return _apply_groups(u, group_size, _group_values(scales, n, g, "scales", np.shape(packed)),
                         _group_values(mins, n, g, "mins", np.shape(packed)))


def quantize_int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w[N, K]`` to symmetric per-output-channel INT8 in the blocked layout.

    Returns ``(packed, scales)``: ``packed`` int8 ``[N//32, K, 32]`` with
    ``packed[b, k, r] = q[b*32 + r, k]``; ``scales`` float32 ``[N]``.
    Raises ``ValueError`` if ``N % 32 != 0``.
    """
    q, s = _int8_codes(_check_weight(w))
    return _blocked(q), s


def dequantize_int8_per_channel(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Reference dequantization: ``(packed int8 [N//32, K, 32], scales [N])`` -> float32 ``W'[N, K]``."""
    packed = np.asarray(packed)
    if packed.ndim != 3 or packed.shape[2] != BLOCK_ROWS:
        raise ValueError(f"packed INT8 weight must have shape [N//32, K, 32], got {packed.shape}")
    return unblocked(packed).astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


def dequantize_int8_groupwise(packed: np.ndarray, scales: np.ndarray, group_size: int = 32) -> np.ndarray:
    """Reference dequantization of group-wise INT8: float32 ``W'[N, K] = s * q``."""
    packed = np.asarray(packed)
    if packed.ndim != 3 or packed.shape[2] != BLOCK_ROWS:
        raise ValueError(f"packed INT8 weight must have shape [N//32, K, 32], got {packed.shape}")
    q = unblocked(packed).astype(np.float32)
    n, k = q.shape
    return _apply_groups(q, group_size, _group_values(scales, n, k // group_size, "scales", packed.shape))


# ------------------------------------------------------------------ row layouts (embedding tables)
#
# An embedding lookup reads whole rows, so tables are stored row-major (one row's codes and
# scales contiguous) with the same quantization rules as the linear weights:
#
#   INT4 rows: packed uint8 [N, K // 2], byte [n, j] = u(n, 2j) | (u(n, 2j + 1) << 4), u = q + 8;
#              scales float16 [N, K // group_size]
#   INT4 asymmetric rows: packed as INT4 rows holding u itself; scales and mins float16
#              [N, K // group_size]; w = s * u + m
#   INT8 rows: packed int8 [N, K] = q;  scales float32 [N]  (per row)
#   INT8 group-wise rows: packed int8 [N, K] = q;  scales float16 [N, K // group_size]
#
# N (the vocabulary) needs no padding; K must be a multiple of the group size (and even, INT4).


def _check_rows(w: np.ndarray, group_size: int | None = None) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"embedding table must be 2-D [rows, width], got shape {w.shape}")
    if group_size is not None and (group_size <= 0 or group_size % 2 or w.shape[1] % group_size):
        raise ValueError(f"width {w.shape[1]} must be a multiple of an even group_size = {group_size}")
    return np.ascontiguousarray(w, dtype=np.float32)


def _nibbles_rows(u: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8))


def _unpack_nibbles_rows(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[N, K // 2]`` -> float32 unsigned codes ``[N, K]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    n, half = packed.shape
    u = np.empty((n, 2 * half), np.float32)
    u[:, 0::2] = packed & 0x0F
    u[:, 1::2] = packed >> 4
    return u


def _row_group_values(values: np.ndarray, n: int, g: int, what: str, packed_shape) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n, g):
        raise ValueError(f"{what} shape {values.shape} does not match the rows {packed_shape} with {g} groups per row")
    return values.astype(np.float32)


def quantize_int4_rows(w: np.ndarray, group_size: int = 32, search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a table ``w[N, K]`` to INT4 row layout: ``(packed uint8 [N, K//2], scales float16 [N, K//gs])``.

    Same codes and scales as :func:`quantize_int4_groupwise` (4.5 bits per element for gs 32)."""
    w = _check_rows(w, group_size)
    q, s16 = _int4_codes(w, group_size, search)
    return _nibbles_rows((q + 8).astype(np.uint8)), np.ascontiguousarray(s16)


def pack_int4_rows(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """INT4 rows from codes (uint8 ``[N, K]`` in 0..15, ``u = q + 8``) and float16 scales ``[N, K // gs]``."""
    scales = np.asarray(scales)
    gs = _group_size_of(codes, scales)
    codes = _check_codes(codes, np.uint8, 0, 15, _even(gs), rows_layout=True)
    return _nibbles_rows(codes), _check_group_values(scales, codes, gs, "scales")


def dequantize_int4_rows(packed: np.ndarray, scales: np.ndarray, group_size: int = 32) -> np.ndarray:
    """Reference dequantization of :func:`quantize_int4_rows`: float32 ``[N, K]``."""
    q = _unpack_nibbles_rows(packed) - np.float32(8)
    n, k = q.shape
    return _apply_groups(q, group_size, _row_group_values(scales, n, k // group_size, "scales", np.shape(packed)))


def quantize_int4_asym_rows(w: np.ndarray, group_size: int = 32,
                            search: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a table ``w[N, K]`` to asymmetric INT4 rows: ``(packed uint8 [N, K//2], scales
    float16 [N, K//gs], mins float16 [N, K//gs])``, the rule of :func:`quantize_int4_asym`."""
    w = _check_rows(w, group_size)
    u, s16, m16 = _int4_asym_codes(w, group_size, search)
    return _nibbles_rows(u), np.ascontiguousarray(s16), np.ascontiguousarray(m16)


def pack_int4_asym_rows(codes: np.ndarray, scales: np.ndarray,
                        mins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric INT4 rows from codes (uint8 ``[N, K]`` in 0..15) and float16 scales and
    mins ``[N, K // gs]`` (GGUF Q4_1 as stored)."""
    scales = np.asarray(scales)
    gs = _group_size_of(codes, scales)
    codes = _check_codes(codes, np.uint8, 0, 15, _even(gs), rows_layout=True)
    return (_nibbles_rows(codes), _check_group_values(scales, codes, gs, "scales"),
            _check_group_values(mins, codes, gs, "mins"))


def dequantize_int4_asym_rows(packed: np.ndarray, scales: np.ndarray, mins: np.ndarray,
                              group_size: int = 32) -> np.ndarray:
    """Reference dequantization of asymmetric INT4 rows: float32 ``[N, K] = s * u + m``."""
    u = _unpack_nibbles_rows(packed)
    n, k = u.shape
    g = k // group_size
    return _apply_groups(u, group_size, _row_group_values(scales, n, g, "scales", np.shape(packed)),
                         _row_group_values(mins, n, g, "mins", np.shape(packed)))


def quantize_int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a table ``w[N, K]`` to INT8 rows: ``(codes int8 [N, K], scales float32 [N])``
    (the rule of :func:`quantize_int8_per_channel`, unblocked)."""
    q, s = _int8_codes(_check_rows(w))
    return np.ascontiguousarray(q), s


def dequantize_int8_rows(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Reference dequantization of :func:`quantize_int8_rows`: float32 ``[N, K]``."""
    return np.asarray(packed).astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


def quantize_int8_groupwise_rows(w: np.ndarray, group_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a table ``w[N, K]`` to group-wise INT8 rows: ``(codes int8 [N, K], scales float16
    [N, K//gs])``, the rule of :func:`quantize_int8_groupwise`."""
    w = _check_rows(w)
    if group_size <= 0 or w.shape[1] % group_size:
        raise ValueError(f"width {w.shape[1]} must be a multiple of group_size = {group_size}")
    q, s16 = _int8_group_codes(w, group_size)
    return q, s16


def pack_int8_groupwise_rows(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group-wise INT8 rows from codes (int8 ``[N, K]``) and float16 scales ``[N, K // gs]`` (GGUF Q8_0 as stored)."""
    scales = np.asarray(scales)
    gs = _group_size_of(codes, scales)
    codes = _check_codes(codes, np.int8, -128, 127, gs, rows_layout=True)
    return codes, _check_group_values(scales, codes, gs, "scales")


def dequantize_int8_groupwise_rows(packed: np.ndarray, scales: np.ndarray, group_size: int = 32) -> np.ndarray:
    """Reference dequantization of group-wise INT8 rows: float32 ``[N, K] = s * q``."""
    q = np.asarray(packed).astype(np.float32)
    n, k = q.shape
    return _apply_groups(q, group_size, _row_group_values(scales, n, k // group_size, "scales", np.shape(packed)))


def _even(group_size: int) -> int:
    if group_size % 2:
        raise ValueError(f"INT4 rows need an even group_size, got {group_size}")
    return group_size


def packed_nbytes(*tensors: np.ndarray) -> int:
    """Bytes a kernel must read for one weight: packed codes plus scales (plus mins)."""
    return int(sum(np.asarray(t).nbytes for t in tensors))
