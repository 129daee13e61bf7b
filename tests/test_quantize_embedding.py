"""QuantizeWeights on the token-embedding table: the gather kernel (exact vs numpy, ids out
of range), the rewrite of R.take (golden, both frontends), and a tiny w4a16kv8 build whose
stored embedding bytes equal what bluelower.reports.memory counts."""

import json
import os

import numpy as np
import pytest
import tvm
from tvm import relax

from bluelower.lowering.kernels import (
    dequantize_int4_groupwise,
    dequantize_int4_rows,
    dequantize_int8_rows,
    embedding_gather,
    quantize_int4_groupwise,
    quantize_int4_rows,
    quantize_int8_per_channel,
    quantize_int8_rows,
)
from bluelower.lowering.kernels.embedding import ERROR
from bluelower.lowering.quant.params import param_producer
from bluelower.passes.instruments import pass_stats
from bluelower.passes.ir_utils import without_results
from bluelower.passes.quantize_weights import QuantizeWeights, quantized_params

EMBED = "language_model.model.embed_tokens.weight"


def role(name: str) -> str:
    """Roles of the hand-written modules' tables: the token embedding and a ViT position table."""
    return "position_embedding" if name.startswith("vision") else "embedding"


def _run_kernel(f, *arrays, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), "llvm")
    out = tvm.runtime.empty(out_shape, "float32", tvm.cpu())
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


# ----------------------------------------------------------------------------- quantizers


def test_row_quantizers_use_the_linear_rules():
    """Same codes and scales as the blocked linear formats, only laid out by rows."""
    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    p, s = quantize_int4_rows(w, 32)
    assert p.shape == (64, 48) and p.dtype == np.uint8 and s.shape == (64, 3) and s.dtype == np.float16
    np.testing.assert_array_equal(dequantize_int4_rows(p, s, 32), dequantize_int4_groupwise(*quantize_int4_groupwise(w, 32), 32))
    q, s8 = quantize_int8_rows(w)
    assert q.shape == (64, 96) and q.dtype == np.int8 and s8.shape == (64,)
    bp, bs = quantize_int8_per_channel(w)
    np.testing.assert_array_equal(s8, bs)
    np.testing.assert_array_equal(q, bp.transpose(0, 2, 1).reshape(64, 96))
    assert np.abs(dequantize_int8_rows(q, s8) - w).max() <= s8.max() / 2 + 1e-7


# ----------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("kind,width,index_dtype", [("int4", 64, "int64"), ("int4", 40, "int32"),
                                                     ("int8", 64, "int64"), ("int8", 37, "int32")])
