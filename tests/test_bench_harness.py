"""benchmarks/llm_bench.py's bookkeeping: which llama.cpp configuration a ratio is taken
against, the hypervisor steal share, when ratios are withheld, the roofline bytes.

The measurements themselves need a quiet machine and live in benchmarks/; this checks only
the arithmetic that turns rounds into the reported ratios."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import llm_bench as B  # noqa: E402
import _llm_models as M  # noqa: E402


def _summary(p128, d128, n=5, errors=()):
    return {"prefill128_tok_s": p128, "prefill2048_tok_s": None, "decode128_tok_s": d128, "decode2048_tok_s": None,
            "n": {"prefill128_tok_s": n if p128 else 0, "prefill2048_tok_s": 0, "decode128_tok_s": n if d128 else 0,
                  "decode2048_tok_s": 0},
            "errors": list(errors)}


def test_best_llama_takes_the_fastest_complete_configuration():
    summary = {
        "bluelower": _summary(90.0, 20.0),
        "llamacpp-default": _summary(None, 16.0),  # decode only (its batched prefill crashes)
        "llamacpp-no-extra": _summary(50.0, 9.0),
        "llamacpp-repack": _summary(57.0, 6.0),
    }
    best = B.best_llama(summary)
    assert best == {"prefill128": "llamacpp-repack", "decode128": "llamacpp-default"}


def test_best_llama_skips_a_configuration_that_crashed_or_missed_rounds():
    summary = {
        "bluelower": _summary(90.0, 20.0),
        "llamacpp-default": _summary(None, 30.0, errors=["worker died (rc -11)"]),
        "llamacpp-no-extra": _summary(80.0, 9.0, n=3),  # completed 3 of 5 rounds
        "llamacpp-repack": _summary(57.0, 6.0),
    }
    assert B.best_llama(summary) == {"prefill128": "llamacpp-repack", "decode128": "llamacpp-repack"}


def test_steal_percent_and_withheld_ratios():
    # /proc/stat columns: user nice system idle iowait irq softirq steal
    before = [100, 0, 10, 1000, 0, 0, 0, 5]
    after = [200, 0, 20, 1800, 0, 0, 0, 95]
    assert B.steal_percent(before, after) == pytest.approx(100 * 90 / 1000)
    assert B.steal_percent(None, after) is None
    quiet = {"steal_percent": 0.2, "loadavg_start": "0.05 0.10 0.20", "other_processes_start": [],
             "other_processes_end": []}
    assert B.quiet_machine_violations(quiet) == []
    stolen = dict(quiet, steal_percent=9.0)
    assert any("stolen" in v for v in B.quiet_machine_violations(stolen))
    busy = dict(quiet, loadavg_start="1.70 1.00 0.50")
    assert any("load average" in v for v in B.quiet_machine_violations(busy))


def test_decode_bytes_counts_int4_weights_and_int8_kv_for_every_w4_kv8_mode():
    from bluelower.lowering.models import load_config

    cfg = load_config(M.config_path("tiny"))
    a8 = M.decode_bytes(cfg, "bluelower", "w4a8kv8", 128)
    a16 = M.decode_bytes(cfg, "bluelower", "w4a16kv8", 128)
    fp32 = M.decode_bytes(cfg, "bluelower", "fp32", 128)
    llama = M.decode_bytes(cfg, "llamacpp-default", "Q4_0", 128)
    assert a8 == a16
    assert fp32["weight_bytes"] > 6 * a8["weight_bytes"]  # 32 bits vs 4.5 bits per weight
    assert llama["weight_bytes"] == a8["weight_bytes"]
    assert llama["kv_bytes"] == 2 * a8["kv_bytes"]  # f16 cache vs int8


def test_default_buffers_are_probed_not_assumed(monkeypatch):
    """llama.cpp's default weight buffers are measured in full unless a probe process's
    batched prefill dies (the 2026-12-02 Xeon's AMX kernels); the result names why."""
    import types

    seen = []

    def fake_run(rc):
        def run(cmd, **kw):
            seen.append((cmd, kw))
            return types.SimpleNamespace(returncode=rc)
        return run

    monkeypatch.setattr(B.subprocess, "run", fake_run(0))
    assert B.probe_default_prefill("m.gguf") is None
    cmd, kw = seen[-1]
    assert cmd[-1] == "m.gguf" and "bufts='default'" in cmd[2] and "range(1, 129)" in cmd[2]
    monkeypatch.setattr(B.subprocess, "run", fake_run(-4))
    assert B.probe_default_prefill("m.gguf", n=32) == "its 32-token batched prefill died (exit code -4)"


def test_default_buffers_label_names_what_the_run_offered():
    import _llm_report as R

    assert R._label("llamacpp-default", {}) == "llama.cpp Q4_0, default buffers (AMX)"  # runs before the record
    assert R._label("llamacpp-default", {"llamacpp_extra_bufts": ["CPU_REPACK"]}) == \
        "llama.cpp Q4_0, default buffers (CPU_REPACK)"
    assert R._label("llamacpp-default", {"llamacpp_extra_bufts": []}) == "llama.cpp Q4_0, default buffers (none)"
    assert R._label("bluelower", {}) == "bluelower (compiled)"


def test_bluelower_roofline_counts_the_bytes_its_build_stores(tmp_path):
    """A build's decode reads its recipe's formats (INT4 asymmetric: 5 bits a weight, INT8
    lm_head), not the 4.5 bits of Q4_0: the roofline takes its manifest's figure."""
    import json

    from bluelower.lowering.models import load_config

    cfg = load_config(M.config_path("tiny"))
    (tmp_path / "manifest.json").write_text(json.dumps({"functions": {"decode": {"weights_bytes_per_call": 123456}}}))
    stored = B.stored_decode_bytes(str(tmp_path))
    assert stored == 123456
    b = M.decode_bytes(cfg, "bluelower", "w4a8kv8", 128, stored)
    assert b["weight_bytes"] == 123456
    assert b["kv_bytes"] == M.decode_bytes(cfg, "bluelower", "w4a8kv8", 128)["kv_bytes"]
    assert B.stored_decode_bytes(str(tmp_path / "missing")) is None
