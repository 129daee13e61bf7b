"""Graph helpers the passes share, and pass results carried in the IRModule.

Results: a pass that produces something the build needs later (the INT8 KV-cache layout,
the quantized-parameter table, the memory plan, the APU partitions, the predicted
schedule) attaches it to the module as a JSON attribute ``bluelower.<key>``
(:func:`with_result`); the compile driver reads them from the final module
(:func:`result`) into the manifest. So a dumped IR carries everything, and no pass writes
into a side dictionary. Statistics travel the same way (``passes/instruments.py``).
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

RESULT_PREFIX = "bluelower."
PARAM_NAMES = "bluelower.param_names"  # function attr: checkpoint names of the weight parameters, in order
KERNEL_ARGS = "bluelower.kernel_args"  # PrimFunc attr: the builder arguments of a bluelower kernel (JSON)


# --- pass results in the module ---------------------------------------------------------


def with_result(mod: tvm.IRModule, key: str, value) -> tvm.IRModule:
    """``mod`` with ``value`` (JSON-serializable) attached as attribute ``bluelower.<key>``."""
    return mod.with_attr(RESULT_PREFIX + key, json.dumps(value, sort_keys=True))


def result(mod: tvm.IRModule, key: str, default=None):
    """The value a pass attached with :func:`with_result`, or ``default``."""
    attrs = mod.attrs
    if attrs is None or RESULT_PREFIX + key not in attrs:
        return default
    return json.loads(str(attrs[RESULT_PREFIX + key]))


def without_results(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` without bluelower's attributes (what TVM's build gets)."""
    attrs = mod.attrs
    if attrs is None:
        return mod
    for key in [str(k) for k in attrs.keys()]:
        if key.startswith(RESULT_PREFIX):
            mod = mod.without_attr(key)
    return mod


# --- reading a function's dataflow ------------------------------------------------------


def shape_of(expr) -> tuple | None:
    """The static shape of a tensor-typed expression, or None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None:
        return None
    try:
        return tuple(int(d) for d in dims)
    except TypeError:
        return None


def dtype_of(expr) -> str:
    return str(expr.ty.dtype)


def static_shape(expr) -> tuple | None:
    """The shape of ``expr`` when every dimension is a constant ``IntImm``, else None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    dims = []
    for d in ty.shape.values:
        if not isinstance(d, tvm.tirx.IntImm):
            return None
        dims.append(int(d))
    return tuple(dims)


def is_op(call, name: str) -> bool:
    return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == name


class Graph:
    """``var -> bound value`` of one function, with the small queries the matchers need."""

    def __init__(self, func: relax.Function):
        self.var2val = relax.analysis.get_var2val(func)

    def value(self, expr):
        while isinstance(expr, relax.Var) and expr in self.var2val:
            bound = self.var2val[expr]
            if isinstance(bound, relax.Var):
                expr = bound
                continue
            return bound
        return expr

    def call(self, expr, *ops):
        v = self.value(expr)
        if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in ops:
            return v
        return None

    def strip(self, expr, leading_reshape: bool = True):
        """Look through no-op broadcast_to and (optionally) reshapes of leading axes."""
        while True:
            c = self.call(expr, "relax.broadcast_to", "relax.reshape")
            if c is None:
                return expr
            src, out = shape_of(c.args[0]), shape_of(c)
            if src is None or out is None:
                return expr
            if c.op.name == "relax.broadcast_to" and src == out:
                expr = c.args[0]
            elif c.op.name == "relax.reshape" and leading_reshape and src[-2:] == out[-2:]:
                expr = c.args[0]
            else:
                return expr

    def static_int(self, expr) -> int | None:
        """The value of a scalar integer expression computable at compile time (constants,
        and the ONNX index normalization ``where(i < 0, i + shape[0], i)``)."""
        if isinstance(expr, tvm.tirx.IntImm):
            return int(expr.value)
        v = self.value(expr)
        if isinstance(v, Constant):
            data = v.value.numpy()
            return int(data) if data.size == 1 and data.dtype.kind in "iub" else None
        if not isinstance(v, relax.Call) or not isinstance(v.op, tvm.ir.Op):
            return None
        name = v.op.name
        if name == "relax.where":
            c = self.static_int(v.args[0])
            return None if c is None else self.static_int(v.args[1] if c else v.args[2])
        if name in ("relax.less", "relax.add"):
            a, b = self.static_int(v.args[0]), self.static_int(v.args[1])
            if a is None or b is None:
                return None
            return int(a < b) if name == "relax.less" else a + b
        if name == "relax.take":
            src = self.call(v.args[0], "relax.shape_to_tensor")
            i = self.static_int(v.args[1])
            if src is not None and i is not None:
                of = self.call(src.args[0], "relax.shape_of")
                shape = shape_of(of.args[0]) if of is not None else None
                if shape is not None and -len(shape) <= i < len(shape):
                    return shape[i]
        return None

    def scalar_float(self, expr) -> float | None:
        v = self.value(expr)
        if isinstance(v, Constant):
            data = v.value.numpy()
            if data.size == 1 and data.dtype.kind == "f":
                return float(data.reshape(()))
        return None


