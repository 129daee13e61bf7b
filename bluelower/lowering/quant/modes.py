"""The ``--quant`` modes: the one definition every command, pass and report reads.

A mode says, for each weight *role* (the ModelSpec gives every weight one: see
``lowering/models/registry.py``), which stored format its linear layers / lookups get, and
what the KV cache is stored as:

| mode | attention, mlp, lm_head, token embedding | vision, projector | KV cache |
|---|---|---|---|
| ``fp32`` | fp32 | fp32 | float32 |
| ``w8`` | INT8 | INT8 | float32 |
| ``w4a16`` | INT4 (group-wise) | INT8 | float32 |
| ``w4a16kv8`` (default) | INT4 (group-wise) | INT8 | INT8 per token and head |
| ``w4a8`` | INT4 (group-wise), int8 activations | INT8, int8 activations (w8a8) | float32 |
| ``w4a8kv8`` | as ``w4a8`` | as ``w4a8`` | INT8 per token and head |
| ``w8a8`` | INT8, int8 activations | INT8, int8 activations | float32 |

``a8`` modes (``activations == "int8"``): every quantized linear layer quantizes its input
per token (dynamic, symmetric int8, one float32 scale per row) and multiplies with integer
dot products (``lowering/kernels/linear_a8.py``); weights are stored in the ``k4`` layout.
Roles not listed (norms, biases, the position embedding, the patch-embedding Conv2D) stay
fp32 in every mode. The INT8 KV-cache row layout is :data:`KV_INT8_LAYOUT`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import BlueLowerError
from ..kernels.attention import KV_SCALE_BYTES  # the row layout the INT8-cache kernels implement

#: Weight roles a ModelSpec assigns (``weight_role``); only the first six are quantizable.
ROLES = ("attention", "mlp", "lm_head", "embedding", "vision", "projector", "position_embedding", "norm", "other")
DECODER_ROLES = ("attention", "mlp", "lm_head", "embedding")
VISION_ROLES = ("vision", "projector")

DEFAULT_QUANT = "w4a16kv8"
DEFAULT_GROUP_SIZE = 32  # INT4 group size along K

KV_INT8_LAYOUT = ("int8 [L, 2 (k, v), kv_heads, capacity, head_dim + 4]: per row head_dim symmetric int8 codes "
                  "(clip(round(x / scale), -127, 127)), then the row's float32 scale = max|x| / 127 as 4 little-endian bytes")


@dataclass(frozen=True)
class QuantMode:
    name: str
    decoder: str | None  # format of the decoder roles' weights: "int4" | "int8" | None (fp32)
    vision: str | None  # format of the vision tower's and projector's weights
    kv_cache: str  # "float32" | "int8"
    act_bytes: int  # bytes per activation element the memory report plans (2: the APU's 16-bit activations)
    summary: str
    activations: str = "float32"  # the quantized linear layers' inputs: "float32" | "int8" (per token, dynamic)

    def weight_format(self, role: str) -> str | None:
        """The stored format of a linear / embedding weight of ``role`` (None: fp32)."""
        if role in DECODER_ROLES:
            return self.decoder
        if role in VISION_ROLES:
            return self.vision
        return None

    @property
    def quantizes_weights(self) -> bool:
        return self.decoder is not None or self.vision is not None

    @property
    def weight_layout(self) -> str:
        """The packed layout of the linear weights: ``k4`` (4 k per 32-bit lane) for the
        integer dot products of the ``a8`` modes, else ``k1``."""
        return "k4" if self.activations == "int8" else "k1"


MODES = {
    "fp32": QuantMode("fp32", None, None, "float32", 4, "fp32 weights"),
    "w8": QuantMode("w8", "int8", "int8", "float32", 4, "INT8 per channel everywhere"),
    "w4a16": QuantMode("w4a16", "int4", "int8", "float32", 2, "decoder INT4 (group-wise) + ViT/projector INT8"),
    "w4a16kv8": QuantMode("w4a16kv8", "int4", "int8", "int8", 2,
                          "w4a16 + INT8 KV cache (per-token, per-head scales)"),
    "w4a8": QuantMode("w4a8", "int4", "int8", "float32", 2,
                      "decoder INT4 + ViT/projector INT8, int8 activations per token (integer dot products)", "int8"),
    "w4a8kv8": QuantMode("w4a8kv8", "int4", "int8", "int8", 2, "w4a8 + INT8 KV cache (per-token, per-head scales)",
                         "int8"),
    "w8a8": QuantMode("w8a8", "int8", "int8", "float32", 2,
                      "INT8 per channel everywhere, int8 activations per token (integer dot products)", "int8"),
}
QUANT_MODES = tuple(MODES)


def quant_mode(name: str) -> QuantMode:
    """The mode called ``name``; a one-line error naming the valid ones otherwise."""
    if name not in MODES:
        raise BlueLowerError(f"unknown --quant '{name}' (valid: {', '.join(QUANT_MODES)})")
    return MODES[name]


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, kv_dtype: str,
                   float_bytes: int = 4) -> dict:
    """Size of the KV cache ``[L, 2, kv_heads, capacity, head_dim]`` stored as ``kv_dtype``:
    ``int8`` in :data:`KV_INT8_LAYOUT` (codes + a float32 scale per row), else ``float_bytes``
    per element (4 in a build; the memory report plans 16-bit activations with 2)."""
    rows_per_token = num_layers * 2 * num_kv_heads
    per_row = head_dim + KV_SCALE_BYTES if kv_dtype == "int8" else head_dim * float_bytes
    per_token = rows_per_token * per_row
    return {"bytes_per_token": per_token, "bytes": per_token * capacity, "capacity": capacity}
