"""Entry functions as the frontends import them: their signatures and the attributes the
passes read (``num_input``, ``bluelower.param_names``), shared by both frontends."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass


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


def sanitize(name: str) -> str:
    """The Relax parameter name of a weight (dots and other symbols -> ``_``)."""
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def entry_signature(spec, model, cfg, entry: str) -> EntrySignature:
    """The signature of ``entry`` of ``model`` (a module of ``spec``'s family built for ``cfg``)."""
    inputs = spec.entry(entry).example_inputs(cfg, "meta")
    names = spec.entry(entry).inputs
    params = spec.entry_params([n for n, _ in model.named_parameters()], entry)
    sd = dict(model.named_parameters())
    return EntrySignature(
        name=entry,
        inputs=[{"name": n, "shape": list(t.shape), "dtype": _dtype_name(t)} for n, t in zip(names, inputs)],
        params=params,
        param_shapes={p: (tuple(sd[p].shape), _dtype_name(sd[p])) for p in params},
    )


@contextlib.contextmanager
def quiet_tracing():
    """Frontends print warnings and TorchScript chatter; keep stderr for our progress."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            yield


def finish_function(func, entry: str, sig: EntrySignature):
    func = func.with_attr("global_symbol", entry)
    func = func.with_attr("num_input", len(sig.inputs))
    # passes that split or add functions name each one's weights from this
    func = func.with_attr("bluelower.param_names", list(sig.params))
    return func


def helper_functions(mod) -> dict:
    """Functions besides ``main`` an importer emitted (e.g. a TIR ``pad``)."""
    return {gv.name_hint: (gv, f) for gv, f in mod.functions.items() if gv.name_hint != "main"}


def module_signatures(mod) -> dict:
    """The EntrySignature of every entry function of ``mod`` as the passes left it (the
    imported ones and those a pass created, e.g. TileImagePatches' stages), read from the
    functions' parameters, ``num_input`` and ``bluelower.param_names``: a quantized weight's
    packed parameters, the INT8 KV cache's type."""
    from tvm import relax

    out = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function) or func.attrs is None:
            continue
        if "bluelower.param_names" not in func.attrs or "global_symbol" not in func.attrs:
            continue
        name = str(func.attrs["global_symbol"])
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
