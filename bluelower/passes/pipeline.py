"""The compile pipeline, as named phases in one readable list.

    import clean-up -> graph rewrites -> quantization -> partition/schedule
                    -> lowering -> VM lowering -> (TVM build)

Every entry is a :class:`PassSpec`: a name (what ``--disable-pass`` and ``--dump-ir`` use),
its phase, a one-line description (``bluelower passes``) and a factory that returns the
TVM pass for the given :class:`CompileOptions`, or ``None`` when it does not apply (the
MLC-LLM ``X if cond else identity`` style, kept linear). Passes report statistics through
:func:`record_stats`; :func:`run_pipeline` collects them per pass, in pipeline order, for
``manifest.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import tvm
from tvm import relax

from .. import progress
from ..errors import BlueLowerError


@dataclass
class CompileOptions:
    """What the pipeline needs to know about the build."""

    target: "tvm.target.Target"
    quant: str = "fp32"
    soc: object = None  # bluelower.targets SoC description, when known
    model: object = None  # ModelConfig
    entry_functions: tuple = ()
    extra: dict = field(default_factory=dict)


@dataclass
class PassSpec:
    name: str
    phase: str
    description: str
    make: Callable[[CompileOptions], "tvm.transform.Pass | None"]


# --- statistics ------------------------------------------------------------------

_current_stats: dict | None = None


def record_stats(**stats) -> None:
    """Called by a pass while it runs: merge ``stats`` into that pass's manifest entry."""
    if _current_stats is not None:
        for key, value in stats.items():
            if isinstance(value, (int, float)) and isinstance(_current_stats.get(key), (int, float)):
                _current_stats[key] += value
            elif isinstance(value, dict) and isinstance(_current_stats.get(key), dict):
                _current_stats[key].update(value)
            else:
                _current_stats[key] = value


def _count_bindings(mod: tvm.IRModule) -> dict:
    relax_funcs = tir_funcs = bindings = 0
    for _gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax_funcs += 1
            if isinstance(func.body, relax.SeqExpr):
                bindings += sum(len(block.bindings) for block in func.body.blocks)
        elif isinstance(func, tvm.tirx.PrimFunc):
            tir_funcs += 1
    return {"relax_functions": relax_funcs, "tir_functions": tir_funcs, "relax_bindings": bindings}


# --- the pipeline ----------------------------------------------------------------


def _with_target(make):
    """Run a pass inside the build target's scope (dlight and LegalizeOps read it)."""

    def factory(opts: CompileOptions):
        inner = make(opts)
        if inner is None:
            return None

        @tvm.transform.module_pass(opt_level=0, name=inner.info.name)
        def scoped(mod, _ctx):
            with opts.target:
                return inner(mod)

        return scoped

    return factory


def _tile_image_patches():
    from .tile_image_patches import TileImagePatches

    return TileImagePatches()


