"""Decode time at a small vs a full KV cache, in-place cache (PlanKVCache) vs copying.

Usage::

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/decode_fill.py                 # capacity 4096
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/decode_fill.py --capacity 2048 --repeat 50
    .venv/bin/python benchmarks/decode_fill.py --fused-counts bluelm-v-3b        # pass stats only

The model is ``tiny`` with ``runtime.kv_capacity`` raised to ``--capacity`` (a large cache
makes the per-step cache traffic visible next to the tiny layers). Two host builds: the
default pipeline (PlanKVCache + FuseAttention: the step writes one row per layer and the
attention reads keys ``0..position``) and ``--disable-pass PlanKVCache`` (the imported
functional update: every step copies the whole cache, twice: scatter + stack). For each,
the median time of ``decode`` at position 16 and at ``capacity - 2``. In place, the
difference between the two fills is the attention's extra key reads only; copying, both
fills also pay the whole-cache copy.

``--fused-counts MODEL`` imports MODEL with the torch frontend (on meta tensors; the 3B
config takes minutes on a loaded machine) and prints the PlanKVCache and FuseAttention
stats per entry function.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def _config(capacity: int, directory: str) -> str:
    from bluelower.lowering.models.bluelm_v import SPEC

    with open(os.path.join(SPEC.config_dir, "tiny.json"), encoding="utf-8") as fh:
        data = json.load(fh)
    data["name"] = f"tiny-c{capacity}"
    data["runtime"]["kv_capacity"] = capacity
    path = os.path.join(directory, f"tiny-c{capacity}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    return path


def _time_decode(build_dir: str, positions, repeat: int) -> dict:
    from bluelower.runtime_stubs.generate import CompiledModel

    model = CompiledModel(build_dir)
    model.reset_cache()
    out = {}
    for pos in positions:
        model.decode_step(7, pos)  # warm up
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model.decode_step(7, pos)
            samples.append(time.perf_counter() - t0)
        out[pos] = (statistics.median(samples), min(samples))
    return out


def fused_counts(model: str) -> dict:
    from tvm import relax

    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.models import load_config
    from bluelower.passes.fuse_attention import FuseAttention
    from bluelower.passes.instruments import pass_stats
    from bluelower.passes.plan_kv_cache import PlanKVCache

    t0 = time.perf_counter()
    mod, _ = import_model(load_config(model), "torch")
    result = {"import_s": round(time.perf_counter() - t0, 1)}
    mod = relax.transform.DeadCodeElimination(["encode_image", "embed", "prefill", "decode"])(
        relax.transform.CanonicalizeBindings()(mod))
    for p in (PlanKVCache(), FuseAttention()):
        t0 = time.perf_counter()
        mod = p(mod)
        stats = dict(pass_stats(mod)[p.info.name])
        stats["seconds"] = round(time.perf_counter() - t0, 1)
        result[p.info.name] = stats
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--fused-counts", metavar="MODEL")
    args = ap.parse_args(argv)
    if args.fused_counts:
        print(json.dumps(fused_counts(args.fused_counts), indent=1))
        return 0

    from bluelower import progress
    from bluelower.lowering.artifacts.compile import CompileRequest, compile_model

    progress.set_quiet(True)
    positions = (16, args.capacity - 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args.capacity, tmp)
        for label, disabled in (("in place (default)", ()), ("copying (PlanKVCache off)", ("PlanKVCache",))):
            out = os.path.join(tmp, label.split()[0])
            compile_model(CompileRequest(model=cfg, out_dir=out, quant="fp32", disabled_passes=disabled))
            times = _time_decode(out, positions, args.repeat)
            rows.append((label, times))
    cache_mb = 2 * 2 * 2 * args.capacity * 16 * 4 / 2**20
    print(f"tiny, kv_capacity {args.capacity} (cache {cache_mb:.1f} MB), decode median (min) of {args.repeat}, "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'default')}\n")
    print(f"| build | fill {positions[0]} | fill {positions[1]} | difference |")
    print("|---|---|---|---|")
    for label, t in rows:
        a, b = t[positions[0]], t[positions[1]]
        print(f"| {label} | {a[0] * 1e3:.3f} ms ({a[1] * 1e3:.3f}) | {b[0] * 1e3:.3f} ms ({b[1] * 1e3:.3f}) "
              f"| {(b[0] - a[0]) * 1e3:+.3f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
