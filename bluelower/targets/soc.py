"""SoC descriptions as TOML data files, validated against a schema defined in code.

A SoC file describes the compute units the scheduler can place work on (CPU clusters and
an optional NPU, called APU on MediaTek parts) and the memory system they share. Shipped
files live next to this module (``dimensity9300.toml``, ``host.toml``); ``load_soc(PATH)``
reads a user's own file. See ``docs/add-a-soc.md`` for a walk-through.

Conventions enforced by the loader
----------------------------------
* **Physical quantities are strings with a unit**: ``bandwidth = "76.8 GB/s"``,
  ``clock = "3.25 GHz"``, ``capacity = "16 GB"``, ``per_call_overhead = "1.5 ms"``,
  ``peak.int8 = "8 TOPS"``. A bare number, or a unit of the wrong dimension (``"76.8 GHz"``
  for a bandwidth), is an error. Decimal prefixes are powers of 1000 (``GB`` = 1e9 bytes);
  binary ones (``GiB``) are powers of 1024. Values are stored in SI base units (bytes,
  bytes/s, Hz, s, ops/s).
* **Dimensionless numbers are plain TOML numbers** (``cores = 4``, ``efficiency = 0.25``,
  ``ops_per_cycle.fp32 = 32``).
* **Assumed numbers are declared**: the top-level ``assumed`` list names every key whose
  value is not a public fact (dotted paths; an entry of ``[[cpu_clusters]]`` is addressed
  by its ``name``: ``"cpu_clusters.prime.efficiency"``). The loader checks that each entry
  names a key present in the file. Give the reason in a TOML comment next to the value.
* Unknown keys, missing required keys, wrong types and wrong units raise
  :class:`~bluelower.errors.BlueLowerError` with the file path and the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..errors import BlueLowerError

SOC_DIR = os.path.dirname(os.path.abspath(__file__))

#: Data types a unit may compute in (names used in ``ops_per_cycle``, ``apu.peak``, ``apu.ops``).
DTYPES = ("int4", "int8", "int16", "int32", "fp16", "bf16", "fp32")

#: Operator kinds an APU may declare support for in ``[apu.ops]``.
OP_KINDS = (
    "matmul", "conv2d", "add", "subtract", "multiply", "divide", "softmax", "layer_norm",
    "rms_norm", "gelu", "silu", "attention", "rope", "embedding", "concat", "reshape",
    "transpose", "gather", "mean", "exp", "rsqrt", "tanh", "slice", "pad",
)

#: Float dtypes an APU may compute float tensors in, in order of preference: an operator
#: whose kind lists several runs in the first (the narrowest datapath the NPU offers).
FLOAT_DTYPES = ("fp16", "bf16", "fp32")

#: Values of ``apu.accumulate``: the dtype float matmul/conv2d sums accumulate in.
ACCUMULATE_DTYPES = ("fp32", "fp16")

#: Model parts ``apu.activations`` sets a dtype for (the roles of the weights an entry reads,
#: bluelower.lowering.quant.modes DECODER_ROLES / VISION_ROLES), and the dtypes it may set.
ACTIVATION_PARTS = ("decoder", "vision")
ACTIVATION_DTYPES = ("int16", "int8") + FLOAT_DTYPES

# Unit tables: dimension -> {unit: factor to SI base unit}.
UNITS: dict[str, dict[str, float]] = {
    "bandwidth": {"B/s": 1.0, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "TB/s": 1e12,
                  "KiB/s": 2.0**10, "MiB/s": 2.0**20, "GiB/s": 2.0**30},
    "frequency": {"Hz": 1.0, "kHz": 1e3, "MHz": 1e6, "GHz": 1e9},
    "size": {"B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 2.0**10, "MiB": 2.0**20, "GiB": 2.0**30},
    "time": {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9},
    "throughput": {"OPS": 1.0, "GOPS": 1e9, "TOPS": 1e12, "FLOPS": 1.0, "GFLOPS": 1e9, "TFLOPS": 1e12},
}
_EXAMPLE = {"bandwidth": "76.8 GB/s", "frequency": "3.25 GHz", "size": "16 GB", "time": "1.5 ms",
            "throughput": "4 TOPS"}
_QTY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z/]+)\s*$")


def parse_quantity(value: Any, dim: str, where: str) -> float:
    """Parse ``"76.8 GB/s"`` into SI base units; ``where`` prefixes any error message."""
    units = UNITS[dim]
    hint = f'give it as a string with a {dim} unit, e.g. "{_EXAMPLE[dim]}" (units: {", ".join(units)})'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise BlueLowerError(f"{where}: wrong unit: {json.dumps(value)} has no unit; {hint}")
    if not isinstance(value, str):
        raise BlueLowerError(f"{where}: wrong type: expected a string with a unit, got {json.dumps(value, default=str)}; {hint}")
    m = _QTY_RE.match(value)
    if not m:
        raise BlueLowerError(f"{where}: cannot parse {json.dumps(value)} as a quantity; {hint}")
    number, unit = float(m.group(1)), m.group(2)
    if unit not in units:
        raise BlueLowerError(f"{where}: wrong unit '{unit}' in {json.dumps(value)}; {hint}")
    return number * units[unit]


def format_quantity(value: float, dim: str) -> str:
    """Inverse of :func:`parse_quantity` with a readable decimal prefix."""
    table = {
        "bandwidth": [("TB/s", 1e12), ("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3), ("B/s", 1)],
        "frequency": [("GHz", 1e9), ("MHz", 1e6), ("kHz", 1e3), ("Hz", 1)],
        "size": [("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)],
        "time": [("s", 1), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)],
        "throughput": [("TOPS", 1e12), ("GOPS", 1e9), ("OPS", 1)],
    }[dim]
    for unit, factor in table:
        if abs(value) >= factor or factor == table[-1][1]:
            return f"{value / factor:.4g} {unit}"
    return f"{value} {table[-1][0]}"  # pragma: no cover


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One schema entry.

    ``kind`` is one of ``str``, ``int``, ``number``, ``bool``, ``list[str]``,
    ``qty:<dimension>``, ``table`` (with ``sub``), ``tables`` (an array of tables, with
    ``sub``), ``map:<kind>`` (a table with free keys, each value of ``<kind>``).
    """

    kind: str
    required: bool = False
    doc: str = ""
    default: Any = None
    sub: dict | None = None


