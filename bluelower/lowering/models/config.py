"""Model configurations: JSON files (or a checkpoint's ``config.json``) validated into frozen
dataclasses, one schema for every family.

A config names the parts a model has (``vision`` tower, ``projector`` between the two,
``decoder``) and the runtime shapes the compiler fixes (KV-cache capacity, prefill chunk,
image batch, the token ids generation needs). Its ``family`` (default ``bluelm_v``) picks the
PyTorch module and the parts that must be present (the ``required`` sections the family's
``config_from_dict`` passes): a text-only family has no ``vision`` / ``projector``, a vision
tower alone (``siglip``) no ``decoder`` (then ``decoder`` is None and the runtime's token ids
are not checked against a vocabulary). Shipped configs
live in each family's ``configs/``; ``--model PATH.json`` takes a user's own
(``lowering.models.load_config``). Unknown keys, wrong types, missing required sections and
keys (:data:`REQUIRED_KEYS`: the shape of a model has no default) and out-of-range values
(:data:`RANGES`, the runtime's shared with the manifest reader and the native runtime:
``bluelower.validate.LIMITS``) are a :class:`BlueLowerError` naming the file and the key.
:meth:`ModelConfig.parameter_estimate` counts the weights from the config alone (no module
built), what the compile driver checks against the target's memory before anything is traced.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

from ...errors import BlueLowerError
from ...validate import LIMITS, check_int, check_number

PROJECTOR_KINDS = ("downsample_mlp", "pixel_shuffle")
ROPE_TYPES = ("default", "llama3", "linear")
# the numbers each rope_type reads (transformers' modeling_rope_utils)
ROPE_KEYS = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP-style ViT."""

    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    layer_norm_eps: float = 1e-6
    use_head: bool = False  # SiglipVisionModel's attention-pooling head (a standalone SigLIP tower)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class ProjectorConfig:
    """Between the ViT and the decoder.

    * ``downsample_mlp`` (BlueLM-V): pad the token grid to a multiple of ``downsample_factor``,
      concatenate each f x f group, fuse with a linear layer of width ``downsample_size``, then
      a 2-layer GELU MLP to the decoder width.
    * ``pixel_shuffle`` (Idefics3 / SmolVLM): the f x f pixel shuffle of the token grid (the grid
      must be a multiple of f), then one linear layer without bias to the decoder width.
    """

    kind: str = "downsample_mlp"
    downsample_factor: int = 2
    downsample_size: int = 1152  # downsample_mlp: output width of the fusing linear layer

    def out_grid(self, vision: VisionConfig) -> int:
        f = self.downsample_factor
        return (vision.grid + f - 1) // f

    def num_tokens(self, vision: VisionConfig) -> int:
        return self.out_grid(vision) ** 2


@dataclass(frozen=True)
class DecoderConfig:
    """LLaMA-style decoder (RMSNorm, RoPE, GQA/MQA/MHA, SwiGLU)."""

    vocab_size: int = 100096
    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 80
    intermediate_size: int = 6912
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False  # lm_head is the token-embedding table (stored once)
    attention_bias: bool = False  # q/k/v projections with a bias (Qwen2; family llama: o_proj too, as HF Llama)
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or None


@dataclass(frozen=True)
class RuntimeConfig:
    """Shapes the compiler fixes ahead of time, and the token ids generation needs."""

    kv_capacity: int = 2048
    prefill_chunk: int = 128
    image_batch: int = 1
    eos_token_id: int = 2
    init_std: float = 0.02  # std of init-weights' random normal weights
    stop_token_ids: tuple = ()  # more ids that end generation (a checkpoint's other EOS tokens)
    bos_token_id: int | None = None
    image_token_id: int | None = None  # the prompt's image placeholder token (VLMs with a tokenizer)


_SECTIONS = {"vision": VisionConfig, "projector": ProjectorConfig, "decoder": DecoderConfig, "runtime": RuntimeConfig}

# keys a section must give: the model's shape (the defaults above are BlueLM-V-3B's; a
# config without them would silently become that model)
REQUIRED_KEYS = {
    "vision": ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"),
    "projector": ("downsample_factor",),  # + downsample_size for kind downsample_mlp
    "decoder": ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size"),
    "runtime": (),
}

