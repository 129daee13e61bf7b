"""Import the PyTorch model into one Relax IRModule with one function per entry point.

Both frontends trace a thin wrapper whose ``forward(*inputs, *weights)`` calls the entry
method through ``torch.func.functional_call``: the weights are function inputs, not
registered parameters, so tracing works on ``meta`` tensors and no fp32 weight of a big
model is ever materialized (the torch frontend). The Relax functions therefore take
``(*inputs, *weights)``; attribute ``num_input`` says how many leading parameters are
run-time inputs, and ``bluelower.param_names`` names the weights in order.

* ``torch``: ``torch.export`` + ``tvm.relax.frontend.torch.from_exported_program``.
* ``onnx``: ``torch.onnx.export`` (TorchScript exporter) + ``onnxsim`` +
  ``tvm.relax.frontend.onnx.from_onnx``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ... import progress
from ...errors import BlueLowerError, UnsupportedOperatorError
from ..models.bluelm_v import model as bluelm_v
from ..models.bluelm_v.config import ModelConfig

FRONTENDS = ("torch", "onnx")


@dataclass
class EntrySignature:
    """Inputs, weights and outputs of one entry function (recorded in the manifest)."""

    name: str
    inputs: list  # [{"name", "shape", "dtype"}]
    params: list  # weight names, in call order
    param_shapes: dict  # weight name -> (shape, dtype)

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "params": self.params}


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _make_wrapper(model: nn.Module, entry: str, input_names, weight_names) -> nn.Module:
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
    arg_names = list(input_names) + [_sanitize(w) for w in weight_names]
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


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def entry_signature(model: bluelm_v.BlueLMV, cfg: ModelConfig, entry: str) -> EntrySignature:
    inputs = bluelm_v.entry_example_inputs(cfg, entry, device="meta")
    names = bluelm_v.ENTRY_INPUT_NAMES[entry]
    params = bluelm_v.entry_param_names(model, entry)
    sd = dict(model.named_parameters())
    return EntrySignature(
        name=entry,
        inputs=[{"name": n, "shape": list(t.shape), "dtype": _dtype_name(t)} for n, t in zip(names, inputs)],
        params=params,
        param_shapes={p: (tuple(sd[p].shape), _dtype_name(sd[p])) for p in params},
    )


def build_meta_model(cfg: ModelConfig) -> bluelm_v.BlueLMV:
    """The model with every parameter on the meta device (no memory)."""
    with torch.device("meta"):
        return bluelm_v.BlueLMV(cfg).eval()


@contextlib.contextmanager
def _quiet_tracing():
    """Frontends print warnings and TorchScript chatter; keep stderr for our progress."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            yield


def _unsupported_from_exception(exc: Exception, frontend: str) -> BlueLowerError | None:
    msg = str(exc)
    m = re.search(r"Unsupported function types? \[?([^\]\n]+)\]?", msg)
    if m:
        return UnsupportedOperatorError(
            f"{frontend} frontend: unsupported operator(s) {m.group(1).strip()} "
            "(add a converter in bluelower/lowering/converters.py)"
        )
    m = re.search(r"operators are not supported for frontend ONNX:\s*([^\n]+)", msg)
    if m:
        return UnsupportedOperatorError(
            f"onnx frontend: unsupported operator(s) {m.group(1).strip()} "
            "(add a converter in bluelower/lowering/converters.py)"
        )
    return None


def _node_origin(node) -> str:
    """The user source line an FX node came from (last frame of its stack trace)."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    for line in reversed(trace):
        line = line.strip()
        if line.startswith("File "):
            return line
    return "unknown source"


def check_torch_ops(ep, custom: dict, what: str) -> None:
    """Fail with one clear message, naming the op and its node, before translation."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = set(ExportedProgramImporter().create_convert_map()) | set(custom)
    for node in ep.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if name not in known:
                raise UnsupportedOperatorError(
                    f"torch frontend: unsupported operator '{name}' at node '{node.name}' of {what} "
                    f"({_node_origin(node)}); add a converter in bluelower/lowering/converters.py"
                )


def check_onnx_ops(proto, what: str) -> None:
    from tvm.relax.frontend.onnx import onnx_frontend

    from .converters import ONNX_CONVERTERS

    known = set(onnx_frontend._get_convert_map()) | set(ONNX_CONVERTERS)
    for node in proto.graph.node:
        if node.op_type not in known:
            raise UnsupportedOperatorError(
                f"onnx frontend: unsupported operator '{node.op_type}' at node '{node.name or '(unnamed)'}' of {what}; "
                "add a converter in bluelower/lowering/converters.py"
            )


def import_torch_program(ep, what: str = "the model"):
    """Translate an ``ExportedProgram`` to a Relax IRModule (clear errors for unknown ops)."""
    from tvm.relax.frontend.torch import from_exported_program

    from .converters import torch_custom_converters

    custom = torch_custom_converters()
    check_torch_ops(ep, custom, what)
    with _quiet_tracing():
        return from_exported_program(ep, custom_convert_map=custom or None)


