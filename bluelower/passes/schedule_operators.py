"""ScheduleOperators: predict when each APU partition and CPU segment runs on the SoC.

Requires: PartitionForAPU has run (APU partitions are functions with
``bluelower.unit = "apu"``; a SoC without an APU has none); static shapes.

Ensures: the module is unchanged. ``sink["schedule"]`` receives the predicted schedule of
one request (``Schedule.to_dict()`` plus ``summary``): a networkx DAG whose tasks are

* per entry call, its **segments** in binding order: each call of an APU partition is an
  ``apu`` task, each maximal run of other operators between them a CPU task (any CPU
  cluster); edges follow the data dependencies between segments;
* **image encoding** (phase ``image_encode``) for ``image_grid`` (default one 2:4 image =
  8 local + 1 global = 9 patches) in batches of the compiled ``runtime.image_batch``
  (the last batch padded: shapes are static): ``encode_image_embed`` of batch k (the
  patch-embedding Conv2D, pinned to the CPU) then ``encode_image_blocks`` of batch k. The
  Conv2D of batch k+1 depends only on that of batch k, so it overlaps batch k's blocks;
* then one ``embed`` + ``prefill`` call (phase ``prefill``, one chunk) and one ``embed`` +
  ``decode`` call (phase ``decode``, one token).

Each task's FLOPs and DRAM bytes are computed from the IR (:func:`work_of_bindings`):
matmul and linear kernels ``2*M*N*K``, conv2d ``2 * out * Cin*kh*kw``, fused attention
``4*H*S*L*D``, every other operator one op per output element; bytes are what the
segment reads of its inputs (weights included: each call streams its weights; a fused
attention reads one layer of the KV cache, a cache write none of it) plus its outputs
(an in-place cache update writes only the new rows). Costs come
from the roofline model (:mod:`bluelower.targets.cost_model`), placement from the list
scheduler (:mod:`bluelower.targets.scheduler`). APU tasks compute at the APU's fp16 rate
(the precision rules of PartitionForAPU); CPU segments at the cluster's fp32 rate.
Stats: ``tasks``, ``apu_tasks``, ``makespan_s`` and the per-phase seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import tvm
from tvm import relax

from ..targets.cost_model import APU_UNIT, Work, cost, units_of
from ..runtime_stubs.image import patch_count
from ..targets.scheduler import add_task, list_schedule, summarize
from .instruments import with_stats
from .ir_utils import with_result

_MATMUL_KERNELS = ("NT_matmul", "matmul", "int4_linear", "int8_linear", "int4_a8_linear", "int8_a8_linear")
_ATTENTION_KERNELS = ("fused_attention",)
#: APU tasks compute at the first of these rates the APU has (float activations -> fp16;
#: an APU whose float kinds list only bf16 or fp32 computes its partitions in that dtype).
APU_COMPUTE_DTYPES = ("fp16", "bf16", "int16", "int8", "fp32")
CPU_COMPUTE_DTYPES = ("fp32",)
DEFAULT_IMAGE_GRID = (2, 4)


def _shape(ty) -> list[int] | None:
    if isinstance(ty, relax.TensorType) and ty.shape is not None:
        try:
            return [int(d) for d in ty.shape]
        except (TypeError, ValueError):
            return None
    return None


def _nbytes(ty) -> float:
    if isinstance(ty, relax.TupleType):
        return sum(_nbytes(f) for f in ty.fields)
    shape = _shape(ty)
    if shape is None:
        return 0.0
    return math.prod(shape) * tvm.runtime.DataType(str(ty.dtype)).bits / 8


def _elems(ty) -> float:
    shape = _shape(ty)
    return float(math.prod(shape)) if shape is not None else 0.0


def binding_flops(value, out_ty) -> float:
    """Operations of one binding (a multiply-add counts 2)."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return 0.0
    name = value.op.name
    out = _elems(out_ty)
    if name == "relax.call_tir" or name == "relax.call_tir_inplace":
        kernel = value.args[0].name_hint
        args = list(value.args[1].fields) if isinstance(value.args[1], relax.Tuple) else [value.args[1]]
        if kernel.startswith(_MATMUL_KERNELS):
            k = (_shape(args[0].ty) or [1])[-1]
            return 2.0 * out * k
        if kernel.startswith(_ATTENTION_KERNELS):
            q, kv = _shape(args[0].ty), _shape(args[1].ty)
            if q and kv:
                return 4.0 * math.prod(q[:-1]) * kv[-2] * q[-1]
        return out
    if name == "relax.matmul":
        k = (_shape(value.args[0].ty) or [1])[-1]
        return 2.0 * out * k
    if name == "relax.nn.conv2d":
        w = _shape(value.args[1].ty) or [1, 1, 1, 1]
        return 2.0 * out * math.prod(w[1:])
    return out


