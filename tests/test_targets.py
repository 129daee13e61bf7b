"""SoC TOML schema, shipped SoCs, TVM targets and the `bluelower targets` CLI."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import tvm
from click.testing import CliRunner

from bluelower.cli import cli
from bluelower.errors import BlueLowerError
from bluelower.targets.cost_model import Work, cost, units_of
from bluelower.targets.soc import SOC_DIR, list_socs, load_soc, parse_quantity

MINIMAL = textwrap.dedent(
    """
    name = "toy"
    triple = "aarch64-linux-gnu"
    assumed = ["cpu_clusters.big.efficiency"]

    [[cpu_clusters]]
    name = "big"
    cores = 2
    clock = "2 GHz"
    mcpu = "cortex-a720"
    features = ["neon", "dotprod"]
    ops_per_cycle = { fp32 = 16, int8 = 64 }
    efficiency = 0.5

    [apu]
    name = "toy-npu"
    ops = { matmul = ["int8", "fp16"], add = ["fp16"] }
    peak = { int8 = "2 TOPS", fp16 = "1 TFLOPS" }
    per_call_overhead = "1 ms"
    bandwidth = "10 GB/s"
    max_ops_per_graph = 100

    [memory]
    capacity = "8 GB"
    bandwidth = "20 GB/s"
    """
)


def write(tmp_path, text, name="soc.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_minimal_loads(tmp_path):
    soc = load_soc(write(tmp_path, MINIMAL))
    assert soc.name == "toy" and soc.apu.name == "toy-npu"
    assert soc.cpu_clusters[0].clock_hz == 2e9
    assert soc.memory.bandwidth_bps == 20e9
    assert soc.apu.peak_ops(("int8")) == 2e12
    assert (soc.image_batch, soc.prefill_chunk, soc.max_patches) == (4, 128, 9)
    assert soc.cpu_clusters[0].peak_ops("fp32") == 2 * 2e9 * 16 * 0.5
    assert isinstance(soc.tvm_target(), tvm.target.Target)


@pytest.mark.parametrize(
    "old,new,needles",
    [
        ('name = "toy"', 'name = "toy"\ncolour = "blue"', ["unknown key 'colour'"]),
        ("max_ops_per_graph = 100", "max_ops_per_graph = 100\nturbo = true", ["unknown key 'apu.turbo'"]),
        ('clock = "2 GHz"\n', "", ["missing required key 'cpu_clusters.big.clock'"]),
        ('bandwidth = "20 GB/s"', "", ["missing required key 'memory.bandwidth'"]),
        ("cores = 2", 'cores = "two"', ["'cpu_clusters.big.cores'", "wrong type"]),
        ("efficiency = 0.5", 'efficiency = "half"', ["'cpu_clusters.big.efficiency'", "wrong type"]),
        ('bandwidth = "20 GB/s"', "bandwidth = 20", ["'memory.bandwidth'", "wrong unit", "GB/s"]),
        ('bandwidth = "20 GB/s"', 'bandwidth = "20 GHz"', ["'memory.bandwidth'", "wrong unit 'GHz'"]),
        ('clock = "2 GHz"', 'clock = "2 GB"', ["'cpu_clusters.big.clock'", "wrong unit"]),
        ('int8 = "2 TOPS"', 'int8 = "2 GB/s"', ["'apu.peak.int8'", "wrong unit"]),
        ('per_call_overhead = "1 ms"', 'per_call_overhead = "soon"', ["'apu.per_call_overhead'", "cannot parse"]),
        ('assumed = ["cpu_clusters.big.efficiency"]', 'assumed = ["cpu_clusters.big.turbo"]',
         ["'assumed'", "cpu_clusters.big.turbo"]),
        ('mcpu = "cortex-a720"', 'mcpu = "native"', ["'cpu_clusters.big.mcpu'", "native"]),
        ('matmul = ["int8", "fp16"]', 'matmul = ["int8", "fp16"], warp = ["fp16"]', ["'apu.ops.warp'", "unknown operator kind"]),
        ('fp16 = "1 TFLOPS"', 'fp8 = "1 TFLOPS"', ["'apu.peak", "fp"]),
        ('triple = "aarch64-linux-gnu"', 'triple = "arm phone"', ["'triple'"]),
        ('name = "big"', 'name = "apu"', ["'cpu_clusters.apu.name'", "reserved"]),
        ('capacity = "8 GB"', "capacity = [8]", ["'memory.capacity'", "wrong type"]),
        ("[memory]", "[memory]\ncaches = { L3 = 8 }", ["'memory.caches.L3'", "wrong unit"]),
        ("cores = 2\n", "", ["missing required key 'cpu_clusters.big.cores'"]),
    ],
)
def test_schema_errors_name_file_and_key(tmp_path, old, new, needles):
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    with pytest.raises(BlueLowerError) as ei:
        load_soc(path)
    msg = str(ei.value)
    assert path in msg
    for n in needles:
        assert n in msg, msg
    assert "\n" not in msg


def test_malformed_toml(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[memory\n")
    with pytest.raises(BlueLowerError, match="malformed TOML") as ei:
        load_soc(path)
    assert path in str(ei.value)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(BlueLowerError, match="not found"):
        load_soc(str(tmp_path / "nope.toml"))
    with pytest.raises(BlueLowerError, match="unknown SoC 'snapdragon'"):
        load_soc("snapdragon")


def test_parse_quantity():
    assert parse_quantity("76.8 GB/s", "bandwidth", "x") == pytest.approx(76.8e9)
    assert parse_quantity("1GiB", "size", "x") == 2**30
    assert parse_quantity("50 us", "time", "x") == pytest.approx(50e-6)
    with pytest.raises(BlueLowerError, match="wrong unit"):
        parse_quantity(3, "time", "x")


def test_shipped_socs_load_and_targets_build():
    assert set(list_socs()) >= {"dimensity9300", "host"}
    for name in list_socs():
        soc = load_soc(name)
        assert isinstance(soc.tvm_target(), tvm.target.Target)
        for c in soc.cpu_clusters:
            assert isinstance(c.tvm_target(), tvm.target.Target)
        json.dumps(soc.to_dict())


def test_dimensity9300_facts():
    soc = load_soc("dimensity9300")
    assert [(c.cores, c.clock_hz) for c in soc.cpu_clusters] == [(1, 3.25e9), (3, 2.85e9), (4, 2.0e9)]
    assert soc.memory.bandwidth_bps == pytest.approx(76.8e9)
    assert soc.apu is not None and (soc.image_batch, soc.prefill_chunk, soc.max_patches) == (4, 128, 9)
    t = soc.tvm_target_dict()
    assert t["mtriple"] == "aarch64-linux-gnu" and t["mcpu"] == "cortex-x4" and t["num-cores"] == 8
    assert "+i8mm" in t["mattr"] and "+sve2" in t["mattr"]
    target = soc.tvm_target()
    assert target.attrs["mcpu"] == "cortex-x4"
    # every APU throughput number is declared as an assumption
    assert {"apu.peak.int8", "apu.peak.int16", "apu.peak.fp16", "apu.bandwidth"} <= set(soc.assumed)


def test_host_target_is_plain_llvm():
    soc = load_soc("host")
    assert soc.is_host and soc.apu is None
    t = soc.tvm_target_dict()
    assert t == {"kind": "llvm", "num-cores": 2}


def test_native_is_host_with_this_cpu(tmp_path):
    """`--soc native`: host.toml with the CPU LLVM detects here as mcpu; a build for it
    records the mcpu in its manifest, uses the CPU's dot-product ISA and runs here."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    if not cpu or cpu == "generic":
        pytest.skip("LLVM does not name this machine's CPU")
    soc = load_soc("native")
    assert "native" in list_socs() and soc.is_host and soc.apu is None
    assert soc.tvm_target_dict() == {"kind": "llvm", "mcpu": cpu, "num-cores": 2}
    host = load_soc("host")
    assert soc.memory == host.memory and [c.cores for c in soc.cpu_clusters] == [c.cores for c in host.cpu_clusters]
    from bluelower import api

    out = str(tmp_path / "native")
    manifest = api.compile("tiny", out, soc="native", quant="w4a8")
    assert manifest["target"]["mcpu"] == cpu
    stats = [p["stats"] for p in manifest["passes"] if p["name"] == "QuantizeWeights"][0]
    from bluelower.lowering.kernels import dot_isa

    assert stats["dot_isa"] == dot_isa(tvm.target.Target(manifest["target"])) != "generic"
    res = api.run(out, prompt_ids=[1, 2, 3], max_new_tokens=3, check=True)
    assert res["match"] is True