def test_gather_kernel_equals_numpy_dequantized_rows(kind, width, index_dtype):
    rows = 100  # not a multiple of 32: the row layout needs no padding of the vocabulary
    rng = np.random.default_rng(1)
    w = rng.standard_normal((rows, width)).astype(np.float32)
    ids = np.array([0, 99, 5, 5, 63, 17], index_dtype)
    if kind == "int4":
        wp = -(-width // 32) * 32
        padded = np.zeros((rows, wp), np.float32)
        padded[:, :width] = w
        packed, scales = quantize_int4_rows(padded, 32)
        ref = dequantize_int4_rows(packed, scales, 32)[:, :width]
    else:
        wp = width
        packed, scales = quantize_int8_rows(w)
        ref = dequantize_int8_rows(packed, scales)
    f = embedding_gather(kind, rows, width, len(ids), 32, wp, index_dtype)
    got = _run_kernel(f, ids, packed, scales, out_shape=(len(ids), width))
    np.testing.assert_array_equal(got, ref[ids.astype(np.int64)])  # exact: one float32 multiply


@pytest.mark.parametrize("bad", [100, -1, 2**40])
def test_gather_kernel_rejects_ids_out_of_range(bad):
    w = np.random.default_rng(2).standard_normal((100, 32)).astype(np.float32)
    packed, scales = quantize_int4_rows(w, 32)
    f = embedding_gather("int4", 100, 32, 3)
    with pytest.raises(Exception, match=ERROR):
        _run_kernel(f, np.array([1, bad, 2], np.int64), packed, scales, out_shape=(3, 32))


# ----------------------------------------------------------------------------- the rewrite


def _embed_module(n_ids, rows, width, ids_shape=None):
    ids_shape = ids_shape or (n_ids,)
    bb = relax.BlockBuilder()
    ids = relax.Var("token_ids", relax.TensorType(ids_shape, "int64"))
    table = relax.Var("language_model_model_embed_tokens_weight", relax.TensorType((rows, width), "float32"))
    pos = relax.Var("vision_tower_pos_weight", relax.TensorType((rows, width), "float32"))
    with bb.function("embed", [ids, table, pos], attrs={"num_input": 1}):
        with bb.dataflow():
            e = bb.emit(relax.op.take(table, ids, axis=0, mode="fast"))
            p = bb.emit(relax.op.take(pos, ids, axis=0, mode="fast"))  # a vision table stays fp32
            out = bb.emit_output(relax.op.add(e, p))
        bb.emit_func_output(out)
    return bb.get()


def _expected(kind, n_ids, rows, width, ids_shape=None):
    ids_shape = ids_shape or (n_ids,)
    if kind == "int4":
        parts = [("language_model_model_embed_tokens_weight_int4_rows_packed", (rows, width // 2), "uint8"),
                 ("language_model_model_embed_tokens_weight_int4_rows_scales", (rows, width // 32), "float16")]
        name = f"embedding_gather_int4_{n_ids}x{rows}x{width}_g32"
    else:
        parts = [("language_model_model_embed_tokens_weight_int8_rows_packed", (rows, width), "int8"),
                 ("language_model_model_embed_tokens_weight_int8_rows_scales", (rows,), "float32")]
        name = f"embedding_gather_{kind}_{n_ids}x{rows}x{width}"
    bb = relax.BlockBuilder()
    ids = relax.Var("token_ids", relax.TensorType(ids_shape, "int64"))
    new = [relax.Var(n, relax.TensorType(s, d)) for n, s, d in parts]
    pos = relax.Var("vision_tower_pos_weight", relax.TensorType((rows, width), "float32"))
    with bb.function("embed", [ids, *new, pos], attrs={"num_input": 1}):
        with bb.dataflow():
            flat = ids if len(ids_shape) == 1 else bb.emit(relax.op.reshape(ids, relax.ShapeExpr([n_ids])))
            gv = bb.add_func(embedding_gather(kind, rows, width, n_ids), name)
            e = relax.call_tir(gv, relax.Tuple([flat, *new]), relax.TensorType((n_ids, width), "float32"))
            if len(ids_shape) != 1:
                e = relax.op.reshape(bb.emit(e), relax.ShapeExpr([*ids_shape, width]))
            e = bb.emit(e)
            p = bb.emit(relax.op.take(pos, ids, axis=0, mode="fast"))
            out = bb.emit_output(relax.op.add(e, p))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("quant,kind", [("w4a16kv8", "int4"), ("w8", "int8")])
@pytest.mark.parametrize("ids_shape", [(4,), (1, 4)])
def test_golden_take_becomes_gather(quant, kind, ids_shape):
    after = QuantizeWeights(quant, roles=role)(_embed_module(4, 64, 64, ids_shape))
    table, stats = quantized_params(after), pass_stats(after)["QuantizeWeights"]
    tvm.ir.assert_structural_equal(without_results(after), _expected(kind, 4, 64, 64, ids_shape))
    assert {t.quantizer for t in table.values()} == {f"{kind}_rows"}
    assert stats["embedding_tables_quantized"] == 1 and stats[f"{kind}_embedding_lookups"] == 1
    assert stats["embedding_bytes_stored"] < stats["embedding_bytes_fp32"] == 4 * 64 * 64


def test_table_with_another_use_is_left_alone():
    bb = relax.BlockBuilder()
    ids = relax.Var("token_ids", relax.TensorType((4,), "int64"))
    table = relax.Var("language_model_model_embed_tokens_weight", relax.TensorType((64, 64), "float32"))
    with bb.function("embed", [ids, table], attrs={"num_input": 1}):
        with bb.dataflow():
            e = bb.emit(relax.op.take(table, ids, axis=0))
            out = bb.emit_output(relax.op.add(e, relax.op.sum(table, axis=[0])))
        bb.emit_func_output(out)
    before = bb.get()
    tvm.ir.assert_structural_equal(without_results(QuantizeWeights("w4a16", roles=role)(before)), before)


@pytest.mark.parametrize("quant", ["w8", "w4a16kv8"])
def test_rewritten_lookup_runs_and_equals_dequantized_rows(quant):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    pos = rng.standard_normal((64, 64)).astype(np.float32)
    ids = np.array([3, 63, 0, 3], np.int64)
    mod = QuantizeWeights(quant, roles=role)(_embed_module(4, 64, 64))
    table = quantized_params(mod)
    produce = param_producer({n.replace(".", "_"): t for n, t in table.items()},
                             {"language_model_model_embed_tokens_weight": w, "vision_tower_pos_weight": pos}.__getitem__)
    args = [ids] + [produce(p.name) for p in mod["embed"].params[1:]]
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    got = vm["embed"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    kind = "int8" if quant == "w8" else "int4"
    packed, scales = (produce(f"language_model_model_embed_tokens_weight_{kind}_rows_{s}") for s in ("packed", "scales"))
    deq = dequantize_int8_rows(packed, scales) if kind == "int8" else dequantize_int4_rows(packed, scales, 32)
    np.testing.assert_array_equal(got, deq[ids] + pos[ids])


def test_onnx_import_lookup_is_rewritten():
    """The ONNX frontend's Gather (ids made non-negative by a where) is matched too."""
    from bluelower.lowering.frontend.importer import import_model
    from bluelower.lowering.models import load_config, spec_for

    cfg = load_config("tiny")
    mod, _ = import_model(cfg, "onnx")
    after = QuantizeWeights("w4a16kv8", roles=spec_for(cfg).weight_role)(mod)
    table = quantized_params(after)
    for fn in ("embed", "decode"):
        text = after[fn].script(show_meta=False)
        assert "embed_tokens_weight_int4_rows_packed" in text and "embedding_gather_int4" in text, fn
        assert "m_language_model_model_embed_tokens_weight:" not in text
    assert {t.source for t in table.values() if t.quantizer == "int4_rows"} == {EMBED}


# ----------------------------------------------------------------------------- a tiny build


@pytest.fixture(scope="module")
def tiny_build(build_tiny):
    return build_tiny("w4a16kv8")


def test_build_stores_the_quantized_table_and_memory_counts_it(tiny_build):
    from bluelower.lowering.models import load_config
    from bluelower.lowering.frontend.weights import WeightSource
    from bluelower.lowering.artifacts.memory_table import weight_bytes

    out, _ = tiny_build
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    params = WeightSource(os.path.join(out, "params.safetensors"))
    assert EMBED not in params.names()  # no fp32 table in the bundle
    emb = {n: (params.shape(n), params.dtype(n)) for n in params.names() if n.startswith(EMBED + ".")}
    # the default recipe: the table's lookups INT4 asymmetric (scale + min per group of 32)
    assert emb == {EMBED + ".int4_asym_rows_packed": ((512, 32), np.dtype("uint8")),
                   EMBED + ".int4_asym_rows_scales": ((512, 2), np.dtype("float16")),
                   EMBED + ".int4_asym_rows_mins": ((512, 2), np.dtype("float16"))}
    stored = sum(int(np.prod(s)) * d.itemsize for s, d in emb.values())
    cfg = load_config("tiny")
    assert stored == weight_bytes(cfg, "w4a16kv8")[0][EMBED] == 512 * 64 // 2 + 2 * 512 * 2 * 2
    # the manifest: the pass's stats, the transform table, the per-call reads (one row per id)
    stats = next(p["stats"] for p in manifest["passes"] if p["name"] == "QuantizeWeights")
    assert stats["embedding_tables_quantized"] == 1 and stats["int4_asym_embedding_lookups"] == 2  # embed + decode
    assert stats["embedding_bytes_stored"] == stored and stats["embedding_bytes_fp32"] == 512 * 64 * 4
    assert manifest["quantization"]["params"][EMBED + ".int4_asym_rows_packed"] == [
        EMBED, "int4_asym_rows", {"group_size": 32, "search": True}]
    for fn in ("embed", "decode"):
        assert EMBED + ".int4_asym_rows_packed" in manifest["functions"][fn]["params"]
    lm_head = 512 * 64 + 512 * 4  # INT8 per row: decode reads lm_head whole but only 1 embedding row
    dec = manifest["functions"]["decode"]["weights_bytes_per_call"]
    emb_fn = manifest["functions"]["embed"]["weights_bytes_per_call"]
    assert emb_fn == 64 * (32 + 2 * 2 + 2 * 2)  # chunk 64 ids x (packed row + scales row + mins row)
    assert dec > lm_head


def test_lowered_ir_gathers_from_the_quantized_rows(tiny_build):
    _, ir = tiny_build
    last = sorted(os.listdir(ir))[-1]
    text = open(os.path.join(ir, last)).read()
    assert "embedding_gather_int4_asym_64x512x64_g32" in text and "embedding_gather_int4_asym_1x512x64_g32" in text
    assert "language_model_model_embed_tokens_weight:" not in text


def test_cli_run_check_on_the_build(tiny_build):
    from click.testing import CliRunner

    from bluelower.cli import cli

    out, _ = tiny_build
    result = CliRunner().invoke(cli, ["-q", "run", out, "--prompt-ids", "1,2,3,40,77,511", "--max-new-tokens", "8",
                                      "--check", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["match"] is True and data["tokens"] == data["reference_tokens"]


def test_out_of_range_prompt_is_one_line_error(tiny_build):
    from click.testing import CliRunner

    from bluelower.cli import cli

    out, _ = tiny_build
    result = CliRunner().invoke(cli, ["-q", "run", out, "--prompt-ids", "1,512", "--max-new-tokens", "2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "[0, 512)" in result.output


def test_schedule_cost_reads_only_the_gathered_rows():
    from bluelower.passes.schedule_operators import _read_bytes

    mod = QuantizeWeights("w4a16kv8", roles=role)(_embed_module(4, 64, 64))
    func = mod["embed"]
    call = next(b.value for blk in func.body.blocks for b in blk.bindings
                if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)
                and b.value.op.name == "relax.call_tir")
    packed, scales = func.params[1], func.params[2]
    assert _read_bytes(call, packed) == 4 * 32  # 4 rows of 64 nibbles, not the 64-row table
    assert _read_bytes(call, scales) == 4 * 2 * 2
