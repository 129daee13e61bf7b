"""Import a model family's entry functions into one Relax IRModule.

Each entry of the family's :class:`~bluelower.lowering.models.registry.ModelSpec` becomes one
Relax function ``f(*inputs, *weights)``: attribute ``num_input`` says how many leading
parameters are run-time inputs, ``bluelower.param_names`` names the weights in order (the
checkpoint's names). Weights are function parameters, not constants, so the library is
independent of the weights and the torch frontend traces on ``meta`` tensors.

* ``torch``: ``torch.export`` + ``from_exported_program`` (``frontend/torch_export.py``).
* ``onnx``: ``torch.onnx.export`` + ``onnxsim`` + ``from_onnx`` (``frontend/onnx_import.py``).
"""

from __future__ import annotations

import torch

from ... import progress
from ...errors import BlueLowerError
from ..models import spec_for
from .entries import EntrySignature  # noqa: F401  (what callers read of an import)
from .onnx_import import import_onnx_entry
from .torch_export import import_torch_entry

FRONTENDS = ("torch", "onnx")


def build_meta_model(cfg):
    """The model with every parameter on the meta device (no memory)."""
    with torch.device("meta"):
        return spec_for(cfg).build_module(cfg).eval()


def import_model(cfg, frontend: str = "torch", entries=None, weights: dict | None = None):
    """Import the model's entry functions into one IRModule.

    Returns ``(mod, signatures)`` where ``signatures[entry]`` is an :class:`EntrySignature`.
    """
    import tvm

    if frontend not in FRONTENDS:
        raise BlueLowerError(f"unknown frontend '{frontend}' (valid: {', '.join(FRONTENDS)})")
    spec = spec_for(cfg)
    entries = list(entries or spec.entry_names)
    model = build_meta_model(cfg)
    funcs, sigs, gvars = {}, {}, {}
    bar = progress.Progress(f"import ({frontend})", len(entries))
    for entry in entries:
        if frontend == "torch":
            func, sig, helpers = import_torch_entry(spec, model, cfg, entry)
        else:
            func, sig, helpers = import_onnx_entry(spec, model, cfg, entry, weights=weights)
        for name, (gv, helper) in helpers.items():
            if name in funcs:
                # call sites hold their own GlobalVar: only identical helpers can be shared
                raise RuntimeError(f"two entries define helper functions named {name!r}")
            funcs[name], gvars[name] = helper, gv
        funcs[entry], sigs[entry] = func, sig
        gvars[entry] = tvm.ir.GlobalVar(entry)
        bar.update(item=entry)
    bar.close()
    mod = tvm.IRModule({gvars[name]: f for name, f in funcs.items()})
    return mod, sigs
