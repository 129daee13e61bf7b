"""Every kernel builder's PrimFunc over a grid of shapes and options, against golden fingerprints.

The fingerprints were recorded before the kernels were refactored (shared builders instead
of near-copies): a refactor must leave every generated function structurally identical
(``tvm_ffi.structural_hash``) and print the same TVMScript (sha256 of ``func.script()``;
``RENAMED`` lists the cases that print one loop variable under another name). A per-layer
(stamped) kernel is fingerprinted without its ``bluelower.stamp`` attr, beside the generic
kernel it was stamped from and the stamp's prefix values. ``QUANT_GOLDEN`` holds the same
for the existing quantizers' output bytes.

Regenerate (only for an intended change of the generated code): run this file with
``python`` and paste the table it prints.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re

import numpy as np
import pytest
import tvm_ffi

from bluelower.lowering.kernels import embedding_gather, fp32_linear, int4_linear, int8_linear
from bluelower.lowering.kernels import attention
from bluelower.lowering.kernels import quant as Q


def _linear_cases():
    out = {}
    for M, gs, od, bias, layout in itertools.product((1, 2, 9), (32, 128), ("float32", "float16"), (False, True),
                                                     ("k1", "k4")):
        out[f"int4_{M}x64x256_g{gs}_{od}_b{int(bias)}_{layout}"] = (int4_linear, (M, 64, 256, gs, od, bias, 4, layout))
    for M, mt, layout in itertools.product((5, 9, 16), (1, 3, 7), ("k1", "k4")):
        out[f"int4_{M}x96x384_g16_mt{mt}_{layout}"] = (int4_linear, (M, 96, 384, 16, "float32", True, mt, layout))
    for M, gs in itertools.product((1, 4), (8, 64)):
        out[f"int4_{M}x32x64_g{gs}"] = (int4_linear, (M, 32, 64, gs, "float16", False, 4, "k1"))
    for M, od, bias, mt in itertools.product((1, 2, 9), ("float32", "float16"), (False, True), (4, 1, 7)):
        if M == 1 and mt != 4:
            continue
        out[f"int8_{M}x64x128_{od}_b{int(bias)}_mt{mt}"] = (int8_linear, (M, 64, 128, od, bias, mt))
    out["int8_3x96x96"] = (int8_linear, (3, 96, 96, "float32", True, 4))
    for M, od, bias in itertools.product((1, 2, 17, 40), ("float32", "float16"), (False, True)):
        out[f"fp32_{M}x64x96_{od}_b{int(bias)}"] = (fp32_linear, (M, 64, 96, od, bias))
    return out


def _attention_cases():
    out = {}
    for kv8, mode, sched, rep, q_len, dh, dt in itertools.product(
            (False, True), ("causal", "mask", "mask1", "full"), ("grouped", "rowwise"), (1, 2, 4), (1, 3, 8),
            (16, 12), ("float32", "float16")):
        if kv8 and dt != "float32":
            continue
        if (dh, dt) != (16, "float32") and (sched, rep) != ("grouped", 2):
            continue
        kvh, S = 2, 70
        width = dh + attention.KV_SCALE_BYTES if kv8 else dh
        cs = (3, 2, kvh, S, width)
        kw = dict(rows=kvh * rep, q_heads=kvh * rep, rep=rep, q_len=q_len, head_dim=dh, kv_len=S, k_shape=cs,
                  k_prefix=(2, 0), v_shape=cs, v_prefix=(2, 1), scale=0.3, causal=mode == "causal",
                  additive_mask={"mask": (q_len, S), "mask1": (1, 1, S)}.get(mode), dtype=dt, kv_int8=kv8,
                  schedule=sched)
        out[f"att_{'kv8' if kv8 else 'fp'}_{mode}_{sched}_rep{rep}_t{q_len}_d{dh}_{dt}"] = (attention.fused_attention, kw)
    # batched K/V without a prefix (not stamped), batch 1 broadcast, batch 2 own K/V
    for B, sched in itertools.product((1, 2), ("grouped", "rowwise")):
        for kv8 in (False, True):
            w = 8 + attention.KV_SCALE_BYTES if kv8 else 8
            kw = dict(rows=2 * 3, q_heads=3, rep=1, q_len=3, head_dim=8, kv_len=40, k_shape=(B, 3, 40, w), k_prefix=(),
                      v_shape=(B, 3, 40, w), v_prefix=(), scale=0.5, additive_mask=(3, 40), kv_int8=kv8,
                      schedule=sched)
            out[f"att_batch{B}_{sched}_kv8{int(kv8)}"] = (attention.fused_attention, kw)
    for prefix, axis, us, dt, idt in (((1,), 2, (2, 2, 3, 16), "float32", "int64"),
                                      ((0,), 2, (2, 2, 1, 16), "float16", "int32"),
                                      ((), 1, (2, 5, 16), "float32", "int64"),
                                      ((1,), 3, (2, 2, 16, 1), "float32", "int64")):
        cs = (3, 2, 2, 40, 16) if len(prefix) else (2, 40, 16)
        if axis == 3:
            cs = (3, 2, 2, 16, 40)
        kw = dict(cache_shape=cs, prefix=prefix, axis=axis, update_shape=us, dtype=dt, index_dtype=idt)
        out[f"kvw_{'x'.join(map(str, us))}_{dt}_{idt}_ax{axis}"] = (attention.kv_cache_write, kw)
    for prefix, us, idt in (((1,), (2, 2, 3, 16), "int64"), ((0,), (2, 2, 1, 16), "int64"), ((), (2, 5, 16), "int64")):
        cs = (3, 2, 2, 40, 20) if prefix else (2, 40, 20)
        kw = dict(cache_shape=cs, prefix=prefix, axis=len(us) - 2, update_shape=us, index_dtype=idt)
        out[f"kvw8_{'x'.join(map(str, us))}_{idt}"] = (attention.kv_cache_write_int8, kw)
    return out


def _embedding_cases():
    out = {}
    for kind, rows, width, n_ids, gs, pad, idt in (("int4", 50, 64, 1, 32, None, "int64"),
                                                   ("int4", 50, 64, 7, 64, None, "int32"),
                                                   ("int4", 33, 63, 5, 32, 64, "int64"),
                                                   ("int4", 33, 60, 2, 16, 64, "int64"),
                                                   ("int8", 50, 64, 1, 32, None, "int64"),
                                                   ("int8", 33, 63, 5, 32, 64, "int32")):
        out[f"emb_{kind}_{n_ids}x{rows}x{width}_g{gs}_p{pad}_{idt}"] = (
            embedding_gather, (kind, rows, width, n_ids, gs, pad, idt))
    return out


def _format_cases():
    """The GGUF-carrying formats' kernels (recorded when they were added)."""
    out = {}
    for M, layout, bias in itertools.product((1, 2, 9), ("k1", "k4"), (False, True)):
        out[f"int4asym_{M}x64x256_g32_{layout}_b{int(bias)}"] = (int4_linear, (M, 64, 256, 32, "float32", bias, 4, layout,
                                                                              True))
    for M, gs, bias in itertools.product((1, 2, 9), (32, 64), (False, True)):
        out[f"int8g_{M}x64x256_g{gs}_b{int(bias)}"] = (int8_linear, (M, 64, 256, "float32", bias, 4, gs))
    for kind, width, pad in (("int4_asym", 64, None), ("int4_asym", 63, 64), ("int8_groupwise", 64, None),
                             ("int8_groupwise", 63, 64)):
        out[f"emb_{kind}_3x50x{width}_p{pad}"] = (embedding_gather, (kind, 50, width, 3, 32, pad, "int64"))
    return out


CASES = {**_linear_cases(), **_attention_cases(), **_embedding_cases(), **_format_cases()}


def _print(func) -> str:
    return f"{tvm_ffi.structural_hash(func) & (2**64 - 1):016x}:{hashlib.sha256(func.script().encode()).hexdigest()[:16]}"


def generic_of(func):
    """The generic kernel a stamped per-layer kernel came from, and the stamp's prefix values."""
    stamp = json.loads(str(func.attrs["bluelower.stamp"]))
    generic, _ = attention.generic_kernel(stamp)
    return generic, stamp["values"]


