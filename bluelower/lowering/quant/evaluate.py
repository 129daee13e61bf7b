"""Accuracy of a quantization recipe on a real text: perplexity, top-1 agreement, logit error.

The harness takes a PyTorch causal LM (a transformers ``*ForCausalLM`` in the tests and
benchmarks; anything whose ``model(input_ids=ids[None])`` returns logits ``[1, T, V]`` or
an object with ``.logits``) and a text's token ids, and scores it teacher-forced: every
token from the second on is predicted from all tokens before it, in one forward (or in
independent windows of ``chunk`` tokens). :func:`fake_quantized` swaps every linear
weight and the token table for *what a format stores* -- quantized with the compiler's
quantizer and dequantized with the kernels' reference dequantizer (:mod:`.stored`), so
the model computes with bit for bit the kernels' weights -- and restores them after. A
tied lm_head gets the table's linear-use format (role ``lm_head``, :mod:`.recipe`); when
that differs from the lookups' format the two are untied for the evaluation (the
compiler stores both layouts too). :func:`kv_int8` makes the attention read K and V
(after RoPE) through the INT8 cache rows (``kernels/attention.py``'s reference
quantizer: per token, per head, ``max|x| / 127``).

torch is imported inside functions; transformers only by :func:`kv_int8`, which patches
transformers' attention dispatch (the compiler never imports this module).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .recipe import Recipe
from .stored import StoredWeight, store_weight


@dataclass
class TextScore:
    """Teacher-forced scores of one model on one text.

    ``nll``: mean negative log-likelihood (nats) over ``tokens`` predicted tokens; ``ppl``
    = exp(nll). Against a reference (:class:`Reference`): ``top1`` the share of positions
    whose argmax equals the reference's, ``max_logit_error`` max |logit - reference logit|,
    ``kl`` the mean KL(reference || model) in nats (None without a reference)."""

    nll: float
    tokens: int
    top1: float | None = None
    max_logit_error: float | None = None
    kl: float | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@dataclass
class Reference:
    """The fp32 model's logits ``[P, V]`` at the predicted positions and its score."""

    logits: object  # torch.Tensor
    score: TextScore


def _windows(t: int, chunk: int | None) -> list[tuple[int, int]]:
    if chunk is None or chunk >= t:
        return [(0, t)]
    if chunk < 2:
        raise ValueError(f"chunk must be at least 2 tokens, got {chunk}")
    return [(a, min(a + chunk, t)) for a in range(0, t, chunk) if min(a + chunk, t) - a >= 2]


def _logits(model, ids):
    out = model(input_ids=ids.unsqueeze(0), use_cache=False) if _accepts_use_cache(model) else model(
        input_ids=ids.unsqueeze(0))
    logits = out.logits if hasattr(out, "logits") else out
    return logits[0].float()


def _accepts_use_cache(model) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "use_cache")


def predicted_logits(model, ids, chunk: int | None = None):
    """``(logits [P, V], targets [P])`` teacher-forced over ``ids`` (1-D ints, at least 2):
    in each window ``[a, b)`` the logits of positions a..b-2 and the tokens a+1..b-1."""
    import torch

    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to score a text")
    parts, targets = [], []
    with torch.no_grad():
        for a, b in _windows(ids.numel(), chunk):
            parts.append(_logits(model, ids[a:b])[:-1])
            targets.append(ids[a + 1:b])
    return torch.cat(parts), torch.cat(targets)


def score_logits(logits, targets, reference: Reference | None = None) -> TextScore:
    """The :class:`TextScore` of ``logits [P, V]`` predicting ``targets [P]``."""
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = float(-logp.gather(1, targets.unsqueeze(1)).mean())
    score = TextScore(nll, int(targets.numel()))
    if reference is not None:
        ref = reference.logits
        if ref.shape != logits.shape:
            raise ValueError(f"reference logits {tuple(ref.shape)} and logits {tuple(logits.shape)} differ")
        score.top1 = float((logits.argmax(-1) == ref.argmax(-1)).double().mean())
        score.max_logit_error = float((logits - ref).abs().max())
        ref_logp = torch.log_softmax(ref.double(), dim=-1)
        score.kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    return score


