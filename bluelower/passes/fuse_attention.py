"""FuseAttention: one TIR kernel per attention, straight from the imported Relax.

Requires: Relax straight from an importer (or after ``PlanKVCache``), before
``FuseTransposeMatmul`` and ``LegalizeOps``; static shapes, float32.

Matches, from the output side, ``matmul(softmax(S, axis=-1), V)`` with

    S = matmul(Q, Kᵀ) * scale                       (scale: a constant; ``/ c`` too)
      | where(not(key_pos <= pos), -inf, ...)       (the causal mask offset by the cache fill,
      | where(key_pos <= pos, ..., -inf)             as torch and ONNX spell it)
      | ... + mask                                   (an additive [.., T, S] mask)

looking through what the importers put between them: no-op ``broadcast_to``, reshapes that
only merge/split leading (batch/head) axes, the transpose of K (any ``permute_dims`` whose
last two axes swap), the GQA head repeat ``reshape(broadcast_to(expand_dims(K, h)))``, and
constant ``take(x, i, axis=0)`` slices of the KV cache (layer, k/v).

Ensures: each match becomes ``R.call_tir(attention_kernel, (q, k_src, v_src[, pos][, mask]))``
(:func:`bluelower.lowering.kernels.attention.fused_attention`): block-wise online softmax,
one task per GQA group (the ``rep`` query heads sharing a KV head read each K/V row once);
K/V read from their source (the cache, un-repeated) through constant leading indices;
with a causal mask the kernel reads only keys ``0 .. pos[t]`` (a task of several query
positions: up to its largest ``pos``, the other rows' later keys masked to ``p = 0``). The replaced operators are
removed when nothing else uses them. Stats: ``fused`` (total) and ``per_function``.
The kernels carry ``bluelower.kernel_args``; for ``--quant w4a16kv8`` ``QuantizeKVCache``
swaps those reading the cache for their INT8 variants (dequantize on read).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..lowering.kernels.attention import fused_attention
from .instruments import with_stats
from .ir_utils import Graph, dtype_of, emit_like, shape_of


# --- matching one attention ---------------------------------------------------------------


class _KVSource:
    """Where K (or V) is read from: ``root[prefix..., batch?, kv_head, s, d]`` (+ GQA ``rep``)."""

    def __init__(self, root, prefix, rep, new_axes=None):
        self.root, self.prefix, self.rep = root, tuple(prefix), rep
        self.new_axes = new_axes  # emit permute_dims(root, new_axes) first (a transposed K)

    def base_shape(self):
        shape = shape_of(self.root)
        if self.new_axes is not None:
            shape = tuple(shape[a] for a in self.new_axes)
        return shape[len(self.prefix):]

    def root_shape(self):
        shape = shape_of(self.root)
        return tuple(shape[a] for a in self.new_axes) if self.new_axes is not None else shape


def _trace_kv(g: Graph, expr) -> _KVSource:
    """K/V as used by the matmul -> its un-repeated source."""
    rep = 1
    expr = g.strip(expr, leading_reshape=False)
    reshape = g.call(expr, "relax.reshape")
    if reshape is not None:
        bcast = g.call(g.strip(reshape.args[0], leading_reshape=False), "relax.broadcast_to")
        expand = g.call(bcast.args[0], "relax.expand_dims") if bcast is not None else None
        src_shape = shape_of(expand.args[0]) if expand is not None else None
        axes = [int(a) for a in expand.attrs.axis] if expand is not None else []
        if src_shape is not None and len(axes) == 1 and axes[0] % (len(src_shape) + 1) == len(src_shape) - 2:
            a = len(src_shape) - 2
            out, b_shape = shape_of(reshape), shape_of(bcast)
            if out[-2:] == src_shape[-2:] and b_shape[a] * src_shape[a - 1] == out[-3]:
                rep = b_shape[a]
                expr = expand.args[0]
    expr = g.strip(expr)
    prefix = []
    while True:
        take = g.call(expr, "relax.take")
        if take is None or int(take.attrs.axis) != 0:
            break
        i = g.static_int(take.args[1])
        src_shape, out = shape_of(take.args[0]), shape_of(take)
        if i is None or src_shape is None or out is None or len(src_shape) != len(out) + 1:
            break
        prefix.insert(0, i % src_shape[0])
        expr = take.args[0]
    return _KVSource(expr, prefix, rep)


def _transposed_source(g: Graph, kt) -> _KVSource:
    """Kᵀ [.., D, S] as used by the first matmul -> K [.., S, D] (a permute to emit, or none)."""
    kt = g.strip(kt)
    perm = g.call(kt, "relax.permute_dims")
    if perm is not None and perm.attrs.axes is not None:
        axes = [int(a) for a in perm.attrs.axes]
        swapped = axes[:-2] + [axes[-1], axes[-2]]
        if swapped == list(range(len(axes))):
            return _trace_kv(g, perm.args[0])
        return _KVSource(perm.args[0], (), 1, new_axes=swapped)
    rank = len(shape_of(kt))
    return _KVSource(kt, (), 1, new_axes=list(range(rank - 2)) + [rank - 1, rank - 2])


def _is_neg_inf(g: Graph, expr) -> bool:
    v = g.scalar_float(expr)
    return v is not None and (v == -math.inf or v <= -1e30)


def _is_key_positions(g: Graph, expr, kv_len: int) -> bool:
    """[1, S] (or [S]) int tensor holding 0 .. S-1."""
    v = g.value(expr)
    if isinstance(v, Constant):
        data = v.value.numpy()
        return data.size == kv_len and np.array_equal(data.reshape(-1), np.arange(kv_len))
    c = g.call(expr, "relax.expand_dims", "relax.reshape")
    if c is not None:
        return _is_key_positions(g, c.args[0], kv_len)
    a = g.call(expr, "relax.arange")
    if a is not None:
        vals = [g.static_int(x) for x in a.args[:3]]
        return vals == [0, kv_len, 1]
    return False


def _query_positions(g: Graph, expr, q_len: int):
    """[T, 1] from expand_dims(pos [T], 1) or reshape -> pos."""
    c = g.call(expr, "relax.expand_dims", "relax.reshape")
    if c is None:
        return None
    src = c.args[0]
    if shape_of(src) == (q_len,) and shape_of(c) == (q_len, 1) and dtype_of(src).startswith("int"):
        return src
    return None


def _causal_positions(g: Graph, cond, masked: bool, q_len: int, kv_len: int):
    """The query positions ``pos [T]`` of a causal condition, or None."""
    if masked:
        inner = g.call(cond, "relax.bitwise_not", "relax.logical_not")
        if inner is not None:
            return _causal_positions(g, inner.args[0], False, q_len, kv_len)
        gt = g.call(cond, "relax.greater", "relax.less")
        if gt is None:
            return None
        kp, qp = gt.args if gt.op.name == "relax.greater" else gt.args[::-1]
    else:
        le = g.call(cond, "relax.less_equal", "relax.greater_equal")
        if le is None:
            return None
        kp, qp = le.args if le.op.name == "relax.less_equal" else le.args[::-1]
    if not _is_key_positions(g, kp, kv_len):
        return None
    return _query_positions(g, qp, q_len)


class Attention:
    """One matched attention and everything the kernel call needs."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def match_attention(g: Graph, out_call: relax.Call) -> Attention | None:
    """``out_call`` is a ``relax.matmul``; return the attention it ends, or None."""
    if not (isinstance(out_call, relax.Call) and isinstance(out_call.op, tvm.ir.Op) and out_call.op.name == "relax.matmul"):
        return None
    probs, v_used = out_call.args
    sm = g.call(g.strip(probs), "relax.nn.softmax")
    if sm is None or int(sm.attrs.axis) not in (-1, len(shape_of(sm)) - 1):
        return None
    scores = g.strip(sm.args[0])
    causal_pos = mask = None
    masked_where = g.call(scores, "relax.where")
    if masked_where is not None:
        cond, a, b = masked_where.args
        if _is_neg_inf(g, a):
            masked, scores = True, b
        elif _is_neg_inf(g, b):
            masked, scores = False, a
        else:
            return None
    add = g.call(scores, "relax.add")
    if add is not None:
        for s_side, m_side in ((0, 1), (1, 0)):
            if _qk(g, add.args[s_side]) is not None:
                scores, mask = add.args[s_side], add.args[m_side]
                break
        else:
            return None
    qk = _qk(g, scores)
    if qk is None:
        return None
    q, kt, scale = qk
    q = g.strip(q, leading_reshape=False)
    q_shape = shape_of(q)
    if q_shape is None or len(q_shape) < 2:
        return None
    q_len, head_dim = q_shape[-2:]
    rows = int(np.prod(q_shape[:-2])) if len(q_shape) > 2 else 1
    k_src, v_src = _transposed_source(g, kt), _trace_kv(g, v_used)
    kb, vb = k_src.base_shape(), v_src.base_shape()
    if kb is None or vb is None or len(kb) not in (3, 4) or len(vb) not in (3, 4):
        return None
    kv_heads, kv_len, kd = kb[-3:]
    if kd != head_dim or vb[-3:] != (kv_heads, kv_len, head_dim) or k_src.rep != v_src.rep:
        return None
    q_heads = kv_heads * k_src.rep
    if rows % q_heads:
        return None
    batch = rows // q_heads
    for base in (kb, vb):
        if len(base) == 4 and base[0] not in (1, batch) or len(base) == 3 and batch != 1 and k_src.rep != 1:
            return None
    out_shape = shape_of(out_call)
    if out_shape is None or int(np.prod(out_shape)) != rows * q_len * head_dim or out_shape[-2:] != (q_len, head_dim):
        return None
    if any(dtype_of(x) != "float32" for x in (q, out_call)):
        return None
    if masked_where is not None:
        causal_pos = _causal_positions(g, masked_where.args[0], masked, q_len, kv_len)
        if causal_pos is None:
            return None
    mask_shape = None
    if mask is not None:
        mask_shape = shape_of(mask)
        if mask_shape is None or dtype_of(mask) != "float32" or any(d != 1 for d in mask_shape[:-2]):
            return None
        if mask_shape[-1] not in (1, kv_len) or len(mask_shape) >= 2 and mask_shape[-2] not in (1, q_len):
            return None
    return Attention(q=q, k=k_src, v=v_src, pos=causal_pos, mask=mask, mask_shape=mask_shape, scale=scale,
                     rows=rows, q_heads=q_heads, rep=k_src.rep, q_len=q_len, head_dim=head_dim, kv_len=kv_len,
                     out_shape=out_shape)