def fingerprint(name: str) -> str:
    builder, args = CASES[name]
    func = builder(**args) if isinstance(args, dict) else builder(*args)
    if func.attrs is not None and "bluelower.stamp" in func.attrs:
        generic, values = generic_of(func)
        return f"{_print(func.without_attr('bluelower.stamp'))} {_print(generic)} {values}"
    return _print(func)


GOLDEN = {  # recorded at ba2c15e, before the refactor (the int4asym_/int8g_/new emb_ cases when added)
    'att_batch1_grouped_kv80': '725810f611dbb5b6:7aed9d03850021b1',
    'att_batch1_grouped_kv81': '697a1d628e047d91:4e165cc42d358318',
    'att_batch1_rowwise_kv80': 'c729e5a029d6ec2e:420d0cdf6e1db7a6',
    'att_batch1_rowwise_kv81': '7ecba3f6050ecb55:f02dbf22a40fa5a7',
    'att_batch2_grouped_kv80': '02bd0d70cf9cc6b5:d30f74d12cd1abab',
    'att_batch2_grouped_kv81': '3540397e4e87f763:0812937775e439db',
    'att_batch2_rowwise_kv80': 'dbcd3e73a761f732:def27b5f0d8e29cc',
    'att_batch2_rowwise_kv81': '98109302d3b4ca3c:613aadf705197218',
    'att_fp_causal_grouped_rep1_t1_d16_float32': '7394a7682eacf599:bb06e097d575a55a 153878c12cb58c19:4be45917d97e1821 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep1_t3_d16_float32': '1b655e40144cf61b:c9b24d4f19fb3ade 6fe4fb859e64b9e6:48750847940c3e9c [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep1_t8_d16_float32': '4cc985cf5368fc64:ea2126533ead1108 77681cea69accc85:de3e53904b20d8e0 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t1_d12_float16': '81a09d8818b18b4b:21e694bd50ec372e cbca68aa4406e3d0:76d6d0bef84fff91 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t1_d12_float32': '68ceb2bb05359582:09517bb7caca36fc 86c0cffb1b31f596:f9de1d8b8c9699a1 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t1_d16_float16': 'e0c66c835588d869:c2ac7e688644c446 e5786bb687b2a06a:612d4ed7a86ff372 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t1_d16_float32': '31aacb0a227c2cb6:1dc1786c63abf3e7 72fcab27c80c5707:3cb31a60699b3fb8 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t3_d12_float16': '47d742327cb20e7e:434e6407fd994e2d 96612dd5c56a206e:246c6a31c6db6dc3 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t3_d12_float32': '9d62aa77f0a2c727:8864f346969349ba 6cbe2486cc000bd8:892330a0137f5f20 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t3_d16_float16': 'b1384193da5e8acc:2e955990737ecd38 c68ef9e1bbc02777:ea57e89e4200772a [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t3_d16_float32': '099bf3560bd78be5:aabc7a7e9773759f c5af281479e181d4:098a6aa7c91f4f27 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t8_d12_float16': '6403ed0fcebbe6e4:2444771cdbdb2c83 73afffc06b6abdb2:7031e9a72dd2a210 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t8_d12_float32': 'c4915cb87608f420:fcc8cb54ff9eb415 a8b3980cdb28d271:f29899f3e465dc65 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t8_d16_float16': 'd4b7a40060e37b93:0351944d2f2cf28a 9c312e1537680735:5f0e84a0aa12219a [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep2_t8_d16_float32': '71ff5d50036c74a8:fbeeae0f48062ab7 52c6a51bc5a92b2d:c4aef8e366e75687 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep4_t1_d16_float32': 'b938d88d079f7f57:8fad211c6762622f 106434d6a84c7474:39563d2b270f3f0e [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep4_t3_d16_float32': '9632e60358851371:42ddf4ca6dbbc2a2 f3529d865993940e:bb2f89d170efa8b4 [2, 0, 2, 1]',
    'att_fp_causal_grouped_rep4_t8_d16_float32': '9bee8ef1866361bb:8813c6b3b17cbd38 afbf241e0184fd5c:b6a40393a6d73c9d [2, 0, 2, 1]',
    'att_fp_causal_rowwise_rep1_t1_d16_float32': 'a764386985cead03:dc6ae5b8f20b6c90 78eba32b258556e4:6b887f87f637d598 [2, 0, 2, 1]',
    'att_fp_causal_rowwise_rep1_t3_d16_float32': 'a656a7c6c8e09d8f:5d8d86b33bf3b813 06da1035940d8695:ca6c87293419b383 [2, 0, 2, 1]',
    'att_fp_causal_rowwise_rep1_t8_d16_float32': '50c106dc7e8dbc71:11a5447f4ced4914 5a941ccad8b8aed6:35df447f56c9fee5 [2, 0, 2, 1]',
    'att_fp_causal_rowwise_rep2_t1_d16_float32': 'e97cdbf909b60cdf:305ef08b1bc3d325 7bd8b382612f46a3:1728c67acc876d59 [2, 0, 2, 1]',
    'att_fp_causal_rowwise_rep2_t3_d16_float32': '6c825b699dcab894:f0c07c69b796e598 788a1a03e1723674:1e0af9a4681c1e5d [2, 0, 2, 1]',
    'att_fp_causal_rowwise_rep2_t8_d16_float32': '74a162d41c83b3a5:32020fe1367e447b ae0cdcb198385507:5eefe7f805e21dcc [2, 0, 2, 1]',
    'att_fp_causal_rowwise_rep4_t1_d16_float32': '1cb19d829e95d163:7fe9588001b949bb eb16e7430312e2a4:498a6c9cdbdbc13f [2, 0, 2, 1]',
    'att_fp_causal_rowwise_rep4_t3_d16_float32': 'abefec7035349d50:745506ce24ed4cd8 d1f783e02e3bbf3a:c52269b2307efce0 [2, 0, 2, 1]',
    'att_fp_causal_rowwise_rep4_t8_d16_float32': '27c61a1a1b851928:f7ae53ee6fb2867b d6116dbebadfd59c:f4cabbb84b6bd509 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep1_t1_d16_float32': 'b02147bf9698fbce:9202aa548c40f90e 49decb5ba749a076:f3942e1f2dfe479d [2, 0, 2, 1]',
    'att_fp_full_grouped_rep1_t3_d16_float32': '9f9545ae82d8634f:15e66d5df4e02e13 a80a8ea3ac6b91c8:36eafdbfccc590f4 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep1_t8_d16_float32': '969844f9e71e0785:7be623b477301609 f3a6f4d2c1f8338f:738e943a6f015228 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t1_d12_float16': '871c6db34157e40b:a6dbf8926169dd69 913f3c4e43d10b78:f81529fc143a89df [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t1_d12_float32': '946b901f565630e5:515f92bf17437348 b1bf618f1713cb87:2f290fa44bd0b8ab [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t1_d16_float16': '527c67e9eba56a55:b75f8ef5d741a6d9 03694f79fb623d85:ee96de81ac82777d [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t1_d16_float32': '946c878059698533:b94287c136156993 1899908d31e20d90:3161deecce20e5c0 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t3_d12_float16': '9f771c75243a3753:e7a39bb48a769b55 6179479d3afebe97:7e7e3b45922c420c [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t3_d12_float32': '542412b5d3681219:fec3eee850e94cd3 8b755726976950a5:544dedf7ed6216ed [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t3_d16_float16': '1eec0881bc0d2289:6969c2298a0bdb06 32802119094ab541:3d7d7ceef134089b [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t3_d16_float32': 'b9d53f68934a6e7f:0e226a4cee5be30a 2bf9b5e6b63b2176:029981dfe949afc4 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t8_d12_float16': '94ee7dc41588739e:f4766e9da7992e40 55ab8c4c5b3a9316:4e5f1fd851c46122 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t8_d12_float32': '11b09f727b9ec7c5:dbfb8c6171fbaa7b 2b35fa72897048a0:fea2cfe8788a954e [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t8_d16_float16': 'bc082415b4cd101c:e1a36af3376dacfa cdf76a0a46a2ffda:e4da527a5517ebe9 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep2_t8_d16_float32': '7e0824e30eeed567:1dfea9b555d91532 7f2e4cd5a0be1501:ea68b70a62359f10 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep4_t1_d16_float32': 'e9a26acff8af87ac:83dffbd5cdaaf698 b9a27afc441436d8:a0d64efb28de0af8 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep4_t3_d16_float32': '65b7d4c154193873:0c12a02a3137ff8f 4859bb95775d94c0:d96fc4faf1b66483 [2, 0, 2, 1]',
    'att_fp_full_grouped_rep4_t8_d16_float32': 'a72b6cf2595a93ee:81264d49e739e0ac 4258574ec5ae417a:12a24494755a1e1e [2, 0, 2, 1]',
    'att_fp_full_rowwise_rep1_t1_d16_float32': 'af049616f519fa61:06dc32e55c61c8eb eb218816ad6f360e:d592cdc470a129c1 [2, 0, 2, 1]',
    'att_fp_full_rowwise_rep1_t3_d16_float32': '5ce04e5dfda7cc66:bce48762a4f9eec8 d66fe47f728ba201:348fea01f7329507 [2, 0, 2, 1]',
    'att_fp_full_rowwise_rep1_t8_d16_float32': '22dcdfbc22f6e177:873635588fd15655 5d748a0b9150f2f3:807f6ed56864bfbd [2, 0, 2, 1]',
    'att_fp_full_rowwise_rep2_t1_d16_float32': 'd365a6da0690b4e3:9c493abd63689a0e 7528528696c9ce27:8d9c8e972de9be19 [2, 0, 2, 1]',
    'att_fp_full_rowwise_rep2_t3_d16_float32': 'a6b32eed1d99d497:90a5c03e1e6215b5 a9bfc5501ad02cfc:441aa3f735ace2bd [2, 0, 2, 1]',
    'att_fp_full_rowwise_rep2_t8_d16_float32': '89e5b5760c590ea6:8aeeb5c0958d173c 344067b022a5fbda:bef2de9cc85ea672 [2, 0, 2, 1]',
    'att_fp_full_rowwise_rep4_t1_d16_float32': '1c64ba8304b79453:35277b4b05424dd4 9e91795996ec7194:e8c035578296a1c1 [2, 0, 2, 1]',
    'att_fp_full_rowwise_rep4_t3_d16_float32': 'ac1fe4d208253b6a:76132f0a856797aa 5044b24c2d7648c5:30a51a474739a7f0 [2, 0, 2, 1]',
    'att_fp_full_rowwise_rep4_t8_d16_float32': 'fcbe8660f387304e:8eb2251d0ed3b7fc 46ab59b966f649e8:dff847695dbcb43e [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep1_t1_d16_float32': '35bd870b93200615:853436af63e45174 a83354dec5c883b8:109023dafc0ceb1a [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep1_t3_d16_float32': 'ee0a95ded9d4f89a:19a41e11a6dbf3b9 aee4805df5fc4ca5:f0ca92d9a50efdc1 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep1_t8_d16_float32': '786523a641412ab1:3095c7456c223e51 4a578278cad2f583:a45afb2504e45121 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t1_d12_float16': 'd23dd893dba97793:2ebf7ebcd1b0f090 1df5d1efe6533ff6:62bf9382bdaeac94 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t1_d12_float32': '1459678b25534165:70085aadf3f4d1b1 40214bf1c305719c:b4039aa46bb810f3 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t1_d16_float16': 'cf31bb53b94e1125:716b0b461ac1389b 7e8e302e690944ac:ddf5cfeef8f76c81 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t1_d16_float32': 'e216a83707e03e60:30cec68ef8b0865b 80116391ca0ae49a:951acfecd14311b6 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t3_d12_float16': '3c33863f57c5e7c9:95a3071a59e40b73 196a4a8c544284ca:7245b196c0ed61f2 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t3_d12_float32': '8a763ad9b28eec39:63b2bb3558773a75 0d5565bc2c1cca53:761ccc7eb5ee459c [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t3_d16_float16': '9d4c83b31c8654bd:ecb3786507f78246 1bcf6ded1a08a51d:ce83d6b2548090c8 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t3_d16_float32': '893d83cd21dc22ce:048e850702484f61 d4f33214618c77c9:f64933258b08a199 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t8_d12_float16': 'c872895d145e4845:1f95a52cfcd8a088 10548b4395fe2d84:857bb349fa16045a [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t8_d12_float32': '83e51fff5088b5ae:373305f86f7972bd 9698496c2254265e:907a57e3bc4c6b19 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t8_d16_float16': '9c4c1a93537e238b:7276e4de564a472e 45f1e940ae8a55e5:93c8ac6e47305c17 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep2_t8_d16_float32': 'ea4dd2a833c75494:67875b2f3f86bf4f fac3c8438dc4c644:8b598623f0fcce06 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep4_t1_d16_float32': 'b51c287b6a8821a7:48aeba160bcd4119 f40ded80fa0cd640:ff990f20871d4000 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep4_t3_d16_float32': '0e6418303d4e050b:479291e981969634 79f9c8d5b2e71e75:fb9194c309adf6d7 [2, 0, 2, 1]',
    'att_fp_mask1_grouped_rep4_t8_d16_float32': '3c4a5e4956a5b085:4d0b43783cac0b04 edddb078119f64d0:7d84713b3ee25e0b [2, 0, 2, 1]',
    'att_fp_mask1_rowwise_rep1_t1_d16_float32': 'e935e0503c3621b5:9e160d35d4326b74 ffc905c54c20769b:1fd83dfed4674b0e [2, 0, 2, 1]',
    'att_fp_mask1_rowwise_rep1_t3_d16_float32': '143ed7bd02d8ba7c:cad292599da6f173 d605741a48657349:47290ce70fad7f23 [2, 0, 2, 1]',
    'att_fp_mask1_rowwise_rep1_t8_d16_float32': '6ba59c9b6cbea6de:fa93d16b7f4e9c52 280b6cbf81b03985:932191e6a78f4a08 [2, 0, 2, 1]',
    'att_fp_mask1_rowwise_rep2_t1_d16_float32': '1193a6ef00c52b83:56011d824f492fc8 fba2fa2b6e00545f:32742499001feb5d [2, 0, 2, 1]',
    'att_fp_mask1_rowwise_rep2_t3_d16_float32': 'bcc6ce7a9263dcc3:a7f1c572155db282 0147869d32da70ea:fc1fb9ecd21a237d [2, 0, 2, 1]',
    'att_fp_mask1_rowwise_rep2_t8_d16_float32': 'e397e8a81d371c68:8e3e6665c82a73fe 38cd83c3d68a4dd4:ef1e44956f5f46d0 [2, 0, 2, 1]',
    'att_fp_mask1_rowwise_rep4_t1_d16_float32': '2fa140950cefa974:521b34bc955ae9e0 a81543abf214ba45:e513b827b30bf5ff [2, 0, 2, 1]',
    'att_fp_mask1_rowwise_rep4_t3_d16_float32': '1b9bdb33693607ec:a0f0d2e728f42801 9bbaf90fe0a32c24:ebee3faf74914319 [2, 0, 2, 1]',
    'att_fp_mask1_rowwise_rep4_t8_d16_float32': 'd9b16f0ca9169525:59dd126cb08e631c a1eddfbd1eb13fba:c4d00ac37f999b88 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep1_t1_d16_float32': 'a929ef2785d15e22:309257ab07a7bc8c 2d868f0a152aa9fc:09d88bab5dede457 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep1_t3_d16_float32': '4f5af8d5d3ef2bc3:5dc08e56793de0fd 557635eb2033a2b5:3c9c409b714a500a [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep1_t8_d16_float32': '44418c7139d8877b:c31fbd20f0e1fdc5 a4e12fc014b60832:8bf22acaac852906 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t1_d12_float16': 'a49444d74d12f14a:a4667d3850fdf5cf 3de5635ac6cbbe71:93999d432cb391f8 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t1_d12_float32': '267e2aaf6d53b73d:5cc4262a22a4045c fe87b7b5ade467ef:a8ea2bde8a526f0f [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t1_d16_float16': '41424fe986c1d6c1:5ab6451810f59a84 e392af25c2d214b6:cf65ab97873c5075 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t1_d16_float32': '3945598209cb0f67:22dae35f538feef3 e015118d509d7cfb:5041305db14d60bd [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t3_d12_float16': 'e0fab69479c3b665:47a849ae35a19b93 c32f14b0dec4e383:92ae6b6920d454e8 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t3_d12_float32': '96515ba5270c7e3b:f3354bbcb9d34589 fd647f33bf534c67:a5582a6a58b09535 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t3_d16_float16': 'ac44d90a74903800:b36eaa815e97ce8f 1a0954e6cae7b3e3:6e4c5b337789229e [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t3_d16_float32': '91d5f1b4d59ae548:d964342bdd3d6837 ff7222e8c427a894:47cbc4dce121142a [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t8_d12_float16': 'dcc61b4ce7e3a189:125d7691c298aaa1 f7ead83694b6825d:1d08bdb1735db750 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t8_d12_float32': '53b8cb52a63e7654:a0503df689202ae8 2284129eb8bc8114:56cf74034f4b460b [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t8_d16_float16': '4eed1c099b39515e:36a9314a3eac40bc ba9c5a85f310fabd:e8f0f2a71c177e70 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep2_t8_d16_float32': '90ce944d5465a7f7:b90aa45549e6c1bb 16a4c96bf0cc9f38:55c1df2ceb1ba00c [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep4_t1_d16_float32': '4ce36f4daccc1620:e3e6a1617c89226d 0c997facc60330f7:be6a2c613ac22f10 [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep4_t3_d16_float32': 'cde7c59a782007c8:8500d8d13b245233 4ce6b40672a3e2e9:bcaf5c2c659eb7cf [2, 0, 2, 1]',
    'att_fp_mask_grouped_rep4_t8_d16_float32': '5b906ace01f2d704:0883a74632d27cd6 d11ba9fd1a1ea32a:459c6c0b903ffd51 [2, 0, 2, 1]',
    'att_fp_mask_rowwise_rep1_t1_d16_float32': 'db7a8aeddd139808:0391a1bcb410f99d af490472978b69d1:119196e52c175015 [2, 0, 2, 1]',
    'att_fp_mask_rowwise_rep1_t3_d16_float32': '09d0cc0f5baa4bbc:7a43e1e5310511b9 1051f4466172f6f3:fe11248751d160cd [2, 0, 2, 1]',
    'att_fp_mask_rowwise_rep1_t8_d16_float32': 'bd52ecd5d261e44a:8669488df712706f 75c4a967cc101713:8702df0fb3d22fbf [2, 0, 2, 1]',
    'att_fp_mask_rowwise_rep2_t1_d16_float32': '17f703b0774f031f:1a607be514734334 62b4a79a0b7207b9:07d8426388597959 [2, 0, 2, 1]',
    'att_fp_mask_rowwise_rep2_t3_d16_float32': '7a53d6f176eef37c:b1ebf64018d03510 5719f9e6931b25ad:4cbd878b0fb648a1 [2, 0, 2, 1]',
    'att_fp_mask_rowwise_rep2_t8_d16_float32': '9882ada438d30661:f7023a92dabf9059 2367826710b3779e:d18bfdaeedbe743e [2, 0, 2, 1]',
    'att_fp_mask_rowwise_rep4_t1_d16_float32': '986ed0f6d4e4e97f:402092bb76e5e028 c3518c1cb7357fd4:6507ebe72d879372 [2, 0, 2, 1]',
    'att_fp_mask_rowwise_rep4_t3_d16_float32': 'b1a6ddabe29d8962:8c571d38928ce78d 0cd0acd59c303cec:df40cdaaeeedc939 [2, 0, 2, 1]',
    'att_fp_mask_rowwise_rep4_t8_d16_float32': 'dc1092ef9baec813:124e91883d7a8f2c 08e5491a071d8228:9a95cbd8c2075650 [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep1_t1_d16_float32': 'b9e8a46b2070acaa:bf2eef79989db163 d5f8bf2242fdf10c:5b3e4b709365d6ab [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep1_t3_d16_float32': 'fbb45654f8b4bec5:6eb6dcaf738eb68a 636c67ed38e74c4b:104d705e4e5ff677 [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep1_t8_d16_float32': '05a66f13adf29b24:6fe5adba50ff6b59 a7f7278d8e72cf57:34ee47046f075029 [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep2_t1_d12_float32': '1a60d35b8b8eb68c:eb77af3d7fe6ba6b 020b90df1b021d97:d43da6f1ddba8f08 [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep2_t1_d16_float32': '46a10378af0db168:6c33056da044ff80 6fe4c53fabc200a1:8a703530567f3afc [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep2_t3_d12_float32': '2a92a56cda24c629:23a653ce702a020a a5074ae2094bd726:83558ae47680cc8f [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep2_t3_d16_float32': 'dc6ca555295e7dcb:adcf05c547331664 9d6de7020d5ca3f6:fe62f1ebaa21d70e [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep2_t8_d12_float32': 'fb85accd04971a19:fb5f913b535fad79 23f1ff9bfa2a3960:16838bd7a9db45e5 [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep2_t8_d16_float32': 'd25d81b3fab85b1c:637e121bfadb75d1 07399c780c5500db:f62732bc190830f0 [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep4_t1_d16_float32': 'c333a1a32032f457:9e2d9b685686c899 5dd6f83ae8c3b1dc:6354bdb0658ba661 [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep4_t3_d16_float32': '6993df75d0f459c0:922178dab7e70377 2016467f3c717b6d:5ce2c5e296cb7b50 [2, 0, 2, 1]',
    'att_kv8_causal_grouped_rep4_t8_d16_float32': '168acc715775ff18:0eb0df3c6ae5b19e ef3baa05dab4af91:9b90b8fd28d1e9ce [2, 0, 2, 1]',
    'att_kv8_causal_rowwise_rep1_t1_d16_float32': '2168e838051aeb96:b120edbff50a00e8 1e82c0381a5c3a12:62b3c3e70d10f44b [2, 0, 2, 1]',
    'att_kv8_causal_rowwise_rep1_t3_d16_float32': '4b174cc3ff52a791:edeee86ae65de9ea 61fae2ef9fe35873:2f39ee6e160f1bd4 [2, 0, 2, 1]',
    'att_kv8_causal_rowwise_rep1_t8_d16_float32': 'e513d8b5a143bdcb:f412fb647d9d9c7c b47c0bf4c91be9f2:d8c1d995c2b20ca5 [2, 0, 2, 1]',
    'att_kv8_causal_rowwise_rep2_t1_d16_float32': '8f4e76f6fbb458f4:9da2eb1aa8c1078f fbc123cce4de45aa:0ec389ecd4c1f749 [2, 0, 2, 1]',
    'att_kv8_causal_rowwise_rep2_t3_d16_float32': '4c41f3e7848eee34:bc9fb67523812c10 15da259da90bae02:7a24d0809b439ea2 [2, 0, 2, 1]',
    'att_kv8_causal_rowwise_rep2_t8_d16_float32': '2debc5087abf80a6:bb4970ceacedcd36 f62f34cb44df5761:9088116a04df9cff [2, 0, 2, 1]',
    'att_kv8_causal_rowwise_rep4_t1_d16_float32': 'bdf57bba0c8196b6:0c40ee6f67844c7e 3e6ce6bdf3b6814a:f2aee6157fe6a37d [2, 0, 2, 1]',
    'att_kv8_causal_rowwise_rep4_t3_d16_float32': 'e207d0007ecda39e:60018029b9f0c5b5 df471380ab7db29e:de96fb6e5c41c69d [2, 0, 2, 1]',
    'att_kv8_causal_rowwise_rep4_t8_d16_float32': 'ffe17f8a0dd197a1:bb7d9769f3565233 d6bb608e1ce29788:7e72c5acd92f6f89 [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep1_t1_d16_float32': '710f12dda4ad9323:87eafcd4657e60a7 47bec5a676ffcdaa:a0cc8a354e6decde [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep1_t3_d16_float32': 'ff105144c854c43a:b8e98ed0375d0383 34d0e183922e416e:cfda79e349f3c227 [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep1_t8_d16_float32': '1d85676078ee89a0:a5d07b761ca0621e 25b413cd03dea12a:f33cbf2fc3e8be19 [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep2_t1_d12_float32': 'b922b89afbb791af:ff906012ce250def 200edb045b31255c:8c573ea6b4d94e9e [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep2_t1_d16_float32': '6718fd061cd371aa:e6a96c332aa87be2 fbc1f78cccb92221:77fc69790288a634 [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep2_t3_d12_float32': '34316cca5f9ec615:4fc13204760619ee fb8841f18cb71d66:6fa99bbb2fe8d89a [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep2_t3_d16_float32': 'e3adfeea0c0e41fd:a7b0ce65ab57fe2c 72a4c4a7d3e4a768:b6f09af8e8623330 [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep2_t8_d12_float32': 'a373af31d56e90c8:42e97541b4cb286d 2a51baf1f623bcd2:f778124cf67ea3ce [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep2_t8_d16_float32': 'de72a27a0a6f496a:bb8987cb65586d7c 95dd5e6b354579c8:12cb3a67603bce7b [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep4_t1_d16_float32': 'f8f1f272413a26d9:c98d9939bb12714e 4e12ebf77f5d079c:71055083edb66b11 [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep4_t3_d16_float32': '1874bf6478ce207d:b05ac793422eccde 4a6299b0d08eef4f:5e0dbdb8b09cdac2 [2, 0, 2, 1]',
    'att_kv8_full_grouped_rep4_t8_d16_float32': 'b9718a311782e616:fd5ef7bdbb2d0cbb af404270a4623096:deef3f5b512701f1 [2, 0, 2, 1]',
    'att_kv8_full_rowwise_rep1_t1_d16_float32': '59926da94a335b05:d8691f6b608cdd1f d00c44322f6f604b:ee5f15dea502f281 [2, 0, 2, 1]',
    'att_kv8_full_rowwise_rep1_t3_d16_float32': 'ce509d1b8b1539c0:53fb7d36c4a7547e 37249ba2ba43b359:09eb6bf6b85c8deb [2, 0, 2, 1]',
    'att_kv8_full_rowwise_rep1_t8_d16_float32': 'c51cb74c961863e6:ce03c6f977ae747b 3b6228acadda6e72:e2590287d55e3d80 [2, 0, 2, 1]',
    'att_kv8_full_rowwise_rep2_t1_d16_float32': '2d1a7cbe98172614:33f9227a9188d518 ebcd622fb8251da3:1d046c17e0f984d4 [2, 0, 2, 1]',
    'att_kv8_full_rowwise_rep2_t3_d16_float32': '3efd4fc2e0fda3e1:ea4a985f2ada972b 3813ae5d3a0a1282:32e3f3d467939d69 [2, 0, 2, 1]',
    'att_kv8_full_rowwise_rep2_t8_d16_float32': '4dd9589b164b9109:9f9961b269e51342 c0f7daefd153f0c3:2a622de85a29adee [2, 0, 2, 1]',
    'att_kv8_full_rowwise_rep4_t1_d16_float32': '21d369de2cca86d5:ee47130f05c8a5bf 88c9ea2b14825095:69838f7b41fc293d [2, 0, 2, 1]',
    'att_kv8_full_rowwise_rep4_t3_d16_float32': '605161276d87c667:a5d7da5a09e05720 7263c5c7348a28ff:694be2777787dc61 [2, 0, 2, 1]',
    'att_kv8_full_rowwise_rep4_t8_d16_float32': '377c7124ee51d067:2f43e17a49b763a6 fcada4d554b12968:7661985fe6751d9f [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep1_t1_d16_float32': 'f8bd0795900ce8b3:0c17f9716dac7586 2bb73919a3d6f958:a3e0dba34e582d8f [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep1_t3_d16_float32': '3e475d632c382fca:209d2ba8cf16da5d f12e8c2efa981605:79a78102f62953d8 [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep1_t8_d16_float32': 'a5a1ee3b55b36858:9e37750ce198df90 ea8633c134886540:1fa257a8e9d90485 [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep2_t1_d12_float32': 'f546d77bd721d80a:788d0e1a485febe8 cb66c9ebe3ee5f66:2deb2f579705ab82 [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep2_t1_d16_float32': 'f9425e51286ef7ba:e1c8ddac2e3f7eef 15a24bd2f2a3ab71:f131a9fe31f4c234 [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep2_t3_d12_float32': '7ff9c7295c2bcd23:e7f99b25d17f25c3 6ef702ce93a69b2f:26e1946536695bb0 [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep2_t3_d16_float32': '10da5189a2b63a57:1a221ef6f5260805 a732616b165cd647:05a1443b19c92754 [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep2_t8_d12_float32': '9ea2adf1bc35db05:9303f659b04a858a bcead6d39cfa4d77:90534b31ae409745 [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep2_t8_d16_float32': '8f8f9afcc82839a6:bf1d3e0227bda646 95a632ace66b4b27:bbf8784013db3462 [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep4_t1_d16_float32': '80d473ddb78b3c4e:33e498898481a707 6ff41c2618b76dd1:f79cf1cfee06794b [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep4_t3_d16_float32': 'd3a2f13a636a0d00:62bcded06eb731dd c5e08db55b68f035:5037ca739fe5f367 [2, 0, 2, 1]',
    'att_kv8_mask1_grouped_rep4_t8_d16_float32': 'afbfef574f424cbc:3a78fe29b89b36c0 7a8923d5ef9c5137:77fd73d54e554608 [2, 0, 2, 1]',
    'att_kv8_mask1_rowwise_rep1_t1_d16_float32': '6df38a57ad15d3d2:b98b8436c828e91f b7f0ad652337062a:0d05474b523175ad [2, 0, 2, 1]',
    'att_kv8_mask1_rowwise_rep1_t3_d16_float32': '3ccf7cf59ccceccb:4de97902683a32de 3575c39d3d97ff42:4d92177ac4bed744 [2, 0, 2, 1]',
    'att_kv8_mask1_rowwise_rep1_t8_d16_float32': '1d87fe3574002685:c79412ff0a2a59ac 51199976e5c92b17:00a681c786d24695 [2, 0, 2, 1]',
    'att_kv8_mask1_rowwise_rep2_t1_d16_float32': 'f2aa158dd07dfe5d:31d029c8cfc3bd87 c6ff8ad819328c47:0190633830572299 [2, 0, 2, 1]',
    'att_kv8_mask1_rowwise_rep2_t3_d16_float32': '9309c0d453260b29:a8aced8a6e1d9874 de9c3580dc09d6d1:af5f57db1f13d9d1 [2, 0, 2, 1]',
    'att_kv8_mask1_rowwise_rep2_t8_d16_float32': '4748295c047aff0f:589fb1ff4de41fac 14fe9e1c0d743b45:10952a554c3ffdc9 [2, 0, 2, 1]',
    'att_kv8_mask1_rowwise_rep4_t1_d16_float32': 'e5761165a3ef9f16:a47c5d902f5040fa cdbda3c2ea10e45d:67e74f4a793fac79 [2, 0, 2, 1]',
    'att_kv8_mask1_rowwise_rep4_t3_d16_float32': 'a57873a9209909ea:9920683c87e27103 600f79cbc8f30305:ae2bc2957e1c7c36 [2, 0, 2, 1]',
    'att_kv8_mask1_rowwise_rep4_t8_d16_float32': '62e88b4ad4df1b9e:3fcd56ec91c7e2d0 1a83489f332ee1b7:3c40407f49170be1 [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep1_t1_d16_float32': '2825f304dc715ceb:c7d337e5aefdeacd 22259aee7dac5142:fee3efb2ce0370f2 [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep1_t3_d16_float32': '53acc7a1b8a1da1b:177860067d0e5b45 d0e6b60f84a6d0c1:3658f7ea914d7d63 [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep1_t8_d16_float32': '6b99bfbb34731898:b765d7092223b68c 816bc07ce4b6f81d:7734c327489481fd [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep2_t1_d12_float32': '146f09917c136e8d:22830e9674cbccfe 7bfaf4b6a79f28df:6aec46363eabbba0 [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep2_t1_d16_float32': 'bc7930a90ac8602d:d68638575d7a2b0b 74d431ffe5e337d7:af96a5f9dbe9688d [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep2_t3_d12_float32': 'e5f4348eb033ae39:db446bfd3280e3a4 cd7e81c6a31ac243:70fcea47b48c6d8b [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep2_t3_d16_float32': '9eb9abe1ec3014fc:6c95f94abb1f7104 b66a9df825b83795:2c93b8edf0c35b64 [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep2_t8_d12_float32': '091ed0e2399be511:1797eb3187abe3ad a3b918665eeea0af:af203820e918d991 [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep2_t8_d16_float32': 'a9a5fb8e17b6d501:5e702a69a35a05ed c54beaf390593de9:e83ce08c0cef3084 [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep4_t1_d16_float32': '02d4fb9b8ad574dd:894e97881a736f05 4b815360772bc24e:f437b4422bc1fd36 [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep4_t3_d16_float32': '3f3d2f5d494067d1:6e162af0df7e47ec 0ae58f6d72ee31d4:9dec2855c82745cb [2, 0, 2, 1]',
    'att_kv8_mask_grouped_rep4_t8_d16_float32': 'a2f2c42c92c1953d:2975f8db7a0c6e66 3ad4cf1a1f0e4f43:000fc57514763117 [2, 0, 2, 1]',
    'att_kv8_mask_rowwise_rep1_t1_d16_float32': '043280cce334bfce:3a1c5a8e2663f711 cc05e65d3e28be66:83717a28aed08ef2 [2, 0, 2, 1]',
    'att_kv8_mask_rowwise_rep1_t3_d16_float32': '3fe421be49727e99:701469da24e2dede 2dc7a76d25bef7b6:8ba569d72c7210a2 [2, 0, 2, 1]',
    'att_kv8_mask_rowwise_rep1_t8_d16_float32': '77d04fcc94f62dd7:19449f34f0c5b94a d66cb1f703857e68:c88177d42eef5c45 [2, 0, 2, 1]',
    'att_kv8_mask_rowwise_rep2_t1_d16_float32': 'a55fb26aaeb44ab7:4d5c5e41883c8a0c 34e1b4d61655011c:1f369b55d2e9e99c [2, 0, 2, 1]',
    'att_kv8_mask_rowwise_rep2_t3_d16_float32': 'bfe320b6051f7712:400c570eed7807cb 1e04846e8e0a871e:224f0c4519ed6973 [2, 0, 2, 1]',
    'att_kv8_mask_rowwise_rep2_t8_d16_float32': '1a9265dede7a989d:66a3f2497adf91a0 7c6381e68fcf3539:54db422a4a67e3fd [2, 0, 2, 1]',
    'att_kv8_mask_rowwise_rep4_t1_d16_float32': '146e0eb5afe1889d:1577952d1a39a14f 214c269ed568fa7d:4b52ba73948346c6 [2, 0, 2, 1]',
    'att_kv8_mask_rowwise_rep4_t3_d16_float32': '8d624949b22660c9:d26edf25f18194ff 6ab19265d1625df8:18155e2766d74c3b [2, 0, 2, 1]',
    'att_kv8_mask_rowwise_rep4_t8_d16_float32': 'c9a58bc5b03c2e19:df5f54eb8abbc178 a87b073da9838c81:2cd222b6e22a4948 [2, 0, 2, 1]',
    'emb_int4_1x50x64_g32_pNone_int64': 'efc35cdf2792e1c9:a2501a898953531a',
    'emb_int4_2x33x60_g16_p64_int64': 'b28079d5af0118ba:f7e9cdfa6350bcd2',
    'emb_int4_5x33x63_g32_p64_int64': 'dfc31069a44e31e5:2aea5042d3e8691d',
    'emb_int4_7x50x64_g64_pNone_int32': '1abee49cb279a9d7:3497d11258d2284c',
    'emb_int8_1x50x64_g32_pNone_int64': '13e7a25c5126de38:3d92c107b4698d2b',
    'emb_int8_5x33x63_g32_p64_int32': '0317a2b0f8e09ea2:21c7720fd19a6d7e',
    'fp32_17x64x96_float16_b0': '37a114dbd86d2d02:a814f66b203945da',
    'fp32_17x64x96_float16_b1': 'ac7078679efdd77d:178e6cfc155ce975',
    'fp32_17x64x96_float32_b0': '2aacaad0eeb2e509:3182f5222d5f8622',
    'fp32_17x64x96_float32_b1': '96c65c800ec640fd:0c9c57d2296ea6aa',
    'fp32_1x64x96_float16_b0': '8cdfd6fb7e2a10fe:671651266aa8f4de',
    'fp32_1x64x96_float16_b1': '0604c4ae18d41b93:b866d1ac1b440d3a',
    'fp32_1x64x96_float32_b0': '92edf50adca98509:52355030532dd23f',
    'fp32_1x64x96_float32_b1': '8cfe442f44982f18:6c8b32be2414e22a',
    'fp32_2x64x96_float16_b0': 'ee54e49c2abeb96e:6e35f70a03d38a13',
    'fp32_2x64x96_float16_b1': 'c5256e99b6e0b980:46097827e16683df',
    'fp32_2x64x96_float32_b0': '553be88fbc3255f5:f36bdedd4ce8db57',
    'fp32_2x64x96_float32_b1': '51dde3acf8b45fa8:093c09539024e803',
    'fp32_40x64x96_float16_b0': 'fee0fd7903a38817:4dc4db163fcc2b57',
    'fp32_40x64x96_float16_b1': '9a7de80252385ecb:fc55f0c21b1a49b8',
    'fp32_40x64x96_float32_b0': 'f86fc16657b4194c:68fc2c1ff05ae5d0',
    'fp32_40x64x96_float32_b1': 'bf05d31a20e07ab2:0e9844a7b58354cc',
    'int4_16x96x384_g16_mt1_k1': '70894507db895e8d:b6fdaad75b709d5b',
    'int4_16x96x384_g16_mt1_k4': '960f5366acc619d5:c959a9421103a048',
    'int4_16x96x384_g16_mt3_k1': 'c9f0cec8e5d55f8b:4e342543ecf516be',
    'int4_16x96x384_g16_mt3_k4': '277768f00c4453e5:252162be42379510',
    'int4_16x96x384_g16_mt7_k1': '3d9a0526066d27a1:63b9549c248a03f6',
    'int4_16x96x384_g16_mt7_k4': '853695eda0626ad7:280033356c7d74b5',
    'int4_1x32x64_g64': '8b6905d372b656b4:60d7fae2d4d21a07',
    'int4_1x32x64_g8': '780c08d5609995e5:237c430ef43bc12f',
    'int4_1x64x256_g128_float16_b0_k1': '7567c908c409f855:e01deb790c29885f',
    'int4_1x64x256_g128_float16_b0_k4': 'a27f32a2f3224814:aa338e22a7748a2b',
    'int4_1x64x256_g128_float16_b1_k1': 'ab4cf8d3aca5e7a7:2cc7adba3763569b',
    'int4_1x64x256_g128_float16_b1_k4': '06ba3083d4121134:ea245a5d8b3caece',
    'int4_1x64x256_g128_float32_b0_k1': '3a00b74ebf49d302:f76a9a989866fe5c',
    'int4_1x64x256_g128_float32_b0_k4': '6a42f67b0eb1167f:c293844f5cfd508b',
    'int4_1x64x256_g128_float32_b1_k1': '74a206559d149b17:6af2e9ac7ce51279',
    'int4_1x64x256_g128_float32_b1_k4': 'ac055586823848b3:b7a4b20c4d2357b0',
    'int4_1x64x256_g32_float16_b0_k1': '47b4efb671b84096:5273c8a7e75b2a22',
    'int4_1x64x256_g32_float16_b0_k4': 'c2c597cd07a43513:7e242c083073d079',
    'int4_1x64x256_g32_float16_b1_k1': 'e9b0965081287272:e3a20bdf89fcfd6c',
    'int4_1x64x256_g32_float16_b1_k4': 'c5da24c82849b0e6:070a5c1090a3e125',
    'int4_1x64x256_g32_float32_b0_k1': 'db06ab88f2f0440b:eb2849c548223059',
    'int4_1x64x256_g32_float32_b0_k4': 'c0931850bd7fb0b0:b1b619e02b56d3c0',
    'int4_1x64x256_g32_float32_b1_k1': '7dc5ac8d3c8492fc:10083047752c7dc4',
    'int4_1x64x256_g32_float32_b1_k4': 'c481fcd84d55e19d:b8e6fdc3d777a67f',
    'int4_2x64x256_g128_float16_b0_k1': 'b3d7f82bda09d7a7:a3ba61432fb246f8',
    'int4_2x64x256_g128_float16_b0_k4': 'e5c0fa0814939d6c:7d1222bd9d1b582f',
    'int4_2x64x256_g128_float16_b1_k1': '713a23350e69e261:e221df484c745c58',
    'int4_2x64x256_g128_float16_b1_k4': '888c3ca21e63bdf9:8264025ecec1688c',
    'int4_2x64x256_g128_float32_b0_k1': '2766cef7637e1dd6:7c5bcea9e97257e9',
    'int4_2x64x256_g128_float32_b0_k4': '38a334f23926429c:7f6e5a15d8239b46',
    'int4_2x64x256_g128_float32_b1_k1': '67e20970012e4675:f6baae237d742eff',
    'int4_2x64x256_g128_float32_b1_k4': '99017dc08b5591bb:c98ac4967bd209ff',
    'int4_2x64x256_g32_float16_b0_k1': 'ad10297d572dc471:6acd008de9a807a8',
    'int4_2x64x256_g32_float16_b0_k4': '77e1af59c367f47c:53d6bc46d692b89a',
    'int4_2x64x256_g32_float16_b1_k1': 'cbdd21ed306b5794:d8b4a8505899cc57',
    'int4_2x64x256_g32_float16_b1_k4': 'fb946cb44e08b5f5:6d32147ccfb340b6',
    'int4_2x64x256_g32_float32_b0_k1': '5d1c3a93c203ea70:c139f680696de35a',
    'int4_2x64x256_g32_float32_b0_k4': '509dee5857f0a537:49d3a92cbac6a150',
    'int4_2x64x256_g32_float32_b1_k1': '3ca93c2a49f6050e:f31352dacd10276c',
    'int4_2x64x256_g32_float32_b1_k4': '3bfa0fb0a9fc3a27:c5bc4c4a18584038',
    'int4_4x32x64_g64': '3254feb62574614c:1b82bb0ace55ed7c',
    'int4_4x32x64_g8': '96523e1990df295e:cbc4cad67841218c',
    'int4_5x96x384_g16_mt1_k1': '0180f01f1431ab72:4e7af945ade8868d',
    'int4_5x96x384_g16_mt1_k4': '59a37d1125467a4f:08ed58c68850e0cc',
    'int4_5x96x384_g16_mt3_k1': '1aec3730d56a05b8:df3f9e028edbb0f2',
    'int4_5x96x384_g16_mt3_k4': '8eb5008bdbe458de:bc71237c026322c5',
    'int4_5x96x384_g16_mt7_k1': '0d7067158edca8f4:94ae25d8ec78b057',
    'int4_5x96x384_g16_mt7_k4': '9e03e54c61e8f178:2b5ddfd776b6d017',
    'int4_9x64x256_g128_float16_b0_k1': 'b132bcef0fcc4512:783bc1b3351fb9bc',
    'int4_9x64x256_g128_float16_b0_k4': 'b607e9211d93b909:4e37afa23ad1bdad',
    'int4_9x64x256_g128_float16_b1_k1': 'a750245b224e19af:dd2301b9cc1d35f0',
    'int4_9x64x256_g128_float16_b1_k4': 'f277c135044947e5:703f134f1e1ff96a',
    'int4_9x64x256_g128_float32_b0_k1': 'dc5779a34e3aaef9:3f907d5b2438919c',
    'int4_9x64x256_g128_float32_b0_k4': 'b402b1c35b8ba06d:93ea738bc415d335',
    'int4_9x64x256_g128_float32_b1_k1': 'bc6ed7ef97a56a93:d9c87b69a4407562',
    'int4_9x64x256_g128_float32_b1_k4': '140a286e4a9ad3f4:3c59e307c7c1dc22',
    'int4_9x64x256_g32_float16_b0_k1': 'd95c88c7ec2016d3:49aea9369d245f71',
    'int4_9x64x256_g32_float16_b0_k4': 'b0356de7cdb2069f:aadf8fdf4f0a3df1',
    'int4_9x64x256_g32_float16_b1_k1': '00f3c8039e4bffe5:3be4c7f14228eef1',
    'int4_9x64x256_g32_float16_b1_k4': '67e8129766325f01:f770063dcd1d80f4',
    'int4_9x64x256_g32_float32_b0_k1': 'fa66991689abca37:6e2f4fc7545e0847',
    'int4_9x64x256_g32_float32_b0_k4': 'a47d865810d2ee89:45601e4be7acb6db',
    'int4_9x64x256_g32_float32_b1_k1': '2a2933136f6452f5:89b2bac369d65c35',
    'int4_9x64x256_g32_float32_b1_k4': '33a314356306a6a3:3241b2f1798d1ed0',
    'int4_9x96x384_g16_mt1_k1': 'a0911367ec8598d1:bd43271df3aa525e',
    'int4_9x96x384_g16_mt1_k4': 'ed0b6533ba5614cd:c5421df05e69aeb3',
    'int4_9x96x384_g16_mt3_k1': '69c96c87436f378c:14c40893bfb954cb',
    'int4_9x96x384_g16_mt3_k4': 'e3bdf036e98a576a:a911e2cf80617f6c',
    'int4_9x96x384_g16_mt7_k1': '6c6653b513c252e2:fe2263418ba1b243',
    'int4_9x96x384_g16_mt7_k4': 'f01c66a30a961118:ce293090c01609ad',
    'int8_1x64x128_float16_b0_mt4': '43b8ec2b39fdd45f:d1f84e9d50bb8ec6',
    'int8_1x64x128_float16_b1_mt4': 'e2d0bc7b6df45218:1a310111756f2742',
    'int8_1x64x128_float32_b0_mt4': 'e47e4fd333e496fc:8aea39199dc36b13',
    'int8_1x64x128_float32_b1_mt4': 'a0fe0e62780400d1:4cf9d150b60075ae',
    'int8_2x64x128_float16_b0_mt1': '5c644c557a9a7c5b:d991a9ee63c5833e',
    'int8_2x64x128_float16_b0_mt4': 'a5c39314713ced78:420ab4d45414d680',
    'int8_2x64x128_float16_b0_mt7': 'a5d834e0b4566113:a3cf6d3348ab5374',
    'int8_2x64x128_float16_b1_mt1': '95448049708990c2:0687c3a07d344f28',
    'int8_2x64x128_float16_b1_mt4': '4c51cd6b9ebd7a88:8d521a3f77022fb0',
    'int8_2x64x128_float16_b1_mt7': '19e39958b0e1d779:e3c289f85e397c1d',
    'int8_2x64x128_float32_b0_mt1': 'd41edd04e8d25919:a5525be3aa70f0ba',
    'int8_2x64x128_float32_b0_mt4': '608cc8d0347dc5d8:278959be6d5d4fa4',
    'int8_2x64x128_float32_b0_mt7': '562c15e2ef9a37f6:71d9d9a9e33d1235',
    'int8_2x64x128_float32_b1_mt1': '2bd4b695f6b84d3d:c0a06b5b6edffcc3',
    'int8_2x64x128_float32_b1_mt4': 'ae1d5a1f0f21ca84:bf61941e34c58656',
    'int8_2x64x128_float32_b1_mt7': '60ec73353417776c:8520e0a642342d88',
    'int8_3x96x96': '1f88bbe53d3caf1c:0bb5e8983178da66',
    'int8_9x64x128_float16_b0_mt1': '40efc50639bfc2b9:34c344e0ad56c200',
    'int8_9x64x128_float16_b0_mt4': '6f91a21c48578d1b:b8a59111afcd7d69',
    'int8_9x64x128_float16_b0_mt7': '3af12b009332258a:cfbf397c1919cf20',
    'int8_9x64x128_float16_b1_mt1': '3676b0e638e07674:79dc0224f1f21f3e',
    'int8_9x64x128_float16_b1_mt4': 'd9bc7ed22bde32ad:8bb3e318327d6016',
    'int8_9x64x128_float16_b1_mt7': '7fe84b0eb73f8f20:2ab939d7c6580304',
    'int8_9x64x128_float32_b0_mt1': '0888ed4cd6cb59ac:e93fc29088ae97aa',
    'int8_9x64x128_float32_b0_mt4': '111a5a4ff6d63631:f7b250b99f039f21',
    'int8_9x64x128_float32_b0_mt7': '798dcaad712bae55:cd7c56d142e9402b',
    'int8_9x64x128_float32_b1_mt1': '5e1f8861e485265e:8fdd255b40461a5b',
    'int8_9x64x128_float32_b1_mt4': '0e4ffdf4ccb2a44b:74330321b968c344',
    'int8_9x64x128_float32_b1_mt7': 'ea8696bcd9e23cd7:8371c87591d9ed0f',
    'kvw8_2x2x1x16_int64': 'bbd4d47e18e1af04:1a50bf55d67bfd50 ca5dfe4836ebaac8:efafa32aaaab51ee [0]',
    'kvw8_2x2x3x16_int64': 'e29e22d02817cfa3:4b80b3b7684fff33 6b26e4cafde3568b:c6d2ed2dbc0520a7 [1]',
    'kvw8_2x5x16_int64': 'b2464b36f4aa9b23:5ca1a7b4eaa8b1cb',
    'kvw_2x2x16x1_float32_int64_ax3': '510019ab14634416:5c205cc440892e82 f1c9c74927da1733:f77dfc02ab4a69b4 [1]',
    'kvw_2x2x1x16_float16_int32_ax2': '0074ed8f41b9eb10:356c90fa150c1109 30c10b1c76b69c86:aef606c256f8f554 [0]',
    'kvw_2x2x3x16_float32_int64_ax2': 'e01fca0e35dd92e6:fd8ac5fb3bb13add ca3213dd90b0d5fc:e3dd20588190b024 [1]',
    'kvw_2x5x16_float32_int64_ax1': '078abee13487b50f:5752ffa8af367732',
    'emb_int4_asym_3x50x63_p64': 'dd1fa40dd0b1723d:177a51825fbffe27',
    'emb_int4_asym_3x50x64_pNone': 'c6ee6df46cc83eea:14ab9a0bc951f387',
    'emb_int8_groupwise_3x50x63_p64': '1d6df70efe81e2d1:6de86afc21ef5539',
    'emb_int8_groupwise_3x50x64_pNone': '806327accdfe3315:fe28dc67b7cc5d1a',
    'int4asym_1x64x256_g32_k1_b0': '27273406f2cd7cce:23e55f173a32e9a5',
    'int4asym_1x64x256_g32_k1_b1': 'e5d94008ee7eb89f:5d71524c7ed5c152',
    'int4asym_1x64x256_g32_k4_b0': '6afd9fea1bdf4d4e:5641e067a1b0077d',
    'int4asym_1x64x256_g32_k4_b1': 'c9bc65229da5ee75:acd91191b4b8d017',
    'int4asym_2x64x256_g32_k1_b0': '5af3445efdab8a9f:16bf2d99cad5ac22',
    'int4asym_2x64x256_g32_k1_b1': 'c132c951b739208d:5b7fb7c9430c30ac',
    'int4asym_2x64x256_g32_k4_b0': 'd9e5c4a77f1f1c57:495340bd12ddcd17',
    'int4asym_2x64x256_g32_k4_b1': '1c49df10e2b4fffa:6cb5cd8cb06c625e',
    'int4asym_9x64x256_g32_k1_b0': 'ef689424a1a49596:eb114abe1d739279',
    'int4asym_9x64x256_g32_k1_b1': 'c35004b56554b4e5:93496e716582cc5c',
    'int4asym_9x64x256_g32_k4_b0': 'f7f2bef097090c0a:3cd71d64c3e41d3a',
    'int4asym_9x64x256_g32_k4_b1': '1c699e3f6df40bb8:6f253adcdf19f52e',
    'int8g_1x64x256_g32_b0': 'e4cd79cc43fe50ef:888f7267b2c07b5a',
    'int8g_1x64x256_g32_b1': '5bbd5dbdcfcdac0c:82a15735ffcaa107',
    'int8g_1x64x256_g64_b0': '0e0e04c1f2025060:e0e2b4ccf5f5855f',
    'int8g_1x64x256_g64_b1': 'c2e9fb3ad9fc10ef:41ee8a618a43e57c',
    'int8g_2x64x256_g32_b0': '3a1240ab238b0e36:0fb523d97a04e3cd',
    'int8g_2x64x256_g32_b1': 'd5af97cb4c8b16aa:1cbc436cb164d0dc',
    'int8g_2x64x256_g64_b0': 'd1814fd985924f12:c711096d34773d1b',
    'int8g_2x64x256_g64_b1': 'eeead5a7e33cbba5:c967d98a2ff7d781',
    'int8g_9x64x256_g32_b0': '0fd9050e8ddc41d4:9b747cb20580b958',
    'int8g_9x64x256_g32_b1': '4b2c031b89fdb8ff:38d9bc63062af817',
    'int8g_9x64x256_g64_b0': '3946c6c7d9930ba5:8aa927eaf411bb7d',
    'int8g_9x64x256_g64_b1': '242bb8610e0234f6:a7dcba6c82bcf676',
}


