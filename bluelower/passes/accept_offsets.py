"""AcceptBufferOffsets: every kernel takes its tensors at an offset into a larger buffer.

TVM 0.27 builds a PrimFunc's tensor parameters with ``elem_offset = 0``, and the generated
function refuses a tensor whose ``byte_offset`` is not 0 ("Invalid A.byte_offset ...
expected 0"). A tensor the Relax VM allocates at an offset into a storage
(``R.memory.alloc_tensor(storage, offset, ...)``, what :class:`MemoryPlan` emits to run
its arena) is exactly such a tensor on the CPU: TVM expresses the offset as
``byte_offset``. So the arena could be planned but not run.

This pass gives every tensor parameter of every PrimFunc a symbolic ``elem_offset`` with
``offset_factor = 64 / element size``: the generated code adds the offset once per call
and still knows the data is 64-byte aligned (the packed function checks
``elem_offset % offset_factor == 0``; MemoryPlan's offsets are multiples of 64 bytes, a
tensor allocated on its own has offset 0). The computation is unchanged (bit-identical
results, tests/test_arena_execution.py). Requires: the final PrimFuncs (after FuseTIR).
"""

from __future__ import annotations

import tvm
import tvm_ffi

from .instruments import with_stats
from .memory_plan import ALIGN, DTYPE_BYTES


def _is_tensor_param(p) -> bool:
    """A buffer parameter (not a scalar such as a layer index) at element offset 0."""
    return type(p.ty).__name__ == "BufferType" and isinstance(p.elem_offset, tvm.tirx.IntImm)


def accept_offsets(func: tvm.tirx.PrimFunc) -> tuple[tvm.tirx.PrimFunc, int]:
    """``func`` with every tensor parameter taking an element offset; and how many it changed."""
    repl = {}  # parameter handle -> the same buffer taking an element offset
    for p in func.params:
        if not _is_tensor_param(p) or int(p.elem_offset) != 0:
            continue
        dtype = str(p.dtype)
        factor = max(1, ALIGN // DTYPE_BYTES.get(dtype, ALIGN))
        repl[p.__chandle__()] = tvm.tirx.decl_buffer(
            p.shape, dtype, p.name, data=p.data, strides=p.strides,
            elem_offset=tvm.tirx.Var(f"{p.name}_elem_offset", "int64"), scope=p.scope(),
            data_alignment=p.data_alignment, offset_factor=factor)
    if not repl:
        return func, 0
    out = tvm_ffi.structural_map(func, [(type(func.params[0]), lambda x: repl.get(x.__chandle__(), x))])
    return out, len(repl)


@tvm.transform.module_pass(opt_level=0, name="AcceptBufferOffsets")
class AcceptBufferOffsets:
    """Every PrimFunc's tensor parameters take an element offset (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        funcs = params = 0
        updates = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc):
                new, n = accept_offsets(func)
                if n:
                    updates[gv] = new
                    funcs += 1
                    params += n
        for gv, new in updates.items():
            mod[gv] = new
        return with_stats(mod, "AcceptBufferOffsets", functions=funcs, tensor_params=params)
