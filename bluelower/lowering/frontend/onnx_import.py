"""The ONNX frontend: ``torch.onnx.export`` (TorchScript exporter) + onnxsim + ``from_onnx``,
and the import of a user's ``.onnx`` file."""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from ... import progress
from ...errors import BlueLowerError
from .entries import entry_signature, finish_function, helper_functions, quiet_tracing, sanitize
from .op_support import check_onnx_ops, unsupported_from_exception


def import_onnx_entry(spec, model, cfg, entry: str, weights: dict | None = None, onnx_dir: str | None = None) -> tuple:
    """torch.onnx.export one entry (TorchScript exporter), simplify it, translate to Relax.

    The TorchScript exporter runs the model and cannot trace ``functional_call``, so it
    exports a CPU model with ``export_params=False``: its parameters become graph inputs
    (named after the state dict), which are then put in the manifest's order. The CPU model
    holds random values unless ``weights`` are given: the ONNX path materializes the weights of the
    traced entry, so it suits models that fit in memory (the torch frontend traces on meta).
    """
    import onnx
    import onnxsim
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from .converters import onnx_converter_scope

    sig = entry_signature(spec, model, cfg, entry)
    inputs = spec.entry(entry).example_inputs(cfg, "cpu")
    # Random (not zero) values: the TorchScript exporter merges parameters of equal value.
    gen = torch.Generator().manual_seed(0)
    cpu_model = spec.build_module(cfg).eval()
    with torch.no_grad():
        for name, param in cpu_model.named_parameters():
            if weights is not None and name in weights:
                param.copy_(weights[name])
            else:
                param.copy_(torch.randn(param.shape, generator=gen))

    class _EntryCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = cpu_model

        def forward(self, *args):
            return getattr(self.m, entry)(*args)

    input_names = list(spec.entry(entry).inputs)
    with tempfile.TemporaryDirectory() as tmp, quiet_tracing():
        path = os.path.join(onnx_dir or tmp, f"{entry}.onnx")
        try:
            torch.onnx.export(_EntryCall(), tuple(inputs), path, input_names=input_names, opset_version=17,
                              dynamo=False, export_params=False, do_constant_folding=False)
        except Exception as exc:
            raise BlueLowerError(f"torch.onnx.export failed for entry '{entry}': {str(exc).splitlines()[0]}") from exc
        proto = _params_to_graph_inputs(onnx.load(path), prefix="m.")
        try:
            simplified, ok = onnxsim.simplify(proto)
            if ok:
                proto = simplified
        except Exception as exc:  # onnxsim is an optimization: keep the unsimplified graph
            progress.log(f"onnxsim failed on '{entry}' ({str(exc).splitlines()[0]}); importing it unsimplified")
        check_onnx_ops(proto, f"entry '{entry}'")
        try:
            with onnx_converter_scope():
                mod = from_onnx(proto, keep_params_in_input=False)  # weights are graph inputs already
        except Exception as exc:
            err = unsupported_from_exception(exc, "onnx")
            if err is not None:
                raise err from None
            raise
    func = mod["main"]
    by_name = {str(p): p for p in func.params}
    wanted = input_names + ["m." + p for p in sig.params]
    missing = [w for w in wanted if w not in by_name and sanitize(w) not in by_name]
    if missing:
        raise BlueLowerError(f"onnx import of {entry!r}: graph inputs {missing[:3]} not found; have {list(by_name)[:12]}")
    ordered = [by_name.get(w, by_name.get(sanitize(w))) for w in wanted]
    extra = [str(p) for p in func.params if not any(p.same_as(o) for o in ordered)]
    if extra:
        raise BlueLowerError(f"onnx import of {entry!r}: unexpected graph inputs {extra[:5]}")
    func = relax.Function(ordered, func.body, func.ret_ty, func.is_pure, func.attrs)
    return finish_function(func, entry, sig), sig, helper_functions(mod)


def _params_to_graph_inputs(proto, prefix: str):
    """Turn the weight initializers into graph inputs, so that onnxsim cannot fold or merge
    them (weights are run-time parameters of the compiled function, not constants)."""
    import onnx

    graph = proto.graph
    keep = []
    existing = {i.name for i in graph.input}
    for init in list(graph.initializer):
        if init.name.startswith(prefix):
            if init.name not in existing:
                graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return proto


def import_onnx_file(path: str):
    """Import a user's ONNX file (clean errors for a missing or malformed file)."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    from .converters import onnx_converter_scope

    if not os.path.isfile(path):
        raise BlueLowerError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(path)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise BlueLowerError(f"{path}: malformed ONNX model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    check_onnx_ops(proto, path)
    try:
        with onnx_converter_scope():
            return from_onnx(proto)
    except Exception as exc:
        err = unsupported_from_exception(exc, "onnx")
        if err is not None:
            raise err from None
        raise
