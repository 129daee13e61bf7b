"""Helpers for benchmarks/llm_bench.py: bench configs, seeded weights, GGUF export.

Everything large (safetensors, GGUF, builds) goes under the cache directory
(``$BLUELOWER_BENCH_CACHE``, default ``~/.cache/bluelower-bench``), never into git.
"""

from __future__ import annotations

import json
import os

import numpy as np

CACHE = os.environ.get("BLUELOWER_BENCH_CACHE", os.path.expanduser("~/.cache/bluelower-bench"))

# A 1-layer, 64-wide vision tower: only the decoder is big (the LLM benchmark never runs
# encode_image; the tower is there because the config schema requires one).
_TINY_VISION = {"image_size": 384, "patch_size": 14, "hidden_size": 64, "num_layers": 1, "num_heads": 4,
                "intermediate_size": 128, "layer_norm_eps": 1e-6}
# kv_capacity 2048 / prefill_chunk 128 = the bluelm-v-3b runtime setting for every size.
_RUNTIME = {"kv_capacity": 2048, "prefill_chunk": 128, "image_batch": 1, "eos_token_id": 2}

DECODERS = {
    # tiny: the shipped tiny decoder (vocab 512, 2 layers, width 64) with a 2048 cache.
    "tiny": ({"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "head_dim": 16, "intermediate_size": 160, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}, 0.3),
    # mid: bluelm-v-3b's head_dim / GQA ratio / FFN ratio at 1/2.5 width, 4 layers, 32k vocab.
    "mid": ({"vocab_size": 32000, "hidden_size": 1024, "num_layers": 4, "num_heads": 16, "num_kv_heads": 4,
             "head_dim": 64, "intermediate_size": 2816, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}, 0.02),
    # 3b: the bluelm-v-3b decoder exactly (bluelower/lowering/models/configs/bluelm-v-3b.json).
    "3b": ({"vocab_size": 100096, "hidden_size": 2560, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
            "head_dim": 80, "intermediate_size": 6912, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}, 0.02),
}


def host_soc_path() -> str:
    """A SoC file for *this* machine's CPU: the shipped ``host.toml`` with ``mcpu`` set to
    the CPU LLVM detects (e.g. ``rocketlake``). The shipped ``host`` target is generic x86-64
    (SSE2, reproducible on any machine), which leaves the vectorized kernels 5-10x slower;
    llama.cpp and PyTorch run their AVX-512 code here, so the comparison must too."""
    import tvm

    from bluelower.targets.soc import SOC_DIR

    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if not cpu or cpu == "generic":
        return "host"
    text = open(os.path.join(SOC_DIR, "host.toml")).read()
    text = text.replace('name = "host"', f'name = "host-{cpu}"', 1)
    text = text.replace("cores = 2\n", f'cores = 2\nmcpu = "{cpu}"  # llm_bench: this machine\'s CPU (LLVM)\n', 1)
    if f'mcpu = "{cpu}"' not in text:
        raise RuntimeError("host.toml layout changed: cannot add mcpu")
    path = os.path.join(CACHE, f"host-{cpu}.toml")
    os.makedirs(CACHE, exist_ok=True)
    if not os.path.isfile(path) or open(path).read() != text:
        with open(path, "w") as fh:
            fh.write(text)
    return path


def size_dir(size: str) -> str:
    d = os.path.join(CACHE, size)
    os.makedirs(d, exist_ok=True)
    return d


def config_path(size: str) -> str:
    """Write (idempotently) and return the decoder-focused config JSON for ``size``."""
    dec, std = DECODERS[size]
    data = {
        "name": f"llm-bench-{size}",
        "notes": ["benchmarks/llm_bench.py: decoder-focused config (1-layer 64-wide vision tower)."],
        "vision": _TINY_VISION,
        "projector": {"downsample_factor": 2, "downsample_size": 64},
        "decoder": dec,
        "runtime": dict(_RUNTIME, init_std=std),
    }
    path = os.path.join(size_dir(size), "config.json")
    text = json.dumps(data, indent=1, sort_keys=True)
    if not os.path.isfile(path) or open(path).read() != text:
        with open(path, "w") as fh:
            fh.write(text)
    return path


def weights_path(size: str, seed: int = 0, log=print) -> str:
    """Seeded random fp32 safetensors for the bench config, streamed tensor by tensor
    (bluelower.lowering.frontend.weights.write_safetensors); cached."""
    from bluelower.lowering.models import load_config
    from bluelower.lowering.frontend.weights import model_weight_specs, random_weight, write_safetensors

    path = os.path.join(size_dir(size), f"weights-seed{seed}.safetensors")
    if os.path.isfile(path):
        return path
    cfg = load_config(config_path(size))
    specs = model_weight_specs(cfg)
    log(f"[weights] writing {path}")
    tmp = path + ".partial"
    write_safetensors(tmp, [(n, s, d) for n, (s, d) in specs.items()],
                      lambda n: random_weight(n, specs[n][0], seed, cfg.runtime.init_std, salt="bench:"),
                      metadata={"bluelower_model": cfg.name, "seed": seed, "generator": "llm_bench"},
                      label="bench weights")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------ GGUF


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate_half) -> llama.cpp (interleaved RoPE) row order, as convert_hf_to_gguf.py."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str | None:
    p = "language_model.model."
    if hf == p + "embed_tokens.weight":
        return "token_embd.weight"
    if hf == p + "norm.weight":
        return "output_norm.weight"
    if hf == "language_model.lm_head.weight":
        return "output.weight"
    if hf.startswith(p + "layers."):
        rest = hf[len(p + "layers."):]
        n, sub = rest.split(".", 1)
        m = {
            "input_layernorm.weight": "attn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight",
            "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight",
            "self_attn.o_proj.weight": "attn_output.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight",
            "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight",
        }
        return f"blk.{n}.{m[sub]}"
    return None  # vision tower / projector: not part of the LLM


def gguf_path(size: str, qtype: str = "Q4_0", seed: int = 0, log=print) -> str:
    """GGUF (llama architecture) of the same safetensors weights; matrices in ``qtype``
    (Q4_0 or F32), norms F32; minimal dummy SPM vocabulary. Cached."""
    import gguf

    from bluelower.lowering.models import load_config
    from bluelower.lowering.frontend.weights import WeightSource

    path = os.path.join(size_dir(size), f"model-seed{seed}-{qtype}.gguf")  # of weights_path's file
    if os.path.isfile(path):
        return path
    cfg = load_config(config_path(size))
    d = cfg.decoder
    src = WeightSource(weights_path(size, seed, log))
    log(f"[gguf] writing {path}")
    w = gguf.GGUFWriter(path + ".partial", "llama")
    w.add_name(cfg.name)
    w.add_context_length(4096)
    w.add_embedding_length(d.hidden_size)
    w.add_block_count(d.num_layers)
    w.add_feed_forward_length(d.intermediate_size)
    w.add_head_count(d.num_heads)
    w.add_head_count_kv(d.num_kv_heads)
    w.add_key_length(d.head_dim)
    w.add_value_length(d.head_dim)
    w.add_rope_dimension_count(d.head_dim)
    w.add_layer_norm_rms_eps(d.rms_norm_eps)
    w.add_rope_freq_base(d.rope_theta)
    w.add_vocab_size(d.vocab_size)
    ft = gguf.LlamaFileType.MOSTLY_Q4_0 if qtype == "Q4_0" else gguf.LlamaFileType.ALL_F32
    w.add_file_type(ft)
    # minimal SPM vocabulary: <unk> <s> </s>, 256 byte tokens, then dummies
    toks, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    toks += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    while len(toks) < d.vocab_size:
        toks.append(f"tok{len(toks)}")
        types.append(1)
    toks, types = toks[: d.vocab_size], types[: d.vocab_size]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(cfg.runtime.eos_token_id)
    w.add_unk_token_id(0)
    for hf in src.names():
        name = gguf_name(hf)
        if name is None:
            continue
        arr = src.read(hf).astype(np.float32)
        if name.endswith("attn_q.weight"):
            arr = permute_qk(arr, d.num_heads)
        elif name.endswith("attn_k.weight"):
            arr = permute_qk(arr, d.num_kv_heads)
        if arr.ndim == 2 and qtype == "Q4_0":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr))
        del arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(path + ".partial", path)
    return path


