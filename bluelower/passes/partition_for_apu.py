"""PartitionForAPU: outline the operators the SoC's APU supports into APU partitions.

Which operators the APU takes is data: :data:`RELAX_OP_KINDS` and :data:`TIR_KERNEL_KINDS`
map Relax operators and bluelower's own call_tir kernels to the operator kinds of the SoC
file (``[apu] ops``); the SoC file says which kinds the APU runs and in which dtypes. An
operator runs on the APU in the dtype given by the APU precision rules
(:func:`apu_kinds`, docs/apu-partitions.md):

* float tensors (fp32 on the host) are computed in the APU's float dtype for the
  operator's kinds: the first of fp16, bf16, fp32 the SoC file lists (``Apu.float_dtype``);
* a linear layer runs in its **weight** dtype: fp16 for float weights, ``int8`` for
  ``int8_linear`` kernels, ``int4`` for ``int4_linear`` kernels (``--quant w8 / w4a16``),
  so an APU that lists no ``int4`` for ``matmul`` keeps INT4 linear kernels on the CPU;
  the a8 modes' kernels likewise (``int4_a8_linear`` / ``int8_a8_linear``, and their
  activation quantization ``quantize_act_int8`` as an ``int8`` matmul's input stage);
* an operator kind may have alternatives (the fused attention kernel is ``attention`` or,
  decomposed as the vendor stacks do, ``matmul, multiply, add, softmax, matmul``): the
  first alternative whose every kind the APU supports in that dtype is taken.

Requires: entry functions (public Relax functions) whose bodies are dataflow blocks, after
QuantizeWeights (so kernels have their final dtypes); ``soc`` from the SoC file (or None).

Ensures: every maximal run of consecutive APU-supported bindings of a dataflow block that
holds at least one anchor operator (:data:`ANCHOR_KINDS`: matmul, conv2d, attention,
softmax, a norm, gather) becomes a private
Relax function ``<entry>_apu<k>`` with attributes ``bluelower.unit = "apu"``,
``bluelower.entry``, ``bluelower.apu_dtype``, ``bluelower.apu_ops`` (operator count) and
``bluelower.apu_op_kinds``; the entry calls it in place of the run. A run longer than
``apu.max_ops_per_graph`` operators is split. Partitions remain ordinary Relax, so the
CPU build compiles and runs them (EmulateAPUNumerics then adds the APU's rounding).
Functions in ``cpu_functions`` (the patch-embedding Conv2D stage, which the BlueLM-V
design runs on the CPU, overlapped with the APU's ViT blocks) and SoCs without an APU
get no partitions. Identical runs (two decoder layers of the same shapes) share one
partition function. Stats per entry: ``partitions`` (functions) and ``apu_calls``; in
total ``apu_ops`` (operators inside APU calls) and ``cpu_ops`` (operators outside).
The module gets one descriptor per partition as its result ``apu_partitions`` (the manifest's
``apu_partitions``; ``ir_utils.result``).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .instruments import with_stats
from .ir_utils import Substitute, is_entry, param_names, with_result

#: Relax operator -> APU operator-kind alternatives (each a tuple of kinds).
RELAX_OP_KINDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "relax.matmul": (("matmul",),),
    "relax.nn.conv2d": (("conv2d",),),
    "relax.add": (("add",),),
    "relax.subtract": (("subtract",),),
    "relax.multiply": (("multiply",),),
    "relax.divide": (("divide",),),
    "relax.nn.softmax": (("softmax",),),
    "relax.nn.layer_norm": (("layer_norm",),),
    "relax.nn.rms_norm": (("rms_norm",),),
    "relax.nn.gelu": (("gelu",),),
    "relax.nn.gelu_tanh": (("gelu",),),
    "relax.nn.silu": (("silu",),),
    "relax.concat": (("concat",),),
    "relax.reshape": (("reshape",),),
    "relax.expand_dims": (("reshape",),),
    "relax.squeeze": (("reshape",),),
    "relax.permute_dims": (("transpose",),),
    "relax.broadcast_to": (("reshape",),),  # a stride-0 view for a graph compiler
    "relax.take": (("gather",),),
    "relax.mean": (("mean",),),
    "relax.exp": (("exp",),),
    "relax.rsqrt": (("rsqrt",),),
    "relax.tanh": (("tanh",),),
    "relax.strided_slice": (("slice",),),  # QuantizeWeights slices a padded N back; RoPE's halves
    "relax.nn.pad": (("pad",),),
}

#: call_tir kernel name prefix -> kind alternatives (longest matching prefix wins).
TIR_KERNEL_KINDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "NT_matmul": (("matmul",),),
    "matmul": (("matmul",),),
    "int4_linear": (("matmul",),),
    "int8_linear": (("matmul",),),
    # the a8 modes: the per-token activation quantization is the int8 matmul's input stage
    "int4_a8_linear": (("matmul",),),
    "int8_a8_linear": (("matmul",),),
    "quantize_act_int8": (("matmul",),),
    "fused_attention": (("attention",), ("matmul", "multiply", "add", "softmax", "matmul")),
}

#: Chains of Relax operators (each consuming the previous one's result, directly or as a
#: field of a tuple argument) that form one APU operator kind: the decomposed RMSNorm
#: statistic x * rsqrt(mean(x^2) + eps), QuantizeWeights' K padding concat((x, zeros)), and
#: SiLU as torch.export decomposes it, x * sigmoid(x) (the multiply's other operand must be
#: the sigmoid's own input: :data:`COMPOSITE_CHECKS`).
COMPOSITE_KINDS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("relax.power", "relax.mean", "relax.add", "relax.rsqrt"), ("rms_norm",)),
    (("relax.zeros", "relax.concat"), ("pad",)),
    (("relax.sigmoid", "relax.multiply"), ("silu",)),
)


def _is_silu(chain) -> bool:
    """``multiply(x, sigmoid(x))`` in either operand order: the same ``x`` on both sides."""
    x = chain[0].value.args[0]
    others = [a for a in chain[1].value.args if not a.same_as(chain[0].var)]
    return len(others) == 1 and others[0].same_as(x)


#: kinds -> a check of the matched chain beyond "each consumes the previous".
COMPOSITE_CHECKS = {("silu",): _is_silu}

#: call_tir kernel name prefix -> the weight dtype the kernel's matmul runs in.
TIR_KERNEL_WEIGHT_DTYPE = {"int4_linear": "int4", "int8_linear": "int8", "int4_a8_linear": "int4",
                           "int8_a8_linear": "int8", "quantize_act_int8": "int8"}

#: APU precision rule for non-float tensors: TVM dtype -> the dtype the APU computes them in.
#: Float tensors (fp32 on the host) run in the APU's float dtype for the operator's kinds
#: (``Apu.float_dtype``: fp16 before bf16 before fp32, from the SoC file's ``[apu] ops``).
APU_TENSOR_DTYPE = {"int8": "int8", "int16": "int16", "int32": "int32"}
FLOAT_TENSOR_DTYPES = ("float32", "float16", "bfloat16")

#: A run becomes a partition only if it holds one of these kinds: a run of only
#: elementwise or layout operators is not worth the APU's per-call overhead.
ANCHOR_KINDS = frozenset({"matmul", "conv2d", "attention", "softmax", "layer_norm", "rms_norm", "gather"})

APU = "apu"


def _kernel_prefix(name: str, table) -> str | None:
    hits = [p for p in table if name.startswith(p)]
    return max(hits, key=len) if hits else None


def op_kind_alternatives(value) -> tuple[tuple[tuple[str, ...], ...], str | None] | None:
    """``(kind alternatives, weight dtype or None)`` of a binding's value, None if unmapped."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return None
    name = value.op.name
    if name == "relax.call_tir":
        kernel = value.args[0].name_hint
        prefix = _kernel_prefix(kernel, TIR_KERNEL_KINDS)
        if prefix is None:
            return None
        wprefix = _kernel_prefix(kernel, TIR_KERNEL_WEIGHT_DTYPE)
        return TIR_KERNEL_KINDS[prefix], (TIR_KERNEL_WEIGHT_DTYPE[wprefix] if wprefix else None)
    if name in RELAX_OP_KINDS:
        return RELAX_OP_KINDS[name], None
    return None


