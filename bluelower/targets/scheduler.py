"""List scheduling of a task DAG onto a SoC's units, plus Chrome-trace and Gantt output.

The input is a :class:`networkx.DiGraph` whose nodes are task names with attributes

* ``phase``: a label such as ``"image_encode"``, ``"prefill"``, ``"decode"``;
* ``costs``: ``{unit name: seconds}`` for every unit the task may run on (a task with a
  fixed unit has exactly one entry). Build nodes with :func:`add_task`.

An edge ``a -> b`` means ``b`` may start only after ``a`` ends. There is no transfer cost
between units (they share DRAM).

Algorithm (HEFT-style earliest-finish-time list scheduling):

1. Priority = *upward rank*: ``rank(t) = mean(costs[t]) + max(rank(s) for s in succ(t))``,
   i.e. the mean-cost length of the longest path from ``t`` to an exit task.
2. Repeatedly take the *ready* task (all predecessors scheduled) of highest rank (ties:
   topological order) and place it on the unit where it finishes earliest. A task may
   be inserted into an idle gap of a unit if it fits entirely (insertion policy), so one
   task per unit at a time always holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from ..errors import BlueLowerError


def add_task(g: nx.DiGraph, name: str, phase: str, costs: dict[str, float] | None = None, *,
             unit: str | None = None, cost: float | None = None, deps: tuple | list = (), **meta: Any) -> None:
    """Add task ``name`` to ``g``: either ``costs={unit: s, ...}`` or a fixed ``unit`` with ``cost``."""
    if name in g:
        raise BlueLowerError(f"duplicate task '{name}'")
    if costs is None:
        if unit is None or cost is None:
            raise BlueLowerError(f"task '{name}': give costs={{unit: s}} or unit= and cost=")
        costs = {unit: cost}
    elif unit is not None:
        raise BlueLowerError(f"task '{name}': give either costs or a fixed unit, not both")
    if not costs or any(c < 0 for c in costs.values()):
        raise BlueLowerError(f"task '{name}': needs at least one candidate unit and non-negative costs")
    for d in deps:
        if d not in g:
            raise BlueLowerError(f"task '{name}' depends on unknown task '{d}'")
    g.add_node(name, phase=phase, costs=dict(costs), meta=meta)
    for d in deps:
        g.add_edge(d, name)


@dataclass(frozen=True)
class ScheduledTask:
    name: str
    phase: str
    unit: str
    start_s: float
    end_s: float
    meta: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class Schedule:
    """Result of :func:`list_schedule`: where and when each task runs."""

    tasks: list[ScheduledTask]
    units: list[str]
    title: str = ""
    info: dict = field(default_factory=dict)

    @property
    def makespan_s(self) -> float:
        return max((t.end_s for t in self.tasks), default=0.0)

    def task(self, name: str) -> ScheduledTask:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def phases(self) -> dict[str, dict]:
        """Per phase: first start, last end, wall seconds (end - start), busy unit-seconds, task count."""
        out: dict[str, dict] = {}
        for t in self.tasks:
            p = out.setdefault(t.phase, {"start_s": t.start_s, "end_s": t.end_s, "busy_s": 0.0, "tasks": 0})
            p["start_s"] = min(p["start_s"], t.start_s)
            p["end_s"] = max(p["end_s"], t.end_s)
            p["busy_s"] += t.duration_s
            p["tasks"] += 1
        for p in out.values():
            p["seconds"] = p["end_s"] - p["start_s"]
        return out

    def phase_seconds(self) -> dict[str, float]:
        """Predicted wall-clock seconds per phase."""
        return {k: v["seconds"] for k, v in self.phases().items()}

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "makespan_s": self.makespan_s,
            "units": list(self.units),
            "phase_seconds": self.phase_seconds(),
            "phases": self.phases(),
            "info": self.info,
            "tasks": [{"name": t.name, "phase": t.phase, "unit": t.unit, "start_s": t.start_s,
                       "end_s": t.end_s, "meta": t.meta} for t in self.tasks],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        tasks = [ScheduledTask(t["name"], t["phase"], t["unit"], t["start_s"], t["end_s"], t.get("meta", {}))
                 for t in d["tasks"]]
        return cls(tasks=tasks, units=list(d["units"]), title=d.get("title", ""), info=d.get("info", {}))


def _check_graph(g: nx.DiGraph) -> None:
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise BlueLowerError(f"task graph has a cycle: {' -> '.join(str(a) for a, _ in cycle)}")
    for n, data in g.nodes(data=True):
        if "costs" not in data or "phase" not in data:
            raise BlueLowerError(f"task '{n}' lacks 'costs' or 'phase' (build nodes with add_task)")


def upward_ranks(g: nx.DiGraph) -> dict[str, float]:
    """``rank(t) = mean cost of t + max rank of its successors`` (0 for none)."""
    rank: dict[str, float] = {}
    for n in reversed(list(nx.topological_sort(g))):
        costs = g.nodes[n]["costs"]
        mean = sum(costs.values()) / len(costs)
        rank[n] = mean + max((rank[s] for s in g.successors(n)), default=0.0)
    return rank


def critical_path_bound(g: nx.DiGraph) -> float:
    """Lower bound on any makespan: the longest path with each task at its cheapest unit."""
    _check_graph(g)
    longest: dict[str, float] = {}
    for n in nx.topological_sort(g):
        c = min(g.nodes[n]["costs"].values())
        longest[n] = c + max((longest[p] for p in g.predecessors(n)), default=0.0)
    return max(longest.values(), default=0.0)


def serial_bound(g: nx.DiGraph) -> float:
    """The sum of each task's cheapest cost: running everything one after another."""
    return sum(min(d["costs"].values()) for _, d in g.nodes(data=True))


