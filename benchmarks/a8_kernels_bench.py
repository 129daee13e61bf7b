"""Micro-benchmark: the int8-activation linear kernels (w4a8 / w8a8) against the float ones.

Indicative only on a shared machine; the project lead runs benchmarks on a quiet one. Hot
weights (no rotation), median of ``--repeats`` runs after warm-up, ``TVM_NUM_THREADS`` threads.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/a8_kernels_bench.py --shapes 128x2560x2560,1x2560x6912
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import tvm

from bluelower.lowering.kernels import host_target, int4_linear, int8_linear, quant as Q
from bluelower.lowering.kernels import linear_a8 as A


def _build(f):
    return tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=host_target())["main"]


def _time(fn, args, repeats):
    for _ in range(3):
        fn(*args)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="128x2560x2560,128x6912x2560,1x2560x2560,1x6912x2560")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--isa", default=None, help="default: dot_isa(host_target())")
    args = ap.parse_args()
    isa = args.isa or A.dot_isa(host_target())
    dev = tvm.cpu()
    print(f"load average {os.getloadavg()}, isa {isa}, TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}")
    print("| M x N x K | kernel | median ms | min ms | GMAC/s (median) |\n|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        M, N, K = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((M, K)).astype(np.float32)
        w = rng.standard_normal((N, K)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((M, N), np.float32), dev)
        xt = tvm.runtime.tensor(x, dev)
        xq, sx = A.quantize_act_rows(x)
        q4 = Q.quantize_int4_groupwise(w, 32, layout="k1")
        q4k4 = Q.quantize_int4_groupwise(w, 32, layout="k4")
        p8, s8 = Q.quantize_int8_per_channel(w)
        xs32 = A.act_sums(xq, 32)
        a8 = [tvm.runtime.tensor(a, dev) for a in (xq, sx, xs32)]
        pre = _build(A.quantize_act_int8(M, K, 32))
        outs = [tvm.runtime.tensor(np.zeros_like(a), dev) for a in (xq, sx, xs32)]
        rows = [
            ("int4 float (w4a16)", _build(int4_linear(M, N, K, 32)), [xt, *[tvm.runtime.tensor(a, dev) for a in q4], y]),
            (f"int4 a8 {isa}", _build(A.int4_a8_linear(M, N, K, 32, isa=isa)),
             [*a8, *[tvm.runtime.tensor(a, dev) for a in q4k4], y]),
            ("int8 float (w8)", _build(int8_linear(M, N, K)), [xt, tvm.runtime.tensor(p8, dev), tvm.runtime.tensor(s8, dev), y]),
            (f"int8 a8 {isa}", _build(A.int8_a8_linear(M, N, K, isa=isa)),
             [*a8, tvm.runtime.tensor(A.int8_k1_to_k4(p8), dev), tvm.runtime.tensor(s8, dev), y]),
            ("activation pre-pass", pre, [xt, *outs]),
        ]
        for name, fn, fargs in rows:
            med, mn = _time(fn, fargs, args.repeats)
            print(f"| {shape} | {name} | {med:.3f} | {mn:.3f} | {M * N * K / med / 1e6:.1f} |")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