def test_load_by_path_equals_by_name():
    a = load_soc("dimensity9300")
    b = load_soc(os.path.join(SOC_DIR, "dimensity9300.toml"))
    assert a.to_dict() == b.to_dict()


def test_cost_model_roofline(tmp_path):
    soc = load_soc(write(tmp_path, MINIMAL))
    units = {u.name: u for u in units_of(soc)}
    apu, cpu = units["apu"], units["big"]
    # compute-bound on the APU: 1e12 fp16 ops at 1 TFLOPS = 1 s, + 1 call x 1 ms
    c = cost(Work(1e12, 1e6, ("fp16",), frozenset({"matmul"})), apu)
    assert c.bound == "compute" and c.seconds == pytest.approx(1.001)
    # memory-bound: 1e9 bytes at min(10, 20) GB/s = 0.1 s, 3 calls
    c = cost(Work(1e6, 1e9, ("int8",), frozenset({"matmul"}), calls=3), apu)
    assert c.bound == "memory" and c.seconds == pytest.approx(0.103)
    # unsupported op kind / dtype on the APU -> not a candidate; the CPU runs it
    assert cost(Work(1e9, 0, ("fp16",), frozenset({"softmax"})), apu) is None
    assert cost(Work(1e9, 0, ("int16",), frozenset({"matmul"})), apu) is None
    c = cost(Work(32e9, 0, ("int16", "fp32"), frozenset({"softmax"})), cpu)
    assert c.dtype == "fp32" and c.seconds == pytest.approx(1.0)


