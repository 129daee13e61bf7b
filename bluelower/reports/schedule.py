"""``bluelower inspect schedule``: the predicted schedule a build stores in its manifest.

ScheduleOperators writes ``manifest["schedule"]`` (``Schedule.to_dict()`` plus a
``summary``) and PartitionForAPU ``manifest["apu_partitions"]``; this module reads them
back and renders a table, a Chrome trace (Perfetto) or a Gantt chart (PNG).
"""

from __future__ import annotations

import json
import os

from ..errors import BlueLowerError
from ..lowering.artifacts.bundle import read_manifest
from ..targets.scheduler import Schedule, plot_gantt, to_chrome_trace

def load_schedule(build_dir: str) -> tuple[Schedule, dict]:
    """The build's schedule and its manifest (a malformed ``schedule`` is one line)."""
    manifest = read_manifest(build_dir)
    if "schedule" not in manifest:
        raise BlueLowerError(f"{build_dir} has no predicted schedule (built without ScheduleOperators); recompile it")
    try:
        return Schedule.from_dict(manifest["schedule"]), manifest
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise BlueLowerError(f"{build_dir}/manifest.json: schedule is malformed ({type(exc).__name__}: {exc})") from None


def inspect_schedule(build_dir: str) -> dict:
    """JSON-friendly report: makespan, seconds per phase, busy seconds per unit, partitions, tasks."""
    sched, manifest = load_schedule(build_dir)
    try:
        return _report(build_dir, sched, manifest)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise BlueLowerError(f"{build_dir}/manifest.json: schedule or apu_partitions is malformed "
                             f"({type(exc).__name__}: {exc})") from None


def _report(build_dir: str, sched: Schedule, manifest: dict) -> dict:
    busy = {u: 0.0 for u in sched.units}
    for t in sched.tasks:
        busy[t.unit] = busy.get(t.unit, 0.0) + t.duration_s
    parts = manifest.get("apu_partitions", [])
    per_entry: dict[str, int] = {}
    for p in parts:
        per_entry[p["entry"]] = per_entry.get(p["entry"], 0) + 1
    return {
        "build": os.path.abspath(build_dir),
        "soc": manifest.get("soc"),
        "quant": manifest.get("quant"),
        "makespan_s": sched.makespan_s,
        "phase_seconds": sched.phase_seconds(),
        "phases": sched.phases(),
        "units": sched.units,
        "unit_busy_s": busy,
        "apu_partitions": {"total": len(parts), "per_function": per_entry,
                           "ops": sum(int(p.get("ops", 0)) for p in parts)},
        "info": sched.info,
        "tasks": [{"name": t.name, "phase": t.phase, "unit": t.unit, "start_s": t.start_s, "end_s": t.end_s,
                   "duration_s": t.duration_s} for t in sched.tasks],
    }


def _ms(s: float) -> str:
    return f"{s * 1e3:10.3f}"


def format_table(info: dict, max_tasks: int = 40) -> str:
    lines = [f"build:     {info['build']}", f"soc:       {info['soc']} ({info['quant']})",
             f"makespan:  {info['makespan_s'] * 1e3:.3f} ms",
             f"APU partitions: {info['apu_partitions']['total']} ({info['apu_partitions']['ops']} ops)"
             + "".join(f"\n  {k}: {v}" for k, v in info["apu_partitions"]["per_function"].items()),
             "", f"{'phase':<14}{'start ms':>10}{'end ms':>10}{'wall ms':>10}{'tasks':>7}"]
    for name, p in info["phases"].items():
        lines.append(f"{name:<14}{_ms(p['start_s'])}{_ms(p['end_s'])}{_ms(p['seconds'])}{p['tasks']:>7}")
    lines += ["", f"{'unit':<14}{'busy ms':>10}{'util':>8}"]
    for u in info["units"]:
        b = info["unit_busy_s"].get(u, 0.0)
        util = b / info["makespan_s"] if info["makespan_s"] else 0.0
        lines.append(f"{u:<14}{_ms(b)}{util:>8.0%}")
    lines += ["", f"{'task':<52}{'unit':<10}{'start ms':>10}{'dur ms':>10}"]
    tasks = info["tasks"]
    for t in tasks[:max_tasks]:
        lines.append(f"{t['name'][:51]:<52}{t['unit']:<10}{_ms(t['start_s'])}{_ms(t['duration_s'])}")
    if len(tasks) > max_tasks:
        lines.append(f"... {len(tasks) - max_tasks} more tasks (--json lists all)")
    return "\n".join(lines)


def write_trace(build_dir: str, path: str) -> str:
    """The schedule as a Chrome trace (open in https://ui.perfetto.dev)."""
    sched, _ = load_schedule(build_dir)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_chrome_trace(sched), fh)
    return path


def write_plot(build_dir: str, path: str) -> str:
    """The schedule as a Gantt chart (PNG): one row per unit, colored by phase."""
    sched, manifest = load_schedule(build_dir)
    return plot_gantt(sched, path, title=f"{manifest.get('model', {}).get('name', 'model')} on {manifest.get('soc')}"
                      f" ({manifest.get('quant')}): predicted operator schedule")
