"""QuantizeWeights: linear layers over weight parameters -> INT4 / INT8 kernels.

Requires: entry functions whose weights are parameters after ``num_input`` inputs, and
linear layers in the form FuseTransposeMatmul leaves them::

    y = R.call_tir(NT_matmul, (x, W), R.Tensor((M, N)))      # x [M, K], W [N, K] a parameter

Ensures: each such call becomes a call of the compiler's own kernel
(``bluelower.lowering.kernels``) over NEW parameters that replace ``W`` in the
function's signature (same position)::

    y = R.call_tir(int4_linear_MxNxK_g32, (x, W_int4_packed, W_int4_scales), R.Tensor((M, N)))

so no fp32 or dequantized weight exists at run time; dequantization happens in the
kernel's registers. Bias adds are left as they are.

A weight is converted only if every
use of it is such a linear layer. Shapes the kernels do not take directly are zero-padded
(``x`` padded along K with ``R.concat``, the output sliced back to N).

Decoder embedding tables (``language_model.*``, the token embedding) used only by lookups
``R.take(table, ids, axis=0)`` (both frontends import ``nn.Embedding`` / ONNX ``Gather``
so; ONNX also reads ``R.shape_of(table)``, which becomes the static shape) are stored
quantized in a row layout (INT4 + fp16 scale per group for ``w4a16*``,
INT8 + fp32 scale per row for ``w8``; ``quantized_params.choose_embedding_scheme``) and
the lookup becomes::

    e = R.call_tir(embedding_gather_int4_TxVxK_g32, (ids, T_rows_packed, T_rows_scales), R.Tensor((T, K)))

which checks every id is in ``[0, V)`` (run-time error otherwise) and dequantizes only
the rows it gathers (``lowering/kernels/embedding.py``).

In the ``a8`` modes (``--quant w4a8``, ``w4a8kv8``, ``w8a8``: the mode's ``activations`` is
``int8``) weights are stored in the ``k4`` layout and each linear layer becomes a per-token
activation quantization followed by an integer dot-product kernel
(``lowering/kernels/linear_a8.py``, the dot product of ``isa``)::

    q = R.call_tir(quantize_act_int8_MxK_s32, (x,), [int8 (M, K), float32 (M,), int32 (M, K/32)])
    y = R.call_tir(int4_a8_linear_MxNxK_g32_vnni, (q[0], q[1], q[2], W_int4_packed, W_int4_scales), ...)

one quantization per activation (q/k/v, gate/up share theirs, per dataflow block).

The parameter transform table (new parameter -> source weight, quantizer, args) is put
into ``table`` (``CompileOptions.extra["quantized_params"]`` in a build), where
``build.py`` finds it to convert weights tensor by tensor
(``bluelower.lowering.quant.params``). Which weights get which format is
:func:`~bluelower.lowering.quant.params.choose_scheme`.
"""

from __future__ import annotations

import functools

import numpy as np

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..lowering.kernels import embedding_gather, int4_a8_linear, int4_linear, int8_a8_linear, int8_linear, quantize_act_int8
from ..lowering.kernels.embedding import kernel_name as embedding_kernel_name
from ..lowering.quant.modes import DEFAULT_GROUP_SIZE, quant_mode
from ..lowering.quant.params import (EmbeddingScheme, ParamTransform, choose_embedding_scheme, choose_scheme,
                                     embedding_scheme, linear_scheme, sanitize, scheme_params)
from .instruments import with_stats
from .ir_utils import PARAM_NAMES, calls_where, count_var_uses, result, static_shape, with_result

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
_TAKE = tvm.ir.Op.get("relax.take")
_SHAPE_OF = tvm.ir.Op.get("relax.shape_of")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_OPAQUE = 8  # relay/relax OpPatternKind kOpaque: FuseOps leaves the kernel alone


@functools.lru_cache(maxsize=None)
def _nt_matmul(x_shape: tuple, n: int) -> tirx.PrimFunc:
    """The PrimFunc FuseTransposeMatmul generates for ``x[..., k] @ W[n, k]^T`` (float32)."""
    from tvm.script import relax as R

    k = x_shape[-1]
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor(x_shape, "float32"))
    w = relax.Var("w", R.Tensor((n, k), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w), out_dtype="float32"))
        bb.emit_func_output(y)
    mod = relax.transform.FuseTransposeMatmul()(bb.get())
    return next(f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc))


