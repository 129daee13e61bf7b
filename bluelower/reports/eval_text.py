"""Accuracy of each ``--quant`` mode on a real checkpoint and a real text, through the builds.

``bluelower eval-quant --gguf FILE | --hf DIR --text FILE`` compiles one host build per
mode from the checkpoint and measures it as it runs (:func:`evaluate_checkpoint`):

* **perplexity** of the text's first ``tokens`` tokens (the build's tokenizer, its special
  tokens applied), teacher-forced through the compiled entries: a one-row prefill of the
  first token, then the compiled ``decode`` step for every following token, which fills
  the KV cache as generation does (the INT8 cache of a ``kv8`` mode is read back at every
  step); every token from the second on is scored;
* against the **fp32 reference** (bluelower's PyTorch modules on the checkpoint's fp32
  weights, the same procedure): ``top1_agreement_vs_fp32`` (share of positions whose argmax
  is the reference's) and ``max_logit_error`` (max |logit - reference logit|);
* **per phase**: ``decode`` (the positions above) and ``prefill`` (the whole text prefilled
  chunk by chunk, the logits at the end of each chunk, as a long prompt runs);
* **greedy**: ``greedy_tokens`` tokens generated after the first ``greedy_prompt`` tokens,
  and how many leading ones equal the fp32 reference's;
* with ``transformers`` installed, the fp32 reference itself against transformers'
  implementation on the same file (``transformers`` row: its perplexity, the reference's
  max logit error against it), so the figures rest on a model bluelower did not write;
* optionally (``sensitivity=True``) the **per-layer sensitivity table**: the perplexity
  with only one group of weights in INT4 (symmetric, group 32, round-to-nearest), in
  PyTorch on transformers' model (``lowering/quant/evaluate.py``): each linear kind over
  all layers, each layer's linears, the token table, the logits' weight -- what a recipe
  file (``--recipe``) should keep at higher precision.

:func:`write_section` puts the table into a Markdown file between markers, with the
command that regenerates it and a fingerprint of the code that produced the numbers
(:func:`code_fingerprint`; ``tests/test_quant_doc.py`` fails when the code changed since).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time

import numpy as np

from .. import progress
from ..errors import BlueLowerError
from ..files import read_user_text

# the files whose code decides the numbers of the table (formats, quantizers, kernels'
# stored values, the passes that rewrite the graph, this harness)
FINGERPRINTED = (
    "lowering/quant/modes.py", "lowering/quant/params.py", "lowering/quant/recipe.py", "lowering/quant/stored.py",
    "lowering/quant/gptq.py", "lowering/quant/calibration.py", "lowering/quant/activations.py",
    "lowering/kernels/quant.py", "lowering/kernels/search.py", "lowering/kernels/linear.py",
    "lowering/kernels/linear_a8.py",
    "lowering/kernels/attention.py", "lowering/kernels/embedding.py", "passes/quantize_weights.py",
    "passes/quantize_kv_cache.py", "reports/eval_text.py", "reports/eval_quant.py",
)


def code_fingerprint() -> str:
    """sha256 (16 hex digits) over :data:`FINGERPRINTED`'s contents."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for rel in FINGERPRINTED:
        path = os.path.join(root, rel)
        h.update(rel.encode() + b"\0")
        if os.path.exists(path):
            with open(path, "rb") as fh:
                h.update(fh.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


def read_text(path: str) -> str:
    """The evaluation text (:func:`files.read_user_text`: UTF-8, not empty; one line otherwise)."""
    return read_user_text(path, "--text")[1]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, targets) -> float:
    """exp(mean NLL) of ``targets`` [T] under ``logits`` [T, V]."""
    lp = _log_softmax(logits)
    nll = -lp[np.arange(len(targets)), np.asarray(targets)]
    return float(math.exp(nll.mean()))


def compare(logits: np.ndarray, ref: np.ndarray) -> dict:
    """``{top1_agreement, max_logit_error, positions}`` of ``logits`` against ``ref``."""
    return {"top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
            "max_logit_error": float(np.abs(logits.astype(np.float64) - ref).max()),
            "positions": int(logits.shape[0])}


