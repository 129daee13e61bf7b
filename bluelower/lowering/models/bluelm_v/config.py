"""BlueLM-V model configurations: JSON files validated into frozen dataclasses.

A config names the three parts of a BlueLM-V-style model (vision tower, projector,
decoder) and the runtime shapes the compiler fixes (KV-cache capacity, prefill chunk,
image batch). Shipped configs live in ``configs/``; ``--model PATH.json`` takes a user's
own (``lowering.models.load_config`` reads both). Unknown keys, missing keys and wrong types are a
:class:`BlueLowerError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ....errors import BlueLowerError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")  # the shipped configs (the registry lists them)


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

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class ProjectorConfig:
    """2x2 token downsampler (concatenate + linear) followed by a 2-layer GELU MLP."""

    downsample_factor: int = 2
    downsample_size: int = 1152  # output width of the fusing linear layer

    def out_grid(self, vision: VisionConfig) -> int:
        f = self.downsample_factor
        return (vision.grid + f - 1) // f

    def num_tokens(self, vision: VisionConfig) -> int:
        return self.out_grid(vision) ** 2


@dataclass(frozen=True)
class DecoderConfig:
    """LLaMA-style decoder (RMSNorm, RoPE, GQA, SwiGLU, untied lm_head)."""

    vocab_size: int = 100096
    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 80
    intermediate_size: int = 6912
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class RuntimeConfig:
    """Shapes the compiler fixes ahead of time."""

    kv_capacity: int = 2048
    prefill_chunk: int = 128
    image_batch: int = 1
    eos_token_id: int = 2
    init_std: float = 0.02  # std of init-weights' random normal weights


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    notes: tuple = ()

    @property
    def image_tokens_per_patch(self) -> int:
        return self.projector.num_tokens(self.vision)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        return d

    def replace_runtime(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))

    def validate(self, where: str = "config") -> None:
        v, d, r = self.vision, self.decoder, self.runtime

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise BlueLowerError(f"{where}: {msg}")

        for sec in (v, self.projector, d, r):
            for f in fields(sec):
                val = getattr(sec, f.name)
                if isinstance(val, (int, float)) and not isinstance(val, bool) and f.name != "eos_token_id":
                    need(val > 0, f"{type(sec).__name__}.{f.name} must be positive, got {val}")
        need(v.image_size >= v.patch_size, f"vision.image_size {v.image_size} is smaller than patch_size {v.patch_size}")
        need(v.hidden_size % v.num_heads == 0, f"vision.hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
        need(d.num_heads % d.num_kv_heads == 0, f"decoder.num_heads {d.num_heads} is not a multiple of num_kv_heads {d.num_kv_heads}")
        need(d.head_dim % 2 == 0, f"decoder.head_dim {d.head_dim} must be even for RoPE")
        need(r.kv_capacity % r.prefill_chunk == 0, f"runtime.kv_capacity {r.kv_capacity} must be a multiple of runtime.prefill_chunk {r.prefill_chunk}")
        need(0 <= r.eos_token_id < d.vocab_size, f"runtime.eos_token_id {r.eos_token_id} is outside the vocabulary")


_SECTIONS = {
    "vision": VisionConfig,
    "projector": ProjectorConfig,
    "decoder": DecoderConfig,
    "runtime": RuntimeConfig,
}


def _check_type(value: Any, typ: Any, where: str) -> Any:
    typ_name = typ if isinstance(typ, str) else typ.__name__
    if typ_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise BlueLowerError(f"{where}: expected an integer, got {json.dumps(value)}")
        return value
    if typ_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BlueLowerError(f"{where}: expected a number, got {json.dumps(value)}")
        return float(value)
    return value


def config_from_dict(data: Any, source: str = "config") -> ModelConfig:
    """Validate a parsed JSON object into a :class:`ModelConfig`."""
    if not isinstance(data, dict):
        raise BlueLowerError(f"{source}: the top level must be a JSON object")
    allowed = {"family", "name", "notes", *(_SECTIONS)}  # family: the registry's key (always bluelm_v here)
    for key in data:
        if key not in allowed:
            raise BlueLowerError(f"{source}: unknown key '{key}' (valid keys: {', '.join(sorted(allowed))})")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise BlueLowerError(f"{source}: 'name' must be a non-empty string")
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise BlueLowerError(f"{source}: 'notes' must be a list of strings")
    sections = {}
    for sec_name, cls in _SECTIONS.items():
        raw = data.get(sec_name, {})
        if not isinstance(raw, dict):
            raise BlueLowerError(f"{source}: '{sec_name}' must be an object")
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key not in known:
                raise BlueLowerError(
                    f"{source}: unknown key '{sec_name}.{key}' (valid keys: {', '.join(sorted(known))})"
                )
            kwargs[key] = _check_type(value, known[key].type, f"{source}: '{sec_name}.{key}'")
        sections[sec_name] = cls(**kwargs)
    cfg = ModelConfig(name=name, notes=tuple(notes), **sections)
    cfg.validate(source)
    return cfg