CLUSTER_SCHEMA: dict[str, Key] = {
    "name": Key("str", True, "unique name of the cluster, e.g. 'prime'"),
    "cores": Key("int", True, "number of cores in the cluster"),
    "clock": Key("qty:frequency", True, "maximum core clock, e.g. \"3.25 GHz\""),
    "mcpu": Key("str", False, "LLVM CPU name (e.g. 'cortex-x4'); omit for a generic target. 'native' is rejected"),
    "features": Key("list[str]", False, "ISA features, LLVM spelling without '+', e.g. ['neon', 'sve2', 'dotprod']", ()),
    "ops_per_cycle": Key("map:number", True, "peak ops per cycle per core, per dtype (an FMA counts 2)"),
    "efficiency": Key("number", False, "fraction of peak compute reached by compiled kernels (0 < e <= 1)", 1.0),
    "bandwidth": Key("qty:bandwidth", False, "DRAM bandwidth this cluster alone can draw (defaults to memory.bandwidth)"),
    "per_call_overhead": Key("qty:time", False, "fixed cost per kernel-graph invocation (thread-pool wake-up)", "0 s"),
}

APU_SCHEMA: dict[str, Key] = {
    "name": Key("str", True, "marketing name, e.g. 'APU 790'"),
    "ops": Key("map:list[str]", True, "supported operator kinds -> dtypes each supports"),
    "peak": Key("map:qty:throughput", True, "sustained throughput per dtype, e.g. int8 = \"8 TOPS\""),
    "per_call_overhead": Key("qty:time", True, "fixed cost per compiled-graph invocation"),
    "bandwidth": Key("qty:bandwidth", True, "DRAM bandwidth the APU reaches when streaming weights"),
    "max_ops_per_graph": Key("int", True, "largest number of operators one compiled graph may hold"),
    "image_batch": Key("int", False, "preferred ViT patch batch", 4),
    "prefill_chunk": Key("int", False, "preferred prefill chunk (tokens per call)", 128),
    "max_patches": Key("int", False, "default maximum number of image patches (local + global)", 9),
    "accumulate": Key("str", False, "dtype float matmul/conv2d sums accumulate in: 'fp32' or 'fp16'", "fp32"),
    "activations": Key("map:str", False, "activation dtype per model part ('decoder', 'vision'): 'int16', 'int8' "
                       "or a float dtype (default: each operator's float dtype)"),
}