def _call_args(value) -> list:
    if isinstance(value.args[1], relax.Tuple):
        return list(value.args[1].fields)
    return [value.args[1]]


def _read_bytes(value, arg) -> float:
    """DRAM bytes ``value`` reads of its argument ``arg``.

    A gather (embedding lookup, also QuantizeWeights' ``embedding_gather`` kernel over a
    quantized table) reads only the rows it returns; a KV-cache write
    (call_tir_inplace) reads none of the cache it updates; a fused
    attention over the 5-D cache ``[layers, 2, kv_heads, capacity, head_dim]`` reads one
    layer's keys (or values), not the whole cache; everything else reads the whole tensor.
    """
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
        name = value.op.name
        if name == "relax.call_tir_inplace":
            args = _call_args(value)
            inplace = {int(i) for i in value.attrs.inplace_indices}
            if any(args[i].same_as(arg) for i in inplace if 0 <= i < len(args)):
                return 0.0
        if name == "relax.take" and value.args[0].same_as(arg):  # a gather reads only the rows it takes
            return _nbytes(value.ty)
        if (name == "relax.call_tir" and value.args[0].name_hint.startswith("embedding_gather")
                and any(a.same_as(arg) for a in _call_args(value)[1:])):  # quantized table: only the gathered rows
            shape = _shape(arg.ty)
            rows = _shape(value.ty)
            if shape and rows:
                return _nbytes(arg.ty) / shape[0] * rows[0]
        if name == "relax.call_tir" and value.args[0].name_hint.startswith(_ATTENTION_KERNELS):
            shape = _shape(arg.ty)
            if shape is not None and len(shape) == 5:
                return math.prod(shape[2:]) * tvm.runtime.DataType(str(arg.ty.dtype)).bits / 8
    return _nbytes(arg.ty)


def _written_in_place(bindings) -> set:
    return {b.var for b in bindings if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)
            and b.value.op.name == "relax.call_tir_inplace"}


def work_of_bindings(bindings, inputs, outputs) -> tuple[float, float]:
    """``(flops, bytes)`` of a segment: its bindings' operations; the bytes they read of the
    segment's inputs (:func:`_read_bytes`, the most any one binding reads) and the bytes of
    its outputs (an in-place cache update writes only its update, counted as read)."""
    flops = sum(binding_flops(b.value, b.var.ty) for b in bindings)
    readers: dict = {}  # var -> the bindings that read it (each binding's free vars computed once)
    for b in bindings:
        for u in relax.analysis.free_vars(b.value):
            readers.setdefault(u, []).append(b)
    by = 0.0
    for v in inputs:
        by += max((_read_bytes(b.value, v) for b in readers.get(v, ())), default=0.0)
    in_place = _written_in_place(bindings)
    by += sum(_nbytes(v.ty) for v in outputs if v not in in_place)
    return flops, by


def _is_apu_call(mod, value) -> bool:
    if not isinstance(value, relax.Call) or not isinstance(value.op, relax.GlobalVar):
        return False
    func = mod[value.op]
    return isinstance(func, relax.Function) and func.attrs is not None and func.attrs.get("bluelower.unit") == APU_UNIT


