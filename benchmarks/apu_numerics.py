"""Accuracy of the APU's emulated numerics (EmulateAPUNumerics) against PyTorch fp32.

Usage::

    .venv/bin/python benchmarks/apu_numerics.py                       # tiny, dimensity9300, fp32 + w4a16kv8
    .venv/bin/python benchmarks/apu_numerics.py --modes fp32 --tokens 16 --json out.json
    .venv/bin/python benchmarks/apu_numerics.py --gguf smollm2 --modes w4a16kv8 --text-tokens 512

For each ``--quant`` mode the model is compiled for the SoC's APU on the build machine's
CPU (``bluelower.targets.soc.with_host_cpu``: the same partitions and precision rules, host
code) in up to three variants: the SoC file's own rules (on the Dimensity 9300 the paper's:
decoder activations INT16, ViT/projector FP16; docs/apu-partitions.md "Numerics"), the
same without ``apu.activations`` (every APU operator in its float dtype, fp16) when the file
sets it, and ``--disable-pass EmulateAPUNumerics`` (the partitions in fp32: the build's
error without the APU's rounding).

With ``--model`` (seeded weights) each build runs one deterministic image batch + a random
prompt and is compared with the fp32 PyTorch model with the same weights:

* ``image``: the image tokens of ``encode_image`` (max abs error, ||err|| / ||ref||);
* ``logits``: the prefill logits and ``--tokens`` decode steps, teacher-forced (fed the
  reference's greedy tokens, so the error is per step): max abs error over all of them,
  the same divided by the largest reference |logit|, and the mean ||err|| / ||ref||;
* ``top1``: fraction of those steps whose argmax is the reference's token;
* ``greedy``: free-running greedy generation, leading tokens identical to the reference's.

With ``--gguf FILE`` / ``--hf DIR`` (a real checkpoint; ``--gguf smollm2`` fetches
SmolLM2-135M-Instruct, docs/compile-your-own-model.md) each build is teacher-forced over the
first ``--text-tokens`` tokens of ``--text`` as it runs (the first token through ``prefill``,
then one ``decode`` step per token): its perplexity, and per step the top-1 agreement and
the max logit error against the fp32-partition build of the same mode.
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


def variants(soc):
    """``[(label, SoC, disabled passes)]``: the file's rules, fp16 activations, fp32 partitions."""
    import dataclasses

    out = [("emulated" + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(soc.apu.activations.items())) + ")"
                          if soc.apu.activations else ""), soc, ())]
    if soc.apu.activations:
        plain = dataclasses.replace(soc, apu=dataclasses.replace(soc.apu, activations={}))
        out.append(("emulated (every operator fp16)", plain, ()))
    out.append(("fp32 (pass disabled)", soc, ("EmulateAPUNumerics",)))
    return out


def _text_logits(built, ids) -> np.ndarray:
    """Teacher-forced logits over ``ids`` as a build runs: prefill the first token, then decode."""
    built.reset_cache()
    rows = built.embed_chunk(np.asarray([ids[0]] + [0] * (built.chunk - 1), np.int64))
    logits = [built.prefill_chunk(rows, 0, 1)[0]]
    for pos, tok in enumerate(ids[1:-1], start=1):
        logits.append(built.decode_step(int(tok), pos)[0])
    return np.stack(logits)


def _perplexity(logits: np.ndarray, targets) -> float:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    nll = np.log(np.exp(x).sum(axis=-1)) - x[np.arange(len(targets)), np.asarray(targets)]
    return float(np.exp(nll.mean()))


