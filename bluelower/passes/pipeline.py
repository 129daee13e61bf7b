"""The compile pipeline, as named phases in one readable list.

    import clean-up -> graph rewrites -> quantization -> partition/schedule
                    -> lowering -> VM lowering -> (TVM build)

Every entry is a :class:`PassSpec`: a name (what ``--disable-pass`` and ``--dump-ir`` use),
its phase, a one-line description (``bluelower passes``), a factory that builds the pass
from the :class:`BuildContext` with typed constructor arguments, or returns ``None`` when
it does not apply (the MLC-LLM ``X if cond else identity`` style, kept linear), and its
contract with the others as data:

* ``requires``: passes whose output it rewrites. Disabling one of them disables the
  dependant too (the manifest's pass list says why), unless the dependant is what the
  build asked for (``essential``: e.g. QuantizeWeights under ``--quant w4a16``), which is a
  one-line error naming both.
* ``after``: passes that must come before it when both run (checked on the list itself).
* ``required``: the build cannot do without it (lowering to the VM); disabling it is an error.

Passes report statistics and results by attaching them to the module
(``instruments.with_stats``, ``ir_utils.with_result``); :func:`run_pipeline` collects the
statistics per pass, in pipeline order, for ``manifest.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable

import tvm
from tvm import relax

from .. import progress
from ..errors import BlueLowerError
from ..lowering.quant.modes import DEFAULT_GROUP_SIZE, DEFAULT_QUANT, quant_mode
from .instruments import PipelineInstrument, count_bindings, dump_ir, pass_stats


@dataclass(frozen=True)
class BuildContext:
    """What the pipeline needs to know about the build; the factories turn it into each
    pass's constructor arguments."""

    target: "tvm.target.Target"
    quant: str = DEFAULT_QUANT
    group_size: int = DEFAULT_GROUP_SIZE
    soc: object = None  # bluelower.targets SoC description (None: no APU, no schedule)
    spec: object = None  # the model family's ModelSpec (lowering/models/registry.py)
    entry_functions: tuple = ()
    image_batch: int = 1  # the compiled patch batch of the image entry
    plan_dtype_bytes: dict | None = None  # MemoryPlan: element-size overrides (planning only)
    weight_formats: object = None  # QuantizeWeights: the per-weight format decision (quant.params.format_policy;
    # None: the mode's default recipe)
    image_grid: tuple | None = None  # ScheduleOperators: the image of the predicted request (default 2:4)
    # MemoryPlan allocates from its arena (AcceptBufferOffsets makes kernels take it); None: the
    # default, which is the arena unless --disable-pass leaves out one of ARENA_PASSES
    execute_memory_plan: bool | None = None


@dataclass(frozen=True)
class PassSpec:
    name: str
    phase: str
    description: str
    make: Callable[[BuildContext], "tvm.transform.Pass | None"]
    requires: tuple = ()
    after: tuple = ()
    required: bool = False
    essential: Callable[[BuildContext], bool] = lambda _ctx: False


# --- the pipeline ----------------------------------------------------------------


def _with_target(make):
    """Run a pass inside the build target's scope (dlight and LegalizeOps read it)."""

    def factory(ctx: BuildContext):
        inner = make(ctx)

        @tvm.transform.module_pass(opt_level=0, name=inner.info.name)
        def scoped(mod, _ctx):
            with ctx.target:
                return inner(mod)

        return scoped

    return factory


def _plan_kv_cache(_ctx):
    from .plan_kv_cache import PlanKVCache

    return PlanKVCache()


def _fuse_attention(_ctx):
    from .fuse_attention import FuseAttention

    return FuseAttention()


def _tile_image_patches(ctx: BuildContext):
    image_entry = getattr(ctx.spec, "image_entry", None)
    if image_entry is None:
        return None
    from .tile_image_patches import TileImagePatches

    return TileImagePatches(image_entry)


