"""List scheduler invariants, Chrome trace, Gantt PNG and the analytic BlueLM-V prediction."""

from __future__ import annotations

import json
import random

import networkx as nx
import pytest
from PIL import Image

from bluelower.errors import BlueLowerError
from bluelower.reports.predict import build_request_graph, parse_quant, predict
from bluelower.runtime_stubs.image import patch_count
from bluelower.targets.scheduler import (
    Schedule,
    add_task,
    critical_path_bound,
    list_schedule,
    plot_gantt,
    serial_bound,
    to_chrome_trace,
)
from bluelower.lowering.models import load_config
from bluelower.targets.soc import load_soc

UNITS = ["apu", "big", "little"]


def random_dag(seed: int, n: int = 30) -> nx.DiGraph:
    rng = random.Random(seed)
    g = nx.DiGraph()
    for i in range(n):
        k = rng.randint(1, 3)
        costs = {u: rng.uniform(0.1, 2.0) for u in rng.sample(UNITS, k)}
        deps = [f"t{j}" for j in range(i) if rng.random() < 0.15]
        add_task(g, f"t{i}", rng.choice(["a", "b"]), costs, deps=deps)
    return g


def check_valid(g: nx.DiGraph, s: Schedule) -> None:
    by = {t.name: t for t in s.tasks}
    assert set(by) == set(g.nodes)
    for n, d in g.nodes(data=True):
        t = by[n]
        assert t.unit in d["costs"]
        assert t.duration_s == pytest.approx(d["costs"][t.unit])
    for a, b in g.edges:
        assert by[b].start_s >= by[a].end_s - 1e-12, (a, b)
    for u in s.units:
        ivs = sorted((t.start_s, t.end_s) for t in s.tasks if t.unit == u)
        for (s0, e0), (s1, e1) in zip(ivs, ivs[1:]):
            assert s1 >= e0 - 1e-12, (u, (s0, e0), (s1, e1))


@pytest.mark.parametrize("seed", range(8))
def test_random_dags_valid_and_bounded(seed):
    g = random_dag(seed)
    s = list_schedule(g, units=UNITS)
    check_valid(g, s)
    assert s.makespan_s >= critical_path_bound(g) - 1e-9
    assert s.makespan_s <= serial_bound(g) + 1e-9


def test_fixed_unit_and_parallel_units():
    g = nx.DiGraph()
    add_task(g, "a", "p", unit="big", cost=2.0)
    add_task(g, "b", "p", {"big": 1.0, "little": 1.5})
    add_task(g, "c", "q", unit="apu", cost=0.5, deps=["a", "b"])
    s = list_schedule(g, units=UNITS)
    check_valid(g, s)
    assert s.task("a").unit == "big" and s.task("b").unit == "little"
    assert s.task("c").start_s == pytest.approx(2.0)
    assert s.makespan_s == pytest.approx(2.5)
    assert s.phase_seconds() == {"p": pytest.approx(2.0), "q": pytest.approx(0.5)}


def test_graph_errors():
    g = nx.DiGraph()
    add_task(g, "a", "p", unit="big", cost=1.0)
    with pytest.raises(BlueLowerError, match="duplicate"):
        add_task(g, "a", "p", unit="big", cost=1.0)
    with pytest.raises(BlueLowerError, match="unknown task"):
        add_task(g, "b", "p", unit="big", cost=1.0, deps=["zzz"])
    add_task(g, "b", "p", unit="big", cost=1.0, deps=["a"])
    g.add_edge("b", "a")
    with pytest.raises(BlueLowerError, match="cycle"):
        list_schedule(g)


def test_schedule_json_roundtrip():
    g = random_dag(3, 10)
    s = list_schedule(g, units=UNITS, title="t")
    d = json.loads(s.to_json())
    assert d["makespan_s"] == pytest.approx(s.makespan_s)
    assert set(d["phases"]) <= {"a", "b"}
    s2 = Schedule.from_dict(d)
    assert s2.makespan_s == pytest.approx(s.makespan_s) and len(s2.tasks) == len(s.tasks)