def _qk(g: Graph, scores):
    """scores -> (Q, Kᵀ, scale) for ``matmul(Q, Kᵀ) * scale`` (scale 1 when absent)."""
    scores = g.strip(scores)
    scale = 1.0
    c = g.call(scores, "relax.multiply", "relax.divide")
    if c is not None:
        for x_side, s_side in ((0, 1), (1, 0)) if c.op.name == "relax.multiply" else ((0, 1),):
            s = g.scalar_float(c.args[s_side])
            if s is not None:
                scale = s if c.op.name == "relax.multiply" else 1.0 / s
                scores = g.strip(c.args[x_side])
                break
        else:
            return None
    mm = g.call(scores, "relax.matmul")
    if mm is None:
        return None
    return mm.args[0], mm.args[1], scale


# --- the pass ----------------------------------------------------------------------------


@mutator
class _AttentionRewriter(PyExprMutator):  # pylint: disable=abstract-method
    def __init__(self, mod):
        super().__init__(mod)
        self.matches: dict = {}
        self.kernels: dict = {}

    def _kernel(self, att: Attention):
        key = (att.rows, att.q_heads, att.rep, att.q_len, att.head_dim, att.kv_len, att.k.root_shape(), att.k.prefix,
               att.v.root_shape(), att.v.prefix, att.scale, att.pos is not None, att.mask_shape)
        if key not in self.kernels:
            func = fused_attention(rows=att.rows, q_heads=att.q_heads, rep=att.rep, q_len=att.q_len,
                                   head_dim=att.head_dim, kv_len=att.kv_len, k_shape=att.k.root_shape(),
                                   k_prefix=att.k.prefix, v_shape=att.v.root_shape(), v_prefix=att.v.prefix,
                                   scale=att.scale, causal=att.pos is not None, additive_mask=att.mask_shape)
            self.kernels[key] = self.builder_.add_func(func, "fused_attention")
        return self.kernels[key]

    def _source(self, src: _KVSource):
        root = self.visit_expr(src.root)
        if src.new_axes is not None:
            root = self.builder_.emit(relax.op.permute_dims(root, src.new_axes))
        return root

    def visit_var_binding_(self, binding):
        att = self.matches.get(binding.var)
        if att is None:
            super().visit_var_binding_(binding)
            return
        q = self.visit_expr(att.q)
        if shape_of(att.q) != (att.rows, att.q_len, att.head_dim):
            q = self.builder_.emit(relax.op.reshape(q, (att.rows, att.q_len, att.head_dim)))
        args = [q, self._source(att.k), self._source(att.v)]
        if att.pos is not None:
            args.append(self.visit_expr(att.pos))
        if att.mask is not None:
            args.append(self.visit_expr(att.mask))
        out_ty = relax.TensorType((att.rows, att.q_len, att.head_dim), "float32")
        out = relax.call_tir(self._kernel(att), args, out_ty)
        if tuple(att.out_shape) != (att.rows, att.q_len, att.head_dim):
            out = relax.op.reshape(self.builder_.emit(out), att.out_shape)
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, out))


@tvm.transform.module_pass(opt_level=0, name="FuseAttention")
class FuseAttention:  # pylint: disable=too-few-public-methods
    """Replace each imported attention with one fused TIR kernel (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _AttentionRewriter(mod)
        per_function = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            g = Graph(func)
            rewriter.matches = {}
            for var, value in g.var2val.items():
                att = match_attention(g, value)
                if att is not None:
                    rewriter.matches[var] = att
            per_function[gv.name_hint] = len(rewriter.matches)
            if rewriter.matches:
                new_func = relax.analysis.remove_all_unused(rewriter.visit_expr(func))
                rewriter.builder_.update_func(gv, new_func)
        return with_stats(rewriter.builder_.get(), "FuseAttention", fused=sum(per_function.values()),
                          per_function={k: v for k, v in sorted(per_function.items()) if v})