# Printed with another loop-variable name, structurally identical: the INT8 GEMM's K-chunk loop
# is the shared blocked GEMM's ``g`` (was ``ko``).
RENAMED = {n for n in CASES if n.startswith("int8_") and not n.startswith("int8_1x")}


def _structure(fp: str) -> str:
    return re.sub(r":[0-9a-f]{16}", "", fp)


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_code_unchanged(name):
    if name in RENAMED:
        assert _structure(fingerprint(name)) == _structure(GOLDEN[name])
    else:
        assert fingerprint(name) == GOLDEN[name]


def test_every_case_has_a_golden():
    assert sorted(GOLDEN) == sorted(CASES)


# --- the quantizers of the existing formats: packed bytes, scales and dequantized weights ---------


def _digest(*arrays) -> str:
    d = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        d.update(str((a.dtype, a.shape)).encode())
        d.update(a.tobytes())
    return d.hexdigest()[:16]


def _quantizer_digests() -> dict:
    rng = np.random.default_rng(7)
    w = (rng.standard_t(4, size=(96, 256)) * 0.02).astype(np.float32)
    w[3, 32:64] = 0  # a zero group
    t = (rng.standard_normal((33, 64)) * 0.1).astype(np.float32)
    out = {}
    for gs in (32, 64, 128):
        for layout in ("k1", "k4"):
            p, s = Q.quantize_int4_groupwise(w, gs, layout)
            out[f"int4_g{gs}_{layout}"] = _digest(p, s)
            out[f"int4_g{gs}_{layout}_dequant"] = _digest(Q.dequantize_int4_groupwise(p, s, gs))
    p, s = Q.quantize_int8_per_channel(w)
    out["int8"], out["int8_dequant"] = _digest(p, s), _digest(Q.dequantize_int8_per_channel(p, s))
    for gs in (16, 32):
        p, s = Q.quantize_int4_rows(t, gs)
        out[f"int4_rows_g{gs}"], out[f"int4_rows_g{gs}_dequant"] = _digest(p, s), _digest(Q.dequantize_int4_rows(p, s, gs))
    p, s = Q.quantize_int8_rows(t)
    out["int8_rows"], out["int8_rows_dequant"] = _digest(p, s), _digest(Q.dequantize_int8_rows(p, s))
    return out