def segments(mod: tvm.IRModule, name: str) -> list[dict]:
    """The entry's segments in order: ``{"unit": "apu"|"cpu", "name", "flops", "bytes", "deps"}``."""
    func = mod[name]
    flat = [b for blk in func.body.blocks for b in blk.bindings]
    groups: list[tuple[str, list]] = []
    for b in flat:
        unit = "apu" if _is_apu_call(mod, b.value) else "cpu"
        if unit == "cpu" and not isinstance(b.value, relax.Call) and groups:
            groups[-1][1].append(b)  # aliases and tuple projections follow their producer
            continue
        if unit == "apu" or not groups or groups[-1][0] != "cpu":
            groups.append((unit, [b]))
        else:
            groups[-1][1].append(b)
    owner: dict = {}
    out = []
    last_use: dict = {}
    for i, (_u, bs) in enumerate(groups):
        for b in bs:
            for v in relax.analysis.free_vars(b.value):
                last_use[v] = i
    for v in relax.analysis.free_vars(func.body.body):
        last_use[v] = len(groups)
    apu_k = cpu_k = 0
    seen: dict[str, int] = {}
    for i, (unit, bs) in enumerate(groups):
        defined = {b.var for b in bs}
        inputs, deps = [], set()
        for b in bs:
            for v in relax.analysis.free_vars(b.value):
                if v not in defined and v not in inputs:
                    inputs.append(v)
                    if v in owner:
                        deps.add(owner[v])
        outputs = [b.var for b in bs if last_use.get(b.var, -1) > i]
        if unit == "apu":
            callee = mod[bs[0].value.op]
            inner = [b for blk in callee.body.blocks for b in blk.bindings]
            flops, by = work_of_bindings(inner, list(callee.params), [])
            by += sum(_nbytes(v.ty) for v in outputs)
            label = bs[0].value.op.name_hint
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:  # an identical layer calls the same partition again
                label = f"{label}.{seen[label] - 1}"
            ops = int(callee.attrs.get("bluelower.apu_ops", 0))
            apu_k += 1
        else:
            flops, by = work_of_bindings(bs, inputs, outputs)
            label = f"{name}_cpu{cpu_k}"
            ops = sum(1 for b in bs if isinstance(b.value, relax.Call))
            cpu_k += 1
        for b in bs:
            owner[b.var] = i
        out.append({"unit": unit, "name": label, "flops": flops, "bytes": by, "deps": sorted(deps), "ops": ops})
    return out


def _costs(soc, seg) -> dict[str, float]:
    units = units_of(soc)
    if seg["unit"] == "apu":
        work = Work(seg["flops"], seg["bytes"], APU_COMPUTE_DTYPES)
        only = [u for u in units if u.kind == "apu"]
    else:
        work = Work(seg["flops"], seg["bytes"], CPU_COMPUTE_DTYPES)
        only = [u for u in units if u.kind == "cpu"]
    out = {}
    for u in only:
        c = cost(work, u)
        if c is not None:
            out[u.name] = c.seconds
    return out


@dataclass(frozen=True)
class Request:
    """The entry calls of one request, by phase: ``image_stages`` run one after the other for
    each patch batch (TileImagePatches' ``<image>_embed`` then ``<image>_blocks``, or the one
    image entry when the module has no split), then each phase of ``text`` (a name and the
    entries it calls in order). Entries the module lacks are left out."""

    image_stages: tuple[str, ...] = ()
    image_entry: str | None = None
    text: tuple[tuple[str, tuple[str, ...]], ...] = ()


