"""TileImagePatches: golden split, split == unsplit, batched == per-patch, non-square end to end."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from bluelower.passes.ir_utils import without_results
from bluelower.passes.tile_image_patches import TileImagePatches


@I.ir_module
class Before:
    @R.function
    def encode_image(x: R.Tensor((2, 3, 28, 28), "float32"), w: R.Tensor((8, 3, 14, 14), "float32"),
                     b: R.Tensor((1, 8, 1, 1), "float32")) -> R.Tensor((2, 8, 2, 2), "float32"):
        R.func_attr({"num_input": 1, "bluelower.param_names": ["conv.weight", "conv.bias"]})
        with R.dataflow():
            c = R.nn.conv2d(x, w, strides=[14, 14])
            y = R.add(c, b)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def encode_image(x: R.Tensor((2, 3, 28, 28), "float32"), w: R.Tensor((8, 3, 14, 14), "float32"),
                     b: R.Tensor((1, 8, 1, 1), "float32")) -> R.Tensor((2, 8, 2, 2), "float32"):
        R.func_attr({"num_input": 1, "bluelower.param_names": ["conv.weight", "conv.bias"]})
        with R.dataflow():
            c = R.nn.conv2d(x, w, strides=[14, 14])
            y = R.add(c, b)
            R.output(y)
        return y

    @R.function
    def encode_image_embed(x: R.Tensor((2, 3, 28, 28), "float32"),
                           w: R.Tensor((8, 3, 14, 14), "float32")) -> R.Tensor((2, 8, 2, 2), "float32"):
        R.func_attr({"global_symbol": "encode_image_embed", "num_input": 1,
                     "bluelower.param_names": ["conv.weight"]})
        with R.dataflow():
            c = R.nn.conv2d(x, w, strides=[14, 14])
            out = c
            R.output(out)
        return out

    @R.function
    def encode_image_blocks(patch_embeddings: R.Tensor((2, 8, 2, 2), "float32"),
                            b: R.Tensor((1, 8, 1, 1), "float32")) -> R.Tensor((2, 8, 2, 2), "float32"):
        R.func_attr({"global_symbol": "encode_image_blocks", "num_input": 1,
                     "bluelower.param_names": ["conv.bias"]})
        with R.dataflow():
            c = patch_embeddings
            y = R.add(c, b)
            out = y
            R.output(y, out)  # y stays an output var, as it was in encode_image
        return out


def test_golden_split():
    after = TileImagePatches("encode_image")(Before)
    tvm.ir.assert_structural_equal(without_results(after), Expected)


def test_split_matches_unsplit_numerically():
    after = TileImagePatches("encode_image")(Before)
    ex = tvm.compile(after, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 28, 28), (8, 3, 14, 14), (1, 8, 1, 1)))
    t = tvm.runtime.tensor
    whole = vm["encode_image"](t(x), t(w), t(b)).numpy()
    emb = vm["encode_image_embed"](t(x), t(w))
    split = vm["encode_image_blocks"](emb, t(b)).numpy()
    np.testing.assert_array_equal(whole, split)


def test_no_conv_means_no_split():
    @I.ir_module
    class NoConv:
        @R.function
        def encode_image(x: R.Tensor((2, 4), "float32")) -> R.Tensor((2, 4), "float32"):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                y = R.add(x, x)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(without_results(TileImagePatches("encode_image")(NoConv)), NoConv)


def test_compiled_stages_match_unsplit_and_pytorch(tiny_build_torch):
    from bluelower.runtime_stubs.generate import CompiledModel, reference_for_build

    compiled = CompiledModel(tiny_build_torch)
    assert {"encode_image_embed", "encode_image_blocks"} <= set(compiled.manifest["functions"])
    x = np.random.default_rng(1).standard_normal((1, 3, 384, 384)).astype(np.float32)
    split = compiled.encode_batch_split(x)
    np.testing.assert_array_equal(split, compiled.encode_batch_unsplit(x))
    np.testing.assert_allclose(split, reference_for_build(tiny_build_torch).encode_batch(x), rtol=1e-3, atol=1e-3)


def test_batched_encoding_equals_per_patch(tmp_path):
    """A batch-4 build encodes 5 patches as 4 + 1 (padded); equal to one patch at a time."""
    import json

    from bluelower.runtime_stubs.generate import CompiledModel, generate, reference_for_build
    from bluelower.lowering.artifacts.compile import CompileRequest, compile_model
    from bluelower.lowering.models import load_config

    cfg = load_config("tiny").to_dict()
    cfg["runtime"]["image_batch"] = 4
    cfg["runtime"]["kv_capacity"] = 1024  # 5 patches = 980 image tokens
    path = tmp_path / "tiny-b4.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "b4"
    compile_model(CompileRequest(model=str(path), out_dir=str(out), quant="fp32"))
    compiled = CompiledModel(str(out))
    assert compiled.manifest["functions"]["encode_image"]["inputs"][0]["shape"][0] == 4
    patches = np.random.default_rng(2).standard_normal((5, 3, 384, 384)).astype(np.float32)
    batched = generate(compiled, patches, [3, 4], 1)
    per_patch = np.concatenate([compiled.encode_batch(np.concatenate([p[None], np.zeros((3, 3, 384, 384), np.float32)]))[:1]
                                for p in patches])
    full = np.concatenate([compiled.encode_batch(np.concatenate([patches[:4]]))[:4],
                           compiled.encode_batch(np.concatenate([patches[4:], np.zeros((3, 3, 384, 384), np.float32)]))[:1]])
    np.testing.assert_allclose(full, per_patch, rtol=1e-5, atol=1e-5)
    ref = generate(reference_for_build(str(out)), patches, [3, 4], 1)
    assert batched.image_tokens == 5 * 196
    np.testing.assert_allclose(batched.first_logits, ref.first_logits, rtol=1e-3, atol=1e-3)


def test_non_square_image_end_to_end_matches_pytorch(tiny_build_torch, tmp_path):
    """A 2:1 image: relaxed grid [2, 1] -> 2 local patches + thumbnail, tokens match PyTorch."""
    import json

    from click.testing import CliRunner

    from bluelower.cli import cli

    img = tmp_path / "wide.npy"
    np.save(img, (np.random.default_rng(5).random((200, 760, 3)) * 255).astype(np.uint8))
    result = CliRunner().invoke(cli, ["--quiet", "run", tiny_build_torch, "--image", str(img), "--prompt-ids", "4,5,6",
                                      "--max-new-tokens", "6", "--check", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["grid"] == [2, 1] and data["patches"] == 3
    assert data["image_tokens"] == 3 * 196
    assert data["match"] is True