def _quantize_weights(ctx: BuildContext):
    if not quant_mode(ctx.quant).quantizes_weights:
        return None
    from .quantize_weights import QuantizeWeights

    from ..lowering.kernels import dot_isa

    from ..lowering.quant.params import format_policy

    roles = getattr(ctx.spec, "weight_role", None)
    # the formats a compile stores: its recipe's (default: the mode's default recipe)
    formats = ctx.weight_formats if ctx.weight_formats is not None else format_policy(ctx.quant,
                                                                                      group_size=ctx.group_size)
    return QuantizeWeights(ctx.quant, ctx.group_size, roles=roles, formats=formats, isa=dot_isa(ctx.target))


def _quantize_kv_cache(ctx: BuildContext):
    if quant_mode(ctx.quant).kv_cache != "int8":
        return None
    from .quantize_kv_cache import QuantizeKVCache

    return QuantizeKVCache()


def _apu(ctx: BuildContext):
    return getattr(ctx.soc, "apu", None)


def _partition_for_apu(ctx: BuildContext):
    if ctx.soc is None:
        return None
    from .partition_for_apu import PartitionForAPU

    return PartitionForAPU(_apu(ctx), cpu_functions=getattr(ctx.spec, "cpu_entries", ()))


def _schedule_operators(ctx: BuildContext):
    if ctx.soc is None:
        return None
    from .schedule_operators import DEFAULT_IMAGE_GRID, ScheduleOperators

    return ScheduleOperators(ctx.soc, request_of(ctx.spec), image_batch=ctx.image_batch,
                             image_grid=ctx.image_grid or DEFAULT_IMAGE_GRID)


def request_of(spec) -> "Request":
    """One request of the bundle's calling convention for ``spec``'s entries: the image in
    patch batches (TileImagePatches' two stages, or the image entry), then one prefill chunk
    (``embed`` + ``prefill``) and one decode step (``embed`` + ``decode``)."""
    from .schedule_operators import Request

    image = getattr(spec, "image_entry", None)
    stages = (f"{image}_embed", f"{image}_blocks") if image else ()
    return Request(image_stages=stages, image_entry=image,
                   text=(("prefill", ("embed", "prefill")), ("decode", ("embed", "decode"))))


def _emulate_apu_numerics(ctx: BuildContext):
    if _apu(ctx) is None:
        return None
    from .emulate_apu_numerics import EmulateAPUNumerics

    return EmulateAPUNumerics(_apu(ctx), weight_role=getattr(ctx.spec, "weight_role", None))


def _share_layer_kernels(_ctx):
    from .share_layer_kernels import ShareLayerKernels

    return ShareLayerKernels()


def _bound_take_indices(_ctx):
    from .bound_take_indices import BoundTakeIndices

    return BoundTakeIndices()


def _merge_sibling_linears(_ctx):
    from .merge_sibling_linears import MergeSiblingLinears

    return MergeSiblingLinears()


def _legalize_ops(_ctx):
    from .legalize import CachedLegalizeOps

    return CachedLegalizeOps()


def _memory_plan(ctx: BuildContext):
    from .memory_plan import MemoryPlan

    return MemoryPlan(ctx.entry_functions, dtype_bytes=ctx.plan_dtype_bytes, apply=ctx.execute_memory_plan)


def _accept_offsets(ctx: BuildContext):
    if not ctx.execute_memory_plan:
        return None
    from .accept_offsets import AcceptBufferOffsets

    return AcceptBufferOffsets()


def _quantizes(ctx: BuildContext) -> bool:
    return quant_mode(ctx.quant).quantizes_weights


def _int8_cache(ctx: BuildContext) -> bool:
    return quant_mode(ctx.quant).kv_cache == "int8"


