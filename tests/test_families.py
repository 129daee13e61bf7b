"""The model families users bring (llama, qwen2, siglip, idefics3) against transformers.

For each family: a transformers model from a tiny config object (random weights, seeded),
our module from ``SPEC.from_hf_config(hf_config.to_dict(), ...)``, the transformers state
dict loaded into ours through ``SPEC.checkpoint_name`` (strict: every weight of ours filled,
every checkpoint tensor used or mapped to None), then fp32 comparisons: full-sequence
logits (embed -> prefill in chunks, the last padded with garbage rows) and 16 greedy
decode steps against ``generate`` for the text families; ``encode_image`` against
``SiglipVisionModel`` / ``get_image_features``; an Idefics3 prompt with the image features
spliced at its placeholder tokens against ``Idefics3ForConditionalGeneration``. Also the
one-line refusals of ``from_hf_config``, the schema without a decoder, and that a tiny
config of each family imports through bluelower's torch importer on meta tensors.

Tolerance: logits within 1e-4 of the reference's largest magnitude (float32 in another
summation order measures ~1e-6; a wrong rope, mask, bias or norm is off by far more).
"""

from __future__ import annotations

import pytest
import torch

from bluelower.errors import BlueLowerError
from bluelower.lowering.models import config_from_dict, load_config, registry

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4
CHUNK, CAPACITY, NEW_TOKENS = 8, 64, 16


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def randomize(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Every parameter drawn again (biases too, which transformers initializes to zero):
    norms near 1, the rest N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else std * noise)


def load_by_checkpoint_name(spec, cfg, module, hf_state: dict) -> None:
    """``hf_state`` into ``module`` through ``spec.checkpoint_name``, strictly."""
    ours = dict(module.named_parameters())
    state, dropped = {}, []
    for name, tensor in hf_state.items():
        target = spec.checkpoint_name(name, cfg)
        if target is None:
            dropped.append(name)
            continue
        assert target in ours, f"checkpoint tensor {name} -> {target}, not a weight of the module"
        assert target not in state, f"two checkpoint tensors map to {target}"
        assert tuple(tensor.shape) == tuple(ours[target].shape), name
        state[target] = tensor
    assert sorted(set(ours) - set(state)) == [], "weights of the module no checkpoint tensor fills"
    for name in dropped:  # only a tied lm_head is a dropped weight here: it must equal the table
        if name.endswith("lm_head.weight"):
            table = next(t for n, t in hf_state.items() if n.endswith("embed_tokens.weight"))
            assert torch.equal(hf_state[name], table)
    module.load_state_dict(state, strict=True)


def our_module(spec, cfg):
    return spec.build_module(cfg).eval()


# ----------------------------------------------------------------------------- text


def prompt_logits(model, embeddings: torch.Tensor, chunk: int, seed: int = 0):
    """Every row's logits through ``prefill`` in chunks (the last padded with garbage rows),
    and the cache after the prompt. Each row's logits: the chunk run with num_valid = row + 1
    on the same cache (the cache written is the same for every num_valid)."""
    n, width = embeddings.shape
    cache = model.new_kv_cache()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, n, chunk):
        block = embeddings[start : start + chunk]
        valid = block.shape[0]
        if valid < chunk:  # garbage, not zeros: padded rows must not influence valid ones
            block = torch.cat([block, 3 * torch.randn(chunk - valid, width, generator=gen)])
        for k in range(1, valid + 1):
            logits, new_cache = model.prefill(block, cache, torch.tensor([start]), torch.tensor([k]))
            rows.append(logits[0])
        cache = new_cache
    return torch.stack(rows), cache


def greedy_decode(model, first_logits: torch.Tensor, cache, position: int, steps: int):
    tokens, logits_seq = [int(first_logits.argmax())], [first_logits]
    for i in range(steps - 1):
        logits, cache = model.decode(torch.tensor([tokens[-1]]), cache, torch.tensor([position + i]))
        logits_seq.append(logits[0])
        tokens.append(int(logits[0].argmax()))
    return tokens, torch.stack(logits_seq)


def hf_greedy(hf, input_ids: torch.Tensor, steps: int, **inputs):
    gen = transformers.GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                        eos_token_id=None, pad_token_id=0, output_logits=True,
                                        return_dict_in_generate=True)
    out = hf.generate(input_ids[None], generation_config=gen, **inputs)
    tokens = out.sequences[0, input_ids.shape[0]:].tolist()
    return tokens, torch.stack([lg[0] for lg in out.logits])


