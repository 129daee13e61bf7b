"""Converters for operators a TVM frontend lacks.

Each entry maps an operator name to a function in the frontend's converter convention.
When a model needs an op the frontend does not know, the import fails with an
``UnsupportedOperatorError`` naming it; the fix is a converter here, not a change to the
model.
"""

from __future__ import annotations


def torch_custom_converters() -> dict:
    """``from_exported_program(custom_convert_map=...)``: aten op name -> converter."""
    return {}


def onnx_custom_converters() -> dict:
    """``from_onnx(custom_convert_map=...)``: ONNX op type -> converter class."""
    return {}