def build_pipeline() -> list[PassSpec]:
    """The whole pipeline, in order. Passes that do not apply return None at build time."""
    T = relax.transform
    vm = dict(required=True)
    return [
        # import clean-up
        PassSpec("CanonicalizeBindings", "import-cleanup", "Remove trivial var-to-var bindings left by the importers.",
                 lambda c: T.CanonicalizeBindings()),
        PassSpec("DeadCodeElimination", "import-cleanup", "Drop unused bindings and functions (entry functions kept).",
                 lambda c: T.DeadCodeElimination(list(c.entry_functions))),
        # graph rewrites
        PassSpec("PlanKVCache", "graph-rewrites",
                 "Update the KV cache in place (write only the new rows), one persistent buffer.", _plan_kv_cache),
        PassSpec("FuseAttention", "graph-rewrites", "Replace each softmax(QK^T*scale+mask)V with one fused TIR kernel.",
                 _fuse_attention, after=("PlanKVCache",)),
        PassSpec("TileImagePatches", "graph-rewrites", "Split the image entry into a Conv2D stage and a ViT-blocks stage.",
                 _tile_image_patches),
        PassSpec("FuseTransposeMatmul", "graph-rewrites", "Fold permute_dims(W) into matmul so weights stay N x K.",
                 lambda c: T.FuseTransposeMatmul(), after=("FuseAttention",)),
        # quantization
        PassSpec("QuantizeWeights", "quantization", "Linear weights -> INT4/INT8 kernels over packed params (--quant).",
                 _quantize_weights, requires=("FuseTransposeMatmul",), essential=_quantizes),
        PassSpec("QuantizeKVCache", "quantization", "KV cache -> one INT8 buffer (per-token, per-head scales), "
                 "quantized on write, dequantized in attention (w4a16kv8).", _quantize_kv_cache,
                 requires=("PlanKVCache", "FuseAttention"), essential=_int8_cache),
        # partition/schedule
        PassSpec("PartitionForAPU", "partition/schedule", "Outline the operators the SoC's APU supports into APU partitions.",
                 _partition_for_apu, after=("QuantizeWeights", "QuantizeKVCache", "TileImagePatches")),
        PassSpec("ScheduleOperators", "partition/schedule",
                 "Predict the schedule of APU partitions and CPU segments (manifest 'schedule').", _schedule_operators,
                 requires=("PartitionForAPU",)),
        PassSpec("EmulateAPUNumerics", "partition/schedule",
                 "Round inside APU partitions as the SoC's APU would (fp16 activations, its accumulation).",
                 _emulate_apu_numerics, requires=("PartitionForAPU",)),
        # lowering
        PassSpec("ShareLayerKernels", "lowering", "Call one generic attention / KV-write kernel per shape, the layer as an argument.",
                 _share_layer_kernels, after=("QuantizeKVCache", "PartitionForAPU")),
        PassSpec("BoundTakeIndices", "lowering", "Gathers with run-time indices clamp them into range (take mode fast -> clip).",
                 _bound_take_indices),
        PassSpec("MergeSiblingLinears", "lowering",
                 "Linear kernels reading one activation (q/k/v, gate/up) -> one kernel, one parallel region.",
                 _merge_sibling_linears, after=("QuantizeWeights", "ShareLayerKernels")),
        PassSpec("LegalizeOps", "lowering", "Lower Relax operators to TIR PrimFuncs (each distinct call once).",
                 _with_target(_legalize_ops), **vm),
        PassSpec("AnnotateTIROpPattern", "lowering", "Classify each PrimFunc (elementwise, injective, reduction, ...).",
                 lambda c: T.AnnotateTIROpPattern()),
        PassSpec("FoldConstant", "lowering", "Evaluate operators whose inputs are all constants.",
                 lambda c: T.FoldConstant()),
        PassSpec("FuseOps", "lowering", "Group producer/consumer operators into fused functions.",
                 lambda c: T.FuseOps()),
        PassSpec("FuseTIR", "lowering", "Merge each fused group into one PrimFunc.", lambda c: T.FuseTIR()),
        PassSpec("AcceptBufferOffsets", "lowering",
                 "Kernels take tensors at an offset into a buffer (to run the planned arena).", _accept_offsets),
        # VM lowering
        PassSpec("RewriteDataflowReshape", "vm-lowering", "Turn reshapes into VM builtin views.",
                 lambda c: T.RewriteDataflowReshape()),
        PassSpec("ToNonDataflow", "vm-lowering", "Leave dataflow blocks.", lambda c: T.ToNonDataflow(), **vm),
        PassSpec("RemovePurityChecking", "vm-lowering", "Drop purity annotations.", lambda c: T.RemovePurityChecking(), **vm),
        PassSpec("CallTIRRewrite", "vm-lowering", "Make call_tir outputs explicit allocations.", lambda c: T.CallTIRRewrite(),
                 **vm),
        PassSpec("MemoryPlan", "vm-lowering", "Place intermediates at liveness-planned offsets in one arena per function.",
                 _memory_plan, after=("CallTIRRewrite",)),
        PassSpec("StaticPlanBlockMemory", "vm-lowering", "Plan intermediate tensors into reusable static storage.",
                 lambda c: T.StaticPlanBlockMemory()),
        PassSpec("LowerAllocTensor", "vm-lowering", "Lower alloc_tensor to storage + tensor allocations.",
                 lambda c: T.LowerAllocTensor(), **vm),
        PassSpec("KillAfterLastUse", "vm-lowering", "Free each tensor after its last use.", lambda c: T.KillAfterLastUse()),
        PassSpec("LowerRuntimeBuiltin", "vm-lowering", "Lower builtins to VM calls.", lambda c: T.LowerRuntimeBuiltin(), **vm),
        PassSpec("ComputePrimValue", "vm-lowering", "Compute symbolic prim values.", lambda c: T.ComputePrimValue(), **vm),
        PassSpec("VMShapeLower", "vm-lowering", "Lower shape computations for the VM.", lambda c: T.VMShapeLower(), **vm),
        PassSpec("AttachGlobalSymbol", "vm-lowering", "Give every function its exported symbol.",
                 lambda c: T.AttachGlobalSymbol(), **vm),
    ]


