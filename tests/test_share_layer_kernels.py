"""ShareLayerKernels: the per-layer attention / KV-write kernels become one generic kernel per
shape called with the layer as an argument; the build computes exactly what it did before."""

import numpy as np
import pytest

from bluelower.generate import CompiledModel
from bluelower.lowering.build import CompileRequest, compile_model


def _stats(manifest, name):
    return next(p["stats"] for p in manifest["passes"] if p["name"] == name)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = {}
    for label, disabled in (("shared", ()), ("per_layer", ("ShareLayerKernels",))):
        path = str(tmp_path_factory.mktemp(label) / "tiny")
        manifest = compile_model(CompileRequest(model="tiny", out_dir=path, quant="w4a16kv8",
                                                disabled_passes=disabled))
        out[label] = (path, manifest)
    return out


def test_one_kernel_per_shape_and_same_results(builds):
    shared = _stats(builds["shared"][1], "ShareLayerKernels")
    # tiny: 2 layers x (prefill, decode) x (attention, write) per-layer kernels -> 4 shared ones
    assert shared["per_layer_kernels"] == 8 and shared["shared_kernels"] == 4
    assert shared["calls_rewritten"] == 8 and shared["removed"] == 8
    tir_shared = _stats(builds["shared"][1], "AttachGlobalSymbol")["tir_functions"]
    tir_per_layer = _stats(builds["per_layer"][1], "AttachGlobalSymbol")["tir_functions"]
    assert tir_per_layer - tir_shared == 4

    a, b = (CompiledModel(builds[k][0]) for k in ("shared", "per_layer"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(a.chunk,)).astype(np.int64)
    for m in (a, b):
        m.reset_cache()
    rows_a, rows_b = a.embed_chunk(ids), b.embed_chunk(ids)
    assert np.array_equal(rows_a, rows_b)
    assert np.array_equal(a.prefill_chunk(rows_a, 0, 5), b.prefill_chunk(rows_b, 0, 5))
    for step, tok in enumerate((3, 17, 42)):  # decode reads what prefill and earlier steps wrote
        assert np.array_equal(a.decode_step(tok, 5 + step), b.decode_step(tok, 5 + step)), step