def test_chrome_trace_valid():
    s = list_schedule(random_dag(1, 12), units=UNITS, title="demo")
    trace = json.loads(json.dumps(to_chrome_trace(s)))
    ev = trace["traceEvents"]
    xs = [e for e in ev if e["ph"] == "X"]
    assert len(xs) == 12
    for e in xs:
        assert {"name", "ph", "ts", "dur", "pid", "tid", "cat"} <= set(e)
        assert e["dur"] >= 0 and e["ts"] >= 0
    names = {e["tid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert sorted(names.values()) == sorted(UNITS)
    for e in xs:
        assert names[e["tid"]] == e["args"]["unit"]
    end_us = max(e["ts"] + e["dur"] for e in xs)
    assert end_us == pytest.approx(s.makespan_s * 1e6)


def test_gantt_png(tmp_path):
    s = list_schedule(random_dag(2, 15), units=UNITS, title="demo")
    path = plot_gantt(s, str(tmp_path / "g.png"))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100


# ------------------------------------------------------------------ BlueLM-V prediction


@pytest.fixture(scope="module")
def d9300():
    return load_soc("dimensity9300")


@pytest.fixture(scope="module")
def cfg():
    return load_config("bluelm-v-3b")


def test_request_graph_shape(cfg, d9300):
    g, info = build_request_graph(cfg, d9300, (2, 4), 2048, 8)
    assert info["image_patches"] == 9 and info["image_batches"] == [4, 4, 1]
    assert info["prefill_chunks"] == 16
    assert g.number_of_nodes() == 3 * 3 + 16 + 8
    # the Conv2D runs only on CPU clusters
    assert "apu" not in g.nodes["conv[0]"]["costs"]
    assert "apu" in g.nodes["vit[0]"]["costs"]


def test_prediction_valid_and_uses_apu(cfg, d9300):
    s = predict(cfg, d9300, decode_tokens=16)
    g, _ = build_request_graph(cfg, d9300, (2, 4), 2048, 16)
    check_valid(g, s)
    assert s.makespan_s >= critical_path_bound(g) - 1e-9
    assert s.makespan_s <= serial_bound(g) + 1e-9
    assert all(s.task(f"vit[{k}]").unit == "apu" for k in range(3))
    assert all(t.unit == "apu" for t in s.tasks if t.phase in ("prefill", "decode"))
    summ = s.info["summary"]
    assert 0 < summ["image_encode_s"] < summ["makespan_s"]
    assert summ["decode_tokens_per_s"] > 0
    # decode cannot beat the DRAM roofline of streaming the INT4 decoder weights
    assert summ["decode_tokens_per_s"] < d9300.memory.bandwidth_bps / s.info["decoder_weight_bytes"]


def test_pipelined_image_encoding_beats_serial(cfg, d9300):
    kw = dict(image_grid=(2, 4), prompt_tokens=2048, decode_tokens=0)
    pipe = predict(cfg, d9300, pipeline=True, **kw).info["summary"]["image_encode_s"]
    serial = predict(cfg, d9300, pipeline=False, **kw).info["summary"]["image_encode_s"]
    assert pipe < serial
    # the CPU Conv2D of later batches is hidden behind the APU
    s = predict(cfg, d9300, pipeline=True, **kw)
    assert s.task("conv[1]").end_s <= s.task("vit[0]").end_s


def test_prediction_scales(cfg, d9300):
    small = predict(cfg, d9300, image_grid=(1, 1), prompt_tokens=256, decode_tokens=4)
    big = predict(cfg, d9300, image_grid=(2, 4), prompt_tokens=2048, decode_tokens=4)
    assert small.info["summary"]["image_encode_s"] < big.info["summary"]["image_encode_s"]
    assert small.info["summary"]["prefill_s"] < big.info["summary"]["prefill_s"]


def test_host_prediction_cpu_only(cfg):
    s = predict(cfg, "host", image_grid=(1, 1), prompt_tokens=256, decode_tokens=2)
    assert {t.unit for t in s.tasks} == {"host"}


def test_prediction_errors(cfg, d9300):
    with pytest.raises(BlueLowerError, match="quantization"):
        parse_quant("int4")
    with pytest.raises(BlueLowerError, match="exceeds the KV-cache"):
        predict(cfg, d9300, prompt_tokens=4096)
    with pytest.raises(BlueLowerError, match="image alone"):
        predict(cfg, d9300, image_grid=(4, 4), prompt_tokens=512)
    with pytest.raises(BlueLowerError):
        patch_count((0, 2))