def pass_names() -> list[str]:
    return [p.name for p in build_pipeline()]


def check_order(specs: list[PassSpec]) -> None:
    """Every ``requires``/``after`` names an earlier pass of the list (a bug otherwise)."""
    seen = set()
    for spec in specs:
        for dep in spec.requires + spec.after:
            if dep not in seen:
                raise AssertionError(f"pipeline: {spec.name} must come after {dep}")
        seen.add(spec.name)


#: the passes that execute the memory plan: the arena's offsets and kernels that take them
ARENA_PASSES = ("MemoryPlan", "AcceptBufferOffsets")


def executes_memory_plan(requested: bool | None, disabled=()) -> bool:
    """Whether the build runs the planned arena: ``requested`` if given (True or False, as
    ``--execute-memory-plan`` / ``--no-execute-memory-plan`` say), else the default: yes,
    unless ``disabled`` leaves out one of :data:`ARENA_PASSES` (then TVM's storage tokens)."""
    if requested is not None:
        return bool(requested)
    return not any(name in ARENA_PASSES for name in disabled)


def check_disabled(disabled, execute_memory_plan: bool | None = None) -> None:
    """Names in ``--disable-pass`` exist and none is a pass the build cannot do without
    (with ``execute_memory_plan`` asked for explicitly, neither of :data:`ARENA_PASSES`)."""
    specs = {p.name: p for p in build_pipeline()}
    for name in disabled:
        if name not in specs:
            raise BlueLowerError(f"unknown pass '{name}' in --disable-pass (valid: {', '.join(specs)})")
        if specs[name].required:
            raise BlueLowerError(f"--disable-pass {name}: the build cannot do without it (it lowers the model to "
                                 "the VM); disable an optimization pass instead")
        if execute_memory_plan is True and name in ARENA_PASSES:
            raise BlueLowerError(f"--disable-pass {name}: --execute-memory-plan needs it ({' and '.join(ARENA_PASSES)} "
                                 "run the planned arena); drop one of the two options")


