"""PlanKVCache: the KV cache becomes one persistent buffer, updated in place.

Requires: Relax straight from an importer (before ``FuseAttention``, which then reads K/V
straight from the cache buffer), static shapes. The imported ``prefill``/``decode`` take
the cache ``[L, 2, kv_heads, capacity, head_dim]`` and return an updated copy::

    layer_i = take(kv_cache, i, axis=0)                       # per layer
    new_i   = scatter_elements(layer_i, index_i, update_i, axis=a, reduction="update")
    ...
    out     = stack(new_0, ..., new_{L-1})                     # torch: reshape(concat(new_i));
                                                               # onnx: concat(expand_dims(new_i, 0))

Ensures: each layer's scatter becomes ``cache = R.call_tir_inplace(kv_cache_write_i,
(cache, index_i, update_i), inplace_indices=[0])`` on the running cache value (starting
from the ``kv_cache`` parameter), writing only the new rows; uses of ``new_i`` read
``take(cache, i)`` (a slice ``FuseAttention`` folds into its kernel); the stacked result is
the last cache value, i.e. the very tensor passed in (``CompiledModel`` keeps using
``out[1]`` and the function signatures do not change). No function keeps a whole-cache
``scatter_elements``/``concat``. Each write kernel first checks every position against the
capacity and fails with "KV cache write beyond its capacity" (no out-of-bounds write).
The write kernels carry ``bluelower.kernel_args`` so that ``QuantizeKVCache``
(``--quant w4a16kv8``) can swap in their INT8 (quantize-on-write) variants.
A function whose cache flow does not match exactly is left unchanged. Stats:
``in_place_writes`` (total) and ``per_function``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..lowering.kernels.attention import kv_cache_write
from .instruments import with_stats
from .ir_utils import Graph, emit_like, shape_of


def _layer_writes(g: Graph, func: relax.Function) -> dict:
    """``scatter var -> (cache param, layer index, scatter call)`` for every per-layer update."""
    params = set(func.params)
    writes = {}
    for var, value in g.var2val.items():
        sc = g.call(var, "relax.scatter_elements")
        if sc is None or sc.attrs.reduction != "update":
            continue
        take = g.call(sc.args[0], "relax.take")
        if take is None or int(take.attrs.axis) != 0 or take.args[0] not in params:
            continue
        i = g.static_int(take.args[1])
        cache_shape = shape_of(take.args[0])
        if i is None or cache_shape is None or shape_of(sc) != cache_shape[1:]:
            continue
        writes[var] = (take.args[0], i % cache_shape[0], sc)
    return writes


def _stacked(g: Graph, expr, cache_shape):
    """The layer tensors ``expr`` stacks along a new axis 0 (shape ``cache_shape``), or None."""
    fields = None
    reshape = g.call(expr, "relax.reshape")
    if reshape is not None and shape_of(reshape) == cache_shape:
        cat = g.call(reshape.args[0], "relax.concat")
        if cat is not None and int(cat.attrs.axis) == 0:
            fields = list(_tuple_fields(g, cat.args[0]))
            if any(shape_of(f) != cache_shape[1:] for f in fields):
                return None
            return fields
    cat = g.call(expr, "relax.concat")
    if cat is not None and int(cat.attrs.axis) == 0 and shape_of(cat) == cache_shape:
        fields = []
        for f in _tuple_fields(g, cat.args[0]):
            e = g.call(f, "relax.expand_dims")
            if e is None or [int(a) for a in e.attrs.axis] != [0]:
                return None
            fields.append(e.args[0])
        return fields
    return None


def _tuple_fields(g: Graph, expr):
    t = g.value(expr)
    return list(t.fields) if isinstance(t, relax.Tuple) else []


@mutator
class _CacheRewriter(PyExprMutator):  # pylint: disable=abstract-method
    def __init__(self, mod):
        super().__init__(mod)
        self.writes: dict = {}
        self.stack_vars: set = set()
        self.current = None
        self.kernels: dict = {}

    def _kernel(self, cache_shape, layer, axis, update_shape, dtype, index_dtype):
        key = (cache_shape, layer, axis, update_shape, dtype, index_dtype)
        if key not in self.kernels:
            func = kv_cache_write(cache_shape=cache_shape, prefix=(layer,), axis=axis, update_shape=update_shape,
                                  dtype=dtype, index_dtype=index_dtype)
            self.kernels[key] = self.builder_.add_func(func, "kv_cache_write")
        return self.kernels[key]

    def visit_var_binding_(self, binding):
        var = binding.var
        if var in self.writes:
            cache, layer, sc = self.writes[var]
            if self.current is None:
                self.current = self.visit_expr(cache)
            cache_shape = shape_of(cache)
            axis = int(sc.attrs.axis) % len(cache_shape[1:])
            index, update = sc.args[1], sc.args[2]
            gv = self._kernel(cache_shape, layer, axis, shape_of(update), str(update.ty.dtype), str(index.ty.dtype))
            self.current = self.builder_.emit(
                relax.call_tir_inplace(gv, [self.current, self.visit_expr(index), self.visit_expr(update)], [0],
                                       cache.ty)
            )
            layer_view = relax.op.take(self.current, relax.const(layer, "int64"), axis=0)
            self.set_var_remap(var, emit_like(self.builder_, var, layer_view))
            return
        if var in self.stack_vars:
            current = self.current
            self.set_var_remap(var, current if isinstance(var, relax.DataflowVar) else self.builder_.emit_output(current))
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="PlanKVCache")
class PlanKVCache:  # pylint: disable=too-few-public-methods
    """Make the functional KV-cache update an in-place one (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _CacheRewriter(mod)
        per_function = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            g = Graph(func)
            writes = _layer_writes(g, func)
            if not writes:
                continue
            caches = {c for c, _, _ in writes.values()}
            if len(caches) != 1:
                continue
            cache = next(iter(caches))
            cache_shape = shape_of(cache)
            by_layer = sorted(writes, key=lambda v: writes[v][1])
            stack_vars = set()
            for var in g.var2val:
                fields = _stacked(g, var, cache_shape)
                if fields is None:
                    continue
                if len(fields) != cache_shape[0] or any(not f.same_as(w) for f, w in zip(fields, by_layer)):
                    break
                stack_vars.add(var)
            # all layers written once, in order, and stacked back: otherwise leave the function alone
            if not stack_vars or [writes[v][1] for v in by_layer] != list(range(cache_shape[0])):
                continue
            if [v for v in g.var2val if v in writes] != by_layer:
                continue
            rewriter.writes, rewriter.stack_vars, rewriter.current = writes, stack_vars, None
            new_func = relax.analysis.remove_all_unused(rewriter.visit_expr(func))
            rewriter.builder_.update_func(gv, new_func)
            per_function[gv.name_hint] = len(writes)
        return with_stats(rewriter.builder_.get(), "PlanKVCache", in_place_writes=sum(per_function.values()),
                          per_function=dict(sorted(per_function.items())))
