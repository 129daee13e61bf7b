"""FuseAttention: one TIR kernel per attention, matched by what it computes.

Requires: Relax straight from an importer (or after ``PlanKVCache``), before
``FuseTransposeMatmul`` and ``LegalizeOps``; static shapes, float32.

Matches ``O = matmul(P, V)`` with ``P = softmax(S, axis=-1)`` and

    S = matmul(Q, Kᵀ) · c   (+ mask)*

looking through the *views* the importers put between the pieces (no-op ``broadcast_to``,
reshapes, ``expand_dims`` and ``squeeze`` of the leading batch/head axes, casts to the same
dtype: e.g. TVM's own ``reshape(broadcast_to(x))`` around a 4-D matmul). One matcher per
piece:

* probabilities (:func:`_probabilities`): ``softmax(S, -1)``, also behind the exporters'
  fix-ups of rows masked everywhere: ``where(all(S == -inf, -1), 0, P)`` (torch.export's
  ``scaled_dot_product_attention`` decomposition) and ``where(isnan(P), 0, P)`` (the ONNX
  exporter's).
* scores (:func:`_scores`): ``matmul(Q, Kᵀ)``; constant factors (``* c``, ``/ c``, computed
  constants too) on the scores, on Q, on Kᵀ or on K (SDPA scales q and k by √scale each)
  multiply into the kernel's scale; masks above it, in any order and number:
  ``where(m, S, fill)`` / ``where(m, fill, S)`` (``masked_fill``, ``torch.where``; ``fill``
  ``-inf`` or <= -1e30 such as ``finfo.min``) and ``S + A`` (``A`` an additive float mask:
  an input, transformers' ``create_causal_mask``, ``triu(full(-inf), 1)``, SDPA's
  ``where(attn_mask, 0, -inf)``; ``where(m, 0, fill)`` counts as the boolean ``m``).
* K and V (:func:`_kv_source`): back to the tensor they are read from, through views, the
  GQA / MQA head repeat ``reshape(broadcast_to(expand_dims(x)))`` (transformers'
  ``repeat_kv``, SDPA's ``enable_gqa``, the model families' ``unsqueeze/expand/reshape``; on
  the K side behind the transpose), the transpose of K and constant ``take(x, i, axis=0)``
  (a layer / k-or-v slice of the KV cache). A K or V that does not trace back to a
  ``[batch?, kv_heads, S, D]`` tensor is read as the matmul sees it.
* causal (:func:`_causal`): a boolean mask "key s allowed iff s <= pos[t]" becomes the
  kernel's causal bound. When it reads no input (``tril`` / ``triu`` of ones, ``arange``
  comparisons as SDPA's ``is_causal`` decomposes, a constant buffer, transformers' causal
  mask of a static forward) it is evaluated at compile time (``ir_utils.ConstantEvaluator``)
  and ``pos`` is a constant; when it compares ``arange`` key positions with an integer
  vector of the function (``key_pos <= pos[:, None]``, also as ``~(key > pos)``,
  ``key - pos <= 0``, ``pos >= key``, ...) ``pos`` is that vector (plus an offset).

Every other mask shared by all heads and batches (right-aligned ``[.., T | 1, S | 1]``) is
the kernel's additive mask (booleans as ``where(m, 0, -inf)``, several summed).

Ensures: each match becomes ``R.call_tir(attention_kernel, (q, k_src, v_src[, pos][, mask]))``
(:func:`bluelower.lowering.kernels.attention.fused_attention`): block-wise online softmax,
one task per GQA group (the ``rep`` query heads sharing a KV head read each K/V row once);
K/V read from their source (the cache, un-repeated) through constant leading indices;
with a causal mask the kernel reads only keys ``0 .. pos[t]`` (a task of several query
positions: up to its largest ``pos``, the other rows' later keys masked to ``p = 0``). The
replaced operators are removed when nothing else uses them. Stats: ``fused`` (total),
``per_function`` and, when a softmax feeding a matmul is not matched, ``unmatched``: one
line per such attention, ``"<function>/<var>: <reason>"`` (a per-head mask, a fill that is
not -inf, a scale applied to an additive mask, ...). The kernels carry
``bluelower.kernel_args``; for ``--quant w4a16kv8`` ``QuantizeKVCache`` swaps those reading
the cache for their INT8 variants (dequantize on read).

One difference from the graph it replaces: a row whose keys are all masked (possible only
with an arbitrary mask, never with a causal one) is NaN in the kernel, 0 after SDPA's
fix-up.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..lowering.kernels.attention import fused_attention
from .instruments import with_stats
from .ir_utils import ConstantEvaluator, Graph, dtype_of, emit_like, shape_of

_NEG_FILL = -1e30  # a masked score: -inf, finfo(float32).min, or anything below this


class _NoMatch(Exception):
    """Why a softmax feeding a matmul is not a fusable attention (one line)."""


class _Match:
    """The graph of one function, with its compile-time evaluator."""

    def __init__(self, func: relax.Function):
        self.g = Graph(func)
        self.const = ConstantEvaluator(self.g)

    def call(self, expr, *ops):
        return self.g.call(expr, *ops)

    def scalar(self, expr) -> float | None:
        """The value of a one-element float expression known at compile time."""
        if shape_of(expr) is None or int(np.prod(shape_of(expr))) != 1:
            return None
        v = self.const(expr)
        return float(v.reshape(())) if v is not None and v.dtype.kind == "f" else None

    def is_fill(self, expr) -> bool:
        v = self.scalar(expr)
        return v is not None and v <= _NEG_FILL

    def is_zero(self, expr) -> bool:
        return self.scalar(expr) == 0.0


# --- views and constant factors -----------------------------------------------------------------


def _strip(m: _Match, expr, scale: list | None = None, leading: bool = True):
    """``expr`` through no-op broadcasts and casts and (``leading``) reshapes / expand_dims /
    squeeze of the leading axes, which keep the last two axes and the order of the rows; with
    ``scale`` (a one-element list) also through constant factors, multiplied into it."""
    while True:
        c = m.call(expr, "relax.broadcast_to", "relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.astype",
                   "relax.multiply", "relax.divide")
        if c is None:
            return expr
        src, out, name = shape_of(c.args[0]), shape_of(c), c.op.name
        if src is None or out is None:
            return expr
        if name in ("relax.multiply", "relax.divide"):
            if scale is None:
                return expr
            sides = ((0, 1), (1, 0)) if name == "relax.multiply" else ((0, 1),)
            x, k = next(((x, k) for x, k in sides if shape_of(c.args[x]) == out and m.scalar(c.args[k]) is not None),
                        (None, None))
            if x is None:
                return expr
            scale[0] *= m.scalar(c.args[k]) if name == "relax.multiply" else 1.0 / m.scalar(c.args[k])
            expr = c.args[x]
            continue
        if name in ("relax.broadcast_to", "relax.astype"):
            if src != out or dtype_of(c) != dtype_of(c.args[0]):
                return expr
            expr = c.args[0]
            continue
        if not leading or len(src) < 2 or len(out) < 2 or src[-2:] != out[-2:]:
            return expr
        if name == "relax.expand_dims" and any(int(a) % len(out) >= len(out) - 2 for a in c.attrs.axis):
            return expr
        if name == "relax.squeeze" and (c.attrs.axis is None or any(int(a) % len(src) >= len(src) - 2
                                                                      for a in c.attrs.axis)):
            return expr
        expr = c.args[0]


# --- K and V ----------------------------------------------------------------------------------


class _KVSource:
    """Where K (or V) is read from: ``root[prefix..., batch?, kv_head, s, d]`` (+ GQA ``rep``);
    ``new_axes``: emit ``permute_dims(root, new_axes)`` first (a K given transposed),
    ``reshape``: then reshape it to this shape (a K/V read as the matmul sees it)."""

    def __init__(self, root, prefix=(), rep=1, new_axes=None, reshape=None):
        self.root, self.prefix, self.rep = root, tuple(prefix), rep
        self.new_axes, self.reshape = new_axes, reshape

    def root_shape(self):
        if self.reshape is not None:
            return tuple(self.reshape)
        shape = shape_of(self.root)
        return tuple(shape[a] for a in self.new_axes) if self.new_axes is not None else shape

    def base_shape(self):
        return self.root_shape()[len(self.prefix):]


def _kv_source(m: _Match, expr, scale: list | None = None) -> _KVSource:
    """K (or V) ``[.., S, D]`` as the matmul reads it -> its un-repeated source."""
    rep = 1
    expr = _strip(m, expr, scale)
    while True:  # the head repeat: a size-1 axis just before [S, D] broadcast to rep
        b = m.call(expr, "relax.broadcast_to")
        src, out = (shape_of(b.args[0]), shape_of(b)) if b is not None else (None, None)
        if src is None or out is None or len(src) != len(out) or len(out) < 3:
            break
        if [i for i in range(len(out)) if src[i] != out[i]] != [len(out) - 3] or src[-3] != 1:
            break
        rep *= out[-3]
        expr = _strip(m, b.args[0], scale)
    prefix = []
    while True:  # constant slices of the leading axes (the KV cache's layer, k or v)
        take = m.call(expr, "relax.take")
        if take is None or int(take.attrs.axis) != 0:
            break
        i = m.g.static_int(take.args[1])
        src, out = shape_of(take.args[0]), shape_of(take)
        if i is None or src is None or out is None or len(src) != len(out) + 1:
            break
        prefix.insert(0, i % src[0])
        expr = _strip(m, take.args[0], scale, leading=False)
    return _KVSource(expr, prefix, rep)


def _key_source(m: _Match, kt, scale: list) -> _KVSource:
    """Kᵀ ``[.., D, S]`` as the matmul reads it -> the source of K ``[.., S, D]``."""
    kt = _strip(m, kt, scale)
    rank = len(shape_of(kt))
    perm = m.call(kt, "relax.permute_dims")
    if perm is not None:
        axes = [int(a) for a in perm.attrs.axes] if perm.attrs.axes is not None else list(range(rank))[::-1]
        swapped = axes[:-2] + [axes[-1], axes[-2]]
        if swapped == list(range(rank)):
            return _kv_source(m, perm.args[0], scale)
        return _KVSource(perm.args[0], new_axes=swapped)
    return _KVSource(kt, new_axes=list(range(rank - 2)) + [rank - 1, rank - 2])


def _as_read(operand, transposed: bool, rows: int) -> _KVSource:
    """The K / V operand itself, ``[rows, S, D]`` (no source to read from instead)."""
    shape = shape_of(operand)
    s, d = (shape[-1], shape[-2]) if transposed else shape[-2:]
    rank = len(shape)
    axes = list(range(rank - 2)) + [rank - 1, rank - 2] if transposed else None
    return _KVSource(operand, new_axes=axes, reshape=(rows, s, d))


def _kv_layout(src: _KVSource, rows: int):
    """``(kv_heads, batch)`` when ``src`` is ``[batch?, kv_heads, S, D]`` for ``rows`` query rows, else None."""
    base = src.base_shape()
    if len(base) not in (3, 4):
        return None
    kv_heads = base[-3]
    q_heads = kv_heads * src.rep
    if rows % q_heads:
        return None
    batch = rows // q_heads
    if len(base) == 4 and base[0] not in (1, batch) or len(base) == 3 and batch != 1:
        return None
    return kv_heads, batch


# --- probabilities, scores, masks ----------------------------------------------------------------


def _probabilities(m: _Match, probs):
    """P as the second matmul reads it -> ``softmax(S, -1)``; None when no softmax is near
    (no attention), :class:`_NoMatch` when P is a softmax changed in a way the kernel is not."""
    p = _strip(m, probs)
    fix = m.call(p, "relax.where")
    if fix is not None:  # the exporters' fix-ups of rows masked everywhere: 0, not NaN
        sm = m.call(_strip(m, fix.args[2]), "relax.nn.softmax")
        zeros = m.const(fix.args[1])
        isnan = m.call(fix.args[0], "relax.isnan")
        if sm is not None and zeros is not None and not zeros.any() and (
                _all_masked(m, fix.args[0], sm.args[0])  # torch.export's SDPA decomposition
                or isnan is not None and _strip(m, isnan.args[0]).same_as(fix.args[2])):  # the ONNX exporter's
            return sm
    sm = m.call(p, "relax.nn.softmax")
    if sm is None and _softmax_near(m, p):
        found = m.g.value(p)
        raise _NoMatch(f"the probabilities are a softmax changed by {found.op.name}, not softmax(S)")
    return sm


def _softmax_near(m: _Match, expr, depth: int = 3) -> bool:
    c = m.g.value(_strip(m, expr))
    if not isinstance(c, relax.Call) or not isinstance(c.op, tvm.ir.Op) or depth == 0:
        return False
    return c.op.name == "relax.nn.softmax" or any(_softmax_near(m, a, depth - 1) for a in c.args
                                                  if isinstance(a, relax.Expr) and shape_of(a) == shape_of(c))


def _all_masked(m: _Match, cond, scores) -> bool:
    """``cond`` is SDPA's ``not(any(not(scores == -inf), -1))``: the rows masked everywhere."""
    x = cond
    for name in ("relax.logical_not", "relax.max", "relax.logical_not", "relax.equal"):
        while m.call(x, "relax.astype") is not None:
            x = m.call(x, "relax.astype").args[0]
        c = m.call(x, name)
        if c is None or name == "relax.max" and [int(a) for a in c.attrs.axis] not in ([-1], [len(shape_of(c)) - 1]):
            return False
        x = c.args[0]
    return x.same_as(scores) and m.scalar(c.args[1]) == -math.inf


