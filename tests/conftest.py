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


@pytest.fixture(scope="session")
def build_tiny(tmp_path_factory):
    """``build_tiny(quant, soc="host", frontend="torch", disable=())`` -> ``(build dir, IR dump
    dir)``: each configuration of the tiny model compiled once per test session, with
    ``--dump-ir``, and shared by every test that reads it (tests must not modify it)."""
    from bluelower import api

    builds: dict = {}

    def get(quant: str = "w4a16kv8", soc: str = "host", frontend: str = "torch", disable=()) -> tuple[str, str]:
        key = (quant, soc, frontend, tuple(disable))
        if key not in builds:
            root = tmp_path_factory.mktemp(f"tiny-{quant}-{frontend}")
            out, ir = str(root / "build"), str(root / "ir")
            api.compile("tiny", out, soc=soc, quant=quant, frontend=frontend, dump_ir=ir, disable_passes=disable)
            builds[key] = (out, ir)
        return builds[key]

    return get


@pytest.fixture(scope="session")
def tiny_build_torch(build_tiny) -> str:
    return build_tiny("fp32", frontend="torch")[0]


@pytest.fixture(scope="session")
def tiny_build_onnx(build_tiny) -> str:
    return build_tiny("fp32", frontend="onnx")[0]


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    from bluelower.lowering.models import load_config
    from bluelower.lowering.frontend.weights import init_weights

    path = str(tmp_path_factory.mktemp("weights") / "tiny.safetensors")
    init_weights(load_config("tiny"), path, seed=3)
    return path


def run_pipeline_until(cfg, quant: str, stop_after: str = "QuantizeKVCache", soc=None, frontend: str = "torch",
                       execute_memory_plan: bool | None = None):
    """``cfg`` imported and run through the compile pipeline up to ``stop_after`` (default:
    the end of the quantization phase, what PartitionForAPU sees); ``execute_memory_plan``:
    BuildContext's (False: MemoryPlan only plans, the module stays what it saw)."""
    import tvm

    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.models import spec_for
    from bluelower.passes.pipeline import BuildContext, run_pipeline

    mod, sigs = import_model(cfg, frontend)
    target = soc.tvm_target() if soc is not None else tvm.target.Target("llvm")
    ctx = BuildContext(target=target, quant=quant, soc=soc, spec=spec_for(cfg), entry_functions=tuple(sigs),
                       image_batch=cfg.runtime.image_batch, execute_memory_plan=execute_memory_plan)
    mod, _stats = run_pipeline(mod, ctx, stop_after=stop_after)
    return mod, sigs


def pytest_configure(config):
    os.environ.setdefault("TVM_NUM_THREADS", "2")
