"""BlueLM-V: a SigLIP ViT, a 2x2 token downsampler + MLP projector, a LLaMA-style decoder.

``model.py`` is the PyTorch module (Hugging Face parameter names), ``configs/`` the shipped
configs (``tiny``, ``mid``, ``bluelm-v-3b``; the schema is ``lowering/models/config.py``). This file is the
family's :class:`~bluelower.lowering.models.registry.ModelSpec`; importing it does not import
torch.
"""

from __future__ import annotations

import os

from ....errors import BlueLowerError
from ..config import config_from_dict as _config_from_dict
from ..spec import EntrySpec, ModelSpec


def config_from_dict(data, source: str = "config"):
    cfg = _config_from_dict(data, source, required=("vision", "projector", "decoder"), family="bluelm_v")
    d = cfg.decoder
    # the module computes an untied, bias-free decoder with plain RoPE and a downsample-MLP projector
    for key, value, plain in (("decoder.tie_word_embeddings", d.tie_word_embeddings, False),
                              ("decoder.attention_bias", d.attention_bias, False),
                              ("decoder.rope_scaling", d.rope_scaling, None),
                              ("projector.kind", cfg.projector.kind, "downsample_mlp")):
        if value != plain:
            raise BlueLowerError(f"{source}: {key} = {value!r} is not supported by the bluelm_v family "
                                 "(use the llama / idefics3 families for such models)")
    return cfg


def _build(cfg):
    from .model import BlueLMV

    return BlueLMV(cfg)


def _example_inputs(entry: str):
    def make(cfg, device="cpu"):
        from .model import entry_example_inputs

        return entry_example_inputs(cfg, entry, device)

    return make


# Which weights each entry reads (prefixes of state-dict names).
_READS = {
    "encode_image": (("vision_tower.", "multi_modal_projector."), ()),
    "embed": (("language_model.model.embed_tokens.",), ()),
    "prefill": (("language_model.",), ("language_model.model.embed_tokens.",)),
    "decode": (("language_model.",), ()),
}
_INPUTS = {
    "encode_image": ("pixel_values",),
    "embed": ("token_ids",),
    "prefill": ("embeddings", "kv_cache", "start_pos", "num_valid"),
    "decode": ("token", "kv_cache", "position"),
}


def _reads(entry: str):
    include, exclude = _READS[entry]
    return lambda name: name.startswith(include) and not name.startswith(exclude)


def weight_role(name: str) -> str:
    """The role of a BlueLM-V weight (what ``--quant`` decides its precision by)."""
    if name.startswith("vision_tower."):
        return "position_embedding" if ".position_embedding." in name else "vision"
    if name.startswith("multi_modal_projector."):
        return "projector"
    if name.startswith("language_model.lm_head."):
        return "lm_head"
    if name.startswith("language_model.model.embed_tokens."):
        return "embedding"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norm"
    return "other"


def kv_cache_shape(cfg) -> tuple:
    d, r = cfg.decoder, cfg.runtime
    return (d.num_layers, 2, d.num_kv_heads, r.kv_capacity, d.head_dim)


SPEC = ModelSpec(
    family="bluelm_v",
    description="BlueLM-V: SigLIP ViT + 2x2 token downsampler/MLP projector + LLaMA-style decoder",
    config_from_dict=config_from_dict,
    config_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),
    build_module=_build,
    entries=tuple(EntrySpec(name, _INPUTS[name], _example_inputs(name), _reads(name))
                  for name in ("encode_image", "embed", "prefill", "decode")),
    weight_role=weight_role,
    kv_cache_shape=kv_cache_shape,
    image_entry="encode_image",
    # the paper's design: SigLIP's patch-embedding Conv2D on a CPU cluster, overlapped with the
    # APU's ViT blocks (TileImagePatches names the stage <image_entry>_embed)
    cpu_entries=("encode_image_embed",),
    image_mean=(0.5, 0.5, 0.5),  # SigLIP's normalization
    image_std=(0.5, 0.5, 0.5),
)