class _Mask:
    """One mask over the scores: a boolean ``cond`` (True: the key is allowed, or masked when
    ``blocked``; ``allowed``: its value when known at compile time) or an additive float tensor
    ``add``. ``tensor`` is the additive form the graph already has, if any."""

    def __init__(self, cond=None, blocked=False, add=None, allowed=None, tensor=None):
        self.cond, self.blocked, self.add, self.allowed, self.tensor = cond, blocked, add, allowed, tensor

    def expr(self):
        """The graph's expression of this mask (its shape is the mask's)."""
        return self.add if self.add is not None else self.tensor if self.tensor is not None else self.cond


def _reaches_qk(m: _Match, expr, depth: int = 12) -> bool:
    """``expr`` leads (through views, factors, masks) to a matmul: the scores side of an add."""
    for _ in range(depth):
        expr = _strip(m, expr, [1.0])
        c = m.call(expr, "relax.matmul", "relax.where", "relax.add")
        if c is None:
            return False
        if c.op.name == "relax.matmul":
            return True
        if c.op.name == "relax.add":
            return any(_reaches_qk(m, a, depth - 1) for a in c.args)
        expr = c.args[2] if m.is_fill(c.args[1]) else c.args[1]
    return False


def _additive(m: _Match, a) -> _Mask:
    """An additive mask term -> a boolean one when it only holds 0 and a fill."""
    w = m.call(_strip(m, a), "relax.where")
    if w is not None and m.is_zero(w.args[1]) and m.is_fill(w.args[2]):
        return _Mask(cond=w.args[0], tensor=a)
    if w is not None and m.is_fill(w.args[1]) and m.is_zero(w.args[2]):
        return _Mask(cond=w.args[0], blocked=True, tensor=a)
    value = m.const(a)
    if value is not None and value.dtype.kind == "f" and np.all((value == 0) | (value <= _NEG_FILL)):
        return _Mask(allowed=value == 0, tensor=a)
    return _Mask(add=a)


