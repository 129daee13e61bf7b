"""Weight quantization for the compiler's CPU linear kernels (numpy only).

Everything here works on one weight tensor at a time, so a converter can stream a
checkpoint tensor by tensor and never hold more than one fp32 weight in memory.

Weights arrive in PyTorch ``nn.Linear`` layout ``W[N, K]`` (out_features x in_features)
and the kernels compute ``y = x @ W^T``.

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

INT8, per output channel symmetric::

    packed : int8    [N // 32, K, 32]      packed[b, k, r] = q(b*32 + r, k)
    scales : float32 [N]

Quantization rules (exact):

* INT4: per (row, group) ``s = max|w| / 7``, rounded to float16 (the stored value);
  ``q = clip(rint(w / s16), -8, 7)`` with ``rint`` = round half to even and ``s16`` the
  float16 scale widened to float32. Because ``|w| / s16 <= 7 * (1 + 2^-11)`` the codes
  are in [-7, 7]; the clip to [-8, 7] only guards against float16 rounding. A group of
  zeros gets ``s = 0`` and ``q = 0``. Dequantized ``w' = s16 * q``; the error per
  element is at most ``s16 / 2`` (plus the float16 rounding of ``s``, relative 2^-11).
* INT8: per row ``s = max|w| / 127`` (float32), ``q = clip(rint(w / s), -127, 127)``,
  ``w' = s * q``; error at most ``s / 2``.
"""

from __future__ import annotations

import numpy as np

BLOCK_ROWS = 32
"""Output rows per packed block (the kernels' vector width along N)."""

_HALF = BLOCK_ROWS // 2


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