def build_pipeline() -> list[PassSpec]:
    """The whole pipeline, in order. Passes that do not apply return None at build time."""
    T = relax.transform
    return [
        # import clean-up
        PassSpec("CanonicalizeBindings", "import-cleanup", "Remove trivial var-to-var bindings left by the importers.",
                 lambda o: T.CanonicalizeBindings()),
        PassSpec("DeadCodeElimination", "import-cleanup", "Drop unused bindings and functions (entry functions kept).",
                 lambda o: T.DeadCodeElimination(list(o.entry_functions))),
        # graph rewrites
        PassSpec("PlanKVCache", "graph-rewrites", "Update the KV cache in place (write only the new rows), one persistent buffer.", lambda o: __import__("bluelower.passes.plan_kv_cache", fromlist=["PlanKVCache"]).PlanKVCache()),
        PassSpec("FuseAttention", "graph-rewrites", "Replace each softmax(QK^T*scale+mask)V with one fused TIR kernel.", lambda o: __import__("bluelower.passes.fuse_attention", fromlist=["FuseAttention"]).FuseAttention()),
        PassSpec("TileImagePatches", "graph-rewrites", "Split encode_image into a Conv2D stage and a ViT-blocks stage.",
                 lambda o: _tile_image_patches()),
        PassSpec("FuseTransposeMatmul", "graph-rewrites", "Fold permute_dims(W) into matmul so weights stay N x K.",
                 lambda o: T.FuseTransposeMatmul()),
        # quantization
        PassSpec("QuantizeWeights", "quantization", "Linear weights -> INT4/INT8 kernels over packed params (--quant).",
                 lambda o: _quantize_weights(o)),
        PassSpec("QuantizeKVCache", "quantization", "KV cache -> one INT8 buffer (per-token, per-head scales), quantized on write, dequantized in attention (w4a16kv8).",
                 lambda o: _quantize_kv_cache(o)),
        # partition/schedule
        PassSpec("PartitionForAPU", "partition/schedule", "Outline the operators the SoC's APU supports into APU partitions.",
                 lambda o: __import__("bluelower.passes.partition_for_apu", fromlist=["_"]).partition_for_apu(o)),
        PassSpec("ScheduleOperators", "partition/schedule", "Predict the schedule of APU partitions and CPU segments (manifest 'schedule').",
                 lambda o: __import__("bluelower.passes.schedule_operators", fromlist=["_"]).schedule_operators(o)),
        PassSpec("EmulateAPUNumerics", "partition/schedule", "Round inside APU partitions as the SoC's APU would (fp16 activations, its accumulation).",
                 lambda o: __import__("bluelower.passes.emulate_apu_numerics", fromlist=["_"]).emulate_apu_numerics(o)),
        # lowering
        PassSpec("ShareLayerKernels", "lowering", "Call one generic attention / KV-write kernel per shape, the layer as an argument.",
                 lambda o: __import__("bluelower.passes.share_layer_kernels", fromlist=["_"]).ShareLayerKernels()),
        PassSpec("BoundTakeIndices", "lowering", "Gathers with run-time indices clamp them into range (take mode fast -> clip).",
                 lambda o: __import__("bluelower.passes.bound_take_indices", fromlist=["_"]).BoundTakeIndices()),
        PassSpec("LegalizeOps", "lowering", "Lower Relax operators to TIR PrimFuncs.",
                 _with_target(lambda o: T.LegalizeOps())),
        PassSpec("AnnotateTIROpPattern", "lowering", "Classify each PrimFunc (elementwise, injective, reduction, ...).",
                 lambda o: T.AnnotateTIROpPattern()),
        PassSpec("FoldConstant", "lowering", "Evaluate operators whose inputs are all constants.",
                 lambda o: T.FoldConstant()),
        PassSpec("FuseOps", "lowering", "Group producer/consumer operators into fused functions.",
                 lambda o: T.FuseOps()),
        PassSpec("FuseTIR", "lowering", "Merge each fused group into one PrimFunc.", lambda o: T.FuseTIR()),
        # VM lowering
        PassSpec("RewriteDataflowReshape", "vm-lowering", "Turn reshapes into VM builtin views.", lambda o: T.RewriteDataflowReshape()),
        PassSpec("ToNonDataflow", "vm-lowering", "Leave dataflow blocks.", lambda o: T.ToNonDataflow()),
        PassSpec("RemovePurityChecking", "vm-lowering", "Drop purity annotations.", lambda o: T.RemovePurityChecking()),
        PassSpec("CallTIRRewrite", "vm-lowering", "Make call_tir outputs explicit allocations.", lambda o: T.CallTIRRewrite()),
        PassSpec("MemoryPlan", "vm-lowering", "Place intermediates at liveness-planned offsets in one arena per function.",
                 lambda o: _memory_plan(o)),
        PassSpec("StaticPlanBlockMemory", "vm-lowering", "Plan intermediate tensors into reusable static storage.",
                 lambda o: T.StaticPlanBlockMemory()),
        PassSpec("LowerAllocTensor", "vm-lowering", "Lower alloc_tensor to storage + tensor allocations.", lambda o: T.LowerAllocTensor()),
        PassSpec("KillAfterLastUse", "vm-lowering", "Free each tensor after its last use.", lambda o: T.KillAfterLastUse()),
        PassSpec("LowerRuntimeBuiltin", "vm-lowering", "Lower builtins to VM calls.", lambda o: T.LowerRuntimeBuiltin()),
        PassSpec("ComputePrimValue", "vm-lowering", "Compute symbolic prim values.", lambda o: T.ComputePrimValue()),
        PassSpec("VMShapeLower", "vm-lowering", "Lower shape computations for the VM.", lambda o: T.VMShapeLower()),
        PassSpec("AttachGlobalSymbol", "vm-lowering", "Give every function its exported symbol.", lambda o: T.AttachGlobalSymbol()),
    ]


def _memory_plan(o: CompileOptions):
    from .memory_plan import MemoryPlan

    return MemoryPlan(o.entry_functions, sink=o.extra.setdefault("memory_plan", {}),
                      dtype_bytes=o.extra.get("plan_dtype_bytes"))


def _quantize_weights(o: CompileOptions):
    from .quantize_weights import quantize_weights_for

    return quantize_weights_for(o)


def _quantize_kv_cache(o: CompileOptions):
    if o.quant != "w4a16kv8":
        return None
    from .quantize_kv_cache import QuantizeKVCache

    return QuantizeKVCache(sink=o.extra.setdefault("kv_cache", {}))


def pass_names() -> list[str]:
    return [p.name for p in build_pipeline()]


def check_disabled(disabled) -> None:
    valid = pass_names()
    for name in disabled:
        if name not in valid:
            raise BlueLowerError(f"unknown pass '{name}' in --disable-pass (valid: {', '.join(valid)})")


def run_pipeline(mod: tvm.IRModule, opts: CompileOptions, disabled=(), dump_ir: str | None = None):
    """Run every enabled pass in order; return ``(mod, stats)``.

    ``stats`` is a list of ``{"name", "phase", "stats": {...}}`` (also for passes that do
    not apply: ``{"skipped": reason}``). With ``dump_ir`` the IR is written as TVMScript
    before the first pass (``000-input.py``) and after each pass (``NNN-<name>.py``).
    """
    global _current_stats
    check_disabled(disabled)
    specs = build_pipeline()
    if dump_ir:
        os.makedirs(dump_ir, exist_ok=True)
        _dump(mod, os.path.join(dump_ir, "000-input.py"))
    results = []
    bar = progress.Progress("compile passes", len(specs))
    for index, spec in enumerate(specs, start=1):
        entry = {"name": spec.name, "phase": spec.phase, "stats": {}}
        if spec.name in disabled:
            entry["stats"] = {"skipped": "disabled by --disable-pass"}
        else:
            tvm_pass = spec.make(opts)
            if tvm_pass is None:
                entry["stats"] = {"skipped": "does not apply to this build"}
            else:
                _current_stats = entry["stats"]
                try:
                    from ..lowering.kernels.parse_speed import fast_prim_func_frames  # kernels parse faster

                    with tvm.transform.PassContext(opt_level=3), fast_prim_func_frames():
                        mod = tvm_pass(mod)
                finally:
                    _current_stats = None
                entry["stats"].update(_count_bindings(mod))
        results.append(entry)
        if dump_ir:
            _dump(mod, os.path.join(dump_ir, f"{index:03d}-{spec.name}.py"))
        bar.update(item=spec.name)
    bar.close()
    return mod, results


def _dump(mod: tvm.IRModule, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(mod.script(show_meta=False))