def _tensor_dtype(ty) -> str | None:
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _kinds_dtype(apu, kinds, out_dtype: str | None) -> str | None:
    """The dtype ``kinds`` computing a ``out_dtype`` tensor run in on ``apu`` (None: unsupported)."""
    if out_dtype in FLOAT_TENSOR_DTYPES:
        return apu.float_dtype(kinds)
    dtype = APU_TENSOR_DTYPE.get(out_dtype or "")
    return dtype if dtype and all(apu.supports(k, dtype) for k in kinds) else None


def apu_kinds(apu, value, out_ty) -> tuple[tuple[str, ...], str] | None:
    """The kinds and dtype ``value`` runs as on ``apu``, or None when it stays on the CPU.

    The dtype is the weight dtype for a quantized kernel (``int4``/``int8``; its matmul must
    list it, its other kinds need a float dtype), else the dtype the operator computes in
    (for float tensors the APU's float dtype for those kinds, see ``Apu.float_dtype``)."""
    mapped = op_kind_alternatives(value)
    if mapped is None:
        return None
    alternatives, weight_dtype = mapped
    out_dtype = _tensor_dtype(out_ty)
    for kinds in alternatives:
        if weight_dtype is not None:
            rest = [k for k in kinds if k != "matmul"]
            if all(apu.supports(k, weight_dtype) for k in kinds if k == "matmul") and \
                    (not rest or apu.float_dtype(rest) is not None):
                return kinds, weight_dtype
            continue
        dtype = _kinds_dtype(apu, kinds, out_dtype)
        if dtype is not None:
            return kinds, dtype
    return None