def score_text(model, ids, reference: Reference | None = None, chunk: int | None = None) -> TextScore:
    """Teacher-forced perplexity of ``model`` on token ids ``ids`` (one forward, or windows of
    ``chunk`` tokens), compared with ``reference`` if given. Equals transformers' own
    ``labels=ids`` loss (one window)."""
    logits, targets = predicted_logits(model, ids, chunk)
    return score_logits(logits, targets, reference)


def reference(model, ids, chunk: int | None = None) -> Reference:
    """The fp32 reference of ``model`` on ``ids`` (logits kept for the comparisons)."""
    logits, targets = predicted_logits(model, ids, chunk)
    return Reference(logits, score_logits(logits, targets))


# ------------------------------------------------------------------ fake quantization


@dataclass
class WeightEntry:
    name: str
    use: str  # "linear" | "table"
    role: str
    shape: tuple
    label: str  # the format's label, or "override"
    stored_bytes: int | None  # None: an override given as an array (bytes unknown here)


@dataclass
class WeightReport:
    """What :func:`fake_quantized` stored: one :class:`WeightEntry` per weight and use."""

    entries: list = field(default_factory=list)

    def bytes_by(self, key: Callable[[WeightEntry], str]) -> dict:
        out: dict = {}
        for e in self.entries:
            k = key(e)
            out[k] = out.get(k, 0) + (e.stored_bytes if e.stored_bytes is not None else 0)
        return out

    def part_bytes(self) -> dict:
        """Bytes stored by part: ``decoder_linears`` (attention + mlp), ``lm_head`` (the
        logits' weight, its own copy when tied), ``table`` (the lookups' rows), ``other``."""

        def part(e):
            if e.use == "table":
                return "table"
            if e.role in ("lm_head", "embedding"):
                return "lm_head"
            return "decoder_linears" if e.role in ("attention", "mlp") else "other"

        return self.bytes_by(part)


def _role_default(name: str) -> str:
    from ..models.llama import weight_role

    return weight_role(name)


def model_weights(model) -> list[tuple[str, str, object, object]]:
    """``(checkpoint name, use, module, parameter)`` of every ``nn.Linear`` weight and
    ``nn.Embedding`` table of ``model``; a Linear whose weight *is* a table's (tied) is
    named as the table with use ``linear``."""
    import torch

    tables = {}
    out = []
    for mname, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding):
            tables[id(m.weight)] = f"{mname}.weight"
            out.append((f"{mname}.weight", "table", m, m.weight))
    for mname, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            name = tables.get(id(m.weight), f"{mname}.weight")
            out.append((name, "linear", m, m.weight))
    return out


