"""The INT4 scale search kernel (lowering/kernels/search.py) equals its numpy reference bit
for bit -- on this machine's target (FMA contraction on) and the baseline x86 target (no FMA)
-- on heavy-tailed weights and on the groups where rounding decides: zeros, constants, float16
subnormal scales, exact halves, ties; and the quantizers use it."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest

from bluelower.lowering.kernels import quantize_int4_asym, quantize_int4_groupwise, search as S

BASELINE = json.dumps({"kind": "llvm"})  # x86-64 baseline: SSE2, no FMA to contract into


def _groups(gs: int, n: int = 3000, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    wg = (r.standard_t(4, size=(n, gs)) * 0.02).astype(np.float32)
    wg[:40] = 0  # zero groups: scale 0, inverse 0
    wg[40:80] = 3.0  # constant: span 0
    wg[80:120] = (1e-6 * r.standard_normal((40, gs))).astype(np.float32)  # float16 subnormal scales
    wg[120:160] = (r.integers(-16, 16, size=(40, gs)) / 2).astype(np.float32)  # exact halves after scaling
    wg[160:200, : gs // 2] = 0.5  # half constant
    wg[200:240] = np.round(wg[200:240] * 1000) / 1000
    wg[240:280] = -wg[240:280]
    wg[280:320] = (r.standard_normal((40, gs)) * 1e4).astype(np.float32)  # large values
    return wg


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


TARGETS = [None] + ([BASELINE] if platform.machine() in ("x86_64", "AMD64") else [])


@pytest.mark.parametrize("gs", [32, 64])
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: "host" if t is None else "baseline")
def test_asym_kernel_equals_reference(gs, target):
    wg = _groups(gs)
    s_ref, m_ref = S.search_asym_reference(wg)
    s, m = S.search_asym(wg, target=target or json.dumps(_host_target()))
    assert np.array_equal(_bits(s), _bits(s_ref)) and np.array_equal(_bits(m), _bits(m_ref))
    # the search changed something (not only the plain candidate everywhere)
    plain_m = wg.min(axis=1).astype(np.float16).astype(np.float32)
    assert (m != plain_m).mean() > 0.3


@pytest.mark.parametrize("gs", [32, 64])
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: "host" if t is None else "baseline")
def test_sym_kernel_equals_reference(gs, target):
    wg = _groups(gs, seed=1)
    want = S.search_sym_reference(wg, 7, -8)
    got = S.search_sym(wg, 7, -8, target=target or json.dumps(_host_target()))
    assert np.array_equal(_bits(got), _bits(want))
    plain = (np.abs(wg).max(axis=1) / np.float32(7)).astype(np.float16).astype(np.float32)
    assert (got != plain).mean() > 0.3


def _host_target() -> dict:
    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}  # as kernels.host_target


def test_quantizers_use_the_kernel_and_match_the_reference(monkeypatch):
    """A weight large enough for the kernel (and crossing a kernel block boundary) gives the
    same packed bits as the reference path."""
    r = np.random.default_rng(2)
    w = (r.standard_t(4, size=(64, (S._BLOCK_GROUPS // 64 + 3) * 32)) * 0.02).astype(np.float32)
    assert w.size // 32 > S.KERNEL_MIN_GROUPS
    calls = []
    orig = S._kernel
    monkeypatch.setattr(S, "_kernel", lambda *a, **k: calls.append(a) or orig(*a, **k))
    fast = [quantize_int4_asym(w, 32, search=True), quantize_int4_groupwise(w, 32, search=True)]
    assert {c[0] for c in calls} == {"asym", "sym"}
    monkeypatch.setattr(S, "KERNEL_MIN_GROUPS", 1 << 40)
    slow = [quantize_int4_asym(w, 32, search=True), quantize_int4_groupwise(w, 32, search=True)]
    for a, b in zip(fast, slow):
        for x, y in zip(a, b):
            assert np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
