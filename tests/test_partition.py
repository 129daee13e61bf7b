"""PartitionForAPU and ScheduleOperators: op support, dtypes, the graph-size limit, a golden
partitioning, the schedule's invariants, custom SoC files end to end, `inspect schedule`."""

from __future__ import annotations

import json

import pytest
import tvm
from click.testing import CliRunner
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from bluelower.cli import cli
from bluelower.lowering.models.bluelm_v import SPEC
from bluelower.passes import pipeline
from bluelower.passes.instruments import pass_stats
from bluelower.passes.ir_utils import result, without_results
from bluelower.passes.partition_for_apu import PartitionForAPU, apu_kinds, apu_partitions
from bluelower.passes.pipeline import request_of
from bluelower.passes.schedule_operators import ScheduleOperators
from bluelower.targets.soc import load_soc
from bluelower.passes.ir_utils import without_results
from conftest import run_pipeline_until

CPU = """
name = "{name}"
triple = "x86_64-linux-gnu"
is_host = true

[[cpu_clusters]]
name = "big"
cores = 1
clock = "2.5 GHz"
ops_per_cycle = {{ fp32 = 32 }}
efficiency = 0.1

[[cpu_clusters]]
name = "little"
cores = 1
clock = "1.5 GHz"
ops_per_cycle = {{ fp32 = 16 }}
efficiency = 0.1

[memory]
capacity = "16 GB"
bandwidth = "19 GB/s"
"""

APU = """
[apu]
name = "Test APU"
ops = {{ {ops} }}
peak = {{ int8 = "4 TOPS", fp16 = "2 TFLOPS" }}
per_call_overhead = "1 ms"
bandwidth = "30 GB/s"
max_ops_per_graph = {max_ops}
image_batch = 2
"""

FP16_OPS = ('add = ["fp16"], multiply = ["fp16"], softmax = ["fp16"], layer_norm = ["fp16"], gelu = ["fp16"], '
            'reshape = ["fp16"], transpose = ["fp16"], concat = ["fp16"], gather = ["fp16"]')


def write_soc(tmp_path, name: str, matmul=("int8", "fp16"), max_ops: int | None = 12, extra_ops: str = "") -> str:
    """A SoC file: two host CPU clusters and, unless ``max_ops`` is None, a test APU."""
    text = CPU.format(name=name)
    if max_ops is not None:
        ops = f"matmul = {json.dumps(list(matmul))}, {FP16_OPS}" + (f", {extra_ops}" if extra_ops else "")
        text = text.replace("\n[memory]", APU.format(ops=ops, max_ops=max_ops) + "\n[memory]")
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


def run_pass(p, mod):
    """Run ``p`` on ``mod``; return ``(mod, the stats it attached)``."""
    out = p(mod)
    return out, pass_stats(out).get(p.info.name, {})


def partition(soc):
    """PartitionForAPU for ``soc`` as a BlueLM-V build configures it."""
    return PartitionForAPU(soc.apu, cpu_functions=SPEC.cpu_entries)


def graph_rewritten(quant: str, image_batch: int = 2):
    """The tiny model after the graph-rewrite and quantization phases (what PartitionForAPU sees)."""
    from bluelower.lowering.models import load_config

    cfg = load_config("tiny").replace_runtime(image_batch=image_batch)
    mod, _sigs = run_pipeline_until(cfg, quant)
    return mod, cfg


@pytest.fixture(scope="module")
def tiny_fp32():
    return graph_rewritten("fp32")


@pytest.fixture(scope="module")
def tiny_w4a16():
    return graph_rewritten("w4a16")


def partition_bindings(func):
    return [b for blk in func.body.blocks for b in blk.bindings if isinstance(b.value, relax.Call)]


def kernels(func) -> list[str]:
    """Names of the TIR kernels ``func`` calls directly."""
    return [b.value.args[0].name_hint for b in partition_bindings(func)
            if isinstance(b.value.op, tvm.ir.Op) and b.value.op.name == "relax.call_tir"]


# --- golden ---------------------------------------------------------------------------


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w1: R.Tensor((8, 8), "float32"),
             w2: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"num_input": 1, "bluelower.param_names": ["l1.weight", "l2.weight"]})
        with R.dataflow():
            a = R.matmul(x, w1)
            b = R.add(a, x)
            c = R.power(b, R.const(2.0, "float32"))  # no APU kind: stays on the CPU
            d = R.matmul(c, w2)
            e = R.nn.gelu(d)
            f = R.add(e, c)  # over the 2-op limit, and an add alone is no partition
            R.output(f)
        return f