def _scores(m: _Match, s, masks: list, scale: list):
    """The softmax input -> its ``matmul(Q, Kᵀ)``; the masks above it go into ``masks``, the
    constant factors into ``scale``."""
    factored = False  # a factor seen above: it would scale an additive mask below it
    while True:
        s = _strip(m, s)
        c = m.call(s, "relax.where", "relax.add", "relax.multiply", "relax.divide", "relax.matmul")
        if c is None:
            found = m.g.value(s)
            name = found.op.name if isinstance(found, relax.Call) and isinstance(found.op, tvm.ir.Op) else "a parameter"
            raise _NoMatch(f"the softmax input is not Q·Kᵀ with masks ({name})")
        name = c.op.name
        if name == "relax.matmul":
            return c
        if name == "relax.where":
            cond, a, b = c.args
            if m.is_fill(a):
                masks.append(_Mask(cond=cond, blocked=True))
                s = b
            elif m.is_fill(b):
                masks.append(_Mask(cond=cond))
                s = a
            else:
                fill = m.scalar(a) if m.scalar(a) is not None else m.scalar(b)
                raise _NoMatch(f"a where() over the scores fills {fill if fill is not None else 'a tensor'} "
                               f"(not -inf or <= {_NEG_FILL:g})")
            continue
        if name == "relax.add":
            side = next((i for i in (0, 1) if _reaches_qk(m, c.args[i])), None)
            if side is None:
                raise _NoMatch("an add over the scores with no Q·Kᵀ side")
            masks.append(_additive(m, c.args[1 - side]))
            if factored and masks[-1].add is not None:
                raise _NoMatch("a constant factor multiplies an additive mask")
            s = c.args[side]
            continue
        factor = [1.0]
        stripped = _strip(m, s, factor)
        if stripped.same_as(s):
            raise _NoMatch(f"the scores are multiplied by a tensor, not a constant ({name})")
        if factor[0] <= 0:
            raise _NoMatch(f"a negative factor {factor[0]:g} on the scores")
        scale[0] *= factor[0]
        factored = True
        s = stripped


