"""EmulateAPUNumerics (fp16 rounding points and int16 activation codes inside APU partitions,
from the SoC file) and
the layout kinds QuantizeWeights needs on the APU (`slice`, `pad`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from bluelower.passes.emulate_apu_numerics import EmulateAPUNumerics
from bluelower.passes.ir_utils import without_results
from bluelower.passes.partition_for_apu import PartitionForAPU, apu_partitions
from bluelower.targets.soc import load_soc, soc_path
from test_partition import Before, partition, run_pass, write_soc

from conftest import run_pipeline_until


def h(a):
    """Round to float16 and back (one APU rounding point)."""
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def run(mod, *args):
    ex = relax.build(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def fp16_ulp(x):
    return np.spacing(np.abs(x).astype(np.float16)).astype(np.float32)


def test_partition_output_has_the_apu_rounding_points(tmp_path):
    soc = load_soc(write_soc(tmp_path, "two-op-apu", max_ops=2))
    part = partition(soc)(Before)
    emulated, stats = run_pass(EmulateAPUNumerics(soc.apu), part)
    assert stats["emulated_partitions"] == 2 and stats["float_dtype"] == "fp16" and stats["accumulate"] == "fp32"
    rng = np.random.default_rng(0)
    x, w1, w2 = (rng.standard_normal(s).astype("float32") for s in ((4, 8), (8, 8), (8, 8)))
    got, fp32 = run(emulated, x, w1, w2), run(part, x, w1, w2)
    # the same computation with the APU's rounding points: inputs rounded on entry, each
    # operator's result rounded, fp32 accumulation; power and the last add run on the CPU
    b = h(h(h(x) @ h(w1)) + h(x))  # main_apu0: matmul, add
    c = b ** 2  # CPU
    d = h(h(c) @ h(w2))  # main_apu1: matmul, gelu
    e = h(torch.nn.functional.gelu(torch.from_numpy(d)).numpy())
    want = e + c  # CPU
    # exact up to one fp16 ulp where TVM's erf and PyTorch's round to neighbouring halves
    assert np.all(np.abs(got - want) <= fp16_ulp(e) + 1e-6 * np.abs(want))
    assert np.mean(got == want) > 0.9
    # and it is not the fp32 result: the rounding is really there
    err = np.abs(got - fp32) / np.abs(fp32).max()
    assert err.max() > 1e-4
    assert np.abs(fp32 - (torch.nn.functional.gelu(torch.from_numpy((x @ w1 + x) ** 2 @ w2)).numpy()
                          + (x @ w1 + x) ** 2)).max() < 1e-3 * np.abs(fp32).max()


@I.ir_module
class LongDot:
    @R.function
    def main(x: R.Tensor((2, 2048), "float32"), w: R.Tensor((2048, 4), "float32")) -> R.Tensor((2, 4), "float32"):
        R.func_attr({"num_input": 1, "bluelower.param_names": ["l.weight"]})
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y


def test_fp16_accumulation_follows_the_soc_file(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.5, 1.0, (2, 2048)).astype("float32")  # positive: the sum grows, fp16 sums lose bits
    w = rng.uniform(0.5, 1.0, (2048, 4)).astype("float32")
    acc32 = load_soc(write_soc(tmp_path, "acc32", max_ops=4))
    path = write_soc(tmp_path, "acc16", max_ops=4)
    text = open(path).read().replace("image_batch = 2", 'image_batch = 2\naccumulate = "fp16"')
    open(path, "w").write(text)
    acc16 = load_soc(path)
    assert acc16.apu.accumulate == "fp16" and acc32.apu.accumulate == "fp32"
    y32 = run(EmulateAPUNumerics(acc32.apu)(partition(acc32)(LongDot)), x, w)
    y16 = run(EmulateAPUNumerics(acc16.apu)(partition(acc16)(LongDot)), x, w)
    ref32 = h(h(x) @ h(w))  # fp32 sums, one rounding at the end (1 ulp: fp32 summation order)
    assert np.all(np.abs(y32 - ref32) <= fp16_ulp(ref32))
    # fp16 sums: every partial sum rounded (sequential, as the legalized loop adds)
    acc = np.zeros((2, 4), np.float16)
    x16, w16 = x.astype(np.float16), w.astype(np.float16)
    for k in range(2048):
        acc = (acc + (x16[:, k:k + 1] * w16[k:k + 1, :]).astype(np.float16)).astype(np.float16)
    assert np.abs(y16 - acc.astype(np.float32)).max() <= 4 * fp16_ulp(acc.astype(np.float32)).max()
    assert np.abs(y16 - y32).max() > 4 * fp16_ulp(y32).max()  # fp16 accumulation visibly loses precision


def test_fp32_apu_and_no_apu_get_no_rounding(tmp_path):
    fp32_ops = ('matmul = ["fp32"], add = ["fp32"], gelu = ["fp32"]')
    path = write_soc(tmp_path, "fp32-apu", max_ops=2)
    text = open(path).read()
    start = text.index("ops = {")
    end = text.index("\n", start)
    text = text[:start] + "ops = { " + fp32_ops + ' }\npeak = { fp32 = "1 TFLOPS" }' + text[end:]
    text = text.replace('peak = { int8 = "4 TOPS", fp16 = "2 TFLOPS" }\n', "")
    open(path, "w").write(text)
    soc = load_soc(path)
    part, _ = run_pass(partition(soc), Before)
    assert {str(f.attrs["bluelower.apu_dtype"]) for f in apu_partitions(part).values()} == {"fp32"}
    after, stats = run_pass(EmulateAPUNumerics(soc.apu), part)
    tvm.ir.assert_structural_equal(without_results(after), without_results(part))
    assert stats["emulated_partitions"] == 0 and stats["float_dtype"] == "fp32"
    no_apu = load_soc(write_soc(tmp_path, "no-apu", max_ops=None))
    after, stats = run_pass(EmulateAPUNumerics(no_apu.apu), Before)
    tvm.ir.assert_structural_equal(without_results(after), Before)
    assert stats["emulated_partitions"] == 0 and stats["float_dtype"] == "none"


# --- slice / pad kinds: QuantizeWeights' padding no longer splits the ViT ----------------


def _padded_tiny_w4a16kv8():
    """tiny with a ViT MLP of 120 (not a multiple of 32): QuantizeWeights pads fc1's N and
    slices it back (strided_slice) and pads fc2's K (zeros + concat)."""
    from bluelower.lowering.models import load_config

    cfg = load_config("tiny").replace_runtime(image_batch=4)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, intermediate_size=120))
    return run_pipeline_until(cfg, "w4a16kv8")[0]


