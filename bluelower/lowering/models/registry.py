"""The model registry: one :class:`ModelSpec` per model family.

Everything model-specific the compiler needs is read from the family's spec: its config
class and shipped configs, its PyTorch module, the entry functions it compiles (their
inputs, example inputs and the weights each reads), the role of every weight (what
``--quant`` decides precision by), which entries stay on the CPU, the image entry
TileImagePatches splits, and the image normalization. No pass names a family's functions
or parameters; adding a family is one folder under ``lowering/models/`` and one
:func:`register` call (docs/contributing.md, "Add a model family").

Entry functions follow the bundle's calling convention (docs/bundle-format.md): ``embed``,
``prefill`` and ``decode`` for every language model, ``encode_image`` for models with a vision
tower. A spec lists the ones its family compiles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ...errors import BlueLowerError


@dataclass(frozen=True)
class EntrySpec:
    """One compiled entry function: ``module.<name>(*inputs)`` with the weights it reads."""

    name: str
    inputs: tuple[str, ...]  # input names, in call order (the Relax function's leading parameters)
    example_inputs: Callable[[Any, str], tuple]  # (config, device) -> shape-defining tensors
    reads: Callable[[str], bool]  # weight name -> whether this entry reads it


@dataclass(frozen=True)
class ModelSpec:
    family: str
    description: str
    config_from_dict: Callable[[Any, str], Any]  # (parsed JSON, source name) -> config
    config_dir: str  # shipped configs: <config_dir>/<name>.json
    build_module: Callable[[Any], Any]  # config -> torch.nn.Module (call under torch.device("meta") to trace)
    entries: tuple[EntrySpec, ...]
    weight_role: Callable[[str], str]  # weight name -> role (lowering/quant/modes.py ROLES)
    kv_cache_shape: Callable[[Any], tuple]  # config -> [L, 2, kv_heads, capacity, head_dim]
    image_entry: str | None = None  # the entry TileImagePatches splits at its patch-embedding Conv2D
    cpu_entries: tuple[str, ...] = ()  # entries (incl. ones passes add) that never go to the APU
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    notes: tuple = field(default=())

    def entry(self, name: str) -> EntrySpec:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"{self.family} has no entry function {name!r} (has {', '.join(self.entry_names)})")

    @property
    def entry_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def entry_params(self, names, entry: str) -> list[str]:
        """The weights (of ``names``, in order) that ``entry`` reads."""
        reads = self.entry(entry).reads
        return [n for n in names if reads(n)]

    def builtin_configs(self) -> list[str]:
        if not os.path.isdir(self.config_dir):
            return []
        return sorted(f[:-5] for f in os.listdir(self.config_dir) if f.endswith(".json"))


_FAMILIES: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.family in _FAMILIES and _FAMILIES[spec.family] is not spec:
        raise ValueError(f"model family {spec.family!r} is registered twice")
    _FAMILIES[spec.family] = spec
    return spec


def _load_families() -> None:
    # each family registers itself on import; importing a family does not import torch
    from . import bluelm_v  # noqa: F401


def families() -> dict[str, ModelSpec]:
    _load_families()
    return dict(_FAMILIES)


def get(family: str) -> ModelSpec:
    fams = families()
    if family not in fams:
        raise BlueLowerError(f"unknown model family '{family}' (known: {', '.join(sorted(fams))})")
    return fams[family]


def spec_for(cfg) -> ModelSpec:
    """The spec of the family ``cfg`` belongs to (its ``family`` field)."""
    return get(getattr(cfg, "family", "bluelm_v"))


def builtin_configs() -> dict[str, ModelSpec]:
    """Shipped config name -> its family's spec."""
    out = {}
    for spec in families().values():
        for name in spec.builtin_configs():
            out[name] = spec
    return out


def config_from_dict(data: Any, source: str = "config"):
    """A config from parsed JSON; its ``family`` key (default ``bluelm_v``) picks the schema."""
    family = data.get("family", "bluelm_v") if isinstance(data, dict) else "bluelm_v"
    if not isinstance(family, str):
        raise BlueLowerError(f"{source}: 'family' must be a string")
    return get(family).config_from_dict(data, source)


def load_config(name_or_path):
    """A shipped config by name (``tiny``, ``bluelm-v-3b``) or a user's JSON file; a config
    object is returned as it is."""
    if not isinstance(name_or_path, str):
        return name_or_path
    shipped = builtin_configs()
    if name_or_path in shipped:
        path = os.path.join(shipped[name_or_path].config_dir, name_or_path + ".json")
    elif name_or_path.endswith(".json") or os.path.sep in name_or_path:
        path = name_or_path
    else:
        raise BlueLowerError(
            f"unknown model '{name_or_path}': use one of {', '.join(sorted(shipped))} or a path to a .json config"
        )
    if not os.path.isfile(path):
        raise BlueLowerError(f"model config not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise BlueLowerError(f"{path}: malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BlueLowerError(f"{path}: cannot read: {exc}") from None
    return config_from_dict(data, path)
