"""PlanKVCache: the KV cache becomes one persistent buffer, updated in place.

Requires: Relax straight from an importer (before ``FuseAttention``, which then reads K/V
straight from the cache buffer), static shapes. The imported ``prefill``/``decode`` take
the cache ``[L, 2, kv_heads, capacity, head_dim]`` and return an updated copy::

    layer_i = take(kv_cache, i, axis=0)                       # per layer
    new_i   = scatter_elements(layer_i, index_i, update_i, axis=a, reduction="update")
    ...
    out     = stack(new_0, ..., new_{L-1})                     # torch: reshape(concat(new_i));
                                                               # onnx: concat(expand_dims(new_i, 0)),
                                                               # one layer: expand_dims(new_0, 0)

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
Any number of layers and KV heads (MHA, GQA, MQA), either frontend's spelling. A function
whose cache flow does not match exactly is left unchanged and named in the stats'
``not_planned`` with the reason (one line: the cache also read as it was before its update,
a layer written twice or not at all, out of order, the layers not stacked back, ...).
Stats: ``in_place_writes`` (total), ``per_function`` and ``not_planned``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..lowering.kernels.attention import kv_cache_write
from .instruments import with_stats
from .ir_utils import Graph, count_var_uses, emit_like, shape_of


def functional_cache_writes(g: Graph, func: relax.Function) -> dict:
    """``scatter var -> (cache param, layer index, scatter call)`` for every per-layer update
    ``scatter_elements(take(cache, i, axis=0), index, rows)`` of a parameter of ``func``."""
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
    """The layer tensors ``expr`` stacks along a new axis 0 (shape ``cache_shape``), or None:
    ``reshape(concat(layers))`` (torch), ``concat(expand_dims(layer, 0)...)`` (onnx),
    ``expand_dims(layer, 0)`` / ``reshape(layer)`` (one layer), ``stack(layers)``."""
    if shape_of(expr) != tuple(cache_shape):
        return None
    layer_shape = tuple(cache_shape[1:])
    c = g.call(expr, "relax.reshape", "relax.expand_dims", "relax.concat", "relax.stack")
    if c is None:
        return None
    if c.op.name == "relax.expand_dims":
        return [c.args[0]] if [int(a) for a in c.attrs.axis] == [0] else None
    if c.op.name == "relax.reshape":
        cat = g.call(c.args[0], "relax.concat")
        if cat is None and shape_of(c.args[0]) == layer_shape and cache_shape[0] == 1:
            return [c.args[0]]
        if cat is None or int(cat.attrs.axis) != 0:
            return None
        fields = _tuple_fields(g, cat.args[0])
        return fields if fields and all(shape_of(f) == layer_shape for f in fields) else None
    if int(c.attrs.axis) != 0:
        return None
    fields = _tuple_fields(g, c.args[0])
    if c.op.name == "relax.stack":
        return fields if fields and all(shape_of(f) == layer_shape for f in fields) else None
    out = []
    for f in fields:
        e = g.call(f, "relax.expand_dims")
        if e is None or [int(a) for a in e.attrs.axis] != [0]:
            return None
        out.append(e.args[0])
    return out or None


def _tuple_fields(g: Graph, expr):
    t = g.value(expr)
    return list(t.fields) if isinstance(t, relax.Tuple) else []


def _plan(g: Graph, func: relax.Function, writes: dict):
    """``(stack vars, None)`` when ``func``'s cache flow is the one this pass rewrites, else
    ``(None, reason)``."""
    caches = {c for c, _, _ in writes.values()}
    if len(caches) != 1:
        return None, f"the KV cache updates write {len(caches)} parameters"
    cache = next(iter(caches))
    cache_shape = shape_of(cache)
    layers = sorted(writes[v][1] for v in writes)
    if layers != list(range(cache_shape[0])):
        twice = sorted({i for i in layers if layers.count(i) > 1})
        missing = sorted(set(range(cache_shape[0])) - set(layers))
        return None, (f"layer(s) {twice} written more than once" if twice else f"layer(s) {missing} not written")
    order = [writes[v][1] for v in g.var2val if v in writes]
    if order != layers:
        return None, f"the layers are written out of order ({order})"
    takes = {sc.args[0] for _, _, sc in writes.values()}
    uses = count_var_uses(func.body)
    for var, value in g.var2val.items():
        if cache not in relax.analysis.free_vars(value) or g.call(var, "relax.shape_of") is not None:
            continue
        if var not in takes or uses.get(var, 0) != 1:  # only the layer slices its own update reads
            return None, f"the cache is also read as it was before its update ({var.name})"
    by_layer = sorted(writes, key=lambda v: writes[v][1])
    stack_vars = set()
    for var in g.var2val:
        fields = _stacked(g, var, cache_shape)
        if fields is None:
            continue
        if len(fields) != cache_shape[0] or any(not f.same_as(w) for f, w in zip(fields, by_layer)):
            return None, f"{var.name} stacks other tensors than the updated layers into a cache"
        stack_vars.add(var)
    if not stack_vars:
        return None, "the updated layers are not stacked back into one cache"
    return stack_vars, None


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
        per_function, not_planned = {}, {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            g = Graph(func)
            writes = functional_cache_writes(g, func)
            if not writes:
                continue
            stack_vars, reason = _plan(g, func, writes)
            if reason is not None:
                not_planned[gv.name_hint] = reason
                continue
            rewriter.writes, rewriter.stack_vars, rewriter.current = writes, stack_vars, None
            new_func = relax.analysis.remove_all_unused(rewriter.visit_expr(func))
            rewriter.builder_.update_func(gv, new_func)
            per_function[gv.name_hint] = len(writes)
        stats = dict(in_place_writes=sum(per_function.values()), per_function=dict(sorted(per_function.items())))
        if not_planned:
            stats["not_planned"] = dict(sorted(not_planned.items()))
        return with_stats(rewriter.builder_.get(), "PlanKVCache", **stats)
