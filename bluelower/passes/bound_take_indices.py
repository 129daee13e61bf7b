"""BoundTakeIndices: no gather reads outside its table, whatever the run-time index.

The importers spell ``index_select`` / ``nn.Embedding`` / ONNX ``Gather`` as ``R.take(x,
indices, axis, mode="fast")``, which TVM lowers to an unchecked load (and warns about at
every build: "Fast mode segfaults when there are out-of-bounds indices"). Where the
indices come from the caller at run time (prefill's ``num_valid - 1`` row, an fp32
build's token ids), a bad input would read arbitrary memory.

Requires: nothing. Ensures: every ``R.take`` whose indices are not a constant uses
``mode="clip"`` (each index clamped into ``[0, n - 1]``: one min/max per gathered index);
constant indices, checked when the module is built, keep ``fast``. In-range indices give
the same result as before. (Quantized builds replace the token-embedding ``take`` with a
kernel that checks the ids and fails the call; see QuantizeWeights.)
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .instruments import with_stats


@mutator
class _Bounder(PyExprMutator):  # pylint: disable=abstract-method
    def __init__(self, mod):
        super().__init__(mod)
        self.bounded = 0

    def visit_call_(self, call):  # pylint: disable=arguments-renamed
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take"):
            return call
        if str(call.attrs.mode) != "fast" or isinstance(call.args[1], tvm.ir.expr.Constant):
            return call
        self.bounded += 1
        axis = call.attrs.axis
        return relax.op.take(call.args[0], call.args[1], axis=None if axis is None else int(axis), mode="clip")


@tvm.transform.module_pass(opt_level=0, name="BoundTakeIndices")
class BoundTakeIndices:  # pylint: disable=too-few-public-methods
    """Clamp run-time gather indices (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        bounder = _Bounder(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                bounder.builder_.update_func(gv, bounder.visit_expr(func))
        return with_stats(bounder.builder_.get(), "BoundTakeIndices", bounded=bounder.bounded)
