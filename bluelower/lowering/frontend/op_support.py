"""What the frontends can convert: one clear error naming the operator before translation.

* torch: :func:`check_torch_ops` walks the ``ExportedProgram`` as TVM's translator will
  see it, i.e. after :func:`decompose_for_translator` (``from_exported_program`` runs
  ``ExportedProgram.run_decompositions()`` before it converts: ``to.device``, ``diff``,
  ``conv2d.padding`` and the like only exist before that), and refuses a ``call_function``
  whose target the translator (plus bluelower's converters) lacks, naming the user's
  source line the node came from.
* onnx: :func:`check_onnx_ops` does the same over the graph's node types.
* :func:`unsupported_from_exception` turns a translator's own "unsupported" exception into
  the same error.

The fix for a refused operator is a converter in ``frontend/converters.py``, not a change to
the model.
"""

from __future__ import annotations

import re

from ...errors import UnsupportedOperatorError


def unsupported_from_exception(exc: Exception, frontend: str) -> UnsupportedOperatorError | None:
    msg = str(exc)
    m = re.search(r"Unsupported function types? \[?([^\]\n]+)\]?", msg)
    if m:
        return UnsupportedOperatorError(
            f"{frontend} frontend: unsupported operator(s) {m.group(1).strip()} "
            "(add a converter in bluelower/lowering/frontend/converters.py)"
        )
    m = re.search(r"operators are not supported for frontend ONNX:\s*([^\n]+)", msg)
    if m:
        return UnsupportedOperatorError(
            f"onnx frontend: unsupported operator(s) {m.group(1).strip()} "
            "(add a converter in bluelower/lowering/frontend/converters.py)"
        )
    return None


def node_origin(node) -> str:
    """The user source line an FX node came from: the last frame of its stack trace
    (``file:line in function: code``), or "unknown source"."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    for i in range(len(trace) - 1, -1, -1):
        m = re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', trace[i])
        if m:
            code = trace[i + 1].strip() if i + 1 < len(trace) and not trace[i + 1].strip().startswith("File ") else ""
            where = f"{m.group(1)}:{m.group(2)} in {m.group(3)}"
            return f"{where}: {code}" if code else where
    return "unknown source"


def decompose_for_translator(ep):
    """``ep`` as ``from_exported_program`` converts it: decomposed to core ATen by
    ``run_decompositions()`` (TVM 0.27's default table), unless it holds sparse tensors (then
    TVM converts it as it is). Import with ``run_ep_decomposition=False`` afterwards, so the
    program checked is the program translated and it is decomposed once."""
    import torch

    tensors = [*(t for _, t in ep.named_buffers()), *(t for _, t in ep.named_parameters()),
               *ep.constants.values(), *ep.tensor_constants.values()]
    if any(isinstance(t, torch.Tensor) and t.layout != torch.strided for t in tensors):
        return ep
    return ep.run_decompositions()


def export_decomposed(module, args: tuple):
    """``torch.export`` of ``module(*args)`` straight to the program
    :func:`decompose_for_translator` would make of it, in one trace.

    ``torch.export.export`` traces to the pre-dispatch (training) IR and
    ``run_decompositions()`` traces that program again; on the 3B decoder the two traces
    were 3.5 + 7.3 s per entry, the one trace 5.4 s. torch 2.13's non-strict export at
    ``pre_dispatch=False`` takes the decomposition table where it builds the ATen graph (a
    private argument of ``torch.export._trace``): where that is not there (another torch),
    this falls back to the two traces. Same graph either way
    (tests/test_op_support.py::test_one_trace_export_is_the_two_trace_program)."""
    import functools

    import torch

    try:
        from torch.export import _trace
        to_aten = _trace._export_to_aten_ir
        export = _trace._export
    except (ImportError, AttributeError):
        return decompose_for_translator(torch.export.export(module, args))
    _trace._export_to_aten_ir = functools.partial(to_aten, decomp_table=torch.export.default_decompositions())
    try:
        ep = export(module, args, strict=False, pre_dispatch=False)
    except TypeError:  # another signature: the public path
        ep = None
    finally:
        _trace._export_to_aten_ir = to_aten
    return ep if ep is not None else decompose_for_translator(torch.export.export(module, args))


def check_torch_ops(ep, custom: dict, what: str) -> None:
    """Fail with one clear message, naming the op, its node and the user's source line,
    before translation. ``ep`` is the program the translator gets (see
    :func:`decompose_for_translator`)."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = set(ExportedProgramImporter().create_convert_map()) | set(custom)
    for node in ep.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            if name not in known:
                raise UnsupportedOperatorError(
                    f"torch frontend: unsupported operator '{name}' at node '{node.name}' of {what} "
                    f"({node_origin(node)}); add a converter in bluelower/lowering/frontend/converters.py"
                )


def check_onnx_ops(proto, what: str) -> None:
    from tvm.relax.frontend.onnx import onnx_frontend

    from .converters import ONNX_CONVERTERS

    known = set(onnx_frontend._get_convert_map()) | set(ONNX_CONVERTERS)
    for node in proto.graph.node:
        if node.op_type not in known:
            raise UnsupportedOperatorError(
                f"onnx frontend: unsupported operator '{node.op_type}' at node '{node.name or '(unnamed)'}' of {what}; "
                "add a converter in bluelower/lowering/frontend/converters.py"
            )
