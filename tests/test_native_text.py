"""The native runtime's text path: ``bluelower-run BUNDLE --prompt TEXT`` (docs/native-runtime.md,
"Text prompts") against the host Python runtime on the same bundle.

Checkpoints are written here with transformers (tiny random Llama and Idefics3 models) plus a
byte-level BPE tokenizer trained on a few sentences and a chat template, then built with
``bluelower build --hf DIR --soc host``: the binary's prompt ids, image position, tokens and
text must equal ``api.run``'s (``text.build_prompt``). One aarch64 bundle runs under qemu;
the real SmolLM2-135M (GGUF, fetched with pip) is skipped offline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bluelower import api
from bluelower.files import file_sha256
from bluelower.lowering.artifacts import device

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. What is in this picture?",
    "Café crème brûlée, naïve résumé, Ærøskøbing, ñandú.",
    "日本語のテキスト。中文汉字，한국어 텍스트。",
    "emoji 😀 🚀 👍🏽 and symbols © ® € ∑",
    "  leading spaces   and\ttabs\nnewlines\n\n  indented",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<end_of_utterance>",
            "<fake_token_around_image>", "<global-img>"]

# ChatML with a default system prompt (HuggingFaceTB/SmolLM2-135M-Instruct)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# HuggingFaceTB/SmolVLM-Instruct (Idefics3): user content is a list of image / text parts
SMOLVLM = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct: trims the user's text
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|im_start|>' + message['role'] + '<|im_end|>\n\n'+ message['content'] | trim"
    " + '<|endoftext|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"
)

PROMPTS = ["What is the capital of France?", "Café? 日本語 😀 naïve", "  spaced\n\nlines  ", "",
           "a <|im_end|> inside", "-starts with a dash"]
MAX_NEW = 8


def _tokenizer(template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   chat_template=template, clean_up_tokenization_spaces=False)


def _widen(model) -> None:
    with torch.no_grad():  # random init is near-uniform: widen it so tokens are decided
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)


def _llama_checkpoint(path: str, template: str = CHATML) -> str:
    tok = _tokenizer(template)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # vocab_size = the tokenizer's: random weights would pick ids that have no token
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=im_end,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    _widen(model)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _idefics3_checkpoint(path: str) -> str:
    tok = _tokenizer(SMOLVLM)
    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=512, bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
                         eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>")),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    torch.manual_seed(4)
    model = transformers.Idefics3ForConditionalGeneration(config)
    _widen(model)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _build(checkpoint: str, out: str, soc: str = "host", *extra: str) -> str:
    cmd = [sys.executable, "-m", "bluelower.cli", "-q", "build", "--hf", checkpoint, "--soc", soc, "--quant", "fp32",
           "-o", out, "--json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["bundle"]


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    tmp = tmp_path_factory.mktemp("llama")
    return _build(_llama_checkpoint(str(tmp / "ckpt")), str(tmp / "bundle"), "host", "--kv-capacity", "128",
                  "--prefill-chunk", "16")


@pytest.fixture(scope="module")
def vlm_bundle(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    tmp = tmp_path_factory.mktemp("vlm")
    return _build(_idefics3_checkpoint(str(tmp / "ckpt")), str(tmp / "bundle"), "host", "--kv-capacity", "256",
                  "--prefill-chunk", "32")


@pytest.fixture(scope="module")
def image_npy(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("img") / "img.npy")
    np.save(path, np.random.default_rng(3).integers(0, 256, size=(48, 80, 3), dtype=np.uint8))
    return path


def _native(bundle: str, *args: str) -> subprocess.CompletedProcess:
    cmd, env = device.native_command(bundle, [bundle, *args])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8")


def _native_json(bundle: str, *args: str) -> dict:
    proc = _native(bundle, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _host_prompt(bundle: str, prompt: str, image: str | None = None) -> tuple[list, int | None]:
    """build_prompt's ids (the image aside) and the number of ids before the image."""
    from bluelower.lowering.artifacts.bundle import read_manifest
    from bluelower.runtime_stubs.generate import load_tokenizer
    from bluelower.runtime_stubs.text import build_prompt

    manifest = read_manifest(bundle)
    tok, info = load_tokenizer(bundle, manifest), manifest["tokenizer"]
    segs = build_prompt(tok, info["chat_template"], prompt, has_image=image is not None,
                        image_placeholder=info.get("image_token"))
    segs = api._wrap_image(tok, segs, info.get("image_wrap") or ("", ""))
    ids = [i for s in segs if isinstance(s, list) for i in s]
    before = next((sum(len(s) for s in segs[:k]) for k, s in enumerate(segs) if not isinstance(s, list)), None)
    return ids, before