@I.ir_module
class Expected:
    @R.function(private=True)
    def main_apu0(x: R.Tensor((4, 8), dtype="float32"),
                  l1_weight: R.Tensor((8, 8), dtype="float32")) -> R.Tensor((4, 8), dtype="float32"):
        R.func_attr({"bluelower.apu_dtype": "fp16", "bluelower.apu_op_kinds": ["add", "matmul"], "bluelower.apu_ops": 2,
                     "bluelower.entry": "main", "bluelower.unit": "apu"})
        with R.dataflow():
            a: R.Tensor((4, 8), dtype="float32") = R.matmul(x, l1_weight, out_dtype=None)
            b: R.Tensor((4, 8), dtype="float32") = R.add(a, x)
            out: R.Tensor((4, 8), dtype="float32") = b
            R.output(out)
        return out

    @R.function(private=True)
    def main_apu1(c: R.Tensor((4, 8), dtype="float32"),
                  l2_weight: R.Tensor((8, 8), dtype="float32")) -> R.Tensor((4, 8), dtype="float32"):
        R.func_attr({"bluelower.apu_dtype": "fp16", "bluelower.apu_op_kinds": ["gelu", "matmul"], "bluelower.apu_ops": 2,
                     "bluelower.entry": "main", "bluelower.unit": "apu"})
        with R.dataflow():
            d: R.Tensor((4, 8), dtype="float32") = R.matmul(c, l2_weight, out_dtype=None)
            e: R.Tensor((4, 8), dtype="float32") = R.nn.gelu(d)
            out: R.Tensor((4, 8), dtype="float32") = e
            R.output(out)
        return out

    @R.function
    def main(x: R.Tensor((4, 8), dtype="float32"), w1: R.Tensor((8, 8), dtype="float32"),
             w2: R.Tensor((8, 8), dtype="float32")) -> R.Tensor((4, 8), dtype="float32"):
        R.func_attr({"bluelower.param_names": ["l1.weight", "l2.weight"], "num_input": 1})
        cls = Expected
        with R.dataflow():
            b: R.Tensor((4, 8), dtype="float32") = cls.main_apu0(x, w1)
            c: R.Tensor((4, 8), dtype="float32") = R.power(b, R.const(2.0, "float32"))
            e: R.Tensor((4, 8), dtype="float32") = cls.main_apu1(c, w2)
            f: R.Tensor((4, 8), dtype="float32") = R.add(e, c)
            R.output(f)
        return f


def test_golden_partitioning(tmp_path):
    soc = load_soc(write_soc(tmp_path, "two-op-apu", max_ops=2))
    after, stats = run_pass(partition(soc), Before)
    tvm.ir.assert_structural_equal(without_results(after), Expected)
    assert stats["partitions"] == {"main": 2}
    assert stats["apu_ops"] == 4 and stats["cpu_ops"] == 2


def test_golden_partitioning_computes_the_same(tmp_path):
    import numpy as np

    soc = load_soc(write_soc(tmp_path, "two-op-apu", max_ops=2))
    after = partition(soc)(Before)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype("float32") for s in ((4, 8), (8, 8), (8, 8))]
    outs = []
    for mod in (Before, after):
        ex = relax.build(mod, tvm.target.Target("llvm"))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        outs.append(vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@I.ir_module
class RMSNorm:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"num_input": 1, "bluelower.param_names": ["l.weight"]})
        with R.dataflow():
            p = R.power(x, R.const(2.0, "float32"))
            m = R.mean(p, axis=[-1], keepdims=True)
            a = R.add(m, R.const(1e-6, "float32"))
            r = R.rsqrt(a)
            n = R.multiply(x, r)
            y = R.matmul(n, w)
            R.output(y)
        return y


def test_decomposed_rms_norm_is_one_rms_norm_operator(tmp_path):
    with_rms = load_soc(write_soc(tmp_path, "rms", max_ops=10, extra_ops='rms_norm = ["fp16"]'))
    after, stats = run_pass(partition(with_rms), RMSNorm)
    assert stats["partitions"] == {"main": 1} and stats["apu_ops"] == 3  # rms_norm, multiply, matmul
    assert sorted(after["main_apu0"].attrs["bluelower.apu_op_kinds"]) == ["matmul", "multiply", "rms_norm"]
    without, stats = run_pass(partition(load_soc(write_soc(tmp_path, "no-rms", max_ops=10))), RMSNorm)
    assert stats["apu_ops"] == 2 and stats["cpu_ops"] == 4  # power, mean, add, rsqrt on the CPU