# --- rewriting ----------------------------------------------------------------------------


def emit_like(builder, var, expr):
    """Emit ``expr`` as a dataflow var, or as an output when it replaces one."""
    return builder.emit(expr) if isinstance(var, relax.DataflowVar) else builder.emit_output(expr)


@relax.expr_functor.mutator
class Substitute(relax.PyExprMutator):
    """Replace variables by the expressions of ``mapping``."""

    def __init__(self, mapping):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, op):
        return self.mapping.get(op, op)

    def visit_dataflow_var_(self, op):
        return self.mapping.get(op, op)


# --- functions of a module ------------------------------------------------------------------


def is_entry(func) -> bool:
    """A public Relax function (one a runtime calls)."""
    return isinstance(func, relax.Function) and func.attrs is not None and "global_symbol" in func.attrs


def param_names(func: relax.Function) -> list[str]:
    """The checkpoint names of ``func``'s weight parameters (attr ``bluelower.param_names``)."""
    names = func.attrs.get(PARAM_NAMES) if func.attrs is not None else None
    return [str(n) for n in names] if names is not None else []


def referenced_global_vars(mod) -> set:
    """Names of the functions the module's Relax functions refer to."""
    out = set()
    for _gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            out.update(g.name_hint for g in relax.analysis.all_global_vars(func))
    return out


def kernel_args(mod, gv) -> dict | None:
    """The builder arguments (attr ``bluelower.kernel_args``) of the kernel ``gv`` names, or None."""
    if not isinstance(gv, relax.GlobalVar) or gv not in mod.functions:
        return None
    func = mod[gv]
    if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None or KERNEL_ARGS not in func.attrs:
        return None
    return json.loads(str(func.attrs[KERNEL_ARGS]))


def count_var_uses(body) -> dict:
    counts: dict = {}

    def visit(node):
        if isinstance(node, relax.Var):
            counts[node] = counts.get(node, 0) + 1

    relax.analysis.post_order_visit(body, visit)
    return counts


def calls_where(body, pred) -> list:
    """Every ``relax.Call`` in ``body`` (post-order) for which ``pred(call)`` holds."""
    found = []

    def visit(node):
        if isinstance(node, relax.Call) and pred(node):
            found.append(node)

    relax.analysis.post_order_visit(body, visit)
    return found


# --- values known at compile time -------------------------------------------------------------


def static_ints(expr) -> list | None:
    """The integers of an ``IntImm`` (a prim value), a ``ShapeExpr`` or a tuple of them, else None."""
    if isinstance(expr, tvm.tirx.IntImm):
        return [int(expr.value)]
    if isinstance(expr, relax.ShapeExpr):
        fields = expr.values
    elif isinstance(expr, (relax.Tuple, list, tuple)) or type(expr).__name__ == "Array":
        fields = expr.fields if isinstance(expr, relax.Tuple) else expr
    else:
        return None
    out = []
    for f in fields:
        v = static_ints(f)
        if v is None or len(v) != 1:
            return None
        out.extend(v)
    return out


def _np_op(fn):
    return lambda call, ev: fn(*[ev(a) for a in call.args])


def _axes(attr):
    return None if attr is None else tuple(int(a) for a in attr)


def _strided_slice(call, ev):
    x = ev(call.args[0])
    axes, begin, end = (static_ints(a) for a in call.args[1:4])
    strides = static_ints(call.args[4]) if len(call.args) > 4 else [1] * len(axes)
    index = [slice(None)] * x.ndim
    for a, b, e, s in zip(axes, begin, end, strides):
        index[a] = slice(b, e, s)
    return x[tuple(index)]


def _cumsum(call, ev):
    x = ev(call.args[0])
    axis = -1 if call.attrs.axis is None else int(call.attrs.axis)
    out = np.cumsum(x, axis=axis)
    return out - x if call.attrs.exclusive else out


def _take(call, ev):
    mode = {"clip": "clip", "wrap": "wrap"}.get(str(call.attrs.mode), "raise")
    return np.take(ev(call.args[0]), ev(call.args[1]), axis=int(call.attrs.axis), mode=mode)


def _full(call, ev):
    return np.full(static_shape(call), ev(call.args[1]).reshape(()))


