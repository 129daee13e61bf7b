"""Generate docs/predicted-performance.md (+ Gantt PNG and Chrome trace) from the cost model.

    .venv/bin/python benchmarks/predict_table.py [--model bluelm-v-3b] [--soc dimensity9300]

Every number in the generated page is computed here from the model config, the SoC TOML
and bluelower.targets.{cost_model,predict,scheduler}; the only literals are the paper's
reported figures, used for comparison and to show which rates they imply.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bluelower.lowering.models import load_config  # noqa: E402
from bluelower.targets import cost_model, predict as predict_mod, scheduler  # noqa: E402
from bluelower.targets.cost_model import cost, units_of  # noqa: E402
from bluelower.reports.predict import RequestModel, Work, _calls, parse_quant, predict  # noqa: E402
from bluelower.targets.soc import format_quantity, load_soc  # noqa: E402

# The paper's figures (arXiv 2411.10640, vivo X100 / Dimensity 9300, 768x1536 image = 2:4 grid).
PAPER = {
    "image_encode_s": 2.06,  # 1.9 s ViT on NPU + 0.16 s non-hidden Conv2D, batch 4, pipelined
    "vit_total_s": 1.9,  # ViT part of the above (text)
    "conv_per_patch_s": 0.040,  # Conv2D per patch on CPU (read off the pipeline figure)
    "vit_batch4_s": 0.8,  # ViT per 4-patch batch (figure)
    "vit_batch1_s": 0.3,  # ViT for the 1-patch batch (figure)
    "prefill_s": 2.7,  # 2048 tokens, chunk 128
    "decode_tok_s": 24.4,
}
GRID, PROMPT, DECODE = (2, 4), 2048, 64


def fmt_s(x: float) -> str:
    return f"{x:.3f} s" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def implied_rates(cfg, soc, quant="w4a16kv8") -> list[tuple[str, str, str, str]]:
    """Rates the paper's timings imply under our FLOP/byte counts, next to the TOML values."""
    rm = RequestModel(cfg, parse_quant(quant))
    apu = soc.apu
    if apu is None:
        return []

    def q(x, dim):
        return "-" if x is None else format_quantity(x, dim)

    ovh, max_ops = apu.per_call_overhead_s, apu.max_ops_per_graph
    rows = []
    # fp16: the ViT of 4 + 4 + 1 patches takes 1.9 s
    vit = [rm.vit(b) for b in (4, 4, 1)]
    fl = sum(w.flops for w, _ in vit)
    calls = sum(_calls(n, "apu", max_ops) for _, n in vit)
    rows.append(("apu.peak.fp16", f"ViT of a 2:4 image (4+4+1 patches, {fl / 1e12:.2f} TFLOP, {calls} calls) in "
                 f"{PAPER['vit_total_s']} s", format_quantity(fl / (PAPER["vit_total_s"] - calls * ovh), "throughput"),
                 q(apu.peak_ops("fp16"), "throughput")))
    # int16: 16 chunks of 128 tokens take 2.7 s
    n_chunks = PROMPT // 128
    steps = [rm.decoder_step(128, lm_head=(c == n_chunks - 1)) for c in range(n_chunks)]
    fl = sum(w.flops for w, _ in steps)
    calls = sum(_calls(n, "apu", max_ops) for _, n in steps)
    rows.append(("apu.peak.int16", f"prefill of {PROMPT} tokens in chunks of 128 ({fl / 1e12:.2f} TOP, {calls} calls) in "
                 f"{PAPER['prefill_s']} s", format_quantity(fl / (PAPER["prefill_s"] - calls * ovh), "throughput"),
                 q(apu.peak_ops("int16"), "throughput")))
    # bandwidth: one decode step at 24.4 tokens/s
    w, n = rm.decoder_step(1, lm_head=True)
    c = _calls(n, "apu", max_ops)
    rows.append(("apu.bandwidth", f"decode step ({w.bytes / 1e9:.3f} GB, {c} calls) at {PAPER['decode_tok_s']} tokens/s",
                 format_quantity(w.bytes / (1 / PAPER["decode_tok_s"] - c * ovh), "bandwidth"),
                 format_quantity(apu.bandwidth_bps, "bandwidth")))
    # CPU efficiency: Conv2D ~40 ms per patch on the prime core
    prime = soc.cpu_clusters[0]
    wc = rm.conv(1)
    if "fp32" not in prime.ops_per_cycle:
        return rows
    raw_peak = prime.cores * prime.clock_hz * prime.ops_per_cycle["fp32"]
    rows.append((f"cpu_clusters.{prime.name}.efficiency",
                 f"patch-embedding Conv2D ({wc.flops / 1e9:.2f} GFLOP fp32) in {PAPER['conv_per_patch_s'] * 1e3:.0f} ms "
                 f"on one {prime.mcpu} (peak {format_quantity(raw_peak, 'throughput')})",
                 f"{wc.flops / PAPER['conv_per_patch_s'] / raw_peak:.3f}", f"{prime.efficiency:.3f}"))
    return rows


