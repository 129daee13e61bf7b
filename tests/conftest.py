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
    from bluelower.lowering.models.bluelm_v.config import load_config
    from bluelower.lowering.frontend.weights import init_weights

    path = str(tmp_path_factory.mktemp("weights") / "tiny.safetensors")
    init_weights(load_config("tiny"), path, seed=3)
    return path


def pytest_configure(config):
    os.environ.setdefault("TVM_NUM_THREADS", "2")