MEMORY_SCHEMA: dict[str, Key] = {
    "type": Key("str", False, "DRAM type, e.g. 'LPDDR5T-9600'", ""),
    "capacity": Key("qty:size", True, "DRAM capacity, e.g. \"16 GB\""),
    "bandwidth": Key("qty:bandwidth", True, "peak DRAM bandwidth, e.g. \"76.8 GB/s\""),
    "caches": Key("map:qty:size", False, "named caches -> size, e.g. L3 = \"8 MB\""),
}

SOC_SCHEMA: dict[str, Key] = {
    "name": Key("str", True, "SoC name (used by `--target NAME`)"),
    "description": Key("str", False, "one line", ""),
    "triple": Key("str", True, "LLVM target triple, e.g. 'aarch64-linux-gnu'"),
    "is_host": Key("bool", False, "true for the build machine itself (TVM target without mtriple)", False),
    "assumed": Key("list[str]", False, "dotted keys whose values are assumptions, not public facts", ()),
    "cpu_clusters": Key("tables", True, "one [[cpu_clusters]] table per cluster", sub=CLUSTER_SCHEMA),
    "apu": Key("table", False, "the NPU; omit the table when there is none", sub=APU_SCHEMA),
    "memory": Key("table", True, "the shared DRAM", sub=MEMORY_SCHEMA),
}


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(kind)  # pragma: no cover


_KIND_NAMES = {"str": "a string", "int": "an integer", "number": "a number", "bool": "true or false",
               "list[str]": "a list of strings"}


def _check_value(value: Any, kind: str, where: str) -> Any:
    if kind.startswith("qty:"):
        return parse_quantity(value, kind[4:], where)
    if not _type_ok(value, kind):
        raise BlueLowerError(f"{where}: wrong type: expected {_KIND_NAMES[kind]}, got {json.dumps(value, default=str)}")
    return float(value) if kind == "number" else (list(value) if kind == "list[str]" else value)


def _check_table(raw: Any, schema: dict[str, Key], src: str, prefix: str) -> dict:
    """Validate one TOML table; returns a dict with defaults filled and quantities parsed."""
    where_tbl = f"{src}: '{prefix.rstrip('.')}'" if prefix else src
    if not isinstance(raw, dict):
        raise BlueLowerError(f"{where_tbl}: wrong type: expected a table")
    for key in raw:
        if key not in schema:
            raise BlueLowerError(
                f"{src}: unknown key '{prefix}{key}' (valid keys here: {', '.join(schema)})"
            )
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        where = f"{src}: '{prefix}{key}'"
        if key not in raw:
            if spec.required:
                raise BlueLowerError(f"{src}: missing required key '{prefix}{key}' ({spec.doc})")
            if spec.kind.startswith("qty:") and spec.default is not None:
                out[key] = parse_quantity(spec.default, spec.kind[4:], where)
            elif spec.kind.startswith("map:"):
                out[key] = {}
            else:
                out[key] = list(spec.default) if isinstance(spec.default, tuple) else spec.default
            continue
        value = raw[key]
        if spec.kind == "table":
            out[key] = _check_table(value, spec.sub, src, f"{prefix}{key}.")
        elif spec.kind == "tables":
            if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
                raise BlueLowerError(f"{where}: wrong type: expected one or more [[{prefix}{key}]] tables")
            items = []
            for i, item in enumerate(value):
                label = item.get("name") if isinstance(item.get("name"), str) else str(i)
                items.append(_check_table(item, spec.sub, src, f"{prefix}{key}.{label}."))
            out[key] = items
        elif spec.kind.startswith("map:"):
            inner = spec.kind[4:]
            if not isinstance(value, dict):
                raise BlueLowerError(f"{where}: wrong type: expected a table")
            out[key] = {k: _check_value(v, inner, f"{src}: '{prefix}{key}.{k}'") for k, v in value.items()}
        else:
            out[key] = _check_value(value, spec.kind, where)
    return out


