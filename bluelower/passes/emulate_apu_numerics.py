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
* **integer activations** (``apu.activations``, e.g. the paper's ``decoder = "int16"``,
  ``vision = "fp16"``): in a partition of an entry of that model part (the roles of the
  weights the entry reads: a decoder role makes it ``decoder``, else a ViT/projector role
  ``vision``), the result of every operator whose kinds all list that integer dtype, and
  every activation input (an input that is not one of the entry's weights), is
  fake-quantized to it instead of rounded to the float dtype: symmetric, one scale per row
  (the last axis: per token for ``[tokens, hidden]``) taken from the row's own max|x| at run
  time (``q = clip(round(x / s), -Q, Q)``, ``s = max|x| / Q``, ``Q = 32767`` for int16, 127
  for int8; the value is ``q * s``). A deployed graph uses scales calibrated offline, so this
  is the accuracy of ideal scales (per row, so a prefill chunk's padding rows, whose RMSNorm
  statistic is 1/sqrt(eps), do not coarsen the real rows' codes). Weights and quantization scales entering the partition keep the float
  rounding (the NPU stores them as fp16). An operator whose kinds do not list the dtype
  keeps the float rule;
* a partition whose operators compute in fp32 (an APU that lists only ``fp32``) is left
  unchanged, and a SoC without ``[apu]`` has no partitions: no rounding.

Requires: PartitionForAPU's partitions (``bluelower.unit = "apu"``) with float32 host
tensors; run after ScheduleOperators (so costs and the manifest's partition artifact see
the partition as the vendor compiler gets it, without the emulation casts) and before
LegalizeOps. Ensures: the rounding above inside each APU partition function; entry
functions unchanged. Stats: ``emulated_partitions``, ``rounded_values`` (rounding points,
integer ones included), ``integer_values`` (the integer fake-quantization points),
``float_dtype``, ``accumulate`` and ``activations`` (model part -> dtype, as the SoC file
sets it).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .instruments import with_stats
from .ir_utils import Substitute
from .partition_for_apu import APU, activation_dtype, apu_kinds, apu_partitions, composites

#: APU float dtype -> the TVM dtype the host rounds to (None: no rounding).
ROUND_TO = {"fp16": "float16", "bf16": "bfloat16", "fp32": None}

#: APU integer activation dtype -> its largest code (symmetric: codes in [-Q, Q]).
INT_CODES = {"int16": 32767, "int8": 127}

_NATIVE_FP16 = {"relax.matmul", "relax.nn.conv2d"}


def _is_f32_tensor(ty) -> bool:
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"


def _round(expr, dtype: str):
    return relax.op.astype(relax.op.astype(expr, dtype), "float32")


def _fake_int(expr, dtype: str, scale_var: relax.Var) -> list:
    """Bindings: ``scale_var`` = each row's max|x| / Q (rows: the last axis), and the value
    of ``expr`` through symmetric ``dtype`` codes (``q * scale``; a zero row stays zero)."""
    q = float(INT_CODES[dtype])
    ndim = len(expr.ty.shape)  # expr: a variable (a parameter or an operator result)
    amax = relax.op.max(relax.op.abs(expr), axis=[-1], keepdims=True) if ndim else relax.op.abs(expr)
    scale = relax.op.divide(relax.op.maximum(amax, relax.const(1e-30, "float32")), relax.const(q, "float32"))
    codes = relax.op.clip(relax.op.round(relax.op.divide(expr, scale_var)), -q, q)
    return [relax.VarBinding(scale_var, scale)], relax.op.multiply(codes, scale_var)


def _quantized(var: relax.Var, expr, dtype: str) -> list:
    """Bindings that give ``var`` the value of ``expr`` rounded to an APU dtype: a float
    dtype (fp16/bf16) or an integer code (:data:`INT_CODES`)."""
    if dtype not in INT_CODES:
        return [relax.VarBinding(var, _round(expr, ROUND_TO.get(dtype, dtype)))]
    shape = list(var.ty.shape)
    scale = relax.DataflowVar(f"{var.name}_scale", relax.TensorType(shape[:-1] + [1] if shape else [], "float32"))
    pre, value = _fake_int(expr, dtype, scale)
    return pre + [relax.VarBinding(var, value)]


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


def _kinds_of(apu, value, out_ty) -> tuple[str, ...]:
    placed = apu_kinds(apu, value, out_ty) if isinstance(value, relax.Call) else None
    return placed[0] if placed else ()


def emulate_partition(apu, func: relax.Function, activations: str | None = None,
                      weight_params: frozenset = frozenset()) -> tuple[relax.Function, int, set, int]:
    """``func`` with the APU's rounding points; returns (function, rounding points, dtypes,
    integer points). ``activations``: the integer dtype of its model part's activations
    (``apu.activations``; None or a float dtype: the float rules); ``weight_params``: the
    indices of the parameters that are the entry's weights (kept on the float rule)."""
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return func, 0, set(), 0
    integer = activations if activations in INT_CODES else None
    flat = [b for blk in body.blocks for b in blk.bindings]
    comp = composites(apu, flat)
    op_dtype: dict[int, str | None] = {}

    def rule(float_dtype, kinds):
        if float_dtype is not None and integer is not None and kinds and all(apu.supports(k, integer) for k in kinds):
            return integer
        return float_dtype

    i = 0
    while i < len(flat):
        if i in comp:  # a composite is one operator: round its last binding only
            length, kinds, dtype = comp[i]
            for j in range(i, i + length):
                op_dtype[j] = rule(dtype, kinds) if j == i + length - 1 else None
            i += length
            continue
        value = flat[i].value
        dtype = activation_dtype(apu, value, flat[i].var.ty) if isinstance(value, relax.Call) else None
        op_dtype[i] = rule(dtype, _kinds_of(apu, value, flat[i].var.ty))
        i += 1
    used = {d for d in op_dtype.values() if d is not None}
    narrow = {ROUND_TO[d] for d in used if ROUND_TO.get(d)}
    ints = {d for d in used if d in INT_CODES}
    if not narrow and not ints:
        return func, 0, used, 0
    # the partition's input dtype: the narrowest float dtype its operators compute in
    # (weights and scales); its activation inputs take the part's integer code when one is used
    in_dtype = "float16" if "float16" in narrow or not narrow else sorted(narrow)[0]
    count = n_int = 0
    entry_bindings, mapping = [], {}
    for k, p in enumerate(func.params):
        if _is_f32_tensor(p.ty):
            as_int = integer if integer in ints and k not in weight_params else None
            r = relax.DataflowVar(f"{p.name}_{as_int or in_dtype}", p.ty)
            entry_bindings += _quantized(r, p, as_int or in_dtype)
            mapping[p] = r
            count += 1
            n_int += as_int is not None
    sub = Substitute(mapping)
    blocks = []
    idx = -1
    for bi, blk in enumerate(body.blocks):
        out = list(entry_bindings) if bi == 0 else []
        for b in blk.bindings:
            idx += 1
            value = sub.visit_expr(b.value)
            dtype = op_dtype.get(idx)
            if dtype is None or ROUND_TO.get(dtype, dtype) is None or not _is_f32_tensor(b.var.ty):
                out.append(relax.VarBinding(b.var, value))
                continue
            if apu.accumulate == "fp16" and dtype == "fp16" and _op_name(value) in _NATIVE_FP16:
                value = _native_fp16(value, "float16")
            raw = relax.DataflowVar(f"{b.var.name}_acc", b.var.ty)
            out.append(relax.VarBinding(raw, value))
            out += _quantized(b.var, raw, dtype)
            count += 1
            n_int += dtype in INT_CODES
        blocks.append(relax.DataflowBlock(out) if isinstance(blk, relax.DataflowBlock) else relax.BindingBlock(out))
    new = relax.Function(func.params, relax.SeqExpr(blocks, body.body), func.ret_ty, func.is_pure, func.attrs)
    label = "/".join(sorted(narrow | ints))
    new = new.with_attr("bluelower.apu_numerics", f"{label} (accumulate {apu.accumulate})")
    return new, count, used, n_int


def entry_parts(mod: tvm.IRModule, weight_role) -> dict[str, str]:
    """Entry function name -> model part (``decoder`` / ``vision``) by the roles of the
    weights it reads (``bluelower.param_names``); entries with neither are left out."""
    from ..lowering.quant.modes import DECODER_ROLES, VISION_ROLES

    parts = {}
    for gv, f in mod.functions.items():
        if not isinstance(f, relax.Function) or f.attrs is None or "bluelower.param_names" not in f.attrs:
            continue
        roles = {weight_role(str(n)) for n in f.attrs["bluelower.param_names"]}
        if roles & set(DECODER_ROLES):
            parts[gv.name_hint] = "decoder"
        elif roles & (set(VISION_ROLES) | {"position_embedding"}):
            parts[gv.name_hint] = "vision"
    return parts


def weight_arguments(mod: tvm.IRModule, entry: str, partition: str) -> frozenset:
    """Indices of ``partition``'s parameters that its call in ``entry`` passes one of the
    entry's weights (parameters after ``num_input``)."""
    if entry not in [gv.name_hint for gv in mod.get_global_vars()]:
        return frozenset()
    f = mod[entry]
    num_input = int(f.attrs["num_input"]) if f.attrs is not None and "num_input" in f.attrs else len(f.params)
    weights = set(f.params[num_input:])
    found: set = set()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar) and e.op.name_hint == partition:
            found.update(k for k, a in enumerate(e.args) if isinstance(a, relax.Var) and a in weights)

    relax.analysis.post_order_visit(f.body, visit)
    return frozenset(found)


@tvm.transform.module_pass(opt_level=0, name="EmulateAPUNumerics")
class EmulateAPUNumerics:
    """Round inside every APU partition as the SoC's APU would (see module docstring)."""

    def __init__(self, apu=None, weight_role=None):
        self.apu = apu  # the SoC's Apu description (bluelower.targets.soc), or None
        self.weight_role = weight_role  # weight name -> role (the model spec's); None: no integer activations

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.apu is None:
            return with_stats(mod, "EmulateAPUNumerics", emulated_partitions=0, rounded_values=0, integer_values=0,
                              float_dtype="none", accumulate="none", activations={})
        parts = apu_partitions(mod)
        entry_part = entry_parts(mod, self.weight_role) if self.weight_role is not None and self.apu.activations else {}
        original = mod
        mod = mod.clone()
        emulated, points, n_int, dtypes = 0, 0, 0, set()
        for name, func in sorted(parts.items()):
            entry = str(func.attrs["bluelower.entry"]) if "bluelower.entry" in func.attrs else ""
            act = self.apu.activations.get(entry_part.get(entry, ""))
            weights = weight_arguments(original, entry, name) if act in INT_CODES else frozenset()
            new, count, used, ints = emulate_partition(self.apu, func, act, weights)
            dtypes |= {d for d in used if d not in INT_CODES}
            if count:
                mod[mod.get_global_var(name)] = new
                emulated += 1
                points += count
                n_int += ints
        if emulated:
            mod = relax.transform.Normalize()(mod)
        return with_stats(mod, "EmulateAPUNumerics", emulated_partitions=emulated, rounded_values=points,
                          integer_values=n_int, float_dtype="/".join(sorted(dtypes)) or "none",
                          accumulate=self.apu.accumulate,
                          activations={p: d for p, d in sorted(self.apu.activations.items())} if entry_part else {})


__all__ = ["APU", "EmulateAPUNumerics", "emulate_partition"]
