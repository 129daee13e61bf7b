"""docs/benchmarks.md (generated block) and docs/img/benchmarks.png from benchmarks/results/*.json.

Only the text between the GENERATED markers is rewritten; the analysis around it is kept.
"""

from __future__ import annotations

import glob
import json
import os
import re

BEGIN, END = "<!-- BEGIN GENERATED (benchmarks/llm_bench.py) -->", "<!-- END GENERATED -->"
LABEL = {"bluelower": "bluelower (compiled)", "llamacpp": "llama.cpp Q4_0", "torch": "PyTorch eager fp32",
         "llamacpp-default": "llama.cpp Q4_0, default buffers", "llamacpp-no-extra": "llama.cpp Q4_0, no extra buffers",
         "llamacpp-repack": "llama.cpp Q4_0, CPU_REPACK"}


def _label(e: str, r: dict) -> str:
    """An engine's name in a run's tables; llama.cpp's default buffers name the extra buffer
    types its CPU backend offered in that run (results before they were recorded: AMX, the
    Xeon of those runs)."""
    if e != "llamacpp-default":
        return LABEL.get(e, e)
    extra = r.get("llamacpp_extra_bufts")
    return f"{LABEL[e]} ({'/'.join(extra) if extra else 'none'})" if extra is not None else f"{LABEL[e]} (AMX)"


SIZES = ["tiny", "mid", "3b"]


def _f(v, nd=1):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _command(cmd: str) -> str:
    """A recorded command as anyone runs it from the repository root: the interpreter of
    the run's venv (an absolute path of that machine) as ``.venv/bin/python``."""
    return re.sub(r"^\S*/bin/python[0-9.]*\s", ".venv/bin/python ", cmd)


def _steal(r) -> str:
    v = r.get("steal_percent")
    return "" if v is None else f"; CPU time stolen by the hypervisor over the run {v:.1f}%"


def _load(results_dir):
    out = {}
    for p in glob.glob(os.path.join(results_dir, "llm-*.json")):
        with open(p) as fh:
            r = json.load(fh)
        out[r["size"]] = r
    comp = None
    cp = os.path.join(results_dir, "compile.json")
    if os.path.isfile(cp):
        with open(cp) as fh:
            comp = json.load(fh)
    return out, comp