def _finish_function(func, entry: str, sig: EntrySignature):
    func = func.with_attr("global_symbol", entry)
    func = func.with_attr("num_input", len(sig.inputs))
    # passes that split or add functions name each one's weights from this
    func = func.with_attr("bluelower.param_names", list(sig.params))
    return func


def import_torch_entry(model, cfg: ModelConfig, entry: str):
    """torch.export one entry and translate it to a Relax function."""
    sig = entry_signature(model, cfg, entry)
    inputs = bluelm_v.entry_example_inputs(cfg, entry, device="meta")
    sd = dict(model.named_parameters())
    weights = tuple(torch.empty(sd[p].shape, dtype=sd[p].dtype, device="meta") for p in sig.params)
    wrapper = _make_wrapper(model, entry, bluelm_v.ENTRY_INPUT_NAMES[entry], sig.params)
    with _quiet_tracing():
        try:
            ep = torch.export.export(wrapper, inputs + weights)
        except Exception as exc:  # export errors are model bugs or unsupported python
            raise BlueLowerError(f"torch.export failed for entry '{entry}': {str(exc).splitlines()[0]}") from exc
    mod = import_torch_program(ep, f"entry '{entry}'")
    return _finish_function(mod["main"], entry, sig), sig, _helpers(mod)


def _helpers(mod) -> dict:
    """Functions besides ``main`` an importer emitted (e.g. a TIR ``pad``)."""
    return {gv.name_hint: (gv, f) for gv, f in mod.functions.items() if gv.name_hint != "main"}


def import_onnx_entry(model, cfg: ModelConfig, entry: str, weights: dict | None = None, onnx_dir: str | None = None):
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

    sig = entry_signature(model, cfg, entry)
    inputs = bluelm_v.entry_example_inputs(cfg, entry, device="cpu")
    # Random (not zero) values: the TorchScript exporter merges parameters of equal value.
    gen = torch.Generator().manual_seed(0)
    cpu_model = bluelm_v.BlueLMV(cfg).eval()
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

    input_names = list(bluelm_v.ENTRY_INPUT_NAMES[entry])
    with tempfile.TemporaryDirectory() as tmp, _quiet_tracing():
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
            err = _unsupported_from_exception(exc, "onnx")
            if err is not None:
                raise err from None
            raise
    func = mod["main"]
    by_name = {str(p): p for p in func.params}
    wanted = input_names + ["m." + p for p in sig.params]
    missing = [w for w in wanted if w not in by_name and _sanitize(w) not in by_name]
    if missing:
        raise BlueLowerError(f"onnx import of {entry!r}: graph inputs {missing[:3]} not found; have {list(by_name)[:12]}")
    ordered = [by_name.get(w, by_name.get(_sanitize(w))) for w in wanted]
    extra = [str(p) for p in func.params if not any(p.same_as(o) for o in ordered)]
    if extra:
        raise BlueLowerError(f"onnx import of {entry!r}: unexpected graph inputs {extra[:5]}")
    func = relax.Function(ordered, func.body, func.ret_ty, func.is_pure, func.attrs)
    return _finish_function(func, entry, sig), sig, _helpers(mod)


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
        err = _unsupported_from_exception(exc, "onnx")
        if err is not None:
            raise err from None
        raise


def import_model(cfg: ModelConfig, frontend: str = "torch", entries=None, weights: dict | None = None):
    """Import the model's entry functions into one IRModule.

    Returns ``(mod, signatures)`` where ``signatures[entry]`` is an :class:`EntrySignature`.
    """
    import tvm

    if frontend not in FRONTENDS:
        raise BlueLowerError(f"unknown frontend '{frontend}' (valid: {', '.join(FRONTENDS)})")
    entries = list(entries or bluelm_v.BlueLMV.ENTRY_FUNCTIONS)
    model = build_meta_model(cfg)
    funcs, sigs, gvars = {}, {}, {}
    bar = progress.Progress(f"import ({frontend})", len(entries))
    for entry in entries:
        if frontend == "torch":
            func, sig, helpers = import_torch_entry(model, cfg, entry)
        else:
            func, sig, helpers = import_onnx_entry(model, cfg, entry, weights=weights)
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


def signatures_added_by_passes(mod, known: dict) -> dict:
    """EntrySignatures of entry functions a pass created (e.g. TileImagePatches' stages),
    read from their parameters, ``num_input`` and ``bluelower.param_names``."""
    from tvm import relax

    out = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function) or func.attrs is None:
            continue
        if "bluelower.param_names" not in func.attrs or "global_symbol" not in func.attrs:
            continue
        name = str(func.attrs["global_symbol"])
        if name in known:
            continue
        num_input = int(func.attrs["num_input"])
        names = [str(n) for n in func.attrs["bluelower.param_names"]]
        inputs = []
        for p in func.params[:num_input]:
            sinfo = p.ty
            inputs.append({"name": str(p), "shape": [int(d) for d in sinfo.shape], "dtype": str(sinfo.dtype)})
        shapes = {}
        for n, p in zip(names, func.params[num_input:]):
            shapes[n] = (tuple(int(d) for d in p.ty.shape), str(p.ty.dtype))
        out[name] = EntrySignature(name=name, inputs=inputs, params=names, param_shapes=shapes)
    return out