@I.ir_module
class GatedMLP:
    """SwiGLU as torch.export decomposes it: silu(g) = g * sigmoid(g), then * u; and a
    look-alike, g * sigmoid(u), which is not a SiLU."""

    @R.function
    def main(x: R.Tensor((4, 8), "float32"), wg: R.Tensor((8, 8), "float32"), wu: R.Tensor((8, 8), "float32"),
             wd: R.Tensor((8, 8), "float32")) -> R.Tensor((4, 8), "float32"):
        R.func_attr({"num_input": 1, "bluelower.param_names": ["gate.weight", "up.weight", "down.weight"]})
        with R.dataflow():
            g = R.matmul(x, wg)
            sg = R.sigmoid(g)
            silu = R.multiply(g, sg)
            u = R.matmul(x, wu)
            h = R.multiply(silu, u)
            y = R.matmul(h, wd)
            su = R.sigmoid(u)
            z = R.multiply(g, su)  # not silu: the sigmoid's input is u, the other operand g
            out = R.add(y, z)
            R.output(out)
        return out


def test_decomposed_silu_is_one_silu_operator(tmp_path):
    with_silu = load_soc(write_soc(tmp_path, "silu", max_ops=20, extra_ops='silu = ["fp16"]'))
    after, stats = run_pass(partition(with_silu), GatedMLP)
    # one partition up to the down projection; the look-alike's sigmoid stays on the CPU
    assert stats["partitions"] == {"main": 1} and stats["cpu_ops"] == 3, stats  # sigmoid(u), multiply, add
    assert stats["apu_ops"] == 5, stats  # 3 matmuls, the silu, the gating multiply
    assert sorted(after["main_apu0"].attrs["bluelower.apu_op_kinds"]) == ["matmul", "multiply", "silu"]
    without, stats = run_pass(partition(load_soc(write_soc(tmp_path, "no-silu", max_ops=20))), GatedMLP)
    assert stats["partitions"] == {"main": 2}, stats  # split at the sigmoid


# --- the tiny model -------------------------------------------------------------------


def test_partitions_respect_op_support_dtype_and_limit(tmp_path, tiny_fp32):
    mod, _cfg = tiny_fp32
    soc = load_soc(write_soc(tmp_path, "small-apu", max_ops=7))
    after, stats = run_pass(partition(soc), mod)
    sink = result(after, "apu_partitions")
    parts = apu_partitions(after)
    assert parts and len(parts) == len(sink) == sum(stats["partitions"].values())
    assert stats["partitions"]["encode_image_embed"] == 0  # the Conv2D stage stays on the CPU
    assert stats["partitions"]["encode_image_blocks"] >= 2  # split by the 7-op limit
    for name, func in parts.items():
        assert int(func.attrs["bluelower.apu_ops"]) <= 7, name
        assert str(func.attrs["bluelower.apu_dtype"]) == "fp16"
        for b in partition_bindings(func):
            assert apu_kinds(soc.apu, b.value, b.var.ty) is not None, (name, b.value.op)
    # every call the APU cannot run (here: power, rsqrt, strided_slice, conv2d, ...) stayed outside
    assert stats["apu_ops"] > 0 and stats["cpu_ops"] > 0
    desc = sink[0]
    assert {"name", "entry", "dtype", "ops", "op_kinds", "inputs", "outputs", "tvmscript"} <= set(desc)
    assert any(i["weight"] for d in sink for i in d["inputs"])  # weights by their checkpoint name
    assert "@R.function" in desc["tvmscript"]


def test_apu_without_int4_keeps_int4_kernels_on_the_cpu(tmp_path, tiny_w4a16):
    mod, _cfg = tiny_w4a16
    no_int4 = load_soc(write_soc(tmp_path, "no-int4", matmul=("int8", "fp16"), max_ops=50))
    with_int4 = load_soc(write_soc(tmp_path, "int4", matmul=("int4", "int8", "fp16"), max_ops=50))
    after, _ = run_pass(partition(no_int4), mod)
    inside = [k for f in apu_partitions(after).values() for k in kernels(f)]
    assert not any(k.startswith("int4_linear") for k in inside)
    assert any(k.startswith("int8_linear") for k in inside)  # the ViT's INT8 linears do go
    outside = kernels(after["decode"])
    assert any(k.startswith("int4_linear") for k in outside)
    after4, _ = run_pass(partition(with_int4), mod)
    dtypes = {str(f.attrs["bluelower.apu_dtype"]) for f in apu_partitions(after4).values()}
    assert any(k.startswith("int4_linear") for f in apu_partitions(after4).values() for k in kernels(f))
    assert "int4" in dtypes


def test_no_apu_is_cpu_only(tmp_path, tiny_fp32):
    mod, _cfg = tiny_fp32
    soc = load_soc(write_soc(tmp_path, "cpu-only", max_ops=None))
    after, stats = run_pass(partition(soc), mod)
    tvm.ir.assert_structural_equal(without_results(after), without_results(mod))
    assert stats["apu"] == "none" and stats["apu_ops"] == 0
    assert set(stats["partitions"].values()) == {0}
    assert load_soc("host").apu is None  # the shipped host file: same path
    assert pipeline.build_pipeline()  # the pass is in the pipeline
    assert "PartitionForAPU" in pipeline.pass_names() and "ScheduleOperators" in pipeline.pass_names()


