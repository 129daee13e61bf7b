"""PartitionForAPU + ScheduleOperators statistics of a model on a SoC, without building.

Usage::

    /work/venv/bin/python benchmarks/apu_partition_counts.py w4a16 [MODEL] [SOC]   # default bluelm-v-3b, dimensity9300

Imports MODEL on meta tensors, runs the pipeline up to the partition/schedule phase, then
PartitionForAPU and ScheduleOperators, and prints their statistics (partitions and APU
calls per entry, operators on the APU / CPU) and the schedule's seconds per phase
(docs/apu-partitions.md, "BlueLM-V-3B on the Dimensity 9300"). About 4 min for the 3B.
"""
import json, sys, time
import tvm
from bluelower.passes import pipeline
from bluelower.passes.partition_for_apu import PartitionForAPU
from bluelower.passes.schedule_operators import ScheduleOperators
from bluelower.targets.soc import load_soc
from bluelower.lowering.frontend.importer import import_model
from bluelower.lowering.models.bluelm_v.config import load_config

t0 = time.time()
model = sys.argv[2] if len(sys.argv) > 2 else "bluelm-v-3b"
soc = load_soc(sys.argv[3] if len(sys.argv) > 3 else "dimensity9300")
cfg = load_config(model).replace_runtime(image_batch=soc.image_batch)
mod, sigs = import_model(cfg, "torch")
opts = pipeline.CompileOptions(target=soc.tvm_target(), quant=sys.argv[1], soc=soc, model=cfg,
                               entry_functions=tuple(sigs), extra={"group_size": 32})
for spec in pipeline.build_pipeline():
    if spec.phase == "partition/schedule":
        break
    p = spec.make(opts)
    if p is not None:
        with tvm.transform.PassContext(opt_level=3):
            mod = p(mod)
stats = {}
pipeline._current_stats = stats
mod = PartitionForAPU(soc)(mod)
print("partition", json.dumps(stats))
stats = {}
pipeline._current_stats = stats
sink = {}
ScheduleOperators(soc, image_batch=cfg.runtime.image_batch, sink=sink)(mod)
s = sink["schedule"]
print("schedule", json.dumps({"phase_seconds": s["phase_seconds"], "info": s["info"]}, default=str)[:3000])
print("elapsed", time.time() - t0)
