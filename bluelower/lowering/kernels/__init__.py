"""The compiler's own CPU kernels for linear layers (INT4 / INT8 / FP32).

* :mod:`.quant` -- numpy quantizers that produce the packed weight layouts.
* :mod:`.linear` -- TIR PrimFunc builders that read those layouts (GEMV for decode,
  tiled GEMM for prefill), ready for ``R.call_tir`` in a Relax module.

See ``docs/kernels.md`` for layouts, schedules and measured bandwidth.
"""

from .quant import (
    BLOCK_ROWS,
    dequantize_int4_groupwise,
    dequantize_int4_rows,
    dequantize_int8_per_channel,
    dequantize_int8_rows,
    int4_k1_to_k4,
    int4_k4_to_k1,
    int4_layout,
    packed_nbytes,
    quantize_int4_groupwise,
    quantize_int4_rows,
    quantize_int8_per_channel,
    quantize_int8_rows,
    unpack_int4_codes,
)
from .embedding import embedding_gather
from .linear import AARCH64_TARGET, DEFAULT_M_TILE, fp32_linear, host_target, int4_linear, int8_linear

__all__ = [
    "BLOCK_ROWS",
    "AARCH64_TARGET",
    "DEFAULT_M_TILE",
    "quantize_int4_groupwise",
    "dequantize_int4_groupwise",
    "unpack_int4_codes",
    "int4_k1_to_k4",
    "int4_k4_to_k1",
    "int4_layout",
    "quantize_int8_per_channel",
    "dequantize_int8_per_channel",
    "packed_nbytes",
    "quantize_int4_rows",
    "dequantize_int4_rows",
    "quantize_int8_rows",
    "dequantize_int8_rows",
    "embedding_gather",
    "int4_linear",
    "int8_linear",
    "fp32_linear",
    "host_target",
]
