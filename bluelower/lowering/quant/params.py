"""Quantized weight parameters: which linear weights become which packed tensors, their
shapes, and the streaming conversion that writes them into ``params.safetensors``.

One policy serves both the :class:`~bluelower.passes.quantize_weights.QuantizeWeights`
pass (which rewrites the IR) and :func:`quantized_param_specs` (which computes the
parameter table from the meta-model's shapes, without materializing a weight), so the
manifest figures for a 3B model can be computed in a second and agree with a real build.

Naming: a linear weight ``S`` (e.g. ``language_model.lm_head.weight``) becomes two
parameters ``S.int4_packed`` / ``S.int4_scales`` (or ``.int8_packed`` / ``.int8_scales``).
In the Relax function they appear under the sanitized names (dots -> underscores), in the
order of the weight they replace.

Conversion (:func:`param_producer`) holds at most one fp32 weight and its quantized
form at a time: ``write_safetensors`` writes tensors in sorted name order, so the two
parts of one weight are written one after the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .modes import DEFAULT_GROUP_SIZE, DECODER_ROLES, VISION_ROLES, quant_mode
from ..kernels import (
    BLOCK_ROWS,
    int4_k1_to_k4,
    int4_k4_to_k1,
    dequantize_int4_asym,
    dequantize_int4_asym_rows,
    dequantize_int4_groupwise,
    dequantize_int4_rows,
    dequantize_int8_groupwise,
    dequantize_int8_groupwise_rows,
    dequantize_int8_per_channel,
    dequantize_int8_rows,
    pack_int4_asym,
    pack_int4_asym_rows,
    pack_int4_groupwise,
    pack_int4_rows,
    pack_int8_groupwise,
    pack_int8_groupwise_rows,
    quantize_int4_asym,
    quantize_int4_asym_rows,
    quantize_int4_groupwise,
    quantize_int4_rows,
    quantize_int8_groupwise,
    quantize_int8_groupwise_rows,
    quantize_int8_per_channel,
    quantize_int8_rows,
    int8_k1_to_k4,
    int8_k4_to_k1,
)



@dataclass(frozen=True)
class StorageFormat:
    """One way to store a quantized weight (``lowering/kernels/quant.py`` has the layouts):
    its linear-layer quantizer, its embedding-row quantizer and gather kind, and its parts."""

    kind: str
    linear_quantizer: str
    row_quantizer: str
    gather_kind: str
    grouped: bool  # per (row, group along K) scales: K padded to the group size
    with_mins: bool  # a third part: the groups' minimums (asymmetric)
    parts: tuple = ("packed", "scales")


#: kind -> format. ``int4``: symmetric group-wise (GGUF Q4_0's rule); ``int4_asym``: scale +
#: min per group (Q4_1's); ``int8``: per output channel; ``int8_group``: per group (Q8_0's).
FORMATS = {
    "int4": StorageFormat("int4", "int4_groupwise", "int4_rows", "int4", True, False),
    "int4_asym": StorageFormat("int4_asym", "int4_asym_groupwise", "int4_asym_rows", "int4_asym", True, True,
                               ("packed", "scales", "mins")),
    "int8": StorageFormat("int8", "int8_per_channel", "int8_rows", "int8", False, False),
    "int8_group": StorageFormat("int8_group", "int8_groupwise", "int8_groupwise_rows", "int8_groupwise", True, False),
}
#: a GGUF tensor type -> the format that stores its bits unchanged (group 32)
GGUF_FORMATS = {"q4_0": "int4", "q4_1": "int4_asym", "q8_0": "int8_group"}


def sanitize(name: str) -> str:
    """The Relax parameter name of a weight (the importers' rule)."""
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


@dataclass(frozen=True)
class LinearScheme:
    """How one ``W[N, K]`` linear weight is stored: a format kind and the padded shape."""

    kind: str
    n: int
    k: int
    n_pad: int
    k_pad: int
    group_size: int = 0  # grouped kinds only
    carry: str | None = None  # "q4_0" | "q4_1" | "q8_0": the checkpoint's own bits, packed, not re-quantized
    search: bool = False  # INT4 from fp weights: the error-minimizing scale/clip search
    layout: str = "k1"  # "k4": 4 k per 32-bit lane, the integer dot products' layout (the a8 modes)

    @property
    def format(self) -> StorageFormat:
        return FORMATS[self.kind]

    @property
    def quantizer(self) -> str:
        return self.format.linear_quantizer

    def args(self) -> dict:
        out = {}
        if self.format.grouped:
            out["group_size"] = self.group_size
        if self.n_pad != self.n:
            out["pad_n"] = self.n_pad
        if self.k_pad != self.k:
            out["pad_k"] = self.k_pad
        if self.carry:
            out["carry"] = self.carry
        if self.search:
            out["search"] = True
        if self.layout != "k1":
            out["layout"] = self.layout
        return out

    def part_specs(self) -> list[tuple[str, tuple, str]]:
        """``[(suffix, shape, dtype)]`` of the packed tensors, in kernel argument order."""
        nb, kind = self.n_pad // BLOCK_ROWS, self.kind
        groups = (nb, self.k_pad // self.group_size, BLOCK_ROWS) if self.format.grouped else None
        k4 = self.layout == "k4"
        if kind.startswith("int4"):
            packed = (nb, self.k_pad // 4, 2 * BLOCK_ROWS) if k4 else (nb, self.k_pad, BLOCK_ROWS // 2)
            out = [(f"{kind}_packed", packed, "uint8"), (f"{kind}_scales", groups, "float16")]
            return out + ([(f"{kind}_mins", groups, "float16")] if self.format.with_mins else [])
        scales = (f"{kind}_scales", groups, "float16") if groups else (f"{kind}_scales", (self.n_pad,), "float32")
        packed = (nb, self.k_pad // 4, 4 * BLOCK_ROWS) if k4 else (nb, self.k_pad, BLOCK_ROWS)
        return [(f"{kind}_packed", packed, "int8"), scales]


@dataclass(frozen=True)
class FormatChoice:
    """The decision for one weight: its format, group size, and whether its bits come from the
    checkpoint (``carry``: a GGUF type), from calibration (``carry`` ``"gptq"``: codes GPTQ
    chose, :mod:`.calibrated`) or are quantized here (``search``: INT4 scale search)."""

    kind: str
    group_size: int = DEFAULT_GROUP_SIZE
    carry: str | None = None
    search: bool = False


#: ``carry`` of a weight whose codes GPTQ chose (``compile --calibration``)
GPTQ_CARRY = "gptq"


def plain_recipe(quant: str, group_size: int = DEFAULT_GROUP_SIZE):
    """The mode's plain formats (``QuantMode.weight_format``: symmetric INT4 group-wise or INT8
    per channel for the decoder roles, INT8 for vision and projector; no search) as a recipe."""
    from .recipe import Recipe, Rule, weight_format

    mode = quant_mode(quant)
    rules = []
    if mode.vision is not None:
        rules.append(Rule(weight_format(mode.vision, group_size if mode.vision == "int4" else None),
                          roles=VISION_ROLES))
    if mode.decoder is not None:
        rules.append(Rule(weight_format(mode.decoder, group_size if mode.decoder == "int4" else None),
                          roles=DECODER_ROLES))
    return Recipe(tuple(rules), mode.kv_cache, f"the {quant} mode's plain formats", f"plain recipe {quant}")


def mode_recipe(quant: str, group_size: int = DEFAULT_GROUP_SIZE):
    """The recipe ``compile --quant quant`` stores weights by without ``--recipe``: the mode's
    default recipe (``recipe.DEFAULT_RULES``, measured on SmolLM2 by
    ``benchmarks/quant_recipe.py``), its group-wise formats at ``group_size``."""
    from .recipe import default_recipe, with_group_size

    recipe = default_recipe(quant)
    return recipe if group_size == DEFAULT_GROUP_SIZE else with_group_size(recipe, group_size)


def format_policy(quant: str, recipe=None, *, group_size: int = DEFAULT_GROUP_SIZE, source_dtype=None):
    """The per-weight format decision QuantizeWeights takes (``formats=``), from a
    :class:`~bluelower.lowering.quant.recipe.Recipe` (default: :func:`mode_recipe`).

    ``choose(source, role, shape, use)`` returns None (the weight stays fp32) for a role the
    mode leaves fp32 (``fp32`` leaves all; norms, biases, the position embedding in every
    mode) and for a weight the recipe gives ``fp32``; a tensor the checkpoint already stores
    quantized (``source_dtype(name)`` a GGUF type: Q4_0, Q4_1, Q8_0) keeps its own bits in the
    format that holds them unchanged (:data:`GGUF_FORMATS`), whatever format the recipe names
    (a 4-bit tensor cannot gain precision); otherwise the recipe's format, with ``carry``
    :data:`GPTQ_CARRY` when its method is ``gptq`` (linear uses: the build packs the codes
    calibration chose, never re-quantizes). The mode decides the KV cache and the
    activations; the recipe's ``kv_cache`` is not read here."""
    mode = quant_mode(quant)
    recipe = recipe if recipe is not None else mode_recipe(quant, group_size)

    def choose(source: str, role: str, shape: tuple, use: str) -> FormatChoice | None:
        if use == "table" and role != "embedding":
            return None
        if mode.weight_format(role) is None:
            return None
        fmt = recipe.format_for(source, role, use)
        if not fmt.quantized:
            return None
        native = (source_dtype(source) or "").lower() if source_dtype is not None else ""
        if native in GGUF_FORMATS and shape[-1] % 32 == 0:
            return FormatChoice(GGUF_FORMATS[native], 32, carry=native)
        carry = GPTQ_CARRY if fmt.method == "gptq" and use == "linear" else None
        return FormatChoice(fmt.kind, fmt.group_size or group_size, carry=carry, search=fmt.search)

    choose.recipe = recipe
    return choose


def _check_kind(kind: str, group_size: int) -> None:
    if kind not in FORMATS:
        raise ValueError(f"unknown weight format {kind!r} (valid: {', '.join(FORMATS)})")
    if FORMATS[kind].grouped and (group_size <= 0 or group_size % 4 != 0):
        raise ValueError(f"group size must be a positive multiple of 4, got {group_size}")


def linear_scheme(kind: str, n: int, k: int, group_size: int = DEFAULT_GROUP_SIZE, carry: str | None = None,
                  search: bool = False, layout: str = "k1") -> LinearScheme:
    """The storage of a linear weight ``[n, k]`` in format ``kind``. Shapes the kernels cannot
    take directly are zero-padded: N to a multiple of 32 (the output is sliced back), K to a
    multiple of 32 / the group size (the activation is padded with zeros; for ``k4`` also to a
    multiple of 16, the activation pre-pass's vector width). ``layout``: ``k1`` (the float
    kernels) or ``k4`` (the integer dot products of the a8 modes)."""
    _check_kind(kind, group_size)
    if layout not in ("k1", "k4"):
        raise ValueError(f"unknown weight layout {layout!r} (valid: k1, k4)")
    grouped = FORMATS[kind].grouped
    k_pad = _round_up(k, group_size) if grouped else _round_up(k, 32)
    if layout == "k4":
        k_pad = _round_up(k_pad, 16)
        if grouped and k_pad % group_size:
            raise ValueError(f"group size {group_size} and the k4 layout's multiple of 16 do not fit K = {k}")
    return LinearScheme(kind, n, k, _round_up(n, BLOCK_ROWS), k_pad, group_size if grouped else 0, carry, search,
                        layout)


def choose_scheme(role: str, n: int, k: int, quant: str, group_size: int = DEFAULT_GROUP_SIZE) -> LinearScheme | None:
    """The storage of a linear weight ``[n, k]`` of ``role`` in the mode's *plain* format (its
    ``QuantMode.weight_format``: symmetric INT4 / INT8 per channel, no search), or None (stays
    fp32); the layout is the mode's. QuantizeWeights' decision without ``formats`` (a compile
    decides by a recipe: :func:`format_policy`)."""
    mode = quant_mode(quant)
    kind = mode.weight_format(role)
    return None if kind is None else linear_scheme(kind, n, k, group_size, layout=mode.weight_layout)


def policy_scheme(choice: "FormatChoice | None", shape: tuple, use: str, layout: str = "k1"):
    """The :class:`LinearScheme` (``use`` ``linear``) / :class:`EmbeddingScheme` (``table``) of a
    :func:`format_policy` decision, or None."""
    if choice is None:
        return None
    if use == "table":
        return embedding_scheme(choice.kind, *shape, choice.group_size, choice.carry, choice.search)
    return linear_scheme(choice.kind, *shape, choice.group_size, choice.carry, choice.search, layout=layout)


@dataclass(frozen=True)
class EmbeddingScheme:
    """How a ``[rows, width]`` embedding table is stored: the row layout of a format (a
    lookup dequantizes only the rows it gathers), the width zero-padded to the group size."""

    kind: str
    n: int  # rows (vocabulary)
    k: int  # width (hidden size)
    k_pad: int
    group_size: int = 0  # grouped kinds only
    carry: str | None = None
    search: bool = False

    @property
    def format(self) -> StorageFormat:
        return FORMATS[self.kind]

    @property
    def quantizer(self) -> str:
        return self.format.row_quantizer

    def args(self) -> dict:
        out = {"group_size": self.group_size} if self.format.grouped else {}
        if self.k_pad != self.k:
            out["pad_k"] = self.k_pad
        if self.carry:
            out["carry"] = self.carry
        if self.search:
            out["search"] = True
        return out

    def part_specs(self) -> list[tuple[str, tuple, str]]:
        kind, n = self.kind, self.n
        groups = (n, self.k_pad // self.group_size) if self.format.grouped else None
        if kind.startswith("int4"):
            out = [(f"{kind}_rows_packed", (n, self.k_pad // 2), "uint8"), (f"{kind}_rows_scales", groups, "float16")]
            return out + ([(f"{kind}_rows_mins", groups, "float16")] if self.format.with_mins else [])
        scales = (f"{kind}_rows_scales", groups, "float16") if groups else (f"{kind}_rows_scales", (n,), "float32")
        return [(f"{kind}_rows_packed", (n, self.k_pad), "int8"), scales]


def embedding_scheme(kind: str, rows: int, width: int, group_size: int = DEFAULT_GROUP_SIZE,
                     carry: str | None = None, search: bool = False) -> EmbeddingScheme:
    _check_kind(kind, group_size)
    grouped = FORMATS[kind].grouped
    k_pad = _round_up(width, group_size) if grouped else width
    return EmbeddingScheme(kind, rows, width, k_pad, group_size if grouped else 0, carry, search)


def choose_embedding_scheme(role: str, rows: int, width: int, quant: str,
                            group_size: int = DEFAULT_GROUP_SIZE) -> EmbeddingScheme | None:
    """The storage of an embedding table of ``role`` under ``quant`` in the mode's plain format
    (as :func:`choose_scheme`), or None (stays fp32).

    Token-embedding tables (role ``embedding``) get the mode's decoder format; other tables
    (the ViT's position embedding) stay fp32."""
    if role != "embedding":
        return None
    kind = quant_mode(quant).weight_format(role)
    return None if kind is None else embedding_scheme(kind, rows, width, group_size)


@dataclass(frozen=True)
class ParamTransform:
    """New parameter ``name`` = part ``part`` (0 packed, 1 scales) of ``quantizer(source)``."""

    source: str
    quantizer: str
    part: int
    args: dict = field(default_factory=dict, hash=False, compare=False)
    shape: tuple = ()
    dtype: str = ""

    def to_json(self) -> list:
        """The manifest's ``quantization.params`` entry."""
        return [self.source, self.quantizer, dict(self.args)]

    def to_result(self) -> list:
        """The form QuantizeWeights attaches to the module (``quantized_params``)."""
        return [self.source, self.quantizer, self.part, dict(self.args), list(self.shape), self.dtype]

    @classmethod
    def from_result(cls, r: list) -> "ParamTransform":
        return cls(r[0], r[1], int(r[2]), dict(r[3]), tuple(int(x) for x in r[4]), str(r[5]))


def scheme_params(source: str, scheme: "LinearScheme | EmbeddingScheme") -> list[tuple[str, tuple, str, ParamTransform]]:
    """``[(new name, shape, dtype, transform)]`` replacing weight ``source``."""
    return [(f"{source}.{suffix}", shape, dtype, ParamTransform(source, scheme.quantizer, i, scheme.args(), shape, dtype))
            for i, (suffix, shape, dtype) in enumerate(scheme.part_specs())]


# ------------------------------------------------------------------ conversion


_QUANTIZE = {
    "int4_groupwise": lambda w, a: quantize_int4_groupwise(w, int(a["group_size"]), search=bool(a.get("search"))),
    "int4_asym_groupwise": lambda w, a: quantize_int4_asym(w, int(a["group_size"]), search=bool(a.get("search"))),
    "int8_per_channel": lambda w, a: quantize_int8_per_channel(w),
    "int8_groupwise": lambda w, a: quantize_int8_groupwise(w, int(a["group_size"])),
    "int4_rows": lambda w, a: quantize_int4_rows(w, int(a["group_size"]), search=bool(a.get("search"))),
    "int4_asym_rows": lambda w, a: quantize_int4_asym_rows(w, int(a["group_size"]), search=bool(a.get("search"))),
    "int8_rows": lambda w, a: quantize_int8_rows(w),
    "int8_groupwise_rows": lambda w, a: quantize_int8_groupwise_rows(w, int(a["group_size"])),
}
_PACK = {  # quantizer -> packer of (codes, scales[, mins]) in the row-major [N, K] / [N, K/g] form
    "int4_groupwise": pack_int4_groupwise,
    "int4_asym_groupwise": pack_int4_asym,
    "int8_groupwise": pack_int8_groupwise,
    "int4_rows": pack_int4_rows,
    "int4_asym_rows": pack_int4_asym_rows,
    "int8_groupwise_rows": pack_int8_groupwise_rows,
}
_DEQUANTIZE = {
    "int4_groupwise": lambda p, a: dequantize_int4_groupwise(p[0], p[1], int(a["group_size"])),
    "int4_asym_groupwise": lambda p, a: dequantize_int4_asym(p[0], p[1], p[2], int(a["group_size"])),
    "int8_per_channel": lambda p, a: dequantize_int8_per_channel(p[0], p[1]),
    "int8_groupwise": lambda p, a: dequantize_int8_groupwise(p[0], p[1], int(a["group_size"])),
    "int4_rows": lambda p, a: dequantize_int4_rows(p[0], p[1], int(a["group_size"])),
    "int4_asym_rows": lambda p, a: dequantize_int4_asym_rows(p[0], p[1], p[2], int(a["group_size"])),
    "int8_rows": lambda p, a: dequantize_int8_rows(p[0], p[1]),
    "int8_groupwise_rows": lambda p, a: dequantize_int8_groupwise_rows(p[0], p[1], int(a["group_size"])),
}
QUANTIZERS = tuple(_QUANTIZE)


def _padded(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if a.shape == (rows, cols):
        return a
    out = np.zeros((rows, cols), a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def _to_layout(parts: tuple, quantizer: str, args: dict) -> tuple:
    """The packed codes (part 0) in the transform's ``layout`` (``k4``: repacked from ``k1``)."""
    if args.get("layout", "k1") == "k1":
        return parts
    if args["layout"] != "k4" or quantizer.endswith("_rows"):
        raise ValueError(f"{quantizer}: unknown layout {args['layout']!r}")
    packed = int4_k1_to_k4(parts[0]) if quantizer.startswith("int4") else int8_k1_to_k4(parts[0])
    return (packed, *parts[1:])


def _from_layout(parts: tuple, quantizer: str, args: dict) -> tuple:
    """Inverse of :func:`_to_layout` (the dequantizers read ``k1``)."""
    if args.get("layout", "k1") == "k1":
        return parts
    packed = int4_k4_to_k1(parts[0]) if quantizer.startswith("int4") else int8_k4_to_k1(parts[0])
    return (packed, *parts[1:])


def quantize_weight(w: np.ndarray, quantizer: str, args: dict) -> tuple:
    """Pad (if asked) and quantize one fp32 weight ``[N, K]``; return its parts
    (``packed, scales[, mins]``) in the transform's layout."""
    n, k = w.shape
    w = _padded(w, int(args.get("pad_n", n)), int(args.get("pad_k", k)))
    if quantizer not in _QUANTIZE:
        raise ValueError(f"unknown quantizer {quantizer!r}")
    return _to_layout(tuple(_QUANTIZE[quantizer](w, args)), quantizer, args)


def pack_quantized(q, quantizer: str, args: dict) -> tuple:
    """A checkpoint's own quantized tensor (``frontend.checkpoints.QuantizedTensor``: codes,
    float16 scales and mins per group of 32 along K) packed for the kernels, bit for bit, with
    zero rows/columns of padding (they dequantize to 0)."""
    if quantizer not in _PACK:
        raise ValueError(f"{quantizer} cannot carry a checkpoint's quantized bits")
    n, k = q.shape
    rows, cols = int(args.get("pad_n", n)), int(args.get("pad_k", k))
    g = int(args["group_size"])
    if q.group_size != g or cols % g:
        raise ValueError(f"a {q.kind} tensor has groups of {q.group_size}, the format {g}")
    parts = [_padded(q.codes, rows, cols), _padded(q.scales, rows, cols // g)]
    if quantizer.startswith("int4_asym"):
        parts.append(_padded(q.mins, rows, cols // g))
    return _to_layout(tuple(_PACK[quantizer](*parts)), quantizer, args)


def dequantize_weight(parts, quantizer: str, args: dict, shape: tuple) -> np.ndarray:
    """The fp32 ``[N, K]`` weight the kernel computes with (padding removed)."""
    if quantizer not in _DEQUANTIZE:
        raise ValueError(f"unknown quantizer {quantizer!r}")
    w = _DEQUANTIZE[quantizer](_from_layout(tuple(parts), quantizer, args), args)
    n, k = shape
    return np.ascontiguousarray(w[:n, :k])


def param_producer(transforms: dict, read_fp32: Callable[[str], np.ndarray],
                   read_quantized: Callable[[str], object] | None = None) -> Callable[[str], np.ndarray]:
    """``produce(name)`` for ``write_safetensors``: fp32 params are read as they are,
    quantized ones converted from their source weight, once per source weight (its parts,
    packed codes and scales, may be asked for from two threads at once: the first converts,
    the others wait; the parts are dropped when every one has been handed out). A transform
    with ``carry`` packs ``read_quantized(source)``, the checkpoint's own bits."""
    import threading
    from concurrent.futures import Future

    lock = threading.Lock()
    pending: dict = {}  # (source, quantizer) -> [Future of the parts, parts not yet handed out]
    parts_of: dict = {}

    def key(t: ParamTransform) -> tuple:  # a tied weight has two conversions (lookup rows, linear blocks)
        return (t.source, t.quantizer)

    for t in transforms.values():
        parts_of[key(t)] = parts_of.get(key(t), 0) + 1

    def produce(name: str) -> np.ndarray:
        t = transforms.get(name)
        if t is None:
            return read_fp32(name)
        with lock:
            entry = pending.get(key(t))
            owner = entry is None
            if owner:
                entry = pending[key(t)] = [Future(), parts_of[key(t)]]
        if owner:
            try:
                if t.args.get("carry"):
                    entry[0].set_result(pack_quantized(read_quantized(t.source), t.quantizer, t.args))
                else:
                    entry[0].set_result(quantize_weight(read_fp32(t.source), t.quantizer, t.args))
            except BaseException as exc:
                entry[0].set_exception(exc)
                raise
        out = entry[0].result()[t.part]
        with lock:
            entry[1] -= 1
            if entry[1] <= 0:
                pending.pop(key(t), None)
        return out

    produce.work_key = lambda name: key(transforms[name]) if name in transforms else name
    return produce


_PART_OF_SUFFIX = {"packed": 0, "scales": 1, "mins": 2}


def dequantized_state(params_path: str, manifest: dict, tied_linear: dict | None = None) -> dict:
    """Read a build's ``params.safetensors`` back as fp32 model weights (source names):
    quantized weights dequantized exactly as the kernels use them. For the PyTorch
    reference of a quantized build (``run --check``) and the accuracy report.

    A tied token table stored twice (lookup rows and the lm_head's linear layout) gets the
    linear layout's values, unless ``tied_linear`` is a dict and the two differ (the default
    recipe: INT4 rows for the lookups, INT8 for the logits): then the state holds the rows'
    values (what the lookups read) and ``tied_linear[source]`` the linear layout's (what the
    logits read)."""
    from ..frontend.weights import WeightSource

    src = WeightSource(params_path)
    table = manifest.get("quantization", {}).get("params", {})
    shapes = manifest.get("quantization", {}).get("source_shapes", {})
    out = {}
    by_conversion: dict = {}  # (source, quantizer) -> [parts, args]: a tied weight has two
    for new, (source, quantizer, args) in table.items():
        entry = by_conversion.setdefault((source, quantizer), [{}, args])
        entry[0][_PART_OF_SUFFIX[new.rsplit("_", 1)[-1]]] = new
    for name in src.names():
        if name in table:
            continue
        out[name] = src.read(name).astype(np.float32)
    # the linear layout first: a tied lm_head's values
    for (source, quantizer), (parts, args) in sorted(by_conversion.items(), key=lambda kv: kv[0][1].endswith("_rows")):
        arrays = [src.read(parts[i]) for i in sorted(parts)]
        if source in out:  # the lookup rows of a tied table whose linear layout came first
            if tied_linear is not None:
                rows = dequantize_weight(arrays, quantizer, args, tuple(shapes[source]))
                if not np.array_equal(rows, out[source]):
                    tied_linear[source], out[source] = out[source], rows
            continue
        out[source] = dequantize_weight(arrays, quantizer, args, tuple(shapes[source]))
    return out


# ------------------------------------------------------------------ specs from shapes


_SHAPES_MEMO: dict = {}


def _module_weight_shapes(cfg) -> tuple[dict, dict]:
    """``(linear, embedding)``: name -> shape of every ``nn.Linear`` / ``nn.Embedding``
    weight of the model (meta tensors, no memory; memoized per config)."""
    import json

    import torch

    from ..frontend.importer import build_meta_model

    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _SHAPES_MEMO:
        model = build_meta_model(cfg)
        linear, embedding = {}, {}
        for mname, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                linear[f"{mname}.weight"] = tuple(module.weight.shape)
            elif isinstance(module, torch.nn.Embedding):
                embedding[f"{mname}.weight"] = tuple(module.weight.shape)
        _SHAPES_MEMO[key] = (linear, embedding)
    linear, embedding = _SHAPES_MEMO[key]
    return dict(linear), dict(embedding)


def linear_weight_names(cfg) -> dict:
    """name -> (N, K) of every ``nn.Linear`` weight of the model (meta tensors, no memory)."""
    return _module_weight_shapes(cfg)[0]


def embedding_weight_names(cfg) -> dict:
    """name -> (rows, width) of every ``nn.Embedding`` table of the model."""
    return _module_weight_shapes(cfg)[1]


def quantized_param_specs(cfg, quant: str, group_size: int = DEFAULT_GROUP_SIZE, recipe=None):
    """The stored parameters of ``cfg`` under ``quant`` (the weights' formats: ``recipe``,
    default the mode's, :func:`format_policy`) from the model's shapes alone.

    Returns ``(specs, transforms)``: ``specs`` name -> (shape, dtype) for every stored
    parameter (unquantized weights keep their fp32 spec), ``transforms`` new name ->
    :class:`ParamTransform`. Assumes every ``nn.Linear`` weight is used only as a linear
    weight and every ``nn.Embedding`` table only by lookups (true for BlueLM-V), which is
    what QuantizeWeights finds in the IR.
    """
    from ..frontend.weights import model_weight_specs
    from ..models import spec_for

    specs = model_weight_specs(cfg)
    role = spec_for(cfg).weight_role
    linear, embedding = _module_weight_shapes(cfg)
    policy = format_policy(quant, recipe, group_size=group_size)
    layout = quant_mode(quant).weight_layout
    out, transforms = {}, {}
    for name, (shape, dtype) in specs.items():
        if name in linear:
            scheme = policy_scheme(policy(name, role(name), linear[name], "linear"), linear[name], "linear", layout)
        elif name in embedding:
            scheme = policy_scheme(policy(name, role(name), embedding[name], "table"), embedding[name], "table")
        else:
            scheme = None
        if scheme is None:
            out[name] = (tuple(shape), "float32")
            continue
        for new, nshape, ndtype, t in scheme_params(name, scheme):
            out[new] = (nshape, ndtype)
            transforms[new] = t
    return out, transforms


def nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def weight_bytes_by_part(cfg, quant: str, group_size: int = DEFAULT_GROUP_SIZE, recipe=None) -> dict:
    """Stored bytes: decoder linear weights (incl. lm_head), decoder embedding table,
    other decoder weights (norms), vision tower, projector; plus bits per decoder linear
    weight. From shapes only, in ``recipe``'s formats (default: the mode's, as a compile)."""
    from ..models import spec_for

    specs, transforms = quantized_param_specs(cfg, quant, group_size, recipe)
    linear = linear_weight_names(cfg)
    role = spec_for(cfg).weight_role
    part_of_role = {"embedding": "decoder_embedding", "vision": "vision", "position_embedding": "vision",
                    "projector": "projector"}
    parts = {"decoder_linear": 0, "decoder_embedding": 0, "decoder_other": 0, "vision": 0, "projector": 0}
    for name, (shape, dtype) in specs.items():
        source = transforms[name].source if name in transforms else name
        r = role(source)
        key = "decoder_linear" if r in DECODER_ROLES and source in linear else part_of_role.get(r, "decoder_other")
        parts[key] += nbytes(shape, dtype)
    n_dec = sum(n * k for name, (n, k) in linear.items() if role(name) in DECODER_ROLES)
    parts["decoder_linear_weights"] = n_dec
    parts["decoder_linear_bits_per_weight"] = 8.0 * parts["decoder_linear"] / n_dec
    parts["total"] = sum(parts[k] for k in ("decoder_linear", "decoder_embedding", "decoder_other", "vision", "projector"))
    return parts


def weights_bytes_per_call(function: str, params: list, specs: dict, gathered_rows: dict,
                           transforms: dict | None = None, is_table: Callable[[str], bool] = lambda _name: False) -> int:
    """Bytes of weights one call of ``function`` reads: every parameter once, except
    embedding tables (fp32, or their quantized rows and row scales), which are gathered
    (``gathered_rows[function]`` rows). ``is_table(source name)`` says which weights are the
    gathered tables."""
    transforms = transforms or {}
    total = 0
    for name in params:
        shape, dtype = specs[name]
        source = transforms[name].source if name in transforms else name
        if is_table(source) and function in gathered_rows:
            total += min(gathered_rows[function], shape[0]) * nbytes(shape[1:], dtype)
        else:
            total += nbytes(shape, dtype)
    return total


# ------------------------------------------------------------------ build integration


@dataclass
class StoredParams:
    """What a build stores in ``params.safetensors`` and lists in the manifest."""

    entry_params: dict  # function -> parameter names, in call order
    specs: dict  # stored name -> (shape, dtype)
    transforms: dict  # new name -> ParamTransform
    source_shapes: dict  # quantized source weight -> [N, K]

    @classmethod
    def from_build(cls, sigs: dict, weight_specs: dict, table: dict) -> "StoredParams":
        """From the entry signatures after the passes (their ``params`` are the functions'
        ``bluelower.param_names``) and QuantizeWeights' ``quantized_params`` result."""
        transforms = {name: ParamTransform.from_result(r) for name, r in table.items()}
        entry_params = {f: list(sig.params) for f, sig in sigs.items()}
        specs, source_shapes = {}, {}
        for f, names in entry_params.items():
            for name in names:
                if name in transforms:
                    t = transforms[name]
                    specs[name] = (tuple(t.shape), t.dtype)
                    source_shapes[t.source] = list(weight_specs[t.source][0])
                elif name in weight_specs:
                    specs[name] = (tuple(weight_specs[name][0]), "float32")
                else:
                    raise KeyError(f"function {f!r} takes parameter {name!r}, which is neither a model weight "
                                   "nor a quantized parameter")
        used = {n for names in entry_params.values() for n in names}
        return cls(entry_params, specs, {n: t for n, t in transforms.items() if n in used}, source_shapes)

    def source_params(self) -> dict:
        """function -> the model weights it reads (a quantized weight's source once)."""
        out = {}
        for f, names in self.entry_params.items():
            sources = [self.transforms[n].source if n in self.transforms else n for n in names]
            out[f] = list(dict.fromkeys(sources))
        return out

    def safetensors_specs(self) -> list:
        return [(name, shape, dtype) for name, (shape, dtype) in sorted(self.specs.items())]

    def update_manifest(self, manifest: dict, quant: str, group_size: int, is_table: Callable[[str], bool]) -> None:
        """``functions.<f>.params`` (the stored names), ``functions.<f>.weights_bytes_per_call``
        and the ``quantization`` section (mode, group size, transform table, byte counts).
        ``is_table(source name)``: the token-embedding tables, of which a call reads only the
        gathered rows."""
        gathered = {}
        for fname, fn in manifest["functions"].items():
            for inp in fn.get("inputs", []):
                if inp.get("dtype") == "int64" and str(inp.get("name", "")).startswith("token"):
                    gathered[fname] = int(np.prod(inp["shape"]))
        for fname, fn in manifest["functions"].items():
            fn["params"] = list(self.entry_params.get(fname, fn["params"]))
            if all(p in self.specs for p in fn["params"]):
                fn["weights_bytes_per_call"] = weights_bytes_per_call(fname, fn["params"], self.specs, gathered,
                                                                      self.transforms, is_table)
        kinds = sorted({t.quantizer for t in self.transforms.values()})
        groups = sorted({int(t.args["group_size"]) for t in self.transforms.values() if "group_size" in t.args})
        manifest["quant"] = quant
        mode = quant_mode(quant)
        manifest["quantization"] = {
            "mode": quant,
            # the group size of the group-wise formats (None: none, or several: see params' args)
            "group_size": groups[0] if len(groups) == 1 else None,
            # the quantized linear layers' inputs: "int8" = per token, dynamic, symmetric (the a8 modes)
            "activations": mode.activations,
            "weight_layout": mode.weight_layout,
            "quantizers": kinds,
            "params": {name: t.to_json() for name, t in sorted(self.transforms.items())},
            "source_shapes": dict(sorted(self.source_shapes.items())),
            "weights_bytes": int(sum(nbytes(s, d) for s, d in self.specs.values())),
        }
