"""Each frontend's compiled entry functions against the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest

from bluelower.runtime_stubs.generate import CompiledModel, generate, reference_for_build


def _compare_entries(build_dir: str) -> None:
    compiled = CompiledModel(build_dir)
    reference = reference_for_build(build_dir)
    rng = np.random.default_rng(11)
    patches = rng.standard_normal((1, 3, 384, 384)).astype(np.float32)
    got, want = compiled.encode_batch(patches), reference.encode_batch(patches)
    # tiny's std-0.3 weights give image tokens up to ~30: float32 rounding (summation order,
    # the attention kernel's polynomial exp) scales with the tensor, not with each element
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    ids = rng.integers(0, compiled.vocab_size, compiled.chunk).astype(np.int64)
    np.testing.assert_allclose(compiled.embed_chunk(ids), reference.embed_chunk(ids), rtol=0, atol=0)
    rows = rng.standard_normal((compiled.chunk, 64)).astype(np.float32)
    compiled.reset_cache()
    reference.reset_cache()
    for start, valid in ((0, compiled.chunk), (compiled.chunk, 10)):
        a = compiled.prefill_chunk(rows, start, valid)
        b = reference.prefill_chunk(rows, start, valid)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(compiled.kv.numpy(), reference.kv.numpy(), rtol=1e-4, atol=1e-4)
    for step in range(4):
        pos = compiled.chunk + 10 + step
        np.testing.assert_allclose(compiled.decode_step(7 + step, pos), reference.decode_step(7 + step, pos),
                                   rtol=1e-4, atol=1e-4)


def test_torch_frontend_matches_pytorch(tiny_build_torch):
    _compare_entries(tiny_build_torch)


def test_onnx_frontend_matches_pytorch(tiny_build_onnx):
    _compare_entries(tiny_build_onnx)


@pytest.mark.parametrize("fixture", ["tiny_build_torch", "tiny_build_onnx"])
def test_generation_matches_pytorch_tokens(fixture, request):
    build = request.getfixturevalue(fixture)
    rng = np.random.default_rng(3)
    patches = rng.standard_normal((1, 3, 384, 384)).astype(np.float32)
    prompt = [5, 17, 33, 9, 100, 7, 250]
    ours = generate(CompiledModel(build), patches, prompt, 24)
    ref = generate(reference_for_build(build), patches, prompt, 24)
    assert ours.tokens == ref.tokens
    assert len(set(ref.tokens)) > 3  # a varied sequence, not one repeated token
    np.testing.assert_allclose(ours.first_logits, ref.first_logits, rtol=1e-4, atol=1e-4)


def test_manifest_records_entries_and_hashes(tiny_build_torch):
    import json
    import os

    from bluelower.files import file_sha256

    with open(os.path.join(tiny_build_torch, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert {"encode_image", "embed", "prefill", "decode", "encode_image_embed", "encode_image_blocks"} == set(manifest["functions"])
    assert manifest["functions"]["encode_image"]["inputs"][0]["shape"] == [1, 3, 384, 384]
    assert manifest["frontend"] == "torch" and manifest["soc"] == "host"
    for name, digest in manifest["files"].items():
        assert file_sha256(os.path.join(tiny_build_torch, name)) == digest
    assert {"tvm", "torch", "bluelower"} <= set(manifest["tool_versions"])
    assert [p["name"] for p in manifest["passes"]][:2] == ["CanonicalizeBindings", "DeadCodeElimination"]