def build_operator_graph(mod: tvm.IRModule, soc, request: Request, image_batch: int, image_grid=DEFAULT_IMAGE_GRID):
    """The request's task DAG over the module's segments (see the module docstring)."""
    names = {gv.name_hint for gv in mod.get_global_vars()}
    g = nx.DiGraph()
    info = {"image_grid": list(image_grid) if image_grid else None, "image_batch": image_batch, "calls": {}}

    segments_of: dict = {}  # an entry called once per patch batch is segmented once

    def add_call(entry: str, tag: str, phase: str, after: list[str]) -> list[str]:
        """Add one call of ``entry``; its source tasks wait for ``after``; returns its sink tasks."""
        if entry not in segments_of:
            segments_of[entry] = segments(mod, entry)
        segs = segments_of[entry]
        task_names = [f"{tag}/{s['name']}" for s in segs]
        has_succ = set()
        for i, s in enumerate(segs):
            deps = [task_names[d] for d in s["deps"]]
            if not deps:
                deps = list(after)
            for d in s["deps"]:
                has_succ.add(d)
            costs = _costs(soc, s)
            if not costs:
                continue  # pragma: no cover - every SoC has a CPU cluster
            add_task(g, task_names[i], phase, costs, deps=deps, unit_kind=s["unit"], entry=entry,
                     flops=s["flops"], bytes=s["bytes"], ops=s["ops"])
        info["calls"][entry] = {"segments": len(segs), "apu_segments": sum(1 for s in segs if s["unit"] == "apu")}
        sinks = [task_names[i] for i in range(len(segs)) if i not in has_succ]
        return sinks or list(after)

    ends: list[str] = []
    if image_grid:
        patches = patch_count(tuple(image_grid)).total_patches
        batches = math.ceil(patches / image_batch)
        info.update(image_patches=patches, image_batches=batches)
        stages = list(request.image_stages)
        split = len(stages) == 2 and all(s in names for s in stages)
        prev_embed: list[str] = []
        prev_blocks: list[str] = []
        for k in range(batches):
            if split:
                # Conv2D of batch k+1 waits only for the Conv2D of batch k: it overlaps blocks k
                emb = add_call(stages[0], f"{stages[0]}[{k}]", "image_encode", prev_embed)
                blk = add_call(stages[1], f"{stages[1]}[{k}]", "image_encode", emb + prev_blocks)
                prev_embed, prev_blocks = emb, blk
            elif request.image_entry in names:
                prev_blocks = add_call(request.image_entry, f"{request.image_entry}[{k}]", "image_encode", prev_blocks)
        ends = prev_blocks
    for phase, calls in request.text:
        if all(c in names for c in calls):
            for i, c in enumerate(calls):
                tag = f"{c}[{phase}]" if i < len(calls) - 1 else f"{c}[0]"
                ends = add_call(c, tag, phase, ends)
    return g, info


@tvm.transform.module_pass(opt_level=0, name="ScheduleOperators")
class ScheduleOperators:
    """List-schedule the module's APU partitions and CPU segments (see the module docstring)."""

    def __init__(self, soc, request: "Request", image_batch: int = 1, image_grid=DEFAULT_IMAGE_GRID):
        self.soc, self.request, self.image_batch, self.image_grid = soc, request, image_batch, image_grid

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        g, info = build_operator_graph(mod, self.soc, self.request, self.image_batch, self.image_grid)
        units = [u.name for u in units_of(self.soc)]
        sched = list_schedule(g, units=units, title=f"operators on {self.soc.name}",
                              info={**info, "soc": self.soc.name})
        out = sched.to_dict()
        out["summary"] = summarize(sched)
        decode_s = out["summary"]["decode_s"]  # one decode step (several tasks)
        out["summary"]["decode_tokens_per_s"] = 1.0 / decode_s if decode_s > 0 else None
        mod = with_result(mod, "schedule", out)
        return with_stats(mod, "ScheduleOperators", tasks=len(sched.tasks),
                          apu_tasks=sum(1 for t in sched.tasks if t.unit == APU_UNIT), makespan_s=sched.makespan_s,
                          phase_seconds=sched.phase_seconds())
