"""What a format stores for one weight, and the fp32 weight the kernels compute from it.

:func:`store_weight` quantizes an fp32 weight with the compiler's own quantizer for its
format and layout (``params.linear_scheme`` / ``params.embedding_scheme``: the same
padding, the same ``kernels/quant.py`` rule and search), :func:`store_codes` packs codes
chosen elsewhere (GPTQ) with the kernels' packers, and :meth:`StoredWeight.dequantize`
gives the weight back through the kernels' reference dequantizer, bit for bit what the
kernels compute with. Fake quantization (:mod:`.evaluate`) is ``dequantize(store(w))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels import (
    pack_int4_asym,
    pack_int4_asym_rows,
    pack_int4_groupwise,
    pack_int4_rows,
    pack_int8_groupwise,
    pack_int8_groupwise_rows,
)
from .params import dequantize_weight, embedding_scheme, linear_scheme, quantize_weight
from .recipe import WeightFormat

_PACKERS = {  # (kind, use) -> packer of row-major codes, scales[, mins]
    ("int4", "linear"): pack_int4_groupwise,
    ("int4_asym", "linear"): pack_int4_asym,
    ("int8_group", "linear"): pack_int8_groupwise,
    ("int4", "table"): pack_int4_rows,
    ("int4_asym", "table"): pack_int4_asym_rows,
    ("int8_group", "table"): pack_int8_groupwise_rows,
}


@dataclass
class StoredWeight:
    """The stored parts of one weight (``parts``: packed, scales[, mins] as the kernels read
    them) and how to read them back (``quantizer`` and ``args`` of ``quant/params.py``);
    ``shape`` is the unpadded ``[N, K]``. An fp32 weight has ``quantizer`` None and the
    weight itself as its only part. ``codes``: GPTQ's codes before packing (a compile
    carries them into its own layout, ``quant/calibrated.py``), else None."""

    fmt: WeightFormat
    use: str
    shape: tuple
    quantizer: str | None
    args: dict
    parts: tuple
    codes: object = None  # codes an algorithm chose (gptq.GPTQCodes, unpadded N), unpacked

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes + scales (+ mins), padding included)."""
        return int(sum(np.asarray(p).nbytes for p in self.parts))

    def dequantize(self) -> np.ndarray:
        """float32 ``[N, K]``: what the kernels compute with (padding removed)."""
        if self.quantizer is None:
            return np.asarray(self.parts[0], np.float32)
        return dequantize_weight(self.parts, self.quantizer, self.args, self.shape)


def scheme_of(fmt: WeightFormat, shape: tuple, use: str = "linear"):
    """The compiler's storage scheme (``params.LinearScheme`` / ``EmbeddingScheme``) of a
    weight ``shape`` in ``fmt`` and ``use`` (``linear`` | ``table``). Requires a quantized fmt."""
    n, k = shape
    gs = fmt.group_size or 32
    if use == "table":
        return embedding_scheme(fmt.kind, n, k, gs, search=fmt.search)
    return linear_scheme(fmt.kind, n, k, gs, search=fmt.search)


def padded_shape(fmt: WeightFormat, shape: tuple, use: str = "linear") -> tuple:
    """``(N, K)`` as stored: N padded to 32 (linear layout), K to the group size / 32."""
    if not fmt.quantized:
        return tuple(shape)
    s = scheme_of(fmt, shape, use)
    return (getattr(s, "n_pad", s.n), s.k_pad)


def store_weight(w: np.ndarray, fmt: WeightFormat, use: str = "linear") -> StoredWeight:
    """Quantize fp32 ``w[N, K]`` to ``fmt`` (round to nearest, with ``fmt.search`` if set) in
    the layout of ``use``: exactly the compiler's parameter conversion. (``fmt.method`` is
    ignored here: GPTQ codes come through :func:`store_codes`.)"""
    w = np.asarray(w, np.float32)
    if not fmt.quantized:
        return StoredWeight(fmt, use, w.shape, None, {}, (w,))
    s = scheme_of(fmt, w.shape, use)
    args = s.args()
    return StoredWeight(fmt, use, w.shape, s.quantizer, args, quantize_weight(w, s.quantizer, args))


def store_codes(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, fmt: WeightFormat,
                shape: tuple, use: str = "linear") -> StoredWeight:
    """Pack codes chosen by an algorithm with the kernels' packers, unchanged.

    Requires ``codes`` ``[N_pad, K_pad]`` (:func:`padded_shape`; uint8 ``u`` in 0..15 for
    INT4 -- ``q + 8`` for ``int4`` --, int8 for ``int8_group``), float16 ``scales`` (and
    ``mins`` for ``int4_asym``) ``[N_pad, K_pad // group_size]``; ``shape`` the unpadded
    ``[N, K]``. Ensures ``dequantize()`` is ``s * (u - 8)`` / ``s * u + m`` / ``s * q`` of these
    values (padding removed). Raises ``ValueError`` for a format without a packer (per-channel
    ``int8``) or mismatched shapes."""
    key = (fmt.kind, use)
    if key not in _PACKERS:
        raise ValueError(f"format {fmt.kind!r} ({use}) has no packer of group-wise codes")
    s = scheme_of(fmt, shape, use)
    want = padded_shape(fmt, shape, use)
    if tuple(np.shape(codes)) != want:
        raise ValueError(f"codes shape {np.shape(codes)} must be the padded {want}")
    parts = (codes, scales) if mins is None else (codes, scales, mins)
    if (mins is None) != (fmt.kind != "int4_asym"):
        raise ValueError(f"format {fmt.kind!r} {'needs' if mins is None else 'has no'} mins")
    return StoredWeight(fmt, use, tuple(shape), s.quantizer, s.args(), tuple(_PACKERS[key](*parts)))


def fake_quantize(w: np.ndarray, fmt: WeightFormat, use: str = "linear") -> np.ndarray:
    """``store_weight(w, fmt, use).dequantize()``: the fp32 weight a build computes with."""
    return store_weight(w, fmt, use).dequantize()
