"""Calibrated quantization of a decoder, streamed layer by layer (GPTQ, :mod:`.gptq`).

:func:`quantize_layer_sequential` quantizes the linear layers of ONE transformer layer
(any ``torch.nn.Module`` and a ``run(layer, x) -> y`` callable) on calibration inputs,
"true sequential": the layer's linears are grouped by the input they share (found by
running the layer once: q/k/v, then o, then gate/up, then down for LLaMA), and each group
is quantized with the Hessian of its inputs computed with the groups before it already
quantized; the layer's outputs, through the quantized weights, are the next layer's
inputs. Linears of one group with the same format are quantized as one row-concatenated
matrix (GPTQ treats rows independently, so this is the same result, faster).

:func:`gptq_llama_decoder` drives it over a LLaMA-family decoder (bluelower's own
``models/llama`` modules, no transformers) reading the checkpoint one tensor at a time,
and yields each weight's stored form as soon as it is final, so a converter can write it
and drop it.

Memory bound (``S`` calibration tokens, hidden size ``h``, MLP width ``I``, vocabulary
``V``): one layer's fp32 weights; the calibration activations entering and leaving the
layer, ``2 * S * h * 4`` bytes, plus one sequence's temporaries inside the layer
(``seq_len * I`` and the attention scores ``heads * seq_len^2``); one Hessian at a time,
``max(h, I)^2 * 4`` bytes, and its Cholesky factors (about 3 more of that size while
factoring). Before the layers the token table is read once to embed the calibration
tokens (``V * h * 4`` bytes, freed at once); a calibrated lm_head holds its fp32 weight
and codes. BlueLM-V-3B (h 2560, I 6912, V 100096) with S = 4096: ~0.3 GB of layer
weights, ~0.1 GB of activations, ~0.8 GB for the down_proj Hessian while factoring, 1 GB
for the table: under 2.5 GB at any time.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .gptq import DEFAULT_BLOCK, DEFAULT_DAMP, GPTQCodes, Hessian, gptq_codes, split_code_rows, stored_from_codes
from .recipe import Recipe
from .stored import StoredWeight, store_weight


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the layer is not run."""