# How each operator an importer uses to build a mask or an index computes, in numpy. The
# result is cast to the call's dtype and checked against its static shape.
_NUMPY_OPS = {
    **{f"relax.{name}": _np_op(fn) for name, fn in {
        "add": np.add, "subtract": np.subtract, "multiply": np.multiply, "maximum": np.maximum,
        "minimum": np.minimum, "less": np.less, "less_equal": np.less_equal, "greater": np.greater,
        "greater_equal": np.greater_equal, "equal": np.equal, "not_equal": np.not_equal,
        "logical_and": np.logical_and, "logical_or": np.logical_or, "bitwise_and": np.bitwise_and,
        "bitwise_or": np.bitwise_or, "logical_not": np.logical_not, "bitwise_not": np.invert,
        "negative": np.negative, "sqrt": np.sqrt, "where": np.where}.items()},
    "relax.divide": lambda c, ev: np.divide(ev(c.args[0]), ev(c.args[1])) if dtype_of(c).startswith("float") else None,
    "relax.arange": lambda c, ev: np.arange(*[static_ints(a)[0] for a in c.args[:3]]),
    "relax.full": _full,
    "relax.full_like": _full,
    "relax.zeros": lambda c, ev: np.zeros(static_shape(c)),
    "relax.ones": lambda c, ev: np.ones(static_shape(c)),
    "relax.zeros_like": lambda c, ev: np.zeros(static_shape(c)),
    "relax.ones_like": lambda c, ev: np.ones(static_shape(c)),
    "relax.reshape": lambda c, ev: np.reshape(ev(c.args[0]), static_shape(c)),
    "relax.broadcast_to": lambda c, ev: np.broadcast_to(ev(c.args[0]), static_shape(c)),
    "relax.expand_dims": lambda c, ev: np.reshape(ev(c.args[0]), static_shape(c)),
    "relax.squeeze": lambda c, ev: np.reshape(ev(c.args[0]), static_shape(c)),
    "relax.permute_dims": lambda c, ev: np.transpose(ev(c.args[0]), _axes(c.attrs.axes)),
    "relax.astype": lambda c, ev: ev(c.args[0]),
    "relax.strided_slice": _strided_slice,
    "relax.take": _take,
    "relax.concat": lambda c, ev: np.concatenate([ev(f) for f in c.args[0].fields], axis=int(c.attrs.axis)),
    "relax.tril": lambda c, ev: np.tril(ev(c.args[0]), static_ints(c.args[1])[0]),
    "relax.triu": lambda c, ev: np.triu(ev(c.args[0]), static_ints(c.args[1])[0]),
    "relax.cumsum": _cumsum,
    "relax.max": lambda c, ev: np.max(ev(c.args[0]), axis=_axes(c.attrs.axis), keepdims=bool(c.attrs.keepdims)),
    "relax.min": lambda c, ev: np.min(ev(c.args[0]), axis=_axes(c.attrs.axis), keepdims=bool(c.attrs.keepdims)),
    "relax.sum": lambda c, ev: np.sum(ev(c.args[0]), axis=_axes(c.attrs.axis), keepdims=bool(c.attrs.keepdims)),
    "relax.index_tensor": lambda c, ev: ev(c.args[0])[tuple(ev(i) for i in c.args[1].fields)],
    "relax.shape_to_tensor": lambda c, ev: np.array(shape_of(c.args[0].args[0]) if is_op(c.args[0], "relax.shape_of")
                                                    else static_ints(c.args[0])),
}


class _NotConstant(Exception):
    pass


class ConstantEvaluator:
    """The value (a numpy array) of an expression of a function that reads no parameter:
    constants and what the importers compute from them (``arange``, ``full``, comparisons,
    ``tril``, the index arithmetic of a causal mask, shapes), by the table above; None when it
    reads a parameter, uses another operator, or has more than ``max_elements`` elements.
    Values are memoized per variable (a mask shared by the layers is evaluated once)."""

    def __init__(self, g: Graph, max_elements: int = 1 << 22):
        self.g, self.max_elements, self.memo = g, max_elements, {}

    def __call__(self, expr):
        try:
            return self._eval(expr)
        except (_NotConstant, ValueError, TypeError, IndexError, AttributeError):
            return None

    def _eval(self, expr):
        if expr in self.memo:
            if self.memo[expr] is None:
                raise _NotConstant
            return self.memo[expr]
        value = None
        try:
            value = self._compute(self.g.value(expr))
        finally:
            if isinstance(expr, relax.Var):
                self.memo[expr] = value
        return value

    def _compute(self, v):
        if isinstance(v, tvm.tirx.IntImm):  # a prim value (a Constant too)
            raise _NotConstant
        if isinstance(v, Constant):
            return v.value.numpy()
        fn = _NUMPY_OPS.get(v.op.name) if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) else None
        shape = static_shape(v) if fn is not None else None
        if shape is None or int(np.prod(shape)) > self.max_elements:
            raise _NotConstant
        out = fn(v, self._eval)
        if out is None or tuple(np.shape(out)) != shape:
            raise _NotConstant
        return np.asarray(out).astype(dtype_of(v))


__all__ = ["ConstantEvaluator", "Graph", "KERNEL_ARGS", "PARAM_NAMES", "Substitute", "calls_where", "count_var_uses",
           "dtype_of", "emit_like", "is_entry", "is_op", "kernel_args", "param_names", "referenced_global_vars",
           "result", "shape_of", "static_ints", "static_shape", "with_result", "without_results"]
