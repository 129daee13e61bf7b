"""docs/quantization.md's generated accuracy tables are for this code: every `eval-quant`
section records the fingerprint of the code that made its numbers (reports/eval_text.py
FINGERPRINTED: the quantizers, kernels, quantization passes and the harness), and it must be
today's. Regenerate with the command each section names (benchmarks/quant_doc.py for
SmolLM2, `bluelower eval-quant --model tiny --model mid --write-doc docs/quantization.md` for
random weights) after changing any of those files."""

from __future__ import annotations

import os
import re

from bluelower.reports import eval_text

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "quantization.md")


def _sections() -> dict:
    text = open(DOC, encoding="utf-8").read()
    names = re.findall(r"<!-- BEGIN eval-quant (\S+): generated, do not edit -->", text)
    return {n: text[text.index(eval_text.BEGIN.format(name=n)):text.index(eval_text.END.format(name=n))]
            for n in names}


def test_the_real_model_and_random_weight_tables_are_there():
    sections = _sections()
    assert "random-weights" in sections, sorted(sections)
    real = [n for n in sections if n.endswith(".gguf")]
    assert real, f"no section for a real checkpoint (.gguf): {sorted(sections)}"
    for name in real:
        body = sections[name]
        for mode in ("fp32", "w8", "w4a16kv8"):
            assert f"`{mode}`" in body, (name, mode)


def test_every_generated_table_is_for_this_code():
    want = eval_text.code_fingerprint()
    stale = {n: eval_text.section_fingerprint(DOC, n) for n in _sections()}
    stale = {n: f for n, f in stale.items() if f != want}
    assert not stale, (f"docs/quantization.md sections made by other code (fingerprints {stale}, this code "
                       f"{want}): regenerate them with the command each names")
