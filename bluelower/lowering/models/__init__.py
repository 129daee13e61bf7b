"""Model families: the registry (``registry.py``) and one folder per family."""

from .registry import EntrySpec, ModelSpec, config_from_dict, families, load_config, register, spec_for

__all__ = ["EntrySpec", "ModelSpec", "config_from_dict", "families", "load_config", "register", "spec_for"]