def activation_dtype(apu, value, out_ty) -> str | None:
    """The float dtype the APU rounds ``value``'s float result to (the precision rule that
    ``EmulateAPUNumerics`` emulates), None when it has no float activation on ``apu``.

    A quantized kernel's activations are in the float dtype its kinds list (A16W4, A16W8:
    ``matmul`` listing ``fp16`` gives fp16 activations)."""
    placed = apu_kinds(apu, value, out_ty)
    if placed is None:
        return None
    kinds, dtype = placed
    if dtype in ("int4", "int8") and op_kind_alternatives(value)[1] is not None:
        return apu.float_dtype(kinds)
    return dtype if dtype in ("fp16", "bf16", "fp32") else None


def _is_free(value) -> bool:
    """Bindings that call nothing (aliases, tuples, constants) join whatever run is open."""
    return not isinstance(value, relax.Call)


def _consumes(call, var) -> bool:
    """``call`` takes ``var`` as an argument or as a field of a tuple argument."""
    for a in call.args:
        if a.same_as(var) or (isinstance(a, relax.Tuple) and any(f.same_as(var) for f in a.fields)):
            return True
    return False


def composites(apu, bindings) -> dict[int, tuple[int, tuple[str, ...], str]]:
    """Public name of :func:`_composites` (EmulateAPUNumerics rounds a composite once)."""
    return _composites(apu, bindings)


def _composites(apu, bindings) -> dict[int, tuple[int, tuple[str, ...], str]]:
    """``{start index: (length, kinds, dtype)}`` of the :data:`COMPOSITE_KINDS` chains the APU runs."""
    found = {}
    for i in range(len(bindings)):
        for ops, kinds in COMPOSITE_KINDS:
            chain = bindings[i:i + len(ops)]
            if len(chain) < len(ops) or not all(
                isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op) and b.value.op.name == op
                for b, op in zip(chain, ops)
            ):
                continue
            if not all(_consumes(b.value, prev.var) for prev, b in zip(chain, chain[1:])):
                continue
            if kinds in COMPOSITE_CHECKS and not COMPOSITE_CHECKS[kinds](chain):
                continue
            dtype = _kinds_dtype(apu, kinds, _tensor_dtype(chain[-1].var.ty))
            if dtype:
                found[i] = (len(ops), kinds, dtype)
                break
    return found


def _plan_runs(apu, bindings) -> list[tuple[int, int, int, list[str], list[str]]]:
    """``(start, end, n_ops, kinds, dtypes)`` of each APU run (bindings[start:end])."""
    runs = []
    cur = None  # [start, n_ops, kinds, dtypes, last supported index]
    limit = apu.max_ops_per_graph
    composites = _composites(apu, bindings)

    def close():
        if cur is not None:
            start, n_ops, kinds, dtypes, last = cur
            if ANCHOR_KINDS & set(kinds):
                runs.append((start, last + 1, n_ops, kinds, dtypes))

    i = 0
    while i < len(bindings):
        b = bindings[i]
        step = 1
        if i in composites:
            step, kinds, dtype = composites[i]
            placed = (kinds, dtype)
        elif _is_free(b.value):
            i += 1
            continue
        else:
            placed = apu_kinds(apu, b.value, b.var.ty)
        if placed is None:
            close()
            cur = None
            i += 1
            continue
        kinds, dtype = placed
        if cur is not None and cur[1] + len(kinds) > limit:
            close()
            cur = None
        if cur is None:
            cur = [i, 0, [], [], i]
        cur[1] += len(kinds)
        cur[2].extend(kinds)
        cur[3].append(dtype)
        cur[4] = i + step - 1
        i += step
    close()
    return runs


