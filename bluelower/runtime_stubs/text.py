"""The text path of the runtime: prompt text in, streamed text out.

Four parts, each usable alone:

- :class:`Tokenizer` reads a Hugging Face ``tokenizer.json`` with the ``tokenizers``
  library (the same code transformers runs, so ids and text match it), and
  :class:`StreamDecoder` turns generated ids into text one id at a time.
- :func:`render_chat` renders a chat template in the Jinja environment of transformers'
  ``apply_chat_template``; :func:`build_prompt` turns one user turn (text, maybe an
  image) into prompt segments: lists of token ids and :data:`IMAGE` where the image
  tokens go.
- :class:`Sampler`: greedy, temperature, top-k and top-p sampling, seeded.
- :func:`stop_token_ids` and :func:`token_stream`: the end-of-generation ids and the
  decode loop that uses the rest.

Where the image goes. A template that supports images (its user content is a list of
``{"type": "image"}`` / ``{"type": "text"}`` parts, as in SmolVLM or Idefics3) writes a
placeholder such as ``<image>`` where the image belongs; the image tokens replace it. A
template without image support (a text-only chat model) gets the plain text message and
the image goes immediately before the user's text, after the template's role header
(with no template at all: after the tokenizer's leading special tokens such as BOS).

How a runtime strings them together::

    tok = Tokenizer.from_dir(path)  # or Tokenizer(json_text, bos_token=..., eos_token=...)
    segments = build_prompt(tok, tok.chat_template, "What is this?", has_image=True,
                            image_placeholder="<image>")  # [ids, IMAGE, ids]
    stops = stop_token_ids(tok, eos_token_id=config_eos_ids)
    out = tok.stream(skip_special_tokens=True)
    for t in token_stream(first_logits, decode_step, Sampler(0.7, top_p=0.9, seed=0), stops, n):
        print(out.put(t), end="")
    print(out.flush())

The native runtime's counterpart is ``native/tokenizer.cc`` (decoding, streaming, and
encoding for byte-level and SentencePiece-style BPE), tested against this module.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from ..errors import BlueLowerError

# ------------------------------------------------------------------------ prompt ids

# one id of ``--prompt-ids``: ASCII digits with an optional sign, spaces/tabs around (the
# native runtime's strtoll after trimming " \t": no "1_0", no full-width digits, no "1e3")
_PROMPT_ID = re.compile(r"[ \t]*[+-]?[0-9]+[ \t]*")


def parse_prompt_ids(text: str) -> list[int]:
    """``--prompt-ids 1,2,3``: comma-separated decimal integers, parsed as ``bluelower-run``
    parses them (an empty or blank text: no ids); one line otherwise."""
    if not text.strip(" \t"):
        return []
    parts = text.split(",")
    if not all(_PROMPT_ID.fullmatch(p) for p in parts):
        raise BlueLowerError(f"--prompt-ids must be comma-separated integers, got '{text}'")
    return [int(p) for p in parts]


def check_prompt_ids(ids, vocab_size: int) -> list[int]:
    """``ids`` as ints, each in ``[0, vocab_size)`` (bools, floats and strings are refused)."""
    out = []
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise BlueLowerError(f"prompt ids must be integers, got {i!r}")
        if not 0 <= int(i) < vocab_size:
            raise BlueLowerError(f"prompt ids must be in [0, {vocab_size}), got {int(i)}")
        out.append(int(i))
    return out


# ------------------------------------------------------------------------ tokenizer


def _token_content(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``) plus the names of its BOS and
    EOS tokens, which ``tokenizer.json`` itself does not record.

    ``source`` is the JSON text of a ``tokenizer.json`` or a path to one. Ids and text are
    the ``tokenizers`` library's, which is what transformers' ``PreTrainedTokenizerFast``
    returns with ``clean_up_tokenization_spaces=False``.
    """

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None):
        from tokenizers import Tokenizer as _Backend

        text, what = _read_tokenizer_json(source)
        try:
            self._backend = _Backend.from_str(text)
        except Exception as exc:  # the Rust parser raises a bare Exception
            raise BlueLowerError(f"{what}: not a tokenizer.json: {str(exc).splitlines()[0]}") from None
        self.json_text = text
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        added = self._backend.get_added_tokens_decoder()
        self.special_tokens = {tok.content: i for i, tok in sorted(added.items()) if tok.special}
        self.vocab_size = max([self._backend.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in added])
        decoder = json.loads(text).get("decoder")
        # ids of <0xNN> tokens the ByteFallback decoder turns into bytes (empty without one)
        self.byte_fallback_ids = frozenset(
            i for tok, i in self._backend.get_vocab(with_added_tokens=False).items() if _is_byte_token(tok)
        ) if _has_decoder(decoder, "ByteFallback") else frozenset()

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        """A saved Hugging Face tokenizer: ``tokenizer.json`` plus, when present,
        ``tokenizer_config.json`` (BOS/EOS names, ``chat_template``) and
        ``chat_template.jinja`` (the template as newer transformers save it)."""
        config = {}
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as fh:
                    config = json.load(fh)
            except (OSError, ValueError) as exc:
                raise BlueLowerError(f"{config_path}: cannot read: {exc}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as fh:
                template = fh.read()
        return cls(os.path.join(path, "tokenizer.json"), bos_token=_token_content(config.get("bos_token")),
                   eos_token=_token_content(config.get("eos_token")), chat_template=template)

    # ids <-> text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_piece(self, text: str) -> list[int]:
        """Ids of ``text`` as a piece from the middle of a prompt (after a special token or
        an image), so SentencePiece adds no word-start space it would add at a string's
        start; the same trick as transformers' ``_encode_chat_piece``."""
        newline = self.encode("\n", add_special_tokens=False)
        ids = self.encode("\n" + text, add_special_tokens=False)
        if ids[: len(newline)] == newline:
            return ids[len(newline):]
        return self.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; requires every id in ``[0, vocab_size)``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise BlueLowerError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        """Whether ``decode(..., skip_special_tokens=True)`` drops this id (the library
        compares the token's string with the special added tokens)."""
        return self.id_to_token(token_id) in self.special_tokens

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


def _is_byte_token(token: str) -> bool:
    # the ByteFallback decoder's test: "<0x" two hex digits ">"
    if len(token) != 6 or not (token.startswith("<0x") and token.endswith(">")):
        return False
    try:
        int(token[3:5], 16)
    except ValueError:
        return False
    return True


def _has_decoder(decoder, kind: str) -> bool:
    if not isinstance(decoder, dict):
        return False
    return decoder.get("type") == kind or any(_has_decoder(d, kind) for d in decoder.get("decoders") or [])


def _read_tokenizer_json(source: str) -> tuple[str, str]:
    if not isinstance(source, (str, os.PathLike)):
        raise BlueLowerError(f"a tokenizer is a tokenizer.json text or path, got {type(source).__name__}")
    source = os.fspath(source)
    if source.lstrip().startswith("{"):
        return source, "tokenizer.json"
    if not os.path.isfile(source):
        raise BlueLowerError(f"tokenizer.json not found: {source}")
    try:
        with open(source, encoding="utf-8") as fh:
            return fh.read(), source
    except (OSError, UnicodeDecodeError) as exc:
        raise BlueLowerError(f"{source}: cannot read: {exc}") from None


class StreamDecoder:
    """Generated ids in, final text out, one id at a time.

    Ensures ``"".join(put(i) for i in ids) + flush() == tokenizer.decode(ids, skip)``.
    Text is held back while it ends in an incomplete UTF-8 character (a byte-level token
    that splits a character decodes to U+FFFD until the rest comes), and while the last
    token is a ``<0xNN>`` byte-fallback token: that decoder turns a whole run of byte
    tokens into U+FFFD per byte when the run is not valid UTF-8, so a later byte can change
    the text of earlier ones.
    Each step decodes a short window, the previously emitted tokens as context plus the
    new ones, so word-start spaces (SentencePiece ``▁``, stripped only at the very start)
    come out as they do in the whole sequence and a step costs O(1), not O(length).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: the context tokens
        self._read = 0  # tokens before this index are emitted
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._chunks)

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def put(self, token_id: int) -> str:
        """Feed one id; returns the text it completes (often empty)."""
        token_id = int(token_id)
        if not 0 <= token_id < self._tok.vocab_size:
            raise BlueLowerError(f"token id {token_id} is outside the vocabulary [0, {self._tok.vocab_size})")
        if self._skip and self._tok.is_special(token_id):
            return ""  # decode(skip=True) drops it before the decoder runs, so does the window
        self._ids.append(token_id)
        if token_id in self._tok.byte_fallback_ids:
            return ""  # the byte run may go on
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        if text.startswith(self._prefix_text):
            new = text[len(self._prefix_text):]
        else:  # a decoder whose output depends on more context: take the whole sequence
            new = self._tok.decode(self._ids)[len(self.text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        self._chunks.append(new)
        return new

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD), at the end."""
        if self._read == len(self._ids):
            return ""
        new = self._tok.decode(self._ids)[len(self.text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        self._chunks.append(new)
        return new


# ------------------------------------------------------------------- chat templates


class ChatTemplateError(BlueLowerError):
    """A chat template that does not parse, or raised while rendering."""


@lru_cache(maxsize=16)
def _compile_template(template: str):
    """The template compiled in the environment of transformers' ``_compile_jinja_template``
    (chat_template_utils.py): sandboxed, trim_blocks/lstrip_blocks, loop controls, its
    ``tojson``, ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}` marks assistant text for training masks; rendering only needs its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # dict() and dict.fromkeys() without the class object itself in the sandbox
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # no underscore attributes: they lead to CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse (line {exc.lineno}): {exc.message}") from None


def _plain(value):
    """JSON-like data only, as transformers' ``_plain_template_data`` gives the template;
    other objects (an image array) become an inert ``"<TypeName>"`` string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages) -> list[dict]:
    # as apply_chat_template: keys whose value is None dropped, reasoning under all its names
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise BlueLowerError(f"a chat message is a dict with 'role' and 'content', got {message!r}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, *,
                bos_token: str | None = None, eos_token: str | None = None, tools: list | None = None,
                documents: list | None = None, **extra) -> str:
    """The prompt text of ``messages`` under a Hugging Face chat ``template``.

    Equals ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...)`` of transformers for a tokenizer whose special tokens are
    ``bos_token``/``eos_token`` (and ``extra``, e.g. ``pad_token`` or template switches
    like ``enable_thinking``); only tokens given are defined in the template. Raises
    :class:`ChatTemplateError` when the template does not parse or fails.
    """
    import jinja2

    if not isinstance(template, str) or not template:
        raise ChatTemplateError("no chat template: the tokenizer has none, pass one")
    compiled = _compile_template(template)
    kwargs = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    kwargs.update(extra)
    try:
        return compiled.render(messages=_normalize_messages(messages), tools=_plain(tools),
                               documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                               **_plain(kwargs))
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        # e.g. a text-only template concatenating a list of content parts
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None


def image_placeholder_positions(rendered: str, placeholder: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` character spans of every ``placeholder`` in ``rendered``, in order."""
    if not placeholder:
        raise BlueLowerError("the image placeholder must be a non-empty string")
    return [(m.start(), m.end()) for m in re.finditer(re.escape(placeholder), rendered)]


class ImageSlot:
    """Marks the place of the image tokens among a prompt's segments."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = ImageSlot()

# Marks the user's text in a render, to find where it landed; a private-use character no
# template or tokenizer gives a meaning to.
_TEXT_MARK = "\U000f0002"


def build_prompt(tokenizer: Tokenizer, template: str | None, user_text: str, has_image: bool = False,
                 image_placeholder: str | None = None, system: str | None = None,
                 **template_kwargs) -> list:
    """One user turn as prompt segments: lists of token ids and :data:`IMAGE` (at most once).

    With a ``template``: the messages are ``[system?, user]`` with the generation prompt,
    rendered by :func:`render_chat` with the tokenizer's BOS/EOS. The ids (image aside)
    are transformers' ``apply_chat_template(..., tokenize=True)`` ids: the rendered text
    encoded without extra special tokens. With an image, the user content is
    ``[{"type": "image"}, {"type": "text", "text": user_text}]``; when the template
    renders that and writes ``image_placeholder``, the image takes the placeholder's
    place; otherwise (a text-only template) the image goes just before the user's text.
    Without a template: the text encoded with the tokenizer's special tokens, the image
    after the leading ones (BOS).
    """
    if template is None:
        ids = tokenizer.encode(user_text, add_special_tokens=True)
        if not has_image:
            return [ids]
        lead = tokenizer.encode("", add_special_tokens=True)
        cut = len(lead) if ids[: len(lead)] == lead else 0
        return _segments([ids[:cut], IMAGE, ids[cut:]])
    specials = dict(bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    specials.update(template_kwargs)

    def messages(content):
        head = [] if system is None else [{"role": "system", "content": system}]
        return head + [{"role": "user", "content": content}]

    def render(content):
        return render_chat(template, messages(content), add_generation_prompt=True, **specials)

    if not has_image:
        return [tokenizer.encode(render(user_text), add_special_tokens=False)]
    if image_placeholder:
        try:
            rendered = render([{"type": "image"}, {"type": "text", "text": user_text}])
        except ChatTemplateError:
            rendered = None  # a text-only template: content must be a string
        if rendered is not None:
            spans = image_placeholder_positions(rendered, image_placeholder)
            if len(spans) > 1:
                raise BlueLowerError(f"the chat template wrote the image placeholder {image_placeholder!r} "
                                     f"{len(spans)} times for one image")
            if spans:
                (start, end), = spans
                return _segments([_encode_text(tokenizer, rendered[:start], first=True), IMAGE,
                                  _encode_text(tokenizer, rendered[end:], first=False)])
    rendered = render(user_text)
    marked = render(_TEXT_MARK + user_text)
    cut = marked.find(_TEXT_MARK)
    if cut < 0 or marked.replace(_TEXT_MARK, "", 1) != rendered:
        # the template changed the text (e.g. trimmed it): find the text itself
        cut = rendered.rfind(user_text.strip()) if user_text.strip() else -1
    cut = max(cut, 0)  # not found: the image before the whole prompt
    return _segments([_encode_text(tokenizer, rendered[:cut], first=True), IMAGE,
                      _encode_text(tokenizer, rendered[cut:], first=False)])


def chat_prompt_parts(tokenizer: Tokenizer, template: str, system: str | None = None) -> dict | None:
    """One user turn of ``template`` as text around the user's message: ``prefix + text +
    suffix`` is what :func:`build_prompt` renders for a text-only prompt, so a runtime without
    a Jinja engine (the native one) can form the prompt and encode it (without extra special
    tokens). None when the template does not write the message once, verbatim."""
    mark = "\U000f0003"
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": mark}]
    try:
        rendered = render_chat(template, messages, add_generation_prompt=True, bos_token=tokenizer.bos_token,
                               eos_token=tokenizer.eos_token)
    except ChatTemplateError:
        return None
    if rendered.count(mark) != 1:
        return None
    prefix, suffix = rendered.split(mark)
    return {"prefix": prefix, "suffix": suffix}


def _encode_text(tokenizer: Tokenizer, text: str, first: bool) -> list[int]:
    if not text:
        return []
    return tokenizer.encode(text, add_special_tokens=False) if first else tokenizer.encode_piece(text)


def _segments(parts: list) -> list:
    return [p for p in parts if p is IMAGE or len(p)]


def prompt_ids(segments: list, image_token_id: int) -> list[int]:
    """The segments flattened, one ``image_token_id`` for the image: the ids a tokenizer
    gives for the rendered prompt when the placeholder is that single token."""
    out = []
    for seg in segments:
        out.extend([image_token_id] if seg is IMAGE else seg)
    return out


# ------------------------------------------------------------------------- sampling


class Sampler:
    """Picks the next token from a logits row.

    ``temperature == 0``: greedy, ``argmax`` (ties to the lowest id). Otherwise the logits
    are divided by the temperature, cut to the ``top_k`` largest (0: all; ties kept in id
    order), softmaxed in float64, cut to the smallest prefix whose probability reaches
    ``top_p`` (at least one token), renormalized and drawn from with
    ``numpy.random.Generator(PCG64(seed))``: a seed reproduces the same tokens.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        try:
            temperature, top_p = float(temperature), float(top_p)
        except (TypeError, ValueError):
            raise BlueLowerError(f"temperature and top_p must be numbers, got {temperature!r} and {top_p!r}") from None
        if not np.isfinite(temperature) or temperature < 0:
            raise BlueLowerError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise BlueLowerError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise BlueLowerError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise BlueLowerError(f"seed must be an integer >= 0, got {seed!r}")
        self.temperature, self.top_k, self.top_p, self.seed = temperature, int(top_k), top_p, seed
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, probs)``: the candidate ids, most likely first, and their probabilities
        (float64, summing to 1) after temperature, top-k and top-p."""
        row = _logits_row(logits).astype(np.float64)
        top = row.max()
        if not np.isfinite(top):
            raise BlueLowerError("logits have no finite maximum (NaN, +inf, or all -inf)")
        x = (row - top) / self.temperature  # shifted first: a tiny temperature does not overflow
        k = self.top_k if 0 < self.top_k < x.size else x.size
        if k < x.size:
            # the k largest, ties at the cut broken toward lower ids like the full sort
            part = np.argpartition(-x, k - 1)[:k]
            kth = x[part].min()
            above = np.flatnonzero(x > kth)
            ties = np.flatnonzero(x == kth)[: k - above.size]
            ids = np.concatenate([above, ties])
        else:
            ids = np.arange(x.size)
        ids = ids[np.argsort(-x[ids], kind="stable")] if (k < x.size or self.top_p < 1.0) else ids
        p = np.exp(x[ids])
        p /= p.sum()
        if self.top_p < 1.0:
            n = min(int(np.searchsorted(np.cumsum(p), self.top_p, side="left")) + 1, p.size)
            ids, p = ids[:n], p[:n]
            p = p / p.sum()
        return ids, p

    def sample(self, logits: np.ndarray) -> int:
        """The next token id of a logits row ``[vocab]`` (or ``[1, vocab]``)."""
        if self.greedy:
            row = _logits_row(logits)
            return int(np.argmax(row))
        ids, p = self.distribution(logits)
        c = np.cumsum(p)
        i = int(np.searchsorted(c, self.rng.random() * c[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])


def _logits_row(logits) -> np.ndarray:
    row = np.asarray(logits)
    if row.ndim == 2 and row.shape[0] == 1:
        row = row[0]
    if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.floating):
        raise BlueLowerError(f"logits must be a non-empty float vector [vocab], got shape {row.shape} {row.dtype}")
    return row


# -------------------------------------------------------------------- stop and loop

# End-of-turn / end-of-text tokens of common chat formats (ChatML, Llama 3, Gemma,
# Idefics3/SmolVLM, Phi-3, SentencePiece): checkpoints list several of them as EOS in
# generation_config.json, and a chat model ends its answer with one.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>",
              "<eos>", "<end_of_utterance>", "<|end|>", "</s>")


def stop_token_ids(tokenizer: Tokenizer | None = None, eos_token_id: int | Iterable[int] | None = None,
                   extra_tokens: Iterable[str] = (), known_end_tokens: bool = True) -> frozenset[int]:
    """The ids that end generation: ``eos_token_id`` (an int or a list, as config.json /
    generation_config.json give it), the tokenizer's EOS, ``extra_tokens`` by name, and
    (``known_end_tokens``) those of :data:`END_TOKENS` the tokenizer has as special tokens."""
    ids = set()
    if eos_token_id is not None:
        ids.update([int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else map(int, eos_token_id))
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        for name in extra_tokens:
            tid = tokenizer.token_to_id(name)
            if tid is None:
                raise BlueLowerError(f"stop token {name!r} is not in the tokenizer's vocabulary")
            ids.add(tid)
        if known_end_tokens:
            ids.update(tokenizer.special_tokens[t] for t in END_TOKENS if t in tokenizer.special_tokens)
    if not ids:
        raise BlueLowerError("no stop token: give the checkpoint's eos_token_id or a tokenizer with an EOS token")
    return frozenset(ids)


def token_stream(first_logits: np.ndarray, next_logits: Callable[[int], np.ndarray], sampler: Sampler,
                 stop_ids: Iterable[int], max_new_tokens: int) -> Iterator[int]:
    """The generated ids, one at a time: sampled from ``first_logits`` (the prefill's last
    row), then from ``next_logits(previous_token)`` (one decode step) until a stop id
    (yielded, as the old loop returned EOS too) or ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise BlueLowerError("--max-new-tokens must be at least 1")
    stop_ids = frozenset(int(i) for i in stop_ids)
    token = sampler.sample(first_logits)
    n = 1
    yield token
    while n < max_new_tokens and token not in stop_ids:
        token = sampler.sample(next_logits(token))
        n += 1
        yield token
