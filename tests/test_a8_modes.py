"""The int8-activation modes (``--quant w4a8``, ``w4a8kv8``, ``w8a8``): kernels and builds.

1. Host kernels: ``quantize_act_int8`` and ``int4_a8_linear`` (sym, asym, with bias) /
   ``int8_a8_linear`` (per channel, group-wise) for decode (``M = 1``) and prefill (``M = 13``:
   full register tiles and a remainder row, row pairs and an odd row for ``i8mm``), every ISA of
   ``kernels.DOT_ISAS`` this machine executes, against the numpy references
   (``quantize_act_rows``, ``act_sums``, ``a8_linear_reference``).
2. aarch64: the ``dotprod`` (``sdot``) and ``i8mm`` (``smmla``, the Dimensity 9300 target)
   kernels cross-compiled, run under qemu-aarch64 by ``tests/native/kernel_runner.cc``, the
   same comparisons; the objects' disassembly holds the instructions.
3. Tiny builds in each a8 mode (torch, and w4a8 through ONNX): manifest and pass stats, and
   ``run --check`` matches the PyTorch reference.

Tolerances. The activation codes, scales and code sums must equal the references exactly
(integer results, and one float32 division / multiplication evaluated the same way). The
linear kernels' integer dot products are exact (int32), so the outputs can differ from the
reference only by the rounding of the float32 scaling: the same operations in the same
order, but LLVM may contract a multiply and an add into one fused multiply-add. Both then
are within ``gamma(G + 3) * sum |terms|`` of the exact value (``gamma(n) ~ n * 2**-24``, ``G``
groups per row: ``G`` products and sums, the scaling by ``sx``, the bias), so the test bound is
``|y - ref| <= 2 * (G + 3) * 2**-24 * (sx * sum_g |term_g| + |bias|)``. With power-of-two weight
scales every product and partial sum is exact in float32 and only the final ``* sx``
rounds, identically, so those outputs must be **bit-identical** (and a zero row gives
exactly 0, or the bias).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import tvm

from bluelower.lowering import kernels
from bluelower.lowering.kernels import (
    DOT_ISAS,
    a8_linear_reference,
    act_sums,
    dot_isa,
    host_target,
    int4_a8_linear,
    int4_k1_to_k4,
    int8_a8_linear,
    int8_k1_to_k4,
    int8_k4_to_k1,
    quantize_act_int8,
    quantize_act_rows,
)
from bluelower.lowering.kernels import quant as Q

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER_SRC = os.path.join(HERE, "native", "kernel_runner.cc")

N, K = 64, 128  # two 32-row blocks of W; 4 groups of 32 (2 of 64)
# decode GEMV; prefill: full register tiles and a remainder row for every ISA's m_tile (vnni 6,
# generic 4, dotprod 3), row pairs and an odd row for i8mm
MS = (1, 13)
# name -> (format, group size, bias)
VARIANTS = {
    "int4": ("int4", 32, False),
    "int4_asym": ("int4_asym", 32, False),
    "int4_bias": ("int4", 32, True),
    "int8": ("int8", None, False),
    "int8_group": ("int8_group", 64, False),
}
U = 2.0 ** -24  # float32 unit roundoff

# aarch64: the dot products that need the instructions (generic / vnni are x86 or portable)
DOTPROD_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}


def _aarch64_target(isa: str) -> tvm.target.Target:
    if isa == "i8mm":  # the phone: Cortex-X4 with sve2, dotprod, i8mm, fullfp16
        from bluelower.targets.soc import load_soc

        return load_soc("dimensity9300").tvm_target()
    return tvm.target.Target(DOTPROD_TARGET)


# ----------------------------------------------------------------------------- host ISAs


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = _cpu_flags()
HOST_BEST = dot_isa(host_target())


def _host_can_run(isa: str) -> str | None:
    """None if this machine executes ``isa``'s kernels, else why not."""
    if isa == "generic":
        return None
    need = {"vnni": ("avx512_vnni", "avx512bw"), "dotprod": ("asimddp",), "i8mm": ("asimddp", "i8mm")}[isa]
    missing = [f for f in need if f not in FLAGS]
    if missing:
        return f"host CPU lacks {', '.join(missing)} ({isa}; the aarch64 ones run under qemu below)"
    if isa not in (HOST_BEST, "dotprod" if HOST_BEST == "i8mm" else None):
        return f"dot_isa(host_target()) is {HOST_BEST!r}, not {isa!r}"
    return None


