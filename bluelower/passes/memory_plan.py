"""MemoryPlan: one activation arena per entry function, offsets from liveness.

Requires: the VM-lowering form right after ``CallTIRRewrite`` (every ``call_tir`` output
is an explicit ``R.builtin.alloc_tensor`` binding; no dataflow blocks). Runs *before*
TVM's ``StaticPlanBlockMemory``.

Ensures: every intermediate tensor (an ``R.builtin.alloc_tensor`` that does not escape
through the function's return value) is allocated as
``R.memory.alloc_tensor(arena, offset, shape, dtype)`` from one
``arena = R.memory.alloc_storage(R.shape([arena_bytes]), ...)`` bound at the top of the
function. Outputs keep their own allocations. ``StaticPlanBlockMemory`` then finds
nothing left to plan. The plan (arena bytes, the liveness lower bound, compact offsets) is
recorded per function in the pass statistics and in the module's result ``memory_plan``,
which the compile driver writes to ``manifest.json`` (``memory_plan``).

Why our own planner rather than reading StaticPlanBlockMemory's result: TVM's planner
works on *storage tokens*: a freed token is reused whole by a later tensor (growing it if
needed), but two small tensors can never share one big freed token, and tokens never
become an offset layout in one buffer. It therefore cannot reach the liveness lower
bound and gives one ``alloc_storage`` per token. This pass places tensors by offset in
one arena with the greedy-by-size best-fit heuristic (TFLite's "greedy by size", also
used by MNN/ONNX Runtime): take tensors from the largest down; put each at the lowest-
waste gap among the tensors already placed whose live intervals overlap its own. On the
BlueLM-V functions it lands within a few percent of the lower bound (docs/memory.md),
while TVM's token plan (still computed, as ``tvm_static_plan_bytes``, for comparison)
is larger.

Liveness: a tensor is live from its ``alloc_tensor`` binding to the last binding that uses
it or any alias of it (the result of every binding that is not an allocation is treated
as a possible view of the tensors it reads: ``x = y``, tuples, ``R.reshape``, packed calls).
Intervals are inclusive, so a kernel never writes into a buffer one of its inputs uses.
Sizes are rounded up to 64 bytes (TVM's allocation alignment) and offsets are multiples
of 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax

from .instruments import with_stats
from .ir_utils import with_result

ALIGN = 64
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
               "uint8": 1, "uint32": 4, "bool": 1, "float64": 8, "uint16": 2}


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass
class PlannedTensor:
    name: str
    shape: tuple
    dtype: str
    nbytes: int  # aligned
    start: int  # binding index of the allocation
    end: int  # binding index of the last use (inclusive)
    offset: int = -1

    def overlaps(self, other: "PlannedTensor") -> bool:
        return self.start <= other.end and other.start <= self.end


# ------------------------------------------------------------------ liveness analysis


def _bindings(func: relax.Function):
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return [], body
    return [b for block in body.blocks for b in block.bindings], body.body


def _is_op(call, name: str) -> bool:
    return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == name


def _used_vars(expr) -> list:
    out = []
    relax.analysis.post_order_visit(expr, lambda e: out.append(e) if isinstance(e, relax.Var) else None)
    return out


def _shape_dtype(call) -> tuple | None:
    """Static ``(shape, dtype)`` of an allocation, or None (symbolic shape: not planned)."""
    shape = call.args[0]
    if not isinstance(shape, relax.ShapeExpr) or not all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
        return None
    return tuple(int(v) for v in shape.values), str(call.args[1].value)


def nbytes_of(shape, dtype: str, dtype_bytes: dict | None = None) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    table = dict(DTYPE_BYTES, **(dtype_bytes or {}))
    return n * table[dtype]


def analyze(func: relax.Function, dtype_bytes: dict | None = None):
    """Tensors allocated by ``R.builtin.alloc_tensor`` with their live intervals.

    Returns ``(arena_tensors, output_tensors, alloc_bindings)``: tensors that stay inside
    the function, tensors reachable from the return value, and ``var -> tensor`` for the
    allocation bindings. ``dtype_bytes`` overrides the element size of a dtype (planning
    an fp32 graph as if its activations were fp16: ``{"float32": 2}``).
    """
    bindings, result = _bindings(func)
    tensors: dict[int, PlannedTensor] = {}
    alias: dict = {}  # relax.Var -> set of tensor ids
    alloc_of: dict = {}
    for i, b in enumerate(bindings):
        value = b.value
        if _is_op(value, "relax.builtin.alloc_tensor") and _shape_dtype(value) is not None:
            shape, dtype = _shape_dtype(value)
            tid = len(tensors)
            tensors[tid] = PlannedTensor(b.var.name, shape, dtype,
                                         align(nbytes_of(shape, dtype, dtype_bytes)), i, i)
            alias[b.var] = {tid}
            alloc_of[b.var] = tid
            continue
        used = _used_vars(value)
        for v in used:
            for tid in alias.get(v, ()):
                tensors[tid].end = max(tensors[tid].end, i)
        # Conservatively, any other value may be a view of the tensors it reads (``x = y``,
        # tuples and their items, ``R.reshape`` / VM reshape views, packed calls): it keeps
        # them alive and, when returned, makes them outputs. Kernel calls (destination
        # passing) bind an unused var, so this costs nothing for them.
        alias[b.var] = set().union(*(alias.get(v, set()) for v in used)) if used else set()
    escaping = set()
    for v in _used_vars(result):
        escaping |= alias.get(v, set())
    inner = [t for tid, t in tensors.items() if tid not in escaping]
    outputs = [t for tid, t in tensors.items() if tid in escaping]
    return inner, outputs, alloc_of, tensors


# ------------------------------------------------------------------ the planner


def greedy_by_size(tensors: list) -> int:
    """Assign ``offset`` to every tensor; return the arena size (bytes)."""
    placed: list[PlannedTensor] = []
    for t in sorted(tensors, key=lambda t: (-t.nbytes, t.start, t.name)):
        conflicts = sorted((p for p in placed if p.overlaps(t)), key=lambda p: p.offset)
        best, best_gap, prev_end = None, None, 0
        for p in conflicts:
            gap = p.offset - prev_end
            if gap >= t.nbytes and (best_gap is None or gap < best_gap):
                best, best_gap = prev_end, gap
            prev_end = max(prev_end, p.offset + p.nbytes)
        t.offset = prev_end if best is None else best
        placed.append(t)
    return max((t.offset + t.nbytes for t in tensors), default=0)


def liveness_lower_bound(tensors: list) -> int:
    """Max over program points of the bytes of the tensors alive there."""
    events: dict[int, int] = {}
    for t in tensors:
        events[t.start] = events.get(t.start, 0) + t.nbytes
        events[t.end + 1] = events.get(t.end + 1, 0) - t.nbytes
    live = peak = 0
    for point in sorted(events):
        live += events[point]
        peak = max(peak, live)
    return peak


def plan_function(func: relax.Function, dtype_bytes: dict | None = None) -> dict:
    """The plan of one function as a JSON-ready dict (tensors: [name, offset, bytes, start, end])."""
    inner, outputs, _alloc, _all = analyze(func, dtype_bytes)
    return _plan_dict(inner, outputs, greedy_by_size(inner))


def _plan_dict(inner, outputs, arena: int) -> dict:
    """The JSON-ready plan of placed tensors ``inner`` (offsets set) and the function's ``outputs``."""
    return {
        "arena_bytes": arena,
        "liveness_lower_bound_bytes": liveness_lower_bound(inner),
        "sum_of_sizes_bytes": sum(t.nbytes for t in inner),
        "outputs_bytes": sum(t.nbytes for t in outputs),
        "num_tensors": len(inner),
        "tensors": [[t.name, t.offset, t.nbytes, t.start, t.end] for t in sorted(inner, key=lambda t: t.start)],
        "outputs": [[t.name, t.nbytes, list(t.shape), t.dtype] for t in outputs],
    }