def breakdown_rows(cfg, soc, quant="w4a16kv8") -> list[str]:
    rm = RequestModel(cfg, parse_quant(quant))
    units = units_of(soc)
    max_ops = soc.apu.max_ops_per_graph if soc.apu else 1
    items = [("conv, 4 patches (CPU only)", rm.conv(4), 1), ("vit, 4 patches", *rm.vit(4)),
             ("vit, 1 patch", *rm.vit(1)), ("projector, 4 patches", *rm.projector(4)),
             ("prefill chunk of 128", *rm.decoder_step(128, lm_head=False)),
             ("decode step", *rm.decoder_step(1, lm_head=True))]
    rows = []
    for label, w, n_ops in items:
        cells = []
        for u in units:
            if label.startswith("conv") and u.kind == "apu":
                cells.append("n/a")
                continue
            c = cost(Work(w.flops, w.bytes, w.dtypes, w.op_kinds, _calls(n_ops, u.kind, max_ops)), u)
            cells.append("unsupported" if c is None else f"{fmt_s(c.seconds)} ({c.bound}, {c.dtype})")
        rows.append(f"| {label} | {w.flops / 1e9:,.1f} | {w.bytes / 1e6:,.1f} | " + " | ".join(cells) + " |")
    header = "| task | GFLOP | MB moved | " + " | ".join(u.name for u in units) + " |"
    sep = "|---|---:|---:|" + "---|" * len(units)
    return [header, sep, *rows]


def what_if_rows(cfg, soc) -> list[str]:
    rows = ["| variant | image encode | prefill | decode |", "|---|---:|---:|---:|"]

    def run(label, **kw):
        args = dict(image_grid=GRID, prompt_tokens=PROMPT, decode_tokens=16)
        args.update(kw)
        s = predict(cfg, soc, **args).info["summary"]
        rows.append(f"| {label} | {fmt_s(s['image_encode_s'])} | {fmt_s(s['prefill_s'])} | "
                    f"{s['decode_tokens_per_s']:.1f} tok/s |")

    run("baseline: batch 4, chunk 128, pipelined")
    run("no CPU/APU pipelining (Conv2D of batch k+1 waits for ViT of batch k)", pipeline=False)
    for b in (1, 2, 6, 9):
        run(f"image batch {b}", image_batch=b)
    for c in (32, 512, 2048):
        run(f"prefill chunk {c}", prefill_chunk=c)
    run("w8a16kv8 decoder (INT8 weights)", quant="w8a16kv8")
    return rows


