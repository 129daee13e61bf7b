"""Pass statistics and IR dumps, collected as a TVM ``PassInstrument``.

A pass reports what it matched or changed by attaching statistics to the module it
returns (:func:`with_stats`: attribute ``bluelower.pass_stats``, ``{pass name: {...}}``);
nothing is written to process state, so a pass run outside the pipeline (a test, a dumped
IR re-run) reports the same. :class:`PipelineInstrument`, installed by
``pipeline.run_pipeline`` in the ``PassContext``, adds the size of the IR after each of the
pipeline's passes (Relax functions, TIR functions, bindings), writes the IR as TVMScript
after each pass (``--dump-ir``) and drives the progress bar.
"""

from __future__ import annotations

import json
import os
import time

import tvm
from tvm import relax

STATS_ATTR = "bluelower.pass_stats"


def pass_stats(mod: tvm.IRModule) -> dict:
    """``{pass name: stats}`` attached to ``mod`` by the passes that ran on it."""
    attrs = mod.attrs
    if attrs is None or STATS_ATTR not in attrs:
        return {}
    return json.loads(str(attrs[STATS_ATTR]))


def with_stats(mod: tvm.IRModule, pass_name: str, **stats) -> tvm.IRModule:
    """``mod`` with ``stats`` merged into ``pass_name``'s entry: numbers add up, dicts merge,
    anything else replaces (a pass may report in several calls)."""
    table = pass_stats(mod)
    mine = table.setdefault(pass_name, {})
    for key, value in stats.items():
        if isinstance(value, (int, float)) and isinstance(mine.get(key), (int, float)):
            mine[key] += value
        elif isinstance(value, dict) and isinstance(mine.get(key), dict):
            mine[key].update(value)
        else:
            mine[key] = value
    return mod.with_attr(STATS_ATTR, json.dumps(table, sort_keys=True))


def count_bindings(mod: tvm.IRModule) -> dict:
    relax_funcs = tir_funcs = bindings = 0
    for _gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax_funcs += 1
            if isinstance(func.body, relax.SeqExpr):
                bindings += sum(len(block.bindings) for block in func.body.blocks)
        elif isinstance(func, tvm.tirx.PrimFunc):
            tir_funcs += 1
    return {"relax_functions": relax_funcs, "tir_functions": tir_funcs, "relax_bindings": bindings}


def dump_ir(mod: tvm.IRModule, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(mod.script(show_meta=False))


@tvm.ir.instrument.pass_instrument
class PipelineInstrument:
    """After each top-level pass named in ``names`` (nested passes are not counted): the IR's
    size (``sizes[name]``), a TVMScript dump ``NNN-<name>.py`` into ``dump_dir``, and
    ``on_pass(name)``. ``index_of[name]`` is the pass's position in the pipeline."""

    def __init__(self, index_of: dict, dump_dir: str | None = None, on_pass=None):
        self.index_of = dict(index_of)
        self.dump_dir = dump_dir
        self.on_pass = on_pass
        self.sizes: dict = {}
        self.seconds: dict = {}  # wall seconds of each top-level pass (progress output, never the manifest)
        self.depth = 0
        self._started = 0.0

    def run_before_pass(self, _mod, _info):
        if self.depth == 0:
            self._started = time.perf_counter()
        self.depth += 1

    def run_after_pass(self, mod, info):
        self.depth -= 1
        name = info.name
        if self.depth != 0 or name not in self.index_of:
            return
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._started
        self.sizes[name] = count_bindings(mod)
        if self.dump_dir:
            dump_ir(mod, os.path.join(self.dump_dir, f"{self.index_of[name]:03d}-{name}.py"))
        if self.on_pass is not None:
            self.on_pass(name)
