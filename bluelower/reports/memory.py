"""``bluelower inspect memory``: peak memory per phase of a build or of a plan.

``inspect memory BUILD_DIR`` reads the ``memory_plan`` a compile wrote into ``manifest.json``;
``inspect memory --model M --soc S --quant Q`` computes the same without building: import on
meta tensors, run the pipeline up to ``MemoryPlan`` (planning only), weights from their
shapes, the phase table from ``lowering/artifacts/memory_table.py`` (what a compile writes).
Results are cached on disk; big models are planned in worker processes, one per entry.
"""

from __future__ import annotations

import json
import os

from ..cache import result_dir
from ..errors import BlueLowerError
from ..lowering.artifacts.memory_table import phase_table, plan_dtype_bytes, weight_bytes
from ..lowering.quant.modes import quant_mode

# Passes before MemoryPlan that ``inspect_model`` need not run: they return the module
# unchanged (ScheduleOperators only predicts a schedule for the manifest), so the plan is the
# same without them.
PLAN_SKIPPED_PASSES = ("ScheduleOperators",)


def inspect_build(build_dir: str) -> dict:
    from ..lowering.artifacts.bundle import read_manifest

    from ..targets.soc import list_socs, load_soc

    manifest = read_manifest(build_dir)
    plan = manifest.get("memory_plan")
    if not plan:
        raise BlueLowerError(f"{build_dir}: the manifest has no memory_plan (built before MemoryPlan existed; recompile)")
    _check_plan(plan, f"{build_dir}/manifest.json")
    out = {k: v for k, v in plan.items() if k != "functions"}
    out["functions"] = {f: {k: v for k, v in p.items() if k not in ("tensors", "outputs")}
                        for f, p in plan["functions"].items()}
    out["soc"] = soc = manifest.get("soc")
    return with_soc_memory(out, load_soc(soc)) if soc in list_socs() else out


_PHASE_BYTES = ("weights_bytes", "kv_cache_bytes", "arena_bytes", "liveness_lower_bound_bytes", "held_bytes",
                "outputs_bytes", "kv_copy_bytes", "total_bytes")


def _check_plan(plan, where: str) -> None:
    """The manifest's ``memory_plan`` has what the report reads (else one line)."""
    def count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    ok = (isinstance(plan, dict) and isinstance(plan.get("phases"), list) and isinstance(plan.get("functions"), dict)
          and count(plan.get("peak_bytes")) and all(count(plan.get(k)) for k in ("kv_capacity", "prefill_chunk",
                                                                                 "image_batch", "image_patches"))
          and all(isinstance(p, dict) and isinstance(p.get("name"), str) and all(count(p.get(k)) for k in _PHASE_BYTES)
                  for p in plan["phases"])
          and all(isinstance(f, dict) for f in plan["functions"].values()))
    if not ok:
        raise BlueLowerError(f"{where}: memory_plan is malformed (expected peak_bytes, phases [{{name, "
                             f"{', '.join(_PHASE_BYTES)}}}], functions {{name: plan}})")


def parse_grid(grid: str | None) -> int | None:
    """'2x4' -> 9 patches (m*n local + 1 global); None -> None; '1x1' -> 1 (no thumbnail)."""
    if grid is None:
        return None
    try:
        m, n = (int(v) for v in grid.lower().split("x"))
    except ValueError:
        raise BlueLowerError(f"--image-grid must look like 2x4, got '{grid}'") from None
    if m < 1 or n < 1:
        raise BlueLowerError(f"--image-grid must be positive, got '{grid}'")
    return 1 if m * n == 1 else m * n + 1


def inspect_model(model: str, soc: str = "host", quant: str = "fp32", image_grid: str | None = None,
                  kv_capacity: int | None = None, prefill_chunk: int | None = None, disabled=(),
                  imported=None, jobs: int | None = None, recipe=None) -> dict:
    """Plan without building: meta import, pipeline up to MemoryPlan (planning only).
    ``recipe``: the weights' formats (a ``quant.recipe.Recipe``; default: the mode's, as a
    compile without ``--recipe``).

    The entry functions are planned independently (every pass rewrites one function at a
    time and names what it adds after it), so with ``jobs`` > 1 each entry is imported and
    planned in its own worker process (``jobs`` defaults to ``BLUELOWER_JOBS``, else the
    usable CPUs, else 1 for small models; ``jobs=1`` plans in this process). ``imported``: ``(mod, sigs)`` of an earlier import.
    """
    from .. import progress
    from ..lowering.artifacts.compile import resolve_soc, with_runtime
    from ..lowering.artifacts.memory_table import check_fits
    from ..lowering.models import load_config

    quant_mode(quant)
    cfg = with_runtime(load_config(model), kv_capacity=kv_capacity, prefill_chunk=prefill_chunk)  # as compile checks them
    n_patches = parse_grid(image_grid)
    soc_obj = resolve_soc(soc)
    soc_obj.tvm_target()
    check_fits(cfg, quant, soc_obj)  # before anything is traced
    jobs = plan_jobs(jobs, cfg)
    cache_path = None
    if imported is None:
        cache_path = _result_cache_path(cfg, soc_obj, quant, n_patches, disabled, recipe)
        cached = _read_cached(cache_path)
        if cached is not None:
            progress.log(f"memory plan from the cache ({cache_path}; BLUELOWER_CACHE=off recomputes)")
            return with_soc_memory(cached, soc_obj)
    if imported is None and jobs > 1:
        _start_workers()  # the workers' server imports torch + TVM while this process goes on
    if imported is not None or jobs == 1:
        plans, params = plan_entries(cfg, soc, quant, None, disabled, imported=imported, recipe=recipe)
    else:
        plans, params = _plan_in_workers(cfg, soc, quant, disabled, recipe)
    table = phase_table(cfg, quant, params, plans, n_patches=n_patches, recipe=recipe)
    table["soc"] = soc_obj.name
    _write_cached(cache_path, table)
    return with_soc_memory(table, soc_obj)