def soc_assumptions(soc_path: str) -> list[str]:
    """The `assumed` keys of the SoC file: value (read from the TOML) and the comment above it."""
    import tomllib

    soc = load_soc(soc_path)
    with open(soc.source, "rb") as fh:
        raw = tomllib.load(fh)
    lines = open(soc.source, encoding="utf-8").read().splitlines()

    def value_of(key: str):
        node = raw
        for part in key.split("."):
            node = ([t for t in node if t.get("name") == part][0] if isinstance(node, list) else node[part])
        return node

    def reason_of(key: str) -> str:
        parts = key.split(".")
        anchor = f'name = "{parts[1]}"' if parts[0] == "cpu_clusters" else f"[{parts[0]}]"
        i = next(i for i, ln in enumerate(lines) if ln.strip() == anchor)
        leaf = parts[2] if parts[0] == "cpu_clusters" else parts[1]
        j = next(j for j in range(i, len(lines)) if lines[j].strip().startswith(f"{leaf} ="))
        k = j
        while k > 0 and lines[k - 1].strip().startswith("#"):
            k -= 1
        return " ".join(ln.strip().lstrip("#").strip() for ln in lines[k:j])

    out, last = [], None
    for key in soc.assumed:
        v = json.dumps(value_of(key))
        reason = reason_of(key)
        shown = "(same comment as the row above)" if reason == last else reason
        last = reason
        out.append(f"| `{key}` | `{v if len(v) < 50 else v[:47] + '...'}` | {shown} |")
    return ["| key | value | reason (the file's comment) |", "|---|---|---|", *out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bluelm-v-3b")
    ap.add_argument("--soc", default="dimensity9300")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "predicted-performance.md"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "img", "schedule-d9300.png"))
    ap.add_argument("--trace", default=os.path.join(ROOT, "docs", "img", "schedule-d9300.trace.json"))
    args = ap.parse_args()

    cfg, soc = load_config(args.model), load_soc(args.soc)
    sched = predict(cfg, soc, image_grid=GRID, prompt_tokens=PROMPT, decode_tokens=DECODE)
    summ = sched.info["summary"]
    scheduler.plot_gantt(sched, args.png, title=f"{cfg.name} on {soc.name}: 2:4 image, {PROMPT}-token prompt, "
                                                f"{DECODE} decode steps (predicted)")
    with open(args.trace, "w", encoding="utf-8") as fh:
        json.dump(scheduler.to_chrome_trace(sched), fh)

    # zoom on the image phase for the pipelining story
    img = [t for t in sched.tasks if t.phase == "image_encode"]
    # CPU Conv2D time that overlaps APU work = all Conv2D time - the wait before the first ViT call
    hidden = sum(t.duration_s for t in img if t.name.startswith("conv")) - sched.task("vit[0]").start_s

    rel = lambda p: os.path.relpath(p, os.path.dirname(args.out))  # noqa: E731
    md = []
    md += [
        f"# Predicted performance: {cfg.name} on {soc.name}",
        "",
        f"Generated by `benchmarks/predict_table.py` from `{os.path.relpath(soc.source, ROOT)}`, the "
        f"`{cfg.name}` model config and `bluelower.targets` (roofline cost model + list scheduler). "
        "Do not edit by hand; re-run the script.",
        "",
        "**Read this first.** No MediaTek compiler or phone is reachable here, so these are *model* "
        "numbers, not measurements. MediaTek publishes no APU throughput, so the APU's fp16 and int16 rates, "
        "its DRAM bandwidth and the CPU kernel efficiency are **calibrated against the paper's own figures** "
        "(table below). The three headline rows therefore agree with the paper largely *by construction*; "
        "what the model adds is the structure: which unit runs what, how much CPU work the pipeline hides, "
        "what is compute- vs memory-bound, and how the totals move when a parameter changes.",
        "",
        f"Request: a {GRID[0]}:{GRID[1]} image ({sched.info['image_patches']} patches in batches "
        f"{sched.info['image_batches']}, {sched.info['image_tokens']} image tokens), a {PROMPT}-token prompt "
        f"in {sched.info['prefill_chunks']} chunks of {sched.info['prefill_chunk']}, {DECODE} decode steps, "
        f"decoder `{sched.info['quant']}` (INT4 weights + fp16 scale per {sched.info['group_size']} weights, "
        "INT16 activations, INT8 KV cache), ViT/projector INT8 weights with FP16 activations.",
        "",
        "## Predicted vs paper",
        "",
        "| | predicted | paper (vivo X100) |",
        "|---|---:|---:|",
        f"| image encode, 2:4 image (ViT + projector, Conv2D pipelined) | {fmt_s(summ['image_encode_s'])} | "
        f"{PAPER['image_encode_s']} s (1.9 s + 0.16 s) |",
        f"| LLM prefill, {PROMPT} tokens, chunk 128 | {fmt_s(summ['prefill_s'])} | {PAPER['prefill_s']} s |",
        f"| decode | {summ['decode_tokens_per_s']:.1f} tokens/s | {PAPER['decode_tok_s']} tokens/s |",
        f"| ViT, one 4-patch batch | {fmt_s(sched.task('vit[0]').duration_s)} | ~{PAPER['vit_batch4_s']} s (figure) |",
        f"| ViT, the 1-patch batch | {fmt_s(sched.task('vit[2]').duration_s)} | ~{PAPER['vit_batch1_s']} s (figure) |",
        f"| Conv2D work hidden behind the APU | {fmt_s(hidden)} | ~0.2 s |",
        f"| DRAM roofline for decode (76.8 GB/s / decoder weights) | "
        f"{soc.memory.bandwidth_bps / sched.info['decoder_weight_bytes']:.1f} tokens/s | ~50 tokens/s (derived) |",
        "",
        "Units chosen by the scheduler per phase: "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in summ["units_per_phase"].items()) + ".",
        "",
        "Where they differ and why:",
        "",
        f"* **Image encode.** The scheduler runs the first batch's Conv2D on the "
        f"{soc.cluster(sched.task('conv[0]').unit).cores}-core `{sched.task('conv[0]').unit}` cluster "
        f"({fmt_s(sched.task('conv[0]').duration_s)}) instead of the paper's ~0.16 s (4 x 40 ms, apparently one "
        "core), and spreads later Conv2D batches over idle clusters, so less CPU time sits on the critical path. "
        "It may also place a projector batch on an idle CPU cluster while the APU runs the next ViT batch.",
        "* **The 1-patch ViT batch.** A roofline with a fixed per-call overhead makes the 1-patch batch cost "
        "about a quarter of a 4-patch batch; the paper's figure shows ~0.3 s, i.e. the real APU is less "
        "efficient on small batches. The model has no shape-dependent utilization (see assumptions).",
        "* **Prefill** is compute-bound on the APU at the calibrated int16 rate; attention over the full static "
        "2048-entry cache costs the same for every chunk.",
        "* **Decode** is memory-bound: each step streams all decoder weights and the whole INT8 KV cache; the "
        "APU bandwidth was calibrated to the paper's 24.4 tokens/s (about half the 76.8 GB/s peak).",
        "",
        f"![predicted schedule]({rel(args.png)})",
        "",
        f"The same schedule as a Chrome trace (open in https://ui.perfetto.dev): `{rel(args.trace)}`.",
        "",
        "## Calibration: which assumed numbers come from the paper",
        "",
        "Each row gives the rate that makes our analytic FLOP/byte counts reproduce a paper timing "
        f"(after subtracting {format_quantity(soc.apu.per_call_overhead_s, 'time')} per APU call), next to the "
        "rounded value in the SoC file. The int8 APU rate is *not* calibrated (assumed 2x int16); the CPU "
        "clusters' bandwidths come from the paper's llama.cpp baseline (MiniCPM-V 2.5 8B at 4.9 tokens/s, "
        "~22 GB/s over all cores).",
        "",
        "| SoC key | paper timing used | implied | in the SoC file |",
        "|---|---|---:|---:|",
        *[f"| `{k}` | {what} | {imp} | {val} |" for k, what, imp, val in implied_rates(cfg, soc)],
        "",
        "## Cost of each task kind on each unit",
        "",
        "Roofline seconds (bound, compute dtype) including per-call overhead; "
        "`unsupported` = the unit lacks an operator kind or dtype the task needs.",
        "",
        *breakdown_rows(cfg, soc),
        "",
        "## What if",
        "",
        "Same request with one parameter changed (16 decode steps).",
        "",
        *what_if_rows(cfg, soc),
        "",
        "The paper found batch 4 and chunk 128 fastest on the real APU. This model cannot reproduce those "
        "optima: with one sustained rate per dtype and a small fixed per-call overhead, the APU's time barely "
        "depends on batch or chunk size. Smaller image batches even win slightly here, because less Conv2D "
        "work sits before the first ViT call; smaller prefill chunks lose only through per-call overhead and "
        "re-streaming the weights once per chunk. The real trade-off (on-chip memory limits, tiling, "
        "utilization at small shapes) is outside what a roofline describes.",
        "",
        "## Every assumption",
        "",
        "### Cost model (`bluelower/targets/cost_model.py`)",
        "",
        inspect.getdoc(cost_model).split("Assumptions (each one is a simplification the predictions inherit):")[1].strip(),
        "",
        "### Task graph and counts (`bluelower/targets/predict.py`)",
        "",
        inspect.getdoc(predict_mod).split("Counting assumptions (besides those of the cost model):")[1].strip(),
        "",
        "### Scheduler (`bluelower/targets/scheduler.py`)",
        "",
        "* Earliest-finish-time list scheduling by upward rank (HEFT with insertion); a heuristic, not an optimum.",
        "* One task per unit at a time; a task never splits across units; no cost to move data between units "
        "(shared DRAM); units do not contend for bandwidth.",
        "* Phase time = last end - first start of the phase's tasks; decode tokens/s = steps / decode phase time.",
        "",
        "### Model dimensions",
        "",
        f"The `{cfg.name}` config's decoder dimensions are themselves assumed (the paper gives only 2.7B "
        "parameters); see `bluelower/lowering/models/configs/bluelm-v-3b.json`.",
        "",
        f"### Assumed numbers in `{os.path.relpath(soc.source, ROOT)}`",
        "",
        *soc_assumptions(args.soc),
        "",
    ]
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(md))
    print(f"wrote {args.out}, {args.png}, {args.trace}")
    print(json.dumps(summ, indent=1))


if __name__ == "__main__":
    main()
