"""compile: the parameters convert and write on a thread beside the TVM build; the stages are
reported; a failure on either side is one error and leaves no output; the result is the
same bytes as a build whose parameters were written after the library."""

from __future__ import annotations

import os
import threading

import pytest

from bluelower import progress
from bluelower.errors import BlueLowerError
from bluelower.lowering.artifacts import compile as C
from bluelower.lowering.artifacts.compile import CompileRequest, compile_model


def _build(out, **kw):
    return compile_model(CompileRequest(model="tiny", out_dir=str(out), quant="w4a16kv8", soc="host", **kw))


def test_params_written_beside_the_build_and_stages_reported(tmp_path, capsys, monkeypatch):
    from tvm import relax

    seen = {}
    real_build, real_write = relax.build, C._write_params

    def write_params(*a):  # the writer has started (on its thread) before TVM builds
        seen["writer"] = threading.current_thread().name
        return real_write(*a)

    def build(*a, **k):
        seen["writer_before_build"] = "writer" in seen
        return real_build(*a, **k)

    monkeypatch.setattr(relax, "build", build)
    monkeypatch.setattr(C, "_write_params", write_params)
    monkeypatch.setattr(progress, "_quiet", False)  # the suite runs quiet (conftest)
    _build(tmp_path / "a")
    assert seen["writer_before_build"] and seen["writer"] == "bluelower-write params"
    err = capsys.readouterr().err
    stages = [line for line in err.splitlines() if line.startswith("stages: ")]
    assert len(stages) == 1
    for name in ("import + passes", "TVM build", "params (beside passes and build)", "total"):
        assert f"{name} " in stages[0], stages[0]


def test_same_bytes_as_params_written_after_the_build(tmp_path, monkeypatch):
    """Writing beside the build does not change a byte: the threaded build equals one whose
    writer starts only after the TVM build finished."""
    _build(tmp_path / "threaded")
    orig_start = C._Background.start
    monkeypatch.setattr(C._Background, "start", lambda self: None)
    real_join = C._Background.join

    def join(self, quiet=False):
        orig_start(self)
        return real_join(self, quiet)

    monkeypatch.setattr(C._Background, "join", join)
    _build(tmp_path / "serial")
    for name in ("model.so", "params.safetensors", "manifest.json"):
        a = open(tmp_path / "threaded" / name, "rb").read()
        b = open(tmp_path / "serial" / name, "rb").read()
        assert a == b, name


def test_a_failing_tvm_build_stops_the_writer_and_leaves_nothing(tmp_path, monkeypatch):
    from tvm import relax

    produced = []
    real = C._write_params

    def write_params(*a):
        produced.append(threading.current_thread().name)
        return real(*a)

    def broken(*a, **k):
        raise BlueLowerError("simulated TVM build failure")

    monkeypatch.setattr(C, "_write_params", write_params)
    monkeypatch.setattr(relax, "build", broken)
    out = tmp_path / "out"
    with pytest.raises(BlueLowerError, match="simulated TVM build failure"):
        _build(out)
    assert produced and not out.exists()
    assert not any(t.name == "bluelower-write params" for t in threading.enumerate())
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []


def test_a_failing_writer_is_the_error_and_leaves_nothing(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise BlueLowerError("simulated weight failure")

    monkeypatch.setattr(C, "write_safetensors", broken)
    out = tmp_path / "out"
    with pytest.raises(BlueLowerError, match="simulated weight failure"):
        _build(out)
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []


def test_writer_runs_beside_the_late_passes_and_a_failing_pass_stops_it(tmp_path, monkeypatch):
    """The writer starts once the quantization phase has decided the stored tensors, so it runs
    beside the lowering passes too; a pass that fails then is the error, the writer stops and
    nothing is left behind."""
    import tvm
    from tvm import relax

    seen, started, release = {}, threading.Event(), threading.Event()
    real = C._write_params

    def write_params(*a):  # held until the late pass has seen it running
        started.set()
        release.wait(60)
        return real(*a)

    def failing_fuse_tir():
        @tvm.transform.module_pass(opt_level=0, name="FuseTIR")
        def fail(mod, _ctx):
            seen["writer_alive"] = started.wait(60) and any(t.name == "bluelower-write params"
                                                            for t in threading.enumerate())
            release.set()
            raise BlueLowerError("simulated pass failure")

        return fail

    monkeypatch.setattr(C, "_write_params", write_params)
    monkeypatch.setattr(relax.transform, "FuseTIR", failing_fuse_tir)
    out = tmp_path / "out"
    with pytest.raises(BlueLowerError, match="simulated pass failure"):
        _build(out)
    assert seen["writer_alive"]
    assert not any(t.name == "bluelower-write params" for t in threading.enumerate())
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []
