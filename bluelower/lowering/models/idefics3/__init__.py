"""idefics3: Idefics3 / SmolVLM vision-language models (Hugging Face
``Idefics3ForConditionalGeneration``): a SigLIP-style tower, the pixel-shuffle connector
(``projector.kind = "pixel_shuffle"``, ``downsample_factor`` = HF's ``scale_factor``) and a
LLaMA decoder.

``model.py`` is the PyTorch module (HF names: ``model.vision_model.*``, ``model.connector.*``,
``model.text_model.*``, ``lm_head.weight``). Config sections: ``vision``, ``projector``,
``decoder``, ``runtime`` (``image_token_id``: the placeholder token whose embedding rows the
runtime replaces by the image features, in order). Entries: ``encode_image``, ``embed``,
``prefill``, ``decode``. Only full-size images are computed (the tower's position ids are
0..N-1; HF's variable-resolution patch masks are not supported), one image tile per
``encode_image`` row. Importing this file does not import torch.
"""

from __future__ import annotations

import os

from ..config import config_from_dict as schema_config_from_dict
from ..llama import causal_lm_checkpoint_name, decoder_weight_role, kv_cache_shape, text_entries
from ..llama.hf_config import check_architecture, decoder_section, refuse, runtime_section, shown, vision_section
from ..siglip import tower_weight_role
from ..spec import EntrySpec, ModelSpec

FAMILY = "idefics3"
VISION, CONNECTOR, TEXT = "model.vision_model.", "model.connector.", "model.text_model."
EMBED = TEXT + "embed_tokens."
DEFAULT_IMAGE_TOKEN_ID = 128257  # Idefics3Config's default


def config_from_dict(data, source: str = "config"):
    return schema_config_from_dict(data, source, required=("vision", "projector", "decoder"), family=FAMILY)


def _build(cfg):
    from .model import Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration(cfg)


def _example_inputs(entry: str):
    def make(cfg, device="cpu"):
        from .model import entry_example_inputs

        return entry_example_inputs(cfg, entry, device)

    return make


def weight_role(name: str) -> str:
    if name.startswith(VISION):
        return tower_weight_role(name)
    if name.startswith(CONNECTOR):
        return "projector"
    return decoder_weight_role(name, EMBED, "lm_head.")


def checkpoint_name(name: str, cfg=None) -> str | None:
    return causal_lm_checkpoint_name(name, cfg)


def from_hf_config(hf: dict, name: str, **runtime):
    """An ``idefics3`` config from an ``Idefics3ForConditionalGeneration`` config.json dict
    (its ``vision_config``, ``text_config``, ``scale_factor``, ``image_token_id``; whether
    lm_head is tied is the top-level ``tie_word_embeddings``, as transformers 5 decides it);
    ``runtime``: overrides of the runtime section."""
    from .model import full_image_position_ids_are_arange

    check_architecture(hf, name, SPEC.hf_architectures, ("idefics3",))
    text, vision = hf.get("text_config"), hf.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        refuse(name, "text_config and vision_config must both be present")
    if text.get("model_type", "llama") != "llama":
        refuse(name, f"text_config.model_type {shown(text.get('model_type'))} is not supported (llama only)")
    decoder = decoder_section(text, name, "text_config.")
    decoder["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    tower = vision_section(vision, name, "vision_config.")
    grid = tower["image_size"] // tower["patch_size"]
    if grid > 0 and not full_image_position_ids_are_arange(grid):
        refuse(name, f"vision_config image_size {tower['image_size']} / patch_size {tower['patch_size']}: "
                     f"transformers' position ids of a full {grid}x{grid} image are not 0..{grid * grid - 1} "
                     "(its float32 bucketing repeats some), which the module does not compute")
    ids = {key: text.get(key) if text.get(key) is not None else hf.get(key) for key in ("eos_token_id", "bos_token_id")}
    runtime = {"image_token_id": hf.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID), **runtime}
    data = {"family": FAMILY, "name": name, "vision": tower,
            "projector": {"kind": "pixel_shuffle", "downsample_factor": hf.get("scale_factor", 2)},
            "decoder": decoder,
            "runtime": runtime_section(ids, name, runtime, text.get("max_position_embeddings"))}
    return config_from_dict(data, f"config.json of '{name}'")


SPEC = ModelSpec(
    family=FAMILY,
    description="Idefics3 / SmolVLM: SigLIP-style ViT + pixel-shuffle connector + LLaMA decoder",
    config_from_dict=config_from_dict,
    config_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),
    build_module=_build,
    entries=(EntrySpec("encode_image", ("pixel_values",), _example_inputs("encode_image"),
                       lambda n: n.startswith((VISION, CONNECTOR))),
             *text_entries(EMBED, TEXT, "lm_head.")),
    weight_role=weight_role,
    kv_cache_shape=kv_cache_shape,
    image_entry="encode_image",
    # the patch-embedding Conv2D stays on a CPU cluster (TileImagePatches names the stage)
    cpu_entries=("encode_image_embed",),
    image_mean=(0.5, 0.5, 0.5),  # SmolVLM's image processor
    image_std=(0.5, 0.5, 0.5),
    image_token="<image>",
    image_wrap=("<fake_token_around_image><global-img>", "<fake_token_around_image>"),
    hf_architectures=("Idefics3ForConditionalGeneration",),
    from_hf_config=from_hf_config,
    checkpoint_name=checkpoint_name,
)
