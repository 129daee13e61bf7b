"""Quantization algorithms and recipes (lowering/quant: recipe, stored, gptq, calibration,
evaluate): fast, on tiny random matrices and tiny random models. The real-model numbers
are benchmarks/quant_recipe.py's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bluelower.errors import BlueLowerError
from bluelower.lowering.kernels import (
    dequantize_int4_asym,
    dequantize_int4_groupwise,
    dequantize_int8_groupwise,
    pack_int4_asym,
    pack_int4_groupwise,
    pack_int8_groupwise,
)
from bluelower.lowering.quant.gptq import Hessian, gptq_codes, gptq_quantize, output_error
from bluelower.lowering.quant.recipe import (
    FP32,
    default_recipe,
    load_recipe,
    recipe_from_data,
    weight_format,
)
from bluelower.lowering.quant.stored import fake_quantize, store_weight

GROUPED = [("int4", False), ("int4", True), ("int4_asym", False), ("int4_asym", True), ("int8_group", False)]


def correlated_inputs(k: int, rows: int = 1024, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated channels and a few large ones (as LLM activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.4 + np.eye(k)
    x = rng.standard_normal((rows, k)) @ mix
    x[:, :3] *= 8.0  # outlier channels
    return torch.tensor(x, dtype=torch.float32)


def heavy_weight(n: int, k: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(4, (n, k)) * 0.02).astype(np.float32)


# ------------------------------------------------------------------ GPTQ


@pytest.mark.parametrize("kind,search", GROUPED)
def test_gptq_lowers_the_layer_output_error_vs_round_to_nearest(kind, search):
    w = heavy_weight(64, 96)
    hess = Hessian(96)
    hess.add(correlated_inputs(96))
    fmt = weight_format(kind, 32, search, "gptq")
    rtn = output_error(w, store_weight(w, fmt).dequantize(), hess.h)
    for act_order in (False, True):
        gptq = output_error(w, gptq_quantize(w, hess.h, fmt, act_order=act_order).dequantize(), hess.h)
        assert gptq < 0.8 * rtn, (kind, search, act_order, gptq, rtn)


@pytest.mark.parametrize("kind,search", GROUPED)
def test_gptq_with_an_identity_hessian_is_round_to_nearest_bit_for_bit(kind, search):
    w = heavy_weight(64, 96, seed=3)
    fmt = weight_format(kind, 32, search, "gptq")
    rtn, gptq = store_weight(w, fmt), gptq_quantize(w, np.eye(96, dtype=np.float32), fmt)
    assert len(rtn.parts) == len(gptq.parts)
    for a, b in zip(rtn.parts, gptq.parts):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("kind", ["int4", "int4_asym", "int8_group"])
def test_gptq_codes_pack_with_the_kernels_packers_and_dequantize_to_the_algorithms_weights(kind, act_order):
    n, k, gs = 64, 128, 32
    w = heavy_weight(n, k, seed=5)
    hess = Hessian(k)
    hess.add(correlated_inputs(k, seed=2))
    fmt = weight_format(kind, gs, False, "gptq")
    c = gptq_codes(w, hess.h, fmt, act_order=act_order)
    s = c.scales.astype(np.float32).repeat(gs, axis=1)
    if kind == "int4":
        assert c.codes.dtype == np.uint8 and c.codes.max() <= 15
        expect = s * (c.codes.astype(np.float32) - 8)
        packed = pack_int4_groupwise(c.codes, c.scales)
        got = dequantize_int4_groupwise(*packed, group_size=gs)
    elif kind == "int4_asym":
        expect = s * c.codes.astype(np.float32) + c.mins.astype(np.float32).repeat(gs, axis=1)
        packed = pack_int4_asym(c.codes, c.scales, c.mins)
        got = dequantize_int4_asym(*packed, group_size=gs)
    else:
        assert c.codes.dtype == np.int8
        expect = s * c.codes.astype(np.float32)
        packed = pack_int8_groupwise(c.codes, c.scales)
        got = dequantize_int8_groupwise(*packed, group_size=gs)
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(gptq_quantize(w, hess.h, fmt, act_order=act_order).dequantize(), expect)


def test_gptq_pads_shapes_as_the_compiler_stores_them():
    w = heavy_weight(40, 72, seed=7)  # N not a multiple of 32, K not of the group size
    hess = Hessian(72)
    hess.add(correlated_inputs(72))
    fmt = weight_format("int4", 32, False, "gptq")
    st = gptq_quantize(w, hess.h, fmt)
    assert st.args.get("pad_n") == 64 and st.args.get("pad_k") == 96
    assert st.dequantize().shape == (40, 72)
    assert output_error(w, st.dequantize(), hess.h) < output_error(w, fake_quantize(w, fmt), hess.h)


def test_gptq_refuses_per_channel_formats():
    with pytest.raises(BlueLowerError, match="group-wise"):
        weight_format("int8", None, False, "gptq")
    with pytest.raises(ValueError, match="group-wise"):
        gptq_codes(heavy_weight(32, 32), np.eye(32), weight_format("int8"))


# ------------------------------------------------------------------ recipes


def test_rules_first_match_wins_with_globs_roles_uses_and_layers():
    r = recipe_from_data({"kv_cache": "int8", "rules": [
        {"match": "model.layers.*.mlp.down_proj.weight", "layers": [0, 2], "format": "int8"},
        {"role": "lm_head", "format": "int8_group", "group_size": 64},
        {"role": "embedding", "use": "table", "format": "int4_asym", "search": True},
        {"role": ["attention", "mlp"], "format": "int4", "method": "gptq"},
    ]})
    assert r.kv_cache == "int8" and r.uses_gptq
    assert r.format_for("model.layers.0.mlp.down_proj.weight", "mlp").kind == "int8"
    assert r.format_for("model.layers.1.mlp.down_proj.weight", "mlp") == weight_format("int4", 32, False, "gptq")
    assert r.format_for("model.layers.12.mlp.down_proj.weight", "mlp").kind == "int4"  # 12 is not 2
    # the tied table: its linear use is the lm_head, its lookups the embedding
    assert r.format_for("model.embed_tokens.weight", "embedding", "linear") == weight_format("int8_group", 64)
    assert r.format_for("model.embed_tokens.weight", "embedding", "table") == weight_format("int4_asym", 32, True)
    assert r.format_for("lm_head.weight", "lm_head") == weight_format("int8_group", 64)
    assert r.format_for("vision.blocks.0.fc1.weight", "vision") == FP32  # no rule: fp32
    assert recipe_from_data(r.to_data()) == r


def test_a_table_never_gets_gptq():
    r = recipe_from_data([{"role": ["embedding"], "format": "int4", "method": "gptq"}])
    assert r.format_for("model.embed_tokens.weight", "embedding", "table").method == "rtn"
    assert r.format_for("model.embed_tokens.weight", "embedding", "linear") == FP32  # lm_head role: no rule


@pytest.mark.parametrize("rules,message", [
    ([{"format": "int3"}], "rule 1: unknown format 'int3'"),
    ([{"role": "mlp"}], "rule 1: missing 'format'"),
    ([{"format": "int4"}, {"format": "int4", "group_size": 30}], "rule 2: group_size must be a positive multiple of 4"),
    ([{"format": "int8", "group_size": 32}], "rule 1: format 'int8' has no group_size"),
    ([{"format": "int8", "search": True}], "rule 1: search applies to int4"),
    ([{"format": "int4", "method": "awq"}], "rule 1: unknown method 'awq'"),
    ([{"format": "int4", "role": "mlps"}], "rule 1: unknown role 'mlps'"),
    ([{"format": "int4", "use": "lookup"}], "rule 1: unknown use 'lookup'"),
    ([{"format": "int4", "layers": "0-3"}], "rule 1: layers must be a list"),
    ([{"format": "int4", "pattern": "x"}], "rule 1: unknown key 'pattern'"),
    ({"rules": [], "kv_cache": "int4"}, "unknown kv_cache 'int4'"),
    ({"rule": []}, "unknown key 'rule'"),
])
def test_rule_errors_are_one_line_and_name_the_rule(rules, message):
    with pytest.raises(BlueLowerError) as info:
        recipe_from_data(rules, "r.json")
    text = str(info.value)
    assert message in text and text.startswith("r.json") and "\n" not in text


def test_rule_files_json_and_toml(tmp_path):
    data = {"kv_cache": "int8", "rules": [{"role": "lm_head", "format": "int8"},
                                          {"role": ["attention", "mlp"], "format": "int4", "search": True}]}
    p = tmp_path / "rules.json"
    p.write_text(json.dumps(data))
    t = tmp_path / "rules.toml"
    t.write_text('kv_cache = "int8"\n[[rules]]\nrole = "lm_head"\nformat = "int8"\n'
                 '[[rules]]\nrole = ["attention", "mlp"]\nformat = "int4"\nsearch = true\n')
    assert load_recipe(str(p)) == load_recipe(str(t)) == recipe_from_data(data)
    bad = tmp_path / "bad.json"
    bad.write_text("{rules: []")
    with pytest.raises(BlueLowerError, match=r"^bad.json: not valid JSON"):
        load_recipe(str(bad))
    with pytest.raises(BlueLowerError, match="cannot read quantization rules"):
        load_recipe(str(tmp_path / "missing.json"))


def test_default_recipes_load():
    for mode in ("w8", "w4a16", "w4a16kv8"):
        r = default_recipe(mode)
        assert r.format_for("model.layers.0.self_attn.q_proj.weight", "attention").quantized
    assert default_recipe("w4a16kv8").kv_cache == "int8"
    with pytest.raises(BlueLowerError, match="no default quantization recipe"):
        default_recipe("w3")


# ------------------------------------------------------------------ the harness


def tiny_llama(tied: bool = True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a less flat model than the default init
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return model


def test_harness_perplexity_equals_transformers_loss():
    from bluelower.lowering.quant.evaluate import reference, score_text

    model = tiny_llama()
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = float(model(input_ids=ids[None], labels=ids[None]).loss)
    score = score_text(model, ids)
    assert score.tokens == 39 and math.isclose(score.nll, loss, rel_tol=1e-5)
    ref = reference(model, ids)
    same = score_text(model, ids, ref)
    assert same.top1 == 1.0 and same.max_logit_error == 0.0 and abs(same.kl) < 1e-9
    chunked = score_text(model, ids, chunk=16)  # windows 0-16, 16-32, 32-40
    assert chunked.tokens == 15 + 15 + 7


def test_fake_quantization_uses_the_kernels_weights_and_restores_the_model():
    from bluelower.lowering.quant.evaluate import fake_quantized, reference, score_text

    model = tiny_llama(tied=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    table = before["model.embed_tokens.weight"]
    ids = torch.randint(0, 96, (32,), generator=torch.Generator().manual_seed(2))
    ref = reference(model, ids)
    r = recipe_from_data({"rules": [{"role": "embedding", "use": "table", "format": "int8"},
                                    {"role": "lm_head", "format": "int4", "group_size": 32},
                                    {"role": ["attention", "mlp"], "format": "int4_asym", "search": True}]})
    with fake_quantized(model, r) as report:
        q = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
        w = before["model.layers.1.mlp.down_proj.weight"].numpy()
        np.testing.assert_array_equal(q, fake_quantize(w, weight_format("int4_asym", 32, True)))
        # the tied table is untied: lookups INT8 rows, logits INT4
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(),
                                      fake_quantize(table.numpy(), weight_format("int8"), "table"))
        np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(),
                                      fake_quantize(table.numpy(), weight_format("int4")))
        score = score_text(model, ids, ref)
    parts = report.part_bytes()
    assert parts["table"] == 96 * 64 + 4 * 96  # int8 rows + float32 scales
    assert parts["lm_head"] == 96 * 64 // 2 + 96 * 2 * 2  # nibbles + float16 scale per 32
    assert 0 < score.top1 <= 1 and score.max_logit_error > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie restored
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_kv_int8_emulation_perturbs_slightly_and_restores():
    from bluelower.lowering.quant.evaluate import kv_int8, reference, score_text

    model = tiny_llama()
    ids = torch.randint(0, 96, (32,), generator=torch.Generator().manual_seed(3))
    ref = reference(model, ids)
    with kv_int8(model):
        s = score_text(model, ids, ref)
    assert 0 < s.max_logit_error < 0.05 * float(ref.logits.abs().max())
    assert score_text(model, ids, ref).max_logit_error == 0.0


# ------------------------------------------------------------------ calibration, streamed


def tiny_bluelower_llama():
    from bluelower.lowering.models.config import DecoderConfig

    cfg = DecoderConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=128, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True)
    rng = np.random.default_rng(4)
    weights = {"model.embed_tokens.weight": rng.standard_normal((96, 64)).astype(np.float32),
               "model.norm.weight": np.ones(64, np.float32)}
    shapes = {"self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64),
              "self_attn.v_proj.weight": (32, 64), "self_attn.o_proj.weight": (64, 64),
              "mlp.gate_proj.weight": (128, 64), "mlp.up_proj.weight": (128, 64), "mlp.down_proj.weight": (64, 128),
              "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,)}
    for i in range(2):
        for n, shape in shapes.items():
            weights[f"model.layers.{i}.{n}"] = (np.ones(shape) if len(shape) == 1 else
                                                rng.standard_t(4, shape) * 0.1).astype(np.float32)
    return cfg, weights


def test_streamed_gptq_over_bluelower_llama_modules():
    from bluelower.lowering.models.llama import weight_role
    from bluelower.lowering.quant.calibration import gptq_llama_decoder

    cfg, weights = tiny_bluelower_llama()
    reads = []

    def read(name):
        reads.append(name)
        return weights[name]

    rng = np.random.default_rng(5)
    sequences = [rng.integers(0, 96, 48) for _ in range(4)]
    recipe = recipe_from_data([{"role": ["attention", "mlp", "lm_head"], "format": "int4", "method": "gptq"}])
    out = list(gptq_llama_decoder(read, cfg, sequences, recipe, weight_role))
    names = [n for n, _u, _s in out]
    assert names[-1] == "model.embed_tokens.weight" and all(u == "linear" for _n, u, _s in out)
    assert len(names) == 2 * 7 + 1 and len(set(names)) == len(names)
    # layer by layer: every layer-0 tensor is read before any layer-1 tensor
    first_l1 = next(i for i, n in enumerate(reads) if n.startswith("model.layers.1."))
    assert all(not n.startswith("model.layers.0.") for n in reads[first_l1:])
    for name, _use, st in out:
        assert st.dequantize().shape == weights[name].shape and st.fmt.method == "gptq"
    # end to end on the calibration tokens: the GPTQ decoder's hidden states are closer to
    # fp32 than round-to-nearest's
    gptq_w = {**weights, **{n: s.dequantize() for n, _u, s in out if n != "model.embed_tokens.weight"}}
    rtn_w = {n: (fake_quantize(w, weight_format("int4")) if n in gptq_w and w.ndim == 2 and ".layers." in n else w)
             for n, w in weights.items()}
    ref = [decoder_hidden(cfg, weights, ids) for ids in sequences]
    err_gptq = sum(float(((decoder_hidden(cfg, gptq_w, ids) - r) ** 2).sum()) for ids, r in zip(sequences, ref))
    err_rtn = sum(float(((decoder_hidden(cfg, rtn_w, ids) - r) ** 2).sum()) for ids, r in zip(sequences, ref))
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def decoder_hidden(cfg, weights: dict, ids) -> torch.Tensor:
    """The last layer's output (before the final norm) of bluelower's llama layers."""
    from bluelower.lowering.models.llama.model import LlamaDecoderLayer
    from bluelower.lowering.quant.calibration import llama_layer_runner

    run = llama_layer_runner(cfg)
    x = torch.from_numpy(weights["model.embed_tokens.weight"][np.asarray(ids)])
    with torch.no_grad():
        for i in range(cfg.num_layers):
            layer = LlamaDecoderLayer(cfg, False)
            for n, p in layer.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(weights[f"model.layers.{i}.{n}"], np.float32)))
            x = run(layer, x)
    return x