def _run_dtype(dtypes: list[str]) -> str:
    """The partition's dtype label: its weight dtype when quantized, else its activation dtype."""
    for d in ("int4", "int8", "int16"):
        if d in dtypes:
            return d
    return max(set(dtypes), key=dtypes.count)


class _Partitioner:
    def __init__(self, bb: relax.BlockBuilder, apu, entry: str, func: relax.Function, sink: list | None):
        self.bb, self.apu, self.entry, self.func, self.sink = bb, apu, entry, func, sink
        self.count = 0  # partition functions created
        self.calls = 0  # APU graph calls (an identical layer reuses its partition function)
        self.apu_ops = 0
        self.reused: dict[str, dict] = {}
        num_input = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(func.params)
        names = param_names(func)
        self.weight_names = {p: n for p, n in zip(func.params[num_input:], names)}

    def rewrite(self) -> relax.Function:
        body = self.func.body
        if not isinstance(body, relax.SeqExpr):
            return self.func
        # linear order of bindings: a var used after a run is one of the run's outputs
        flat = [b for blk in body.blocks for b in blk.bindings]
        last_use: dict = {}
        for i, b in enumerate(flat):
            for v in relax.analysis.free_vars(b.value):
                last_use[v] = i
        for v in relax.analysis.free_vars(body.body):
            last_use[v] = len(flat)
        blocks, offset = [], 0
        for blk in body.blocks:
            bindings = list(blk.bindings)
            if isinstance(blk, relax.DataflowBlock):
                blocks.append(relax.DataflowBlock(self._rewrite_block(bindings, offset, last_use)))
            else:
                blocks.append(blk)
            offset += len(bindings)
        new_body = relax.SeqExpr(blocks, body.body)
        return relax.Function(self.func.params, new_body, self.func.ret_ty, self.func.is_pure, self.func.attrs)

    def _rewrite_block(self, bindings, offset, last_use):
        runs = _plan_runs(self.apu, bindings)
        out, pos = [], 0
        for start, end, n_ops, kinds, dtypes in runs:
            out.extend(bindings[pos:start])
            out.extend(self._outline(bindings[start:end], offset + end - 1, last_use, n_ops, kinds, dtypes))
            pos = end
        out.extend(bindings[pos:])
        return out

    def _outline(self, run, last_index, last_use, n_ops, kinds, dtypes):
        defined = [b.var for b in run]
        defined_set = set(defined)
        inputs = []
        for b in run:
            for v in relax.analysis.free_vars(b.value):
                if v not in defined_set and v not in inputs:
                    inputs.append(v)
        outputs = [v for v in defined if last_use.get(v, -1) > last_index]
        params = [relax.Var(self.weight_names.get(v, v.name).replace(".", "_"), v.ty) for v in inputs]
        sub = Substitute(dict(zip(inputs, params)))
        inner = [relax.VarBinding(b.var, sub.visit_expr(b.value)) for b in run]
        if len(outputs) == 1:
            ret = relax.Var("out", outputs[0].ty)
            inner.append(relax.VarBinding(ret, outputs[0]))
        else:
            ret = relax.Var("out", relax.TupleType([o.ty for o in outputs]))
            inner.append(relax.VarBinding(ret, relax.Tuple(outputs)))
        name = f"{self.entry}_apu{self.count}"
        dtype = _run_dtype(dtypes)
        func = relax.Function(params, relax.SeqExpr([relax.DataflowBlock(inner)], ret), ret.ty, True)
        func = func.with_attrs({"bluelower.unit": APU, "bluelower.entry": self.entry, "bluelower.apu_dtype": dtype,
                                "bluelower.apu_ops": n_ops, "bluelower.apu_op_kinds": sorted(set(kinds))})
        func = relax.utils.copy_with_new_vars(func)
        gv = self.bb.add_func(func, name)  # returns the existing function for an identical layer
        self.calls += 1
        self.apu_ops += n_ops
        if gv.name_hint != name:
            self.reused[gv.name_hint]["calls"] += 1
        else:
            self.count += 1
            desc = {
                "name": name, "entry": self.entry, "unit": APU, "dtype": dtype, "ops": n_ops, "calls": 1,
                "op_kinds": sorted(set(kinds)),
                "inputs": [{"name": p.name, "weight": self.weight_names.get(v),
                            "shape": [int(d) for d in v.ty.shape], "dtype": str(v.ty.dtype)}
                           for v, p in zip(inputs, params) if isinstance(v.ty, relax.TensorType)],
                "outputs": [{"shape": [int(d) for d in o.ty.shape], "dtype": str(o.ty.dtype)}
                            for o in outputs if isinstance(o.ty, relax.TensorType)],
            }
            self.reused[name] = desc
            if self.sink is not None:
                self.sink.append(desc)
        call = relax.Call(gv, inputs)
        if len(outputs) == 1:
            return [relax.VarBinding(outputs[0], call)]
        tup = relax.DataflowVar(f"{name}_out", relax.TupleType([o.ty for o in outputs]))
        return [relax.VarBinding(tup, call)] + [relax.VarBinding(o, relax.TupleGetItem(tup, i))
                                                 for i, o in enumerate(outputs)]


