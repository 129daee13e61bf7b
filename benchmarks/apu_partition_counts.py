"""PartitionForAPU + ScheduleOperators statistics of a model on a SoC, without building.

Usage::

    .venv/bin/python benchmarks/apu_partition_counts.py w4a16 [MODEL] [SOC]   # default bluelm-v-3b, dimensity9300

Imports MODEL on meta tensors, runs the compile pipeline up to ScheduleOperators and prints
the statistics of PartitionForAPU and ScheduleOperators (partitions and APU calls per
entry, operators on the APU / CPU) and the schedule's seconds per phase
(docs/apu-partitions.md, "BlueLM-V-3B on the Dimensity 9300"). About 4 min for the 3B.
"""
import json
import sys
import time

from bluelower.lowering.frontend.importer import import_model
from bluelower.lowering.models import load_config, spec_for
from bluelower.passes.ir_utils import result
from bluelower.passes.pipeline import BuildContext, run_pipeline
from bluelower.targets.soc import load_soc

t0 = time.time()
model = sys.argv[2] if len(sys.argv) > 2 else "bluelm-v-3b"
soc = load_soc(sys.argv[3] if len(sys.argv) > 3 else "dimensity9300")
cfg = load_config(model).replace_runtime(image_batch=soc.image_batch)
mod, sigs = import_model(cfg, "torch")
ctx = BuildContext(target=soc.tvm_target(), quant=sys.argv[1], soc=soc, spec=spec_for(cfg),
                   entry_functions=tuple(sigs), image_batch=cfg.runtime.image_batch)
mod, stats = run_pipeline(mod, ctx, stop_after="ScheduleOperators")
by_name = {s["name"]: s["stats"] for s in stats}
print("partition", json.dumps(by_name["PartitionForAPU"]))
s = result(mod, "schedule")
print("schedule", json.dumps({"phase_seconds": s["phase_seconds"], "info": s["info"]}, default=str)[:3000])
print("elapsed", time.time() - t0)
