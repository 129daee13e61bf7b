"""MemoryPlan's arena executed (``BuildContext(execute_memory_plan=True)``: MemoryPlan rewrites
every intermediate to ``alloc_tensor(arena, offset)`` and AcceptBufferOffsets makes the kernels
take tensors at an offset): every entry of tiny computes bit for bit what the default build
computes, and the Relax VM requests exactly the executed arena plus the outputs per call."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from bluelower.lowering.frontend.entries import module_signatures
from bluelower.lowering.frontend.importer import import_model
from bluelower.lowering.models import load_config, spec_for
from bluelower.passes.ir_utils import result, without_results
from bluelower.passes.pipeline import BuildContext, run_pipeline
from bluelower.targets.soc import load_soc

SIZE = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}


def test_accept_offsets_golden():
    """Every tensor parameter gets its own symbolic elem_offset, offset_factor = 64 bytes / its
    element size (16 for float32, 64 for int8); a scalar parameter and the body stay as they were."""
    from tvm.script import tirx as T

    from bluelower.passes.accept_offsets import accept_offsets

    @T.prim_func
    def before(A: T.Buffer((8, 16), "float32"), idx: T.Buffer((8,), "int8"), n: T.int64,
               B: T.Buffer((8, 16), "float32")):
        for i, j in T.grid(8, 16):
            B[i, j] = A[i, j] * T.Cast("float32", idx[i]) + T.Cast("float32", n)

    @T.prim_func
    def expected(A: T.Buffer((8, 16), "float32", elem_offset=T.int64(), offset_factor=16),
                 idx: T.Buffer((8,), "int8", elem_offset=T.int64(), offset_factor=64), n: T.int64,
                 B: T.Buffer((8, 16), "float32", elem_offset=T.int64(), offset_factor=16)):
        for i, j in T.grid(8, 16):
            B[i, j] = A[i, j] * T.Cast("float32", idx[i]) + T.Cast("float32", n)

    got, changed = accept_offsets(before)
    assert changed == 3
    tvm.ir.assert_structural_equal(got.without_attr("global_symbol"), expected.without_attr("global_symbol"))
    assert accept_offsets(got) == (got, 0)  # already offset-taking: unchanged


def _build(quant: str, execute: bool):
    cfg, soc = load_config("tiny"), load_soc("host")
    mod, sigs = import_model(cfg, "torch")
    ctx = BuildContext(target=soc.tvm_target(), quant=quant, soc=soc, spec=spec_for(cfg), entry_functions=tuple(sigs),
                       image_batch=cfg.runtime.image_batch, execute_memory_plan=execute)
    mod, stats = run_pipeline(mod, ctx)
    ex = relax.build(without_results(mod), soc.tvm_target(), relax_pipeline=None)
    return mod, stats, relax.VirtualMachine(ex, tvm.cpu())


def _inputs(sig, rng):
    """Deterministic arguments: small floats, in-range ids and positions, a zero cache."""
    out = []
    for spec in list(sig.inputs) + [{"name": n, "shape": s, "dtype": d} for n, (s, d) in sig.param_shapes.items()]:
        shape, dtype, name = tuple(spec["shape"]), spec["dtype"], spec["name"]
        if "kv_cache" in name:
            a = np.zeros(shape, dtype)
        elif dtype.startswith("float"):
            a = (rng.standard_normal(shape) * 0.05).astype(dtype)
        elif dtype == "int64":
            a = np.full(shape, 3, dtype)  # token ids, start positions, valid rows
        else:
            a = rng.integers(0, 16, shape).astype(dtype)
        out.append(tvm.runtime.tensor(a))
    return out


@pytest.mark.parametrize("quant", ["fp32", "w4a16kv8"])
def test_executed_arena_is_bit_identical_and_is_what_the_vm_allocates(quant):
    base_mod, _s, base_vm = _build(quant, False)
    mod, stats, vm = _build(quant, True)
    names = [s["name"] for s in stats]
    assert "AcceptBufferOffsets" in names
    accept = next(s for s in stats if s["name"] == "AcceptBufferOffsets")["stats"]
    assert accept["functions"] > 0 and accept["tensor_params"] > 0, accept
    plans = result(mod, "memory_plan")
    executed = ("executed_arena_bytes", "vm_alloc_bytes")  # what each build's VM requests: its own
    base_plans = result(base_mod, "memory_plan")
    assert {k: {f: x for f, x in v.items() if f not in executed} for k, v in plans.items()} == {
        k: {f: x for f, x in v.items() if f not in executed} for k, v in base_plans.items()}  # the reported plan
    assert all(v["vm_alloc_bytes"] == v["tvm_host_alloc_bytes"] for v in base_plans.values())
    sigs = module_signatures(base_mod)
    requested: list = []

    def instrument(_func, name, before, _ret, *args):
        if before and name == "vm.builtin.alloc_storage":
            requested.append(int(args[1][0]))
        return 0

    vm.set_instrument(instrument)
    for name in ("embed", "prefill", "decode", "encode_image"):
        args = _inputs(sigs[name], np.random.default_rng(0))
        want = base_vm[name](*args)
        args = _inputs(sigs[name], np.random.default_rng(0))
        requested.clear()
        got = vm[name](*args)
        want = [want] if hasattr(want, "numpy") else list(want)
        got = [got] if hasattr(got, "numpy") else list(got)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w.numpy(), g.numpy(), err_msg=name)
        p = plans[name]
        outputs = sum(int(np.prod(shape)) * SIZE[dt] for _n, _b, shape, dt in p["outputs"])
        assert sum(requested) == p["executed_arena_bytes"] + outputs, (name, requested, p["executed_arena_bytes"])
        # one allocation for the arena, one per output: nothing else
        assert len(requested) == (p["executed_arena_bytes"] > 0) + len(p["outputs"]), (name, requested)


def test_compile_executes_the_plan_by_default(tmp_path):
    """``compile`` runs the arena by default: the manifest records the executed arena per
    function and the passes that made it; ``--no-execute-memory-plan`` and a build that
    disables MemoryPlan run TVM's storage tokens (the latter without an error: it only asked
    for a pass to be left out; ``--execute-memory-plan`` with it is an error, tested below)."""
    import json

    from click.testing import CliRunner

    from bluelower.cli import cli

    cases = ((), True), (("--no-execute-memory-plan",), False), (("--disable-pass", "MemoryPlan"), False)
    for i, (flags, arena) in enumerate(cases):
        out = tmp_path / f"b{i}"
        args = ["--quiet", "compile", "--model", "tiny", "-o", str(out), *flags]
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        passes = {p["name"]: p["stats"] for p in manifest["passes"]}
        if "MemoryPlan" in flags:  # no plan at all: TVM's tokens, kernels without offsets
            assert "memory_plan" not in manifest and "skipped" in passes["AcceptBufferOffsets"]
            continue
        funcs = manifest["memory_plan"]["functions"]
        if arena:
            assert funcs["prefill"]["executed_arena_bytes"] >= funcs["prefill"]["arena_bytes"] > 0
            assert passes["AcceptBufferOffsets"]["functions"] > 0
        else:
            assert "executed_arena_bytes" not in funcs["prefill"]
            assert "skipped" in passes["AcceptBufferOffsets"]
        outputs = sum(int(np.prod(shape)) * SIZE[dt] for _n, _b, shape, dt in funcs["prefill"]["outputs"])
        # what the VM requests per call: the arena + the outputs, or TVM's tokens
        assert funcs["prefill"]["vm_alloc_bytes"] == (funcs["prefill"]["executed_arena_bytes"] + outputs if arena
                                                      else funcs["prefill"]["tvm_host_alloc_bytes"])


def test_aarch64_bundle_runs_tvm_tokens_under_qemu(tmp_path):
    """The default Dimensity 9300 bundle executes the arena (aarch64 kernels taking offsets,
    APU partitions each with its own arena) and generates the PyTorch reference's tokens under
    qemu (test_native_runtime.py); a ``--no-execute-memory-plan`` bundle (TVM's storage tokens,
    kernels without offsets) generates the same tokens."""
    import json
    import subprocess
    import sys

    from bluelower.lowering.artifacts import device
    from test_native_runtime import MAX_NEW, PROMPT, _have_aarch64, _reference_tokens

    if _have_aarch64():
        pytest.skip(_have_aarch64())
    image = str(tmp_path / "img.npy")
    np.save(image, np.random.default_rng(7).integers(0, 256, size=(50, 41, 3), dtype=np.uint8))
    out = str(tmp_path / "bundle")
    proc = subprocess.run([sys.executable, "-m", "bluelower.cli", "-q", "build", "--model", "tiny", "--quant", "fp32",
                           "--soc", "dimensity9300", "--no-execute-memory-plan", "-o", out, "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(open(f"{out}/manifest.json").read())
    assert "executed_arena_bytes" not in manifest["memory_plan"]["functions"]["decode"]
    cmd, env = device.native_command(out, [out, "--image", image, "--prompt-ids", PROMPT, "--max-new-tokens",
                                           str(MAX_NEW), "--json"])
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["tokens"] == _reference_tokens(out, image, PROMPT, MAX_NEW)


@pytest.mark.parametrize("disabled", ["MemoryPlan", "AcceptBufferOffsets"])
def test_execute_memory_plan_without_its_passes_is_one_error_line(tmp_path, disabled):
    from click.testing import CliRunner

    from bluelower.cli import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--quiet", "compile", "--model", "tiny", "--execute-memory-plan",
                                      "--disable-pass", disabled, "-o", str(out)])
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and f"--disable-pass {disabled}" in lines[0] and "--execute-memory-plan" in lines[0], lines
    assert not out.exists()
