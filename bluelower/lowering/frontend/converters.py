"""Converters for operators a TVM frontend lacks.

When a model needs an op a frontend does not know, the import fails with an
``UnsupportedOperatorError`` naming it; the fix is a converter registered here, not a
change to the model.

* torch: ``from_exported_program(custom_convert_map=...)`` takes
  ``{aten op name: fn(node, translator) -> relax.Expr}``; add entries to
  :data:`TORCH_CONVERTERS`.
* onnx: TVM 0.27's ``from_onnx`` has no hook, so :func:`onnx_converter_scope` extends the
  frontend's converter table for the duration of an import; add ONNX op types to
  :data:`ONNX_CONVERTERS` (an ``OnnxOpConverter`` subclass each).
"""

from __future__ import annotations

import contextlib

TORCH_CONVERTERS: dict = {}
ONNX_CONVERTERS: dict = {}


def torch_custom_converters() -> dict:
    return dict(TORCH_CONVERTERS)


@contextlib.contextmanager
def onnx_converter_scope():
    """Temporarily add :data:`ONNX_CONVERTERS` to TVM's ONNX converter table."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map

    def extended():
        table = original()
        table.update(ONNX_CONVERTERS)
        return table

    onnx_frontend._get_convert_map = extended
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
