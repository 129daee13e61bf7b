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

from .modes import DEFAULT_GROUP_SIZE, DECODER_ROLES, quant_mode
from ..kernels import (
    BLOCK_ROWS,
    dequantize_int4_groupwise,
    dequantize_int4_rows,
    dequantize_int8_per_channel,
    dequantize_int8_rows,
    quantize_int4_groupwise,
    quantize_int4_rows,
    quantize_int8_per_channel,
    quantize_int8_rows,
)

QUANTIZERS = {"int4": "int4_groupwise", "int8": "int8_per_channel"}
ROW_QUANTIZERS = {"int4": "int4_rows", "int8": "int8_rows"}  # embedding tables (row layout)


def sanitize(name: str) -> str:
    """The Relax parameter name of a weight (the importers' rule)."""
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


@dataclass(frozen=True)
class LinearScheme:
    """How one ``W[N, K]`` linear weight is stored: kind ``int4``/``int8`` and padded shape."""

    kind: str
    n: int
    k: int
    n_pad: int
    k_pad: int
    group_size: int = 0  # int4 only

    @property
    def quantizer(self) -> str:
        return QUANTIZERS[self.kind]

    def args(self) -> dict:
        out = {}
        if self.kind == "int4":
            out["group_size"] = self.group_size
        if self.n_pad != self.n:
            out["pad_n"] = self.n_pad
        if self.k_pad != self.k:
            out["pad_k"] = self.k_pad
        return out

    def part_specs(self) -> list[tuple[str, tuple, str]]:
        """``[(suffix, shape, dtype)]`` of the packed tensors, in kernel argument order."""
        nb = self.n_pad // BLOCK_ROWS
        if self.kind == "int4":
            return [("int4_packed", (nb, self.k_pad, BLOCK_ROWS // 2), "uint8"),
                    ("int4_scales", (nb, self.k_pad // self.group_size, BLOCK_ROWS), "float16")]
        return [("int8_packed", (nb, self.k_pad, BLOCK_ROWS), "int8"),
                ("int8_scales", (self.n_pad,), "float32")]


def choose_scheme(role: str, n: int, k: int, quant: str, group_size: int = DEFAULT_GROUP_SIZE) -> LinearScheme | None:
    """The storage of a linear weight ``[n, k]`` of ``role`` under ``quant``, or None (stays fp32).

    The mode gives the role its format (``quant/modes.py``: decoder roles INT4 under
    ``w4a16*``, vision/projector INT8, ...). Shapes the kernels cannot take directly are
    zero-padded: N to a multiple of 32 (the output is sliced back), K to a multiple of 32 /
    the group size (the activation is padded with zeros).
    """
    kind = quant_mode(quant).weight_format(role)
    if kind is None:
        return None
    n_pad = _round_up(n, BLOCK_ROWS)
    if kind == "int4":
        if group_size <= 0 or group_size % 4 != 0:
            raise ValueError(f"group size must be a positive multiple of 4, got {group_size}")
        k_pad = _round_up(k, group_size)
        return LinearScheme("int4", n, k, n_pad, k_pad, group_size)
    return LinearScheme("int8", n, k, n_pad, _round_up(k, 32))


@dataclass(frozen=True)
class EmbeddingScheme:
    """How a ``[rows, width]`` embedding table is stored: row layout (``quantize_int4_rows`` /
    ``quantize_int8_rows``), the width zero-padded to the group size (INT4)."""

    kind: str
    n: int  # rows (vocabulary)
    k: int  # width (hidden size)
    k_pad: int
    group_size: int = 0  # int4 only

    @property
    def quantizer(self) -> str:
        return ROW_QUANTIZERS[self.kind]

    def args(self) -> dict:
        out = {"group_size": self.group_size} if self.kind == "int4" else {}
        if self.k_pad != self.k:
            out["pad_k"] = self.k_pad
        return out

    def part_specs(self) -> list[tuple[str, tuple, str]]:
        if self.kind == "int4":
            return [("int4_rows_packed", (self.n, self.k_pad // 2), "uint8"),
                    ("int4_rows_scales", (self.n, self.k_pad // self.group_size), "float16")]
        return [("int8_rows_packed", (self.n, self.k_pad), "int8"), ("int8_rows_scales", (self.n,), "float32")]


def choose_embedding_scheme(role: str, rows: int, width: int, quant: str,
                            group_size: int = DEFAULT_GROUP_SIZE) -> EmbeddingScheme | None:
    """The storage of an embedding table of ``role`` under ``quant``, or None (stays fp32).

    Token-embedding tables (role ``embedding``) get the mode's decoder format: INT4 + fp16
    scale per ``group_size`` (``w4a16*``), INT8 + fp32 scale per row (``w8``). Other tables
    (the ViT's position embedding) stay fp32."""
    if role != "embedding":
        return None
    kind = quant_mode(quant).weight_format(role)
    if kind is None:
        return None
    if kind == "int4":
        if group_size <= 0 or group_size % 4 != 0:
            raise ValueError(f"group size must be a positive multiple of 4, got {group_size}")
        return EmbeddingScheme("int4", rows, width, _round_up(width, group_size), group_size)
    return EmbeddingScheme("int8", rows, width, width)


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


def quantize_weight(w: np.ndarray, quantizer: str, args: dict) -> tuple[np.ndarray, np.ndarray]:
    """Pad (if asked) and quantize one fp32 weight ``[N, K]``; return ``(packed, scales)``."""
    n, k = w.shape
    n_pad, k_pad = int(args.get("pad_n", n)), int(args.get("pad_k", k))
    if (n_pad, k_pad) != (n, k):
        padded = np.zeros((n_pad, k_pad), np.float32)
        padded[:n, :k] = w
        w = padded
    if quantizer == "int4_groupwise":
        return quantize_int4_groupwise(w, int(args["group_size"]))
    if quantizer == "int8_per_channel":
        return quantize_int8_per_channel(w)
    if quantizer == "int4_rows":
        return quantize_int4_rows(w, int(args["group_size"]))
    if quantizer == "int8_rows":
        return quantize_int8_rows(w)
    raise ValueError(f"unknown quantizer {quantizer!r}")


def dequantize_weight(packed: np.ndarray, scales: np.ndarray, quantizer: str, args: dict, shape: tuple) -> np.ndarray:
    """The fp32 ``[N, K]`` weight the kernel computes with (padding removed)."""
    if quantizer == "int4_groupwise":
        w = dequantize_int4_groupwise(packed, scales, int(args["group_size"]))
    elif quantizer == "int8_per_channel":
        w = dequantize_int8_per_channel(packed, scales)
    elif quantizer == "int4_rows":
        w = dequantize_int4_rows(packed, scales, int(args["group_size"]))
    elif quantizer == "int8_rows":
        w = dequantize_int8_rows(packed, scales)
    else:
        raise ValueError(f"unknown quantizer {quantizer!r}")
    n, k = shape
    return np.ascontiguousarray(w[:n, :k])


def param_producer(transforms: dict, read_fp32: Callable[[str], np.ndarray]) -> Callable[[str], np.ndarray]:
    """``produce(name)`` for ``write_safetensors``: fp32 params are read as they are,
    quantized ones converted from their source weight, once per source weight (its parts,
    packed codes and scales, may be asked for from two threads at once: the first converts,
    the other waits; the pair is dropped when every part has been handed out)."""
    import threading
    from concurrent.futures import Future

    lock = threading.Lock()
    pending: dict = {}  # source -> [Future of (packed, scales), parts not yet handed out]
    parts_of: dict = {}
    for t in transforms.values():
        parts_of[t.source] = parts_of.get(t.source, 0) + 1

    def produce(name: str) -> np.ndarray:
        t = transforms.get(name)
        if t is None:
            return read_fp32(name)
        with lock:
            entry = pending.get(t.source)
            owner = entry is None
            if owner:
                entry = pending[t.source] = [Future(), parts_of[t.source]]
        if owner:
            try:
                entry[0].set_result(quantize_weight(read_fp32(t.source), t.quantizer, t.args))
            except BaseException as exc:
                entry[0].set_exception(exc)
                raise
        out = entry[0].result()[t.part]
        with lock:
            entry[1] -= 1
            if entry[1] <= 0:
                pending.pop(t.source, None)
        return out

    produce.work_key = lambda name: transforms[name].source if name in transforms else name
    return produce


def dequantized_state(params_path: str, manifest: dict) -> dict:
    """Read a build's ``params.safetensors`` back as fp32 model weights (source names):
    quantized weights dequantized exactly as the kernels use them. For the PyTorch
    reference of a quantized build (``run --check``) and the accuracy report."""
    from ..frontend.weights import WeightSource

    src = WeightSource(params_path)
    table = manifest.get("quantization", {}).get("params", {})
    shapes = manifest.get("quantization", {}).get("source_shapes", {})
    out = {}
    by_source: dict = {}
    for new, (source, quantizer, args) in table.items():
        by_source.setdefault(source, [None, None, quantizer, args])
        part = 0 if new.endswith("_packed") else 1
        by_source[source][part] = new
    for name in src.names():
        if name in table:
            continue
        out[name] = src.read(name).astype(np.float32)
    for source, (pk, sc, quantizer, args) in by_source.items():
        out[source] = dequantize_weight(src.read(pk), src.read(sc), quantizer, args, tuple(shapes[source]))
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


def quantized_param_specs(cfg, quant: str, group_size: int = DEFAULT_GROUP_SIZE):
    """The stored parameters of ``cfg`` under ``quant`` from the model's shapes alone.

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
    out, transforms = {}, {}
    for name, (shape, dtype) in specs.items():
        if name in linear:
            scheme = choose_scheme(role(name), *linear[name], quant, group_size)
        elif name in embedding:
            scheme = choose_embedding_scheme(role(name), *embedding[name], quant, group_size)
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


def weight_bytes_by_part(cfg, quant: str, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Stored bytes: decoder linear weights (incl. lm_head), decoder embedding table,
    other decoder weights (norms), vision tower, projector; plus bits per decoder linear
    weight. From shapes only."""
    from ..models import spec_for

    specs, transforms = quantized_param_specs(cfg, quant, group_size)
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
        manifest["quant"] = quant
        manifest["quantization"] = {
            "mode": quant,
            "group_size": group_size if "int4_groupwise" in kinds else None,
            "quantizers": kinds,
            "params": {name: t.to_json() for name, t in sorted(self.transforms.items())},
            "source_shapes": dict(sorted(self.source_shapes.items())),
            "weights_bytes": int(sum(nbytes(s, d) for s, d in self.specs.values())),
        }
