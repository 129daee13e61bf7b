"""``compile --calibration FILE``: GPTQ codes chosen on a calibration text, carried into a build.

A build whose recipe gives a linear weight ``"method": "gptq"`` stores the codes GPTQ chose
for it (:mod:`.gptq`, driven layer by layer by :func:`.calibration.gptq_llama_decoder` over
bluelower's own LLaMA modules on the checkpoint's tensors) instead of round-to-nearest's.
The codes are *carried*, like a GGUF file's own bits: QuantizeWeights gives such a weight
``carry`` ``"gptq"`` (``params.format_policy``), and the parameter conversion packs the
stored codes into the kernels' layout (``params.pack_quantized``) without re-quantizing.

Steps (``compile_model``): :func:`check_calibration_model` and :func:`calibration_sequences`
before anything is traced (one-line errors: no tokenizer, a family GPTQ does not support, an
empty / non-UTF-8 file, a text shorter than one sequence); after the TVM build
:func:`calibrate` runs GPTQ for exactly the weights the pass marked and writes each one's
codes to a :class:`CodeStore` (``.npy`` files in the build's temporary directory) as soon
as its layer is done, so memory holds one layer's fp32 weights, the calibration
activations and one Hessian (``calibration.py`` has the bound), never the model.

What GPTQ sees of the rest of the build: every weight the build quantizes round-to-nearest
(in the recipe's format, with its search) is quantized the same way in the layer before the
layer's outputs feed the next layer ("true sequential"); weights the build keeps fp32 or
carries from a GGUF file (lossless) are used as they are. The INT8 KV cache and the ``a8``
modes' int8 activations are not modelled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...errors import BlueLowerError
from ...files import read_user_text
from .gptq import DEFAULT_DAMP, GPTQCodes
from .recipe import FP32, GROUPED_KINDS, WeightFormat

#: Tokens per calibration sequence (at most the build's KV capacity) and the most tokens read
#: from the text (the first ones): 32 sequences of 512.
CALIBRATION_SEQ = 512
MAX_CALIBRATION_TOKENS = 16384
MIN_TAIL = 64  # a last, shorter piece of the text is a sequence of its own from this many tokens

#: family -> ``o_proj_bias`` for :func:`gptq_llama_decoder` (None: the config's attention_bias)
GPTQ_FAMILIES = {"llama": None, "qwen2": False}


@dataclass
class CalibrationText:
    path: str
    sha256: str
    text: str


def read_calibration_text(path: str) -> CalibrationText:
    """The UTF-8 text of ``path`` (:func:`files.read_user_text`: one line for a missing /
    unreadable file, one that is not UTF-8 or holds only white space) and its sha256."""
    raw, text = read_user_text(path, "--calibration", "give a text in the model's language (a few thousand "
                               "tokens, e.g. bluelower/reports/texts/calibration.txt)")
    return CalibrationText(path, hashlib.sha256(raw).hexdigest(), text)


def check_calibration_model(cfg, tokenizer, path: str) -> None:
    """One line unless GPTQ can calibrate ``cfg``: a LLaMA-family decoder (:data:`GPTQ_FAMILIES`)
    with a tokenizer to read the text with."""
    family = getattr(cfg, "family", "bluelm_v")
    if family not in GPTQ_FAMILIES or getattr(cfg, "decoder", None) is None:
        raise BlueLowerError(f"--calibration {path}: GPTQ calibration supports LLaMA-family decoders "
                             f"({', '.join(GPTQ_FAMILIES)}), not the {family} family of '{cfg.name}'")
    if tokenizer is None:
        raise BlueLowerError(f"--calibration {path}: '{cfg.name}' has no tokenizer to read the text with: calibrate a "
                             "checkpoint that has one (--hf DIR with tokenizer.json, or --gguf FILE)")


def sequence_length(cfg) -> int:
    """Tokens per calibration sequence: :data:`CALIBRATION_SEQ`, at most the KV capacity."""
    return min(CALIBRATION_SEQ, int(cfg.runtime.kv_capacity))


def calibration_sequences(text: CalibrationText, tokenizer, cfg) -> list:
    """The text's token ids (the first :data:`MAX_CALIBRATION_TOKENS`, the tokenizer's special
    tokens added as it adds them to a prompt) cut into sequences of :func:`sequence_length`
    tokens, plus a last shorter one of at least :data:`MIN_TAIL`. One line when the text is
    shorter than one sequence, saying how many tokens it needs."""
    from ...runtime_stubs.text import Tokenizer

    seq = sequence_length(cfg)
    # a generous character budget (>= 16 characters per token) before encoding a long file
    piece = text.text[:16 * MAX_CALIBRATION_TOKENS]
    tok = Tokenizer(tokenizer.json_text)
    ids = np.asarray(tok.encode(piece), np.int64)[:MAX_CALIBRATION_TOKENS]
    if len(ids) < seq:
        raise BlueLowerError(f"--calibration {text.path}: the text is {len(ids)} tokens, calibration needs at least "
                             f"{seq} (one sequence of {seq} tokens; a few thousand are better)")
    vocab = int(cfg.decoder.vocab_size)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise BlueLowerError(f"--calibration {text.path}: the tokenizer gives id {int(ids.max())}, outside the "
                             f"model's vocabulary of {vocab}")
    out = [ids[a:a + seq] for a in range(0, len(ids), seq)]
    return [s for s in out if len(s) == seq or len(s) >= MIN_TAIL]


class CodeStore:
    """GPTQ codes of the calibrated weights, one set of ``.npy`` files per weight in
    ``directory`` (created; :meth:`close` removes it): INT4 codes two per byte (row-major,
    column ``2j`` in the low nibble), INT8 codes as they are, float16 scales (and mins).
    :meth:`read_quantized` gives them back as a ``QuantizedTensor`` for ``pack_quantized``."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=False)
        self.index: dict = {}  # name -> (file stem, fmt, shape)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def __len__(self) -> int:
        return len(self.index)

    def add(self, name: str, codes: GPTQCodes, fmt: WeightFormat, shape: tuple) -> None:
        stem = os.path.join(self.directory, str(len(self.index)))
        c = np.ascontiguousarray(codes.codes)
        if fmt.kind.startswith("int4"):
            c = (c[:, 0::2] & 0x0F) | (c[:, 1::2] << 4)
        np.save(stem + ".codes.npy", c)
        np.save(stem + ".scales.npy", np.asarray(codes.scales, np.float16))
        if codes.mins is not None:
            np.save(stem + ".mins.npy", np.asarray(codes.mins, np.float16))
        self.index[name] = (stem, fmt, tuple(int(x) for x in shape))

    def read_quantized(self, name: str):
        from ..frontend.checkpoints import QuantizedTensor

        stem, fmt, shape = self.index[name]
        c = np.load(stem + ".codes.npy")
        if fmt.kind.startswith("int4"):
            u = np.empty((c.shape[0], 2 * c.shape[1]), np.uint8)
            u[:, 0::2], u[:, 1::2] = c & 0x0F, c >> 4
            c = u
        mins = np.load(stem + ".mins.npy") if os.path.exists(stem + ".mins.npy") else None
        return QuantizedTensor(f"gptq {fmt.kind}", shape, fmt.group_size, c, np.load(stem + ".scales.npy"), mins)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class _BuildFormats:
    """The ``recipe`` :func:`gptq_llama_decoder` follows (``format_for``): a calibrated weight's
    format with method ``gptq``; a decoder weight the build quantizes round-to-nearest in that
    format (so later layers see it as the build computes it); fp32 for a weight the build keeps
    fp32 or carries from the checkpoint (lossless), and for a round-to-nearest logits' weight
    (nothing comes after it)."""

    def __init__(self, policy: Callable, role_of: Callable, shapes: dict, targets: set):
        self.policy, self.role_of, self.shapes, self.targets = policy, role_of, shapes, targets

    def format_for(self, name: str, role: str, use: str = "linear") -> WeightFormat:
        from .params import GPTQ_CARRY

        choice = self.policy(name, role, tuple(self.shapes[name]), "linear")
        if choice is None or choice.carry not in (None, GPTQ_CARRY):
            return FP32
        gptq = choice.carry == GPTQ_CARRY and name in self.targets
        if not gptq and role in ("lm_head", "embedding"):
            return FP32
        grouped = choice.kind in GROUPED_KINDS
        return WeightFormat(choice.kind, choice.group_size if grouped else 0, choice.search,
                            "gptq" if gptq else "rtn")