def _earliest_slot(busy: list[tuple[float, float]], ready: float, dur: float) -> float:
    """Earliest start >= ready where [start, start+dur) fits between the sorted busy intervals."""
    start = ready
    for b0, b1 in busy:
        if start + dur <= b0 + 1e-15:
            return start
        start = max(start, b1)
    return start


def list_schedule(g: nx.DiGraph, units: list[str] | None = None, title: str = "", info: dict | None = None) -> Schedule:
    """Earliest-finish-time list scheduling of ``g`` (see the module docstring).

    ``units`` fixes the row order of the output (defaults to units in order of first use
    in the graph); every unit named in a task's costs must be in it.
    """
    _check_graph(g)
    all_units: list[str] = []
    for _, d in g.nodes(data=True):
        for u in d["costs"]:
            if u not in all_units:
                all_units.append(u)
    if units is None:
        units = all_units
    else:
        missing = [u for u in all_units if u not in units]
        if missing:
            raise BlueLowerError(f"tasks name units {missing} that are not in {units}")
    rank = upward_ranks(g)
    topo_index = {n: i for i, n in enumerate(nx.topological_sort(g))}
    busy: dict[str, list[tuple[float, float]]] = {u: [] for u in units}
    done: dict[str, ScheduledTask] = {}
    waiting = {n: g.in_degree(n) for n in g.nodes}
    ready = [n for n, k in waiting.items() if k == 0]
    while ready:
        ready.sort(key=lambda n: (-rank[n], topo_index[n]))
        n = ready.pop(0)
        data = g.nodes[n]
        dep_ready = max((done[p].end_s for p in g.predecessors(n)), default=0.0)
        best = None
        for u in units:  # iterate in unit order so ties go to the first unit
            if u not in data["costs"]:
                continue
            dur = data["costs"][u]
            start = _earliest_slot(busy[u], dep_ready, dur)
            key = (start + dur, dur)
            if best is None or key < best[0]:
                best = (key, u, start, dur)
        _, u, start, dur = best
        busy[u].append((start, start + dur))
        busy[u].sort()
        done[n] = ScheduledTask(n, data["phase"], u, start, start + dur, dict(data.get("meta", {})))
        for s in g.successors(n):
            waiting[s] -= 1
            if waiting[s] == 0:
                ready.append(s)
    tasks = sorted(done.values(), key=lambda t: (t.start_s, units.index(t.unit)))
    return Schedule(tasks=tasks, units=list(units), title=title, info=dict(info or {}))


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def to_chrome_trace(schedule: Schedule) -> dict:
    """Chrome trace event format (opens in Perfetto / chrome://tracing).

    One process (the schedule), one thread per unit (named by ``thread_name`` metadata),
    one complete event (``ph: "X"``) per task with ``ts``/``dur`` in microseconds.
    """
    pid = 1
    tid = {u: i + 1 for i, u in enumerate(schedule.units)}
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                           "args": {"name": schedule.title or "bluelower schedule"}}]
    for u, t in tid.items():
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": t, "args": {"name": u}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": t, "args": {"sort_index": t}})
    for task in schedule.tasks:
        events.append({
            "name": task.name, "cat": task.phase, "ph": "X", "pid": pid, "tid": tid[task.unit],
            "ts": task.start_s * 1e6, "dur": task.duration_s * 1e6,
            "args": {"phase": task.phase, "unit": task.unit, **{k: v for k, v in task.meta.items()
                                                                  if isinstance(v, (int, float, str, bool))}},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"makespan_s": schedule.makespan_s, "title": schedule.title}}