# section.key -> (low, high), inclusive; the runtime shapes are the native runtime's limits
RANGES = {
    "vision.image_size": LIMITS["image_size"], "vision.patch_size": (1, 8192), "vision.hidden_size": (1, 1 << 20),
    "vision.num_layers": (1, 4096), "vision.num_heads": (1, 4096), "vision.intermediate_size": (1, 1 << 20),
    "projector.downsample_factor": (1, 64), "projector.downsample_size": (1, 1 << 20),
    "decoder.vocab_size": LIMITS["vocab_size"], "decoder.hidden_size": LIMITS["hidden_size"],
    "decoder.num_layers": (1, 4096), "decoder.num_heads": (1, 4096), "decoder.num_kv_heads": (1, 4096),
    "decoder.head_dim": (2, 4096), "decoder.intermediate_size": (1, 1 << 20),
    "runtime.kv_capacity": LIMITS["kv_capacity"], "runtime.prefill_chunk": LIMITS["prefill_chunk"],
    "runtime.image_batch": LIMITS["image_batch"],
}
# section.key -> exclusive upper bound (None: any finite positive number)
FLOAT_RANGES = {"vision.layer_norm_eps": 1.0, "decoder.rms_norm_eps": 1.0, "decoder.rope_theta": None,
                "runtime.init_std": None}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str = "bluelm_v"
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    projector: ProjectorConfig | None = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig | None = field(default_factory=DecoderConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    notes: tuple = ()

    @property
    def image_tokens_per_patch(self) -> int:
        """Decoder rows one image patch becomes (0 without a vision tower)."""
        if self.vision is None:
            return 0
        return self.projector.num_tokens(self.vision) if self.projector is not None else self.vision.num_tokens

    @property
    def stop_ids(self) -> tuple:
        """Every id that ends generation: ``eos_token_id`` first."""
        return tuple(dict.fromkeys((self.runtime.eos_token_id, *self.runtime.stop_token_ids)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        d["runtime"]["stop_token_ids"] = list(self.runtime.stop_token_ids)
        return d

    def parameter_estimate(self) -> dict:
        """Weights counted from the config alone, no module built: ``{"decoder": linear layers +
        token table + lm_head, "vision": the ViT's and the projector's linear layers, "other":
        patch embedding + position embedding}``. The large matrices only (norms and biases are
        left out), so a lower bound of what the family's module holds."""
        out = {"decoder": 0, "vision": 0, "other": 0}
        d, v, p = self.decoder, self.vision, self.projector
        if d is not None:
            q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
            layer = d.hidden_size * (2 * q + 2 * kv) + 3 * d.hidden_size * d.intermediate_size
            table = d.vocab_size * d.hidden_size
            out["decoder"] = d.num_layers * layer + table * (1 if d.tie_word_embeddings else 2)
        if v is not None:
            out["vision"] = v.num_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
            out["other"] = v.num_channels * v.patch_size ** 2 * v.hidden_size + v.num_tokens * v.hidden_size
            if p is not None:
                width = d.hidden_size if d is not None else v.hidden_size
                f2h = p.downsample_factor ** 2 * v.hidden_size
                out["vision"] += (f2h * width if p.kind == "pixel_shuffle"
                                  else f2h * p.downsample_size + p.downsample_size * width + width * width)
        return out

    def replace_runtime(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))

    def validate(self, where: str = "config") -> None:
        v, p, d, r = self.vision, self.projector, self.decoder, self.runtime

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise BlueLowerError(f"{where}: {msg}")

        for sec_name, sec in (("vision", v), ("projector", p), ("decoder", d), ("runtime", r)):
            for f in fields(sec) if sec is not None else ():
                key, val = f"{sec_name}.{f.name}", getattr(sec, f.name)
                try:
                    if key in RANGES:
                        check_int(val, *RANGES[key], key)
                    elif key in FLOAT_RANGES:
                        check_number(val, key, below=FLOAT_RANGES[key])
                except BlueLowerError as exc:
                    raise BlueLowerError(f"{where}: {exc}") from None
        if v is not None:
            need(v.num_channels == 3, f"vision.num_channels must be 3 (images are RGB), got {v.num_channels}")
            need(v.image_size >= v.patch_size, f"vision.image_size {v.image_size} is smaller than patch_size {v.patch_size}")
            need(v.hidden_size % v.num_heads == 0,
                 f"vision.hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
        if p is not None:
            need(p.kind in PROJECTOR_KINDS, f"projector.kind '{p.kind}' is not one of {', '.join(PROJECTOR_KINDS)}")
            need(v is not None, "a projector needs a vision section")
            if p.kind == "pixel_shuffle":
                need(v.grid % p.downsample_factor == 0,
                     f"projector.downsample_factor {p.downsample_factor} does not divide the {v.grid}x{v.grid} token grid")
        need(r.kv_capacity % r.prefill_chunk == 0,
             f"runtime.kv_capacity {r.kv_capacity} must be a multiple of runtime.prefill_chunk {r.prefill_chunk}")
        if d is None:  # a vision tower alone: no vocabulary to check token ids against
            return
        need(d.num_heads % d.num_kv_heads == 0, f"decoder.num_heads {d.num_heads} is not a multiple of num_kv_heads {d.num_kv_heads}")
        need(d.head_dim % 2 == 0, f"decoder.head_dim {d.head_dim} must be even for RoPE")
        if d.rope_scaling is not None:
            rt = d.rope_scaling.get("rope_type", d.rope_scaling.get("type", "default"))
            need(rt in ROPE_TYPES, f"decoder.rope_scaling.rope_type '{rt}' is not supported (supported: {', '.join(ROPE_TYPES)})")
            for key in ROPE_KEYS.get(rt, ()):
                val = d.rope_scaling.get(key)
                need(isinstance(val, (int, float)) and not isinstance(val, bool) and val > 0,
                     f"decoder.rope_scaling.{key} must be a positive number for rope_type '{rt}', got {json.dumps(val)}")
        for key in ("eos_token_id", "bos_token_id", "image_token_id"):
            tok = getattr(r, key)
            need(tok is None or 0 <= tok < d.vocab_size, f"runtime.{key} {tok} is outside the vocabulary")
        for tok in r.stop_token_ids:
            need(isinstance(tok, int) and 0 <= tok < d.vocab_size, f"runtime.stop_token_ids: {tok} is outside the vocabulary")


def _check_type(value: Any, typ: str, where: str) -> Any:
    optional = typ.endswith("| None")
    base = typ.replace("| None", "").strip()
    if value is None and optional:
        return None
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise BlueLowerError(f"{where}: expected an integer, got {json.dumps(value)}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BlueLowerError(f"{where}: expected a number, got {json.dumps(value)}")
        return float(value)
    if base == "bool":
        if not isinstance(value, bool):
            raise BlueLowerError(f"{where}: expected true or false, got {json.dumps(value)}")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise BlueLowerError(f"{where}: expected a string, got {json.dumps(value)}")
        return value
    if base == "dict":
        if not isinstance(value, dict):
            raise BlueLowerError(f"{where}: expected an object, got {json.dumps(value)}")
        return dict(value)
    if base == "tuple":
        if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise BlueLowerError(f"{where}: expected a list of integers, got {json.dumps(value)}")
        return tuple(value)
    return value


def config_from_dict(data: Any, source: str = "config", required: tuple = ("vision", "projector", "decoder"),
                     family: str = "bluelm_v") -> ModelConfig:
    """Validate a parsed JSON object into a :class:`ModelConfig` of ``family``; ``required``:
    the sections the family's module needs (others must be absent or null)."""
    if not isinstance(data, dict):
        raise BlueLowerError(f"{source}: the top level must be a JSON object")
    allowed = {"family", "name", "notes", *_SECTIONS}
    for key in data:
        if key not in allowed:
            raise BlueLowerError(f"{source}: unknown key '{key}' (valid keys: {', '.join(sorted(allowed))})")
    if data.get("family", family) != family:
        raise BlueLowerError(f"{source}: family '{data.get('family')}' is not '{family}'")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise BlueLowerError(f"{source}: 'name' must be a non-empty string")
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise BlueLowerError(f"{source}: 'notes' must be a list of strings")
    given: dict = {}  # section -> checked keyword arguments (unknown keys and types first, then what is missing)
    for sec_name, cls in _SECTIONS.items():
        raw = data.get(sec_name)
        if sec_name != "runtime" and sec_name not in required:
            if raw is not None:
                raise BlueLowerError(f"{source}: family '{family}' has no '{sec_name}' section")
            continue
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise BlueLowerError(f"{source}: '{sec_name}' must be an object")
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key not in known:
                raise BlueLowerError(
                    f"{source}: unknown key '{sec_name}.{key}' (valid keys: {', '.join(sorted(known))})"
                )
            kwargs[key] = _check_type(value, str(known[key].type), f"{source}: '{sec_name}.{key}'")
        given[sec_name] = kwargs
    sections: dict = {name: None for name in _SECTIONS}
    for sec_name, cls in _SECTIONS.items():
        if sec_name != "runtime" and sec_name not in required:
            continue
        if sec_name not in given and sec_name != "runtime":
            raise BlueLowerError(f"{source}: missing section '{sec_name}' (family '{family}' needs "
                                 f"{', '.join(required)})")
        kwargs = given.get(sec_name, {})
        keys = REQUIRED_KEYS[sec_name]
        if sec_name == "projector" and kwargs.get("kind", "downsample_mlp") == "downsample_mlp":
            keys += ("downsample_size",)
        missing = [f"{sec_name}.{k}" for k in keys if k not in kwargs]
        if missing:
            raise BlueLowerError(f"{source}: missing key{'s' * (len(missing) > 1)} {', '.join(missing)} "
                                 "(a model's shape has no default)")
        sections[sec_name] = cls(**kwargs)
    cfg = ModelConfig(name=name, family=family, notes=tuple(notes), **sections)
    cfg.validate(source)
    return cfg