def with_soc_memory(table: dict, soc) -> dict:
    """``table`` + the SoC's memory and whether the peak fits it (``soc_memory_bytes``, ``fits``)."""
    return {**table, "soc_memory_bytes": int(soc.memory.capacity_bytes),
            "fits": table["peak_bytes"] <= soc.memory.capacity_bytes}


def plan_entries(cfg, soc: str, quant: str, entries=None, disabled=(), imported=None,
                 recipe=None) -> tuple[dict, dict]:
    """Import ``entries`` (default: all) on meta tensors and run the pipeline up to
    MemoryPlan (weights in ``recipe``'s formats, default the mode's). Returns ``(plans,
    params)``: the MemoryPlan results per function and each entry's weight names."""
    from .. import progress
    from ..lowering.artifacts.compile import resolve_soc
    from ..lowering.frontend.importer import import_model
    from ..lowering.models import spec_for
    from ..lowering.quant.params import format_policy
    from ..passes.ir_utils import result
    from ..passes.pipeline import BuildContext, run_pipeline

    soc_obj = resolve_soc(soc)
    if imported is not None:  # (mod, sigs) of an earlier import of the same config
        mod, sigs = imported
    else:
        with progress.step("import (meta)"):
            mod, sigs = import_model(cfg, "torch", entries=entries)
    ctx = BuildContext(target=soc_obj.tvm_target(), quant=quant, soc=soc_obj, spec=spec_for(cfg),
                       entry_functions=tuple(sigs), image_batch=cfg.runtime.image_batch,
                       plan_dtype_bytes=plan_dtype_bytes(quant),
                       weight_formats=None if recipe is None else format_policy(quant, recipe))
    mod, _stats = run_pipeline(mod, ctx, disabled=disabled, stop_after="MemoryPlan", skip=PLAN_SKIPPED_PASSES)
    return result(mod, "memory_plan"), {name: list(sig.params) for name, sig in sigs.items()}


# ------------------------------------------------------------------ worker processes
# One entry per worker: the 3B decoder's prefill and decode each take ~20 s to trace
# (torch.export + PyTorch's decompositions, pure Python) and plan, the ViT as long; on
# two cores the entries in parallel take about half the time of one process.
# The workers come from a ``forkserver``: a clean process (no threads yet) that imports
# torch and TVM once and forks one child per entry, so this process's own state (threads
# of a test run, TVM's thread pool) never reaches a forked child.

_WORKER_PRELOAD = ["torch", "tvm", "bluelower.reports.memory", "bluelower.lowering.frontend.importer",
                   "bluelower.passes.pipeline"]


# below this many fp32 weight bytes a model plans in this process unless asked otherwise:
# its trace takes seconds, less than starting the workers (importing torch + TVM again)
PARALLEL_PLAN_MIN_WEIGHT_BYTES = 1 << 30


def plan_jobs(jobs: int | None = None, cfg=None) -> int:
    """Worker processes to plan with: ``jobs``, else ``$BLUELOWER_JOBS``, else the usable
    CPUs (1 for a model under PARALLEL_PLAN_MIN_WEIGHT_BYTES of fp32 weights)."""
    from ..jobs import env_jobs, usable_cpus

    if jobs is None:
        jobs = env_jobs()
        if jobs is None:
            small = cfg is not None and sum(weight_bytes(cfg, "fp32")[0].values()) < PARALLEL_PLAN_MIN_WEIGHT_BYTES
            jobs = 1 if small else usable_cpus()
    if jobs < 1:
        raise BlueLowerError(f"--jobs must be at least 1, got {jobs}")
    return jobs


def _mp_context():
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_WORKER_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _start_workers() -> None:
    ctx = _mp_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _worker(cfg, soc: str, quant: str, entry: str, disabled, recipe=None) -> tuple[dict, dict, float]:
    import time

    from .. import progress

    progress.set_quiet(True)
    start = time.perf_counter()
    plans, params = plan_entries(cfg, soc, quant, [entry], disabled, recipe=recipe)
    return plans, params, time.perf_counter() - start


