"""A transformers ``config.json`` (as a dict) read into bluelower's config sections.

Shared by the LLaMA-style families (``llama``, ``qwen2``, ``idefics3``'s text model) and the
vision towers (``siglip``, ``idefics3``). Requires: the dict ``json.load`` gives for a
checkpoint's ``config.json`` (transformers 4.x layout: ``rope_theta`` / ``rope_scaling``) or
``PreTrainedConfig.to_dict()`` (5.x layout: ``rope_parameters``). Ensures: every field the
PyTorch module cannot compute faithfully (another activation, a rope type it lacks,
sliding-window attention, mixture of experts, biases it has no parameter for, a quantized
checkpoint) is refused with one :class:`BlueLowerError` line naming the field and its value;
anything else becomes the sections ``config_from_dict`` validates. Imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import fields

from ....errors import BlueLowerError
from ..config import ROPE_KEYS, ROPE_TYPES, RuntimeConfig

DEFAULT_KV_CAPACITY = 2048
DEFAULT_PREFILL_CHUNK = 128
# keys whose presence (with a true / non-zero value) means a mixture-of-experts MLP
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def refuse(name: str, what: str):
    raise BlueLowerError(f"config.json of '{name}': {what}")


def shown(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else f"'{value}'"


def check_architecture(hf: dict, name: str, architectures: tuple, model_types: tuple) -> None:
    """``architectures`` (a saved config.json) or else ``model_type`` (``to_dict()`` of a
    config built in Python has ``architectures: null``) must be one this family reads, and
    the checkpoint must not be a pre-quantized one."""
    archs = hf.get("architectures")
    if isinstance(archs, str):
        archs = [archs]
    if archs:
        if not any(a in architectures for a in archs):
            refuse(name, f"architectures {shown(archs)} is not {' or '.join(architectures)}")
    elif hf.get("model_type") not in model_types:
        refuse(name, f"model_type {shown(hf.get('model_type'))} is not {' or '.join(model_types)}")
    quantization = hf.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        refuse(name, f"quantization_config (quant_method {shown(method)}) is not supported: use an unquantized "
                     "checkpoint (bluelower quantizes with --quant)")


def required(hf: dict, name: str, key: str, where: str = ""):
    value = hf.get(key)
    if value is None:
        refuse(name, f"{where}{key} is missing")
    return value


def one_image_size(hf: dict, name: str, key: str, where: str) -> int:
    """``image_size`` / ``patch_size``: an int, or a square [h, w]."""
    value = required(hf, name, key, where)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            refuse(name, f"{where}{key} {shown(list(value))} is not square")
        value = value[0]
    return value


def rope_section(hf: dict, name: str, where: str = "") -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` in the schema's form (``rope_scaling``: rope_type and
    the numbers that type reads, or None for plain RoPE)."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        refuse(name, f"{where}rope_parameters {shown(params)} is not an object")
    if params and all(isinstance(v, dict) for v in params.values()):
        refuse(name, f"{where}rope_parameters per layer type ({', '.join(params)}) is not supported")
    rope = dict(params or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        refuse(name, f"{where}partial_rotary_factor {shown(partial)} is not supported (RoPE over the whole head only)")
    if rope_type not in ROPE_TYPES:
        refuse(name, f"{where}rope_scaling.rope_type {shown(rope_type)} is not supported (supported: "
                     f"{', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), None
    scaling = {"rope_type": rope_type}
    for key in ROPE_KEYS[rope_type]:
        if rope.get(key) is None:
            refuse(name, f"{where}rope_scaling.{key} is missing (rope_type {shown(rope_type)} reads it)")
        scaling[key] = rope[key]
    return float(theta), scaling


def decoder_section(hf: dict, name: str, where: str = "", attention_bias: bool | None = None) -> dict:
    """The ``decoder`` section of a LLaMA-style decoder (RMSNorm, RoPE, GQA, SwiGLU).

    ``attention_bias``: the family's fixed q/k/v bias (Qwen2: always), or None to read the
    config's ``attention_bias``. ``where``: the prefix naming a nested config in errors.
    """
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        refuse(name, f"{where}hidden_act {shown(act)} is not supported (the SwiGLU MLP computes silu)")
    if hf.get("mlp_bias"):
        refuse(name, f"{where}mlp_bias {shown(hf['mlp_bias'])} is not supported (the MLP has no biases)")
    for key in MOE_KEYS:
        if hf.get(key):
            refuse(name, f"{where}{key} {shown(hf[key])}: mixture-of-experts MLPs are not supported")
    sliding = hf.get("use_sliding_window") if "use_sliding_window" in hf else hf.get("sliding_window") is not None
    if sliding:
        refuse(name, f"{where}sliding_window {shown(hf.get('sliding_window'))} (use_sliding_window "
                     f"{shown(hf.get('use_sliding_window', True))}): sliding-window attention is not supported")
    layer_types = hf.get("layer_types") or []
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        refuse(name, f"{where}layer_types has {', '.join(map(shown, other))}: only full attention is supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(key):
            refuse(name, f"{where}{key} {shown(hf[key])} is not supported")
    hidden = required(hf, name, "hidden_size", where)
    heads = required(hf, name, "num_attention_heads", where)
    theta, scaling = rope_section(hf, name, where)
    return {
        "vocab_size": required(hf, name, "vocab_size", where),
        "hidden_size": hidden,
        "num_layers": required(hf, name, "num_hidden_layers", where),
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hidden // heads,
        "intermediate_size": required(hf, name, "intermediate_size", where),
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": bool(hf.get("attention_bias", False)) if attention_bias is None else attention_bias,
    }


def vision_section(hf: dict, name: str, where: str = "", use_head: bool = False) -> dict:
    """The ``vision`` section of a SigLIP-style ViT (GELU-tanh MLP)."""
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        refuse(name, f"{where}hidden_act {shown(act)} is not supported (the ViT MLP computes gelu_pytorch_tanh)")
    return {
        "image_size": one_image_size(hf, name, "image_size", where),
        "patch_size": one_image_size(hf, name, "patch_size", where),
        "num_channels": hf.get("num_channels", 3),
        "hidden_size": required(hf, name, "hidden_size", where),
        "num_layers": required(hf, name, "num_hidden_layers", where),
        "num_heads": required(hf, name, "num_attention_heads", where),
        "intermediate_size": required(hf, name, "intermediate_size", where),
        "layer_norm_eps": float(hf.get("layer_norm_eps", 1e-6)),
        "use_head": use_head,
    }


def first_id(value):
    """An id, or the first of a list of ids (None for none)."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def runtime_section(hf: dict, name: str, overrides: dict, max_positions=None, needs_eos: bool = True) -> dict:
    """The ``runtime`` section: the checkpoint's bos / eos ids (a list of eos ids: the first
    is ``eos_token_id``, the others ``stop_token_ids``), a KV cache of 2048 rows capped by
    ``max_position_embeddings``, the largest prefill chunk <= 128 dividing it, then the
    caller's ``overrides`` (any runtime key)."""
    known = {f.name for f in fields(RuntimeConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise BlueLowerError(f"unknown runtime setting(s) {', '.join(unknown)} (valid: {', '.join(sorted(known))})")
    out: dict = {}
    eos = hf.get("eos_token_id")
    eos_ids = [int(t) for t in eos] if isinstance(eos, (list, tuple)) else ([] if eos is None else [int(eos)])
    if eos_ids:
        out["eos_token_id"] = eos_ids[0]
        out["stop_token_ids"] = list(dict.fromkeys(t for t in eos_ids[1:] if t != eos_ids[0]))
    elif needs_eos and "eos_token_id" not in overrides:
        refuse(name, "eos_token_id is missing (pass eos_token_id=...)")
    bos = first_id(hf.get("bos_token_id"))
    if bos is not None:
        out["bos_token_id"] = int(bos)
    capacity = overrides.get("kv_capacity")
    if capacity is None:
        capacity = DEFAULT_KV_CAPACITY
        if isinstance(max_positions, int) and 0 < max_positions < capacity:
            capacity = max_positions
    out["kv_capacity"] = capacity
    if "prefill_chunk" not in overrides and isinstance(capacity, int) and capacity > 0:
        out["prefill_chunk"] = max(c for c in range(1, min(DEFAULT_PREFILL_CHUNK, capacity) + 1) if capacity % c == 0)
    out.update(overrides)
    if isinstance(out.get("stop_token_ids"), tuple):
        out["stop_token_ids"] = list(out["stop_token_ids"])
    return out