TEXT_CASES = {
    # name: (family, transformers config kwargs)
    "llama-gqa-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mqa-tied-llama3-headdim": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama-mha-linear-bias": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=4, attention_bias=True, tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-gqa-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                     rope_theta=1000000.0)),
    "qwen2-mha-untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
}


def hf_text_model(family: str, kwargs: dict, attn: str, seed: int):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, rms_norm_eps=1e-5,
                max_position_embeddings=128, bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    cls, model_cls = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if family == "llama"
                      else (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    kwargs = dict(kwargs)
    rope = kwargs.pop("rope_scaling", None)
    theta = kwargs.pop("rope_theta", 10000.0)
    config = cls(**base, **kwargs, rope_parameters={"rope_type": "default", **(rope or {}), "rope_theta": theta})
    torch.manual_seed(seed)
    hf = model_cls(config).eval()
    randomize(hf, seed)
    return hf


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_family_matches_transformers(case, attn):
    family, kwargs = TEXT_CASES[case]
    hf = hf_text_model(family, kwargs, attn, seed=sorted(TEXT_CASES).index(case))
    spec = registry.get(family)
    cfg = spec.from_hf_config(hf.config.to_dict(), "t", kv_capacity=CAPACITY, prefill_chunk=CHUNK)
    assert cfg.family == family and cfg.decoder.tie_word_embeddings == hf.config.tie_word_embeddings
    model = our_module(spec, cfg)
    load_by_checkpoint_name(spec, cfg, model, hf.state_dict())
    if cfg.decoder.tie_word_embeddings:
        assert "lm_head.weight" not in dict(model.named_parameters())
    ids = torch.randint(3, cfg.decoder.vocab_size, (21,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
        ours, cache = prompt_logits(model, model.embed(ids), CHUNK)
        assert rel_err(ours, ref) < REL_TOL
        ref_tokens, ref_logits = hf_greedy(hf, ids, NEW_TOKENS)
        tokens, logits = greedy_decode(model, ours[-1], cache, ids.shape[0], NEW_TOKENS)
    assert tokens == ref_tokens
    assert rel_err(logits, ref_logits) < REL_TOL


def test_qwen2_biases_and_llama_o_proj_bias():
    """Qwen2: q/k/v biases, none on o_proj; Llama's attention_bias covers o_proj too."""
    qwen = our_module(registry.get("qwen2"), load_config("qwen2-tiny"))
    names = {n for n, _ in qwen.named_parameters()}
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    llama_cfg = registry.get("llama").from_hf_config(
        transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, attention_bias=True).to_dict(), "b")
    names = {n for n, _ in our_module(registry.get("llama"), llama_cfg).named_parameters()}
    assert "model.layers.0.self_attn.o_proj.bias" in names


def test_weight_roles_put_every_decoder_linear_in_a_quantized_role():
    for name in ("llama-tiny", "qwen2-tiny", "idefics3-tiny"):
        cfg = load_config(name)
        spec = registry.spec_for(cfg)
        model = our_module(spec, cfg)
        for mname, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                role = spec.weight_role(f"{mname}.weight")
                if ".text_model." in mname or mname.startswith(("model.layers.", "lm_head")):
                    assert role in ("attention", "mlp", "lm_head"), (name, mname, role)
                elif mname.startswith("model.connector."):
                    assert role == "projector"
                else:
                    assert role == "vision", (name, mname, role)
        table = next(n for n, _ in model.named_parameters() if n.endswith("embed_tokens.weight"))
        assert spec.weight_role(table) == "embedding"
        assert all(spec.weight_role(n) == "norm" for n, _ in model.named_parameters()
                   if n.endswith("layernorm.weight") and "vision_model" not in n)


def test_text_checkpoint_names():
    spec = registry.get("llama")
    tied = load_config("qwen2-tiny")
    untied = load_config("llama-tiny")
    assert spec.checkpoint_name("model.layers.3.self_attn.rotary_emb.inv_freq", untied) is None
    assert spec.checkpoint_name("lm_head.weight", untied) == "lm_head.weight"
    assert registry.get("qwen2").checkpoint_name("lm_head.weight", tied) is None
    assert spec.checkpoint_name("model.norm.weight", untied) == "model.norm.weight"
    # the prefill of a tied model reads the token table (its logits do), an untied one does not
    for cfg, reads_table in ((tied, True), (untied, False)):
        s = registry.spec_for(cfg)
        names = [n for n, _ in our_module(s, cfg).named_parameters()]
        assert ("model.embed_tokens.weight" in s.entry_params(names, "prefill")) is reads_table
        assert s.entry_params(names, "embed") == ["model.embed_tokens.weight"]
        assert s.entry_params(names, "decode") == names


# --------------------------------------------------------------------------- siglip


def hf_siglip(use_head: bool, attn: str, seed: int):
    config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=64, patch_size=8,
                                             vision_use_head=use_head, attn_implementation=attn)
    torch.manual_seed(seed)
    hf = transformers.SiglipVisionModel(config).eval()
    randomize(hf, seed, std=0.1)
    return hf


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("use_head", [True, False])
def test_siglip_matches_transformers(use_head, attn):
    hf = hf_siglip(use_head, attn, seed=3)
    spec = registry.get("siglip")
    cfg = spec.from_hf_config(hf.config.to_dict(), "s", image_batch=2)
    assert cfg.decoder is None and cfg.vision.use_head is use_head and cfg.vision.grid == 8
    assert spec.kv_cache_shape(cfg) is None
    model = our_module(spec, cfg)
    load_by_checkpoint_name(spec, cfg, model, hf.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(pixel_values=x)
        ours = model.encode_image(x)
    if use_head:
        hidden, pooled = ours
        assert pooled.shape == (2, 64)
        assert rel_err(pooled, ref.pooler_output) < 1e-5
    else:
        hidden = ours
    assert hidden.shape == (2, 64, 64)
    assert rel_err(hidden, ref.last_hidden_state) < 1e-5


def test_siglip_checkpoint_names_and_siglip_model_config():
    spec = registry.get("siglip")
    # the names a checkpoint file carries, and transformers 5's in-memory names
    assert spec.checkpoint_name("vision_model.head.probe") == "vision_model.head.probe"
    assert spec.checkpoint_name("encoder.layers.0.mlp.fc1.weight") == "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert spec.checkpoint_name("vision_model.embeddings.position_ids") is None
    assert spec.checkpoint_name("text_model.embeddings.token_embedding.weight") is None
    assert spec.checkpoint_name("logit_scale") is None
    full = transformers.SiglipConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=32, patch_size=8))
    cfg = spec.from_hf_config(full.to_dict(), "full")
    assert (cfg.vision.hidden_size, cfg.vision.grid, cfg.vision.use_head) == (32, 4, True)