@dataclass
class CalibrationResult:
    tokens: int
    sequences: int
    sequence_length: int
    weights: int
    seconds: float


def calibrate(weights, cfg, spec, policy: Callable, targets: set, sequences: list, store: CodeStore, *,
              damp: float = DEFAULT_DAMP, act_order: bool = False) -> CalibrationResult:
    """Run GPTQ over ``cfg``'s decoder reading ``weights`` (``.read(name)``: fp32 tensors in the
    module's names, one at a time) on ``sequences`` and put the codes of every weight in
    ``targets`` (the weights whose conversion carries ``"gptq"``) into ``store``. ``policy`` is
    the build's ``format_policy``. Progress: one step per layer."""
    import time

    from ... import progress
    from ..frontend.weights import model_weight_specs
    from .calibration import gptq_llama_decoder

    d = cfg.decoder
    shapes = {n: s for n, (s, _dt) in model_weight_specs(cfg).items()}
    formats = _BuildFormats(policy, spec.weight_role, shapes, set(targets))
    bar = progress.Progress(f"calibrate (GPTQ, {sum(len(s) for s in sequences)} tokens)", d.num_layers + 1)
    start = time.perf_counter()
    head_done = False

    def log(msg: str) -> None:
        bar.update(1, msg)

    def read(name: str) -> np.ndarray:
        return np.asarray(weights.read(name), np.float32)

    try:
        for name, _use, sw in gptq_llama_decoder(read, d, sequences, formats, spec.weight_role,
                                                 o_proj_bias=GPTQ_FAMILIES[cfg.family], act_order=act_order,
                                                 damp=damp, log=log):
            if name in targets and sw.fmt.method == "gptq":
                store.add(name, sw.codes, sw.fmt, shapes[name])
            head_done = head_done or not name.startswith("model.layers.")
    finally:
        if not head_done:
            bar.update(1)
        bar.close()
    missing = sorted(set(targets) - set(store.index))
    if missing:  # a weight the pass marked that the decoder walk does not reach: a bug, said as one line
        raise BlueLowerError(f"calibration produced no codes for {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''} (not a LLaMA decoder linear)")
    return CalibrationResult(int(sum(len(s) for s in sequences)), len(sequences), int(max(len(s) for s in sequences)),
                             len(store), time.perf_counter() - start)