def evaluate_checkpoint(path: str, soc_name: str, modes, text: str, n_tokens: int, work_dir: str) -> dict:
    from bluelower.lowering.artifacts.compile import CompileRequest, compile_model
    from bluelower.lowering.frontend.sources import checkpoint_source
    from bluelower.runtime_stubs.generate import CompiledModel
    from bluelower.runtime_stubs.text import Tokenizer
    from bluelower.targets.soc import load_soc, with_host_cpu

    soc = with_host_cpu(load_soc(soc_name))
    if soc.apu is None:
        raise SystemExit(f"error: SoC '{soc_name}' has no APU: nothing to emulate")
    info = checkpoint_source(path).tokenizer
    ids = Tokenizer(info.json_text).encode(open(text, encoding="utf-8").read())[:n_tokens]
    capacity = 1 << max(7, (len(ids) - 1).bit_length())
    rows = []
    for mode in modes:
        got = {}
        for label, variant, disabled in variants(soc):
            out = os.path.join(work_dir, f"{mode}-{len(got)}")
            manifest = compile_model(CompileRequest(checkpoint=path, out_dir=out, quant=mode, soc=variant,
                                                    disabled_passes=disabled, kv_capacity=capacity))
            got[label] = _text_logits(CompiledModel(out), ids)
            emu = next((p["stats"] for p in manifest["passes"] if p["name"] == "EmulateAPUNumerics"), {})
            rows.append({"mode": mode, "apu_numerics": label, "apu_partitions": len(manifest.get("apu_partitions", [])),
                         "rounded_values": int(emu.get("rounded_values", 0)),
                         "integer_values": int(emu.get("integer_values", 0)),
                         "perplexity": _perplexity(got[label], ids[1:])})
            shutil.rmtree(out, ignore_errors=True)
        base = got["fp32 (pass disabled)"]
        for r in rows[-len(got):]:
            lg = got[r["apu_numerics"]]
            r["top1_agreement_vs_fp32_partitions"] = float(np.mean(np.argmax(lg, -1) == np.argmax(base, -1)))
            r["max_logit_error_vs_fp32_partitions"] = float(np.abs(lg - base).max())
            print(json.dumps(r), file=sys.stderr)
    return {"model": os.path.basename(os.path.normpath(path)), "soc": soc_name, "apu": soc.apu.name,
            "accumulate": soc.apu.accumulate, "text": os.path.basename(text), "text_tokens": len(ids), "rows": rows}


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
        for k, (label, variant, disabled) in enumerate(variants(soc)):
            out = os.path.join(work_dir, f"{cfg.name}-{mode}-{k}")
            manifest = compile_model(CompileRequest(model=model, out_dir=out, quant=mode, seed=seed, soc=variant,
                                                    disabled_passes=disabled))
            built = CompiledModel(out)
            image, prefill, _ = _sequence(built, patches, prompt)
            greedy = _greedy(built, prefill, n, tokens + 1)
            built.reset_cache()
            _sequence(built, patches, prompt)
            logits = [prefill] + _teacher_forced(built, ref_tokens[:-1], n)
            emu = next(p["stats"] for p in manifest["passes"] if p["name"] == "EmulateAPUNumerics")
            row = {"mode": mode, "apu_numerics": label,
                   "apu_partitions": len(manifest.get("apu_partitions", [])),
                   "rounded_values": int(emu.get("rounded_values", 0)),
                   "integer_values": int(emu.get("integer_values", 0))}
            row.update(_metrics(image, ref_image, logits, ref_logits, greedy, ref_tokens))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return {"model": cfg.name, "soc": soc_name, "apu": soc.apu.name, "accumulate": soc.apu.accumulate,
            "image_batch": batch, "prompt_tokens": len(prompt), "seed": seed, "rows": rows}


def table(report: dict) -> str:
    if "text_tokens" in report:
        lines = ["| `--quant` | APU partitions | perplexity | top-1 vs fp32 partitions | max logit error vs fp32 partitions |",
                 "|---|---|---|---|---|"]
        for r in report["rows"]:
            lines.append(f"| {r['mode']} | {r['apu_numerics']} | {r['perplexity']:.4f} "
                         f"| {r['top1_agreement_vs_fp32_partitions']:.2%} | {r['max_logit_error_vs_fp32_partitions']:.3g} |")
        return "\n".join(lines)
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
    ap.add_argument("--gguf", default=None, help="a GGUF checkpoint ('smollm2': SmolLM2-135M-Instruct) instead of --model")
    ap.add_argument("--hf", default=None, help="a Hugging Face checkpoint directory instead of --model")
    ap.add_argument("--text", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bluelower",
                                                   "reports", "texts", "english.txt"))
    ap.add_argument("--text-tokens", type=int, default=512, help="tokens of --text scored (checkpoints)")
    args = ap.parse_args()
    from bluelower.errors import BlueLowerError

    work = tempfile.mkdtemp(prefix="bluelower-apu-numerics-")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        if args.gguf or args.hf:
            path = args.hf or args.gguf
            if path == "smollm2":
                from bluelower.lowering.frontend.downloads import smollm2_gguf

                path = smollm2_gguf()
            report = evaluate_checkpoint(path, args.soc, modes, args.text, args.text_tokens, work)
        else:
            report = evaluate(args.model, args.soc, modes, args.tokens, args.seed, work)
    except BlueLowerError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    if "text_tokens" in report:
        print(f"{report['model']} on {report['soc']} ({report['apu']}, accumulate {report['accumulate']}), "
              f"{report['text_tokens']} tokens of {report['text']}")
    else:
        print(f"{report['model']} on {report['soc']} ({report['apu']}, accumulate {report['accumulate']}), "
              f"image batch {report['image_batch']}, {report['prompt_tokens']}-token prompt, seed {report['seed']}")
    print(table(report))


if __name__ == "__main__":
    main()