# ------------------------------------------------------------------------- idefics3


def hf_idefics3(tied: bool, attn: str, seed: int):
    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
        scale_factor=2, image_token_id=299, tie_word_embeddings=tied, attn_implementation=attn)
    torch.manual_seed(seed)
    hf = transformers.Idefics3ForConditionalGeneration(config).eval()
    randomize(hf, seed, std=0.1)
    return hf


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [False, True])
def test_idefics3_matches_transformers(tied, attn):
    hf = hf_idefics3(tied, attn, seed=11)
    spec = registry.get("idefics3")
    cfg = spec.from_hf_config(hf.config.to_dict(), "v", kv_capacity=CAPACITY, prefill_chunk=CHUNK, image_batch=2)
    assert cfg.projector.kind == "pixel_shuffle" and cfg.image_tokens_per_patch == 16
    assert cfg.runtime.image_token_id == 299 and cfg.decoder.tie_word_embeddings is tied
    model = our_module(spec, cfg)
    state = hf.state_dict()
    assert "model.connector.modality_projection.proj.weight" in state
    assert any(n.startswith("model.vision_model.encoder.") for n in state)
    load_by_checkpoint_name(spec, cfg, model, state)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = model.encode_image(pixels)
        ref_features = hf.get_image_features(pixel_values=pixels[:, None]).pooler_output
    assert features.shape == (2, 16, 64)
    for b in range(2):
        assert rel_err(features[b], ref_features[b]) < 1e-5

    # <text> <image> x 16 <text>: the runtime writes the features into the placeholder rows
    gen = torch.Generator().manual_seed(4)
    ids = torch.cat([torch.randint(3, 298, (5,), generator=gen), torch.full((16,), 299),
                     torch.randint(3, 298, (6,), generator=gen)])
    with torch.no_grad():
        ref = hf(input_ids=ids[None], pixel_values=pixels[:1, None]).logits[0]
        rows = model.embed(ids)
        rows[ids == cfg.runtime.image_token_id] = features[0]
        ours, cache = prompt_logits(model, rows, CHUNK)
        assert rel_err(ours, ref) < REL_TOL
        ref_tokens, ref_logits = hf_greedy(hf, ids, NEW_TOKENS, pixel_values=pixels[:1, None])
        tokens, logits = greedy_decode(model, ours[-1], cache, ids.shape[0], NEW_TOKENS)
    assert tokens == ref_tokens
    assert rel_err(logits, ref_logits) < REL_TOL