def _ops(func) -> list[str]:
    return [b.value.op.name for blk in func.body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]


def test_padded_vit_is_one_apu_partition_on_dimensity9300(tmp_path):
    mod = _padded_tiny_w4a16kv8()
    ops = _ops(mod["encode_image_blocks"])
    assert "relax.strided_slice" in ops and "relax.zeros" in ops  # the padding is there
    # the shipped file lists slice and pad: the whole ViT (2 layers, well under 330 ops) is one graph
    after, stats = run_pass(partition(load_soc("dimensity9300")), mod)
    assert stats["partitions"]["encode_image_blocks"] == 1 and stats["apu_calls"]["encode_image_blocks"] == 1
    assert _ops(after["encode_image_blocks"]) == []  # nothing left on the CPU between APU calls
    kinds = set(after["encode_image_blocks_apu0"].attrs["bluelower.apu_op_kinds"])
    assert {"slice", "pad"} <= kinds
    # the same SoC without the two kinds: the ViT splits at the padding (the old behaviour)
    text = open(soc_path("dimensity9300")).read()
    for kind in ("slice", "pad"):
        text = text.replace(f', {kind} = ["int8", "int16", "fp16"]', "")
    assert "slice =" not in text and "pad =" not in text
    old = tmp_path / "d9300-no-slice.toml"
    old.write_text(text)
    _, before = run_pass(partition(load_soc(str(old))), mod)
    assert before["partitions"]["encode_image_blocks"] == 4


def test_bad_accumulate_is_a_one_line_error(tmp_path):
    from bluelower.errors import BlueLowerError

    path = write_soc(tmp_path, "bad-acc", max_ops=4)
    text = open(path).read().replace("image_batch = 2", 'image_batch = 2\naccumulate = "int8"')
    open(path, "w").write(text)
    with pytest.raises(BlueLowerError, match=r"'apu.accumulate': must be one of fp32, fp16, got 'int8'"):
        load_soc(path)


# --- integer activations (apu.activations: the paper's INT16 decoder activations) ---------------


def q16(a):
    """One int16 fake-quantization point: symmetric, each row's max|x| / 32767 as its scale."""
    a = np.asarray(a, np.float32)
    s = np.maximum(np.abs(a).max(axis=-1, keepdims=True), np.float32(1e-30)) / np.float32(32767)
    return (np.clip(np.round(a / s), -32767, 32767) * s).astype(np.float32), s.astype(np.float32)


