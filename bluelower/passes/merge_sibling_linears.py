"""MergeSiblingLinears: linear kernels that read the same activation -> one kernel call.

Requires: the quantized linear kernels of QuantizeWeights (``R.call_tir`` of a PrimFunc with
attr ``bluelower.kernel`` matching ``kernels.merge.LINEAR_KERNEL``), whose leading
``kernels.merge.activation_arity`` arguments are the activation (``x``, or the int8
``(xq, sx, xsum)`` of the ``a8`` modes).

Ensures: in every dataflow block, the calls of such kernels on the *same* activation
variables (a layer's q/k/v projections, its gate/up projections: found by what they read,
not by names) become one call of a merged kernel (``kernels.merge.merge_block_parallel``:
one parallel region over all their weight blocks) at the place of the first; each original
result is bound to its element of the merged call's tuple, so every later use is as before::

    q = R.call_tir(int4_linear_1x576x576, (x, Wq...), ...)        qkv = R.call_tir(merged, (x, Wq..., x, Wk..., x, Wv...),
    k = R.call_tir(int4_linear_1x192x576, (x, Wk...), ...)   ->                     [(1, 576), (1, 192), (1, 192)])
    v = R.call_tir(int4_linear_1x192x576, (x, Wv...), ...)        q = qkv[0]; k = qkv[1]; v = qkv[2]

Results are bit-identical (each weight block runs the same statements). Decode pays one
thread-pool launch and barrier per group instead of one per projection, and the VM one call;
unused per-projection kernels are removed. A group whose kernels are not block-parallel in
the form the merge takes is left as it was, with the reason in the pass statistics.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from ..lowering.kernels.merge import LINEAR_KERNEL, activation_arity, merge_block_parallel, merge_gated_pair
from .instruments import with_stats
from .ir_utils import Graph, count_var_uses, referenced_global_vars

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _kernel(mod, call) -> str | None:
    """The linear kernel ``call`` runs (its ``bluelower.kernel``), or None."""
    if not (isinstance(call, relax.Call) and call.op.same_as(_CALL_TIR)):
        return None
    gv = call.args[0]
    if not (isinstance(gv, relax.GlobalVar) and gv in mod.functions):
        return None
    func = mod[gv]
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or "bluelower.kernel" not in func.attrs:
        return None
    name = str(func.attrs["bluelower.kernel"])
    out = call.ty_args[0] if len(call.ty_args) else None
    if not LINEAR_KERNEL.match(name) or not isinstance(out, relax.TensorType):
        return None
    return name


class _Merger:
    def __init__(self, mod):
        self.mod = mod
        self.bb = relax.BlockBuilder(mod)
        self.merged: dict = {}  # tuple of kernel GlobalVars -> merged GlobalVar (or reason)
        self.groups = self.calls = self.gated = 0
        self.not_merged: dict = {}  # reason -> groups

    def _merged_kernel(self, gvs):
        key = tuple(gv.name_hint for gv in gvs)
        if key not in self.merged:
            funcs = [self.mod[gv] for gv in gvs]
            names = [str(f.attrs["bluelower.kernel"]) for f in funcs]
            name = f"{names[0]}_and_{len(names) - 1}"
            func = merge_block_parallel(funcs, name)
            self.merged[key] = func if isinstance(func, str) else self.bb.add_func(func, name)
        return self.merged[key]

    def _gated(self, block, members, readers):
        """For two siblings ``g``, ``u``: the bindings ``s = sigmoid(g); a = g * s`` (or
        ``a = silu(g)``) and ``h = a * u`` (either operand order) when nothing else reads
        ``g``, ``u``, ``s`` or ``a``: ``(gate member, up member, [their indices], h's index)``."""
        graph, uses = self.graph, self.uses

        def reader(var, op):
            found = [r for r in readers.get(var, []) if graph.call(r, op) is not None]
            return found[0] if found else None

        for gi, ui in ((0, 1), (1, 0)):
            g, u = block.bindings[members[gi]].var, block.bindings[members[ui]].var
            a = reader(g, "relax.nn.silu")
            chain = [a]
            if a is None or uses.get(g) != 1:
                s = reader(g, "relax.sigmoid")
                a = reader(s, "relax.multiply") if s is not None and uses.get(s) == 1 and uses.get(g) == 2 else None
                if a is None or not _same(graph.call(a, "relax.multiply").args, (g, s)):
                    continue
                chain = [s, a]
            h = reader(a, "relax.multiply")
            if h is None or uses.get(a) != 1 or uses.get(u) != 1 or not _same(graph.call(h, "relax.multiply").args, (a, u)):
                continue
            if [int(d) for d in h.ty.shape] != [int(d) for d in g.ty.shape] or str(h.ty.dtype) != "float32":
                continue
            where = {b.var: i for i, b in enumerate(block.bindings)}
            return members[gi], members[ui], [where[v] for v in chain], where[h]
        return None

    def _gated_kernel(self, gate_gv, up_gv):
        key = ("gated", gate_gv.name_hint, up_gv.name_hint)
        if key not in self.merged:
            gate, up = self.mod[gate_gv], self.mod[up_gv]
            name = f"{gate.attrs['bluelower.kernel']}_and_1_silu"
            func = merge_gated_pair(gate, up, name)
            self.merged[key] = func if isinstance(func, str) else self.bb.add_func(func, name)
        return self.merged[key]

    def _call(self, gv, calls, extra_outputs=()):
        """``(tuple var, binding)`` of one call of ``gv`` on every call's arguments, in order."""
        args = [a for c in calls for a in c.args[1].fields]
        call = self.bb.normalize(relax.call_tir(gv, relax.Tuple(args), [c.ty_args[0] for c in calls] + list(extra_outputs)))
        var = relax.DataflowVar(f"siblings{self.groups}", call.ty)
        return var, relax.VarBinding(var, call)

    def _note(self, reason: str) -> None:
        self.not_merged[reason] = self.not_merged.get(reason, 0) + 1

    def block(self, block):
        if not isinstance(block, relax.DataflowBlock):
            return block
        groups: dict = {}  # activation args -> [binding index]
        readers: dict = {}  # var -> the variables whose (call) values read it directly
        for i, binding in enumerate(block.bindings):
            if not isinstance(binding, relax.VarBinding):
                continue
            if isinstance(binding.value, relax.Call):
                for a in binding.value.args:
                    if isinstance(a, relax.Var):
                        readers.setdefault(a, []).append(binding.var)
            name = _kernel(self.mod, binding.value)
            if name is not None:
                args = binding.value.args[1].fields
                groups.setdefault((activation_arity(name) > 1,) + tuple(args[:activation_arity(name)]), []).append(i)
        emit_at: dict = {}  # binding index -> the bindings that replace it
        for members in groups.values():
            if len(members) < 2:
                continue
            gated = self._gated(block, members, readers) if len(members) == 2 else None
            if gated is not None:
                gi, ui, chain, hi = gated
                calls = [block.bindings[gi].value, block.bindings[ui].value]
                gv = self._gated_kernel(calls[0].args[0], calls[1].args[0])
                if isinstance(gv, str):
                    self._note(gv)
                    gated = None
            if gated is not None:  # g and u are read only by the fused SiLU: h is the one result
                h = block.bindings[hi].var
                var, binding = self._call(gv, calls, [h.ty])
                emit_at[members[0]] = [binding, relax.VarBinding(h, relax.TupleGetItem(var, 2))]
                for i in members[1:] + chain + [hi]:
                    emit_at[i] = []
                self.gated += 1
            else:
                calls = [block.bindings[i].value for i in members]
                gv = self._merged_kernel([c.args[0] for c in calls])
                if isinstance(gv, str):
                    self._note(gv)
                    continue
                var, binding = self._call(gv, calls)
                emit_at[members[0]] = [binding] + [relax.VarBinding(block.bindings[i].var, relax.TupleGetItem(var, k))
                                                   for k, i in enumerate(members)]
                for i in members[1:]:
                    emit_at[i] = []
            self.groups += 1
            self.calls += len(members)
        if not emit_at:
            return block
        return relax.DataflowBlock([b for i, binding in enumerate(block.bindings) for b in emit_at.get(i, [binding])])

    def function(self, func: relax.Function) -> relax.Function:
        body = func.body
        self.graph, self.uses = Graph(func), count_var_uses(body)
        blocks = [self.block(b) for b in body.blocks]
        if all(a.same_as(b) for a, b in zip(blocks, body.blocks)):
            return func
        seq = self.bb.normalize(relax.SeqExpr(blocks, body.body))  # its type, as the builder gives it
        return relax.Function(func.params, seq, func.ret_ty, func.is_pure, func.attrs)


@tvm.transform.module_pass(opt_level=0, name="MergeSiblingLinears")
class MergeSiblingLinears:  # pylint: disable=too-few-public-methods
    """Merge the linear kernel calls that read one activation (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        merger = _Merger(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                new = merger.function(func)
                if not new.same_as(func):
                    merger.bb.update_func(gv, new)
        out = merger.bb.get()
        before = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
        still = referenced_global_vars(out)
        removed = 0
        for gv in list(out.get_global_vars()):
            if gv.name_hint in before and isinstance(out[gv], tirx.PrimFunc) and gv.name_hint not in still \
                    and _is_linear(out[gv]):
                del out[gv]
                removed += 1
        stats = dict(groups=merger.groups, calls_merged=merger.calls, silu_fused=merger.gated,
                     merged_kernels=sum(1 for v in merger.merged.values() if not isinstance(v, str)),
                     kernels_removed=removed)
        if merger.not_merged:
            stats["not_merged"] = "; ".join(f"{n} group(s): {why}" for why, n in merger.not_merged.items())
        if not merger.groups and not merger.not_merged:
            stats["reason"] = "no linear kernels share an activation"
        return with_stats(out, "MergeSiblingLinears", **stats)


def _is_linear(func) -> bool:
    return func.attrs is not None and "bluelower.kernel" in func.attrs and bool(
        LINEAR_KERNEL.match(str(func.attrs["bluelower.kernel"])))


def _same(args, pair) -> bool:
    """``args`` are the two variables of ``pair`` in either order."""
    return len(args) == 2 and ((args[0].same_as(pair[0]) and args[1].same_as(pair[1]))
                               or (args[0].same_as(pair[1]) and args[1].same_as(pair[0])))