# The kernels depend only on their shapes: build each once per process, not once per layer
# (32 decoder layers x 7 linear layers x entries in BlueLM-V-3B; TVMScript parsing dominates).
_int4_linear = functools.lru_cache(maxsize=None)(int4_linear)
_int8_linear = functools.lru_cache(maxsize=None)(int8_linear)
_embedding_gather = functools.lru_cache(maxsize=None)(embedding_gather)
_int4_a8_linear, _int8_a8_linear, _quantize_act_int8 = int4_a8_linear, int8_a8_linear, quantize_act_int8  # (cached)


def _is_f32(expr) -> bool:
    return isinstance(expr.ty, relax.TensorType) and str(expr.ty.dtype) == "float32"


@tvm.transform.module_pass(opt_level=0, name="QuantizeWeights")
class QuantizeWeights:
    """Rewrite linear layers over weight parameters into INT4/INT8 kernel calls.

    ``quant``: a ``--quant`` mode (``lowering/quant/modes.py``; ``fp32`` changes nothing).
    ``group_size``: INT4 group size. ``roles``: the role of each weight (source name ->
    role, a dict or a function: the ModelSpec's ``weight_role``), which the mode maps to a
    format; without it every linear weight counts as a decoder linear (``mlp``) and every
    lookup table as the token embedding. ``weight_names``: Relax parameter name -> source
    weight name, for functions without ``bluelower.param_names`` (defaults to the Relax name).

    The conversion table (new parameter -> source weight, quantizer, args) is the module's
    result ``quantized_params`` (``ir_utils.result``); each rewritten function's
    ``bluelower.param_names`` lists its new parameters.

    ``isa``: the integer dot product of the ``a8`` modes' kernels (``kernels.DOT_ISAS``, from
    the build target: ``kernels.dot_isa``); ignored by the other modes.
    """

    def __init__(self, quant: str, group_size: int = DEFAULT_GROUP_SIZE, roles=None, weight_names: dict | None = None,
                 formats=None, isa: str = "generic"):
        self.quant = quant
        mode = quant_mode(quant)
        self.a8 = mode.activations == "int8"
        self.layout = mode.weight_layout
        self.isa = isa
        self.group_size = group_size
        self.roles = roles
        self.weight_names = weight_names or {}
        # formats(source, role, shape, use) -> FormatChoice | None, use "linear" | "table": the
        # per-weight decision (rules, a checkpoint's own quantized bits); default: the mode's
        self.formats = formats
        self.table = {}

    def _linear_scheme(self, source: str, role: str, n: int, k: int):
        if self.formats is None:
            return choose_scheme(role, n, k, self.quant, self.group_size)
        choice = self.formats(source, role, (n, k), "linear")
        return None if choice is None else linear_scheme(choice.kind, n, k, choice.group_size, choice.carry,
                                                         choice.search, layout=self.layout)

    def _table_scheme(self, source: str, role: str, rows: int, width: int):
        if self.formats is None:
            return choose_embedding_scheme(role, rows, width, self.quant, self.group_size)
        choice = self.formats(source, role, (rows, width), "table")
        return None if choice is None else embedding_scheme(choice.kind, rows, width, choice.group_size, choice.carry,
                                                            choice.search)

    def _role(self, source: str, default: str) -> str:
        if self.roles is None:
            return default
        return self.roles.get(source, "other") if isinstance(self.roles, dict) else self.roles(source)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _LinearRewriter(mod, self.isa if self.a8 else None)
        self.table = {}
        self._tables_seen = set()  # an embedding table shared by embed and decode is counted once
        stats = {"int4_layers": 0, "int8_layers": 0, "padded_layers": 0, "kept_fp32_layers": 0, "weights_quantized": 0,
                 "embedding_tables_quantized": 0, "int4_embedding_lookups": 0, "int8_embedding_lookups": 0,
                 "embedding_bytes_fp32": 0, "embedding_bytes_stored": 0}
        if self.a8:
            stats.update({"a8_layers": 0, "activation_quantizations": 0, "dot_isa": self.isa})
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or "num_input" not in func.attrs:
                continue
            new_func = self._rewrite_function(mod, rewriter, func, stats)
            if new_func is not None:
                rewriter.builder_.update_func(gv, new_func)
        if self.a8:
            stats["a8_layers"] = rewriter.a8_layers
            stats["activation_quantizations"] = rewriter.act_quantizations
        out = rewriter.builder_.get()
        out = _drop_unused_private_functions(out)
        if self.table:
            previous = result(out, "quantized_params", {})
            out = with_result(out, "quantized_params", {**previous, **{n: t.to_result() for n, t in self.table.items()}})
        return with_stats(out, "QuantizeWeights", **stats)

    def _rewrite_function(self, mod, rewriter, func: relax.Function, stats: dict):
        num_input = int(func.attrs["num_input"])
        weights = list(func.params[num_input:])
        uses = count_var_uses(func.body)
        linear_uses: dict = {}
        for call in _linear_calls(mod, func.body):
            w = call.args[1].fields[1]
            if any(w.same_as(p) for p in weights):
                linear_uses.setdefault(w, []).append(call)
        lookups: dict = {}
        shape_uses: dict = {}  # R.shape_of(table): the ONNX importer's negative-id wrap reads the table's rows
        for call in _embedding_lookups(func.body):
            if any(call.args[0].same_as(p) for p in weights):
                lookups.setdefault(call.args[0], []).append(call)
        for call in _shape_of_calls(func.body):
            if call.args[0] in lookups:
                shape_uses[call.args[0]] = shape_uses.get(call.args[0], 0) + 1
        sources = self._source_names(func, weights)
        plan = {}  # weight Var -> (scheme, [new Vars])
        new_params, new_names = [], []
        for w, source in zip(weights, sources):
            calls = linear_uses.get(w, [])
            looked_up = lookups.get(w, [])
            n_uses = uses.get(w, 0)
            # a weight is converted only if every use is a linear layer or a lookup; both (a tied
            # lm_head / token embedding) get both layouts
            if not (calls or looked_up) or len(calls) + len(looked_up) + shape_uses.get(w, 0) != n_uses:
                stats["kept_fp32_layers"] += len(calls)
                new_params.append(w)
                new_names.append(source)
                continue
            shape = static_shape(w)
            table = self._table_scheme(source, self._role(source, "embedding"), *shape) if looked_up else None
            linear = self._linear_scheme(source, self._role(source, "mlp"), *shape) if calls else None
            if (looked_up and table is None) or (calls and linear is None):
                stats["kept_fp32_layers"] += len(calls)
                new_params.append(w)
                new_names.append(source)
                continue
            schemes = [s for s in (table, linear) if s is not None]
            self._add_params(source, schemes, w, plan, new_params, new_names)
            if table is not None:
                stats[f"{table.kind}_embedding_lookups"] = stats.get(f"{table.kind}_embedding_lookups", 0) + len(looked_up)
                if source not in self._tables_seen:
                    self._tables_seen.add(source)
                    stats["embedding_tables_quantized"] += 1
                    stats["embedding_bytes_fp32"] += 4 * table.n * table.k
                    stats["embedding_bytes_stored"] += sum(int(np.prod(shp)) * np.dtype(dt).itemsize
                                                           for _, shp, dt in table.part_specs())
            if linear is not None:
                stats["weights_quantized"] += 1
                stats[f"{linear.kind}_layers"] = stats.get(f"{linear.kind}_layers", 0) + len(calls)
                if (linear.n_pad, linear.k_pad) != (linear.n, linear.k):
                    stats["padded_layers"] += len(calls)
        if not plan:
            return None
        rewriter.plan = plan
        body = rewriter.visit_expr(func.body)
        rewriter.plan = {}
        out = relax.Function(list(func.params[:num_input]) + new_params, body, func.ret_ty, func.is_pure, func.attrs)
        if PARAM_NAMES in func.attrs:  # keep the importers' name table in step with the signature
            out = out.with_attr(PARAM_NAMES, new_names)
        return out

    def _add_params(self, source, schemes, w, plan, new_params, new_names) -> None:
        """The quantized parameters replacing weight ``w`` (checkpoint name ``source``), one set
        per scheme (a lookup table's rows, a linear layer's blocks): new Relax vars in the
        signature, their conversions in ``self.table``; ``plan[w]`` maps "table" / "linear" to
        ``(scheme, vars)``."""
        plan[w] = {}
        for scheme in schemes:
            parts = scheme_params(source, scheme)
            new_vars = [relax.Var(sanitize(name), relax.TensorType(shape, dtype)) for name, shape, dtype, _ in parts]
            for name, _shape, _dtype, transform in parts:
                self.table[name] = transform
            plan[w]["table" if isinstance(scheme, EmbeddingScheme) else "linear"] = (scheme, new_vars)
            new_params.extend(new_vars)
            new_names.extend(name for name, *_ in parts)

    def _source_names(self, func: relax.Function, weights: list) -> list:
        """Checkpoint names of the weight parameters: the importers' ``bluelower.param_names``
        attribute when present, else the Relax name looked up in ``weight_names`` (also
        under a frontend prefix such as ONNX's ``m_``), else the Relax name itself."""
        if PARAM_NAMES in func.attrs and len(func.attrs[PARAM_NAMES]) == len(weights):
            return [str(n) for n in func.attrs[PARAM_NAMES]]
        out = []
        for w in weights:
            name = self.weight_names.get(w.name)
            if name is None and "_" in w.name:
                name = self.weight_names.get(w.name.split("_", 1)[1])
            out.append(name or w.name)
        return out