def teacher_forced(backend, ids: list) -> np.ndarray:
    """Logits ``[len(ids) - 1, V]``: position i predicts ``ids[i + 1]``; a one-row prefill of
    ``ids[0]``, then the decode step for every following token."""
    from ..runtime_stubs.generate import generate

    res = generate(backend, None, [ids[0]], len(ids) - 1, forced=ids[1:], keep_logits=True)
    return res.logits


def prefill_ends(backend, ids: list) -> tuple[np.ndarray, list]:
    """The logits at the end of each prefill chunk when ``ids`` is prefilled chunk by chunk
    (``[chunks, V]``) and the positions they predict: one pass over the prompt (a causal
    model's logits at a chunk's end do not depend on the chunks after it)."""
    from ..runtime_stubs.generate import check_capacity
    from ..runtime_stubs.text import check_prompt_ids

    c = backend.chunk
    seq = check_prompt_ids(list(ids), backend.vocab_size)
    check_capacity(0, len(seq), 1, backend.capacity)
    arr = np.asarray(seq, dtype=np.int64)
    backend.reset_cache()
    rows, ends = [], []
    for start in range(0, arr.size, c):
        part = arr[start : start + c]
        valid = part.size
        padded = np.zeros(c, np.int64)
        padded[:valid] = part
        embeds = np.asarray(backend.embed_chunk(padded), dtype=np.float32)
        if valid < c:
            embeds = np.concatenate([embeds[:valid], np.zeros((c - valid, embeds.shape[1]), np.float32)])
        logits = backend.prefill_chunk(np.ascontiguousarray(embeds), start, valid)
        rows.append(np.array(logits[0], copy=True))
        ends.append(start + valid)
    return np.stack(rows), ends


def greedy(backend, prompt: list, n: int) -> list:
    from ..runtime_stubs.generate import generate

    res = generate(backend, None, prompt, n)
    return list(res.tokens)


def _equal_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _weight_bytes(build_dir: str) -> int:
    return os.path.getsize(os.path.join(build_dir, "params.safetensors"))