def _plan_in_workers(cfg, soc: str, quant: str, disabled, recipe=None) -> tuple[dict, dict]:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from .. import progress
    from ..lowering.models import spec_for

    # one process per entry, even with fewer CPUs: the entries' lengths differ, so
    # time-slicing all of them ends sooner than queueing (2 CPUs: 4 entries in ~1/2 of the
    # sequential time, not ~2/3)
    order = list(spec_for(cfg).entry_names)
    workers = len(order)
    plans, params = {}, {}
    bar = progress.Progress(f"import + plan ({workers} processes)", len(order))
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as pool:
            futures = {pool.submit(_worker, cfg, soc, quant, e, tuple(disabled), recipe): e for e in order}
            for fut in as_completed(futures):
                p, s, seconds = fut.result()
                plans.update(p)
                params.update(s)
                bar.update(item=f"{futures[fut]} ({seconds:.0f} s)")
    except BrokenProcessPool:
        raise BlueLowerError("a planning worker process died (out of memory?); "
                             "plan in one process with --jobs 1") from None
    bar.close()
    return dict(sorted(plans.items())), params  # the order one process gives


# ------------------------------------------------------------------ result cache
#
# ``inspect memory --model`` is a pure function of the model config, the SoC file, the
# quant mode, the image grid, the disabled passes, and the code (bluelower's sources, TVM,
# torch). Most of its time is the torch.export import of the meta model (minutes for the
# 3B model on a loaded host), so the result is cached on disk under a key of all of these:
# any edit to a bluelower source file, a SoC file or a config misses. Location:
# ``$BLUELOWER_CACHE/inspect-memory`` (bluelower.cache; ``BLUELOWER_CACHE=off`` disables
# it). An unreadable entry is a miss, an unwritable directory is not an error.


def sources_digest() -> str:
    """SHA-256 over every source / data file of the bluelower package (path + content)."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the bluelower package
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith((".py", ".toml", ".json")):
                path = os.path.join(dirpath, f)
                with open(path, "rb") as fh:
                    h.update(os.path.relpath(path, root).encode() + b"\0" + hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def _result_cache_path(cfg, soc, quant: str, n_patches, disabled, recipe=None) -> str | None:
    """``soc``: the loaded description (a shipped name, a user's file, or ``native``: its
    fields, this CPU's ``mcpu`` included, are what the key digests)."""
    import hashlib

    import torch
    import tvm

    from .. import __version__

    d = result_dir("inspect-memory")
    if d is None:
        return None
    soc_digest = hashlib.sha256(repr(soc).encode()).hexdigest()
    target = str(soc.tvm_target())
    key = json.dumps({"config": cfg.to_dict(), "soc": soc_digest, "target": target, "quant": quant,
                      "patches": n_patches, "disabled": sorted(disabled), "sources": sources_digest(),
                      "recipe": None if recipe is None else recipe.to_data(),
                      "bluelower": __version__, "tvm": tvm.__version__, "torch": torch.__version__}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return os.path.join(d, f"{cfg.name}-{quant}-{digest}.json")


def _read_cached(path: str | None) -> dict | None:
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _write_cached(path: str | None, table: dict) -> None:
    import tempfile

    if path is None:
        return
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".inspect-", dir=os.path.dirname(path))
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(table, fh)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def format_table(info: dict) -> str:
    def gb(n):
        return f"{n / 1e9:8.3f} GB" if n >= 1e8 else f"{n / 1e6:8.2f} MB"

    lines = [f"model {info['model']}  quant {info['quant']}  KV {info['kv_capacity']}  chunk {info['prefill_chunk']}  "
             f"image batch {info['image_batch']}  patches {info['image_patches']}",
             f"{'phase':<16}{'weights':>12}{'KV cache':>12}{'arena':>12}{'lower bnd':>12}{'held+out':>12}{'total':>12}"]
    for p in info["phases"]:
        lines.append(f"{p['name']:<16}{gb(p['weights_bytes']):>12}{gb(p['kv_cache_bytes']):>12}{gb(p['arena_bytes']):>12}"
                     f"{gb(p['liveness_lower_bound_bytes']):>12}"
                     f"{gb(p['held_bytes'] + p['outputs_bytes'] + p['kv_copy_bytes']):>12}{gb(p['total_bytes']):>12}")
    lines.append(f"peak: {info['peak_bytes'] / 1e9:.3f} GB ({info['peak_phase']})")
    if "soc_memory_bytes" in info:
        have = info["soc_memory_bytes"]
        verdict = "fits" if info["fits"] else f"does NOT fit: {(info['peak_bytes'] - have) / 1e9:.3f} GB over"
        lines.append(f"SoC {info.get('soc')} memory: {have / 1e9:.3f} GB; the peak {verdict}")
    return "\n".join(lines)