def tvm_static_plan_bytes(mod: tvm.IRModule, names) -> dict:
    """What StaticPlanBlockMemory makes the VM allocate per call of each function:
    ``{name: (storage token bytes, all bytes)}``; all = tokens + the tensors it leaves
    unplanned (outputs and what flows into them), each allocated on its own."""
    with tvm.transform.PassContext(opt_level=3):
        planned = relax.transform.StaticPlanBlockMemory()(mod)
    out = {}
    for name in names:
        tokens = unplanned = 0
        bindings, _ = _bindings(planned[name])
        for b in bindings:
            if _is_op(b.value, "relax.memory.alloc_storage"):
                tokens += int(b.value.args[0].values[0])
            elif _is_op(b.value, "relax.builtin.alloc_tensor") and _shape_dtype(b.value) is not None:
                unplanned += nbytes_of(*_shape_dtype(b.value))
        out[name] = (tokens, tokens + unplanned)
    return out


def apply_plan(func: relax.Function) -> tuple[relax.Function, dict]:
    """Rewrite ``func`` to allocate its intermediates from one arena; return it and the plan."""
    inner, outputs, alloc_of, tensors = analyze(func)
    arena_bytes = greedy_by_size(inner)
    plan_ids = {id(t) for t in inner}
    if not inner:
        return func, plan_function(func)
    arena = relax.Var("arena", relax.ObjectType())
    storage = relax.op.memory.alloc_storage(relax.ShapeExpr([arena_bytes]), 0, "global", "uint8")
    blocks = []
    first = True
    for block in func.body.blocks:
        new = [relax.VarBinding(arena, storage)] if first else []
        first = False
        for b in block.bindings:
            tid = alloc_of.get(b.var)
            if tid is not None and id(tensors[tid]) in plan_ids:
                t = tensors[tid]
                call = relax.op.memory.alloc_tensor(arena, t.offset, b.value.args[0], b.value.args[1], 0)
                new.append(relax.VarBinding(b.var, call))
            else:
                new.append(b)
        blocks.append(relax.BindingBlock(new))
    body = relax.SeqExpr(blocks, func.body.body)
    out = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
    return out, _plan_dict(inner, outputs, arena_bytes)


