"""EmulateAPUNumerics: make the host build of an APU partition round like the APU.

APU partitions compile for the CPU (every build runs end to end on the build machine);
this pass makes them compute with the APU's precision rules, read from the SoC file, so
the accuracy of the APU placement is measurable on the host (docs/apu-partitions.md,
"Numerics"):

* the float dtype of an operator is ``Apu.float_dtype`` of its kinds: the first of
  fp16, bf16, fp32 that the SoC file's ``[apu] ops`` lists for every kind (a quantized
  kernel's activations: the float dtype its kinds list, A16W4/A16W8);
* **rounding points**: every float32 input of the partition (activations from the CPU,
  float weights, quantization scales, a float KV cache) is rounded to that dtype on entry,
  and the float result of every operator is rounded to its dtype (``astype`` to fp16 or
  bf16 and back to float32: storage stays float32, the values are exactly the narrow
  dtype's). A composite kind (the decomposed RMSNorm) is one operator: only its last
  binding is rounded. The partition's outputs are therefore already fp16 values when
  the CPU reads them back as float32;
* **accumulation** (``apu.accumulate``): ``fp32`` (the default) means an operator's
  arithmetic runs in float32 on the rounded inputs and only its result is rounded, i.e.
  fp16 x fp16 products summed in fp32, as NPU MAC arrays do; ``fp16`` additionally runs
  ``relax.matmul`` and ``relax.nn.conv2d`` natively in float16 (every partial sum
  rounded). bluelower's own TIR kernels (``int4_linear``, ``int8_linear``,
  ``fused_attention``) always accumulate in fp32 inside; they are rounded at their
  inputs and outputs only;
* a partition whose operators compute in fp32 (an APU that lists only ``fp32``) is left
  unchanged, and a SoC without ``[apu]`` has no partitions: no rounding.

Requires: PartitionForAPU's partitions (``bluelower.unit = "apu"``) with float32 host
tensors; run after ScheduleOperators (so costs and the manifest's partition artifact see
the partition as the vendor compiler gets it, without the emulation casts) and before
LegalizeOps. Ensures: the rounding above inside each APU partition function; entry
functions unchanged. Stats: ``emulated_partitions``, ``rounded_values`` (rounding points),
``float_dtype`` and ``accumulate``.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .instruments import with_stats
from .ir_utils import Substitute
from .partition_for_apu import APU, activation_dtype, apu_partitions, composites

#: APU float dtype -> the TVM dtype the host rounds to (None: no rounding).
ROUND_TO = {"fp16": "float16", "bf16": "bfloat16", "fp32": None}

_NATIVE_FP16 = {"relax.matmul", "relax.nn.conv2d"}


def _is_f32_tensor(ty) -> bool:
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


def _round(expr, dtype: str):
    return relax.op.astype(relax.op.astype(expr, dtype), "float32")


def _op_name(value) -> str | None:
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        return value.op.name
    return None


def _native_fp16(value, dtype: str):
    """``value`` (a float32 matmul/conv2d) computed in ``dtype`` with ``dtype`` accumulation."""
    name = _op_name(value)
    a, b = (relax.op.astype(x, dtype) for x in value.args[:2])
    if name == "relax.matmul":
        out = relax.op.matmul(a, b, out_dtype=dtype)
    else:
        at = value.attrs
        out = relax.op.nn.conv2d(a, b, strides=at.strides, padding=at.padding, dilation=at.dilation, groups=at.groups,
                                 data_layout=at.data_layout, kernel_layout=at.kernel_layout,
                                 out_layout=at.out_layout, out_dtype=dtype)
    return relax.op.astype(out, "float32")


def emulate_partition(apu, func: relax.Function) -> tuple[relax.Function, int, set]:
    """``func`` with the APU's rounding points; returns (function, rounding points, float dtypes)."""
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return func, 0, set()
    flat = [b for blk in body.blocks for b in blk.bindings]
    comp = composites(apu, flat)
    op_dtype: dict[int, str | None] = {}
    i = 0
    while i < len(flat):
        if i in comp:  # a composite is one operator: round its last binding only
            length, _kinds, dtype = comp[i]
            for j in range(i, i + length):
                op_dtype[j] = dtype if j == i + length - 1 else None
            i += length
            continue
        op_dtype[i] = activation_dtype(apu, flat[i].value, flat[i].var.ty) if isinstance(flat[i].value, relax.Call) else None
        i += 1
    used = {d for d in op_dtype.values() if d is not None}
    narrow = {ROUND_TO[d] for d in used if ROUND_TO.get(d)}
    if not narrow:
        return func, 0, used
    # the partition's input dtype: the narrowest float dtype its operators compute in
    in_dtype = "float16" if "float16" in narrow else sorted(narrow)[0]
    count = 0
    entry_bindings, mapping = [], {}
    for p in func.params:
        if _is_f32_tensor(p.ty):
            r = relax.DataflowVar(f"{p.name}_{in_dtype}", p.ty)
            entry_bindings.append(relax.VarBinding(r, _round(p, in_dtype)))
            mapping[p] = r
            count += 1
    sub = Substitute(mapping)
    blocks = []
    idx = -1
    for bi, blk in enumerate(body.blocks):
        out = list(entry_bindings) if bi == 0 else []
        for b in blk.bindings:
            idx += 1
            value = sub.visit_expr(b.value)
            target = ROUND_TO.get(op_dtype.get(idx) or "fp32")
            if target is None or not _is_f32_tensor(b.var.ty):
                out.append(relax.VarBinding(b.var, value))
                continue
            if apu.accumulate == "fp16" and target == "float16" and _op_name(value) in _NATIVE_FP16:
                value = _native_fp16(value, target)
            raw = relax.DataflowVar(f"{b.var.name}_acc", b.var.ty)
            out.append(relax.VarBinding(raw, value))
            out.append(relax.VarBinding(b.var, _round(raw, target)))
            count += 1
        blocks.append(relax.DataflowBlock(out) if isinstance(blk, relax.DataflowBlock) else relax.BindingBlock(out))
    new = relax.Function(func.params, relax.SeqExpr(blocks, body.body), func.ret_ty, func.is_pure, func.attrs)
    new = new.with_attr("bluelower.apu_numerics", f"{'/'.join(sorted(narrow))} (accumulate {apu.accumulate})")
    return new, count, used


@tvm.transform.module_pass(opt_level=0, name="EmulateAPUNumerics")
class EmulateAPUNumerics:
    """Round inside every APU partition as the SoC's APU would (see module docstring)."""

    def __init__(self, apu=None):
        self.apu = apu  # the SoC's Apu description (bluelower.targets.soc), or None

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.apu is None:
            return with_stats(mod, "EmulateAPUNumerics", emulated_partitions=0, rounded_values=0, float_dtype="none",
                              accumulate="none")
        parts = apu_partitions(mod)
        mod = mod.clone()
        emulated, points, dtypes = 0, 0, set()
        for name, func in sorted(parts.items()):
            new, count, used = emulate_partition(self.apu, func)
            dtypes |= used
            if count:
                mod[mod.get_global_var(name)] = new
                emulated += 1
                points += count
        if emulated:
            mod = relax.transform.Normalize()(mod)
        return with_stats(mod, "EmulateAPUNumerics", emulated_partitions=emulated, rounded_values=points,
                          float_dtype="/".join(sorted(dtypes)) or "none", accumulate=self.apu.accumulate)


__all__ = ["APU", "EmulateAPUNumerics", "emulate_partition"]
