"""Benchmark the compiler's linear kernels against numpy (OpenBLAS) and torch on this CPU.

Usage::

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/kernels_bench.py            # all
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/kernels_bench.py --m 1 \
        --shapes 6912x2560 --kernels int4,int8

For each (M, N, K) it reports the median (and min) time of ``--repeat`` runs and the
effective weight-read bandwidth = bytes of the stored weights (packed codes + scales,
or fp32 W) / time. To measure DRAM rather than cache bandwidth, each kernel cycles
through enough copies of its weights to exceed ``--rotate-mb`` (default 512 MB), so a
call never finds its weights in L2/L3 from the previous call (``--rotate-mb 0`` = hot).
The memory read bandwidth reference is a ``torch.sum`` with the same thread count
(plus a 1-thread ``numpy.sum``) over a 1 GiB float32 array, measured before and after the
kernels; "% of mem BW" uses the larger of the two. Thread count: ``TVM_NUM_THREADS``
(default 2) is also applied to torch and, via ``OPENBLAS_NUM_THREADS``, to numpy.

Output: a markdown table on stdout (also written to ``--out`` if given).
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
os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ["TVM_NUM_THREADS"])

import torch  # noqa: E402
import tvm  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bluelower.lowering.kernels import (  # noqa: E402
    fp32_linear,
    host_target,
    int4_linear,
    int8_linear,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)

THREADS = int(os.environ["TVM_NUM_THREADS"])
DECODER_SHAPES = [(2560, 2560), (6912, 2560), (2560, 6912), (100096, 2560)]


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "n/a"


def _time(fn, repeat: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), float(np.min(ts))


def memory_bandwidth(repeat: int = 7) -> dict[str, float]:
    """Read bandwidth (GB/s, median) of sum over a 1 GiB float32 array."""
    a = np.ones(2**28, dtype=np.float32)
    t = torch.from_numpy(a)
    torch.set_num_threads(THREADS)
    med_t, _ = _time(lambda: t.sum(), repeat, warmup=2)
    med_n, _ = _time(lambda: a.sum(), repeat, warmup=1)
    return {f"torch.sum {THREADS} thr": a.nbytes / med_t / 1e9, "numpy.sum 1 thr": a.nbytes / med_n / 1e9}


def _build(func, target):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target)["main"]


def _rotating(arrays: list[np.ndarray], rotate_bytes: int) -> list[list[tvm.runtime.Tensor]]:
    nbytes = sum(a.nbytes for a in arrays)
    copies = max(1, math.ceil(rotate_bytes / nbytes)) if rotate_bytes > 0 else 1
    return [[tvm.runtime.tensor(a) for a in arrays] for _ in range(copies)]


def bench_shape(M, N, K, kernels, target, repeat, rotate_bytes, rng):
    rows = []
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K), dtype=np.float32) * 0.02).astype(np.float32)
    xt = tvm.runtime.tensor(x)
    yt = tvm.runtime.tensor(np.zeros((M, N), np.float32))
    flops = 2.0 * M * N * K
    ref = None

    def add(name, nbytes, med, mn, err=None):
        rows.append(dict(M=M, N=N, K=K, kernel=name, ms=med * 1e3, min_ms=mn * 1e3,
                         gbs=nbytes / med / 1e9, gflops=flops / med / 1e9, mb=nbytes / 1e6, err=err))

    def run_tvm(name, func, warr, ref_w):
        f = _build(func, target)
        sets = _rotating(warr, rotate_bytes)
        state = {"i": 0}

        def call():
            ws = sets[state["i"] % len(sets)]
            state["i"] += 1
            f(xt, *ws, yt)

        med, mn = _time(call, repeat)
        y = yt.numpy()
        r = x @ ref_w.T
        err = float(np.abs(y - r).max() / (np.abs(r).max() + 1e-30))
        add(name, sum(a.nbytes for a in warr), med, mn, err)
        del sets

    if "int4" in kernels:
        p, s = quantize_int4_groupwise(w, 32)
        from bluelower.lowering.kernels import dequantize_int4_groupwise

        run_tvm("bluelower int4 g32", int4_linear(M, N, K, 32), [p, s], dequantize_int4_groupwise(p, s, 32))
        del p, s
    if "int4k4" in kernels:
        p, s = quantize_int4_groupwise(w, 32, layout="k4")
        from bluelower.lowering.kernels import dequantize_int4_groupwise

        name = "bluelower int4 g32 k4 (VNNI, int8 x)" if M == 1 else "bluelower int4 g32 k4"
        run_tvm(name, int4_linear(M, N, K, 32, layout="k4"), [p, s], dequantize_int4_groupwise(p, s, 32))
        del p, s
    if "int8" in kernels:
        p, s = quantize_int8_per_channel(w)
        from bluelower.lowering.kernels import dequantize_int8_per_channel

        run_tvm("bluelower int8", int8_linear(M, N, K), [p, s], dequantize_int8_per_channel(p, s))
        del p, s
    if "fp32" in kernels:
        run_tvm("bluelower fp32", fp32_linear(M, N, K), [w], w)
    rot = max(1, math.ceil(rotate_bytes / w.nbytes)) if rotate_bytes > 0 else 1
    if "numpy" in kernels:
        ws = [w] + [w.copy() for _ in range(rot - 1)]
        state = {"i": 0}

        def np_call():
            wi = ws[state["i"] % len(ws)]
            state["i"] += 1
            return x @ wi.T

        med, mn = _time(np_call, repeat)
        add("numpy fp32 (OpenBLAS)", w.nbytes, med, mn)
        del ws
    if "torch" in kernels:
        torch.set_num_threads(THREADS)
        xt_ = torch.from_numpy(x)
        ws = [torch.from_numpy(w)] + [torch.from_numpy(w.copy()) for _ in range(rot - 1)]
        state = {"i": 0}

        def t_call():
            wi = ws[state["i"] % len(ws)]
            state["i"] += 1
            with torch.no_grad():
                return torch.nn.functional.linear(xt_, wi)

        med, mn = _time(t_call, repeat)
        add("torch fp32 F.linear", w.nbytes, med, mn)
        del ws
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,128", help="comma list of M (1 = decode GEMV, 128 = prefill chunk)")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in DECODER_SHAPES), help="NxK list")
    ap.add_argument("--kernels", default="int4,int4k4,int8,fp32,numpy,torch",
                    help="int4 (layout k1, portable), int4k4 (layout k4: VNNI GEMV, needs AVX512-VNNI), "
                         "int8, fp32, numpy, torch")
    ap.add_argument("--repeat", type=int, default=0, help="runs per measurement (default 30 GEMV, 5 GEMM)")
    ap.add_argument("--rotate-mb", type=int, default=512, help="weight copies to cycle through (0 = hot cache)")
    ap.add_argument("--out", default=None, help="also write the markdown to this file")
    args = ap.parse_args(argv)

    target = host_target()
    rng = np.random.default_rng(0)
    kernels = set(args.kernels.split(","))
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
         f"TVM_NUM_THREADS={THREADS}, torch threads={THREADS}, rotate={args.rotate_mb} MB")
    emit(f"Load average at start: {_loadavg()} (other processes on these 2 cores inflate medians; "
         "min ms is the least-disturbed run)")
    bw = memory_bandwidth()
    emit("Memory read bandwidth at start (1 GiB float32 sum, median of 7): "
         + ", ".join(f"{k} = {v:.1f} GB/s" for k, v in bw.items()))
    emit()
    rows = []
    for m in (int(v) for v in args.m.split(",")):
        repeat = args.repeat or (30 if m == 1 else 5)
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            for r in bench_shape(m, n, k, kernels, target, repeat, args.rotate_mb * 2**20, rng):
                print(f"  {m} {n}x{k} {r['kernel']}: {r['ms']:.3f} ms (min {r['min_ms']:.3f})", file=sys.stderr,
                      flush=True)
                rows.append(r)
    bw_end = memory_bandwidth()
    emit("Memory read bandwidth at end: " + ", ".join(f"{k} = {v:.1f} GB/s" for k, v in bw_end.items()))
    emit(f"Load average at end: {_loadavg()}")
    key = f"torch.sum {THREADS} thr"
    ref_bw = max(bw[key], bw_end[key])
    emit(f"Reference bandwidth for '% of mem BW' = max of the two {key} = {ref_bw:.1f} GB/s")
    fp32_stream = [r["gbs"] for r in rows if r["M"] == 1 and "fp32" in r["kernel"]]
    stream_bw = max(fp32_stream) if fp32_stream else float("nan")
    emit(f"Best fp32 GEMV stream in this run (median) = {stream_bw:.1f} GB/s: a stricter reference, "
         "'% of fp32 stream' uses it")
    emit()
    emit("| M | N x K | kernel | weight MB | median ms | min ms | weight GB/s (median) | % of mem BW | "
         "% of fp32 stream | GB/s (min) | GFLOP/s (median) | rel. err |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        err = "" if r["err"] is None else f"{r['err']:.1e}"
        gbs_min = r["mb"] * 1e6 / (r["min_ms"] * 1e-3) / 1e9
        emit(f"| {r['M']} | {r['N']} x {r['K']} | {r['kernel']} | {r['mb']:.1f} | {r['ms']:.3f} | {r['min_ms']:.3f} | "
             f"{r['gbs']:.1f} | {100 * r['gbs'] / ref_bw:.0f}% | {100 * r['gbs'] / stream_bw:.0f}% | {gbs_min:.1f} | {r['gflops']:.1f} | {err} |")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
