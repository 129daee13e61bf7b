"""The torch frontend: ``torch.export`` of one entry + ``from_exported_program``.

The traced module is a thin wrapper whose ``forward(*inputs, *weights)`` calls the entry
method through ``torch.func.functional_call``: the weights are function inputs, not
registered parameters, so tracing works on ``meta`` tensors and no fp32 weight of a big
model is ever materialized.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import BlueLowerError
from .entries import entry_signature, finish_function, helper_functions, quiet_tracing, sanitize
from .op_support import check_torch_ops, decompose_for_translator, export_decomposed


def make_entry_wrapper(model: nn.Module, entry: str, input_names, weight_names) -> nn.Module:
    """A module whose forward(<inputs>, <weights>) runs ``model.<entry>`` with those weights.

    The forward signature is generated so that the traced graph's (and so the Relax
    function's) parameter names read like the model's: ``pixel_values``,
    ``language_model_model_layers_0_self_attn_q_proj_weight``, ...
    """

    class _EntryCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *args):
            return getattr(self.m, entry)(*args)

    call = _EntryCall()
    n_in = len(input_names)
    arg_names = list(input_names) + [sanitize(w) for w in weight_names]
    src = (
        f"def forward(self, {', '.join(arg_names)}):\n"
        f"    args = ({', '.join(arg_names)},)\n"
        f"    return self._run(args)\n"
    )
    namespace: dict = {}
    exec(src, namespace)  # noqa: S102 - generated from sanitized identifiers only

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self._call = [call]  # a list: keeps the model out of registered submodules

        def _run(self, args):
            ins, ws = args[:n_in], args[n_in:]
            params = {"m." + k: v for k, v in zip(weight_names, ws)}
            return torch.func.functional_call(self._call[0], params, tuple(ins))

    Wrapper.forward = namespace["forward"]
    return Wrapper()


def import_torch_program(ep, what: str = "the model", decomposed: bool = False):
    """Translate an ``ExportedProgram`` to a Relax IRModule (clear errors for unknown ops).
    ``decomposed``: ``ep`` is already what :func:`decompose_for_translator` makes of it."""
    from tvm.relax.frontend.torch import from_exported_program

    from .converters import torch_custom_converters

    custom = torch_custom_converters()
    if not decomposed:
        with quiet_tracing():
            ep = decompose_for_translator(ep)  # what the translator converts, decomposed once
    check_torch_ops(ep, custom, what)
    with quiet_tracing():
        return from_exported_program(ep, custom_convert_map=custom or None, run_ep_decomposition=False)


def import_torch_entry(spec, model, cfg, entry: str) -> tuple:
    """torch.export one entry and translate it to a Relax function."""
    sig = entry_signature(spec, model, cfg, entry)
    inputs = spec.entry(entry).example_inputs(cfg, "meta")
    sd = dict(model.named_parameters())
    weights = tuple(torch.empty(sd[p].shape, dtype=sd[p].dtype, device="meta") for p in sig.params)
    wrapper = make_entry_wrapper(model, entry, spec.entry(entry).inputs, sig.params)
    with quiet_tracing():
        try:
            ep = export_decomposed(wrapper, inputs + weights)  # one trace to the translator's ATen
        except Exception as exc:  # export errors are model bugs or unsupported python
            raise BlueLowerError(f"torch.export failed for entry '{entry}': {str(exc).splitlines()[0]}") from exc
    mod = import_torch_program(ep, f"entry '{entry}'", decomposed=True)
    return finish_function(mod["main"], entry, sig), sig, helper_functions(mod)