# ------------------------------------------------------------------- roofline


def decode_bytes(cfg, engine: str, quant: str, context: int, stored_weight_bytes: int | None = None) -> dict:
    """Bytes one decode token must read: every decoder weight once at its stored
    precision (embedding: one row) + the KV cache it attends over. ``stored_weight_bytes``:
    the build's own figure (its manifest's ``functions.decode.weights_bytes_per_call``: the
    recipe's formats, e.g. INT4 asymmetric at 5 bits per weight and an INT8 lm_head); without
    it, 4.5 bits per matrix weight (Q4_0, or symmetric INT4 group 32 + an fp16 scale)."""
    d = cfg.decoder
    h, L = d.hidden_size, d.num_layers
    kvw = d.num_kv_heads * d.head_dim
    per_layer = h * d.num_heads * d.head_dim * 2 + h * kvw * 2 + 3 * h * d.intermediate_size
    matrices = L * per_layer + d.vocab_size * h  # + lm_head
    norms = (2 * L + 1) * h
    llama = engine.startswith("llamacpp")
    if stored_weight_bytes is not None:
        wbytes = stored_weight_bytes
    elif llama or quant.startswith("w4"):
        wbytes = matrices * 18 / 32 + norms * 4 + h * 18 / 32  # Q4_0 / int4-g32 + fp16 scale: 4.5 bit
    else:
        wbytes = (matrices + norms + h) * 4
    kv_elem = 2 if llama else 4 if engine == "torch" else (1 if quant.endswith("kv8") else 4)
    # ideal: the ``context`` filled rows (bluelower / torch actually attend over the whole,
    # masked, cache capacity; see docs/benchmarks.md)
    kv_rows = context
    kvbytes = L * 2 * kvw * kv_rows * kv_elem
    return {"weight_bytes": int(wbytes), "kv_bytes": int(kvbytes), "total_bytes": int(wbytes + kvbytes)}
