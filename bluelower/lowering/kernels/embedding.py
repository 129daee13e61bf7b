"""Embedding lookup over a quantized table (``QuantizeWeights``, ``--quant w8 / w4a16*``).

``embedding_gather(kind, rows, width, n_ids)`` builds a TIR PrimFunc (private, destination
passing) that replaces ``R.take(table, ids, axis=0)``::

    out[t, k] = dequant(table)[ids[t], k]          t < n_ids, k < width

reading only the ``n_ids`` rows it returns from the row layouts of
:mod:`bluelower.lowering.kernels.quant` (``quantize_int4_rows`` / ``quantize_int8_rows`` /
``quantize_int4_asym_rows`` / ``quantize_int8_groupwise_rows``, or their ``pack_*`` forms):

* ``int4``: ``ids`` [n_ids], ``packed`` uint8 ``[rows, width_pad // 2]``, ``scales`` float16
  ``[rows, width_pad // group_size]``; ``out = float32(code - 8) * float32(scale)``.
* ``int4_asym`` (GGUF Q4_1): ``ids``, ``packed`` as ``int4`` (the unsigned code ``u``),
  ``scales`` and ``mins`` float16 ``[rows, width_pad // group_size]``;
  ``out = float32(u) * float32(scale) + float32(min)``.
* ``int8``: ``ids`` [n_ids], ``packed`` int8 ``[rows, width_pad]``, ``scales`` float32
  ``[rows]``; ``out = float32(code) * scale``.
* ``int8_groupwise`` (GGUF Q8_0): ``ids``, ``packed`` as ``int8``, ``scales`` float16
  ``[rows, width_pad // group_size]``; ``out = float32(code) * float32(scale)``.

Every product is exact in float32 (at most 11 + 8 significant bits) and ``int4_asym``
rounds its sum once (as a fused multiply-add would), so the result equals the numpy
reference dequantization bit for bit. Every id must lie in ``[0, rows)``: the kernel
checks all of them first and fails with "token id out of range of the embedding table"
before reading any row (the fp32 ``R.take(..., mode="fast")`` it replaces does no check
at all).
"""

from __future__ import annotations

import json

from tvm import tirx
from tvm.script import tirx as T

_OPAQUE = 8  # FuseOps leaves the kernel alone
ERROR = "token id out of range of the embedding table"
KINDS = ("int4", "int4_asym", "int8", "int8_groupwise")


def embedding_gather(kind: str, rows: int, width: int, n_ids: int, group_size: int = 32,
                     width_pad: int | None = None, index_dtype: str = "int64") -> tirx.PrimFunc:
    """The gather kernel for a ``kind`` (one of :data:`KINDS`) table of ``rows x width``
    (stored ``width_pad`` wide, zero-padded) and ``n_ids`` ids. Parameters in call order:
    ``ids``, ``packed``, ``scales``, ``mins`` (``int4_asym`` only), output ``out`` float32
    ``[n_ids, width]``. The INT4 kinds need an even ``group_size`` dividing ``width_pad``,
    ``int8_groupwise`` one dividing it."""
    width_pad = width if width_pad is None else int(width_pad)
    V, K, KP, N = int(rows), int(width), int(width_pad), int(n_ids)
    if min(V, K, N) < 1 or KP < K:
        raise ValueError(f"embedding_gather: bad shape rows={V} width={K} width_pad={KP} n_ids={N}")
    if kind not in KINDS:
        raise ValueError(f"embedding_gather: unknown kind {kind!r} ({' | '.join(KINDS)})")
    grouped = kind != "int8"
    if kind.startswith("int4") and (group_size <= 0 or group_size % 2 or KP % group_size):
        raise ValueError(f"embedding_gather: width_pad {KP} must be a multiple of an even group size {group_size}")
    if kind == "int8_groupwise" and (group_size <= 0 or KP % group_size):
        raise ValueError(f"embedding_gather: width_pad {KP} must be a multiple of the group size {group_size}")
    f = _gather(kind, V, K, KP, N, int(group_size) if grouped else 1, index_dtype)
    args = dict(kind=kind, rows=V, width=K, width_pad=KP, n_ids=N, group_size=int(group_size) if grouped else 0,
                index_dtype=index_dtype)
    return (f.with_attr("op_pattern", _OPAQUE)
            .with_attr("bluelower.kernel", kernel_name(kind, V, K, N, group_size))
            .with_attr("bluelower.kernel_args", json.dumps(args, sort_keys=True)))


def kernel_name(kind: str, rows: int, width: int, n_ids: int, group_size: int = 32) -> str:
    suffix = f"_g{group_size}" if kind != "int8" else ""
    return f"embedding_gather_{kind}_{n_ids}x{rows}x{width}{suffix}"


def _int4_element(packed, scales, row, byte, col, gs, high: bool, mins=None):
    """Column ``col`` from the low or high nibble of ``packed[row, byte]``:
    ``float32(u - 8) * float32(scale)``, or with ``mins`` ``float32(u) * float32(scale) + float32(min)``."""
    u = packed[row, byte] >> T.uint8(4) if high else packed[row, byte] & T.uint8(15)
    if mins is None:
        return T.Cast("float32", T.Cast("int32", u) - 8) * T.Cast("float32", scales[row, col // gs])
    return T.Cast("float32", u) * T.Cast("float32", scales[row, col // gs]) + T.Cast("float32", mins[row, col // gs])


def _int8_scale(scales, row, col, gs, grouped: bool):
    return T.Cast("float32", scales[row, col // gs]) if grouped else scales[row]


def _gather(kind, V, K, KP, N, gs, index_dtype):
    """Every kind: the id check, then ``out[t] = dequant(row ids[t])`` in the row layout of ``kind``."""
    int4, asym, grouped = kind.startswith("int4"), kind == "int4_asym", kind != "int8"
    KH = K // 2  # INT4: full bytes of the output row; an odd width takes the low nibble of one more
    packed_spec = ((V, KP // 2), "uint8") if int4 else ((V, KP), "int8")
    scales_spec = ((V, KP // gs), "float16") if grouped else ((V,), "float32")

    @T.prim_func(private=True)
    def f(
        ids: T.Buffer((N,), index_dtype),
        packed: T.Buffer(packed_spec[0], packed_spec[1]),
        scales: T.Buffer(scales_spec[0], scales_spec[1]),
        mins: T.Buffer(scales_spec[0], "float16"),
        out: T.Buffer((N, K), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        for t in range(N):
            assert 0 <= ids[t] and ids[t] < T.Cast(index_dtype, V), ERROR
        if int4:
            for t in range(N):
                for j in range(KH):
                    out[t, 2 * j] = _int4_element(packed, scales, ids[t], j, 2 * j, gs, False, mins if asym else None)
                    out[t, 2 * j + 1] = _int4_element(packed, scales, ids[t], j, 2 * j + 1, gs, True,
                                                      mins if asym else None)
                for j in range(K - 2 * KH):  # odd width: the last column
                    out[t, K - 1] = _int4_element(packed, scales, ids[t], KH + j, K - 1, gs, False,
                                                  mins if asym else None)
        else:
            for t in range(N):
                for k in range(K):
                    out[t, k] = T.Cast("float32", packed[ids[t], k]) * _int8_scale(scales, ids[t], k, gs, grouped)

    if not asym:  # written with every parameter; the others have no mins
        f = tirx.PrimFunc([p for p in f.params if p.name != "mins"], f.body, f.ret_type, f.attrs)
    return f