def count_ops(func: relax.Function) -> int:
    """Operator bindings (calls) of a Relax function; aliases and tuples are not operators."""
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return 0
    return sum(1 for blk in body.blocks for b in blk.bindings if isinstance(b.value, relax.Call))


@tvm.transform.module_pass(opt_level=0, name="PartitionForAPU")
class PartitionForAPU:
    """Outline APU-supported operator runs into ``<entry>_apu<k>`` functions (see module docstring)."""

    def __init__(self, apu=None, cpu_functions=()):
        self.apu = apu  # the SoC's Apu description (bluelower.targets.soc), or None: no partitions
        self.cpu_functions = tuple(cpu_functions)  # entries pinned to the CPU (the ModelSpec's cpu_entries)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        entries = sorted((gv for gv, f in mod.functions.items() if is_entry(f)), key=lambda gv: gv.name_hint)
        if self.apu is None:
            ops = sum(count_ops(mod[gv]) for gv in entries)
            return with_stats(with_result(mod, "apu_partitions", []), "PartitionForAPU", apu="none",
                              partitions={gv.name_hint: 0 for gv in entries},
                              apu_calls={gv.name_hint: 0 for gv in entries}, apu_ops=0, cpu_ops=ops)
        bb = relax.BlockBuilder(mod)
        descs: list = []
        rewritten, partitions, calls, apu_ops, cpu_ops = {}, {}, {}, 0, 0
        for gv in entries:
            func = mod[gv]
            total = count_ops(func)
            if gv.name_hint in self.cpu_functions:
                partitions[gv.name_hint] = 0
                cpu_ops += total
                continue
            p = _Partitioner(bb, self.apu, gv.name_hint, func, descs)
            rewritten[gv] = p.rewrite()
            partitions[gv.name_hint] = p.count
            calls[gv.name_hint] = p.calls
            apu_ops += p.apu_ops
            cpu_ops += count_ops(rewritten[gv]) - p.calls  # operators left outside the partitions
        out = bb.get()
        for gv, func in rewritten.items():
            out[gv] = func
        out = relax.transform.Normalize()(out)
        for desc in descs:  # the artifact a vendor NPU compiler takes (docs/apu-partitions.md)
            if desc["name"] in [gv.name_hint for gv in out.get_global_vars()] and "tvmscript" not in desc:
                desc["tvmscript"] = partition_tvmscript(out, desc["name"])
        out = with_result(out, "apu_partitions", descs)
        return with_stats(out, "PartitionForAPU", apu=self.apu.name, max_ops_per_graph=self.apu.max_ops_per_graph,
                          partitions=partitions, apu_calls=calls, apu_ops=apu_ops, cpu_ops=cpu_ops)


def apu_partitions(mod: tvm.IRModule) -> dict[str, relax.Function]:
    """The module's APU partitions by name."""
    return {gv.name_hint: f for gv, f in mod.functions.items()
            if isinstance(f, relax.Function) and f.attrs is not None and f.attrs.get("bluelower.unit") == APU}


def partition_tvmscript(mod: tvm.IRModule, name: str) -> str:
    """One partition as a self-contained TVMScript module (with the TIR kernels it calls)."""
    func = mod[name]
    funcs = {mod.get_global_var(name): func}
    for gv in relax.analysis.all_global_vars(func):
        if gv.name_hint in [g.name_hint for g in mod.get_global_vars()]:
            funcs[mod.get_global_var(gv.name_hint)] = mod[gv.name_hint]
    return tvm.IRModule(funcs).script(show_meta=False)