def generated_markdown(results_dir) -> str:
    res, comp = _load(results_dir)
    L = []
    for size in [s for s in SIZES if s in res]:
        r = res[size]
        d = r["config"]
        m = r["machine"]
        L.append(f"### size `{size}` (hidden {d['hidden_size']}, {d['num_layers']} layers, "
                 f"{d['num_heads']}x{d['head_dim']} q heads, {d['num_kv_heads']} KV heads, FFN {d['intermediate_size']}, "
                 f"vocab {d['vocab_size']})\n")
        L.append(f"Run {r['started']} UTC, {r['elapsed_s']:.0f} s; {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs, "
                 f"{THREADS_NOTE}; load average {r['loadavg_start']} at start, {r['loadavg_end']} at end{_steal(r)}. "
                 f"Memory bandwidth (numpy 1 GiB copy, read+write, best of 1/2 threads): "
                 f"**{r['bandwidth_GBps']:.1f} GB/s**.\n")
        L.append(f"Command: `{_command(r['command'])}`\n")
        for key, when in (("other_processes_start", "start"), ("other_processes_end", "end")):
            if r.get(key):
                L.append(f"Other busy processes at {when} (not part of this benchmark): " + "; ".join(f"`{x}`" for x in r[key]) + "\n")
        for n in r.get("notes", []):
            L.append(f"> **Note:** {n}\n")
        L.append("| engine | weights | prefill 128 tok/s | prefill 2048 tok/s | decode @128 tok/s | decode @2048 tok/s "
                 "| roofline @128 tok/s | % of roofline @128 | % @2048 | peak RSS MB | rounds (p128/p2048/d128/d2048) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for e, s in r["summary"].items():
            n = s["n"]
            pct = lambda x: "—" if x is None else (f"{100 * x:.0f}%" if x >= 0.01 else f"{100 * x:.2g}%")  # noqa: E731
            L.append(f"| {_label(e, r)} | {s['precision']} | {_f(s['prefill128_tok_s'])} | {_f(s['prefill2048_tok_s'])} | "
                     f"{_f(s['decode128_tok_s'], 2)} | {_f(s['decode2048_tok_s'], 2)} | {_f(s['roofline_tok_s_128'], 1)} | "
                     f"{pct(s['roofline_frac_128'])} | {pct(s['roofline_frac_2048'])} | {_f(s['peak_rss_mb'], 0)} | "
                     f"{n['prefill128_tok_s']}/{n['prefill2048_tok_s']}/{n['decode128_tok_s']}/{n['decode2048_tok_s']} |")
        L.append("")
        L.append("Bytes read per decode token (weights at stored precision + KV cache of the context; the roofline is "
                 "bandwidth / bytes):\n")
        for e, s in r["summary"].items():
            b1, b2 = s["bytes_per_token_128"], s["bytes_per_token_2048"]
            L.append(f"* {_label(e, r)}: weights {b1['weight_bytes'] / 1e6:,.1f} MB; KV {b1['kv_bytes'] / 1e6:,.2f} MB @128, "
                     f"{b2['kv_bytes'] / 1e6:,.1f} MB @2048")
        skipped = [(e, s["skipped"]) for e, s in r["summary"].items() if s["skipped"]]
        errs = [(e, s["errors"]) for e, s in r["summary"].items() if s["errors"]]
        if skipped or errs:
            L.append("\nNot measured / shortened (per-measurement budget `--max-seconds`):\n")
            for e, sk in skipped:
                L.append(f"* {_label(e, r)}: " + "; ".join(sk))
            for e, er in errs:
                L.append(f"* {_label(e, r)} errors: " + " | ".join(x.replace("\n", " ")[-200:] for x in er))
        t = r.get("targets")
        pc = lambda x: _f(None if x is None else 100 * x, 1)  # noqa: E731
        if t and r.get("llamacpp_best"):
            best = r["llamacpp_best"]
            names = {"prefill128": "prefill 128", "prefill2048": "prefill 2048", "decode128": "decode @128",
                     "decode2048": "decode @2048"}
            L.append("\nRatios bluelower / llama.cpp at its best working configuration (medians): " + "; ".join(
                f"{names[m]} **{_f(t.get(m + '_vs_llamacpp'), 3)}x** (vs `{best.get(m, '—')}`)" for m in names) +
                f". Roofline: bluelower decode at {pc(t.get('bluelower_roofline_frac_128'))}% @128, "
                f"{pc(t.get('bluelower_roofline_frac_2048'))}% @2048 (target >= 60%); llama.cpp's best @128 at "
                f"{pc(t.get('llamacpp_roofline_frac_128'))}%.")
        elif t:
            L.append("\nRatios bluelower / llama.cpp (medians): decode @128 "
                     f"**{_f(t['decode128_vs_llamacpp'], 3)}x** (target >= 1.2x); decode @2048 **{_f(t['decode2048_vs_llamacpp'], 3)}x**; "
                     f"prefill 128 **{_f(t['prefill128_vs_llamacpp'], 3)}x** (target >= 1x); prefill 2048 "
                     f"**{_f(t.get('prefill2048_vs_llamacpp'), 3)}x**. llama.cpp decode @128 at {pc(t.get('llamacpp_roofline_frac_128'))}% "
                     "of its roofline; bluelower at "
                     f"{_f(None if t['bluelower_roofline_frac_128'] is None else 100 * t['bluelower_roofline_frac_128'], 1)}% "
                     "of its roofline (target >= 60%).")
        if r.get("verify"):
            L.append("\nllama.cpp vs PyTorch reference logits (200-token prompt + 1 decode step, same weights):\n")
            L.append("| GGUF | KV cache | weight buffers | max abs diff prefill | max abs diff decode | max logit | cosine | argmax equal |")
            L.append("|---|---|---|---|---|---|---|---|")
            for q, v in r["verify"].items():
                if isinstance(v, dict) and "cosine" in v:
                    L.append(f"| {q} | {v.get('kv_cache', 'f16')} | {v.get('weight_buffers', 'default')} | {v['prefill_max_abs_diff']:.2e} | {v['decode_max_abs_diff']:.2e} | {v['logit_scale']:.3f} | "
                             f"{v['cosine']:.6f} | {v['argmax_equal']} |")
        soc = r.get("bluelower_build", {}).get("soc")
        if soc:
            L.append(f"\nbluelower was compiled with `--soc {soc}`: the shipped `host.toml` with `mcpu` set to the CPU "
                     "LLVM detects here (the shipped `host` target is generic x86-64 for reproducibility; llama.cpp "
                     "and PyTorch use this CPU's AVX-512 too).")
        prof = r.get("bluelower_profile")
        if prof:
            L.append("\nbluelower kernel profile (Relax VM instrument hook, one call after a warm-up; top kernels, calls):\n")
            if "error" in prof:
                L.append(f"* profiler not available: `{prof['error']}`")
            for fn, p in [(k, v) for k, v in prof.items() if isinstance(v, dict)]:
                if "error" in p:
                    L.append(f"* `{fn}`: profiler not available: {p['error']}")
                if "top" in p:
                    L.append(f"* `{fn}` total {p['total_ms']:.1f} ms: " + "; ".join(f"`{t[0]}` {t[1]:.1f} ms ({t[2]:.0f}%{', x' + str(t[3]) if len(t) > 3 else ''})" for t in p["top"]))
        if r.get("bluelower_build", {}).get("compile") not in (None, "cached"):
            c = r["bluelower_build"]["compile"]
            L.append(f"\nbluelower compile of this config ({r['bluelower_build']['quant_used']}): {c['wall_s']} s, "
                     f"max RSS {_f(c['max_rss_mb'], 0)} MB.")
        v = m.get("versions", {})
        L.append(f"\nVersions: tvm {v.get('tvm')}, torch {v.get('torch')}, llama-cpp-python {v.get('llama_cpp')}, "
                 f"gguf {v.get('gguf')}, numpy {v.get('numpy')}. Raw numbers: `benchmarks/results/llm-{size}.json`.\n")
    if comp:
        L.append("### `bluelower compile` time and peak RSS\n")
        L.append(f"Command: `{_command(comp.get('command', ''))}` (each compile in its own process under `/usr/bin/time -v`).\n")
        L.append("| model | SoC | wall s | CPU s (user+sys) | max RSS MB | stages (s, from bluelower's progress) | result |")
        L.append("|---|---|---|---|---|---|---|")
        for x in comp["runs"]:
            tail = x.get("stderr_tail", "")
            if "Exit status" in tail:
                tail = "(error text not captured by this run; harness fixed since)"
            status = "ok" if x.get("rc") == 0 else (x.get("error") or f"rc {x.get('rc')}: " + tail[-160:].replace("\n", " "))
            st = "; ".join(f"{k} {v:g}" for k, v in (x.get("stages_s") or {}).items())
            L.append(f"| {x['model']} | {x['soc']} | {_f(x.get('wall_s'))} | {_f(x.get('cpu_s'))} | {_f(x.get('max_rss_mb'), 0)} | {st} | {status} |")
        L.append("")
    if os.path.isfile(os.path.join(ROOT_IMG, "benchmarks.png")):
        L.append("![decode and prefill tokens/s per engine](img/benchmarks.png)\n")
    return "\n".join(L)


THREADS_NOTE = "2 threads per engine"
ROOT_IMG = ""


def chart(results_dir, png) -> bool:
    res, _ = _load(results_dir)
    if not res:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in SIZES if s in res]
    metrics = [("prefill128_tok_s", "prefill 128"), ("prefill2048_tok_s", "prefill 2048"),
               ("decode128_tok_s", "decode @128"), ("decode2048_tok_s", "decode @2048")]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        summ = res[size]["summary"]
        engines = list(summ)
        w = 0.8 / max(len(engines), 1)
        for i, e in enumerate(engines):
            vals = [summ[e].get(k) or 0 for k, _ in metrics]
            xs = [j + (i - (len(engines) - 1) / 2) * w for j in range(len(metrics))]
            bars = ax.bar(xs, vals, w, label=f"{_label(e, res[size])} ({summ[e]['precision']})",
                          color={"bluelower": "C0", "llamacpp": "C1", "torch": "C2", "llamacpp-default": "C1",
                                 "llamacpp-no-extra": "C3", "llamacpp-repack": "C4"}.get(e))
            for b, v in zip(bars, vals):
                if v:
                    ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=6)
        ax.set_yscale("log")
        ax.set_xticks(range(len(metrics)), [m for _, m in metrics], fontsize=8)
        ax.set_ylabel("tokens/s (log)")
        ax.set_title(f"size {size} (2 threads; missing bar = not measured)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def write_docs(results_dir, root) -> None:
    global ROOT_IMG
    ROOT_IMG = os.path.join(root, "docs", "img")
    chart(results_dir, os.path.join(ROOT_IMG, "benchmarks.png"))
    block = BEGIN + "\n" + generated_markdown(results_dir) + "\n" + END
    path = os.path.join(root, "docs", "benchmarks.md")
    if os.path.isfile(path):
        text = open(path).read()
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            post = rest.split(END, 1)[1]
            text = pre + block + post
        else:
            text = text + "\n" + block + "\n"
    else:
        text = ("# LLM benchmarks: bluelower vs llama.cpp vs PyTorch\n\n"
                "```\n.venv/bin/python benchmarks/llm_bench.py --size 3b\n```\n\n## Results\n\n" + block + "\n")
    with open(path, "w") as fh:
        fh.write(text)
