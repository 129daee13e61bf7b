"""Per-token int8 activations as the ``a8`` modes' kernels compute them, in a PyTorch model.

The ``w4a8`` / ``w4a8kv8`` / ``w8a8`` kernels (``lowering/kernels/linear_a8.py``) quantize
the input of every quantized linear layer per token: ``amax = max|x|`` over the row,
``code = clip(round_half_even(x * float32(127 / amax)), -127, 127)``, ``scale = amax / 127``,
and multiply the codes. :func:`fake_quant_rows` gives, in PyTorch, the value that row
stands for (``code * scale``), with bit for bit the kernels' codes and scale
(``kernels.quantize_act_rows``); :func:`int8_activations` makes an ``nn.Module``'s
linear layers read their inputs through it, for the ``run --check`` reference of an a8
build (``reports/eval_quant.py``) and the quantization evaluation
(``lowering/quant/evaluate.py``)::

    with fake_quantized(model, recipe), int8_activations(model):
        score = score_text(model, ids, ref)

torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
from typing import Callable


def quantize_rows(x):
    """``(codes, scale)`` of a float tensor ``x[..., K]``: float32 codes in [-127, 127] and
    the float32 scale ``[..., 1]`` of each row (``kernels.quantize_act_rows``, in torch)."""
    import torch

    xf = x.detach().float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    from ..kernels.attention import MIN_AMAX

    big = amax > MIN_AMAX
    inv = torch.where(big, torch.tensor(127.0, dtype=torch.float32) / torch.where(big, amax, 1.0),
                      torch.zeros_like(amax))
    codes = torch.clamp(torch.round(xf * inv), -127, 127)
    return codes, amax / torch.tensor(127.0, dtype=torch.float32)


def fake_quant_rows(x):
    """``x`` through per-token int8: ``code * scale`` per row (the value the kernel computes
    with), in ``x``'s dtype."""
    codes, scale = quantize_rows(x)
    return (codes * scale).to(x.dtype)


@contextlib.contextmanager
def int8_activations(model, select: Callable[[str, object], bool] | None = None,
                     rows: Callable[[str, object], object] | None = None):
    """Within the block, every ``nn.Linear`` of ``model`` for which ``select(module name,
    module)`` holds (default: all) reads its input through per-token int8: ``rows(name, x)``
    (default :func:`fake_quant_rows`) replaces the input. Restored on exit, also on an
    exception. Yields the names of the selected modules."""
    import torch

    hooks, names = [], []
    rows = rows or (lambda _name, x: fake_quant_rows(x))
    try:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (select is None or select(name, module)):
                names.append(name)
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, args, _name=name: (rows(_name, args[0]), *args[1:])))
        yield names
    finally:
        for h in hooks:
            h.remove()


def linear_selector(weight_names) -> Callable[[str, object], bool]:
    """``select`` for :func:`int8_activations`: the linear layers whose weight is one of
    ``weight_names`` (checkpoint names such as ``model.layers.0.mlp.up_proj.weight``; a tied
    lm_head is selected by the table's name too, its weight being that parameter)."""
    wanted = set(weight_names)

    def select(name: str, module) -> bool:
        if f"{name}.weight" in wanted:
            return True
        return getattr(module.weight, "_bluelower_names", frozenset()) & wanted != frozenset()

    return select


def tag_parameter_names(model) -> None:
    """Record every name of each parameter on it (``_bluelower_names``), so a tied weight is
    known by all of its names (``named_parameters`` lists it once)."""
    names: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), (p, set()))[1].add(name)
    for p, ns in names.values():
        p._bluelower_names = frozenset(ns)