def int16_soc(tmp_path, activations='{ decoder = "int16", vision = "fp16" }'):
    path = write_soc(tmp_path, "int16-apu", matmul=("int8", "int16", "fp16"), max_ops=2)
    text = open(path).read()
    for kind in ("add", "gelu"):
        text = text.replace(f'{kind} = ["fp16"]', f'{kind} = ["int16", "fp16"]')
    text = text.replace('peak = { int8 = "4 TOPS", fp16 = "2 TFLOPS" }',
                        'peak = { int8 = "4 TOPS", int16 = "2 TOPS", fp16 = "2 TFLOPS" }')
    text = text.replace("image_batch = 2", f"image_batch = 2\nactivations = {activations}")
    open(path, "w").write(text)
    return load_soc(path)


def test_decoder_activations_are_int16_codes(tmp_path):
    soc = int16_soc(tmp_path)
    assert soc.apu.activations == {"decoder": "int16", "vision": "fp16"}
    part = partition(soc)(Before)
    emulated, stats = run_pass(EmulateAPUNumerics(soc.apu, weight_role=lambda n: "attention"), part)
    assert stats["emulated_partitions"] == 2 and stats["activations"] == {"decoder": "int16", "vision": "fp16"}
    # per partition: the activation input and the 2 operator results (weights stay fp16 rounding)
    assert stats["integer_values"] == 6 and stats["rounded_values"] == 8
    rng = np.random.default_rng(3)
    x, w1, w2 = (rng.standard_normal(s).astype("float32") for s in ((4, 8), (8, 8), (8, 8)))
    got = run(emulated, x, w1, w2)
    qx = q16(x)[0]
    b, _ = q16(q16(qx @ h(w1))[0] + qx)  # main_apu0: int16 activations, fp16 weight, int16 results
    c = b ** 2  # CPU
    d, _ = q16(q16(c)[0] @ h(w2))  # main_apu1
    e, s_e = q16(torch.nn.functional.gelu(torch.from_numpy(d)).numpy())
    want = e + c
    # a code apart at most where TVM's and numpy's float32 arithmetic (erf, the division) differ
    assert np.all(np.abs(got - want) <= 2 * s_e + 1e-6 * np.abs(want).max())
    # and it is not the fp16 rule: the same partitions with fp16 activations round differently
    fp16 = run(EmulateAPUNumerics(soc.apu)(part), x, w1, w2)  # no weight roles: no parts, fp16
    assert np.abs(fp16 - want).max() > 10 * np.abs(got - want).max()


def test_vision_part_keeps_the_float_rule(tmp_path):
    soc = int16_soc(tmp_path)
    part = partition(soc)(Before)
    vision, stats = run_pass(EmulateAPUNumerics(soc.apu, weight_role=lambda n: "vision"), part)
    assert stats["integer_values"] == 0
    plain = EmulateAPUNumerics(soc.apu)(part)
    tvm.ir.assert_structural_equal(without_results(vision), without_results(plain))


def test_dimensity9300_decoder_partitions_get_int16(tmp_path):
    from bluelower.targets.soc import with_host_cpu

    soc = with_host_cpu(load_soc("dimensity9300"))
    assert soc.apu.activations == {"decoder": "int16", "vision": "fp16"}
    from bluelower.lowering.models import load_config

    mod = run_pipeline_until(load_config("tiny"), "w4a16kv8", soc=soc, stop_after="EmulateAPUNumerics")[0]
    from bluelower.passes.instruments import pass_stats

    st = pass_stats(mod)["EmulateAPUNumerics"]
    assert st["integer_values"] > 0 and st["activations"] == {"decoder": "int16", "vision": "fp16"}
    labels = {name: str(f.attrs["bluelower.apu_numerics"]) for name, f in apu_partitions(mod).items()
              if "bluelower.apu_numerics" in f.attrs}
    assert any(n.startswith(("prefill", "decode")) and "int16" in lab for n, lab in labels.items())
    assert all("int16" not in lab for n, lab in labels.items() if n.startswith("encode_image"))


@pytest.mark.parametrize("value, message", [
    ('{ decoder = "int4" }', r"'apu.activations.decoder': must be one of int16, int8, fp16, bf16, fp32, got 'int4'"),
    ('{ text = "int16" }', r"'apu.activations.text': unknown model part \(valid: decoder, vision\)"),
    ('{ decoder = "bf16" }', r"'apu.activations.decoder': 'bf16' is listed for no operator kind in apu.ops"),
])
def test_bad_activations_are_one_line_errors(tmp_path, value, message):
    from bluelower.errors import BlueLowerError

    with pytest.raises(BlueLowerError, match=message):
        int16_soc(tmp_path, value)