PHASE_COLORS = {"image_encode": "#4C72B0", "projector": "#8172B2", "prefill": "#DD8452",
                "decode": "#55A868"}
_FALLBACK = ["#C44E52", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def plot_gantt(schedule: Schedule, path_png: str, title: str | None = None) -> str:
    """Gantt chart of ``schedule``: one row per unit, bars colored by phase. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    phases = list(dict.fromkeys(t.phase for t in schedule.tasks))
    colors = {}
    for i, p in enumerate(phases):
        colors[p] = PHASE_COLORS.get(p, _FALLBACK[i % len(_FALLBACK)])
    rows = list(schedule.units)
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.6 * len(rows)), dpi=110)
    for i, u in enumerate(rows):
        bars = [(t.start_s, t.duration_s) for t in schedule.tasks if t.unit == u]
        cols = [colors[t.phase] for t in schedule.tasks if t.unit == u]
        if bars:
            ax.broken_barh(bars, (i - 0.4, 0.8), facecolors=cols, edgecolors="white", linewidth=0.3)
        for t in schedule.tasks:  # label bars wide enough to hold their name
            if t.unit == u and t.duration_s >= 0.045 * schedule.makespan_s:
                ax.text(t.start_s + t.duration_s / 2, i, t.name, ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_xlim(0, max(schedule.makespan_s, 1e-9) * 1.01)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or schedule.title or "schedule")
    ax.legend(handles=[Patch(color=colors[p], label=p) for p in phases], loc="upper center",
              bbox_to_anchor=(0.5, -0.25 if len(rows) < 4 else -0.15), ncol=max(1, len(phases)), frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
    fig.savefig(path_png)
    plt.close(fig)
    return path_png


def summarize(schedule: Schedule) -> dict:
    """Headline numbers: image encode seconds, prefill seconds, decode tokens/s, makespan."""
    ph = schedule.phase_seconds()
    n_dec = sum(1 for t in schedule.tasks if t.phase == "decode")
    dec_s = ph.get("decode", 0.0)
    units_used = {}
    for t in schedule.tasks:
        units_used.setdefault(t.phase, set()).add(t.unit)
    return {
        "image_encode_s": ph.get("image_encode", 0.0),
        "prefill_s": ph.get("prefill", 0.0),
        "decode_s": dec_s,
        "decode_tokens_per_s": (n_dec / dec_s) if dec_s > 0 else None,
        "makespan_s": schedule.makespan_s,
        "units_per_phase": {k: sorted(v) for k, v in units_used.items()},
    }
