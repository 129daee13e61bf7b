"""FuseAttention: golden rewrites, numerics against the unfused graph, counts on the model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tvm
import tvm.testing
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from bluelower.lowering.kernels.attention import fused_attention
from bluelower.passes.fuse_attention import FuseAttention
from bluelower.passes.ir_utils import without_results


def _with_kernel(mod: tvm.IRModule, name: str, kernel) -> tvm.IRModule:
    """Expected modules declare the kernel as a stub; put the real builder output in."""
    mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions_items()))
    mod.update_func(mod.get_global_var(name), kernel)
    return mod


# --- bidirectional multi-head attention (the SigLIP shape) -----------------------------


@I.ir_module
class Bidirectional:
    @R.function
    def main(q: R.Tensor((1, 2, 8, 4), "float32"), k: R.Tensor((1, 2, 8, 4), "float32"),
             v: R.Tensor((1, 2, 8, 4), "float32")) -> R.Tensor((1, 2, 8, 4), "float32"):
        with R.dataflow():
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            scores = R.matmul(q, kt)
            scaled = R.multiply(scores, R.const(0.5, "float32"))
            probs = R.nn.softmax(scaled, axis=-1)
            out = R.matmul(probs, v)
            R.output(out)
        return out


@I.ir_module
class BidirectionalExpected:
    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((2, 8, 4), "float32"), k: T.Buffer((1, 2, 8, 4), "float32"),
                        v: T.Buffer((1, 2, 8, 4), "float32"), out: T.Buffer((2, 8, 4), "float32")):
        T.evaluate(0)  # stub: replaced by the kernel builder's output

    @R.function
    def main(q: R.Tensor((1, 2, 8, 4), "float32"), k: R.Tensor((1, 2, 8, 4), "float32"),
             v: R.Tensor((1, 2, 8, 4), "float32")) -> R.Tensor((1, 2, 8, 4), "float32"):
        cls = BidirectionalExpected
        with R.dataflow():
            q3 = R.reshape(q, R.shape([2, 8, 4]))
            rows = R.call_tir(cls.fused_attention, (q3, k, v), out_ty=R.Tensor((2, 8, 4), "float32"))
            out = R.reshape(rows, R.shape([1, 2, 8, 4]))
            R.output(out)
        return out


def test_bidirectional_golden():
    after = FuseAttention()(Bidirectional)
    kernel = fused_attention(rows=2, q_heads=2, rep=1, q_len=8, head_dim=4, kv_len=8, k_shape=(1, 2, 8, 4),
                             k_prefix=(), v_shape=(1, 2, 8, 4), v_prefix=(), scale=0.5)
    tvm.ir.assert_structural_equal(without_results(after), _with_kernel(BidirectionalExpected, "fused_attention", kernel))


# --- GQA over a KV cache with the causal mask (the decoder's decode step) --------------


@I.ir_module
class CachedGQA:
    @R.function
    def main(q: R.Tensor((4, 2, 4), "float32"), cache: R.Tensor((2, 2, 2, 8, 4), "float32"),
             pos: R.Tensor((2,), "int64")) -> R.Tensor((4, 2, 4), "float32"):
        with R.dataflow():
            layer = R.take(cache, R.const(1, "int64"), axis=0)
            keys = R.take(layer, R.const(0, "int64"), axis=0)
            values = R.take(layer, R.const(1, "int64"), axis=0)
            k1 = R.expand_dims(keys, axis=[1])
            k2 = R.broadcast_to(k1, R.shape([2, 2, 8, 4]))
            k3 = R.reshape(k2, R.shape([4, 8, 4]))
            v1 = R.expand_dims(values, axis=[1])
            v2 = R.broadcast_to(v1, R.shape([2, 2, 8, 4]))
            v3 = R.reshape(v2, R.shape([4, 8, 4]))
            kt = R.permute_dims(k3, axes=[0, 2, 1])
            scores = R.matmul(q, kt)
            scaled = R.multiply(scores, R.const(0.5, "float32"))
            key_pos = R.expand_dims(R.arange(0, 8, 1, dtype="int64"), axis=[0])
            query_pos = R.expand_dims(pos, axis=[1])
            allowed = R.less_equal(key_pos, query_pos)
            masked = R.logical_not(allowed)
            scores_m = R.where(masked, R.const(float("-inf"), "float32"), scaled)
            probs = R.nn.softmax(scores_m, axis=-1)
            out = R.matmul(probs, v3)
            R.output(out)
        return out


@I.ir_module
class CachedGQAExpected:
    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((4, 2, 4), "float32"), k: T.Buffer((2, 2, 2, 8, 4), "float32"),
                        v: T.Buffer((2, 2, 2, 8, 4), "float32"), pos: T.Buffer((2,), "int64"),
                        out: T.Buffer((4, 2, 4), "float32")):
        T.evaluate(0)  # stub: replaced by the kernel builder's output

    @R.function
    def main(q: R.Tensor((4, 2, 4), "float32"), cache: R.Tensor((2, 2, 2, 8, 4), "float32"),
             pos: R.Tensor((2,), "int64")) -> R.Tensor((4, 2, 4), "float32"):
        cls = CachedGQAExpected
        with R.dataflow():
            # K and V straight from the cache (layer 1, k / v), no repeat, keys 0..pos[t] only
            out = R.call_tir(cls.fused_attention, (q, cache, cache, pos), out_ty=R.Tensor((4, 2, 4), "float32"))
            R.output(out)
        return out


def _gqa_kernel():
    return fused_attention(rows=4, q_heads=4, rep=2, q_len=2, head_dim=4, kv_len=8, k_shape=(2, 2, 2, 8, 4),
                           k_prefix=(1, 0), v_shape=(2, 2, 2, 8, 4), v_prefix=(1, 1), scale=0.5, causal=True)


def test_cached_gqa_causal_golden():
    after = FuseAttention()(CachedGQA)
    tvm.ir.assert_structural_equal(without_results(after), _with_kernel(CachedGQAExpected, "fused_attention", _gqa_kernel()))
    loops = str(_gqa_kernel())
    # the key loop is bounded by the positions (the task's 2 query rows), not the capacity
    bound = 'T.min(T.max(T.Cast("int32", pos[0]), T.Cast("int32", pos[1])) + 1, 8)'
    assert f"for blk in range(({bound} + 63) // 64)" in loops
    assert f"for j in range(T.min(64, {bound} - blk * 64))" in loops


def test_unmatched_graph_is_left_alone():
    @I.ir_module
    class NoSoftmax:
        @R.function
        def main(a: R.Tensor((2, 4), "float32"), b: R.Tensor((4, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                c = R.matmul(a, b)
                R.output(c)
            return c

    tvm.ir.assert_structural_equal(without_results(FuseAttention()(NoSoftmax)), NoSoftmax)


# --- the forms of other people's code (each as the importer writes it) --------------------
#
# Shapes: batch 1, 4 query heads, 8 positions, head_dim 16; GQA forms have 2 KV heads.

NEG_INF = float("-inf")
CAUSAL_POS = np.arange(8, dtype="int64")  # the bound of an input-free causal mask: keys 0 .. t
TRIU = np.triu(np.ones((8, 8), bool), 1)  # the ONNX import's constant "masked" condition


def _golden(before, expected, **kernel):
    after = FuseAttention()(before)
    args = dict(rows=4, q_heads=4, rep=1, q_len=8, head_dim=16, kv_len=8, k_shape=(1, 4, 8, 16), k_prefix=(),
                v_shape=(1, 4, 8, 16), v_prefix=(), scale=0.25)
    args.update(kernel)
    tvm.ir.assert_structural_equal(without_results(after), _with_kernel(expected, "fused_attention", fused_attention(**args)))
    return after


@I.ir_module
class EagerGQAMaskInput:  # transformers' eager_attention_forward: repeat_kv on K and V, + attention_mask
    @R.function
    def main(q: R.Tensor((1, 4, 8, 16), "float32"), k: R.Tensor((1, 2, 8, 16), "float32"),
             v: R.Tensor((1, 2, 8, 16), "float32"), mask: R.Tensor((1, 1, 8, 8), "float32")):
        with R.dataflow():
            k1 = R.expand_dims(k, axis=[2])
            k2 = R.broadcast_to(k1, R.shape([1, 2, 2, 8, 16]))
            k3 = R.reshape(k2, R.shape([1, 4, 8, 16]))
            v1 = R.expand_dims(v, axis=[2])
            v2 = R.broadcast_to(v1, R.shape([1, 2, 2, 8, 16]))
            v3 = R.reshape(v2, R.shape([1, 4, 8, 16]))
            kt = R.permute_dims(k3, axes=[0, 1, 3, 2])
            q1 = R.broadcast_to(q, R.shape([1, 4, 8, 16]))  # TVM's 4-D matmul: broadcast + reshape to 3-D
            q2 = R.reshape(q1, R.shape([4, 8, 16]))
            kt1 = R.broadcast_to(kt, R.shape([1, 4, 16, 8]))
            kt2 = R.reshape(kt1, R.shape([4, 16, 8]))
            s = R.matmul(q2, kt2, out_dtype="float32")
            s4 = R.reshape(s, R.shape([1, 4, 8, 8]))
            scaled = R.multiply(s4, R.const(0.25, "float32"))
            masked = R.add(scaled, mask)
            p = R.nn.softmax(masked, axis=-1)
            p1 = R.broadcast_to(p, R.shape([1, 4, 8, 8]))
            p2 = R.reshape(p1, R.shape([4, 8, 8]))
            v4 = R.broadcast_to(v3, R.shape([1, 4, 8, 16]))  # the V repeat behind the matmul's reshape
            v5 = R.reshape(v4, R.shape([4, 8, 16]))
            o = R.matmul(p2, v5, out_dtype="float32")
            out = R.reshape(o, R.shape([1, 4, 8, 16]))
            R.output(out)
        return out


@I.ir_module
class EagerGQAMaskInputExpected:
    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((4, 8, 16), "float32"), k: T.Buffer((1, 2, 8, 16), "float32"),
                        v: T.Buffer((1, 2, 8, 16), "float32"), mask: T.Buffer((1, 1, 8, 8), "float32"),
                        out: T.Buffer((4, 8, 16), "float32")):
        T.evaluate(0)

    @R.function
    def main(q: R.Tensor((1, 4, 8, 16), "float32"), k: R.Tensor((1, 2, 8, 16), "float32"),
             v: R.Tensor((1, 2, 8, 16), "float32"), mask: R.Tensor((1, 1, 8, 8), "float32")):
        cls = EagerGQAMaskInputExpected
        with R.dataflow():
            # K and V un-repeated (rep 2), the mask the kernel's additive mask
            q3 = R.reshape(q, R.shape([4, 8, 16]))
            o = R.call_tir(cls.fused_attention, (q3, k, v, mask), out_ty=R.Tensor((4, 8, 16), "float32"))
            out = R.reshape(o, R.shape([1, 4, 8, 16]))
            R.output(out)
        return out


def test_eager_gqa_with_mask_input_golden():
    _golden(EagerGQAMaskInput, EagerGQAMaskInputExpected, rep=2, k_shape=(1, 2, 8, 16), v_shape=(1, 2, 8, 16),
            additive_mask=(1, 1, 8, 8))


@I.ir_module
class SdpaIsCausal:  # torch.export's decomposition of scaled_dot_product_attention(is_causal=True)
    @R.function
    def main(q: R.Tensor((1, 4, 8, 16), "float32"), k: R.Tensor((1, 4, 8, 16), "float32"),
             v: R.Tensor((1, 4, 8, 16), "float32")):
        with R.dataflow():
            qs = R.multiply(q, R.const(0.5, "float32"))  # sqrt(scale) on q ...
            ones = R.full(R.shape([8, 8]), R.const(True, "bool"), dtype="bool")
            kpos = R.expand_dims(R.arange(0, 8, 1, dtype="int64"), axis=[-2])
            qpos = R.expand_dims(R.arange(0, 8, 1, dtype="int64"), axis=[-1])
            lower = R.less_equal(R.subtract(kpos, qpos), R.const(0, "int64"))
            allowed = R.logical_and(lower, ones)
            bias = R.where(allowed, R.const(0.0, "float32"), R.const(NEG_INF, "float32"))
            kt = R.permute_dims(k, axes=[0, 1, 3, 2])
            kts = R.multiply(kt, R.const(0.5, "float32"))  # ... and on kᵀ
            s = R.matmul(R.reshape(R.broadcast_to(qs, R.shape([1, 4, 8, 16])), R.shape([4, 8, 16])),
                         R.reshape(R.broadcast_to(kts, R.shape([1, 4, 16, 8])), R.shape([4, 16, 8])), out_dtype="float32")
            scores = R.add(R.reshape(s, R.shape([1, 4, 8, 8])), bias)
            p = R.nn.softmax(scores, axis=-1)
            # rows masked everywhere are 0 (not NaN)
            full = R.logical_not(R.astype(R.max(R.astype(R.logical_not(R.equal(scores, R.const(NEG_INF, "float32"))),
                                                          "int8"), axis=[-1], keepdims=True), "bool"))
            p0 = R.where(full, R.full_like(p, R.const(0.0, "float32")), p)
            o = R.matmul(R.reshape(R.broadcast_to(p0, R.shape([1, 4, 8, 8])), R.shape([4, 8, 8])),
                         R.reshape(R.broadcast_to(v, R.shape([1, 4, 8, 16])), R.shape([4, 8, 16])), out_dtype="float32")
            out = R.reshape(o, R.shape([1, 4, 8, 16]))
            R.output(out)
        return out


@I.ir_module
class SdpaIsCausalExpected:
    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((4, 8, 16), "float32"), k: T.Buffer((1, 4, 8, 16), "float32"),
                        v: T.Buffer((1, 4, 8, 16), "float32"), pos: T.Buffer((8,), "int64"),
                        out: T.Buffer((4, 8, 16), "float32")):
        T.evaluate(0)

    @R.function
    def main(q: R.Tensor((1, 4, 8, 16), "float32"), k: R.Tensor((1, 4, 8, 16), "float32"),
             v: R.Tensor((1, 4, 8, 16), "float32")):
        cls = SdpaIsCausalExpected
        with R.dataflow():
            # the input-free mask evaluated at compile time: keys 0 .. t (the causal bound), scale 0.5 * 0.5
            q3 = R.reshape(q, R.shape([4, 8, 16]))
            o = R.call_tir(cls.fused_attention, (q3, k, v, R.const(CAUSAL_POS, "int64")),
                           out_ty=R.Tensor((4, 8, 16), "float32"))
            out = R.reshape(o, R.shape([1, 4, 8, 16]))
            R.output(out)
        return out


def test_sdpa_is_causal_golden():
    _golden(SdpaIsCausal, SdpaIsCausalExpected, causal=True)


@I.ir_module
class SdpaBoolMask:  # scaled_dot_product_attention(attn_mask=<bool input>), decomposed
    @R.function
    def main(q: R.Tensor((1, 4, 8, 16), "float32"), k: R.Tensor((1, 4, 8, 16), "float32"),
             v: R.Tensor((1, 4, 8, 16), "float32"), m: R.Tensor((1, 1, 8, 8), "bool")):
        with R.dataflow():
            bias = R.where(m, R.const(0.0, "float32"), R.const(NEG_INF, "float32"))
            qs = R.multiply(q, R.const(0.5, "float32"))
            kts = R.multiply(R.permute_dims(k, axes=[0, 1, 3, 2]), R.const(0.5, "float32"))
            s = R.matmul(R.reshape(qs, R.shape([4, 8, 16])), R.reshape(kts, R.shape([4, 16, 8])), out_dtype="float32")
            scores = R.add(R.reshape(s, R.shape([1, 4, 8, 8])), bias)
            p = R.nn.softmax(scores, axis=-1)
            o = R.matmul(R.reshape(p, R.shape([4, 8, 8])), R.reshape(v, R.shape([4, 8, 16])), out_dtype="float32")
            out = R.reshape(o, R.shape([1, 4, 8, 16]))
            R.output(out)
        return out


@I.ir_module
class SdpaBoolMaskExpected:
    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((4, 8, 16), "float32"), k: T.Buffer((1, 4, 8, 16), "float32"),
                        v: T.Buffer((1, 4, 8, 16), "float32"), mask: T.Buffer((1, 1, 8, 8), "float32"),
                        out: T.Buffer((4, 8, 16), "float32")):
        T.evaluate(0)

    @R.function
    def main(q: R.Tensor((1, 4, 8, 16), "float32"), k: R.Tensor((1, 4, 8, 16), "float32"),
             v: R.Tensor((1, 4, 8, 16), "float32"), m: R.Tensor((1, 1, 8, 8), "bool")):
        cls = SdpaBoolMaskExpected
        with R.dataflow():
            # a mask of the inputs: the graph's own additive form is the kernel's mask
            bias = R.where(m, R.const(0.0, "float32"), R.const(NEG_INF, "float32"))
            q3 = R.reshape(q, R.shape([4, 8, 16]))
            o = R.call_tir(cls.fused_attention, (q3, k, v, bias), out_ty=R.Tensor((4, 8, 16), "float32"))
            out = R.reshape(o, R.shape([1, 4, 8, 16]))
            R.output(out)
        return out


def test_sdpa_bool_mask_golden():
    _golden(SdpaBoolMask, SdpaBoolMaskExpected, additive_mask=(1, 1, 8, 8))


@I.ir_module
class OnnxTrilGQA:  # the ONNX import: constant masked condition, K repeated then transposed, NaN fix-up
    @R.function
    def main(q: R.Tensor((1, 4, 8, 16), "float32"), k: R.Tensor((1, 2, 8, 16), "float32"),
             v: R.Tensor((1, 2, 8, 16), "float32")):
        with R.dataflow():
            k3 = R.reshape(R.broadcast_to(R.expand_dims(k, axis=[2]), R.shape([1, 2, 2, 8, 16])), R.shape([1, 4, 8, 16]))
            v3 = R.reshape(R.broadcast_to(R.expand_dims(v, axis=[2]), R.shape([1, 2, 2, 8, 16])), R.shape([1, 4, 8, 16]))
            s = R.matmul(q, R.permute_dims(k3, axes=[0, 1, 3, 2]), )
            scaled = R.divide(s, R.const(4.0, "float32"))
            masked = R.where(R.const(TRIU, "bool"), R.const(NEG_INF, "float32"), scaled)
            p = R.nn.softmax(masked, axis=-1)
            p0 = R.where(R.isnan(p), R.const(0.0, "float32"), p)
            out = R.matmul(p0, v3, )
            R.output(out)
        return out


@I.ir_module
class OnnxTrilGQAExpected:
    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((4, 8, 16), "float32"), k: T.Buffer((1, 2, 8, 16), "float32"),
                        v: T.Buffer((1, 2, 8, 16), "float32"), pos: T.Buffer((8,), "int64"),
                        out: T.Buffer((4, 8, 16), "float32")):
        T.evaluate(0)

    @R.function
    def main(q: R.Tensor((1, 4, 8, 16), "float32"), k: R.Tensor((1, 2, 8, 16), "float32"),
             v: R.Tensor((1, 2, 8, 16), "float32")):
        cls = OnnxTrilGQAExpected
        with R.dataflow():
            q3 = R.reshape(q, R.shape([4, 8, 16]))
            o = R.call_tir(cls.fused_attention, (q3, k, v, R.const(CAUSAL_POS, "int64")),
                           out_ty=R.Tensor((4, 8, 16), "float32"))
            out = R.reshape(o, R.shape([1, 4, 8, 16]))
            R.output(out)
        return out


def test_onnx_constant_causal_mask_gqa_golden():
    _golden(OnnxTrilGQA, OnnxTrilGQAExpected, rep=2, k_shape=(1, 2, 8, 16), v_shape=(1, 2, 8, 16), causal=True)


@I.ir_module
class CachedMHAStrict:  # MHA over the cache (no broadcast: expand_dims + reshape), causal as key < pos[t]
    @R.function
    def main(q: R.Tensor((2, 2, 4), "float32"), cache: R.Tensor((2, 2, 2, 8, 4), "float32"),
             pos: R.Tensor((2,), "int64")):
        with R.dataflow():
            keys = R.take(R.take(cache, R.const(1, "int64"), axis=0), R.const(0, "int64"), axis=0)
            values = R.take(R.take(cache, R.const(1, "int64"), axis=0), R.const(1, "int64"), axis=0)
            k3 = R.reshape(R.expand_dims(keys, axis=[1]), R.shape([2, 8, 4]))
            v3 = R.reshape(R.expand_dims(values, axis=[1]), R.shape([2, 8, 4]))
            scores = R.multiply(R.matmul(q, R.permute_dims(k3, axes=[0, 2, 1])), R.const(0.5, "float32"))
            key_pos = R.expand_dims(R.arange(0, 8, 1, dtype="int64"), axis=[0])
            allowed = R.less(key_pos, R.expand_dims(pos, axis=[1]))  # keys strictly before pos[t]
            p = R.nn.softmax(R.where(allowed, scores, R.const(-3.4028234663852886e38, "float32")), axis=-1)
            out = R.matmul(p, v3)
            R.output(out)
        return out


@I.ir_module
class CachedMHAStrictExpected:
    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((2, 2, 4), "float32"), k: T.Buffer((2, 2, 2, 8, 4), "float32"),
                        v: T.Buffer((2, 2, 2, 8, 4), "float32"), pos: T.Buffer((2,), "int64"),
                        out: T.Buffer((2, 2, 4), "float32")):
        T.evaluate(0)

    @R.function
    def main(q: R.Tensor((2, 2, 4), "float32"), cache: R.Tensor((2, 2, 2, 8, 4), "float32"),
             pos: R.Tensor((2,), "int64")):
        cls = CachedMHAStrictExpected
        with R.dataflow():
            # straight from the cache (rep 1); key < pos[t] is key <= pos[t] - 1
            bound = R.add(pos, R.const(-1, "int64"))
            out = R.call_tir(cls.fused_attention, (q, cache, cache, bound), out_ty=R.Tensor((2, 2, 4), "float32"))
            R.output(out)
        return out


def test_cached_mha_with_strict_causal_golden():
    _golden(CachedMHAStrict, CachedMHAStrictExpected, rows=2, q_heads=2, rep=1, q_len=2, head_dim=4, kv_len=8,
            k_shape=(2, 2, 2, 8, 4), k_prefix=(1, 0), v_shape=(2, 2, 2, 8, 4), v_prefix=(1, 1), scale=0.5, causal=True)


@I.ir_module
class PerHeadBias:
    @R.function
    def main(q: R.Tensor((1, 4, 8, 16), "float32"), k: R.Tensor((1, 4, 8, 16), "float32"),
             v: R.Tensor((1, 4, 8, 16), "float32"), bias: R.Tensor((1, 4, 8, 8), "float32")):
        with R.dataflow():
            s = R.multiply(R.matmul(q, R.permute_dims(k, axes=[0, 1, 3, 2])), R.const(0.25, "float32"))
            p = R.nn.softmax(R.add(s, bias), axis=-1)
            out = R.matmul(p, v)
            R.output(out)
        return out


def test_unsupported_mask_is_reported_and_left_alone():
    after = FuseAttention()(PerHeadBias)
    tvm.ir.assert_structural_equal(without_results(after), PerHeadBias)
    from bluelower.passes.instruments import pass_stats

    assert pass_stats(after)["FuseAttention"] == {
        "fused": 0, "per_function": {},
        "unmatched": ["main/out: a per-head or per-batch mask [1, 4, 8, 8] (the kernel takes one [8, 8] mask for all heads)"]}


_NEW_FORMS = {"eager_gqa_mask_input": EagerGQAMaskInput, "sdpa_is_causal": SdpaIsCausal, "sdpa_bool_mask": SdpaBoolMask,
              "onnx_tril_gqa": OnnxTrilGQA, "cached_mha_strict": CachedMHAStrict}


@pytest.mark.parametrize("name", list(_NEW_FORMS))
def test_new_forms_fused_match_unfused(name):
    mod = _NEW_FORMS[name]
    rng = np.random.default_rng(1)
    args = []
    for p in mod["main"].params:
        shape, dtype = [int(d) for d in p.ty.shape.values], str(p.ty.dtype)
        if dtype == "bool":
            keep = rng.random(shape) > 0.4
            keep[..., 0] = True
            args.append(keep)
        elif dtype == "int64":
            args.append(np.array([3, 7], np.int64))
        else:
            args.append(rng.standard_normal(shape).astype(np.float32))
    fused = FuseAttention()(mod)
    assert sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in fused.functions_items()) == 1
    np.testing.assert_allclose(_run(fused, *args), _run(mod, *args), rtol=1e-5, atol=1e-5)


# --- numerics: fused == unfused ----------------------------------------------------------


def _run(mod, *args):
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


@pytest.mark.parametrize("case", ["bidirectional", "cached_gqa"])
def test_fused_matches_unfused(case):
    rng = np.random.default_rng(0)
    if case == "bidirectional":
        mod = Bidirectional
        args = [rng.standard_normal((1, 2, 8, 4)).astype(np.float32) for _ in range(3)]
    else:
        mod = CachedGQA
        args = [rng.standard_normal((4, 2, 4)).astype(np.float32),
                rng.standard_normal((2, 2, 2, 8, 4)).astype(np.float32), np.array([3, 6], np.int64)]
    fused = FuseAttention()(mod)
    assert any(isinstance(f, tvm.tirx.PrimFunc) for _, f in fused.functions_items())
    np.testing.assert_allclose(_run(fused, *args), _run(mod, *args), rtol=1e-5, atol=1e-5)


# --- counts on the model: one fused kernel per attention layer, per entry function -----


def _pass_stats(build_dir: str, name: str) -> dict:
    with open(os.path.join(build_dir, "manifest.json")) as fh:
        passes = json.load(fh)["passes"]
    return next(p["stats"] for p in passes if p["name"] == name)


@pytest.mark.parametrize("fixture", ["tiny_build_torch", "tiny_build_onnx"])
def test_tiny_build_fuses_every_attention(fixture, request):
    from bluelower.lowering.models import load_config

    cfg = load_config("tiny")
    stats = _pass_stats(request.getfixturevalue(fixture), "FuseAttention")
    layers = {"encode_image": cfg.vision.num_layers, "prefill": cfg.decoder.num_layers,
              "decode": cfg.decoder.num_layers}
    assert stats["per_function"] == layers
    assert stats["fused"] == sum(layers.values())
