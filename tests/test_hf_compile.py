"""`bluelower compile --hf DIR` on checkpoints transformers wrote (random-init, tiny, bf16 and
sharded): the build's logits and greedy tokens equal transformers' (fp32 compute on the
checkpoint's bf16 weights), every attention layer is fused, and --quant w4a16 puts every
decoder linear in INT4 (the default recipe: asymmetric, the logits' weight INT8)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from bluelower import api
from bluelower.errors import BlueLowerError

transformers = pytest.importorskip("transformers")

PROMPT = [3, 17, 92, 5, 41, 8, 200, 33, 9]


def _save(model, path: str) -> str:
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True, max_shard_size="60KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))  # sharded
    return path


def _llama(tmp):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=256, rope_theta=100000.0)
    torch.manual_seed(0)
    return _save(transformers.LlamaForCausalLM(cfg), str(tmp / "llama"))


def _qwen2(tmp):
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random-init biases are zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return _save(model, str(tmp / "qwen2"))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def text_checkpoint(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    path = {"llama": _llama, "qwen2": _qwen2}[request.param](tmp)
    build = str(tmp / "build")
    manifest = api.compile(checkpoint=path, output=build, quant="fp32", kv_capacity=64, prefill_chunk=16)
    return path, build, manifest


def _reference(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def test_logits_and_greedy_tokens_equal_transformers(text_checkpoint):
    from bluelower.runtime_stubs.generate import CompiledModel, generate

    path, build, _ = text_checkpoint
    ref = _reference(path)
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPT])).logits[0, -1].numpy()
        want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    got = generate(CompiledModel(build), None, PROMPT, 12)
    scale = float(np.abs(logits).max())
    assert float(np.abs(got.first_logits[0] - logits).max()) <= 1e-4 * scale
    assert got.tokens == want


def test_every_attention_layer_is_fused(text_checkpoint):
    _, _, manifest = text_checkpoint
    layers = manifest["model"]["decoder"]["num_layers"]
    fused = next(p["stats"] for p in manifest["passes"] if p["name"] == "FuseAttention")
    assert fused["per_function"] == {"decode": layers, "prefill": layers}


def test_w4a16_puts_every_decoder_linear_in_int4(text_checkpoint):
    from bluelower.lowering.frontend.sources import checkpoint_source
    from bluelower.passes.ir_utils import result

    from conftest import run_pipeline_until

    path, _, _ = text_checkpoint
    cfg = checkpoint_source(path, kv_capacity=64, prefill_chunk=16).cfg
    mod, _ = run_pipeline_until(cfg, "w4a16", stop_after="QuantizeWeights")
    stats = json.loads(str(mod.attrs["bluelower.pass_stats"]))["QuantizeWeights"]
    d = cfg.decoder
    # the default recipe: q, k, v, o, gate, up, down INT4 asymmetric, the logits' weight (tied or
    # not) INT8 per row, in prefill and decode
    assert stats["int4_asym_layers"] == 2 * d.num_layers * 7
    assert stats["int8_layers"] == 2
    assert stats["kept_fp32_layers"] == 0 and stats.get("int4_layers", 0) == 0
    assert stats["embedding_tables_quantized"] == 1
    assert {t[1] for t in result(mod, "quantized_params").values()} <= {"int4_asym_groupwise", "int4_asym_rows",
                                                                        "int8_per_channel"}


def test_unknown_architecture_is_one_line(tmp_path):
    path = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(path))
    with pytest.raises(BlueLowerError, match=r"unknown architecture \['GPT2LMHeadModel'\]") as info:
        api.compile(checkpoint=str(path), output=str(tmp_path / "b"), quant="fp32")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "b").exists()


def test_missing_and_misshaped_tensors_are_one_line(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = _llama(tmp_path)
    for case in ("missing", "misshaped", "extra"):
        path = str(tmp_path / case)
        shutil.copytree(src, path)
        index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
        name = "model.layers.1.mlp.down_proj.weight"
        shard = os.path.join(path, index["weight_map"][name])
        tensors = load_file(shard)
        if case == "missing":
            del tensors[name]
            del index["weight_map"][name]
        elif case == "misshaped":
            tensors[name] = tensors[name][:, :-1].contiguous()
        else:
            tensors["model.layers.1.mlp.extra.weight"] = tensors[name].clone()
            index["weight_map"]["model.layers.1.mlp.extra.weight"] = index["weight_map"][name]
        save_file(tensors, shard, metadata={"format": "pt"})
        json.dump(index, open(os.path.join(path, "model.safetensors.index.json"), "w"))
        with pytest.raises(BlueLowerError) as info:
            api.compile(checkpoint=path, output=str(tmp_path / f"out-{case}"), quant="fp32")
        msg = str(info.value)
        assert "\n" not in msg and ("down_proj" in msg or "extra" in msg), msg
        assert {"missing": "missing weight", "misshaped": "has shape", "extra": "are not weights"}[case] in msg


def test_siglip_vision_tower_equals_transformers(tmp_path):
    from bluelower.runtime_stubs.generate import CompiledModel

    cfg = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=56, patch_size=14)
    torch.manual_seed(2)
    path = _save(transformers.SiglipVisionModel(cfg), str(tmp_path / "siglip"))
    build = str(tmp_path / "build")
    manifest = api.compile(checkpoint=path, output=build, quant="fp32")
    ref = transformers.SiglipVisionModel.from_pretrained(path, dtype=torch.float32).eval()
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(pixel_values=pixels)
    got = CompiledModel(build).encode_outputs(pixels.numpy())
    for ours, theirs in zip(got, (want.last_hidden_state, want.pooler_output)):
        theirs = theirs.numpy()
        assert float(np.abs(ours - theirs).max()) <= 1e-4 * float(np.abs(theirs).max())
    fused = next(p["stats"] for p in manifest["passes"] if p["name"] == "FuseAttention")
    assert fused["per_function"]["encode_image"] == 2 + 1  # the layers and the head's pooling attention


def test_idefics3_vlm_equals_transformers(tmp_path):
    """A SmolVLM-style VLM (SigLIP-like tower, pixel-shuffle connector, Llama text model):
    the image's rows go where the prompt's image tokens are."""
    from bluelower.runtime_stubs.generate import IMAGE, CompiledModel, generate

    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
        scale_factor=2, image_token_id=299, tie_word_embeddings=False)
    torch.manual_seed(4)
    model = transformers.Idefics3ForConditionalGeneration(config)
    with torch.no_grad():  # random init is near-uniform: widen it so tokens are decided
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    path = _save(model, str(tmp_path / "idefics3"))
    build = str(tmp_path / "build")
    api.compile(checkpoint=path, output=build, quant="fp32", kv_capacity=64, prefill_chunk=16)
    ref = transformers.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    before, after = [5, 60, 7, 9, 100], [11, 42, 8, 77, 13, 21]
    ids = torch.tensor([before + [299] * 16 + after])
    with torch.no_grad():
        logits = ref(input_ids=ids, pixel_values=pixels[:, None]).logits[0, -1].numpy()
    got = generate(CompiledModel(build), pixels.numpy(), [before, IMAGE, after], 8)
    assert float(np.abs(got.first_logits[0] - logits).max()) <= 1e-4 * float(np.abs(logits).max())
    with torch.no_grad():
        want = ref.generate(input_ids=ids, pixel_values=pixels[:, None], max_new_tokens=8, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert got.tokens == want
