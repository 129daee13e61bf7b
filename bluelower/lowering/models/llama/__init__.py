"""llama: LLaMA-style text models (Llama 2/3, SmolLM2, TinyLlama, BlueLM-style decoders).

``model.py`` is the PyTorch module (Hugging Face ``LlamaForCausalLM`` names, so a checkpoint
loads by name), ``hf_config.py`` reads a transformers ``config.json``. Config sections:
``decoder`` and ``runtime``. Entries: ``embed``, ``prefill``, ``decode`` (docs/bundle-format.md).
``attention_bias`` means Llama's: a bias on q, k, v and o_proj. This file is the family's
:class:`~bluelower.lowering.models.spec.ModelSpec`; importing it does not import torch.
"""

from __future__ import annotations

import os

from ..config import config_from_dict as schema_config_from_dict
from ..spec import EntrySpec, ModelSpec
from .hf_config import check_architecture, decoder_section, runtime_section

FAMILY = "llama"
EMBED = "model.embed_tokens."
TEXT_INPUTS = {
    "embed": ("token_ids",),
    "prefill": ("embeddings", "kv_cache", "start_pos", "num_valid"),
    "decode": ("token", "kv_cache", "position"),
}


def config_from_dict(data, source: str = "config"):
    return schema_config_from_dict(data, source, required=("decoder",), family=FAMILY)


def _build(cfg):
    from .model import LlamaForCausalLM

    return LlamaForCausalLM(cfg, o_proj_bias=cfg.decoder.attention_bias)


def text_example_inputs(entry: str):
    def make(cfg, device="cpu"):
        from .model import text_example_inputs as make_inputs

        return make_inputs(cfg, entry, device)

    return make


def text_entries(embed: str, decoder: str, lm_head: str) -> tuple:
    """``embed``, ``prefill``, ``decode`` of a causal LM whose token table's names start with
    ``embed``, the rest of the decoder's with ``decoder`` and the untied head's with ``lm_head``."""

    def reads_embed(name, every=None):
        return name.startswith(embed)

    def reads_prefill(name, every=None):
        # a tied lm_head (the module has no lm_head weight) reads the token table
        tied = every is not None and not any(n.startswith(lm_head) for n in every)
        return name.startswith((decoder, lm_head)) and (tied or not name.startswith(embed))

    def reads_decode(name, every=None):
        return name.startswith((decoder, lm_head))

    reads = {"embed": reads_embed, "prefill": reads_prefill, "decode": reads_decode}
    return tuple(EntrySpec(e, TEXT_INPUTS[e], text_example_inputs(e), reads[e], reads_among=reads[e])
                 for e in ("embed", "prefill", "decode"))


def decoder_weight_role(name: str, embed: str, lm_head: str) -> str:
    """The role of a LLaMA-style decoder weight (what ``--quant`` decides its precision by)."""
    if name.startswith(lm_head):
        return "lm_head"
    if name.startswith(embed):
        return "embedding"  # also the logits' weight when tied: the lookups decide its layout
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norm"
    return "other"


def weight_role(name: str) -> str:
    return decoder_weight_role(name, EMBED, "lm_head.")


def kv_cache_shape(cfg) -> tuple:
    d, r = cfg.decoder, cfg.runtime
    return (d.num_layers, 2, d.num_kv_heads, r.kv_capacity, d.head_dim)


def causal_lm_checkpoint_name(name: str, cfg=None, lm_head: str = "lm_head.weight") -> str | None:
    """A checkpoint tensor's module name: the same name, None for a rotary ``inv_freq``
    buffer and for ``lm_head`` when ``cfg`` ties it to the token table."""
    if name.endswith(".inv_freq"):
        return None
    if name == lm_head and cfg is not None and cfg.decoder.tie_word_embeddings:
        return None
    return name


def checkpoint_name(name: str, cfg=None) -> str | None:
    return causal_lm_checkpoint_name(name, cfg)


def from_hf_config(hf: dict, name: str, **runtime):
    """A ``llama`` config from a ``LlamaForCausalLM`` config.json dict; ``runtime``: overrides
    of the runtime section (``kv_capacity``, ``prefill_chunk``, ``eos_token_id``, ...)."""
    check_architecture(hf, name, SPEC.hf_architectures, ("llama",))
    data = {"family": FAMILY, "name": name, "decoder": decoder_section(hf, name),
            "runtime": runtime_section(hf, name, runtime, hf.get("max_position_embeddings"))}
    return config_from_dict(data, f"config.json of '{name}'")


SPEC = ModelSpec(
    family=FAMILY,
    description="LLaMA-style causal LM (Llama, SmolLM2, TinyLlama): RMSNorm, RoPE (llama3 / linear scaling), "
                "GQA/MQA/MHA, SwiGLU, tied or untied lm_head",
    config_from_dict=config_from_dict,
    config_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),
    build_module=_build,
    entries=text_entries(EMBED, "model.", "lm_head."),
    weight_role=weight_role,
    kv_cache_shape=kv_cache_shape,
    hf_architectures=("LlamaForCausalLM",),
    from_hf_config=from_hf_config,
    checkpoint_name=checkpoint_name,
)