def _one_error_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def _edited_copy(bundle: str, dest: str, edit) -> str:
    """A copy of ``bundle`` whose manifest ``edit(manifest, dir)`` changed (edit re-hashes the
    files it rewrites; write_manifest re-hashes the manifest itself: manifest.sha256)."""
    from bluelower.lowering.artifacts.bundle import write_manifest

    shutil.copytree(bundle, dest)
    with open(os.path.join(dest, "manifest.json")) as fh:
        manifest = json.load(fh)
    edit(manifest, dest)
    write_manifest(dest, manifest)
    return dest


# ------------------------------------------------------------------------- text prompts


def test_manifest_has_the_native_prompt_parts(llama_bundle, vlm_bundle):
    from bluelower.lowering.artifacts.bundle import read_manifest

    tok = read_manifest(llama_bundle)["tokenizer"]
    assert tok["user_text"] == "verbatim"
    assert tok["chat_prompt"]["prefix"].endswith("<|im_start|>user\n")
    assert tok["chat_prompt_image"] == {**tok["chat_prompt"], "middle": ""}  # no image support: before the text
    vlm = read_manifest(vlm_bundle)["tokenizer"]
    assert vlm["chat_prompt_image"] == {"prefix": "<|im_start|>User:", "middle": "",
                                        "suffix": "<end_of_utterance>\nAssistant:"}
    assert vlm["image_wrap"] == ["<fake_token_around_image><global-img>", "<fake_token_around_image>"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_native_prompt_equals_host_runtime(llama_bundle, prompt):
    native = _native_json(llama_bundle, "--prompt", prompt, "--max-new-tokens", str(MAX_NEW))
    host = api.run(llama_bundle, prompt=prompt, max_new_tokens=MAX_NEW)
    assert native["prompt_ids"] == _host_prompt(llama_bundle, prompt)[0]
    assert native["tokens"] == host["tokens"]
    assert native["text"] == host["text"]
    assert native["prompt_rows"] == host["prompt_rows"] == len(native["prompt_ids"])


def test_native_streams_the_text(llama_bundle):
    prompt = PROMPTS[0]
    host = api.run(llama_bundle, prompt=prompt, max_new_tokens=MAX_NEW)
    proc = _native(llama_bundle, "--prompt", prompt, "--max-new-tokens", str(MAX_NEW))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == host["text"] + "\n"
    proc = _native(llama_bundle, "--prompt", prompt, "--max-new-tokens", str(MAX_NEW), "--json-stream")
    lines = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [ln["token"] for ln in lines if "token" in ln] == host["tokens"]  # one line per token, as generated
    assert "".join(ln["text"] for ln in lines[:-1]) == host["text"] == lines[-1]["text"]
    # api.run --native: the binary's stream through on_text, the same tokens
    pieces = []
    out = api.run(llama_bundle, prompt=prompt, max_new_tokens=MAX_NEW, native=True, on_text=pieces.append)
    assert out["tokens"] == host["tokens"] and "".join(pieces) == host["text"] == out["text"]
    assert out["prompt_match"] and out["runtime"] == "native"


def test_cli_run_native_prompt_check(llama_bundle):
    cmd = [sys.executable, "-m", "bluelower.cli", "run", llama_bundle, "--native", "--prompt", PROMPTS[1],
           "--max-new-tokens", "6", "--check"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    host = api.run(llama_bundle, prompt=PROMPTS[1], max_new_tokens=6)
    assert proc.stdout.splitlines()[0] == host["text"]
    assert "check: tokens match PyTorch" in proc.stdout


def test_stop_token_ids_end_generation(llama_bundle, tmp_path):
    """Any id of runtime.stop_token_ids ends generation (emitted), in both runtimes."""
    first = _native_json(llama_bundle, "--prompt", PROMPTS[0], "--max-new-tokens", str(MAX_NEW))["tokens"]
    stop = first[2]

    def edit(m, _):
        m["runtime"]["stop_token_ids"] = [stop]

    bundle = _edited_copy(llama_bundle, str(tmp_path / "b"), edit)
    want = first[:first.index(stop) + 1]
    assert _native_json(bundle, "--prompt", PROMPTS[0], "--max-new-tokens", str(MAX_NEW))["tokens"] == want
    assert api.run(bundle, prompt=PROMPTS[0], max_new_tokens=MAX_NEW)["tokens"] == want
    ids = ",".join(map(str, _host_prompt(bundle, PROMPTS[0])[0]))
    assert _native_json(bundle, "--prompt-ids", ids, "--max-new-tokens", str(MAX_NEW))["tokens"] == want


def test_trimming_template(tmp_path):
    """A template that trims the user's text (Llama 3's ``| trim``): user_text "strip", and the
    binary trims as Python's str.strip does."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    bundle = _build(_llama_checkpoint(str(tmp_path / "ckpt"), LLAMA3), str(tmp_path / "b"), "host",
                    "--kv-capacity", "64", "--prefill-chunk", "16")
    from bluelower.lowering.artifacts.bundle import read_manifest

    assert read_manifest(bundle)["tokenizer"]["user_text"] == "strip"
    for prompt in ("  spaced\n\nlines \u3000", "\u2003x\u00a0"):
        native = _native_json(bundle, "--prompt", prompt, "--max-new-tokens", "4")
        assert native["prompt_ids"] == _host_prompt(bundle, prompt)[0]
        assert native["tokens"] == api.run(bundle, prompt=prompt, max_new_tokens=4)["tokens"]


# ------------------------------------------------------------------------------- images


def _vlm_variant(vlm_bundle: str, dest: str, template: str | None) -> str:
    """The VLM bundle with another chat template (None: none): the manifest's prompt parts
    recomputed as the compile step writes them."""
    from bluelower.lowering.artifacts.compile import native_prompt_parts
    from bluelower.runtime_stubs.text import Tokenizer, chat_prompt_parts

    def edit(m, d):
        info = m["tokenizer"]
        tok = Tokenizer(os.path.join(d, "tokenizer.json"), bos_token=info["bos_token"], eos_token=info["eos_token"])
        info["chat_template"] = template
        info["chat_prompt"] = chat_prompt_parts(tok, template) if template else None
        info.update(native_prompt_parts(tok, template, info["chat_prompt"], info["image_token"]))

    return _edited_copy(vlm_bundle, dest, edit)


@pytest.mark.parametrize("template", ["smolvlm", "chatml", "none"])
def test_native_image_prompt_equals_host_runtime(vlm_bundle, image_npy, tmp_path, template):
    """The image's rows where build_prompt puts them: at the template's <image> (SmolVLM), before
    the user's text (a text-only ChatML template), after BOS (no template); image_wrap around."""
    bundle = vlm_bundle if template == "smolvlm" else _vlm_variant(vlm_bundle, str(tmp_path / "b"),
                                                                   CHATML if template == "chatml" else None)
    for prompt in ("What is in this picture?", "Café 😀"):
        native = _native_json(bundle, "--image", image_npy, "--prompt", prompt, "--max-new-tokens", str(MAX_NEW))
        ids, before = _host_prompt(bundle, prompt, image_npy)
        assert (native["prompt_ids"], native["image_position"]) == (ids, before)
        host = api.run(bundle, image=image_npy, prompt=prompt, max_new_tokens=MAX_NEW)
        assert native["tokens"] == host["tokens"] and native["text"] == host["text"]
        assert native["prompt_rows"] == host["prompt_rows"] and native["image_tokens"] == host["image_tokens"] > 0
    out = api.run(bundle, image=image_npy, prompt="What is in this picture?", max_new_tokens=4, native=True,
                  check=True)
    assert out["match"] and out["prompt_match"]


# ------------------------------------------------------------------------------- errors


def test_prompt_errors_are_one_line(llama_bundle, image_npy, tmp_path):
    proc = _native(llama_bundle, "--prompt", "hi", "--prompt-ids", "1,2")
    _one_error_line(proc, "give --prompt or --prompt-ids, not both")
    assert proc.returncode == 2
    _one_error_line(_native(llama_bundle, "--prompt", "hi", "--image", image_npy), "has no image encoder")
    _one_error_line(_native(llama_bundle, "--prompt", "caf\udce9"), "not valid UTF-8")  # the byte 0xE9 alone

    def no_tokenizer(m, d):
        m["tokenizer"] = None

    bare = _edited_copy(llama_bundle, str(tmp_path / "bare"), no_tokenizer)
    proc = _native(bare, "--prompt", "hi")
    _one_error_line(proc, "has no tokenizer")
    assert proc.returncode == 1 and proc.stdout == ""
    assert _native_json(bare, "--prompt-ids", "1,2,3", "--max-new-tokens", "2")["tokens"]  # ids still work

    def split_regex(m, d):  # a Llama 3 / Qwen style pre-tokenizer: decodes, does not encode natively
        path = os.path.join(d, "tokenizer.json")
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{L}+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        m["files"]["tokenizer.json"] = file_sha256(path)

    regex = _edited_copy(llama_bundle, str(tmp_path / "regex"), split_regex)
    _one_error_line(_native(regex, "--prompt", "hi"), "cannot be encoded natively")

    def huge_id(m, d):  # the dense id table must not be sized by the file (libFuzzer's 1.6 GB malloc)
        path = os.path.join(d, "tokenizer.json")
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        data["model"]["vocab"]["zz-huge"] = 50_000_000
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        m["files"]["tokenizer.json"] = file_sha256(path)

    _one_error_line(_native(_edited_copy(llama_bundle, str(tmp_path / "huge"), huge_id), "--prompt", "hi"),
                    "token id 50000000 out of range [0, 4194303]")

    def unsplit(m, d):
        m["tokenizer"]["chat_prompt"] = None
        m["tokenizer"]["user_text"] = None

    _one_error_line(_native(_edited_copy(llama_bundle, str(tmp_path / "unsplit"), unsplit), "--prompt", "hi"),
                    "give --prompt-ids")
    for args, needle in [(["--system", "be brief"], "--native has no --system"),
                         (["--temperature", "0.7"], "--native generates greedily")]:
        proc = subprocess.run([sys.executable, "-m", "bluelower.cli", "run", llama_bundle, "--native", "--prompt", "hi",
                               *args], capture_output=True, text=True)
        _one_error_line(proc, needle)


# ------------------------------------------------------------------------------ aarch64


@pytest.mark.slow
def test_aarch64_prompt_under_qemu(tmp_path):
    """The aarch64 runtime (cross-compiled tokenizer.cc) encodes the prompt as the host does and
    generates the PyTorch reference's tokens (run --native --check under qemu)."""
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install -y g++-aarch64-linux-gnu qemu-user)")
    bundle = _build(_llama_checkpoint(str(tmp_path / "ckpt")), str(tmp_path / "b"), "dimensity9300",
                    "--kv-capacity", "128", "--prefill-chunk", "16")
    prompt = "Café? What is in this picture?"
    out = api.run(bundle, prompt=prompt, max_new_tokens=6, native=True, check=True)
    assert out["arch"] == "aarch64"
    assert out["prompt_ids"] == _host_prompt(bundle, prompt)[0]
    assert out["match"], (out["tokens"], out["reference_tokens"])


# ---------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_native_answers_paris(tmp_path):
    """SmolLM2-135M-Instruct (GGUF, fp32 host bundle): the binary's answer names Paris and equals
    the host runtime's."""
    pytest.importorskip("gguf")
    from bluelower.errors import BlueLowerError
    from bluelower.lowering.frontend.downloads import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except BlueLowerError as exc:
        pytest.skip(f"SmolLM2 GGUF not available (offline?): {exc}")
    cmd = [sys.executable, "-m", "bluelower.cli", "-q", "build", "--gguf", gguf, "--soc", "host", "--quant", "fp32",
           "--kv-capacity", "256", "-o", str(tmp_path / "smol"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = json.loads(proc.stdout)["bundle"]
    prompt = "What is the capital of France?"
    proc = _native(bundle, "--prompt", prompt, "--max-new-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    host = api.run(bundle, prompt=prompt, max_new_tokens=24)
    assert proc.stdout == host["text"] + "\n"
