"""The compiler's own CPU kernels for linear layers (INT4 / INT8 / FP32) and embeddings.

* :mod:`.quant` -- numpy quantizers and packers that produce the packed weight layouts
  (symmetric and asymmetric group-wise INT4, per-channel and group-wise INT8, row layouts
  for embedding tables; GGUF Q4_0 / Q4_1 / Q8_0 codes repack without rounding).
* :mod:`.search` -- the INT4 scale search as a compiled kernel (bit for bit its numpy reference).
* :mod:`.linear` -- TIR PrimFunc builders that read those layouts (GEMV for decode,
  tiled GEMM for prefill), ready for ``R.call_tir`` in a Relax module.
* :mod:`.linear_a8` -- int8-activation kernels (the ``w4a8`` / ``w8a8`` modes): the per-token
  activation pre-pass and integer dot-product GEMV/GEMM per ISA (VNNI, sdot, smmla, generic).
* :mod:`.embedding` -- the gather kernel over the row layouts.

See ``docs/kernels.md`` for layouts, schedules and measured bandwidth.
"""

from .quant import (
    BLOCK_ROWS,
    SEARCH_SHRINK,
    dequantize_int4_asym,
    dequantize_int4_asym_rows,
    dequantize_int4_groupwise,
    dequantize_int4_rows,
    dequantize_int8_groupwise,
    dequantize_int8_groupwise_rows,
    dequantize_int8_per_channel,
    dequantize_int8_rows,
    int4_k1_to_k4,
    int4_k4_to_k1,
    int4_layout,
    pack_int4_asym,
    pack_int4_asym_rows,
    pack_int4_groupwise,
    pack_int4_rows,
    pack_int8_groupwise,
    pack_int8_groupwise_rows,
    packed_nbytes,
    q4_0_as_asym,
    quantize_int4_asym,
    quantize_int4_asym_rows,
    quantize_int4_groupwise,
    quantize_int4_rows,
    quantize_int8_groupwise,
    quantize_int8_groupwise_rows,
    quantize_int8_per_channel,
    quantize_int8_rows,
    unpack_int4_codes,
    unpack_int4_nibbles,
)
from .embedding import KINDS as EMBEDDING_KINDS, embedding_gather
from .linear import AARCH64_TARGET, DEFAULT_M_TILE, fp32_linear, host_target, int4_linear, int8_linear
from .linear_a8 import (ISAS as DOT_ISAS, a8_linear_reference, act_sums, dot_isa, int4_a8_linear, int8_a8_linear,
                        int8_k1_to_k4, int8_k4_to_k1, quantize_act_int8, quantize_act_rows)

__all__ = [
    "BLOCK_ROWS",
    "AARCH64_TARGET",
    "DEFAULT_M_TILE",
    "SEARCH_SHRINK",
    # INT4 symmetric (GGUF Q4_0)
    "quantize_int4_groupwise",
    "pack_int4_groupwise",
    "dequantize_int4_groupwise",
    "unpack_int4_codes",
    "unpack_int4_nibbles",
    "int4_k1_to_k4",
    "int4_k4_to_k1",
    "int4_layout",
    # INT4 asymmetric (GGUF Q4_1)
    "quantize_int4_asym",
    "pack_int4_asym",
    "dequantize_int4_asym",
    "q4_0_as_asym",
    # INT8 per channel and group-wise (GGUF Q8_0)
    "quantize_int8_per_channel",
    "dequantize_int8_per_channel",
    "quantize_int8_groupwise",
    "pack_int8_groupwise",
    "dequantize_int8_groupwise",
    "packed_nbytes",
    # row layouts (embedding tables)
    "quantize_int4_rows",
    "pack_int4_rows",
    "dequantize_int4_rows",
    "quantize_int4_asym_rows",
    "pack_int4_asym_rows",
    "dequantize_int4_asym_rows",
    "quantize_int8_rows",
    "dequantize_int8_rows",
    "quantize_int8_groupwise_rows",
    "pack_int8_groupwise_rows",
    "dequantize_int8_groupwise_rows",
    # kernels
    "EMBEDDING_KINDS",
    "embedding_gather",
    "int4_linear",
    "int8_linear",
    "fp32_linear",
    "host_target",
    # int8 activations (w4a8 / w8a8)
    "DOT_ISAS",
    "dot_isa",
    "quantize_act_int8",
    "quantize_act_rows",
    "act_sums",
    "int4_a8_linear",
    "int8_a8_linear",
    "a8_linear_reference",
    "int8_k1_to_k4",
    "int8_k4_to_k1",
]