def _relax_callees(mod: tvm.IRModule, func: relax.Function) -> list:
    """Names of the Relax functions ``func`` calls (their allocations happen during the call)."""
    out = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar):
            if isinstance(mod[e.op], relax.Function) and e.op.name_hint not in out:
                out.append(e.op.name_hint)

    relax.analysis.post_order_visit(func.body, visit)
    return out


def _is_public(func: relax.Function) -> bool:
    return func.attrs is not None and "global_symbol" in func.attrs


#: per-call figures that are bytes requested from the VM's allocator (summed over callees)
REQUEST_KEYS = ("tvm_host_alloc_bytes", "vm_alloc_bytes")


def effective(plans: dict, name: str, key: str) -> int:
    """``key`` (arena / lower bound / host bytes) of ``name`` including the Relax functions it
    calls (e.g. PartitionForAPU's partitions).

    ``tvm_host_alloc_bytes`` (TVM's storage tokens) and ``vm_alloc_bytes`` (what this build's
    VM requests: the executed arena + outputs, or TVM's tokens) are *requests* per call:
    callees' requests add up.
    For the arena and the lower bound, callees run one after another, so their arenas share
    one region (the largest is what must exist); every callee's outputs are counted on top
    for the whole call (conservative: an output may die before the next call)."""
    p = plans[name]
    own = p.get(key, 0)
    callees = [c for c in p.get("callees", []) if c in plans and c != name]
    if key in REQUEST_KEYS:
        return own + sum(effective(plans, c, key) for c in callees)
    return (own + sum(plans[c]["outputs_bytes"] for c in callees)
            + max((effective(plans, c, key) for c in callees), default=0))


@tvm.transform.module_pass(opt_level=0, name="MemoryPlan")
class MemoryPlan:
    """Plan (and, with ``apply``, allocate) each entry function's intermediates in one arena.

    The plans (``{function: plan}``) are the module's result ``memory_plan``
    (``ir_utils.result``); ``dtype_bytes``: element-size overrides for planning only
    (``apply`` must be False then).
    """

    def __init__(self, entries, apply: bool = False, dtype_bytes: dict | None = None, compare_tvm: bool = True):
        self.entries = list(entries)
        self.apply = apply  # with dtype_bytes: the figures at those sizes, the arena run at the real ones
        self.dtype_bytes = dtype_bytes
        self.compare_tvm = compare_tvm

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        # entry functions, every Relax function they call, and every other public Relax
        # function a runtime calls directly (TileImagePatches' encode_image_embed /
        # encode_image_blocks: the host runtime runs those instead of encode_image)
        callees = {gv.name_hint: _relax_callees(mod, f) for gv, f in mod.functions.items()
                   if isinstance(f, relax.Function)}  # each function walked once (the 3B has ~80)
        called = {c for cs in callees.values() for c in cs}
        names = [gv.name_hint for gv, f in mod.functions.items()
                 if isinstance(f, relax.Function) and (gv.name_hint in self.entries or gv.name_hint in called
                                                       or _is_public(f))]
        tvm_bytes = tvm_static_plan_bytes(mod, names) if self.compare_tvm else {}
        stats, plans = {}, {}
        for name in names:
            gv = mod.get_global_var(name)
            if self.apply:
                original = mod[gv]
                func, executed = apply_plan(original)
                mod[gv] = func
                plan = plan_function(original, self.dtype_bytes) if self.dtype_bytes else executed
                plan["executed_arena_bytes"] = executed["arena_bytes"]  # the one arena the VM allocates per call
                # what the VM requests per call: the arena + each output, at the real element sizes
                plan["vm_alloc_bytes"] = executed["arena_bytes"] + executed["outputs_bytes"]
            else:
                plan = plan_function(mod[gv], self.dtype_bytes)
            plan["callees"] = callees[name]
            if name in tvm_bytes:
                plan["tvm_static_plan_bytes"], plan["tvm_host_alloc_bytes"] = tvm_bytes[name]
                if not self.apply:  # the VM runs TVM's storage tokens
                    plan["vm_alloc_bytes"] = plan["tvm_host_alloc_bytes"]
            plans[name] = plan
            stats[name] = {k: plan[k] for k in ("arena_bytes", "liveness_lower_bound_bytes", "sum_of_sizes_bytes",
                                                "outputs_bytes", "num_tensors", "tvm_static_plan_bytes",
                                                "tvm_host_alloc_bytes", "vm_alloc_bytes") if k in plan}
        return with_stats(with_result(mod, "memory_plan", plans), "MemoryPlan", functions=stats)
