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


def test_one_trace_export_is_the_two_trace_program():
    """export_decomposed (one trace, the decomposition table where torch builds the ATen
    graph) gives the program export + run_decompositions gives, on every entry of the tiny
    BlueLM-V and of a transformers Llama, and the same Relax import."""
    import collections

    import tvm_ffi

    from bluelower.lowering.frontend import torch_export as te
    from bluelower.lowering.frontend.entries import entry_signature, quiet_tracing
    from bluelower.lowering.frontend.importer import build_meta_model
    from bluelower.lowering.frontend.op_support import export_decomposed
    from bluelower.lowering.models import spec_for
    from bluelower.lowering.models.registry import load_config

    def ops(ep):  # the two-trace program keeps one dtype assertion of its first trace
        return collections.Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function"
                                   and "assert_tensor_metadata" not in str(n.target))

    cfg = load_config("tiny")
    spec, model = spec_for(cfg), build_meta_model(cfg)
    cases = [(*hf_model("llama"), "llama forward")]
    for entry in spec.entry_names:
        sig = entry_signature(spec, model, cfg, entry)
        sd = dict(model.named_parameters())
        weights = tuple(torch.empty(sd[p].shape, dtype=sd[p].dtype, device="meta") for p in sig.params)
        cases.append((te.make_entry_wrapper(model, entry, spec.entry(entry).inputs, sig.params),
                      tuple(spec.entry(entry).example_inputs(cfg, "meta")) + weights, entry))
    for module, args, what in cases:
        with quiet_tracing():
            one = export_decomposed(module, args)
            two = decompose_for_translator(torch.export.export(module, args))
        assert ops(one) == ops(two), what
        a, b = import_torch_program(one, what, decomposed=True), import_torch_program(two, what, decomposed=True)
        assert tvm_ffi.structural_equal(a, b), what
