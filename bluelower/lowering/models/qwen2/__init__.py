"""qwen2: Qwen2 / Qwen2.5 text models: the ``llama`` module with a bias on q, k and v (none on
o_proj) and Hugging Face ``Qwen2ForCausalLM`` names (the same as ``LlamaForCausalLM``'s).

Config sections: ``decoder`` (``attention_bias`` defaults to true here) and ``runtime``.
Entries: ``embed``, ``prefill``, ``decode``. Sliding-window attention (``use_sliding_window``)
is refused by :func:`from_hf_config`. Importing this file does not import torch.
"""

from __future__ import annotations

import os

from ..config import config_from_dict as schema_config_from_dict
from ..llama import EMBED, kv_cache_shape, text_entries, weight_role
from ..llama import checkpoint_name as llama_checkpoint_name
from ..llama.hf_config import check_architecture, decoder_section, runtime_section
from ..spec import ModelSpec

FAMILY = "qwen2"


def config_from_dict(data, source: str = "config"):
    if isinstance(data, dict) and isinstance(data.get("decoder", {}), dict):
        # every Qwen2 layer has q/k/v biases: a config need not say so
        data = {**data, "decoder": {"attention_bias": True, **data.get("decoder", {})}}
    return schema_config_from_dict(data, source, required=("decoder",), family=FAMILY)


def _build(cfg):
    from ..llama.model import LlamaForCausalLM

    return LlamaForCausalLM(cfg, o_proj_bias=False)


def from_hf_config(hf: dict, name: str, **runtime):
    """A ``qwen2`` config from a ``Qwen2ForCausalLM`` config.json dict; ``runtime``: overrides
    of the runtime section."""
    check_architecture(hf, name, SPEC.hf_architectures, ("qwen2",))
    data = {"family": FAMILY, "name": name, "decoder": decoder_section(hf, name, attention_bias=True),
            "runtime": runtime_section(hf, name, runtime, hf.get("max_position_embeddings"))}
    return config_from_dict(data, f"config.json of '{name}'")


SPEC = ModelSpec(
    family=FAMILY,
    description="Qwen2 causal LM: the llama module with q/k/v biases",
    config_from_dict=config_from_dict,
    config_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),
    build_module=_build,
    entries=text_entries(EMBED, "model.", "lm_head."),
    weight_role=weight_role,
    kv_cache_shape=kv_cache_shape,
    hf_architectures=("Qwen2ForCausalLM",),
    from_hf_config=from_hf_config,
    checkpoint_name=llama_checkpoint_name,
)
