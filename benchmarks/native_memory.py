"""Peak RSS of a native bundle's run against the memory plan in its manifest.

Usage::

    .venv/bin/bluelower build --model bluelm-v-3b --soc native -o dist/3b-native
    .venv/bin/python benchmarks/native_memory.py dist/3b-native --prompt-tokens 1984 --new-tokens 64
    .venv/bin/python benchmarks/native_memory.py dist/3b-native --image photo.npy --prompt-tokens 64

Runs the bundle's own ``bin/bluelower-run`` (this machine's architecture: a ``--soc host`` or
``--soc native`` bundle) once with seeded random prompt ids (and the image, if given) and
reads its peak resident set size (``ru_maxrss`` of the child). Compares it with the
manifest's ``memory_plan``: the planned total of the phases the run goes through (prefill and
decode; image encoding too with ``--image``), whose largest is what the run may need.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompt-tokens", type=int, default=1984)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image", help=".npy uint8 [H, W, 3] image (the image phase is planned then)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    manifest = json.load(open(os.path.join(args.bundle, "manifest.json"), encoding="utf-8"))
    plan = {p["name"]: p for p in manifest["memory_plan"]["phases"]}
    vocab = int(manifest["runtime"]["vocab_size"])
    rng = random.Random(args.seed)
    ids = ",".join(str(rng.randrange(min(1000, vocab - 1), vocab)) for _ in range(args.prompt_tokens))
    cmd = [os.path.join(args.bundle, "bin", "bluelower-run"), args.bundle, "--prompt-ids", ids,
           "--max-new-tokens", str(args.new_tokens), "--json"]
    if args.image:
        cmd += ["--image", args.image]
    env = dict(os.environ, TVM_NUM_THREADS=str(args.threads))
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stderr.strip(), file=sys.stderr)
        return proc.returncode
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    phases = ["prefill", "decode"] + (["image_encoding"] if args.image else [])
    planned = max(plan[p]["total_bytes"] for p in phases if p in plan)
    print(f"bundle {args.bundle}: {out['prompt_rows']} prompt rows ({out['image_tokens']} image tokens) + "
          f"{len(out['tokens'])} new tokens, {wall:.1f} s")
    print("| phase | weights | KV cache | arena | outputs + held | planned total |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in phases:
        if p in plan:
            q = plan[p]
            print(f"| {p} | {q['weights_bytes']:,} | {q['kv_cache_bytes']:,} | {q['arena_bytes']:,} | "
                  f"{q['outputs_bytes'] + q['held_bytes'] + q['kv_copy_bytes']:,} | {q['total_bytes']:,} |")
    print(f"measured peak RSS {rss:,} bytes = {rss / planned:.4f} x the planned peak of these phases "
          f"({planned:,}); the manifest's peak over all phases: {manifest['memory_plan']['peak_bytes']:,} "
          f"({manifest['memory_plan']['peak_phase']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
