"""Accuracy of the APU's emulated numerics (EmulateAPUNumerics) against PyTorch fp32.

Usage::

    .venv/bin/python benchmarks/apu_numerics.py                       # tiny, dimensity9300, fp32 + w4a16kv8
    .venv/bin/python benchmarks/apu_numerics.py --modes fp32 --tokens 16 --json out.json

For each ``--quant`` mode the model is compiled twice for the SoC's APU on the build
machine's CPU (``bluelower.targets.soc.with_host_cpu``: the same partitions and precision
rules, host code): with the default pipeline (APU partitions rounded as the APU computes,
docs/apu-partitions.md "Numerics") and with ``--disable-pass EmulateAPUNumerics`` (the
partitions in fp32: the build's error without the APU's rounding). Both run one
deterministic image batch + a random prompt and are compared with the fp32 PyTorch model
with the same seeded weights:

* ``image``: the image tokens of ``encode_image`` (max abs error, ||err|| / ||ref||);
* ``logits``: the prefill logits and ``--tokens`` decode steps, teacher-forced (fed the
  reference's greedy tokens, so the error is per step): max abs error over all of them,
  the same divided by the largest reference |logit|, and the mean ||err|| / ||ref||;
* ``top1``: fraction of those steps whose argmax is the reference's token;
* ``greedy``: free-running greedy generation, leading tokens identical to the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bluelower.reports.eval_quant import _greedy, _sequence, _teacher_forced, eval_patches  # noqa: E402


def _metrics(image, ref_image, logits, ref_logits, greedy, ref_tokens) -> dict:
    got, ref = np.concatenate([np.ravel(x) for x in logits]), np.concatenate([np.ravel(x) for x in ref_logits])
    err = np.abs(got.astype(np.float64) - ref)
    top1 = [int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(logits, ref_logits)]
    prefix = next((i for i, (a, b) in enumerate(zip(greedy, ref_tokens)) if a != b), len(ref_tokens))
    rel = [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(logits, ref_logits)]
    return {
        "image_max_abs": float(np.abs(image - ref_image).max()),
        "image_rel": float(np.linalg.norm(image - ref_image) / np.linalg.norm(ref_image)),
        "logits_max_abs": float(err.max()),
        "logits_max_abs_over_max_ref": float(err.max() / np.abs(ref).max()),
        "logits_rel_mean": float(np.mean(rel)),
        "top1_agreement": float(np.mean(top1)),
        "steps": len(top1),
        "greedy_prefix": int(prefix),
        "greedy_tokens": len(ref_tokens),
    }


def evaluate(model: str, soc_name: str, modes, tokens: int, seed: int, work_dir: str) -> dict:
    from bluelower.runtime_stubs.generate import CompiledModel, TorchReference
    from bluelower.lowering.artifacts.compile import CompileRequest, compile_model
    from bluelower.lowering.models import load_config
    from bluelower.targets.soc import load_soc, with_host_cpu

    soc = with_host_cpu(load_soc(soc_name))
    if soc.apu is None:
        raise SystemExit(f"error: SoC '{soc_name}' has no APU: nothing to emulate")
    cfg = load_config(model).replace_runtime(image_batch=soc.image_batch)
    batch = cfg.runtime.image_batch
    patches = np.concatenate([eval_patches(cfg, seed + i) for i in range(batch)])
    prompt = [int(v) for v in np.random.default_rng(seed).integers(3, cfg.decoder.vocab_size, 24)]
    ref = TorchReference(cfg, None, seed)
    ref_image, ref_prefill, n = _sequence(ref, patches, prompt)
    ref_tokens = _greedy(ref, ref_prefill, n, tokens + 1)
    ref.reset_cache()
    _sequence(ref, patches, prompt)
    ref_logits = [ref_prefill] + _teacher_forced(ref, ref_tokens[:-1], n)

    rows = []
    for mode in modes:
        for emulate in (True, False):
            out = os.path.join(work_dir, f"{cfg.name}-{mode}-{'emulated' if emulate else 'fp32'}")
            manifest = compile_model(CompileRequest(
                model=model, out_dir=out, quant=mode, seed=seed, soc=soc,
                disabled_passes=() if emulate else ("EmulateAPUNumerics",)))
            built = CompiledModel(out)
            image, prefill, _ = _sequence(built, patches, prompt)
            greedy = _greedy(built, prefill, n, tokens + 1)
            built.reset_cache()
            _sequence(built, patches, prompt)
            logits = [prefill] + _teacher_forced(built, ref_tokens[:-1], n)
            emu = next(p["stats"] for p in manifest["passes"] if p["name"] == "EmulateAPUNumerics")
            row = {"mode": mode, "apu_numerics": "emulated" if emulate else "fp32 (pass disabled)",
                   "apu_partitions": len(manifest.get("apu_partitions", [])),
                   "rounded_values": int(emu.get("rounded_values", 0))}
            row.update(_metrics(image, ref_image, logits, ref_logits, greedy, ref_tokens))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return {"model": cfg.name, "soc": soc_name, "apu": soc.apu.name, "accumulate": soc.apu.accumulate,
            "image_batch": batch, "prompt_tokens": len(prompt), "seed": seed, "rows": rows}


def table(report: dict) -> str:
    lines = ["| `--quant` | APU partitions | logits max abs err | / max \\|ref logit\\| | logits rel. err (mean) "
             "| image tokens rel. err | top-1 agreement | greedy: identical leading tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['mode']} | {r['apu_numerics']} | {r['logits_max_abs']:.2e} "
                     f"| {r['logits_max_abs_over_max_ref']:.2e} | {r['logits_rel_mean']:.2e} | {r['image_rel']:.2e} "
                     f"| {r['top1_agreement'] * r['steps']:.0f} / {r['steps']} "
                     f"| {r['greedy_prefix']} / {r['greedy_tokens']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--soc", default="dimensity9300")
    ap.add_argument("--modes", default="fp32,w4a16kv8")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps compared (teacher-forced and greedy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args()
    from bluelower.errors import BlueLowerError

    work = tempfile.mkdtemp(prefix="bluelower-apu-numerics-")
    try:
        report = evaluate(args.model, args.soc, [m.strip() for m in args.modes.split(",") if m.strip()],
                          args.tokens, args.seed, work)
    except BlueLowerError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print(f"{report['model']} on {report['soc']} ({report['apu']}, accumulate {report['accumulate']}), "
          f"image batch {report['image_batch']}, {report['prompt_tokens']}-token prompt, seed {report['seed']}")
    print(table(report))


if __name__ == "__main__":
    main()