def _linear_calls(mod, body) -> list:
    """``call_tir(NT_matmul, (x, W))`` calls with 2-D static float32 ``x``, ``W`` a Var."""
    return calls_where(body, lambda c: _match_linear(mod, c) is not None)


def _embedding_lookups(body) -> list:
    """``R.take(T, ids, axis=0)`` with ``T`` a 2-D static float32 Var and integer ``ids`` of static shape."""
    return calls_where(body, _match_lookup)


def _shape_of_calls(body) -> list:
    return calls_where(body, lambda c: c.op.same_as(_SHAPE_OF) and isinstance(c.args[0], relax.Var))


def _match_lookup(call: relax.Call) -> bool:
    if not call.op.same_as(_TAKE) or len(call.args) != 2:
        return False
    table, ids = call.args
    if not isinstance(table, relax.Var) or not _is_f32(table) or int(call.attrs.axis) != 0:
        return False
    ts, ids_shape = static_shape(table), static_shape(ids)
    return (ts is not None and len(ts) == 2 and ids_shape is not None
            and str(ids.ty.dtype) in ("int32", "int64"))


def _match_linear(mod, call: relax.Call):
    if not call.op.same_as(_CALL_TIR) or not isinstance(call.args[0], relax.GlobalVar):
        return None
    args = call.args[1]
    if not isinstance(args, relax.Tuple) or len(args.fields) != 2:
        return None
    x, w = args.fields
    if not isinstance(w, relax.Var) or not (_is_f32(x) and _is_f32(w)):
        return None
    xs, ws = static_shape(x), static_shape(w)
    if xs is None or ws is None or len(xs) < 2 or len(ws) != 2 or xs[-1] != ws[1]:
        return None
    callee = mod[call.args[0]]
    if not isinstance(callee, tirx.PrimFunc):
        return None
    import tvm_ffi

    if not tvm_ffi.structural_equal(callee, _nt_matmul(xs, ws[0])):
        return None
    return x, w