def _int4_codes(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The INT4 rule on float32 ``w[N, K]``: codes ``q`` int8 ``[N, K]`` and float16 scales ``[N, K // gs]``."""
    n, k = w.shape
    q = np.empty((n, k), np.int8)
    s16 = np.empty((n, k // group_size), np.float16)
    # in blocks of rows: the float temporaries stay ~8 MB, not 4x the weight (the 3B model's
    # 1 GB embedding table and lm_head are converted while other tensors are in flight)
    rows = max(1, (1 << 21) // max(k, 1))
    for r0 in range(0, n, rows):
        wg = w[r0:r0 + rows].reshape(-1, k // group_size, group_size)
        s16[r0:r0 + rows] = np.abs(wg).max(axis=2) / np.float32(7.0)
        s32 = s16[r0:r0 + rows].astype(np.float32)
        inv = np.divide(np.float32(1.0), s32, out=np.zeros_like(s32), where=s32 != 0)
        t = wg * inv[:, :, None]
        np.rint(t, out=t)
        np.clip(t, -8, 7, out=t)
        q[r0:r0 + rows] = t.reshape(-1, k)
    return q, s16


def _int8_codes(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The INT8 rule on float32 ``w[N, K]``: codes ``q`` int8 ``[N, K]`` and float32 scales ``[N]``."""
    amax = np.abs(w).max(axis=1)
    s = (amax / 127.0).astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    q = np.clip(np.rint(w * inv[:, None]), -127, 127).astype(np.int8)
    return q, s


def quantize_int4_groupwise(
    w: np.ndarray, group_size: int = 32, layout: str = "k1"
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w[N, K]`` (float) to symmetric group-wise INT4 in a blocked layout.

    Returns ``(packed, scales)``: ``scales`` float16 ``[N//32, K//group_size, 32]`` and
    ``packed`` uint8, two nibbles per byte (rows ``r`` and ``r+16`` of each 32-row block):

    * ``layout="k1"`` (portable float kernels): ``[N//32, K, 16]``,
      byte ``[b, k, r]`` = rows ``b*32+r`` / ``b*32+16+r`` at column ``k``.
    * ``layout="k4"`` (integer dot-product GEMV, AVX512-VNNI): ``[N//32, K//4, 64]``,
      byte ``[b, kq, 4*r + j]`` = rows ``b*32+r`` / ``b*32+16+r`` at column ``4*kq + j``
      (each 32-bit lane holds 4 consecutive k of one row, as ``vpdpbusd`` wants).

    Storage: 4 bits per weight + 16 bits per group (4.5 bits/weight for
    ``group_size=32``). Raises ``ValueError`` if ``N % 32 != 0``, ``K % group_size != 0``
    or (``k4``) ``group_size % 4 != 0``.
    """
    if layout not in ("k1", "k4"):
        raise ValueError(f"layout must be 'k1' or 'k4', got {layout!r}")
    if layout == "k4" and group_size % 4 != 0:
        raise ValueError(f"layout 'k4' needs group_size % 4 == 0, got {group_size}")
    w = _check_weight(w, group_size)
    n, k = w.shape
    g = k // group_size
    q, s16 = _int4_codes(w, group_size)
    u = (q + 8).astype(np.uint8)  # [N, K] in [0, 15]
    u = u.reshape(n // BLOCK_ROWS, BLOCK_ROWS, k).transpose(0, 2, 1)  # [NB, K, 32]
    packed = (u[:, :, :_HALF] | (u[:, :, _HALF:] << 4)).astype(np.uint8)
    scales = s16.reshape(n // BLOCK_ROWS, BLOCK_ROWS, g).transpose(0, 2, 1)  # [NB, G, 32]
    if layout == "k4":
        packed = int4_k1_to_k4(packed)
    return np.ascontiguousarray(packed), np.ascontiguousarray(scales)


def int4_k1_to_k4(packed: np.ndarray) -> np.ndarray:
    """Repack an INT4 weight from layout ``k1`` ``[NB, K, 16]`` to ``k4`` ``[NB, K//4, 64]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    nb, k, half = packed.shape
    if half != _HALF or k % 4 != 0:
        raise ValueError(f"expected a 'k1' INT4 weight [N//32, K, 16] with K % 4 == 0, got {packed.shape}")
    return np.ascontiguousarray(packed.reshape(nb, k // 4, 4, _HALF).transpose(0, 1, 3, 2).reshape(nb, k // 4, 64))


def int4_k4_to_k1(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`int4_k1_to_k4`."""
    packed = np.asarray(packed, dtype=np.uint8)
    nb, kq, lanes = packed.shape
    if lanes != 4 * _HALF:
        raise ValueError(f"expected a 'k4' INT4 weight [N//32, K//4, 64], got {packed.shape}")
    return np.ascontiguousarray(packed.reshape(nb, kq, _HALF, 4).transpose(0, 1, 3, 2).reshape(nb, kq * 4, _HALF))


def int4_layout(packed: np.ndarray) -> str:
    """``"k1"`` or ``"k4"``, from the shape of a packed INT4 weight."""
    shape = np.shape(packed)
    if len(shape) == 3 and shape[2] == _HALF:
        return "k1"
    if len(shape) == 3 and shape[2] == 4 * _HALF:
        return "k4"
    raise ValueError(f"not a packed INT4 weight: shape {shape}")


def unpack_int4_codes(packed: np.ndarray) -> np.ndarray:
    """Return the signed INT4 codes ``q[N, K]`` (int8, in [-8, 7]) of a packed tensor (either layout)."""
    if int4_layout(packed) == "k4":
        packed = int4_k4_to_k1(packed)
    packed = np.asarray(packed, dtype=np.uint8)
    nb, k, half = packed.shape
    lo = (packed & 0x0F).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    u = np.concatenate([lo, hi], axis=2)  # [NB, K, 32]
    return np.ascontiguousarray(u.transpose(0, 2, 1).reshape(nb * BLOCK_ROWS, k))


def dequantize_int4_groupwise(packed: np.ndarray, scales: np.ndarray, group_size: int = 32) -> np.ndarray:
    """Reference dequantization: ``(packed, scales)`` -> float32 ``W'[N, K]``."""
    q = unpack_int4_codes(packed).astype(np.float32)
    n, k = q.shape
    scales = np.asarray(scales)
    g = k // group_size
    if scales.shape != (n // BLOCK_ROWS, g, BLOCK_ROWS):
        raise ValueError(f"scales shape {scales.shape} does not match packed weight {packed.shape} "
                         f"with group_size={group_size}")
    s = scales.astype(np.float32).transpose(0, 2, 1).reshape(n, g)
    return (q.reshape(n, g, group_size) * s[:, :, None]).reshape(n, k)


def quantize_int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w[N, K]`` to symmetric per-output-channel INT8 in the blocked layout.

    Returns ``(packed, scales)``: ``packed`` int8 ``[N//32, K, 32]`` with
    ``packed[b, k, r] = q[b*32 + r, k]``; ``scales`` float32 ``[N]``.
    Raises ``ValueError`` if ``N % 32 != 0``.
    """
    w = _check_weight(w)
    n, k = w.shape
    q, s = _int8_codes(w)
    packed = q.reshape(n // BLOCK_ROWS, BLOCK_ROWS, k).transpose(0, 2, 1)
    return np.ascontiguousarray(packed), s


def dequantize_int8_per_channel(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Reference dequantization: ``(packed int8 [N//32, K, 32], scales [N])`` -> float32 ``W'[N, K]``."""
    packed = np.asarray(packed)
    nb, k, r = packed.shape
    if r != BLOCK_ROWS:
        raise ValueError(f"packed INT8 weight must have shape [N//32, K, 32], got {packed.shape}")
    q = packed.transpose(0, 2, 1).reshape(nb * BLOCK_ROWS, k).astype(np.float32)
    return q * np.asarray(scales, dtype=np.float32)[:, None]


# ------------------------------------------------------------------ row layouts (embedding tables)
#
# An embedding lookup reads whole rows, so tables are stored row-major (one row's codes and
# scales contiguous) with the same quantization rules as the linear weights:
#
#   INT4 rows: packed uint8 [N, K // 2], byte [n, j] = u(n, 2j) | (u(n, 2j + 1) << 4), u = q + 8;
#              scales float16 [N, K // group_size]
#   INT8 rows: packed int8 [N, K] = q;  scales float32 [N]  (per row)
#
# N (the vocabulary) needs no padding; K must be a multiple of the group size (INT4).


def _check_rows(w: np.ndarray, group_size: int | None = None) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"embedding table must be 2-D [rows, width], got shape {w.shape}")
    if group_size is not None and (group_size <= 0 or group_size % 2 or w.shape[1] % group_size):
        raise ValueError(f"width {w.shape[1]} must be a multiple of an even group_size = {group_size}")
    return np.ascontiguousarray(w, dtype=np.float32)


def quantize_int4_rows(w: np.ndarray, group_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a table ``w[N, K]`` to INT4 row layout: ``(packed uint8 [N, K//2], scales float16 [N, K//gs])``.

    Same codes and scales as :func:`quantize_int4_groupwise` (4.5 bits per element for gs 32)."""
    w = _check_rows(w, group_size)
    q, s16 = _int4_codes(w, group_size)
    u = (q + 8).astype(np.uint8)
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), np.ascontiguousarray(s16)


def dequantize_int4_rows(packed: np.ndarray, scales: np.ndarray, group_size: int = 32) -> np.ndarray:
    """Reference dequantization of :func:`quantize_int4_rows`: float32 ``[N, K]``."""
    packed = np.asarray(packed, dtype=np.uint8)
    n, half = packed.shape
    k = 2 * half
    scales = np.asarray(scales)
    if scales.shape != (n, k // group_size):
        raise ValueError(f"scales shape {scales.shape} does not match INT4 rows {packed.shape} "
                         f"with group_size={group_size}")
    q = np.empty((n, k), np.float32)
    q[:, 0::2] = (packed & 0x0F).astype(np.float32) - 8
    q[:, 1::2] = (packed >> 4).astype(np.float32) - 8
    s = scales.astype(np.float32)
    return (q.reshape(n, k // group_size, group_size) * s[:, :, None]).reshape(n, k)


def quantize_int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a table ``w[N, K]`` to INT8 rows: ``(codes int8 [N, K], scales float32 [N])``
    (the rule of :func:`quantize_int8_per_channel`, unblocked)."""
    q, s = _int8_codes(_check_rows(w))
    return np.ascontiguousarray(q), s


def dequantize_int8_rows(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Reference dequantization of :func:`quantize_int8_rows`: float32 ``[N, K]``."""
    return np.asarray(packed).astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


def packed_nbytes(packed: np.ndarray, scales: np.ndarray) -> int:
    """Bytes a kernel must read for one weight: packed codes plus scales."""
    return int(np.asarray(packed).nbytes + np.asarray(scales).nbytes)