def linear_groups(layer, run: Callable, x) -> list[list[str]]:
    """The layer's ``nn.Linear`` submodules (names relative to ``layer``) in call order,
    grouped by the input tensor they share (consecutive calls on the same tensor)."""
    import torch

    names = {m: n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    calls: list[tuple[str, object]] = []
    keep = []  # hold the inputs so their ids stay unique during the run

    def hook(module, args):
        keep.append(args[0])
        calls.append((names[module], id(args[0])))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    try:
        with torch.no_grad():
            run(layer, x)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    seen = set()
    for name, ident in calls:
        if name in seen:
            continue  # a linear called twice: its first input decides
        seen.add(name)
        if groups and ident == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = ident
    return groups


def _group_hessian(layer, run: Callable, inputs, first: str):
    """The Hessian of the input of linear ``first`` over every calibration input (the run
    stops right after that linear's input is seen)."""
    import torch

    module = dict(layer.named_modules())[first]
    hess = Hessian(module.in_features)

    def hook(_module, args):
        hess.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in inputs:
                try:
                    run(layer, x)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return hess


def quantize_layer_sequential(layer, inputs: list, run: Callable, formats: dict, *, act_order: bool = False,
                              damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK,
                              groups: list | None = None) -> tuple[dict, list]:
    """Quantize the linears of ``layer`` in place and return ``(stored, outputs)``.

    Requires: ``inputs`` a non-empty list of input tensors (one per calibration sequence),
    ``run(layer, x)`` the layer's output for input ``x``; ``formats`` maps linear names
    (relative to ``layer``) to a :class:`WeightFormat` (absent or fp32: left as it is).
    ``groups`` (default: :func:`linear_groups` on ``inputs[0]``) orders them.

    Ensures: each quantized linear's weight is replaced by its dequantized stored weight
    (so later groups and the outputs see it), ``stored[name]`` is its
    :class:`StoredWeight` (``method`` gptq: GPTQ codes on the Hessian of its inputs; rtn:
    the plain quantizer), ``outputs[i] = run(layer, inputs[i])`` with the quantized weights."""
    import torch

    modules = dict(layer.named_modules())
    groups = groups if groups is not None else linear_groups(layer, run, inputs[0])
    stored: dict = {}
    for group in groups:
        todo = [n for n in group if n in formats and formats[n].quantized]
        if not todo:
            continue
        gptq_names = [n for n in todo if formats[n].method == "gptq"]
        hess = _group_hessian(layer, run, inputs, group[0]).h if gptq_names else None
        by_format: dict = {}
        for n in gptq_names:
            by_format.setdefault(formats[n], []).append(n)
        for fmt, names in by_format.items():
            ws = [modules[n].weight.detach().numpy() for n in names]
            c = gptq_codes(np.concatenate(ws, axis=0), hess, fmt, act_order=act_order, damp=damp,
                           block_size=block_size)
            for n, w, part in zip(names, ws, split_code_rows(c, [w.shape[0] for w in ws])):
                stored[n] = stored_from_codes(part, fmt, w.shape)
        for n in todo:
            if n not in stored:
                stored[n] = store_weight(modules[n].weight.detach().numpy(), formats[n])
            with torch.no_grad():
                modules[n].weight.copy_(torch.from_numpy(stored[n].dequantize()))
        del hess
    with torch.no_grad():
        outputs = [run(layer, x) for x in inputs]
    return stored, outputs


def llama_layer_runner(cfg):
    """``run(layer, x)`` for bluelower's ``LlamaDecoderLayer`` on one whole sequence ``x [T,
    hidden]`` at positions 0..T-1 (causal, an empty cache of capacity T)."""
    import torch

    from ..models.llama.model import rope_cos_sin

    def run(layer, x):
        t = x.shape[0]
        positions = torch.arange(t)
        cos, sin = rope_cos_sin(positions, cfg)
        cache = torch.zeros((2, cfg.num_kv_heads, t, cfg.head_dim), dtype=torch.float32)
        return layer(x, cos, sin, positions, cache)[0]

    return run


def gptq_llama_decoder(read: Callable[[str], np.ndarray], cfg, sequences: list, recipe: Recipe,
                       role_of: Callable[[str], str], *, o_proj_bias: bool | None = None, act_order: bool = False,
                       damp: float = DEFAULT_DAMP, log: Callable[[str], None] | None = None
                       ) -> Iterator[tuple[str, str, StoredWeight]]:
    """Quantize a LLaMA-family decoder layer by layer; yield ``(name, use, stored)``.

    Requires: ``read(name)`` the fp32 tensor of checkpoint name ``name`` in Hugging Face
    layout (``Checkpoint.read``); ``cfg`` the model's ``DecoderConfig``; ``sequences`` a
    list of 1-D int arrays of calibration token ids (each at positions 0..T-1; a few
    hundred to a few thousand tokens each); ``role_of(name)`` the ModelSpec's weight role.
    ``o_proj_bias`` defaults to ``cfg.attention_bias`` (LLaMA's convention).

    Ensures: every decoder linear and the logits' weight whose recipe format is quantized
    is yielded once, in order, with ``use`` ``"linear"``: ``model.layers.N.*`` as each layer
    finishes, then the lm_head (``lm_head.weight``, or ``model.embed_tokens.weight`` when
    tied: the table's linear copy); the table's lookup form is not (it needs no
    calibration: ``store_weight(table, fmt, "table")``). At most one layer's weights are
    held (module docstring for the bound)."""
    import torch

    from ..models.llama.model import LlamaDecoderLayer, RMSNorm

    say = log or (lambda _msg: None)
    bias = cfg.attention_bias if o_proj_bias is None else o_proj_bias
    embed = "model.embed_tokens.weight"
    table = read(embed)
    xs = [torch.from_numpy(np.ascontiguousarray(table[np.asarray(ids, np.int64)], np.float32)) for ids in sequences]
    del table
    run = llama_layer_runner(cfg)
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        layer = LlamaDecoderLayer(cfg, bias)
        with torch.no_grad():
            for pname, p in layer.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(read(prefix + pname), np.float32)))
        formats = {}
        for mname, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                full = f"{prefix}{mname}.weight"
                formats[mname] = recipe.format_for(full, role_of(full), "linear")
        stored, xs = quantize_layer_sequential(layer, xs, run, formats, act_order=act_order, damp=damp)
        say(f"layer {i}: {len(stored)} linears quantized")
        for mname, sw in stored.items():
            yield f"{prefix}{mname}.weight", "linear", sw
        del layer, stored
    head = embed if cfg.tie_word_embeddings else "lm_head.weight"
    fmt = recipe.format_for(head, role_of(head), "linear")
    if not fmt.quantized:
        return
    w = np.asarray(read(head), np.float32)
    if fmt.method == "gptq":
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        with torch.no_grad():
            norm.weight.copy_(torch.from_numpy(np.asarray(read("model.norm.weight"), np.float32)))
            hess = Hessian(cfg.hidden_size)
            for x in xs:
                hess.add(norm(x))
        del xs
        c: GPTQCodes = gptq_codes(w, hess.h, fmt, act_order=act_order, damp=damp)
        yield head, "linear", stored_from_codes(c, fmt, w.shape)
    else:
        yield head, "linear", store_weight(w, fmt)
    say("lm_head quantized")