def _key_exists(raw: dict, dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list):
            match = [t for t in node if isinstance(t, dict) and t.get("name") == part]
            if not match:
                return False
            node = match[0]
        else:
            return False
    return True


# --------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuCluster:
    """A group of identical CPU cores; one scheduling unit."""

    name: str
    cores: int
    clock_hz: float
    ops_per_cycle: dict[str, float]
    mcpu: str | None = None
    features: tuple[str, ...] = ()
    efficiency: float = 1.0
    bandwidth_bps: float | None = None
    per_call_overhead_s: float = 0.0
    triple: str | None = None  # None: the host (no mtriple in the TVM target)

    def peak_ops(self, dtype: str) -> float | None:
        """Attainable ops/s in ``dtype`` (cores x clock x ops/cycle x efficiency), None if absent."""
        per = self.ops_per_cycle.get(dtype)
        return None if per is None else self.cores * self.clock_hz * per * self.efficiency

    def tvm_target_dict(self, num_cores: int | None = None, features: tuple[str, ...] | None = None) -> dict:
        """TVM 0.27 target dict for this cluster (strings with spaces are rejected by TVM)."""
        d: dict[str, Any] = {"kind": "llvm"}
        if self.triple:
            d["mtriple"] = self.triple
        if self.mcpu:
            d["mcpu"] = self.mcpu
        feats = self.features if features is None else features
        if feats:
            d["mattr"] = ["+" + f for f in feats]
        d["num-cores"] = int(num_cores if num_cores is not None else self.cores)
        return d

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.tvm_target_dict())


@dataclass(frozen=True)
class Apu:
    """The NPU: operator coverage, throughput, overheads, graph-size limit."""

    name: str
    ops: dict[str, tuple[str, ...]]
    peak_ops_per_s: dict[str, float]
    per_call_overhead_s: float
    bandwidth_bps: float
    max_ops_per_graph: int
    image_batch: int = 4
    prefill_chunk: int = 128
    max_patches: int = 9
    accumulate: str = "fp32"
    # model part -> activation dtype (ACTIVATION_PARTS -> ACTIVATION_DTYPES); a part not
    # named computes in each operator's float dtype
    activations: dict = field(default_factory=dict)

    def supports(self, kind: str, dtype: str) -> bool:
        return dtype in self.ops.get(kind, ())

    def float_dtype(self, kinds) -> str | None:
        """The float dtype the APU computes ``kinds`` in: the first of :data:`FLOAT_DTYPES`
        every kind lists (fp16 before bf16 before fp32), None when they share none."""
        for dt in FLOAT_DTYPES:
            if all(self.supports(k, dt) for k in kinds):
                return dt
        return None

    def peak_ops(self, dtype: str) -> float | None:
        return self.peak_ops_per_s.get(dtype)


@dataclass(frozen=True)
class Memory:
    capacity_bytes: float
    bandwidth_bps: float
    type: str = ""
    caches: dict[str, float] = field(default_factory=dict)


#: Fallbacks for SoCs without an APU (a CPU encodes one patch at a time).
CPU_ONLY_DEFAULTS = {"image_batch": 1, "prefill_chunk": 128, "max_patches": 9}