@mutator
class _LinearRewriter(PyExprMutator):  # pylint: disable=abstract-method
    def __init__(self, mod, a8_isa: str | None = None):
        super().__init__(mod)
        self.mod = mod
        self.plan = {}
        self.a8_isa = a8_isa  # None: float activations
        self.act_memo = []  # [(x, k_pad, sum_group, (xq, sx, xs))] of the current block
        self.a8_layers = 0
        self.act_quantizations = 0

    def visit_dataflow_block_(self, block):  # pylint: disable=arguments-renamed
        self.act_memo = []  # a quantized activation is shared within its block only
        out = super().visit_dataflow_block_(block)
        self.act_memo = []
        return out

    def visit_binding_block_(self, block):  # pylint: disable=arguments-renamed
        self.act_memo = []
        out = super().visit_binding_block_(block)
        self.act_memo = []
        return out

    def _quantized_activation(self, x, m: int, scheme) -> tuple:
        """``(xq, sx, xs)`` of ``x`` [..., k] as [m, k] padded to ``scheme.k_pad`` (emitted once
        per activation, padding and sum group)."""
        sg = scheme.group_size or 32
        key = self._value_source(x)
        for prev, k_pad, group, out in self.act_memo:
            if prev.same_as(key) and k_pad == scheme.k_pad and group == sg:
                return out
        xin = x
        if len(static_shape(x)) != 2:
            xin = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([m, scheme.k])))
        if scheme.k_pad != scheme.k:
            zeros = relax.op.zeros(relax.ShapeExpr([m, scheme.k_pad - scheme.k]), "float32")
            xin = self.builder_.emit(relax.op.concat([xin, zeros], axis=1))
        kernel = _quantize_act_int8(m, scheme.k_pad, sg)
        gv = self.builder_.add_func(kernel.with_attr("op_pattern", _OPAQUE), f"quantize_act_int8_{m}x{scheme.k_pad}_s{sg}")
        tys = [relax.TensorType((m, scheme.k_pad), "int8"), relax.TensorType((m,), "float32"),
               relax.TensorType((m, scheme.k_pad // sg), "int32")]
        t = self.builder_.emit(relax.call_tir(gv, relax.Tuple([xin]), tys))
        out = tuple(self.builder_.emit(relax.TupleGetItem(t, i)) for i in range(3))
        self.act_memo.append((key, scheme.k_pad, sg, out))
        self.act_quantizations += 1
        return out

    def _value_source(self, x):
        """``x`` with the reshapes it is bound to looked through: the importers reshape a 3-D
        activation once per linear layer (q/k/v of a ViT block), the same values each time."""
        while isinstance(x, relax.Var):
            bound = self.lookup_binding(x)
            if not (isinstance(bound, relax.Call) and bound.op.same_as(_RESHAPE)):
                break
            x = bound.args[0]
        return x

    def _a8_kernel(self, m: int, scheme):
        n, k, g, isa = scheme.n_pad, scheme.k_pad, scheme.group_size, self.a8_isa
        if scheme.kind in ("int4", "int4_asym"):
            asym = scheme.kind == "int4_asym"
            return _int4_a8_linear(m, n, k, g, asym=asym, isa=isa), \
                f"int4_a8_linear_{m}x{n}x{k}_g{g}" + ("_asym" if asym else "") + f"_{isa}"
        if scheme.kind == "int8_group":
            return _int8_a8_linear(m, n, k, g, isa=isa), f"int8_a8_linear_{m}x{n}x{k}_g{g}_{isa}"
        return _int8_a8_linear(m, n, k, isa=isa), f"int8_a8_linear_{m}x{n}x{k}_{isa}"

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # pylint: disable=arguments-renamed
        if self.plan and _match_lookup(call) and "table" in self.plan.get(call.args[0], {}):
            return self._lookup(call)
        if (self.plan and call.op.same_as(_SHAPE_OF)
                and "table" in self.plan.get(call.args[0], {})):  # static: the table's shape
            scheme = self.plan[call.args[0]]["table"][0]
            return relax.ShapeExpr([scheme.n, scheme.k])
        matched = _match_linear(self.mod, call) if self.plan else None
        if matched is None or "linear" not in self.plan.get(matched[1], {}):
            return super().visit_call_(call)
        x, w = matched
        scheme, new_vars = self.plan[w]["linear"]
        x = self.visit_expr(x)
        lead = static_shape(x)[:-1]  # e.g. ONNX keeps [1, 729, K]; the kernels take [M, K]
        m = int(np.prod(lead))
        if self.a8_isa is not None:
            xq, sx, xs = self._quantized_activation(x, m, scheme)
            kernel, name = self._a8_kernel(m, scheme)
            gv = self.builder_.add_func(kernel.with_attr("op_pattern", _OPAQUE), name)
            self.a8_layers += 1
            y = relax.call_tir(gv, relax.Tuple([xq, sx, xs, *new_vars]), relax.TensorType((m, scheme.n_pad), "float32"))
            if scheme.n_pad != scheme.n:
                y = relax.op.strided_slice(self.builder_.emit(y), axes=[1], begin=[0], end=[scheme.n])
            if len(lead) != 1:
                y = relax.op.reshape(self.builder_.emit(y), relax.ShapeExpr([*lead, scheme.n]))
            return y
        if len(lead) != 1:
            x = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([m, scheme.k])))
        if scheme.k_pad != scheme.k:
            zeros = relax.op.zeros(relax.ShapeExpr([m, scheme.k_pad - scheme.k]), "float32")
            x = self.builder_.emit(relax.op.concat([x, zeros], axis=1))
        g = scheme.group_size
        if scheme.kind == "int4":
            kernel = _int4_linear(m, scheme.n_pad, scheme.k_pad, g)
            name = f"int4_linear_{m}x{scheme.n_pad}x{scheme.k_pad}_g{g}"
        elif scheme.kind == "int4_asym":
            kernel = _int4_linear(m, scheme.n_pad, scheme.k_pad, g, asym=True)
            name = f"int4_linear_{m}x{scheme.n_pad}x{scheme.k_pad}_g{g}_asym"
        elif scheme.kind == "int8_group":
            kernel = _int8_linear(m, scheme.n_pad, scheme.k_pad, group_size=g)
            name = f"int8_linear_{m}x{scheme.n_pad}x{scheme.k_pad}_g{g}"
        else:
            kernel = _int8_linear(m, scheme.n_pad, scheme.k_pad)
            name = f"int8_linear_{m}x{scheme.n_pad}x{scheme.k_pad}"
        gv = self.builder_.add_func(kernel.with_attr("op_pattern", _OPAQUE), name)
        y = relax.call_tir(gv, relax.Tuple([x, *new_vars]), relax.TensorType((m, scheme.n_pad), "float32"))
        if scheme.n_pad != scheme.n:
            y = relax.op.strided_slice(self.builder_.emit(y), axes=[1], begin=[0], end=[scheme.n])
        if len(lead) != 1:
            y = relax.op.reshape(self.builder_.emit(y), relax.ShapeExpr([*lead, scheme.n]))
        return y


    def _lookup(self, call: relax.Call) -> relax.Expr:
        """``take(T, ids, axis=0)`` -> gather kernel over the quantized rows (ids flattened to 1-D)."""
        scheme, new_vars = self.plan[call.args[0]]["table"]
        ids = self.visit_expr(call.args[1])
        ids_shape = static_shape(ids)
        n_ids = int(np.prod(ids_shape)) if ids_shape else 1
        if len(ids_shape) != 1:
            ids = self.builder_.emit(relax.op.reshape(ids, relax.ShapeExpr([n_ids])))
        dtype = str(ids.ty.dtype)
        kind = scheme.format.gather_kind
        kernel = _embedding_gather(kind, scheme.n, scheme.k, n_ids, scheme.group_size or 32, scheme.k_pad, dtype)
        gv = self.builder_.add_func(kernel, embedding_kernel_name(kind, scheme.n, scheme.k, n_ids, scheme.group_size))
        y = relax.call_tir(gv, relax.Tuple([ids, *new_vars]), relax.TensorType((n_ids, scheme.k), "float32"))
        if len(ids_shape) != 1:
            y = relax.op.reshape(self.builder_.emit(y), relax.ShapeExpr([*ids_shape, scheme.k]))
        return y


def quantized_params(mod: tvm.IRModule) -> dict:
    """``new parameter name -> ParamTransform`` of every weight QuantizeWeights converted in ``mod``."""
    return {name: ParamTransform.from_result(r) for name, r in result(mod, "quantized_params", {}).items()}


def _drop_unused_private_functions(mod: tvm.IRModule) -> tvm.IRModule:
    """Remove the NT_matmul PrimFuncs no call refers to any more (entry functions kept)."""
    entries = [gv.name_hint for gv, f in mod.functions_items()
               if isinstance(f, relax.Function) and "global_symbol" in f.attrs]
    return relax.transform.DeadCodeElimination(entries)(mod)
