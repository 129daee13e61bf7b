"""Shared fixtures: tiny builds are compiled once per test session."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bluelower import progress

progress.set_quiet(True)


@pytest.fixture(scope="session")
def tiny_image(tmp_path_factory) -> str:
    """A non-square uint8 RGB image as .npy."""
    path = tmp_path_factory.mktemp("img") / "image.npy"
    rng = np.random.default_rng(7)
    np.save(path, (rng.random((300, 500, 3)) * 255).astype(np.uint8))
    return str(path)


def _compile(tmp_path_factory, frontend: str) -> str:
    from bluelower.lowering.artifacts.compile import CompileRequest, compile_model

    out = str(tmp_path_factory.mktemp(f"build_{frontend}") / "tiny")
    compile_model(CompileRequest(model="tiny", frontend=frontend, out_dir=out, quant="fp32"))
    return out


@pytest.fixture(scope="session")
def tiny_build_torch(tmp_path_factory) -> str:
    return _compile(tmp_path_factory, "torch")


@pytest.fixture(scope="session")
def tiny_build_onnx(tmp_path_factory) -> str:
    return _compile(tmp_path_factory, "onnx")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    from bluelower.lowering.models import load_config
    from bluelower.lowering.frontend.weights import init_weights

    path = str(tmp_path_factory.mktemp("weights") / "tiny.safetensors")
    init_weights(load_config("tiny"), path, seed=3)
    return path


def run_pipeline_until(cfg, quant: str, stop_after: str = "QuantizeKVCache", soc=None, frontend: str = "torch"):
    """``cfg`` imported and run through the compile pipeline up to ``stop_after`` (default:
    the end of the quantization phase, what PartitionForAPU sees)."""
    import tvm

    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.models import spec_for
    from bluelower.passes.pipeline import BuildContext, run_pipeline

    mod, sigs = import_model(cfg, frontend)
    target = soc.tvm_target() if soc is not None else tvm.target.Target("llvm")
    ctx = BuildContext(target=target, quant=quant, soc=soc, spec=spec_for(cfg), entry_functions=tuple(sigs),
                       image_batch=cfg.runtime.image_batch)
    mod, _stats = run_pipeline(mod, ctx, stop_after=stop_after)
    return mod, sigs


def pytest_configure(config):
    os.environ.setdefault("TVM_NUM_THREADS", "2")
