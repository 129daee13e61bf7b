"""The TVM target of the machine running the compiler (kernels built and run here: tests,
the scale search, host builds)."""

from __future__ import annotations

import tvm


def host_target() -> tvm.target.Target:
    """An ``llvm`` target for this machine with its CPU name (enables AVX2/AVX-512/NEON).

    A bare ``"llvm"`` target compiles for the baseline ISA (SSE2 on x86_64), which makes
    the vectorized kernels several times slower.
    """
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if cpu and cpu != "generic":
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    return tvm.target.Target("llvm")
