"""ShareLayerKernels: one compiled kernel per shape instead of one per layer.

The graph rewrites emit a kernel per layer for the operators that index the one persistent
KV cache (``fused_attention*``, ``kv_cache_write*``): the layer (and k-or-v) is a constant
leading index. They are the same code otherwise, and the build compiled every one of them:
~260 near-identical functions for the 3B decoder, most of TVM's build time.

Requires: PrimFuncs from the stamped kernel builders (``lowering/kernels/attention.py``):
attr ``bluelower.stamp = {"builder", "args", "values", "id"}``, from which
``attention.generic_kernel`` rebuilds the generic kernel (prefix as trailing int32
parameters). Nothing but the IR is needed: a module dumped to TVMScript and re-parsed in
another process is shared the same way. Others (no stamp, or a stamp the current kernel
code does not rebuild to its ``id``) are left alone.

Ensures: every ``R.call_tir`` / ``R.call_tir_inplace`` of a stamped kernel calls its generic
kernel with the prefix constants as ``R.prim_value`` arguments (after the tensor inputs,
before the outputs, as ``call_tir`` passes scalars); one generic kernel per shape and output
count; per-layer kernels nothing calls any more are removed. Results are unchanged (tests
compare builds with and without the pass).
"""

from __future__ import annotations

import json
import re

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from .instruments import with_stats
from .ir_utils import referenced_global_vars

_CALLS = ("relax.call_tir", "relax.call_tir_inplace")


def _stamp(func) -> dict | None:
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or "bluelower.stamp" not in func.attrs:
        return None
    return json.loads(str(func.attrs["bluelower.stamp"]))


def _with_scalars_before_outputs(func: tirx.PrimFunc, pvars: list, n_out: int) -> tirx.PrimFunc:
    """The generic kernel's parameters are ``tensors..., outputs..., prefix vars``; ``call_tir``
    passes ``inputs..., scalars..., outputs``."""
    params = list(func.params)
    tensors = params[:len(params) - len(pvars)]
    split = len(tensors) - n_out
    out = tirx.PrimFunc(tensors[:split] + list(pvars) + tensors[split:], func.body, func.ret_type, func.attrs)
    # its kernel_args name the prefix variables: not a per-layer kernel QuantizeKVCache could rebuild
    return out.without_attr("bluelower.kernel_args") if "bluelower.kernel_args" in func.attrs else out


@mutator
class _Sharer(PyExprMutator):  # pylint: disable=abstract-method
    def __init__(self, mod):
        super().__init__(mod)
        self.mod_ = mod
        self.shared: dict = {}  # (stamp id, outputs) -> GlobalVar of the generic kernel
        self.calls = 0

    def _generic(self, gv, stamp: dict, n_out: int):
        from ..lowering.kernels.attention import generic_kernel

        key = (stamp["id"], n_out)
        if key not in self.shared:
            found = generic_kernel(stamp)
            if found is None:
                return None
            func, pvars = found
            name = re.sub(r"\d+$", "", gv.name_hint) + "_shared"
            self.shared[key] = self.builder_.add_func(_with_scalars_before_outputs(func, pvars, n_out), name)
        return self.shared[key]

    def visit_call_(self, call):  # pylint: disable=arguments-renamed
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in _CALLS):
            return call
        gv = call.args[0]
        stamp = _stamp(self.mod_[gv]) if isinstance(gv, relax.GlobalVar) and gv in self.mod_.functions else None
        if stamp is None:
            return call
        out_ty = call.ty_args[0]
        inplace = call.op.name == "relax.call_tir_inplace"
        n_out = 0 if inplace else (len(out_ty.fields) if isinstance(out_ty, relax.TupleType) else 1)
        generic = self._generic(gv, stamp, n_out)
        if generic is None:
            return call
        scalars = [relax.prim_value(tirx.IntImm("int32", int(v))) for v in stamp["values"]]
        args = list(call.args[1].fields) + scalars
        self.calls += 1
        if inplace:
            indices = [int(i) for i in call.attrs.inplace_indices]
            return relax.call_tir_inplace(generic, args, indices, out_ty)
        return relax.call_tir(generic, args, out_ty)


@tvm.transform.module_pass(opt_level=0, name="ShareLayerKernels")
class ShareLayerKernels:  # pylint: disable=too-few-public-methods
    """Call one generic kernel per shape (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        stamped = {gv.name_hint for gv, f in mod.functions_items() if _stamp(f) is not None}
        if not stamped:
            return with_stats(mod, "ShareLayerKernels", shared=0, reason="no per-layer kernels")
        sharer = _Sharer(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                sharer.builder_.update_func(gv, sharer.visit_expr(func))
        out = sharer.builder_.get()
        still = referenced_global_vars(out)
        removed = 0
        for gv in list(out.get_global_vars()):
            if gv.name_hint in stamped and gv.name_hint not in still:
                del out[gv]
                removed += 1
        return with_stats(out, "ShareLayerKernels", per_layer_kernels=len(stamped), shared_kernels=len(sharer.shared),
                          calls_rewritten=sharer.calls, removed=removed)