QUANT_GOLDEN = {  # recorded before the quantizers were extended
    'int4_g32_k1': '6db76fbdc321a212',
    'int4_g32_k1_dequant': '67da70d5066c9ef6',
    'int4_g32_k4': 'eafa333375c552cc',
    'int4_g32_k4_dequant': '67da70d5066c9ef6',
    'int4_g64_k1': '3b2736b49539796a',
    'int4_g64_k1_dequant': 'e5422128f6633290',
    'int4_g64_k4': 'db4a0b7669c19223',
    'int4_g64_k4_dequant': 'e5422128f6633290',
    'int4_g128_k1': '9846da9ae52445d7',
    'int4_g128_k1_dequant': 'd00749c63fb42fe9',
    'int4_g128_k4': 'c5d31bbbcc917941',
    'int4_g128_k4_dequant': 'd00749c63fb42fe9',
    'int8': 'a176034899172ac8',
    'int8_dequant': '51e54654d5aa8489',
    'int4_rows_g16': 'e3e4c5da2cae2690',
    'int4_rows_g16_dequant': '773aff286c84aa90',
    'int4_rows_g32': 'e195b3d6f5cd1d48',
    'int4_rows_g32_dequant': '1457806c134e895b',
    'int8_rows': '7ec92800e1a3980a',
    'int8_rows_dequant': '9f04286ba121ebd7',
}


def test_quantizers_unchanged():
    assert _quantizer_digests() == QUANT_GOLDEN


if __name__ == "__main__":
    print("GOLDEN = {")
    for n in sorted(CASES):
        print(f"    {n!r}: {fingerprint(n)!r},")
    print("}")
