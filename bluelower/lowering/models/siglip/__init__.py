"""siglip: a standalone SigLIP vision tower (Hugging Face ``SiglipVisionModel``).

``model.py`` is the PyTorch module (the checkpoints' ``vision_model.*`` names). Config
sections: ``vision`` (``use_head``: the attention-pooling head) and ``runtime``
(``image_batch``; no ``decoder``: the config's ``decoder`` is None and the family has no KV
cache). One entry, ``encode_image``: pixel_values [B, 3, S, S] -> last_hidden_state
[B, (S/patch)^2, hidden]; with the head it returns the tuple (last_hidden_state,
pooler_output [B, hidden]), what ``SiglipVisionModel`` returns. Importing this file does
not import torch.
"""

from __future__ import annotations

import os

from ..config import config_from_dict as schema_config_from_dict
from ..llama.hf_config import check_architecture, runtime_section, vision_section
from ..spec import EntrySpec, ModelSpec

FAMILY = "siglip"
TOWER = "vision_model."
# SiglipVisionModel's module names in transformers >= 5 (its loader drops the prefix the
# checkpoints carry): a state dict taken from such a model in memory
UNPREFIXED = ("embeddings.", "encoder.", "post_layernorm.", "head.")


def config_from_dict(data, source: str = "config"):
    return schema_config_from_dict(data, source, required=("vision",), family=FAMILY)


def _build(cfg):
    from .model import SiglipVisionModel

    return SiglipVisionModel(cfg)


def _example_inputs(cfg, device="cpu"):
    from .model import image_example_inputs

    return image_example_inputs(cfg, device)


def tower_weight_role(name: str) -> str:
    """The role of a vision-tower weight: its position embedding or ``vision``."""
    return "position_embedding" if ".position_embedding." in name else "vision"


def checkpoint_name(name: str, cfg=None) -> str | None:
    """The module name of a ``SiglipVisionModel`` / ``SiglipModel`` checkpoint tensor: the
    vision tower's as it is (or with the ``vision_model.`` prefix transformers 5 drops in
    memory); None for the text tower, the contrastive scale/bias and ``position_ids`` buffers."""
    if name.endswith("position_ids") or name.startswith("text_model.") or name in ("logit_scale", "logit_bias"):
        return None
    if name.startswith(UNPREFIXED):
        return TOWER + name
    return name


def from_hf_config(hf: dict, name: str, **runtime):
    """A ``siglip`` config from a ``SiglipVisionModel`` config.json (or a ``SiglipModel``'s:
    its ``vision_config``); ``runtime``: overrides (``image_batch``)."""
    check_architecture(hf, name, SPEC.hf_architectures, ("siglip_vision_model", "siglip"))
    where = ""
    if "vision_config" in hf:
        hf, where = hf["vision_config"] or {}, "vision_config."
    data = {"family": FAMILY, "name": name,
            "vision": vision_section(hf, name, where, use_head=bool(hf.get("vision_use_head", True))),
            "runtime": runtime_section({}, name, runtime, needs_eos=False)}
    return config_from_dict(data, f"config.json of '{name}'")


SPEC = ModelSpec(
    family=FAMILY,
    description="SigLIP vision tower (SiglipVisionModel), with or without the attention-pooling head",
    config_from_dict=config_from_dict,
    config_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),
    build_module=_build,
    entries=(EntrySpec("encode_image", ("pixel_values",), _example_inputs, lambda n: n.startswith(TOWER)),),
    weight_role=tower_weight_role,
    kv_cache_shape=lambda cfg: None,
    image_entry="encode_image",
    # the patch-embedding Conv2D stays on a CPU cluster (TileImagePatches names the stage)
    cpu_entries=("encode_image_embed",),
    image_mean=(0.5, 0.5, 0.5),  # SigLIP's normalization
    image_std=(0.5, 0.5, 0.5),
    hf_architectures=("SiglipVisionModel", "SiglipModel"),
    from_hf_config=from_hf_config,
    checkpoint_name=checkpoint_name,
)
