"""QuantizeKVCache: the KV cache stored as INT8, per token and head (``--quant w4a16kv8``).

Requires: ``PlanKVCache`` and ``FuseAttention`` have run: each function's cache parameter
``kv_cache [L, 2, kv_heads, capacity, head_dim]`` float32 is only

* threaded through ``R.call_tir_inplace(kv_cache_write*, (cache, index, rows), [0])``
  (argument 0, the running cache value),
* read by ``R.call_tir(fused_attention*, (q, cache, cache, ...))`` (arguments 1 and 2),
* returned (the updated cache, a field of the output tuple).

Kernels are recognized by the ``bluelower.kernel_args`` attribute their builders
(``lowering/kernels/attention.py``) attach; the INT8 variants are rebuilt from it.

Ensures: the cache parameter (and every cache value, and the returned cache) becomes ONE
``int8`` buffer ``[L, 2, kv_heads, capacity, head_dim + 4]``: each row (layer, k|v, head,
position) holds ``head_dim`` symmetric INT8 codes and then the row's float32 scale
(``max|x| / 127``) as 4 little-endian bytes. The write kernels become
``kv_cache_write_int8`` (quantize on write, same capacity check), the attention kernels
``fused_attention(kv_int8=True)`` (dequantize ``codes * scale`` in registers while reading;
no dequantized cache exists). Function signatures keep their parameter order; only the
cache's type changes, so runtimes that allocate the cache from the manifest's
``kv_cache.shape/dtype`` keep working. Any layer count and KV-head layout (MHA, GQA, MQA).

All-or-nothing over the module, so prefill and decode always agree on the cache type: if
any function holding a KV cache cannot be converted (its flow does not match, or its update
was not made in place: PlanKVCache's ``not_planned`` reason), then with ``required`` (the
build asked for the INT8 cache: ``--quant w4a16kv8``, the pipeline's default) the pass fails
with one :class:`BlueLowerError` line naming the function and the reason, instead of a build
that silently keeps a float32 cache; with ``required=False`` nothing is changed and the stats
say why (``converted: 0``, ``reason``). A module with no KV cache at all (a vision tower)
is not an error: ``converted: 0``, ``reason: "no KV cache found"``.

Stats: ``layers``, ``functions``, ``bytes_per_token`` (all layers, K and V, codes +
scales), ``fp32_bytes_per_token``, ``cache_bytes``, ``shape``, ``dtype``. The manifest's
``kv_cache`` is written from what this pass produced (the module's result ``kv_cache``).
"""

from __future__ import annotations

import json

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..errors import BlueLowerError
from ..lowering.kernels.attention import KV_SCALE_BYTES, fused_attention, kv_cache_write_int8
from ..lowering.quant.modes import KV_INT8_LAYOUT
from .instruments import pass_stats, with_stats
from .ir_utils import Graph, emit_like, is_op, kernel_args, referenced_global_vars, shape_of, with_result
from .plan_kv_cache import functional_cache_writes

# A pass raising a user error runs inside TVM's pass machinery: registered, the error keeps
# its type (one line, exit code) through the FFI boundary instead of becoming a RuntimeError.
tvm_ffi.register_error(BlueLowerError)

def _int8_shape(shape) -> tuple:
    return tuple(shape[:-1]) + (shape[-1] + KV_SCALE_BYTES,)


class _Plan:
    """One function's cache flow: the parameter, the cache values, the bindings to swap."""

    def __init__(self, param):
        self.param = param
        self.values = {param}
        self.writes = {}  # binding var -> kernel args
        self.attentions = {}  # binding var -> kernel args


def _plan_function(mod, func: relax.Function):
    """The cache flow of ``func`` or ``(None, reason)``; ``(False, None)`` when it has no cache."""
    if not isinstance(func.body, relax.SeqExpr):
        return None, "not a SeqExpr"
    bindings = [b for block in func.body.blocks for b in block.bindings]
    param = None
    for b in bindings:
        v = b.value
        if is_op(v, "relax.call_tir_inplace"):
            args = kernel_args(mod, v.args[0])
            fields = list(v.args[1].fields)
            if args is not None and "cache_shape" in args and fields and fields[0] in func.params:
                param = fields[0]
                break
    if param is None:
        return False, None
    shape = shape_of(param)
    if shape is None or len(shape) != 5 or str(param.ty.dtype) != "float32":
        return None, "the cache parameter is not a static float32 [L, 2, kv_heads, capacity, head_dim] tensor"
    plan = _Plan(param)
    for b in bindings:
        v = b.value
        used = {x for x in relax.analysis.free_vars(v)} & plan.values if not isinstance(v, relax.Var) else (
            {v} & plan.values)
        if not used:
            continue
        if is_op(v, "relax.call_tir_inplace"):
            args = kernel_args(mod, v.args[0])
            fields = list(v.args[1].fields)
            if (args is None or "cache_shape" not in args or not fields[0].same_as(next(iter(used)))
                    or any(f in plan.values for f in fields[1:]) or len(used) != 1
                    or tuple(args["cache_shape"]) != shape or args["dtype"] != "float32"):
                return None, f"an unexpected in-place call on the cache ({b.var.name})"
            plan.writes[b.var] = args
            plan.values.add(b.var)
        elif is_op(v, "relax.call_tir"):
            args = kernel_args(mod, v.args[0])
            fields = list(v.args[1].fields)
            if (args is None or "k_shape" not in args or len(fields) < 3
                    or any(f in plan.values for i, f in enumerate(fields) if i not in (1, 2))
                    or not (fields[1] in plan.values and fields[2] in plan.values)
                    or tuple(args["k_shape"]) != shape or tuple(args["v_shape"]) != shape):
                return None, f"the cache is read by something other than a fused attention ({b.var.name})"
            plan.attentions[b.var] = args
        elif isinstance(v, relax.Tuple) and b.var.same_as(func.body.body):
            continue  # the returned tuple
        else:
            return None, f"the cache is used by {b.var.name} (not a write, an attention or the result)"
    if not plan.writes:
        return None, "no in-place write"
    return plan, None


