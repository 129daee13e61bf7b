"""The torch op pre-check runs on the program TVM's translator converts (after its
decompositions): transformers' models import; an op TVM lacks is one line naming it and the
user's source line, exit code 3."""

from __future__ import annotations

import pytest
import torch

from bluelower.errors import UnsupportedOperatorError
from bluelower.lowering.frontend.op_support import check_torch_ops, decompose_for_translator
from bluelower.lowering.frontend.torch_export import import_torch_program

from hf_tiny import export, hf_model

pytest.importorskip("transformers")


def _ops(ep) -> set:
    return {n.target.__name__ for n in ep.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("arch, before", [("llama", {"to.device", "diff.default"}), ("siglip", {"conv2d.padding"})])
def test_transformers_models_import(arch, before):
    ep = export(*hf_model(arch))
    assert before <= _ops(ep)  # what the old check refused: gone after the decompositions
    assert not before & _ops(decompose_for_translator(ep))
    mod = import_torch_program(ep, f"transformers {arch}")
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


class _Erfinv(torch.nn.Module):
    def forward(self, x):
        y = x * 0.5
        return torch.erfinv(y)  # TVM 0.27 has no converter for erfinv


def test_unsupported_op_is_one_line_naming_op_and_source():
    ep = export(_Erfinv(), (torch.rand(2, 3),))
    with pytest.raises(UnsupportedOperatorError) as info:
        import_torch_program(ep, "entry 'forward'")
    msg = str(info.value)
    assert "\n" not in msg and info.value.exit_code == 3
    assert "'erfinv.default'" in msg and "entry 'forward'" in msg
    assert "test_op_support.py:" in msg and "return torch.erfinv(y)" in msg
    assert "frontend/converters.py" in msg


def test_custom_converter_counts_as_known():
    ep = decompose_for_translator(export(_Erfinv(), (torch.rand(2, 3),)))
    check_torch_ops(ep, {"erfinv.default": None}, "the model")  # no refusal
