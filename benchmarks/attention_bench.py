"""Benchmark the fused attention kernel (one layer of the bluelm-v-3b decoder) on this CPU.

Usage::

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/attention_bench.py                 # all cases
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/attention_bench.py --cases decode \
        --fills 2048 --kv int8 --schedules grouped

Shape (``--config``, default bluelm-v-3b): ``q [q_heads, T, head_dim]`` (32 x T x 80), the
cache ``[1 layer, 2, kv_heads, capacity, head_dim (+4 for INT8)]`` (8 KV heads, capacity
2048, GQA rep 4), causal with ``pos`` = the fill. Cases: ``decode`` (T = 1, query at
position ``fill - 1``, i.e. ``fill`` keys read) and ``prefill`` (a chunk of
``--chunk`` = 128 queries at positions ``fill - chunk .. fill - 1``). Schedules: ``rowwise``
(the previous scalar kernel, one task per query row) and ``grouped`` (the current one).

For each case it reports the median and min time of ``--repeat`` calls and the effective
KV read bandwidth = bytes of K and V rows the call must read (``kv_heads x keys x row
bytes x 2``) / time. The kernel reads one layer's slice, as in the model; to read it from
DRAM (as decode does: 32 layers x 2.75 MB at fill 2048 do not fit any cache) the calls
cycle through copies of the cache totalling ``--rotate-mb`` (default 256; 0 = hot cache).
Every schedule's output is checked against a NumPy reference (dequantized cache, float64).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "2")

import tvm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bluelower.lowering.kernels import host_target  # noqa: E402
from bluelower.lowering.kernels.attention import (KV_SCALE_BYTES, dequantize_kv_rows, fused_attention,  # noqa: E402
                                                  quantize_kv_rows)
from bluelower.lowering.models import load_config  # noqa: E402

THREADS = int(os.environ["TVM_NUM_THREADS"])


from kernels_bench import _loadavg, _time  # noqa: E402  (shared timing helpers; warm-up 3)


def reference(q, k, v, pos, scale, rep):
    """float64 NumPy causal attention: q [QH, T, D], k/v [KVH, C, D], pos [T]."""
    out = np.zeros(q.shape, np.float64)
    for h in range(q.shape[0]):
        for t in range(q.shape[1]):
            n = min(int(pos[t]) + 1, k.shape[1])
            s = k[h // rep, :n].astype(np.float64) @ q[h, t].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[h, t] = p @ v[h // rep, :n].astype(np.float64) / p.sum()
    return out


def bench(case, fill, kv, schedule, dims, chunk, repeat, rotate_bytes, target, rng):
    qh, kvh, D, cap = dims["q_heads"], dims["kv_heads"], dims["head_dim"], dims["capacity"]
    rep = qh // kvh
    T_ = 1 if case == "decode" else chunk
    if fill < T_ or fill > cap:
        raise SystemExit(f"error: fill {fill} must be in [{T_}, {cap}] for {case}")
    pos = np.arange(fill - T_, fill, dtype=np.int64)
    width = D + KV_SCALE_BYTES if kv == "int8" else D
    cache_shape = (1, 2, kvh, cap, width)
    func = fused_attention(rows=qh, q_heads=qh, rep=rep, q_len=T_, head_dim=D, kv_len=cap, k_shape=cache_shape,
                           k_prefix=(0, 0), v_shape=cache_shape, v_prefix=(0, 1), scale=D ** -0.5, causal=True,
                           kv_int8=kv == "int8", schedule=schedule)
    t0 = time.perf_counter()
    f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]
    compile_s = time.perf_counter() - t0
    kvf = rng.standard_normal((1, 2, kvh, cap, D)).astype(np.float32)
    cache = quantize_kv_rows(kvf) if kv == "int8" else kvf
    deq = dequantize_kv_rows(cache) if kv == "int8" else kvf
    q = rng.standard_normal((qh, T_, D)).astype(np.float32)
    copies = max(1, math.ceil(rotate_bytes / cache.nbytes)) if rotate_bytes > 0 else 1
    caches = [tvm.runtime.tensor(cache) for _ in range(copies)]
    qt, post = tvm.runtime.tensor(q), tvm.runtime.tensor(pos)
    out = tvm.runtime.tensor(np.zeros((qh, T_, D), np.float32))
    state = {"i": 0}

    def call():
        c = caches[state["i"] % copies]
        state["i"] += 1
        f(qt, c, c, post, out)

    med, mn = _time(call, repeat)
    ref = reference(q, deq[0, 0], deq[0, 1], pos, D ** -0.5, rep)
    err = float(np.abs(out.numpy() - ref).max() / np.abs(ref).max())
    kv_bytes = kvh * fill * width * cache.itemsize * 2
    return dict(case=case, T=T_, fill=fill, kv=kv, schedule=schedule, ms=med * 1e3, min_ms=mn * 1e3,
                mb=kv_bytes / 1e6, gbs=kv_bytes / med / 1e9, gbs_min=kv_bytes / mn / 1e9, err=err,
                compile_s=compile_s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bluelm-v-3b", help="model config for the decoder dims")
    ap.add_argument("--cases", default="decode,prefill", help="decode, prefill")
    ap.add_argument("--fills", default="128,2048", help="cache fills for decode (prefill uses the largest)")
    ap.add_argument("--chunk", type=int, default=128, help="prefill chunk (query rows)")
    ap.add_argument("--kv", default="int8,fp32", help="cache formats: int8, fp32")
    ap.add_argument("--schedules", default="rowwise,grouped", help="rowwise (previous kernel), grouped")
    ap.add_argument("--repeat", type=int, default=0, help="calls per measurement (default 50 grouped, 5 rowwise; "
                                                          "prefill: 10 / 2)")
    ap.add_argument("--rotate-mb", type=int, default=256, help="cache copies to cycle through (0 = hot cache)")
    ap.add_argument("--out", default=None, help="also write the markdown to this file")
    args = ap.parse_args(argv)

    try:
        cfg = load_config(args.config)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise SystemExit(f"error: cannot load config {args.config!r}: {exc}") from None
    dec = cfg.decoder
    dims = dict(q_heads=dec.num_heads, kv_heads=dec.num_kv_heads, head_dim=dec.head_dim,
                capacity=cfg.runtime.kv_capacity)
    for name, opts, allowed in (("cases", args.cases, {"decode", "prefill"}), ("kv", args.kv, {"int8", "fp32"}),
                                ("schedules", args.schedules, {"rowwise", "grouped"})):
        bad = set(opts.split(",")) - allowed
        if bad:
            raise SystemExit(f"error: --{name}: unknown {sorted(bad)}, choose from {sorted(allowed)}")
    try:
        fills = [int(x) for x in args.fills.split(",")]
    except ValueError:
        raise SystemExit(f"error: --fills must be a comma list of ints, got {args.fills!r}") from None
    if not 1 <= args.chunk <= dims["capacity"]:
        raise SystemExit(f"error: --chunk must be in [1, {dims['capacity']}], got {args.chunk}")
    for fill in fills:
        if not 1 <= fill <= dims["capacity"] or ("prefill" in args.cases and fill == max(fills) and fill < args.chunk):
            raise SystemExit(f"error: --fills: {fill} must be in [1, {dims['capacity']}] (and >= --chunk for the "
                             "prefill case, which uses the largest fill)")
    if args.repeat < 0 or args.rotate_mb < 0:
        raise SystemExit("error: --repeat and --rotate-mb must be >= 0")

    target = host_target()
    rng = np.random.default_rng(0)
    lines = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    emit(f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, LLVM mcpu={target.attrs.get('mcpu', '')}, "
         f"TVM_NUM_THREADS={THREADS}, rotate={args.rotate_mb} MB")
    emit(f"Shape ({args.config}): q_heads {dims['q_heads']}, kv_heads {dims['kv_heads']}, head_dim "
         f"{dims['head_dim']}, capacity {dims['capacity']}")
    emit(f"Load average at start: {_loadavg()}")
    rows = []
    for case in args.cases.split(","):
        for fill in (fills if case == "decode" else [max(fills)]):
            for kv in args.kv.split(","):
                for sch in args.schedules.split(","):
                    rep = args.repeat or {("decode", "grouped"): 50, ("decode", "rowwise"): 5,
                                          ("prefill", "grouped"): 10, ("prefill", "rowwise"): 2}[(case, sch)]
                    r = bench(case, fill, kv, sch, dims, args.chunk, rep, args.rotate_mb * 2**20, target, rng)
                    print(f"  {case} T={r['T']} fill={fill} {kv} {sch}: {r['ms']:.3f} ms (min {r['min_ms']:.3f}) "
                          f"err {r['err']:.1e}", file=sys.stderr, flush=True)
                    rows.append(r)
    emit(f"Load average at end: {_loadavg()}")
    emit()
    emit("| case | queries | fill | KV | schedule | KV MB read | median ms | min ms | KV GB/s (median) | "
         "KV GB/s (min) | speed-up (median) | max rel. err vs float64 | compile s |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["case"], r["fill"], r["kv"]): r["ms"] for r in rows if r["schedule"] == "rowwise"}
    for r in rows:
        b = base.get((r["case"], r["fill"], r["kv"]))
        speed = f"{b / r['ms']:.1f}x" if b else ""
        emit(f"| {r['case']} | {r['T']} | {r['fill']} | {r['kv']} | {r['schedule']} | {r['mb']:.2f} | {r['ms']:.3f} | "
             f"{r['min_ms']:.3f} | {r['gbs']:.1f} | {r['gbs_min']:.1f} | {speed} | {r['err']:.1e} | "
             f"{r['compile_s']:.1f} |")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