@mutator
class _Rewriter(PyExprMutator):  # pylint: disable=abstract-method
    def __init__(self, mod):
        super().__init__(mod)
        self.plan = None
        self.kernels: dict = {}

    def _kernel(self, args: dict, kind: str):
        key = (kind, json.dumps(args, sort_keys=True))
        if key not in self.kernels:
            a = dict(args)
            if kind == "write":
                func = kv_cache_write_int8(cache_shape=_int8_shape(a["cache_shape"]), prefix=tuple(a["prefix"]),
                                           axis=a["axis"], update_shape=tuple(a["update_shape"]),
                                           index_dtype=a["index_dtype"])
                name = "kv_cache_write_int8"
            else:
                a["k_shape"], a["v_shape"] = _int8_shape(a["k_shape"]), _int8_shape(a["v_shape"])
                a["additive_mask"] = None if a["additive_mask"] is None else tuple(a["additive_mask"])
                func = fused_attention(kv_int8=True, **a)
                name = "fused_attention_kv8"
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def visit_var_binding_(self, binding):
        var, plan = binding.var, self.plan
        if var in plan.writes:
            call = binding.value
            fields = [self.visit_expr(f) for f in call.args[1].fields]
            gv = self._kernel(plan.writes[var], "write")
            new = relax.call_tir_inplace(gv, fields, [0], fields[0].ty)
            self.set_var_remap(var, emit_like(self.builder_, var, new))
            return
        if var in plan.attentions:
            call = binding.value
            fields = [self.visit_expr(f) for f in call.args[1].fields]
            gv = self._kernel(plan.attentions[var], "attention")
            new = relax.call_tir(gv, fields, call.ty_args[0])
            self.set_var_remap(var, emit_like(self.builder_, var, new))
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="QuantizeKVCache")
class QuantizeKVCache:  # pylint: disable=too-few-public-methods
    """Store the KV cache as INT8 (see the module docstring)."""

    def __init__(self, required: bool = True):
        self.required = required

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        plans, reasons = {}, {}
        not_planned = pass_stats(mod).get("PlanKVCache", {}).get("not_planned", {})
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            plan, reason = _plan_function(mod, func)
            if plan is False and functional_cache_writes(Graph(func), func):
                why = not_planned.get(gv.name_hint, "PlanKVCache did not run")
                reasons[gv.name_hint] = f"its KV cache update is not in place ({why})"
            elif plan is None:
                reasons[gv.name_hint] = reason
            elif plan is not False:
                plans[gv] = plan
        shapes = {shape_of(p.param) for p in plans.values()}
        if not reasons and len(shapes) > 1:
            reasons = {"the functions": f"they disagree on the cache shape {sorted(shapes)}"}
        if reasons:
            name, reason = next(iter(sorted(reasons.items())))
            if self.required:
                raise BlueLowerError(f"QuantizeKVCache: the INT8 KV cache (--quant w4a16kv8) cannot be built: {name}: "
                                     f"{reason}; compile with --quant w4a16 for a float32 cache")
            return with_stats(mod, "QuantizeKVCache", converted=0, reason=f"{name}: {reason}")
        if not plans:
            return with_stats(mod, "QuantizeKVCache", converted=0, reason="no KV cache found")
        shape = next(iter(shapes))
        new_shape = _int8_shape(shape)
        new_ty = relax.TensorType(new_shape, "int8")
        rewriter = _Rewriter(mod)
        replaced = set()
        for gv, plan in plans.items():
            func = mod[gv]
            new_param = relax.Var(plan.param.name, new_ty)
            rewriter.plan = plan
            rewriter.set_var_remap(plan.param, new_param)
            body = rewriter.visit_expr(func.body)
            params = [new_param if p.same_as(plan.param) else p for p in func.params]
            new_func = relax.Function(params, body, body.ty, func.is_pure, func.attrs, func.span)
            rewriter.builder_.update_func(gv, new_func)
            for var in list(plan.writes) + list(plan.attentions):
                replaced.add(func_binding_callee(func, var))
        out = rewriter.builder_.get()
        still = referenced_global_vars(out)
        for gv in list(out.get_global_vars()):
            if gv.name_hint in replaced and gv.name_hint not in still:
                del out[gv]
        L, _two, kv_heads, capacity, head_dim = shape
        bytes_per_token = L * 2 * kv_heads * (head_dim + KV_SCALE_BYTES)
        info = {"shape": list(new_shape), "dtype": "int8", "layout": KV_INT8_LAYOUT, "scale_dtype": "float32",
                "bytes": capacity * bytes_per_token, "bytes_per_token": bytes_per_token,
                "functions": {gv.name_hint: [i for i, p in enumerate(mod[gv].params) if p.same_as(plans[gv].param)][0]
                              for gv in plans}}
        out = with_result(out, "kv_cache", info)
        return with_stats(out, "QuantizeKVCache", converted=1, layers=L, functions=sorted(gv.name_hint for gv in plans),
                          bytes_per_token=bytes_per_token, fp32_bytes_per_token=L * 2 * kv_heads * head_dim * 4,
                          cache_bytes=capacity * bytes_per_token, shape=list(new_shape), dtype="int8")


def func_binding_callee(func: relax.Function, var) -> str:
    """The name of the kernel the binding of ``var`` calls."""
    for block in func.body.blocks:
        for b in block.bindings:
            if b.var.same_as(var):
                return b.value.args[0].name_hint
    return ""
