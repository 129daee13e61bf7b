"""The hot kernels of a cross-compiled Dimensity 9300 ``model.so`` use NEON vector instructions.

The disassembly of each kernel's compute function (TVM emits ``<kernel>_compute_`` as a local
symbol beside the ``__tvm_ffi_<kernel>`` wrapper) is read with ``aarch64-linux-gnu-objdump``:
every linear-layer kernel (INT4/INT8 weights, float or int8 activations), fused attention and
matmul must multiply-accumulate on ``v`` registers (``fmla v.4s`` / ``sdot`` / ``smmla``),
with more vector multiply-accumulates than scalar ones; the int8-activation kernels of a
``w4a8`` build must use the i8mm ``smmla`` the Cortex-X4 has (``sdot`` for the decode GEMV).
The builds themselves run under qemu in test_native_runtime.py / test_a8_modes.py.

Not covered: ``--quant fp32`` builds, whose linear layers are TVM's own legalized
``NT_matmul`` without a schedule (scalar ``fmadd`` loops on aarch64: LLVM does not vectorize a
float reduction without reassociation); fp32 is the reference precision, not a deployment
mode (docs/kernels.md).
"""

from __future__ import annotations

import bisect
import re
import shutil
import subprocess

import pytest

OBJDUMP = shutil.which("aarch64-linux-gnu-objdump")
NM = shutil.which("aarch64-linux-gnu-nm")
pytestmark = pytest.mark.skipif(not (OBJDUMP and NM and shutil.which("aarch64-linux-gnu-g++")),
                                reason="needs the aarch64 cross toolchain (apt install g++-aarch64-linux-gnu "
                                       "binutils-aarch64-linux-gnu)")

HOT = ("linear", "attention", "matmul")
_INS = re.compile(r"\s+([0-9a-f]+):\s+[0-9a-f]{8}\s+(\S+)\s*(.*)")
VECTOR_MAC = ("fmla", "sdot", "udot", "smmla", "ummla", "usmmla", "bfmmla")
SCALAR_MAC = ("fmadd", "fmsub", "madd", "msub")


def compute_functions(so: str) -> dict:
    """``{kernel compute function: [(mnemonic, operands)]}`` of ``so``'s hot kernels."""
    out = subprocess.run([NM, "-n", so], capture_output=True, text=True, check=True).stdout
    syms = sorted((int(p[0], 16), p[2]) for p in (line.split() for line in out.splitlines())
                  if len(p) == 3 and p[1] in "Tt")
    dis = subprocess.run([OBJDUMP, "-d", so], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_INS.match, dis.splitlines()) if m]
    addrs = [a for a, _, _ in ins]
    funcs = {}
    for i, (start, name) in enumerate(syms):
        if not name.endswith("_compute_") or not any(k in name for k in HOT):
            continue
        end = syms[i + 1][0] if i + 1 < len(syms) else float("inf")
        funcs[name] = [(op, args) for _, op, args in ins[bisect.bisect_left(addrs, start):bisect.bisect_left(addrs, end)]]
    return funcs


def vector_macs(body) -> int:
    return sum(1 for op, args in body if op in VECTOR_MAC and args.startswith("v"))


def scalar_macs(body) -> int:
    return sum(1 for op, args in body if op in SCALAR_MAC or (op == "fmla" and not args.startswith("v")))


@pytest.fixture(scope="module")
def builds(build_tiny):
    return {q: build_tiny(q, soc="dimensity9300")[0] for q in ("w4a16kv8", "w4a8")}


@pytest.mark.parametrize("quant", ["w4a16kv8", "w4a8"])
def test_every_hot_kernel_multiplies_on_vector_registers(builds, quant):
    funcs = compute_functions(f"{builds[quant]}/model.so")
    assert funcs, "no kernel compute functions found (symbols stripped?)"
    scalar = {name: (vector_macs(b), scalar_macs(b)) for name, b in funcs.items()
              if vector_macs(b) == 0 or vector_macs(b) <= scalar_macs(b)}
    assert not scalar, f"kernels without (mostly) vector multiply-accumulate: {scalar}"


def test_the_int8_activation_kernels_use_i8mm(builds):
    funcs = compute_functions(f"{builds['w4a8']}/model.so")
    a8 = {n: b for n, b in funcs.items() if "_a8_linear" in n}
    assert a8, sorted(funcs)
    for name, body in a8.items():
        ops = {op for op, _ in body}
        m = int(re.search(r"_a8_linear_(\d+)x", name).group(1))
        want = "sdot" if m == 1 else "smmla"  # decode GEMV: sdot; prefill tiles: 2x8 smmla
        assert want in ops, (name, sorted(ops & set(VECTOR_MAC)))
