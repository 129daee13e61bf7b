"""Roofline cost of a piece of work on one compute unit of a SoC.

    cost(work, unit) = max(flops / peak(unit, dtype), bytes / bandwidth(unit)) + calls * overhead(unit)

Assumptions (each one is a simplification the predictions inherit):

1. **Roofline, no overlap losses.** A task is either compute-bound or memory-bound;
   compute and DRAM traffic overlap perfectly inside a task, and the slower one wins.
2. **Sustained peaks.** ``peak`` is the rate compiled code sustains, not a marketing
   figure: for a CPU cluster ``cores x clock x ops_per_cycle[dtype] x efficiency``, for the
   APU ``apu.peak[dtype]`` from the SoC file. Utilization does not depend on shape (a
   1-row GEMV and a 128-row GEMM run at the same ops/s when compute-bound).
3. **One dtype per task.** A task lists acceptable compute dtypes in preference order
   (e.g. ``("int16", "fp16")``); a unit runs it in the first one it has a rate for. The
   weight dtype only changes the bytes moved (INT4 weights are unpacked on the fly).
4. **Bytes are DRAM bytes.** Weights are streamed from DRAM once per call (no reuse across
   calls, none held in caches or APU SRAM); activations that stay on chip are not counted.
5. **Bandwidth is per unit and uncontended.** A unit reaches ``min(unit.bandwidth,
   memory.bandwidth)``; two units running at once do not slow each other down.
6. **Fixed per-call overhead.** Every compiled-graph invocation costs ``per_call_overhead``
   (driver, command submission, thread-pool wake-up), independent of the graph's size.
   A task's number of calls is ``work.calls`` (e.g. a decoder split into 2 APU graphs).
7. **Operator coverage is all-or-nothing.** The APU can run a task only if every operator
   kind in ``work.op_kinds`` is listed in ``apu.ops`` with the chosen dtype; otherwise the
   task is not a candidate for the APU (no partial offload inside one task). CPU clusters
   run every operator kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import BlueLowerError
from .soc import SoC

APU_UNIT = "apu"


@dataclass(frozen=True)
class Work:
    """What a task does, independent of where it runs.

    ``flops`` counts operations (a multiply-add is 2); ``bytes`` is DRAM traffic;
    ``dtypes`` the acceptable compute dtypes in preference order; ``op_kinds`` the operator
    kinds the task contains (for APU coverage); ``calls`` the compiled-graph invocations.
    """

    flops: float
    bytes: float
    dtypes: tuple[str, ...] = ("fp32",)
    op_kinds: frozenset[str] = field(default_factory=frozenset)
    calls: int = 1

    def __post_init__(self) -> None:
        if self.flops < 0 or self.bytes < 0 or self.calls < 0:
            raise BlueLowerError(f"work must have non-negative flops, bytes and calls, got {self}")
        if not self.dtypes:
            raise BlueLowerError("work needs at least one compute dtype")


@dataclass(frozen=True)
class Unit:
    """A schedulable compute unit: the APU or one CPU cluster."""

    name: str
    kind: str  # "apu" | "cpu"
    peaks: dict[str, float]  # dtype -> sustained ops/s
    bandwidth_bps: float
    per_call_overhead_s: float
    op_dtypes: dict[str, tuple[str, ...]] | None = None  # APU coverage; None = runs everything

    def dtype_for(self, work: Work) -> str | None:
        """The first of ``work.dtypes`` this unit can run every op kind of ``work`` in."""
        for dt in work.dtypes:
            if dt not in self.peaks:
                continue
            if self.op_dtypes is not None and not all(dt in self.op_dtypes.get(k, ()) for k in work.op_kinds):
                continue
            return dt
        return None


@dataclass(frozen=True)
class Cost:
    """Roofline breakdown of one work item on one unit."""

    unit: str
    dtype: str
    compute_s: float
    memory_s: float
    overhead_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s) + self.overhead_s

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def units_of(soc: SoC) -> list[Unit]:
    """The SoC's schedulable units: ``apu`` (if any) first, then each CPU cluster by name."""
    mem_bw = soc.memory.bandwidth_bps
    units: list[Unit] = []
    if soc.apu is not None:
        a = soc.apu
        units.append(Unit(APU_UNIT, "apu", dict(a.peak_ops_per_s), min(a.bandwidth_bps, mem_bw),
                          a.per_call_overhead_s, {k: tuple(v) for k, v in a.ops.items()}))
    for c in soc.cpu_clusters:
        if c.name == APU_UNIT:
            raise BlueLowerError(f"{soc.source}: a CPU cluster may not be named '{APU_UNIT}'")
        peaks = {dt: c.peak_ops(dt) for dt in c.ops_per_cycle}
        bw = min(c.bandwidth_bps or mem_bw, mem_bw)
        units.append(Unit(c.name, "cpu", peaks, bw, c.per_call_overhead_s))
    return units


def cost(work: Work, unit: Unit) -> Cost | None:
    """Roofline cost of ``work`` on ``unit``, or None when the unit cannot run it."""
    dt = unit.dtype_for(work)
    if dt is None:
        return None
    compute = work.flops / unit.peaks[dt] if work.flops else 0.0
    memory = work.bytes / unit.bandwidth_bps if work.bytes else 0.0
    c = Cost(unit.name, dt, compute, memory, work.calls * unit.per_call_overhead_s)
    if not math.isfinite(c.seconds):
        raise BlueLowerError(f"non-finite cost for {work} on {unit.name}")
    return c


def candidate_costs(work: Work, units: list[Unit], only: list[str] | None = None) -> dict[str, float]:
    """``{unit name: seconds}`` over the units (optionally restricted to ``only``) that can run ``work``."""
    out = {}
    for u in units:
        if only is not None and u.name not in only:
            continue
        c = cost(work, u)
        if c is not None:
            out[u.name] = c.seconds
    if not out:
        raise BlueLowerError(
            f"no unit can run work with dtypes {list(work.dtypes)} and ops {sorted(work.op_kinds)}"
            + (f" among {only}" if only else "")
        )
    return out
