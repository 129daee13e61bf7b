"""What the compiler knows about a model family: :class:`ModelSpec` and its :class:`EntrySpec` s
(``registry.py`` holds one spec per family)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class EntrySpec:
    """One compiled entry function: ``module.<name>(*inputs)`` with the weights it reads."""

    name: str
    inputs: tuple[str, ...]  # input names, in call order (the Relax function's leading parameters)
    example_inputs: Callable[[Any, str], tuple]  # (config, device) -> shape-defining tensors
    reads: Callable[[str], bool]  # weight name -> whether this entry reads it
    # used instead of ``reads`` when set: (weight name, every weight name of the module) ->
    # whether this entry reads it (a tied lm_head reads the token table: no lm_head.weight)
    reads_among: Callable[[str, frozenset], bool] | None = None


@dataclass(frozen=True)
class ModelSpec:
    family: str
    description: str
    config_from_dict: Callable[[Any, str], Any]  # (parsed JSON, source name) -> config
    config_dir: str  # shipped configs: <config_dir>/<name>.json
    build_module: Callable[[Any], Any]  # config -> torch.nn.Module (call under torch.device("meta") to trace)
    entries: tuple[EntrySpec, ...]
    weight_role: Callable[[str], str]  # weight name -> role (lowering/quant/modes.py ROLES)
    kv_cache_shape: Callable[[Any], tuple | None]  # config -> [L, 2, kv_heads, capacity, head_dim] (None: no decoder)
    image_entry: str | None = None  # the entry TileImagePatches splits at its patch-embedding Conv2D
    cpu_entries: tuple[str, ...] = ()  # entries (incl. ones passes add) that never go to the APU
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    # Hugging Face checkpoints: the config.json "architectures" this family reads, how a
    # config.json becomes a bluelower config ((hf config dict, name, runtime overrides) ->
    # config), and the checkpoint tensor name -> module weight name map ((name, config) ->
    # name; the config says whether lm_head is tied. None: the module uses the checkpoint's
    # names; a name mapped to None is not a weight of the module)
    hf_architectures: tuple = ()
    # the text a chat template writes for an image, and the text the checkpoint's processor
    # puts around the image's rows (Idefics3: "<fake_token_around_image><global-img>" ... "<fake_token_around_image>")
    image_token: str | None = None
    image_wrap: tuple = ("", "")
    from_hf_config: Callable[..., Any] | None = None
    checkpoint_name: Callable[..., str | None] | None = None
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
        spec = self.entry(entry)
        names = list(names)
        if spec.reads_among is not None:
            every = frozenset(names)
            return [n for n in names if spec.reads_among(n, every)]
        return [n for n in names if spec.reads(n)]

    def builtin_configs(self) -> list[str]:
        if not os.path.isdir(self.config_dir):
            return []
        return sorted(f[:-5] for f in os.listdir(self.config_dir) if f.endswith(".json"))