def _mask_shape_ok(shape, q_len: int, kv_len: int) -> bool:
    """Right-aligned broadcastable to ``[q_len, kv_len]``, shared by every head and batch."""
    if shape is None:
        return False
    lead = shape[:-2] if len(shape) >= 2 else ()
    return (all(d == 1 for d in lead) and shape[-1] in (1, kv_len)
            and (len(shape) < 2 or shape[-2] in (1, q_len)))


# --- the causal bound -----------------------------------------------------------------------------


def _causal_prefix(allowed: np.ndarray, q_len: int, kv_len: int):
    """``pos [T]`` when ``allowed`` (broadcast to [T, S]) is ``s <= pos[t]`` for every row, else None."""
    if any(d != 1 for d in allowed.shape[:-2]):
        return None
    a = np.broadcast_to(allowed.reshape(allowed.shape[-2:] if allowed.ndim >= 2 else (1,) + allowed.shape),
                        (q_len, kv_len))
    pos = a.sum(axis=-1) - 1
    if (pos < 0).any() or not np.array_equal(a, np.arange(kv_len)[None, :] <= pos[:, None]):
        return None
    return pos.astype("int64")


_CMP = {"relax.less_equal": (0, 1, 0), "relax.less": (0, 1, -1), "relax.greater_equal": (1, 0, 0),
        "relax.greater": (1, 0, -1)}  # op(a, b) == (x <= y + k): (index of x, index of y, k)