def transformers_logits(checkpoint: str, ids: list):
    """transformers' fp32 logits ``[len(ids), V]`` of ``ids`` (one forward), or ``(None,
    reason)`` when transformers cannot load the checkpoint here."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None, "transformers is not installed"
    try:
        if os.path.isdir(checkpoint):
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(checkpoint)),
                                                         gguf_file=os.path.basename(checkpoint), dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
        return (model, out), None
    except Exception as exc:  # noqa: BLE001 (transformers' own loading errors: reported, not fatal)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


SENSITIVITY_KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def sensitivity(model, ids, ref=None, on_row=None) -> list[dict]:
    """Perplexity with only one group of weights in INT4 (symmetric, group 32, RTN), the
    rest fp32: each linear kind over all layers, each layer's linears, the token table's
    lookups, the logits' weight. ``model``: a transformers LLaMA-family causal LM; ``ref``:
    its :func:`lowering.quant.evaluate.reference` on ``ids`` (computed when None)."""
    from ..lowering.quant.evaluate import evaluate_recipe, reference
    from ..lowering.quant.recipe import recipe_from_data

    if ref is None:
        ref = reference(model, np.asarray(ids))
    int4 = {"format": "int4", "group_size": 32}
    probes = {f"all layers' {k}": [{"match": f"model.layers.*.{k}.weight", **int4}] for k in SENSITIVITY_KINDS}
    probes["token table (lookups)"] = [{"role": "embedding", "use": "table", **int4}]
    probes["lm_head (the logits' weight)"] = [{"role": "lm_head", **int4}]
    for i in range(model.config.num_hidden_layers):
        probes[f"layer {i} (its linears)"] = [{"role": ["attention", "mlp"], "layers": [i], **int4}]
    rows = []
    for label, rules in probes.items():
        score, _ = evaluate_recipe(model, np.asarray(ids), recipe_from_data(rules), ref)
        rows.append({"weights": label, "perplexity": score.ppl, "vs_fp32": score.ppl / ref.score.ppl,
                     "mean_kl": score.kl})
        if on_row is not None:
            on_row(rows[-1])
    return rows


def evaluate_checkpoint(checkpoint: str, text_path: str, modes, tokens: int = 512, greedy_prompt: int = 16,
                        greedy_tokens: int = 32, with_sensitivity: bool = False, work_dir: str | None = None,
                        group_size: int | None = None) -> dict:
    """The report of the module docstring, as a JSON-friendly dict."""
    from ..lowering.artifacts.bundle import read_manifest
    from ..lowering.artifacts.compile import CompileRequest, compile_model
    from ..runtime_stubs.generate import CompiledModel, load_tokenizer, reference_for_build

    text = read_text(text_path)
    modes = list(modes)
    if "fp32" not in modes:
        modes = ["fp32"] + modes  # the reference build's tokenizer and the fp32 row
    owned = work_dir is None
    work = tempfile.mkdtemp(prefix="bluelower-eval-") if owned else work_dir
    report = {"checkpoint": os.path.basename(os.path.normpath(checkpoint)), "text": os.path.basename(text_path),
              "code_fingerprint": code_fingerprint(), "modes": []}
    try:
        builds = {}
        for mode in modes:
            out = os.path.join(work, mode)
            with progress.step(f"eval-quant: compile --quant {mode}"):
                kwargs = {} if group_size is None else {"group_size": group_size}
                compile_model(CompileRequest(checkpoint=checkpoint, out_dir=out, quant=mode, soc="host", force=True,
                                             **kwargs))
            builds[mode] = out
        manifest = read_manifest(builds["fp32"])
        tok = load_tokenizer(builds["fp32"], manifest)
        if tok is None:
            raise BlueLowerError(f"{checkpoint}: no tokenizer in the checkpoint: eval-quant --text needs one")
        ids = tok.encode(text)[:tokens]
        capacity = manifest["runtime"]["kv_capacity"]
        if len(ids) < 2:
            raise BlueLowerError(f"--text {text_path}: {len(ids)} token(s); at least 2 are needed")
        if len(ids) >= capacity or greedy_prompt + greedy_tokens > capacity:
            raise BlueLowerError(f"--text-tokens {len(ids)} does not fit the build's KV cache of {capacity} tokens "
                                 "(use fewer --text-tokens)")
        report.update(tokens=len(ids), kv_capacity=capacity, prefill_chunk=manifest["runtime"]["prefill_chunk"],
                      greedy_prompt=greedy_prompt, greedy_tokens=greedy_tokens)
        targets = ids[1:]
        gprompt = ids[:greedy_prompt]

        with progress.step(f"eval-quant: fp32 PyTorch reference on {len(ids)} tokens"):
            ref = reference_for_build(builds["fp32"])
            ref_logits = teacher_forced(ref, ids)
            ref_prefill, ends = prefill_ends(ref, ids)
            ref_greedy = greedy(ref, gprompt, greedy_tokens)
            del ref
        report["reference"] = {"name": "fp32 PyTorch (bluelower's modules on the checkpoint's fp32 weights)",
                               "perplexity": perplexity(ref_logits, targets)}
        hf_model = None
        with progress.step("eval-quant: transformers on the same file"):
            got, why = transformers_logits(checkpoint, ids)
        if got is None:
            report["transformers"] = {"skipped": why}
        else:
            hf_model, hf_logits = got
            report["transformers"] = {"perplexity": perplexity(hf_logits[:-1], targets),
                                      "reference_max_logit_error": float(np.abs(hf_logits[:-1] - ref_logits).max()),
                                      "reference_top1_agreement": compare(ref_logits, hf_logits[:-1])["top1_agreement"]}
        ref_ppl = report["reference"]["perplexity"]
        for mode in modes:
            t = time.time()
            with progress.step(f"eval-quant: --quant {mode} on {len(ids)} tokens"):
                model = CompiledModel(builds[mode])
                logits = teacher_forced(model, ids)
                pre, _ = prefill_ends(model, ids)
                gen = greedy(model, gprompt, greedy_tokens)
                kv = model.manifest.get("kv_cache", {}).get("dtype")
                del model
            ppl = perplexity(logits, targets)
            dec = compare(logits, ref_logits)
            row = {"mode": mode, "perplexity": ppl, "perplexity_vs_fp32": ppl / ref_ppl,
                   "top1_agreement_vs_fp32": dec["top1_agreement"], "max_logit_error": dec["max_logit_error"],
                   "greedy_equal_tokens": _equal_prefix(gen, ref_greedy), "greedy_equal": gen == ref_greedy,
                   "phases": {"decode": dec, "prefill": compare(pre, ref_prefill)},
                   "kv_cache": kv, "weight_bytes": _weight_bytes(builds[mode]), "seconds": round(time.time() - t, 1)}
            report["modes"].append(row)
            progress.log(f"{mode}: perplexity {ppl:.4f} ({ppl / ref_ppl:.4f} x fp32), top-1 "
                         f"{dec['top1_agreement']:.3f}, max logit error {dec['max_logit_error']:.3g}")
        if with_sensitivity:
            if hf_model is None:
                raise BlueLowerError(f"eval-quant --sensitivity needs transformers' model of the checkpoint "
                                     f"({report['transformers']['skipped']})")
            with progress.step("eval-quant: per-layer sensitivity (INT4 RTN, one group at a time)"):
                report["sensitivity"] = sensitivity(
                    hf_model, ids, on_row=lambda r: progress.log(f"{r['weights']}: {r['perplexity']:.4f}"))
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    return report


def format_text_table(report: dict) -> str:
    """The report as Markdown tables."""
    lines = [f"{report['checkpoint']}, {report['tokens']} tokens of {report['text']} "
             f"(KV cache {report['kv_capacity']}, prefill chunk {report['prefill_chunk']}); fp32 reference "
             f"perplexity {report['reference']['perplexity']:.4f}."]
    tf = report.get("transformers", {})
    if "perplexity" in tf:
        lines[0] += (f" transformers on the same file: perplexity {tf['perplexity']:.4f}, the reference's max logit "
                     f"error against it {tf['reference_max_logit_error']:.2g}, top-1 agreement "
                     f"{tf['reference_top1_agreement']:.3f}.")
    else:
        lines[0] += f" (transformers not compared: {tf.get('skipped')})"
    lines += ["", "| mode | perplexity | vs fp32 | top-1 vs fp32 | max logit error | prefill top-1 / max error "
                  f"| greedy tokens equal (of {report['greedy_tokens']}) | KV cache | weights |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["modes"]:
        p = r["phases"]["prefill"]
        lines.append(f"| `{r['mode']}` | {r['perplexity']:.4f} | {r['perplexity_vs_fp32']:.4f} | "
                     f"{r['top1_agreement_vs_fp32']:.3f} | {r['max_logit_error']:.3g} | "
                     f"{p['top1_agreement']:.3f} / {p['max_logit_error']:.3g} | {r['greedy_equal_tokens']}"
                     f"{' (all)' if r['greedy_equal'] else ''} | {r['kv_cache']} | {r['weight_bytes'] / 1e6:.1f} MB |")
    if report.get("sensitivity"):
        lines += ["", "| only these weights in INT4 (sym, g32, RTN) | perplexity | vs fp32 | mean KL |",
                  "|---|---|---|---|"]
        for r in report["sensitivity"]:
            lines.append(f"| {r['weights']} | {r['perplexity']:.4f} | {r['vs_fp32']:.4f} | {r['mean_kl']:.4f} |")
    return "\n".join(lines)


BEGIN = "<!-- BEGIN eval-quant {name}: generated, do not edit -->"
END = "<!-- END eval-quant {name} -->"


def write_section(path: str, name: str, body: str, command: str, fingerprint: str | None = None) -> None:
    """Replace (or append) the section ``name`` of Markdown file ``path``: ``body`` between the
    markers, with the command that regenerates it and the code fingerprint (``fingerprint``:
    the one recorded when the numbers were made, so code changed during the run shows as
    stale; default: now)."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    if fingerprint is None:
        fingerprint = code_fingerprint()
    block = (f"{begin}\n\nRegenerate with `{command}` (code fingerprint `{fingerprint}`; "
             f"tests/test_quant_doc.py fails when the code that makes these numbers changed since).\n\n"
             f"{body}\n\n{end}")
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def section_fingerprint(path: str, name: str) -> str | None:
    """The code fingerprint recorded in section ``name`` of ``path`` (None: no section)."""
    import re

    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    begin = BEGIN.format(name=name)
    if begin not in text:
        return None
    m = re.search(r"code fingerprint `([0-9a-f]+)`", text[text.index(begin):])
    return m.group(1) if m else None