def _host_target(isa: str) -> tvm.target.Target:
    # generic: the shipped host SoC's target (baseline x86-64, what `--soc host` builds use)
    return tvm.target.Target({"kind": "llvm", "num-cores": 2}) if isa == "generic" else host_target()


def test_dot_isa_of_targets():
    from bluelower.targets.soc import load_soc

    assert dot_isa(load_soc("host").tvm_target()) == "generic"  # no mcpu: reproducible builds
    assert dot_isa(load_soc("dimensity9300").tvm_target()) == "i8mm"
    assert dot_isa(kernels.AARCH64_TARGET) == "i8mm"
    assert dot_isa(DOTPROD_TARGET) == "dotprod"
    assert dot_isa({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}) == "generic"
    if {"avx512_vnni", "avx512bw"} <= FLAGS:
        assert HOST_BEST == "vnni"
    assert set(DOT_ISAS) == {"generic", "vnni", "dotprod", "i8mm"}


# ----------------------------------------------------------------------------- inputs

# max|x| = 63.5 makes inv = 127 / 63.5 = 2 exactly, so x * inv lands on .5 ties: round half to even
TIE_HEAD = np.array([63.5, 0.25, 0.75, -0.25, -0.75, 1.25, -1.25, 31.75, -63.25, 63.25, 0.0, -63.5], np.float32)
TIE_CODES = [127, 0, 2, 0, -2, 2, -2, 64, -126, 126, 0, -127]


def _tie_row(rng) -> np.ndarray:
    row = (rng.standard_normal(K) * 9).clip(-60, 60).astype(np.float32)
    row[:len(TIE_HEAD)] = TIE_HEAD
    return row


def _activations(M: int) -> list:
    """Inputs ``x [M, K]`` of the M-row kernels: rows of different magnitudes, the zero row
    and the rounding-tie row (for ``M == 1`` each its own call)."""
    rng = np.random.default_rng(100 + M)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.01, 30, (M, 1))).astype(np.float32)
    if M == 1:
        return [_tie_row(rng)[None], np.zeros((1, K), np.float32), x]
    x[0] = 0
    x[M - 1] = _tie_row(rng)  # the last row: the remainder / odd-row path
    return [x]


def test_reference_rounds_ties_to_even():
    xq, sx = quantize_act_rows(_tie_row(np.random.default_rng(0))[None])
    assert xq[0, :len(TIE_CODES)].tolist() == TIE_CODES
    assert sx[0] == np.float32(0.5)
    xq, sx = quantize_act_rows(np.zeros((2, K), np.float32))
    assert not xq.any() and not sx.any()


def _pow2(rng, shape) -> np.ndarray:
    # exponents within 2 of each other: every product and partial sum stays exact in float32
    return (2.0 ** rng.integers(-7, -5, size=shape, endpoint=True)).astype(np.float16)