def _positional(m: _Match, cond, negated: bool, q_len: int, kv_len: int):
    """``(pos, offset)`` when ``cond`` (its negation) is ``key_pos <= pos[t] + offset`` with
    ``key_pos`` the constant ``arange(S)`` and ``pos`` an integer vector ``[T]`` of the function."""
    c = m.call(cond, "relax.logical_not", "relax.bitwise_not", "relax.logical_and", "relax.bitwise_and", *_CMP)
    if c is None:
        return None
    if c.op.name in ("relax.logical_not", "relax.bitwise_not"):
        return _positional(m, c.args[0], not negated, q_len, kv_len)
    if c.op.name in ("relax.logical_and", "relax.bitwise_and"):
        if negated:
            return None
        for i in (0, 1):
            other = m.const(c.args[1 - i])
            if other is not None and other.all():
                return _positional(m, c.args[i], False, q_len, kv_len)
        return None
    xi, yi, k = _CMP[c.op.name]
    x, y = c.args[xi], c.args[yi]
    if negated:  # not (x <= y + k)  ==  y <= x - k - 1
        x, y, k = y, x, -k - 1
    for side, other, sign in ((x, y, 1), (y, x, -1)):  # (a - b) <= y + k or x <= (a - b) + k
        sub = m.call(side, "relax.subtract")
        value = m.const(other)
        if sub is not None and value is not None and value.size == 1:
            a, b = sub.args
            x, y, k = (a, b, k + int(value.reshape(()))) if sign == 1 else (b, a, k - int(value.reshape(())))
            break
    keys = m.const(x)
    if keys is None or keys.shape[-1:] != (kv_len,) or any(d != 1 for d in keys.shape[:-1]):
        return None
    if not np.array_equal(keys.reshape(-1), np.arange(kv_len)):
        return None
    shape = shape_of(y)
    if shape is None or len(shape) < 2 or shape[-2:] != (q_len, 1) or any(d != 1 for d in shape[:-2]):
        return None
    while shape_of(y) != (q_len,):  # pos[:, None] -> pos
        c = m.call(y, "relax.expand_dims", "relax.reshape", "relax.broadcast_to")
        if c is None or int(np.prod(shape_of(c.args[0]) or (0,))) != q_len:
            return None
        y = c.args[0]
    return (y, k) if dtype_of(y).startswith("int") else None


def _causal(m: _Match, mask: _Mask, q_len: int, kv_len: int):
    """The causal bound of a boolean mask: ``("const", pos)``, ``("input", (pos, offset))`` or None."""
    allowed = mask.allowed
    if allowed is None:
        value = m.const(mask.cond)
        allowed = None if value is None else (~value.astype(bool) if mask.blocked else value.astype(bool))
        mask.allowed = allowed
    if allowed is not None:
        pos = _causal_prefix(allowed, q_len, kv_len)
        return None if pos is None else ("const", pos)
    found = _positional(m, mask.cond, mask.blocked, q_len, kv_len)
    return None if found is None else ("input", found)