@contextlib.contextmanager
def fake_quantized(model, recipe: Recipe, stored: dict | None = None, role_of: Callable[[str], str] | None = None):
    """Within the block, ``model`` computes with the weights ``recipe`` stores.

    Requires: checkpoint-style parameter names (``model.layers.N.self_attn.q_proj.weight``);
    ``role_of(name)`` the ModelSpec role (default: the llama family's ``weight_role``);
    ``stored`` optional ``{(name, use): StoredWeight | float32 array}`` overriding the
    recipe's round-to-nearest for those weights (GPTQ results from
    :func:`~bluelower.lowering.quant.calibration.gptq_llama_decoder`, or a baseline's
    dequantized weights). A weight whose recipe says ``gptq`` must be in ``stored``.

    Ensures: yields a :class:`WeightReport`; every parameter is restored on exit (also on
    an exception). Raises ``ValueError`` for a ``gptq`` weight missing from ``stored``."""
    import torch

    role_of = role_of or _role_default
    stored = stored or {}
    report = WeightReport()
    saved = []  # (module, original Parameter)
    swapped = []  # (Parameter, original data)
    values: dict = {}  # (name, use) -> dequantized tensor
    try:
        for name, use, module, param in model_weights(model):
            w = param.detach()
            role = role_of(name)
            key = (name, use)
            if key in stored:
                s = stored[key]
                deq = s.dequantize() if isinstance(s, StoredWeight) else np.asarray(s, np.float32)
                label = s.fmt.label() if isinstance(s, StoredWeight) else "override"
                nbytes = s.nbytes if isinstance(s, StoredWeight) else None
            else:
                fmt = recipe.format_for(name, role, use)
                if fmt.method == "gptq":
                    raise ValueError(f"{name} ({use}): the recipe asks for GPTQ; pass its calibrated result in stored")
                if not fmt.quantized:
                    report.entries.append(WeightEntry(name, use, role, tuple(w.shape), "fp32", 4 * w.numel()))
                    continue
                s = store_weight(w.numpy(), fmt, use)
                deq, label, nbytes = s.dequantize(), fmt.label(), s.nbytes
            report.entries.append(WeightEntry(name, use, role, tuple(w.shape), label, nbytes))
            values[key] = torch.from_numpy(np.ascontiguousarray(deq))
        by_param: dict = {}  # id(Parameter) -> [(name, use, module, param)]
        for name, use, module, param in model_weights(model):
            by_param.setdefault(id(param), []).append((name, use, module, param))
        for uses in by_param.values():
            vals = [values.get((name, use)) for name, use, _m, _p in uses]
            param = uses[0][3]
            if all(v is None for v in vals):
                continue
            if all(v is not None and torch.equal(v, vals[0]) for v in vals):
                swapped.append((param, param.data))
                param.data = vals[0]
                continue
            # a tied table whose uses get different weights: each linear use gets its own
            # Parameter for the evaluation, the table keeps the shared one
            for (name, use, module, _p), v in zip(uses, vals):
                if use == "linear":
                    saved.append((module, param))
                    module.weight = torch.nn.Parameter(v if v is not None else param.detach().clone(),
                                                       requires_grad=False)
            table_v = [v for (_n, use, _m, _p), v in zip(uses, vals) if use == "table"]
            if table_v and table_v[0] is not None:
                swapped.append((param, param.data))
                param.data = table_v[0]
        yield report
    finally:
        for param, data in reversed(swapped):
            param.data = data
        for module, original in reversed(saved):
            module.weight = original


@contextlib.contextmanager
def kv_int8(model):
    """Within the block, the attention of a transformers model reads K (after RoPE) and V
    through the INT8 cache rows: each (token, head) row quantized as the cache-write kernel
    does and dequantized as the attention kernel does (``quantize_kv_rows`` /
    ``dequantize_kv_rows``). Requires a transformers model whose attention dispatches
    through ``ALL_ATTENTION_FUNCTIONS`` (``sdpa``, the default); restored on exit."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..kernels.attention import dequantize_kv_rows, quantize_kv_rows

    impl = model.config._attn_implementation
    if impl not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"kv_int8 needs a registered attention implementation such as 'sdpa', got {impl!r}")
    original = ALL_ATTENTION_FUNCTIONS[impl]

    def through_int8(x):
        rows = dequantize_kv_rows(quantize_kv_rows(x.detach().float().numpy()))
        return torch.from_numpy(rows).to(x.dtype)

    def attention(module, query, key, value, *args, **kwargs):
        return original(module, query, through_int8(key), through_int8(value), *args, **kwargs)

    local = ALL_ATTENTION_FUNCTIONS._local_mapping  # transformers' per-instance overrides
    had_local, previous = impl in local, local.get(impl)
    ALL_ATTENTION_FUNCTIONS[impl] = attention  # a local override: the class-wide table is untouched
    try:
        yield
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS[impl] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS[impl]


def evaluate_recipe(model, ids, recipe: Recipe, ref: Reference, stored: dict | None = None,
                    role_of: Callable[[str], str] | None = None, chunk: int | None = None
                    ) -> tuple[TextScore, WeightReport]:
    """Score ``model`` on ``ids`` with ``recipe``'s weights (and its KV cache format) against
    ``ref``; the weights are restored afterwards."""
    with fake_quantized(model, recipe, stored, role_of) as report:
        with kv_int8(model) if recipe.kv_cache == "int8" else contextlib.nullcontext():
            score = score_text(model, ids, ref, chunk)
    return score, report
