"""ShareLayerKernels: the per-layer attention / KV-write kernels become one generic kernel per
shape called with the layer as an argument; the build computes exactly what it did before."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx

from bluelower.runtime_stubs.generate import CompiledModel
from bluelower.lowering.artifacts.compile import CompileRequest, compile_model
from bluelower.lowering.kernels import attention
from bluelower.lowering.kernels.attention import fused_attention, generic_kernel, kv_cache_write
from bluelower.passes.share_layer_kernels import ShareLayerKernels

CACHE = (2, 2, 1, 8, 4)  # [layers, k/v, kv heads, capacity, head dim]
ATT = dict(rows=2, q_heads=2, rep=2, head_dim=4, kv_len=8, k_shape=CACHE, v_shape=CACHE, scale=0.5, causal=True)


def _decoder_like(kernel_for, q_len=1):
    """Per layer: an in-place cache write, then an attention reading that layer of the cache
    (``q_len`` positions). ``kernel_for(kind, layer, func)`` -> (PrimFunc, name, extra call arguments)."""
    update = (2, 1, q_len, 4)
    bb = relax.BlockBuilder()
    cache = relax.Var("cache", relax.TensorType(CACHE, "float32"))
    index = relax.Var("index", relax.TensorType(update, "int64"))
    rows = relax.Var("rows", relax.TensorType(update, "float32"))
    q = relax.Var("q", relax.TensorType((2, q_len, 4), "float32"))
    pos = relax.Var("pos", relax.TensorType((q_len,), "int64"))
    gvs = {}
    with bb.function("main", [cache, index, rows, q, pos]):
        with bb.dataflow():
            cur, outs = cache, []
            for layer in range(2):
                write = kv_cache_write(cache_shape=CACHE, prefix=(layer,), axis=2, update_shape=update)
                att = fused_attention(k_prefix=(layer, 0), v_prefix=(layer, 1), q_len=q_len, **ATT)
                for kind, func in (("write", write), ("attention", att)):
                    f, name, extra = kernel_for(kind, layer, func)
                    if name not in gvs:
                        gvs[name] = bb.add_func(f, name)
                    if kind == "write":
                        cur = bb.emit(relax.call_tir_inplace(gvs[name], [cur, index, rows, *extra], [0], cache.ty))
                    else:
                        outs.append(bb.emit(relax.call_tir(gvs[name], [q, cur, cur, pos, *extra], q.ty)))
            out = bb.emit_output(relax.Tuple([*outs, cur]))
        bb.emit_func_output(out)
    return bb.get()


def _functions(mod):
    """The module without its attrs (where the pass may record statistics)."""
    return tvm.IRModule(dict(mod.functions_items()))


def test_golden():
    before = _decoder_like(lambda kind, layer, func: (func, f"{kind}{layer}", []))

    def shared(kind, layer, func):
        """The generic kernel the builder stamped ``func`` from, scalars before the outputs."""
        stamp = json.loads(str(func.attrs["bluelower.stamp"]))
        generic, pvars = generic_kernel(stamp)
        params = list(generic.params)[: -len(pvars)]
        n_out = 0 if kind == "write" else 1
        params = params[: len(params) - n_out] + list(pvars) + params[len(params) - n_out:]
        f = tirx.PrimFunc(params, generic.body, generic.ret_type, generic.attrs)
        if "bluelower.kernel_args" in f.attrs:
            f = f.without_attr("bluelower.kernel_args")
        return f, f"{kind}_shared", [relax.prim_value(tirx.IntImm("int32", v)) for v in stamp["values"]]

    tvm.ir.assert_structural_equal(_functions(ShareLayerKernels()(before)), _functions(_decoder_like(shared)))


# In a fresh process: parse a module from TVMScript, share, print the result's structural hash
# (stable across processes) and TVMScript. (TVM 0.27's JSON serialization crashes on PrimFuncs.)
_SHARE_IN_NEW_PROCESS = """
import sys
import tvm
import tvm_ffi
from bluelower.passes.share_layer_kernels import ShareLayerKernels
after = ShareLayerKernels()(tvm.script.from_source(open(sys.argv[1]).read()))
after = tvm.IRModule(dict(after.functions_items()))
print(tvm_ffi.structural_hash(after))
print(after.script())
"""


def test_shares_a_module_parsed_in_a_new_process(tmp_path):
    """A module dumped to TVMScript and parsed in a fresh process (where no kernel was ever
    built) is shared exactly as in the process that stamped its kernels. Prefill (q_len 2):
    TVM 0.27 prints a load from a 1-element buffer (decode's ``pos[0]``) as the bare buffer
    name, which it cannot parse back; the next test covers decode."""
    before = _decoder_like(lambda kind, layer, func: (func, f"{kind}{layer}", []), q_len=2)
    expected = _functions(ShareLayerKernels()(before))
    src = tmp_path / "before.py"
    src.write_text(before.script())
    run = subprocess.run([sys.executable, "-c", _SHARE_IN_NEW_PROCESS, str(src)], check=True, capture_output=True,
                         text=True, env={**os.environ, "TVM_NUM_THREADS": "1"})
    got_hash, got_script = run.stdout.split("\n", 1)
    assert got_script.strip() == expected.script().strip()
    assert int(got_hash) == tvm_ffi.structural_hash(expected)
    assert len(expected.functions) < len(before.functions)


@pytest.mark.parametrize("q_len", [1, 2])
def test_shares_without_the_stamping_caches(q_len):
    """Every memo of the stamping builders cleared between stamping and sharing: same result."""
    before = _decoder_like(lambda kind, layer, func: (func, f"{kind}{layer}", []), q_len)
    expected = _functions(ShareLayerKernels()(before))
    for generic in attention._GENERIC_BUILDERS.values():  # pylint: disable=protected-access
        generic.cache_clear()
    tvm.ir.assert_structural_equal(_functions(ShareLayerKernels()(before)), expected)


def test_stamp_of_other_kernel_code_is_left_alone():
    """A stamp whose rebuilt generic kernel is not the stamped one (``id``) is not shared."""
    def tampered(kind, layer, func):
        stamp = json.loads(str(func.attrs["bluelower.stamp"]))
        stamp["id"] = "0" * 16
        return func.with_attr("bluelower.stamp", json.dumps(stamp)), f"{kind}{layer}", []

    before = _decoder_like(tampered)
    tvm.ir.assert_structural_equal(_functions(ShareLayerKernels()(before)), _functions(before))


def _stats(manifest, name):
    return next(p["stats"] for p in manifest["passes"] if p["name"] == name)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = {}
    for label, disabled in (("shared", ()), ("per_layer", ("ShareLayerKernels",))):
        path = str(tmp_path_factory.mktemp(label) / "tiny")
        manifest = compile_model(CompileRequest(model="tiny", out_dir=path, quant="w4a16kv8",
                                                disabled_passes=disabled))
        out[label] = (path, manifest)
    return out


def test_one_kernel_per_shape_and_same_results(builds):
    shared = _stats(builds["shared"][1], "ShareLayerKernels")
    # tiny: 2 layers x (prefill, decode) x (attention, write) per-layer kernels -> 4 shared ones
    assert shared["per_layer_kernels"] == 8 and shared["shared_kernels"] == 4
    assert shared["calls_rewritten"] == 8 and shared["removed"] == 8
    tir_shared = _stats(builds["shared"][1], "AttachGlobalSymbol")["tir_functions"]
    tir_per_layer = _stats(builds["per_layer"][1], "AttachGlobalSymbol")["tir_functions"]
    assert tir_per_layer - tir_shared == 4

    a, b = (CompiledModel(builds[k][0]) for k in ("shared", "per_layer"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(a.chunk,)).astype(np.int64)
    for m in (a, b):
        m.reset_cache()
    rows_a, rows_b = a.embed_chunk(ids), b.embed_chunk(ids)
    assert np.array_equal(rows_a, rows_b)
    assert np.array_equal(a.prefill_chunk(rows_a, 0, 5), b.prefill_chunk(rows_b, 0, 5))
    for step, tok in enumerate((3, 17, 42)):  # decode reads what prefill and earlier steps wrote
        assert np.array_equal(a.decode_step(tok, 5 + step), b.decode_step(tok, 5 + step)), step
