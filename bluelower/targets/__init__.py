"""SoC targets as data (TOML), a roofline cost model, and a list scheduler.

* :mod:`.soc` -- ``load_soc``, ``list_socs``, the :class:`SoC` dataclasses.
* :mod:`.cost_model` -- roofline cost of a piece of work on a unit.
* :mod:`.scheduler` -- earliest-finish-time list scheduling, Chrome trace, Gantt chart.
* :mod:`.predict` -- the analytic BlueLM-V task graph and its predicted timeline.
"""

from .soc import Apu, CpuCluster, Memory, SoC, list_socs, load_soc

__all__ = ["SoC", "CpuCluster", "Apu", "Memory", "load_soc", "list_socs"]
# The cost model, scheduler and predictor are imported from their modules
# (``from bluelower.reports.predict import predict``) so that ``import bluelower.targets``
# stays light (no networkx / matplotlib / model config).
