"""CachedLegalizeOps (passes/legalize.py) makes the module TVM's LegalizeOps makes, legalizing
each distinct call once: whole tiny builds (host and the Dimensity 9300's APU partitions with
their fp16 rounding), fp32 and quantized."""

from __future__ import annotations

import pytest
import tvm
import tvm_ffi
from tvm import relax

from bluelower.lowering.artifacts.compile import resolve_soc
from bluelower.lowering.artifacts.memory_table import plan_dtype_bytes
from bluelower.lowering.frontend.importer import import_model
from bluelower.lowering.kernels.parse_speed import fast_prim_func_frames
from bluelower.lowering.models import spec_for
from bluelower.lowering.models.registry import load_config
from bluelower.passes.legalize import CachedLegalizeOps
from bluelower.passes.pipeline import BuildContext, run_pipeline


@pytest.fixture(scope="module")
def imported():
    return import_model(load_config("tiny"), "torch")


@pytest.mark.parametrize("soc, quant", [("host", "fp32"), ("host", "w4a8kv8"), ("dimensity9300", "w4a16kv8")])
def test_same_module_as_tvm_legalize_ops(imported, soc, quant):
    mod, sigs = imported
    cfg, target_soc = load_config("tiny"), resolve_soc(soc)
    ctx = BuildContext(target=target_soc.tvm_target(), quant=quant, group_size=32, soc=target_soc,
                       spec=spec_for(cfg), entry_functions=tuple(sigs), image_batch=cfg.runtime.image_batch,
                       plan_dtype_bytes=plan_dtype_bytes(quant))
    before, _ = run_pipeline(mod, ctx, stop_after="MergeSiblingLinears")
    with tvm.transform.PassContext(opt_level=3), fast_prim_func_frames(), ctx.target:
        ours = CachedLegalizeOps()(before)
        theirs = relax.transform.LegalizeOps()(before)
    stats = __import__("json").loads(str(ours.attrs["bluelower.pass_stats"]))["LegalizeOps"]
    assert stats["reused"] > 0 and stats["legalized"] > 0, stats
    ours = ours.without_attr("bluelower.pass_stats")
    theirs = theirs.without_attr("bluelower.pass_stats")
    assert tvm_ffi.structural_equal(ours, theirs)