# --- one attention -------------------------------------------------------------------------------


class Attention:
    """One matched attention and everything the kernel call needs."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def match_attention(m: _Match, out_call) -> Attention | None:
    """``out_call`` -> the attention it ends; None when it is no attention (no softmax feeds
    it); raises :class:`_NoMatch` (the reason) when it looks like one but is not fusable."""
    if not (isinstance(out_call, relax.Call) and isinstance(out_call.op, tvm.ir.Op) and out_call.op.name == "relax.matmul"):
        return None
    probs, v_used = out_call.args
    sm = _probabilities(m, probs)
    if sm is None:
        return None
    if int(sm.attrs.axis) not in (-1, len(shape_of(sm)) - 1):
        raise _NoMatch(f"softmax over axis {int(sm.attrs.axis)}, not the keys")
    masks, scale, k_scale = [], [1.0], [1.0]
    qk = _scores(m, sm.args[0], masks, scale)
    q = _strip(m, qk.args[0], scale)
    q_shape, out_shape = shape_of(q), shape_of(out_call)
    if q_shape is None or out_shape is None or len(q_shape) < 2:
        raise _NoMatch("Q has no static shape")
    if any(dtype_of(x) != "float32" for x in (q, qk.args[1], v_used, out_call)):
        raise _NoMatch(f"{dtype_of(q)} attention (the kernel is float32)")
    q_len, head_dim = q_shape[-2:]
    rows = int(np.prod(q_shape[:-2])) if len(q_shape) > 2 else 1
    kv_len = shape_of(sm)[-1]
    if out_shape[-2:] != (q_len, head_dim) or int(np.prod(out_shape)) != rows * q_len * head_dim:
        raise _NoMatch(f"V's head dim differs from Q's ({out_shape[-1]} vs {head_dim})")
    k_src, v_src = _key_source(m, qk.args[1], k_scale), _kv_source(m, v_used)
    for src, operand in ((k_src, qk.args[1]), (v_src, v_used)):
        op_rows = int(np.prod(shape_of(operand)[:-2]))
        if op_rows == 1 < rows:  # one K/V for every head (the matmul broadcasts it)
            src.rep *= rows
        elif op_rows != rows:
            raise _NoMatch(f"K/V with {op_rows} rows for {rows} query rows (broadcast over the batch)")
    k_lay, v_lay = _kv_layout(k_src, rows), _kv_layout(v_src, rows)
    if k_lay is None or v_lay is None or k_lay != v_lay or k_src.rep != v_src.rep:
        if any(int(np.prod(shape_of(x)[:-2])) != rows for x in (qk.args[1], v_used)):
            raise _NoMatch("K/V broadcast over the heads in a layout the kernel cannot read")
        k_src, v_src, k_scale = _as_read(qk.args[1], True, rows), _as_read(v_used, False, rows), [1.0]
        k_lay = v_lay = (rows, 1)
    if k_src.base_shape()[-2:] != (kv_len, head_dim) or v_src.base_shape()[-2:] != (kv_len, head_dim):
        raise _NoMatch(f"K / V shapes {k_src.base_shape()} / {v_src.base_shape()} do not match Q {q_shape}")
    kv_heads, _batch = k_lay
    causal, additive = None, []
    for mask in masks:
        x = mask.expr()
        if not _mask_shape_ok(shape_of(x), q_len, kv_len):
            raise _NoMatch(f"a per-head or per-batch mask {list(shape_of(x) or ())} (the kernel takes one "
                           f"[{q_len}, {kv_len}] mask for all heads)")
        if mask.add is not None:
            if dtype_of(mask.add) != "float32":
                raise _NoMatch(f"a {dtype_of(mask.add)} additive mask")
            additive.append(mask)
            continue
        bound = _causal(m, mask, q_len, kv_len) if causal is None else None
        if bound is not None:
            causal = bound
        else:
            additive.append(mask)
    mask_shape = None
    if additive:
        shapes = [shape_of(x.expr()) for x in additive]
        rank = max(len(s) for s in shapes)
        mask_shape = tuple(np.broadcast_shapes(*[(1,) * (rank - len(s)) + tuple(s) for s in shapes]))
    return Attention(q=q, k=k_src, v=v_src, causal=causal, additive=additive, mask_shape=mask_shape,
                     scale=scale[0] * k_scale[0], rows=rows, q_heads=kv_heads * k_src.rep, rep=k_src.rep, q_len=q_len,
                     head_dim=head_dim, kv_len=kv_len, out_shape=out_shape)


# --- the pass ----------------------------------------------------------------------------


@mutator
class _AttentionRewriter(PyExprMutator):  # pylint: disable=abstract-method
    def __init__(self, mod):
        super().__init__(mod)
        self.matches: dict = {}
        self.kernels: dict = {}

    def _kernel(self, att: Attention):
        key = (att.rows, att.q_heads, att.rep, att.q_len, att.head_dim, att.kv_len, att.k.root_shape(), att.k.prefix,
               att.v.root_shape(), att.v.prefix, att.scale, att.causal is not None, att.mask_shape)
        if key not in self.kernels:
            func = fused_attention(rows=att.rows, q_heads=att.q_heads, rep=att.rep, q_len=att.q_len,
                                   head_dim=att.head_dim, kv_len=att.kv_len, k_shape=att.k.root_shape(),
                                   k_prefix=att.k.prefix, v_shape=att.v.root_shape(), v_prefix=att.v.prefix,
                                   scale=att.scale, causal=att.causal is not None, additive_mask=att.mask_shape)
            self.kernels[key] = self.builder_.add_func(func, "fused_attention")
        return self.kernels[key]

    def _source(self, src: _KVSource):
        root = self.visit_expr(src.root)
        if src.new_axes is not None:
            root = self.builder_.emit(relax.op.permute_dims(root, src.new_axes))
        if src.reshape is not None and shape_of(root) != tuple(src.reshape):
            root = self.builder_.emit(relax.op.reshape(root, src.reshape))
        return root

    def _positions(self, att: Attention):
        kind, found = att.causal
        if kind == "const":
            return relax.const(found, "int64")
        pos, offset = found
        pos = self.visit_expr(pos)
        if dtype_of(pos) != "int64":
            pos = self.builder_.emit(relax.op.astype(pos, "int64"))
        if offset:
            pos = self.builder_.emit(relax.op.add(pos, relax.const(offset, "int64")))
        return pos

    def _mask_term(self, mask: _Mask):
        if mask.add is not None or mask.tensor is not None:
            return self.visit_expr(mask.add if mask.add is not None else mask.tensor)
        if mask.allowed is not None:
            return relax.const(np.where(mask.allowed, 0.0, -np.inf).astype("float32"))
        zero, fill = relax.const(0.0, "float32"), relax.const(-math.inf, "float32")
        cond = self.visit_expr(mask.cond)
        return self.builder_.emit(relax.op.where(cond, fill, zero) if mask.blocked else relax.op.where(cond, zero, fill))

    def visit_var_binding_(self, binding):
        att = self.matches.get(binding.var)
        if att is None:
            super().visit_var_binding_(binding)
            return
        q = self.visit_expr(att.q)
        if shape_of(att.q) != (att.rows, att.q_len, att.head_dim):
            q = self.builder_.emit(relax.op.reshape(q, (att.rows, att.q_len, att.head_dim)))
        args = [q, self._source(att.k), self._source(att.v)]
        if att.causal is not None:
            args.append(self._positions(att))
        if att.additive:
            mask = None
            for term in att.additive:
                x = self._mask_term(term)
                mask = x if mask is None else self.builder_.emit(relax.op.add(mask, x))
            args.append(mask)
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
        per_function, unmatched = {}, []
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            m = _Match(func)
            rewriter.matches = {}
            for var, value in m.g.var2val.items():
                try:
                    att = match_attention(m, value)
                except _NoMatch as why:
                    unmatched.append(f"{gv.name_hint}/{var.name}: {why}")
                    continue
                if att is not None:
                    rewriter.matches[var] = att
            per_function[gv.name_hint] = len(rewriter.matches)
            if rewriter.matches:
                new_func = relax.analysis.remove_all_unused(rewriter.visit_expr(func))
                rewriter.builder_.update_func(gv, new_func)
        stats = dict(fused=sum(per_function.values()), per_function={k: v for k, v in sorted(per_function.items()) if v})
        if unmatched:
            stats["unmatched"] = unmatched
        return with_stats(rewriter.builder_.get(), "FuseAttention", **stats)