def _weights(fmt: str, gs, kind: str, seed: int) -> tuple:
    """The packed weight (``k4`` layout) of ``fmt``: ``kind`` "real" quantizes a random float
    weight; "pow2" packs random full-range codes with power-of-two scales."""
    rng = np.random.default_rng(seed)
    if kind == "real":
        w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 1.0, (N, 1))).astype(np.float32)
        if fmt == "int4":
            return Q.quantize_int4_groupwise(w, gs, layout="k4")
        if fmt == "int4_asym":
            return Q.quantize_int4_asym(w, gs, layout="k4")
        if fmt == "int8":
            packed, scales = Q.quantize_int8_per_channel(w)
            return int8_k1_to_k4(packed), scales
        packed, scales = Q.quantize_int8_groupwise(w, gs)
        return int8_k1_to_k4(packed), scales
    if fmt.startswith("int4"):
        codes = rng.integers(0, 16, (N, K)).astype(np.uint8)
        scales = _pow2(rng, (N, K // gs))
        if fmt == "int4":
            return Q.pack_int4_groupwise(codes, scales, layout="k4")
        mins = (-rng.integers(0, 16, (N, K // gs)) * scales.astype(np.float32)).astype(np.float16)
        return Q.pack_int4_asym(codes, scales, mins, layout="k4")
    codes = rng.integers(-128, 128, (N, K)).astype(np.int8)
    codes[0, :4] = -128  # the extreme code (VNNI adds 128 to it)
    if fmt == "int8":
        packed, _ = Q.pack_int8_groupwise(codes, np.ones((N, 1), np.float16))  # [NB, K, 32]: the codes blocked
        return int8_k1_to_k4(packed), (2.0 ** rng.integers(-7, -5, N, endpoint=True)).astype(np.float32)
    packed, scales = Q.pack_int8_groupwise(codes, _pow2(rng, (N, K // gs)))
    return int8_k1_to_k4(packed), scales


def test_k4_layouts_repack_losslessly():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((N, K)).astype(np.float32)
    k1, _ = Q.quantize_int4_groupwise(w, 32, layout="k1")
    k4, _ = Q.quantize_int4_groupwise(w, 32, layout="k4")
    assert np.array_equal(int4_k1_to_k4(k1), k4) and np.array_equal(Q.int4_k4_to_k1(k4), k1)
    # byte 4r + j of [b, kq]: rows r (low nibble) and r + 16 (high) of block b at k = 4 kq + j
    u = Q.unpack_int4_nibbles(k1)
    b, kq, r, j = 1, 5, 3, 2
    assert k4[b, kq, 4 * r + j] == u[32 * b + r, 4 * kq + j] | (u[32 * b + 16 + r, 4 * kq + j] << 4)
    p8, _ = Q.quantize_int8_per_channel(w)
    p8k4 = int8_k1_to_k4(p8)
    assert p8k4.shape == (N // 32, K // 4, 128) and np.array_equal(int8_k4_to_k1(p8k4), p8)
    assert p8k4[b, kq, 4 * 7 + j] == p8[b, 4 * kq + j, 7]  # byte 4r + j: row r at k = 4 kq + j


# ----------------------------------------------------------------------------- calls


def _rounding_bound(xq, sx, fmt, parts, gs, bias) -> np.ndarray:
    """``2 * (G + 3) * u * (sx * sum_g |term_g| + |bias|)`` (module docstring), in float64."""
    if fmt.startswith("int4"):  # the integer codes the kernel multiplies: INT4 u = q + 8, INT8 q
        c = Q.unpack_int4_nibbles(parts[0]).astype(np.float64)  # [N, K]
    else:
        c = Q.unblocked(int8_k4_to_k1(parts[0])).astype(np.float64)
    xq = xq.astype(np.float64)
    if fmt == "int8":
        terms, g = np.abs((xq @ c.T) * np.asarray(parts[1], np.float64)[None]), 1
    else:
        g = K // gs
        s = Q.unblocked(np.asarray(parts[1])).astype(np.float64)
        mn = Q.unblocked(np.asarray(parts[2])).astype(np.float64) if fmt == "int4_asym" else None
        terms = np.zeros((xq.shape[0], N))
        for j in range(g):
            sl = slice(j * gs, (j + 1) * gs)
            d = xq[:, sl] @ c[:, sl].T
            xs = xq[:, sl].sum(axis=1)[:, None]
            if fmt == "int4":
                terms += np.abs(s[None, :, j] * (d - 8 * xs))
            elif fmt == "int4_asym":
                terms += np.abs(s[None, :, j] * d) + np.abs(mn[None, :, j] * xs)
            else:
                terms += np.abs(s[None, :, j] * d)
    total = np.abs(sx.astype(np.float64))[:, None] * terms
    if bias is not None:
        total = total + np.abs(bias.astype(np.float64))[None]
    return 2 * (g + 3) * U * total


class Call:
    """One kernel call: ``inputs`` then zero-initialized ``outputs`` ``[(shape, dtype)]``;
    ``check(outputs)`` compares with the reference and returns the worst error / bound."""

    def __init__(self, func, inputs, outputs, check):
        self.func, self.inputs, self.outputs, self.check = func, [np.ascontiguousarray(a) for a in inputs], outputs, check


def _quant_call(func: str, x: np.ndarray, sg: int) -> Call:
    M = x.shape[0]

    def check(out):
        xq, sx = quantize_act_rows(x)
        np.testing.assert_array_equal(out[0], xq)
        np.testing.assert_array_equal(out[1].view(np.uint32), sx.view(np.uint32))  # bit for bit (0.0 included)
        np.testing.assert_array_equal(out[2], act_sums(xq, sg))
        for m in range(M):
            if np.array_equal(x[m, :len(TIE_HEAD)], TIE_HEAD):  # the ties, rounded to even
                assert out[0][m, :len(TIE_CODES)].tolist() == TIE_CODES and out[1][m] == np.float32(0.5)
        return 0.0

    return Call(func, [x], [((M, K), "int8"), ((M,), "float32"), ((M, K // sg), "int32")], check)


def _linear_call(func: str, x: np.ndarray, variant: str, kind: str, seed: int) -> Call:
    fmt, gs, has_bias = VARIANTS[variant]
    M = x.shape[0]
    xq, sx = quantize_act_rows(x)
    xs = act_sums(xq, gs or 32)
    parts = _weights(fmt, gs, kind, seed)
    bias = np.random.default_rng(seed).standard_normal(N).astype(np.float32) if has_bias else None
    ref = a8_linear_reference(xq, sx, fmt, parts, gs, bias)
    bound = _rounding_bound(xq, sx, fmt, parts, gs, bias)

    def check(out):
        y = out[0]
        assert np.isfinite(y).all()
        zero = sx == 0
        np.testing.assert_array_equal(y[zero], np.broadcast_to(bias if has_bias else np.float32(0), y[zero].shape))
        if kind == "pow2" and not has_bias:
            np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
        err = np.abs(y.astype(np.float64) - ref)
        bad = err > bound
        assert not bad.any(), (f"{func} ({kind}): {int(bad.sum())} outputs beyond the float32 rounding bound, worst "
                               f"|err| {err.max():.3g} vs bound {bound[np.unravel_index(err.argmax(), err.shape)]:.3g}")
        return float((err / np.where(bound > 0, bound, 1)).max())

    inputs = [xq, sx, xs, *parts] + ([bias] if has_bias else [])
    return Call(func, inputs, [((M, N), "float32")], check)


def _kernel_funcs(isa: str) -> dict:
    funcs = {}
    for M in MS:
        for sg in (32, 64):
            funcs[f"quant_m{M}_s{sg}"] = quantize_act_int8(M, K, sg)
        for name, (fmt, gs, bias) in VARIANTS.items():
            if fmt.startswith("int4"):
                funcs[f"{name}_m{M}"] = int4_a8_linear(M, N, K, gs, asym=fmt == "int4_asym", isa=isa, bias=bias)
            else:
                funcs[f"{name}_m{M}"] = int8_a8_linear(M, N, K, gs, isa=isa, bias=bias)
    return funcs


def _module(funcs: dict) -> tvm.IRModule:
    return tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})


def _calls() -> dict:
    """``(M, what) -> [Call]``: ``what`` a sum group ``s32`` / ``s64`` or a variant."""
    out = {}
    for M in MS:
        xs = _activations(M)
        for sg in (32, 64):
            out[(M, f"s{sg}")] = [_quant_call(f"quant_m{M}_s{sg}", x, sg) for x in xs]
        for i, variant in enumerate(VARIANTS):
            out[(M, variant)] = [_linear_call(f"{variant}_m{M}", x, variant, kind, seed=10 * i + j)
                                 for x in xs for j, kind in enumerate(("real", "pow2"))]
    return out


CASES = [(M, what) for M in MS for what in ("s32", "s64", *VARIANTS)]
CASE_IDS = [f"m{M}-{what}" for M, what in CASES]


@pytest.fixture(scope="module")
def calls():
    return _calls()


@pytest.fixture(scope="module")
def host_libs():
    libs = {}

    def get(isa):
        if isa not in libs:
            libs[isa] = tvm.compile(_module(_kernel_funcs(isa)), target=_host_target(isa))
        return libs[isa]

    return get


@pytest.mark.parametrize("isa", DOT_ISAS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernels_on_host(isa, case, calls, host_libs):
    why = _host_can_run(isa)
    if why:
        pytest.skip(why)
    lib = host_libs(isa)
    for call in calls[case]:
        args = [tvm.runtime.tensor(a) for a in call.inputs]
        outs = [tvm.runtime.tensor(np.zeros(shape, dtype)) for shape, dtype in call.outputs]
        lib[call.func](*args, *outs)
        call.check([o.numpy() for o in outs])


# ----------------------------------------------------------------------------- aarch64 under qemu


def _aarch64_missing() -> str | None:
    from bluelower.lowering.artifacts.toolchains import gnu

    tools = [t for t in ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump", "qemu-aarch64") if shutil.which(t) is None]
    if tools:
        return f"{', '.join(tools)} not installed ({gnu.APT_HINT})"
    if not os.path.isdir(gnu.QEMU_SYSROOT):
        return f"{gnu.QEMU_SYSROOT} (the aarch64 C/C++ libraries) missing ({gnu.APT_HINT})"
    return None


@pytest.fixture(scope="module")
def aarch64_runner(tmp_path_factory):
    """``(runner binary, directory of the aarch64 libtvm_runtime.so / libtvm_ffi.so)``."""
    why = _aarch64_missing()
    if why:
        pytest.skip(why)
    from bluelower.errors import BlueLowerError
    from bluelower.lowering.artifacts.toolchains import gnu

    try:
        libs = gnu.aarch64_runtime_libs()  # from the cached aarch64 wheels (downloaded once)
    except BlueLowerError as exc:
        pytest.skip(f"no aarch64 TVM runtime libraries: {exc}")
    libdir = os.path.dirname(libs["libtvm_runtime.so"])
    out = str(tmp_path_factory.mktemp("runner") / "kernel_runner")
    cmd = ["aarch64-linux-gnu-g++", "-std=c++17", "-O1", *[f"-I{d}" for d in gnu.ffi_include_dirs()], RUNNER_SRC, "-o", out,
           f"-L{libdir}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed", f"-Wl,-rpath,{libdir}",
           "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def aarch64_results(aarch64_runner, calls, tmp_path_factory):
    """``isa -> {(case, i): outputs}``: every call of an ISA's library in one qemu process."""
    from tvm.support import cc

    from bluelower.lowering.artifacts.toolchains import gnu

    results = {}

    def get(isa):
        if isa in results:
            return results[isa]
        base = tmp_path_factory.mktemp(f"qemu-{isa}")
        target = _aarch64_target(isa)
        assert dot_isa(target) == isa
        lib = str(base / f"kernels_{isa}.so")
        tvm.compile(_module(_kernel_funcs(isa)), target=target).export_library(
            lib, fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
        argv, files = [aarch64_runner, lib], {}
        for case in CASES:
            for i, call in enumerate(calls[case]):
                specs, paths = [], []
                arrays = call.inputs + [np.zeros(shape, dtype) for shape, dtype in call.outputs]
                for a_i, a in enumerate(arrays):
                    path = str(base / f"{call.func}_{i}_{a_i}.bin")
                    a.tofile(path)
                    specs.append(f"{a.dtype}:{'x'.join(map(str, a.shape))}:{path}")
                    paths.append((path, a.dtype, a.shape))
                argv += [call.func, *specs, "--"]
                files[(case, i)] = paths[len(call.inputs):]
        env = dict(os.environ, TVM_NUM_THREADS="2")
        proc = subprocess.run([shutil.which("qemu-aarch64"), "-L", gnu.QEMU_SYSROOT, *argv[:-1]], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[isa] = {key: [np.fromfile(p + ".out", dt).reshape(shape) for p, dt, shape in paths]
                        for key, paths in files.items()}
        return results[isa]

    return get


@pytest.mark.parametrize("isa", ("dotprod", "i8mm"))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernels_on_aarch64_qemu(isa, case, calls, aarch64_results):
    outs = aarch64_results(isa)
    for i, call in enumerate(calls[case]):
        call.check(outs[(case, i)])


def _disassembly(func, target, path: str) -> str:
    ex = tvm.compile(_module({"kernel": func}), target=target)
    ex.mod.write_to_file(path)  # the object of this one kernel (its compute functions have no symbols)
    proc = subprocess.run(["aarch64-linux-gnu-objdump", "-d", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _mnemonics(asm: str) -> set:
    return {parts[2].split()[0] for line in asm.splitlines() if len(parts := line.split("\t")) > 2 and parts[2]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_aarch64_objects_use_the_dot_product_instructions(variant, tmp_path):
    why = _aarch64_missing()
    if why:
        pytest.skip(why)
    fmt, gs, bias = VARIANTS[variant]

    def kernel(M, isa):
        if fmt.startswith("int4"):
            return int4_a8_linear(M, N, K, gs, asym=fmt == "int4_asym", isa=isa, bias=bias)
        return int8_a8_linear(M, N, K, gs, isa=isa, bias=bias)

    sdot = _mnemonics(_disassembly(kernel(5, "dotprod"), _aarch64_target("dotprod"), str(tmp_path / "dp.o")))
    assert "sdot" in sdot and "smmla" not in sdot
    mmla = _mnemonics(_disassembly(kernel(5, "i8mm"), _aarch64_target("i8mm"), str(tmp_path / "mm.o")))
    assert "smmla" in mmla and "sdot" in mmla  # the odd 5th row takes sdot
    assert "smmla" in _mnemonics(_disassembly(kernel(16, "i8mm"), _aarch64_target("i8mm"), str(tmp_path / "mm16.o")))
    gemv = _mnemonics(_disassembly(kernel(1, "i8mm"), _aarch64_target("i8mm"), str(tmp_path / "gemv.o")))
    assert "sdot" in gemv and "smmla" not in gemv  # a single row: no row pair for smmla
    # and the generic kernel for a core without dotprod has neither
    plain = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    generic = _mnemonics(_disassembly(kernel(5, "generic"), tvm.target.Target(plain), str(tmp_path / "g.o")))
    assert not {"sdot", "smmla"} & generic


# ----------------------------------------------------------------------------- tiny builds

PROMPT = [1, 2, 3, 40]
# key -> (quant, frontend, soc): "host" builds for baseline x86-64 (generic dot products);
# "host-cpu" is host.toml with this machine's mcpu (dot_isa(host_target()): vnni here)
BUILDS = {
    "w4a8": ("w4a8", "torch", "host"),
    "w8a8": ("w8a8", "torch", "host"),
    "w4a8kv8": ("w4a8kv8", "torch", "host-cpu"),
    "w4a8-onnx": ("w4a8", "onnx", "host"),
}
LINEAR_KINDS = ("int4", "int4_asym", "int8", "int8_group")  # QuantizeWeights' "<kind>_layers"


def _host_cpu_soc(path: str) -> str:
    from bluelower.targets.soc import soc_path

    with open(soc_path("host")) as fh:
        src = fh.read()
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    src = src.replace('name = "host"\n', 'name = "host-cpu"\n', 1)
    if cpu and cpu != "generic":
        src = src.replace("cores = 2\n", f'cores = 2\nmcpu = "{cpu}"\n', 1)
    with open(path, "w") as fh:
        fh.write(src)
    return path


@pytest.fixture(scope="module")
def a8_build(tmp_path_factory):
    """``key -> (build dir, manifest, compile seconds)``, each of :data:`BUILDS` compiled once."""
    from bluelower import api

    builds = {}

    def get(key):
        if key not in builds:
            quant, frontend, soc = BUILDS[key]
            root = tmp_path_factory.mktemp(f"a8-{key}")
            if soc == "host-cpu":
                soc = _host_cpu_soc(str(root / "host-cpu.toml"))
            t0 = time.perf_counter()
            manifest = api.compile(model="tiny", quant=quant, frontend=frontend, soc=soc, output=str(root / "build"))
            builds[key] = (str(root / "build"), manifest, time.perf_counter() - t0)
        return builds[key]

    return get


def _pass_stats(manifest: dict, name: str) -> dict:
    found = [p["stats"] for p in manifest["passes"] if p["name"] == name]
    assert len(found) == 1, [p["name"] for p in manifest["passes"]]
    return found[0]


@pytest.mark.parametrize("key", list(BUILDS))
def test_a8_build_manifest(key, a8_build):
    quant, _frontend, soc = BUILDS[key]
    _out, manifest, _secs = a8_build(key)
    q = manifest["quantization"]
    assert q["mode"] == quant and q["activations"] == "int8" and q["weight_layout"] == "k4"
    # every linear weight (not an embedding table's rows) in the dot-product layout
    linear = {name: spec for name, spec in q["params"].items() if not spec[1].endswith("_rows")}
    assert linear and all(spec[2].get("layout") == "k4" for spec in linear.values()), linear
    assert manifest["kv_cache"]["dtype"] == ("int8" if quant.endswith("kv8") else "float32")
    kv = _pass_stats(manifest, "QuantizeKVCache")
    assert ("skipped" in kv) == (not quant.endswith("kv8")), kv

    st = _pass_stats(manifest, "QuantizeWeights")
    target = tvm.target.Target(manifest["target"])
    assert st["dot_isa"] == dot_isa(target)
    assert st["dot_isa"] == (HOST_BEST if soc == "host-cpu" else "generic")
    # every quantized linear layer is an integer dot-product kernel, its input quantized once
    # per distinct activation (q/k/v and gate/up share it)
    layers = {kind: st.get(f"{kind}_layers", 0) for kind in LINEAR_KINDS}  # the recipe picks the formats
    assert st["a8_layers"] > 0 and st["a8_layers"] == sum(layers.values()), st
    assert 0 < st["activation_quantizations"] < st["a8_layers"], st
    assert st["kept_fp32_layers"] == 0
    int4 = layers["int4"] + layers["int4_asym"]
    if quant == "w8a8":
        assert int4 == 0 and layers["int8"] + layers["int8_group"] == st["a8_layers"], st
    else:
        assert int4 > 0 and layers["int8"] + layers["int8_group"] > 0, st  # decoder INT4, vision/projector INT8


@pytest.mark.parametrize("key", list(BUILDS))
def test_a8_build_run_check_matches(key, a8_build):
    from bluelower import api

    out, _manifest, _secs = a8_build(key)
    res = api.run(out, prompt_ids=PROMPT, max_new_tokens=6, check=True)
    assert res["match"] is True, (res["tokens"], res.get("reference_tokens"))
    assert res["tokens"] == res["reference_tokens"] and 1 <= len(res["tokens"]) <= 6


@pytest.mark.parametrize("key", [k for k in BUILDS if BUILDS[k][0] == "w4a8kv8"][:1])
def test_a8_build_run_check_with_an_image(key, a8_build, tiny_image):
    """With an image: the reference follows the image encoder's int8 activations without
    entering the KV-cache emulation (the encoder writes no cache)."""
    from bluelower import api

    out, _manifest, _secs = a8_build(key)
    res = api.run(out, image=tiny_image, prompt_ids=PROMPT, max_new_tokens=4, check=True)
    assert res["match"] is True, (res["tokens"], res.get("reference_tokens"))


@pytest.mark.parametrize("quant", ["w4a8kv8", "w4a16kv8"])
def test_run_check_on_a_tied_lm_head(quant, tmp_path):
    """A checkpoint whose lm_head is the token table (SmolLM2's layout). The default recipe
    stores the table twice, INT4 rows for the lookups and INT8 for the logits: the reference
    reads each use's own values (it used to read the INT8 values for the lookups too, so
    --check failed at layer 0's first rounding); in an a8 mode the build quantizes the
    logits' input too and the reference follows it (F.linear on the table, not an nn.Linear;
    it used to stop at 'the build quantized 121 activations, the reference read 120' on
    SmolLM2)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from bluelower import api
    from bluelower.reports.eval_quant import quantized_linear_sources

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ckpt = str(tmp_path / "tied")
    model.save_pretrained(ckpt)
    out = str(tmp_path / "build")
    manifest = api.compile(output=out, checkpoint=ckpt, quant=quant)
    assert "model.embed_tokens.weight" in quantized_linear_sources(manifest)
    kinds = {spec[1] for spec in manifest["quantization"]["params"].values() if spec[0] == "model.embed_tokens.weight"}
    assert len(kinds) == 2, kinds  # lookup rows and the lm_head's linear layout
    res = api.run(out, prompt_ids=[5, 17, 3, 40], max_new_tokens=6, check=True)
    assert res["match"] is True, (res["tokens"], res.get("reference_tokens"))