def resolve(ctx: BuildContext, disabled=()) -> list[tuple[PassSpec, "tvm.transform.Pass | None", str | None]]:
    """``(spec, pass or None, why skipped or None)`` for every pass, in order: disabled by
    the user, disabled because a pass it requires is, or not applying to this build. A
    dependant the build asked for (``essential``) whose requirement is disabled is an error."""
    check_disabled(disabled, ctx.execute_memory_plan)
    ctx = replace(ctx, execute_memory_plan=executes_memory_plan(ctx.execute_memory_plan, disabled))
    specs = build_pipeline()
    check_order(specs)
    off: dict = {name: "disabled by --disable-pass" for name in disabled}
    out = []
    for spec in specs:
        if spec.name in off:
            out.append((spec, None, off[spec.name]))
            continue
        missing = [dep for dep in spec.requires if dep in off]
        tvm_pass = spec.make(ctx)
        if missing and tvm_pass is not None:
            dep = missing[0]
            if spec.essential(ctx):
                raise BlueLowerError(f"--disable-pass {dep}: {spec.name} requires it and --quant {ctx.quant} needs "
                                     f"{spec.name}; keep {dep} or use another --quant")
            off[spec.name] = f"disabled: requires {dep} ({off[dep]})"
            out.append((spec, None, off[spec.name]))
            continue
        if tvm_pass is None:
            out.append((spec, None, "does not apply to this build"))
            continue
        out.append((spec, tvm_pass, None))
    return out


def run_pipeline(mod: tvm.IRModule, ctx: BuildContext, disabled=(), dump_ir_dir: str | None = None,
                 stop_after: str | None = None, skip=(), phase_done=None):
    """Run every enabled pass in order, up to and including ``stop_after``; return
    ``(mod, stats)``. ``phase_done(phase, mod)``, if given, is called with the module as each
    phase of the list leaves it (the compile driver starts writing the parameters once
    "quantization" is done, beside the rest of the pipeline).

    ``stats`` is a list of ``{"name", "phase", "stats": {...}}`` (also for passes that do
    not run: ``{"skipped": reason}``). ``skip``: passes left out without a trace (a caller
    that knows they do not change what it reads). With ``dump_ir_dir`` the IR is written as
    TVMScript before the first pass (``000-input.py``) and after each pass (``NNN-<name>.py``).
    """
    from ..lowering.kernels.parse_speed import fast_prim_func_frames  # kernels parse faster

    plan = [(s, p, why) for s, p, why in resolve(ctx, disabled) if s.name not in skip]
    if stop_after is not None:
        names = [s.name for s, _p, _w in plan]
        if stop_after not in names:
            raise ValueError(f"stop_after: no pass {stop_after!r} in the pipeline")
        plan = plan[:names.index(stop_after) + 1]
    index_of = {s.name: i for i, s in enumerate(build_pipeline(), start=1)}
    if dump_ir_dir:
        os.makedirs(dump_ir_dir, exist_ok=True)
        dump_ir(mod, os.path.join(dump_ir_dir, "000-input.py"))
    bar = progress.Progress("compile passes", len(plan))
    instrument = PipelineInstrument(index_of, dump_ir_dir)
    with tvm.transform.PassContext(opt_level=3, instruments=[instrument]), fast_prim_func_frames():
        for i, (spec, tvm_pass, why) in enumerate(plan):
            if tvm_pass is not None:
                mod = tvm_pass(mod)
            elif dump_ir_dir:  # the unchanged IR, so the dump has a file per pass
                dump_ir(mod, os.path.join(dump_ir_dir, f"{index_of[spec.name]:03d}-{spec.name}.py"))
            bar.update(item=spec.name)
            if phase_done is not None and (i + 1 == len(plan) or plan[i + 1][0].phase != spec.phase):
                phase_done(spec.phase, mod)
    bar.close()
    total = sum(instrument.seconds.values())
    if total >= 5.0:  # where a long compile spends its pass time
        slow = sorted(instrument.seconds.items(), key=lambda kv: -kv[1])[:5]
        progress.log(f"passes: {total:.1f} s; slowest " + ", ".join(f"{name} {sec:.1f} s" for name, sec in slow))
    reported = pass_stats(mod)
    results = []
    for spec, tvm_pass, why in plan:
        if tvm_pass is None:
            stats = {"skipped": why}
        else:
            stats = {**reported.get(spec.name, {}), **instrument.sizes.get(spec.name, count_bindings(mod))}
        results.append({"name": spec.name, "phase": spec.phase, "stats": stats})
    return mod, results
