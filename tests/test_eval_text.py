"""eval-quant on a real-format checkpoint and a text (reports/eval_text.py): one host build per
mode measured as it runs, the fp32 row against transformers, one-line errors, the doc section."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from click.testing import CliRunner  # noqa: E402

from bluelower.cli import cli  # noqa: E402
from bluelower.reports import eval_text  # noqa: E402

from test_native_text import CORPUS, _llama_checkpoint  # noqa: E402

MODES = "fp32,w8,w4a16kv8"


@pytest.fixture(scope="module")
def checkpoint_and_text(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaltext")
    ckpt = _llama_checkpoint(str(d / "llama"))
    text = d / "text.txt"
    text.write_text(" ".join(CORPUS * 3), encoding="utf-8")
    return ckpt, str(text)


@pytest.fixture(scope="module")
def report(checkpoint_and_text):
    ckpt, text = checkpoint_and_text
    res = CliRunner().invoke(cli, ["--quiet", "eval-quant", "--hf", ckpt, "--text", text, "--text-tokens", "48",
                                   "--greedy-tokens", "8", "--modes", MODES, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _transformers_perplexity(ckpt, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    nll = -torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return math.exp(float(nll.mean()))


def test_every_mode_has_its_row(report):
    assert [r["mode"] for r in report["modes"]] == MODES.split(",")
    assert report["tokens"] == 48
    for r in report["modes"]:
        for key in ("perplexity", "top1_agreement_vs_fp32", "max_logit_error", "greedy_equal_tokens"):
            assert isinstance(r[key], (int, float)) and np.isfinite(r[key]), (r["mode"], key)
        assert r["phases"]["decode"]["positions"] == 47 and r["phases"]["prefill"]["positions"] >= 1
    by = {r["mode"]: r for r in report["modes"]}
    assert by["w4a16kv8"]["kv_cache"] == "int8" and by["fp32"]["kv_cache"] == "float32"
    assert by["w4a16kv8"]["weight_bytes"] < by["w8"]["weight_bytes"] < by["fp32"]["weight_bytes"]


def test_fp32_build_equals_transformers(report, checkpoint_and_text):
    """The fp32 build's perplexity is transformers' on the same ids (computed here, not by the
    harness), and the reference agrees with transformers to float32 noise."""
    from transformers import AutoTokenizer

    ckpt, text = checkpoint_and_text
    ids = AutoTokenizer.from_pretrained(ckpt)(open(text, encoding="utf-8").read()).input_ids[:48]
    want = _transformers_perplexity(ckpt, ids)
    fp32 = report["modes"][0]
    assert fp32["perplexity"] == pytest.approx(want, rel=1e-4)
    assert fp32["top1_agreement_vs_fp32"] == 1.0 and fp32["max_logit_error"] < 1e-3 and fp32["greedy_equal"]
    tf = report["transformers"]
    assert tf["perplexity"] == pytest.approx(want, rel=1e-6) and tf["reference_max_logit_error"] < 1e-3


def test_quantized_rows_are_close_but_not_exact(report):
    by = {r["mode"]: r for r in report["modes"]}
    assert 0 < by["w8"]["max_logit_error"] < by["w4a16kv8"]["max_logit_error"]
    assert by["w8"]["perplexity_vs_fp32"] == pytest.approx(1.0, abs=0.05)


def test_table_and_doc_section(report, tmp_path):
    table = eval_text.format_text_table(report)
    assert table.count("\n| `") == 3 and "greedy tokens equal" in table
    doc = tmp_path / "q.md"
    doc.write_text("# Title\n\nhand-written text\n", encoding="utf-8")
    eval_text.write_section(str(doc), "m", table, "bluelower eval-quant ...")
    eval_text.write_section(str(doc), "m", table.replace("fp32", "FP32"), "bluelower eval-quant ...")
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nhand-written text\n") and text.count("BEGIN eval-quant m") == 1
    assert "`FP32`" in text and eval_text.section_fingerprint(str(doc), "m") == eval_text.code_fingerprint()


@pytest.mark.parametrize("args, fragment", [
    (["--text", "TEXT"], "--text goes with --gguf / --hf"),
    (["--hf", "CKPT"], "they need a --text"),
    (["--hf", "CKPT", "--text", "MISSING"], "not found"),
    (["--hf", "CKPT", "--text", "EMPTY"], "the file is empty"),
    (["--hf", "CKPT", "--gguf", "x.gguf", "--text", "TEXT"], "not both"),
    (["--sensitivity"], "go with --hf/--gguf"),
    (["--hf", "CKPT", "--text", "TEXT", "--text-tokens", "1"], "--text-tokens 1 is out of range"),
])
def test_bad_eval_inputs(args, fragment, checkpoint_and_text, tmp_path):
    ckpt, text = checkpoint_and_text
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    sub = {"CKPT": ckpt, "TEXT": text, "MISSING": str(tmp_path / "nope.txt"), "EMPTY": str(empty)}
    res = CliRunner().invoke(cli, ["--quiet", "eval-quant", *[sub.get(a, a) for a in args]], catch_exceptions=False)
    err = res.stderr.strip().splitlines()
    assert res.exit_code != 0 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_prefill_ends_in_one_pass_equals_each_prefix(checkpoint_and_text, tmp_path):
    """prefill_ends prefills the text once; each chunk end's logits are what a prefill of
    exactly that prefix gives (the runtime's own generate, one prefix at a time)."""
    from bluelower.lowering.artifacts.compile import CompileRequest, compile_model
    from bluelower.runtime_stubs.generate import CompiledModel, generate

    ckpt, _text = checkpoint_and_text
    out = str(tmp_path / "w4")
    compile_model(CompileRequest(checkpoint=ckpt, out_dir=out, quant="w4a16kv8", soc="host", prefill_chunk=8))
    model = CompiledModel(out)
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 200, size=21)]
    rows, ends = eval_text.prefill_ends(model, ids)
    assert ends == [8, 16, 21] and rows.shape[0] == 3
    for row, end in zip(rows, ends):
        want = generate(model, None, ids[:end], 1, keep_logits=True).logits[0]
        np.testing.assert_allclose(row, want, rtol=0, atol=1e-5)
