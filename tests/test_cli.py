"""The CLI end to end, and every user error: one line, non-zero exit, no partial output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from bluelower.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)


def assert_user_error(result, *fragments):
    assert result.exit_code != 0, result.output
    out = result.output.strip()
    assert out.startswith("error: "), out
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    for frag in fragments:
        assert frag in out, out


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_compile_and_run_check_generate_pytorch_tokens(tmp_path, tiny_image, tiny_weights, frontend):
    out = tmp_path / "build"
    # exact tokens: an fp32 build (the default --quant w4a16kv8 is checked in test_quantize_weights.py)
    result = invoke("compile", "--model", "tiny", "--weights", tiny_weights, "--frontend", frontend, "--quant", "fp32",
                    "-o", str(out))
    assert result.exit_code == 0, result.output
    result = invoke("run", str(out), "--image", tiny_image, "--prompt-ids", "1,2,3,40,77",
                    "--max-new-tokens", "12", "--check", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["match"] is True
    assert data["tokens"] == data["reference_tokens"]
    assert 1 <= len(data["tokens"]) <= 12
    assert data["image_tokens"] == 3 * 196  # 500x300: relaxed grid [2, 1] + thumbnail
    assert data["grid"] == [2, 1]
    assert set(data["timings_s"]) >= {"image_encode", "prefill", "decode"}


def test_init_weights_is_seeded_and_loadable(tmp_path):
    from bluelower.lowering.frontend.weights import WeightSource

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert invoke("init-weights", "--model", "tiny", "-o", str(a), "--seed", "1").exit_code == 0
    assert invoke("init-weights", "--model", "tiny", "-o", str(b), "--seed", "1").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    src = WeightSource(str(a))
    assert "language_model.lm_head.weight" in src.names()
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in src.names()
    # the safetensors package reads our streamed file
    from safetensors.numpy import load_file

    loaded = load_file(str(a))
    np.testing.assert_array_equal(loaded["language_model.model.norm.weight"], src.read("language_model.model.norm.weight"))


def test_help_for_every_command():
    for cmd in (["--help"], ["compile", "--help"], ["run", "--help"], ["init-weights", "--help"], ["passes", "--help"]):
        result = invoke(*cmd)
        assert result.exit_code == 0 and "Usage" in result.output


# --- errors -------------------------------------------------------------------------


def test_missing_weights_file(tmp_path):
    out = tmp_path / "o"
    result = invoke("compile", "--model", "tiny", "--weights", str(tmp_path / "nope.safetensors"), "-o", str(out))
    assert_user_error(result, "weights file not found")
    assert not out.exists()


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    result = invoke("compile", "--model", "tiny", "--weights", str(bad), "-o", str(tmp_path / "o"))
    assert_user_error(result, "not a valid safetensors file")


def test_weights_with_wrong_shape(tmp_path, tiny_weights):
    from bluelower.lowering.frontend.weights import WeightSource, write_safetensors

    src = WeightSource(tiny_weights)
    bad = tmp_path / "bad.safetensors"
    specs = [(n, src.shape(n), "float32") for n in src.names()]
    specs = [(n, (3, 3) if n == "language_model.lm_head.weight" else s, d) for n, s, d in specs]
    write_safetensors(str(bad), specs, lambda n: np.zeros((3, 3), np.float32) if n == "language_model.lm_head.weight" else src.read(n))
    result = invoke("compile", "--model", "tiny", "--weights", str(bad), "-o", str(tmp_path / "o"))
    assert_user_error(result, "language_model.lm_head.weight", "[3, 3]")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"name": "x", "decoder": {"hidden": 4}}', "unknown key 'decoder.hidden'"),
        ('{"name": "x", "decoder": {"num_layers": "two"}}', "'decoder.num_layers': expected an integer"),
        ('{"name": "x", "vision": {"num_heads": 5}}', "missing keys vision.image_size, vision.patch_size"),
        ('{"name": "x", "surprise": 1}', "unknown key 'surprise'"),
        ('{"name": "x", ', "malformed JSON"),
    ],
)
def test_malformed_config(tmp_path, content, fragment):
    cfg = tmp_path / "model.json"
    cfg.write_text(content)
    out = tmp_path / "o"
    result = invoke("compile", "--model", str(cfg), "-o", str(out))
    assert_user_error(result, fragment)
    assert not out.exists()


def test_unknown_model_name(tmp_path):
    assert_user_error(invoke("compile", "--model", "gpt5", "-o", str(tmp_path / "o")), "unknown model 'gpt5'")


def test_user_config_compiles(tmp_path):
    from bluelower.lowering.models import load_config

    cfg = load_config("tiny").to_dict()
    cfg["name"] = "user-tiny"
    cfg["decoder"]["num_layers"] = 1
    cfg["vision"]["num_layers"] = 1
    path = tmp_path / "user.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "o"
    assert invoke("compile", "--model", str(path), "-o", str(out)).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["model"]["name"] == "user-tiny"


def test_unreadable_image(tiny_build_torch, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    assert_user_error(invoke("run", tiny_build_torch, "--image", str(bad), "--prompt-ids", "1"), "x.png")
    assert_user_error(invoke("run", tiny_build_torch, "--image", str(tmp_path / "missing.png"), "--prompt-ids", "1"),
                      "missing.png")


def test_prompt_longer_than_kv_cache(tiny_build_torch):
    ids = ",".join(["5"] * 1100)
    assert_user_error(invoke("run", tiny_build_torch, "--prompt-ids", ids, "--max-new-tokens", "4"),
                      "exceeds the KV cache capacity of 1024")


def test_bad_prompt_ids(tiny_build_torch):
    assert_user_error(invoke("run", tiny_build_torch, "--prompt-ids", "1,x"), "comma-separated integers")
    assert_user_error(invoke("run", tiny_build_torch, "--prompt-ids", "1,99999"), "prompt ids must be in")


def test_run_on_missing_or_corrupt_build(tmp_path, tiny_build_torch):
    import shutil

    assert_user_error(invoke("run", str(tmp_path / "nothing")), "build directory not found")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build_torch, copy)
    with open(copy / "params.safetensors", "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    assert_user_error(invoke("run", str(copy), "--prompt-ids", "1"), "params.safetensors does not match its SHA-256")


def test_malformed_onnx(tmp_path):
    from bluelower.errors import BlueLowerError
    from bluelower.lowering.frontend.onnx_import import import_onnx_file

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(BlueLowerError, match="malformed ONNX model"):
        import_onnx_file(str(bad))
    with pytest.raises(BlueLowerError, match="ONNX file not found"):
        import_onnx_file(str(tmp_path / "none.onnx"))


def test_unsupported_onnx_op_names_op_and_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from bluelower.errors import UnsupportedOperatorError
    from bluelower.lowering.frontend.onnx_import import import_onnx_file

    node = helper.make_node("Relu", ["x"], ["y"], name="ok_relu")
    odd = helper.make_node("DFT", ["y"], ["z"], name="my_dft_node")
    graph = helper.make_graph([node, odd], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 2])])
    path = tmp_path / "dft.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedOperatorError, match="'DFT' at node 'my_dft_node'"):
        import_onnx_file(str(path))


def test_unsupported_torch_op_names_op_and_node():
    import torch

    from bluelower.errors import UnsupportedOperatorError
    from bluelower.lowering.frontend.torch_export import import_torch_program

    class UsesErfinv(torch.nn.Module):
        def forward(self, x):
            return torch.erfinv(x) + 1

    ep = torch.export.export(UsesErfinv(), (torch.rand(4),))
    with pytest.raises(UnsupportedOperatorError, match=r"'erfinv.default' at node 'erfinv'.*test_cli.py"):
        import_torch_program(ep, "a user model")


def test_unknown_pass_and_quant(tmp_path):
    assert_user_error(invoke("compile", "--disable-pass", "NoSuchPass", "-o", str(tmp_path / "o")),
                      "unknown pass 'NoSuchPass'", "FuseTransposeMatmul")


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    assert_user_error(invoke("compile", "-o", str(foreign)), "refusing to replace")
    assert (foreign / "thesis.txt").read_text() == "precious"


def test_failed_compile_leaves_no_partial_output(tmp_path, monkeypatch):
    from bluelower.lowering.artifacts import compile as build

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the TVM build")

    monkeypatch.setattr(build, "write_safetensors", boom)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError):
        invoke("compile", "-o", str(out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_passes_lists_pipeline_in_order():
    from bluelower.passes.pipeline import pass_names

    result = invoke("passes")
    assert result.exit_code == 0
    positions = [result.output.index(name) for name in pass_names()]
    assert positions == sorted(positions)