# ------------------------------------------------------------------------------ CLI


def test_cli_list():
    r = CliRunner().invoke(cli, ["targets", "list"])
    assert r.exit_code == 0, r.output
    assert "dimensity9300" in r.output and "host" in r.output


def test_cli_show_json():
    r = CliRunner().invoke(cli, ["targets", "show", "dimensity9300", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["name"] == "dimensity9300" and d["apu"]["image_batch"] == 4
    assert d["tvm_target"]["mcpu"] == "cortex-x4"


def test_cli_show_text_and_path(tmp_path):
    r = CliRunner().invoke(cli, ["targets", "show", write(tmp_path, MINIMAL)])
    assert r.exit_code == 0, r.output
    assert "toy-npu" in r.output


def test_cli_show_error_one_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace('bandwidth = "20 GB/s"', "bandwidth = 20"))
    r = CliRunner().invoke(cli, ["targets", "show", path])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "memory.bandwidth" in lines[0]
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------------ docs

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "add-a-soc.md")


def test_add_a_soc_example_is_valid(tmp_path):
    text = open(DOC, encoding="utf-8").read()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    soc = load_soc(write(tmp_path, example, "mysoc.toml"))
    assert soc.name == "example-soc" and soc.apu is not None
    assert isinstance(soc.tvm_target(), tvm.target.Target)
    r = CliRunner().invoke(cli, ["targets", "show", str(tmp_path / "mysoc.toml")])
    assert r.exit_code == 0, r.output


def test_add_a_soc_documents_every_key():
    from bluelower.targets.soc import APU_SCHEMA, CLUSTER_SCHEMA, MEMORY_SCHEMA, OP_KINDS, SOC_SCHEMA

    text = open(DOC, encoding="utf-8").read()
    for schema in (SOC_SCHEMA, CLUSTER_SCHEMA, APU_SCHEMA, MEMORY_SCHEMA):
        for key in schema:
            assert f"| `{key}` |" in text, key
    for kind in OP_KINDS:
        assert f"`{kind}`" in text, kind
