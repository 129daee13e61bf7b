"""The model registry: one :class:`ModelSpec` per model family.

Everything model-specific the compiler needs is read from the family's spec: its config
class and shipped configs, its PyTorch module, the entry functions it compiles (their
inputs, example inputs and the weights each reads), the role of every weight (what
``--quant`` decides precision by), which entries stay on the CPU, the image entry
TileImagePatches splits, and the image normalization. No pass names a family's functions
or parameters; adding a family is one folder under ``lowering/models/`` (its ``SPEC``) and
one line in :data:`SHIPPED_FAMILIES` (docs/contributing.md, "Add a model family"); code
outside bluelower adds its own with :func:`register`.

Entry functions follow the bundle's calling convention (docs/bundle-format.md): ``embed``,
``prefill`` and ``decode`` for every language model, ``encode_image`` for models with a vision
tower. A spec lists the ones its family compiles.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from ...errors import BlueLowerError
from ...validate import read_json
from .spec import EntrySpec, ModelSpec  # noqa: F401  (re-exported: the registry's vocabulary)

# the shipped families: name -> the module whose SPEC describes it (imported on first use;
# importing a family does not import torch)
SHIPPED_FAMILIES = {
    "bluelm_v": "bluelower.lowering.models.bluelm_v",
    "llama": "bluelower.lowering.models.llama",
    "qwen2": "bluelower.lowering.models.qwen2",
    "siglip": "bluelower.lowering.models.siglip",
    "idefics3": "bluelower.lowering.models.idefics3",
}


_FAMILIES: dict[str, ModelSpec] = {}


def register(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add a family (code outside bluelower, ``api.compile_module``'s one-off families);
    ``replace`` swaps in a newer spec of the same name."""
    if spec.family in _FAMILIES and _FAMILIES[spec.family] is not spec and not replace:
        raise ValueError(f"model family {spec.family!r} is registered twice")
    _FAMILIES[spec.family] = spec
    return spec


def _load_families() -> None:
    for family, module in SHIPPED_FAMILIES.items():
        if family not in _FAMILIES:
            register(importlib.import_module(module).SPEC)


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
    return config_from_dict(read_json(path, "model config"), path)
