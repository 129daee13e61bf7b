"""What the frontends can convert: one clear error naming the operator before translation.

* torch: :func:`check_torch_ops` walks the ``ExportedProgram`` and refuses a
  ``call_function`` whose target TVM's translator (plus bluelower's converters) lacks.
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
            "(add a converter in bluelower/lowering/converters.py)"
        )
    m = re.search(r"operators are not supported for frontend ONNX:\s*([^\n]+)", msg)
    if m:
        return UnsupportedOperatorError(
            f"onnx frontend: unsupported operator(s) {m.group(1).strip()} "
            "(add a converter in bluelower/lowering/converters.py)"
        )
    return None


def node_origin(node) -> str:
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
                    f"({node_origin(node)}); add a converter in bluelower/lowering/converters.py"
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