def test_idefics3_position_ids_of_a_full_image():
    """On the accepted grids transformers' bucketed position ids of a full image are 0..N-1."""
    from bluelower.lowering.models.idefics3.model import full_image_position_ids_are_arange

    for grid in (8, 26, 27, 32):  # test sizes, Idefics3-8B (364/14), SmolVLM2 (384/14), SmolVLM (512/16)
        assert full_image_position_ids_are_arange(grid)
        vision = transformers.Idefics3VisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=grid * 2, patch_size=2)
        emb = transformers.models.idefics3.modeling_idefics3.Idefics3VisionEmbeddings(vision)
        with torch.no_grad():
            emb.patch_embedding.weight.zero_()
            emb.patch_embedding.bias.zero_()
            emb.position_embedding.weight.copy_(torch.arange(grid * grid, dtype=torch.float32)[:, None].expand(-1, 8))
            out = emb(torch.zeros(1, 3, grid * 2, grid * 2), torch.ones(1, grid, grid, dtype=torch.bool))
        assert torch.equal(out[0, :, 0], torch.arange(grid * grid, dtype=torch.float32))
    assert not full_image_position_ids_are_arange(19)


# ------------------------------------------------------------------------ refusals


def llama_dict(**changes) -> dict:
    hf = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=4096).to_dict()
    hf.update(changes)
    return hf


def idefics3_dict(**vision) -> dict:
    return transformers.Idefics3Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, **vision),
        text_config=dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2),
        image_token_id=299).to_dict()


REFUSALS = [
    ("llama", llama_dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("llama", llama_dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                          "original_max_position_embeddings": 64}), "rope_type 'yarn'"),
    ("llama", llama_dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
    ("llama", llama_dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     "rope_scaling.low_freq_factor is missing"),
    ("llama", llama_dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    ("llama", llama_dict(mlp_bias=True), "mlp_bias true"),
    ("llama", llama_dict(num_local_experts=8), "num_local_experts 8: mixture-of-experts"),
    ("llama", llama_dict(sliding_window=4096), "sliding_window 4096"),
    ("llama", llama_dict(architectures=["MistralForCausalLM"]), "architectures [\"MistralForCausalLM\"]"),
    ("llama", llama_dict(quantization_config={"quant_method": "awq"}), "quant_method 'awq'"),
    ("llama", llama_dict(eos_token_id=None), "eos_token_id is missing"),
    ("qwen2", transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, use_sliding_window=True, sliding_window=16,
                                       max_window_layers=1, eos_token_id=2).to_dict(), "sliding-window attention"),
    ("qwen2", llama_dict(), "model_type 'llama' is not qwen2"),
    ("siglip", transformers.SiglipVisionConfig(hidden_act="gelu").to_dict(), "hidden_act 'gelu'"),
    ("idefics3", idefics3_dict(image_size=76, patch_size=4), "position ids of a full 19x19 image"),
    ("idefics3", {**idefics3_dict(image_size=64, patch_size=8), "text_config": {"model_type": "mistral"}},
     "text_config.model_type 'mistral'"),
]