def test_schedule_respects_dependencies_and_one_task_per_unit(tmp_path, tiny_fp32):
    mod, cfg = tiny_fp32
    soc = load_soc(write_soc(tmp_path, "sched-apu", max_ops=12))
    after = partition(soc)(mod)
    scheduled, stats = run_pass(ScheduleOperators(soc, request_of(SPEC), image_batch=cfg.runtime.image_batch), after)
    sched = result(scheduled, "schedule")
    tasks = {t["name"]: t for t in sched["tasks"]}
    assert sched["makespan_s"] > 0 and stats["makespan_s"] == sched["makespan_s"]
    assert set(sched["phase_seconds"]) == {"image_encode", "prefill", "decode"}
    assert sched["info"]["image_patches"] == 9 and sched["info"]["image_batches"] == 5  # 9 patches, batch 2
    # one task at a time per unit
    for unit in sched["units"]:
        spans = sorted((t["start_s"], t["end_s"]) for t in sched["tasks"] if t["unit"] == unit)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:])), unit
    # APU partitions on the APU, CPU segments on a CPU cluster
    for t in sched["tasks"]:
        assert (t["unit"] == "apu") == ("_apu" in t["name"].split("/")[-1]), t
    # dependencies: rebuild the graph and check every edge
    from bluelower.passes.schedule_operators import build_operator_graph

    g, _ = build_operator_graph(after, soc, request_of(SPEC), cfg.runtime.image_batch)
    assert g.number_of_nodes() == len(tasks)
    for a, b in g.edges:
        assert tasks[a]["end_s"] <= tasks[b]["start_s"] + 1e-12, (a, b)
    # the pipeline: the Conv2D of batch 1 does not wait for the ViT blocks of batch 0
    blocks0_end = max(t["end_s"] for n, t in tasks.items() if n.startswith("encode_image_blocks[0]"))
    embed1_start = min(t["start_s"] for n, t in tasks.items() if n.startswith("encode_image_embed[1]"))
    assert embed1_start < blocks0_end


# --- end to end -----------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def apu_build(tmp_path_factory):
    """tiny at w4a16 for a SoC file whose APU has no INT4."""
    tmp = tmp_path_factory.mktemp("apu_build")
    soc = write_soc(tmp, "no-int4-apu", matmul=("int8", "fp16"), max_ops=20)
    out = tmp / "build"
    result = invoke("compile", "--model", "tiny", "--quant", "w4a16", "--soc", soc, "-o", str(out))
    assert result.exit_code == 0, result.output
    return str(out)


def test_custom_soc_with_apu_compiles_and_runs(apu_build, tiny_image):
    manifest = json.loads(open(f"{apu_build}/manifest.json").read())
    parts = manifest["apu_partitions"]
    assert parts and all(p["ops"] <= 20 for p in parts)
    assert not any("int4_linear" in p["tvmscript"] for p in parts)
    assert manifest["schedule"]["makespan_s"] > 0
    result = invoke("run", apu_build, "--image", tiny_image, "--prompt-ids", "1,2,3,40", "--max-new-tokens", "6",
                    "--check", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["match"] is True


def test_custom_soc_without_apu_compiles_and_runs(tmp_path, tiny_image):
    soc = write_soc(tmp_path, "cpu-only", max_ops=None)
    out = tmp_path / "build"
    result = invoke("compile", "--model", "tiny", "--quant", "fp32", "--soc", soc, "-o", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["apu_partitions"] == []
    assert {t["unit"] for t in manifest["schedule"]["tasks"]} <= {"big", "little"}
    result = invoke("run", str(out), "--image", tiny_image, "--prompt-ids", "5,6,7", "--max-new-tokens", "6",
                    "--check", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["match"] is True


def test_inspect_schedule_table_json_trace_and_plot(apu_build, tmp_path):
    result = invoke("inspect", "schedule", apu_build)
    assert result.exit_code == 0, result.output
    assert "makespan" in result.output and "image_encode" in result.output
    trace, png = tmp_path / "s.trace.json", tmp_path / "s.png"
    result = invoke("inspect", "schedule", apu_build, "--json", "--trace", str(trace), "--plot", str(png))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["makespan_s"] > 0
    assert set(data["phase_seconds"]) == {"image_encode", "prefill", "decode"}
    events = json.loads(trace.read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert complete and all({"name", "ts", "dur", "pid", "tid"} <= set(e) for e in complete)
    assert {e["args"]["name"] for e in events if e["name"] == "thread_name"} == {"apu", "big", "little"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_inspect_schedule_errors(tmp_path):
    result = invoke("inspect", "schedule", str(tmp_path))
    assert result.exit_code != 0 and result.output.startswith("error: ") and "not a bluelower build" in result.output
