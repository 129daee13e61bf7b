"""QuantizeWeights: golden rewrite, numerics of the rewritten module, the streaming
parameter conversion, a quantized tiny build end to end, and the 3B size figure."""

import json
import os

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from bluelower.lowering.kernels import int4_linear, int8_linear
from bluelower.lowering.quant.params import (
    dequantize_weight,
    param_producer,
    quantize_weight,
    quantized_param_specs,
    weight_bytes_by_part,
)
from bluelower.passes.ir_utils import without_results
from bluelower.passes.quantize_weights import QuantizeWeights, quantized_params


def role(name: str) -> str:
    """Roles of the hand-written modules' weights (a ModelSpec gives a real model's)."""
    return "vision" if name.startswith("vision") else "attention"

# ----------------------------------------------------------------------------- golden


@I.ir_module
class Before:
    # what FuseTransposeMatmul makes of R.matmul(x, R.permute_dims(W)), W [N, K]
    @T.prim_func(private=True, s_tir=True)
    def NT_matmul(x: T.Buffer((T.int64(4), T.int64(64)), "float32"), w: T.Buffer((T.int64(32), T.int64(64)), "float32"),
                  NT_matmul: T.Buffer((T.int64(4), T.int64(32)), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i0, i1, k in T.grid(T.int64(4), T.int64(32), T.int64(64)):
            with T.sblock("NT_matmul"):
                v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                T.reads(x[v_i0, v_k], w[v_i1, v_k])
                T.writes(NT_matmul[v_i0, v_i1])
                with T.init():
                    NT_matmul[v_i0, v_i1] = T.float32(0.0)
                NT_matmul[v_i0, v_i1] = NT_matmul[v_i0, v_i1] + x[v_i0, v_k] * w[v_i1, v_k]

    @T.prim_func(private=True, s_tir=True)
    def NT_matmul1(x: T.Buffer((T.int64(4), T.int64(64)), "float32"), w: T.Buffer((T.int64(64), T.int64(64)), "float32"),
                   NT_matmul: T.Buffer((T.int64(4), T.int64(64)), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i0, i1, k in T.grid(T.int64(4), T.int64(64), T.int64(64)):
            with T.sblock("NT_matmul"):
                v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                T.reads(x[v_i0, v_k], w[v_i1, v_k])
                T.writes(NT_matmul[v_i0, v_i1])
                with T.init():
                    NT_matmul[v_i0, v_i1] = T.float32(0.0)
                NT_matmul[v_i0, v_i1] = NT_matmul[v_i0, v_i1] + x[v_i0, v_k] * w[v_i1, v_k]

    @R.function
    def main(x: R.Tensor((4, 64), "float32"),
             language_model_norm_weight: R.Tensor((64,), "float32"),
             language_model_k_proj_weight: R.Tensor((32, 64), "float32"),
             vision_tower_fc_weight: R.Tensor((64, 64), "float32"),
             vision_tower_fc_bias: R.Tensor((64,), "float32")):
        R.func_attr({"num_input": 1})
        cls = Before
        with R.dataflow():
            h = R.multiply(x, language_model_norm_weight)
            k = R.call_tir(cls.NT_matmul, (h, language_model_k_proj_weight), out_ty=R.Tensor((4, 32), "float32"))
            v = R.call_tir(cls.NT_matmul1, (x, vision_tower_fc_weight), out_ty=R.Tensor((4, 64), "float32"))
            vb = R.add(vision_tower_fc_bias, v)
            R.output(k, vb)
        return (k, vb)


@I.ir_module
class Expected:
    # kernel bodies are the library's (bluelower.lowering.kernels), filled in by _with_kernels
    @T.prim_func(private=True)
    def int4_linear_4x32x64_g32(x: T.Buffer((4, 64), "float32"), packed: T.Buffer((1, 64, 16), "uint8"),
                                scales: T.Buffer((1, 2, 32), "float16"), y: T.Buffer((4, 32), "float32")):
        T.evaluate(0)

    @T.prim_func(private=True)
    def int8_linear_4x64x64(x: T.Buffer((4, 64), "float32"), packed: T.Buffer((2, 64, 32), "int8"),
                            scales: T.Buffer((64,), "float32"), y: T.Buffer((4, 64), "float32")):
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((4, 64), "float32"),
             language_model_norm_weight: R.Tensor((64,), "float32"),
             language_model_k_proj_weight_int4_packed: R.Tensor((1, 64, 16), "uint8"),
             language_model_k_proj_weight_int4_scales: R.Tensor((1, 2, 32), "float16"),
             vision_tower_fc_weight_int8_packed: R.Tensor((2, 64, 32), "int8"),
             vision_tower_fc_weight_int8_scales: R.Tensor((64,), "float32"),
             vision_tower_fc_bias: R.Tensor((64,), "float32")):
        R.func_attr({"num_input": 1})
        cls = Expected
        with R.dataflow():
            h = R.multiply(x, language_model_norm_weight)
            k = R.call_tir(cls.int4_linear_4x32x64_g32,
                           (h, language_model_k_proj_weight_int4_packed, language_model_k_proj_weight_int4_scales),
                           out_ty=R.Tensor((4, 32), "float32"))
            v = R.call_tir(cls.int8_linear_4x64x64,
                           (x, vision_tower_fc_weight_int8_packed, vision_tower_fc_weight_int8_scales),
                           out_ty=R.Tensor((4, 64), "float32"))
            vb = R.add(vision_tower_fc_bias, v)
            R.output(k, vb)
        return (k, vb)


def _with_kernels(mod, kernels: dict):
    mod = tvm.IRModule(dict(mod.functions_items()))
    for gv, _func in list(mod.functions_items()):
        if gv.name_hint in kernels:
            mod.update_func(gv, kernels[gv.name_hint].with_attr("op_pattern", 8))
    return mod


def test_golden_w4a16():
    after = QuantizeWeights("w4a16", roles=role)(Before)
    table = quantized_params(after)
    expected = _with_kernels(Expected, {"int4_linear_4x32x64_g32": int4_linear(4, 32, 64, 32),
                                        "int8_linear_4x64x64": int8_linear(4, 64, 64)})
    relax.analysis.well_formed(expected)  # raises if not
    tvm.ir.assert_structural_equal(without_results(after), expected)
    assert {n: (t.source, t.quantizer, t.part, t.args) for n, t in table.items()} == {
        "language_model_k_proj_weight.int4_packed": ("language_model_k_proj_weight", "int4_groupwise", 0, {"group_size": 32}),
        "language_model_k_proj_weight.int4_scales": ("language_model_k_proj_weight", "int4_groupwise", 1, {"group_size": 32}),
        "vision_tower_fc_weight.int8_packed": ("vision_tower_fc_weight", "int8_per_channel", 0, {}),
        "vision_tower_fc_weight.int8_scales": ("vision_tower_fc_weight", "int8_per_channel", 1, {}),
    }


def test_fp32_mode_changes_nothing():
    from bluelower.passes.pipeline import BuildContext, build_pipeline

    spec = next(p for p in build_pipeline() if p.name == "QuantizeWeights")
    assert spec.make(BuildContext(target=tvm.target.Target("llvm"), quant="fp32")) is None
    tvm.ir.assert_structural_equal(without_results(QuantizeWeights("fp32")(Before)), Before)


def test_weight_with_another_use_is_left_alone():
    @I.ir_module
    class Tied:
        @T.prim_func(private=True, s_tir=True)
        def NT_matmul(x: T.Buffer((T.int64(4), T.int64(64)), "float32"), w: T.Buffer((T.int64(32), T.int64(64)), "float32"),
                      NT_matmul: T.Buffer((T.int64(4), T.int64(32)), "float32")):
            T.func_attr({"tirx.noalias": True})
            for i0, i1, k in T.grid(T.int64(4), T.int64(32), T.int64(64)):
                with T.sblock("NT_matmul"):
                    v_i0, v_i1, v_k = T.axis.remap("SSR", [i0, i1, k])
                    T.reads(x[v_i0, v_k], w[v_i1, v_k])
                    T.writes(NT_matmul[v_i0, v_i1])
                    with T.init():
                        NT_matmul[v_i0, v_i1] = T.float32(0.0)
                    NT_matmul[v_i0, v_i1] = NT_matmul[v_i0, v_i1] + x[v_i0, v_k] * w[v_i1, v_k]

        @R.function
        def main(x: R.Tensor((4, 64), "float32"), language_model_w: R.Tensor((32, 64), "float32")):
            R.func_attr({"num_input": 1})
            cls = Tied
            with R.dataflow():
                y = R.call_tir(cls.NT_matmul, (x, language_model_w), out_ty=R.Tensor((4, 32), "float32"))
                z = R.take(language_model_w, R.const(np.array([1], "int64")), axis=0)  # an embedding-style use
                R.output(y, z)
            return (y, z)

    tvm.ir.assert_structural_equal(without_results(QuantizeWeights("w4a16", roles=role)(Tied)), Tied)


# ----------------------------------------------------------------------------- numerics


def _linear_module(m, specs):
    """main(x [m, K0], W_i [N_i, K_i]) = tuple of x[:, :K_i] @ W_i^T, through FuseTransposeMatmul."""
    k0 = max(k for _, (n, k) in specs)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((m, k0), "float32"))
    ws = [relax.Var(name, R.Tensor(shape, "float32")) for name, shape in specs]
    with bb.function("main", [x, *ws], attrs={"num_input": 1}):
        with bb.dataflow():
            outs = []
            for w, (_, (n, k)) in zip(ws, specs):
                xi = x if k == k0 else bb.emit(relax.op.strided_slice(x, axes=[1], begin=[0], end=[k]))
                outs.append(bb.emit(relax.op.matmul(xi, relax.op.permute_dims(w), out_dtype="float32")))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return relax.transform.FuseTransposeMatmul()(bb.get())


@pytest.mark.parametrize("quant", ["w8", "w4a16", "w4a16kv8"])
@pytest.mark.parametrize("m", [1, 5])
def test_rewritten_module_matches_numpy_dequantized(quant, m):
    # decoder weight needing padding on N and K (48 x 40 -> 64 x 64), a plain vision one
    specs = [("language_model_down_weight", (48, 40)), ("vision_tower_fc2_weight", (64, 96))]
    rng = np.random.default_rng(7)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in specs}
    x = rng.standard_normal((m, 96)).astype(np.float32)
    mod = QuantizeWeights(quant, roles=role)(_linear_module(m, specs))
    table = quantized_params(mod)
    script = mod.script(show_meta=False)
    assert "NT_matmul" not in script  # every linear layer went to a kernel
    params = [p.name for p in mod["main"].params[1:]]
    produce = param_producer({n.replace(".", "_"): t for n, t in table.items()}, lambda n: weights[n])
    args = [x] + [produce(p) for p in params]
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    for i, (name, (n, k)) in enumerate(specs):
        t = next(t for t in table.values() if t.source == name)
        assert t.quantizer == ("int4_groupwise" if quant != "w8" and name.startswith("language") else "int8_per_channel")
        packed, scales = quantize_weight(weights[name], t.quantizer, t.args)
        w_ref = dequantize_weight((packed, scales), t.quantizer, t.args, (n, k))
        ref = x[:, :k] @ w_ref.T
        got = out[i].numpy()
        assert got.shape == (m, n)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        # and the rounding is what the format promises, not a bug: close to the fp32 product
        fp = x[:, :k] @ weights[name].T
        assert np.linalg.norm(got - fp) / np.linalg.norm(fp) < (0.15 if t.quantizer == "int4_groupwise" else 0.01)


def test_param_producer_streams_one_weight_at_a_time():
    from bluelower.lowering.quant.params import choose_scheme, scheme_params

    reads = []
    shapes = {"language_model.a.weight": (64, 64), "language_model.b.weight": (32, 64), "vision_tower.c.weight": (64, 32)}
    transforms, names = {}, ["language_model.norm.weight"]
    for src, (n, k) in shapes.items():
        for name, _shape, _dtype, t in scheme_params(src, choose_scheme(role(src), n, k, "w4a16")):
            transforms[name] = t
            names.append(name)

    def read(name):
        reads.append(name)
        return np.ones(shapes.get(name, (64,)), np.float32)

    produce = param_producer(transforms, read)
    for name in sorted(names):
        arr = produce(name)
        t = transforms.get(name)
        if t is not None:
            assert arr.shape == tuple(t.shape) and arr.dtype == np.dtype(t.dtype)
    assert sorted(reads) == sorted(["language_model.norm.weight", *shapes])  # each source read exactly once


# ----------------------------------------------------------------------------- builds


@pytest.fixture(scope="module")
def tiny_w4_build(build_tiny):
    return build_tiny("w4a16kv8")


def test_quantized_build_has_no_fp32_linear_weights(tiny_w4_build):
    from bluelower.lowering.quant.params import linear_weight_names, sanitize
    from bluelower.lowering.models import load_config
    from bluelower.lowering.frontend.weights import WeightSource

    out, ir = tiny_w4_build
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    linear = linear_weight_names(load_config("tiny"))
    params = WeightSource(os.path.join(out, "params.safetensors"))
    assert not set(linear) & set(params.names())
    for fn in manifest["functions"].values():
        assert not set(linear) & set(fn["params"])
    # the lowered IR: no linear weight as a parameter, no NT_matmul left, the kernels called
    last = sorted(os.listdir(ir))[-1]
    text = open(os.path.join(ir, last)).read()
    for name in linear:
        assert f"{sanitize(name)}:" not in text, name
    assert "NT_matmul" not in text
    # the default recipe: decoder linears INT4 asymmetric (down_proj: not merged with a
    # sibling), the logits' weight and the ViT INT8
    assert "int4_linear_1x64x160_g32_asym" in text and "int8_linear_1x512x64" in text
    assert "int8_linear_729x64x64" in text


def test_quantized_build_manifest(tiny_w4_build):
    from bluelower.lowering.models import load_config

    out, _ = tiny_w4_build
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["quant"] == "w4a16kv8"
    q = manifest["quantization"]
    assert q["group_size"] == 32 and q["mode"] == "w4a16kv8"
    assert manifest["kv_cache"]["dtype"] == "int8"  # QuantizeKVCache: INT8 rows + packed scales
    q_specs, transforms = quantized_param_specs(load_config("tiny"), "w4a16kv8")
    for fname, fn in manifest["functions"].items():
        assert fn["weights_bytes_per_call"] > 0
        for p in fn["params"]:
            assert p in q_specs  # the shapes-only table agrees with the pass
            if p in transforms:
                assert q["params"][p][0] == transforms[p].source
    from bluelower.lowering.frontend.weights import WeightSource

    params = WeightSource(os.path.join(out, "params.safetensors"))
    for name in params.names():
        assert tuple(params.shape(name)) == tuple(q_specs[name][0])
        assert params.dtype(name) == np.dtype(q_specs[name][1])
    # decode reads every decoder weight once but only one embedding row
    dec = manifest["functions"]["decode"]["weights_bytes_per_call"]
    assert dec < q["weights_bytes"]


def test_quantized_build_matches_dequantized_pytorch(tiny_w4_build, tiny_image):
    from bluelower.reports.eval_quant import DequantizedReference, check_reference
    from bluelower.runtime_stubs.generate import CompiledModel, generate
    from bluelower.runtime_stubs.image import load_image, preprocess_image

    out, _ = tiny_w4_build
    compiled = CompiledModel(out)  # generate.py's loader, unchanged: params by name
    rt = compiled.manifest["runtime"]
    patches = preprocess_image(load_image(tiny_image), grid=None, image_size=rt["image_size"],
                               mean=tuple(rt["image_mean"]), std=tuple(rt["image_std"]))
    ids = [5, 17, 42, 7]
    got = generate(compiled, patches, ids, 12)
    ref_backend = check_reference(out)
    assert isinstance(ref_backend, DequantizedReference)
    ref = generate(ref_backend, patches, ids, 12)
    assert got.tokens == ref.tokens
    # 3e-4 of the logit scale: both round the KV rows to INT8, and a value on a rounding
    # boundary (float32 sums in another order) can land on the neighbouring code (measured
    # up to 1.2e-4 with one seed's weights, 2 of 512 logits)
    np.testing.assert_allclose(got.first_logits, ref.first_logits, rtol=1e-4, atol=3e-4 * np.abs(ref.first_logits).max())


# ----------------------------------------------------------------------------- 3B figure


def test_bluelm_v_3b_decoder_weight_figures():
    from bluelower.lowering.models import load_config
    from bluelower.lowering.quant.recipe import uniform_recipe, weight_format

    cfg = load_config("bluelm-v-3b")
    # symmetric INT4 g32 everywhere in the decoder (the mode's plain format): 4.5 bits, under 1.6 GB
    plain = weight_bytes_by_part(cfg, "w4a16kv8", recipe=uniform_recipe(weight_format("int4")))
    assert plain["decoder_linear"] <= 1.6e9
    assert abs(plain["decoder_linear_bits_per_weight"] - 4.5) < 1e-6
    # the default recipe (what a compile stores): INT4 asymmetric g32 (scale + min: 5 bits) and
    # the untied lm_head INT8 per row (+ an fp32 scale per row)
    parts = weight_bytes_by_part(cfg, "w4a16kv8")
    v, h = cfg.decoder.vocab_size, cfg.decoder.hidden_size
    head = v * h
    assert parts["decoder_linear"] == (parts["decoder_linear_weights"] - head) * 5 // 8 + head + 4 * v
    assert parts["decoder_linear"] <= 1.65e9
    fp32 = weight_bytes_by_part(cfg, "fp32")
    assert fp32["decoder_linear"] == parts["decoder_linear_weights"] * 4
    w8 = weight_bytes_by_part(cfg, "w8")
    assert 8.0 < w8["decoder_linear_bits_per_weight"] < 8.02  # + one fp32 scale per row (K >= 2560)


def test_cli_run_check_on_quantized_build(tiny_w4_build, tiny_image):
    from click.testing import CliRunner

    from bluelower.cli import cli

    out, _ = tiny_w4_build
    result = CliRunner().invoke(cli, ["-q", "run", out, "--image", tiny_image, "--prompt-ids", "1,2,3,40,77",
                                      "--max-new-tokens", "12", "--check", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["match"] is True and data["tokens"] == data["reference_tokens"]
    # and how far the build is from the fp32 model (the seeded weights), teacher-forced on its tokens
    d = data["vs_fp32"]
    assert 0.0 <= d["top1_agreement"] <= 1.0 and d["fp32_greedy_equal"] == (d["top1_agreement"] == 1.0)
    # recomputed here: the seeded fp32 model and the build, both teacher-forced on the build's tokens
    # (random tiny weights of std 0.3 through INT4: errors of several logits are expected)
    from bluelower.api import image_patches
    from bluelower.runtime_stubs.generate import CompiledModel, TorchReference, generate
    from bluelower.lowering.models import load_config

    compiled = CompiledModel(out)
    patches = image_patches(compiled.manifest, tiny_image, "relaxed", None)[0]  # run's default policy
    toks = data["tokens"]
    ours = generate(compiled, patches, [1, 2, 3, 40, 77], len(toks), forced=toks, keep_logits=True).logits
    fp32 = generate(TorchReference(load_config("tiny")), patches, [1, 2, 3, 40, 77], len(toks), forced=toks,
                    keep_logits=True).logits
    assert d["max_logit_error"] > 0
    assert abs(d["max_logit_error"] - float(np.abs(ours - fp32).max())) < 1e-4
    assert abs(d["top1_agreement"] - float(np.mean(np.argmax(fp32, -1) == np.asarray(toks)))) < 1e-3


def test_teacher_forced_generation_reproduces_greedy(tiny_w4_build, tiny_image):
    from bluelower.runtime_stubs.generate import CompiledModel, generate
    from bluelower.runtime_stubs.image import load_image, preprocess_image

    out, _ = tiny_w4_build
    compiled = CompiledModel(out)
    rt = compiled.manifest["runtime"]
    patches = preprocess_image(load_image(tiny_image), grid=None, image_size=rt["image_size"],
                               mean=tuple(rt["image_mean"]), std=tuple(rt["image_std"]))
    greedy = generate(compiled, patches, [5, 17, 42, 7], 8, keep_logits=True)
    forced = generate(compiled, patches, [5, 17, 42, 7], 8, forced=greedy.tokens, keep_logits=True)
    assert forced.tokens == greedy.tokens
    assert greedy.logits.shape == (len(greedy.tokens), compiled.manifest["model"]["decoder"]["vocab_size"])
    np.testing.assert_array_equal(forced.logits, greedy.logits)
    assert list(np.argmax(greedy.logits, axis=-1)) == greedy.tokens
    other = [(t + 1) % greedy.logits.shape[1] for t in greedy.tokens]  # forcing other tokens changes later logits
    moved = generate(compiled, patches, [5, 17, 42, 7], 8, forced=other, keep_logits=True)
    assert moved.tokens == other[: len(moved.tokens)]
    np.testing.assert_array_equal(moved.logits[0], greedy.logits[0])
    assert not np.array_equal(moved.logits[1:], greedy.logits[1:len(moved.tokens)])


def test_param_names_attribute_follows_the_new_signature():
    # the importers name the weights in order (bluelower.param_names); the pass keeps that in step
    names = ["language_model.norm.weight", "language_model.k_proj.weight", "vision_tower.fc.weight", "vision_tower.fc.bias"]
    gv = Before.get_global_var("main")
    mod = tvm.IRModule(dict(Before.functions_items()))
    mod.update_func(gv, Before["main"].with_attr("bluelower.param_names", names).with_attr("global_symbol", "main"))
    after = QuantizeWeights("w4a16", roles=role)(mod)
    expected = ["language_model.norm.weight", "language_model.k_proj.weight.int4_packed",
                "language_model.k_proj.weight.int4_scales", "vision_tower.fc.weight.int8_packed",
                "vision_tower.fc.weight.int8_scales", "vision_tower.fc.bias"]
    assert [str(n) for n in after["main"].attrs["bluelower.param_names"]] == expected


def test_batched_activation_is_flattened_for_the_kernel():
    # the ONNX importer keeps x as [1, T, K]; the kernels take [M, K]
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 5, 64), "float32"))
    w = relax.Var("vision_tower_fc_weight", R.Tensor((48, 64), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w), out_dtype="float32"))
        bb.emit_func_output(y)
    mod = QuantizeWeights("w8", roles=role)(relax.transform.FuseTransposeMatmul()(bb.get()))
    table = quantized_params(mod)
    assert "NT_matmul" not in mod.script(show_meta=False)
    rng = np.random.default_rng(3)
    x_np = rng.standard_normal((1, 5, 64)).astype(np.float32)
    w_np = rng.standard_normal((48, 64)).astype(np.float32)
    t = table["vision_tower_fc_weight.int8_packed"]
    packed, scales = quantize_weight(w_np, t.quantizer, t.args)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in (x_np, packed, scales)]).numpy()
    ref = x_np @ dequantize_weight((packed, scales), t.quantizer, t.args, (48, 64)).T
    assert got.shape == (1, 5, 48)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