@pytest.mark.parametrize("family,hf,message", REFUSALS, ids=[f"{f}-{m[:24]}" for f, _h, m in REFUSALS])
def test_from_hf_config_refuses_in_one_line(family, hf, message):
    with pytest.raises(BlueLowerError) as err:
        registry.get(family).from_hf_config(hf, "m")
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_from_hf_config_runtime_defaults_and_eos_list():
    spec = registry.get("llama")
    cfg = spec.from_hf_config(llama_dict(eos_token_id=[5, 7, 5, 9], bos_token_id=1), "r")
    assert (cfg.runtime.eos_token_id, cfg.runtime.stop_token_ids, cfg.runtime.bos_token_id) == (5, (7, 9), 1)
    assert (cfg.runtime.kv_capacity, cfg.runtime.prefill_chunk) == (2048, 128)
    short = spec.from_hf_config(llama_dict(max_position_embeddings=100), "r")
    assert (short.runtime.kv_capacity, short.runtime.prefill_chunk) == (100, 100)
    mid = spec.from_hf_config(llama_dict(max_position_embeddings=1000), "r")
    assert (mid.runtime.kv_capacity, mid.runtime.prefill_chunk) == (1000, 125)
    # transformers 4.x's config.json layout: rope_theta and rope_scaling at the top level
    old = llama_dict(rope_parameters=None, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg = spec.from_hf_config(old, "r", kv_capacity=512, prefill_chunk=64)
    assert cfg.decoder.rope_theta == 500000.0 and cfg.decoder.rope_scaling["rope_type"] == "llama3"
    assert (cfg.runtime.kv_capacity, cfg.runtime.prefill_chunk) == (512, 64)
    with pytest.raises(BlueLowerError, match="unknown runtime setting"):
        spec.from_hf_config(llama_dict(), "r", kv_capacityy=16)


# ---------------------------------------------------------------------------- schema


def test_schema_sections_per_family():
    siglip = load_config("siglip-tiny")
    assert siglip.decoder is None and siglip.projector is None and siglip.to_dict()["decoder"] is None
    with pytest.raises(BlueLowerError, match="family 'siglip' has no 'decoder' section"):
        config_from_dict({**siglip.to_dict(), "decoder": {"vocab_size": 16}}, "s.json")
    with pytest.raises(BlueLowerError, match="family 'llama' has no 'vision' section"):
        config_from_dict({"family": "llama", "name": "x", "vision": {}}, "l.json")
    with pytest.raises(BlueLowerError, match="rope_scaling.factor must be a positive number"):
        llama = load_config("llama-tiny").to_dict()
        config_from_dict({**llama, "decoder": {**llama["decoder"], "rope_scaling": {"rope_type": "linear"}}}, "l")
    bluelm = load_config("tiny")  # BlueLM-V keeps every section
    assert bluelm.family == "bluelm_v" and bluelm.decoder is not None and bluelm.vision is not None


# ------------------------------------------------------------------ meta-device import


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "siglip-tiny", "idefics3-tiny"])
def test_tiny_config_imports_on_meta(name):
    from bluelower.lowering.frontend.importer import import_model

    cfg = load_config(name)
    mod, sigs = import_model(cfg, "torch")
    spec = registry.spec_for(cfg)
    assert sorted(sigs) == sorted(spec.entry_names)
    for entry, sig in sigs.items():
        func = mod[entry]
        assert int(func.attrs["num_input"]) == len(sig.inputs)
        assert len(func.params) == len(sig.inputs) + len(sig.params)


# -------------------------------------------------------------------- bluelm_v, HF layout


def test_bluelm_v_checkpoint_in_its_own_names_loads(tiny_weights):
    """A BlueLM-V safetensors in its HF-style names (``vision_tower.vision_model.*``,
    ``multi_modal_projector.*``, ``language_model.model.*``) loads by name, and those names are
    SiglipVisionModel's / LlamaForCausalLM's under the two prefixes."""
    from bluelower.lowering.frontend.weights import WeightSource, load_torch_model, model_weight_specs

    cfg = load_config("tiny")
    source = WeightSource(tiny_weights)
    source.check_against(model_weight_specs(cfg))
    model = load_torch_model(cfg, source)
    name = "language_model.model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(model.state_dict()[name], torch.from_numpy(source.read(name)))
    names = set(source.names())
    assert all(n.startswith(("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
                             "language_model.lm_head.")) for n in names)
    llama_names = {n for n, _ in our_module(registry.get("llama"), registry.get("llama").from_hf_config(
        transformers.LlamaConfig(vocab_size=cfg.decoder.vocab_size, hidden_size=cfg.decoder.hidden_size,
                                 intermediate_size=cfg.decoder.intermediate_size,
                                 num_hidden_layers=cfg.decoder.num_layers, num_attention_heads=cfg.decoder.num_heads,
                                 num_key_value_heads=cfg.decoder.num_kv_heads, head_dim=cfg.decoder.head_dim).to_dict(),
        "l")).named_parameters()}
    assert {n.removeprefix("language_model.") for n in names if n.startswith("language_model.")} == llama_names
