"""Generate the BlueLM-V-3B memory breakdown tables of docs/memory.md.

    .venv/bin/python benchmarks/memory_table.py [--quant w4a16kv8] [--image-grid 2x4] \
        [--soc host --soc dimensity9300] [--json OUT.json] [--disable-pass NAME]

Plans on meta tensors (``bluelower inspect memory --model bluelm-v-3b``), no weights, and
prints a Markdown table per SoC: per phase weights / KV cache / arena (vs its liveness
lower bound and vs TVM's StaticPlanBlockMemory) / held tensors / total, and the peak.
"""

from __future__ import annotations

import argparse
import json
import sys


def mb(n: int) -> str:
    return f"{n / 2**20:,.2f}"


def markdown(info: dict) -> str:
    lines = [
        f"**{info['soc']}**, `{info['quant']}`, KV cache {info['kv_capacity']}, prefill chunk {info['prefill_chunk']}, "
        f"image batch {info['image_batch']}, {info['image_patches']} patches (MiB = 2^20 bytes)",
        "",
        "| phase | weights | KV cache | arena | liveness lower bound | arena / bound | TVM StaticPlanBlockMemory "
        "| outputs + held + KV copy | total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in info["phases"]:
        ratio = p["arena_bytes"] / p["liveness_lower_bound_bytes"] if p["liveness_lower_bound_bytes"] else 1.0
        extra = p["outputs_bytes"] + p["held_bytes"] + p["kv_copy_bytes"]
        lines.append(f"| {p['name']} | {mb(p['weights_bytes'])} | {mb(p['kv_cache_bytes'])} | {mb(p['arena_bytes'])} "
                     f"| {mb(p['liveness_lower_bound_bytes'])} | {ratio:.3f} | {mb(p['tvm_static_plan_bytes'])} "
                     f"| {mb(extra)} | **{mb(p['total_bytes'])}** |")
    lines += ["", f"Peak: **{info['peak_bytes'] / 1e9:.3f} GB** ({info['peak_bytes'] / 2**30:.3f} GiB) in "
              f"`{info['peak_phase']}`. Weights: {info['weights_bytes_how']}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from bluelower import progress
    from bluelower.reports.memory import inspect_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bluelm-v-3b")
    ap.add_argument("--quant", default="w4a16kv8")
    ap.add_argument("--image-grid", default="2x4")
    ap.add_argument("--soc", action="append", default=None)
    ap.add_argument("--json", default=None, help="Also write the raw results here.")
    ap.add_argument("--disable-pass", action="append", default=[], help="Skip a pipeline pass while planning.")
    ap.add_argument("--from-json", default=None, help="Re-render the tables of an earlier --json run.")
    args = ap.parse_args(argv)
    progress.set_quiet(True)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as fh:
            for info in json.load(fh):
                print(markdown(info))
                print()
        return 0
    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.models import load_config

    imported = import_model(load_config(args.model), "torch")  # once: the plan differs by target only
    results = []
    for soc in args.soc or ["host", "dimensity9300"]:
        info = inspect_model(args.model, soc=soc, quant=args.quant, image_grid=args.image_grid,
                             disabled=tuple(args.disable_pass), imported=imported)
        results.append(info)
        print(markdown(info))
        print()
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