@dataclass(frozen=True)
class SoC:
    """A validated SoC description. Build with :func:`load_soc`."""

    name: str
    triple: str
    cpu_clusters: tuple[CpuCluster, ...]
    memory: Memory
    apu: Apu | None = None
    is_host: bool = False
    description: str = ""
    assumed: tuple[str, ...] = ()
    source: str = ""

    # -- defaults the compiler uses when the user does not give them ------------------
    @property
    def image_batch(self) -> int:
        return self.apu.image_batch if self.apu else CPU_ONLY_DEFAULTS["image_batch"]

    @property
    def prefill_chunk(self) -> int:
        return self.apu.prefill_chunk if self.apu else CPU_ONLY_DEFAULTS["prefill_chunk"]

    @property
    def max_patches(self) -> int:
        return self.apu.max_patches if self.apu else CPU_ONLY_DEFAULTS["max_patches"]

    @property
    def total_cores(self) -> int:
        return sum(c.cores for c in self.cpu_clusters)

    def cluster(self, name: str) -> CpuCluster:
        for c in self.cpu_clusters:
            if c.name == name:
                return c
        raise BlueLowerError(f"SoC '{self.name}' has no CPU cluster '{name}' (has: {', '.join(c.name for c in self.cpu_clusters)})")

    def tvm_target_dict(self) -> dict:
        """Compile target for the CPU clusters as a dict.

        One binary runs on every cluster, so the target takes the first cluster's
        ``mcpu`` (the tuning model), only the ISA features *all* clusters share, and
        ``num-cores`` = the total core count (TVM's thread pool spans all clusters).
        """
        first = self.cpu_clusters[0]
        common = tuple(f for f in first.features if all(f in c.features for c in self.cpu_clusters))
        return first.tvm_target_dict(num_cores=self.total_cores, features=common)

    def tvm_target(self):
        """The compile target of the CPU clusters as a ``tvm.target.Target``; every cluster's
        ``mcpu`` and ``features`` checked against LLVM (which otherwise prints a warning and
        builds for a generic CPU)."""
        import tvm

        self.check_llvm()
        try:
            return tvm.target.Target(self.tvm_target_dict())
        except Exception as exc:  # TVM raises its own error types
            raise BlueLowerError(f"{self.source or self.name}: TVM rejects the target {self.tvm_target_dict()}: {exc}") from None

    def check_llvm(self) -> None:
        """Each cluster's ``mcpu`` is a CPU LLVM knows for the triple and each of its
        ``features`` one LLVM enables for it; one line naming the key otherwise."""
        import tvm
        from tvm.target import codegen

        from ..validate import captured_stderr

        triple = codegen.llvm_get_system_triple() if self.is_host else self.triple
        for c in self.cpu_clusters:
            where = f"{self.source or self.name}: 'cpu_clusters.{c.name}."
            if c.mcpu and not codegen.llvm_is_valid_cpu(c.mcpu, triple):
                raise BlueLowerError(f"{where}mcpu': LLVM knows no CPU '{c.mcpu}' for {triple} "
                                     "(omit mcpu for a generic target)")
            if c.features:
                with captured_stderr():  # LLVM warns about each feature it ignores
                    have = codegen.llvm_get_cpu_features(tvm.target.Target(c.tvm_target_dict()))
                unknown = [f for f in c.features if f not in have]
                if unknown:
                    raise BlueLowerError(f"{where}features': LLVM does not recognize {', '.join(unknown)} for "
                                         f"{c.mcpu or 'a generic CPU'} on {triple}")

    def to_dict(self) -> dict:
        """JSON-friendly view (SI units; keys end in their unit)."""
        d: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "triple": self.triple,
            "is_host": self.is_host,
            "tvm_target": self.tvm_target_dict(),
            "defaults": {"image_batch": self.image_batch, "prefill_chunk": self.prefill_chunk,
                         "max_patches": self.max_patches},
            "cpu_clusters": [
                {"name": c.name, "cores": c.cores, "clock_hz": c.clock_hz, "mcpu": c.mcpu,
                 "features": list(c.features), "ops_per_cycle": dict(c.ops_per_cycle),
                 "efficiency": c.efficiency, "bandwidth_bps": c.bandwidth_bps,
                 "per_call_overhead_s": c.per_call_overhead_s,
                 "peak_ops_per_s": {k: c.peak_ops(k) for k in c.ops_per_cycle},
                 "tvm_target": c.tvm_target_dict()}
                for c in self.cpu_clusters
            ],
            "apu": None,
            "memory": {"type": self.memory.type, "capacity_bytes": self.memory.capacity_bytes,
                       "bandwidth_bps": self.memory.bandwidth_bps, "caches_bytes": dict(self.memory.caches)},
            "assumed": list(self.assumed),
        }
        if self.apu:
            a = self.apu
            d["apu"] = {"name": a.name, "ops": {k: list(v) for k, v in a.ops.items()},
                        "peak_ops_per_s": dict(a.peak_ops_per_s), "per_call_overhead_s": a.per_call_overhead_s,
                        "bandwidth_bps": a.bandwidth_bps, "max_ops_per_graph": a.max_ops_per_graph,
                        "image_batch": a.image_batch, "prefill_chunk": a.prefill_chunk,
                        "max_patches": a.max_patches, "accumulate": a.accumulate,
                        "activations": dict(a.activations)}
        return d

    def describe(self) -> str:
        """Human-readable multi-line summary (``bluelower targets show``)."""
        lines = [f"{self.name}: {self.description}".rstrip(": "), f"  source: {self.source}",
                 f"  triple: {self.triple}{' (host)' if self.is_host else ''}",
                 f"  tvm target: {json.dumps(self.tvm_target_dict())}"]
        for c in self.cpu_clusters:
            peaks = ", ".join(f"{k} {format_quantity(c.peak_ops(k), 'throughput')}" for k in c.ops_per_cycle)
            lines.append(f"  cpu cluster {c.name}: {c.cores} x {c.mcpu or 'generic'} @ "
                         f"{format_quantity(c.clock_hz, 'frequency')}; attainable {peaks}")
        if self.apu:
            a = self.apu
            peaks = ", ".join(f"{k} {format_quantity(v, 'throughput')}" for k, v in a.peak_ops_per_s.items())
            lines.append(f"  apu {a.name}: {peaks}; {format_quantity(a.bandwidth_bps, 'bandwidth')}; "
                         f"{format_quantity(a.per_call_overhead_s, 'time')}/call; <= {a.max_ops_per_graph} ops/graph")
            lines.append(f"    ops: {', '.join(sorted(a.ops))}; float sums accumulate in {a.accumulate}")
            if a.activations:
                lines.append("    activations: " + ", ".join(f"{k} {v}" for k, v in sorted(a.activations.items())))
        else:
            lines.append("  apu: none")
        m = self.memory
        caches = ", ".join(f"{k} {format_quantity(v, 'size')}" for k, v in m.caches.items())
        lines.append(f"  memory: {m.type} {format_quantity(m.capacity_bytes, 'size')} @ "
                     f"{format_quantity(m.bandwidth_bps, 'bandwidth')}" + (f"; caches {caches}" if caches else ""))
        lines.append(f"  defaults: image_batch {self.image_batch}, prefill_chunk {self.prefill_chunk}, "
                     f"max_patches {self.max_patches}")
        if self.assumed:
            lines.append(f"  assumed ({len(self.assumed)}): {', '.join(self.assumed)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def soc_from_dict(raw: Any, source: str = "soc") -> SoC:
    """Validate a parsed TOML document into a :class:`SoC`; errors name ``source`` and the key."""
    data = _check_table(raw, SOC_SCHEMA, source, "")

    def fail(key: str, msg: str) -> None:
        raise BlueLowerError(f"{source}: '{key}': {msg}")

    if not data["name"]:
        fail("name", "must be a non-empty string")
    triple = data["triple"]
    if not re.match(r"^[A-Za-z0-9_]+(-[A-Za-z0-9_.]+)+$", triple):
        fail("triple", f"'{triple}' is not an LLVM target triple such as 'aarch64-linux-gnu'")
    is_host = data["is_host"]

    clusters = []
    seen = set()
    for c in data["cpu_clusters"]:
        p = f"cpu_clusters.{c['name']}."
        if c["name"] in seen:
            fail(p + "name", "duplicate cluster name")
        if c["name"] == "apu" or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", c["name"]):
            fail(p + "name", f"'{c['name']}' is reserved or not a plain name (letters, digits, '-', '_', '.')")
        seen.add(c["name"])
        if c["cores"] < 1:
            fail(p + "cores", f"must be >= 1, got {c['cores']}")
        if c["clock"] <= 0:
            fail(p + "clock", "must be positive")
        if c["mcpu"] is not None and c["mcpu"].strip().lower() == "native":
            fail(p + "mcpu", "'native' makes builds depend on the build machine; name the CPU or omit mcpu")
        if c["mcpu"] is not None and (not c["mcpu"] or " " in c["mcpu"]):
            fail(p + "mcpu", f"'{c['mcpu']}' is not an LLVM CPU name")
        for f in c["features"]:
            if not re.match(r"^[a-z0-9][a-z0-9.\-]*$", f):
                fail(p + "features", f"'{f}' is not an LLVM feature name (lower case, no '+', e.g. 'dotprod')")
        if not c["ops_per_cycle"]:
            fail(p + "ops_per_cycle", "give at least one dtype, e.g. fp32 = 16")
        for dt, v in c["ops_per_cycle"].items():
            if dt not in DTYPES:
                fail(p + "ops_per_cycle." + dt, f"unknown dtype (valid: {', '.join(DTYPES)})")
            if v <= 0:
                fail(p + "ops_per_cycle." + dt, "must be positive")
        if not 0 < c["efficiency"] <= 1:
            fail(p + "efficiency", f"must be in (0, 1], got {c['efficiency']}")
        if c["bandwidth"] is not None and c["bandwidth"] <= 0:
            fail(p + "bandwidth", "must be positive")
        if c["per_call_overhead"] < 0:
            fail(p + "per_call_overhead", "must be >= 0")
        clusters.append(CpuCluster(
            name=c["name"], cores=c["cores"], clock_hz=c["clock"], ops_per_cycle=dict(c["ops_per_cycle"]),
            mcpu=c["mcpu"], features=tuple(c["features"]), efficiency=c["efficiency"],
            bandwidth_bps=c["bandwidth"], per_call_overhead_s=c["per_call_overhead"],
            triple=None if is_host else triple))

    m = data["memory"]
    if m["capacity"] <= 0:
        fail("memory.capacity", "must be positive")
    if m["bandwidth"] <= 0:
        fail("memory.bandwidth", "must be positive")
    memory = Memory(capacity_bytes=m["capacity"], bandwidth_bps=m["bandwidth"], type=m["type"], caches=dict(m["caches"]))

    apu = None
    if data["apu"] is not None:
        a = data["apu"]
        if not a["ops"]:
            fail("apu.ops", "list at least one operator kind")
        for kind, dts in a["ops"].items():
            if kind not in OP_KINDS:
                fail(f"apu.ops.{kind}", f"unknown operator kind (valid: {', '.join(OP_KINDS)})")
            if not dts:
                fail(f"apu.ops.{kind}", "list at least one dtype")
            for dt in dts:
                if dt not in DTYPES:
                    fail(f"apu.ops.{kind}", f"unknown dtype '{dt}' (valid: {', '.join(DTYPES)})")
        for dt, v in a["peak"].items():
            if dt not in DTYPES:
                fail(f"apu.peak.{dt}", f"unknown dtype (valid: {', '.join(DTYPES)})")
            if v <= 0:
                fail(f"apu.peak.{dt}", "must be positive")
        used = sorted({dt for dts in a["ops"].values() for dt in dts})
        missing = [dt for dt in used if dt not in a["peak"] and dt != "int4"]
        if missing:
            fail("apu.peak", f"no peak for dtype(s) {', '.join(missing)} used in apu.ops")
        for key in ("max_ops_per_graph", "image_batch", "prefill_chunk", "max_patches"):
            if a[key] < 1:
                fail(f"apu.{key}", f"must be >= 1, got {a[key]}")
        if a["bandwidth"] <= 0:
            fail("apu.bandwidth", "must be positive")
        if a["accumulate"] not in ACCUMULATE_DTYPES:
            fail("apu.accumulate", f"must be one of {', '.join(ACCUMULATE_DTYPES)}, got '{a['accumulate']}'")
        if a["per_call_overhead"] < 0:
            fail("apu.per_call_overhead", "must be >= 0")
        for part, dt in a["activations"].items():
            if part not in ACTIVATION_PARTS:
                fail(f"apu.activations.{part}", f"unknown model part (valid: {', '.join(ACTIVATION_PARTS)})")
            if dt not in ACTIVATION_DTYPES:
                fail(f"apu.activations.{part}", f"must be one of {', '.join(ACTIVATION_DTYPES)}, got '{dt}'")
            if not any(dt in dts for dts in a["ops"].values()):
                fail(f"apu.activations.{part}", f"'{dt}' is listed for no operator kind in apu.ops")
        apu = Apu(name=a["name"], ops={k: tuple(v) for k, v in a["ops"].items()}, peak_ops_per_s=dict(a["peak"]),
                  per_call_overhead_s=a["per_call_overhead"], bandwidth_bps=a["bandwidth"],
                  max_ops_per_graph=a["max_ops_per_graph"], image_batch=a["image_batch"],
                  prefill_chunk=a["prefill_chunk"], max_patches=a["max_patches"], accumulate=a["accumulate"],
                  activations=dict(a["activations"]))

    for key in data["assumed"]:
        if key == "assumed" or not _key_exists(raw, key):
            fail("assumed", f"'{key}' does not name a key in this file (use dotted paths; "
                            f"[[cpu_clusters]] entries by name, e.g. 'cpu_clusters.prime.efficiency')")

    return SoC(name=data["name"], triple=triple, cpu_clusters=tuple(clusters), memory=memory, apu=apu,
               is_host=is_host, description=data["description"], assumed=tuple(data["assumed"]), source=source)


def with_host_cpu(soc: SoC) -> SoC:
    """``soc``'s APU (its partitions, precision rules and defaults) on the build machine's
    CPU (``host.toml``), so a build for ``soc`` runs here, APU numerics emulated
    (``benchmarks/apu_numerics.py``; docs/apu-partitions.md, "Numerics")."""

    host = load_soc("host")
    if soc.is_host:
        return soc
    return dataclasses.replace(host, name=f"{soc.name}@host", apu=soc.apu,
                               description=f"{soc.name}'s APU with the build machine's CPU",
                               source=soc.source, assumed=host.assumed)


NATIVE = "native"
"""The SoC name of the build machine with its own CPU (see :func:`native_soc`)."""


def list_socs() -> list[str]:
    """Names of the shipped SoC files, and ``native``."""
    return sorted([f[:-5] for f in os.listdir(SOC_DIR) if f.endswith(".toml")] + [NATIVE])


def native_soc() -> SoC:
    """``host`` with this machine's CPU as LLVM names it (``mcpu``): the kernels use its whole
    ISA (AVX-512, VNNI: the ``a8`` modes' integer dot products), so a build runs several times
    faster here, but is neither reproducible on nor always runnable by another machine (the
    shipped ``host`` is generic x86-64 for that). A one-line error when LLVM does not know
    this CPU."""
    import tvm

    host = load_soc("host")
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if not cpu or cpu == "generic":
        raise BlueLowerError("--soc native: LLVM does not know this machine's CPU; use --soc host")
    clusters = tuple(dataclasses.replace(c, mcpu=cpu) for c in host.cpu_clusters)
    return dataclasses.replace(host, name=NATIVE, cpu_clusters=clusters, source=f"{host.source} (mcpu {cpu})",
                               description=f"this machine's CPU ({cpu}, as LLVM names it): its whole ISA; builds "
                                           "are not reproducible on other machines")


def soc_path(name_or_path: str) -> str:
    if name_or_path in list_socs() and name_or_path != NATIVE:
        return os.path.join(SOC_DIR, name_or_path + ".toml")
    if name_or_path.endswith(".toml") or os.path.sep in name_or_path:
        return name_or_path
    raise BlueLowerError(f"unknown SoC '{name_or_path}': use one of {', '.join(list_socs())} or a path to a .toml file")


def load_soc(name_or_path: str) -> SoC:
    """Load a shipped SoC by name (``dimensity9300``, ``host``, ``native``) or a user's ``.toml`` file."""
    if name_or_path == NATIVE:
        return native_soc()
    path = soc_path(name_or_path)
    if not os.path.isfile(path):
        raise BlueLowerError(f"SoC file not found: {path}")
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise BlueLowerError(f"{path}: malformed TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BlueLowerError(f"{path}: cannot read: {exc}") from None
    return soc_from_dict(raw, path)
