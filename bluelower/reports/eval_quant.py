"""Accuracy of the quantized builds against the fp32 PyTorch reference (``bluelower eval-quant``).

For each mode (fp32, w8, w4a16, w4a16kv8) the model is compiled with the same seeded
random weights, then on one image + prompt:

* ``image_tokens_rel_err``: ``||y - y_ref|| / ||y_ref||`` of ``encode_image``;
* ``prefill_logits_rel_err``: the same for the logits of the last prefill chunk;
* ``decode_logits_rel_err``: mean over the decode steps, *teacher-forced* (both models
  are fed the reference's greedy tokens, so the error is per step, not compounded);
* ``teacher_forced_top1``: fraction of decode steps whose argmax equals the reference's;
* ``greedy_prefix``: free-running greedy generation, number of leading tokens identical
  to the reference's (EOS does not stop either run);
* ``kernel_rel_err``: decode logits against PyTorch run with the build's *dequantized*
  weights (the kernels' own arithmetic error, ~1e-6 when they are right).

The reference for ``run --check`` on a quantized build is :func:`check_reference`; for an
INT8 KV cache (``w4a16kv8``) it also stores its cache rows through the INT8 format.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np

from ..lowering.artifacts.bundle import PARAMS, read_manifest
from ..runtime_stubs.generate import TorchReference, reference_for_build

MODES = ("fp32", "w8", "w4a16", "w4a16kv8")


class DequantizedReference(TorchReference):
    """The PyTorch model with a quantized build's weights, dequantized exactly as the
    kernels use them (so ``run --check`` can demand identical tokens)."""

    def __init__(self, build_dir: str):
        import torch

        from ..lowering.models import config_from_dict, spec_for
        from ..lowering.quant.params import dequantized_state

        manifest = read_manifest(build_dir)
        cfg = config_from_dict(manifest["model"], "manifest.json:model")
        state = {n: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                 for n, a in dequantized_state(os.path.join(build_dir, PARAMS), manifest).items()}
        with torch.device("meta"):
            model = spec_for(cfg).build_module(cfg)
        model.load_state_dict(state, assign=True)
        self.torch = torch
        self.cfg = cfg
        self.model = model.eval()
        r = cfg.runtime
        self.chunk, self.capacity, self.image_batch, self.eos = r.prefill_chunk, r.kv_capacity, r.image_batch, r.eos_token_id
        self.tokens_per_patch, self.vocab_size = cfg.image_tokens_per_patch, cfg.decoder.vocab_size
        self.stop_ids = frozenset(cfg.stop_ids)
        self.kv = None
        if manifest.get("kv_cache", {}).get("dtype") == "int8":
            _emulate_int8_kv_cache(model)


def _fake_quantize_rows(src):
    """``src [..., head_dim]`` through the INT8 cache format and back (QuantizeKVCache's rounding)."""
    import torch

    from ..lowering.kernels.attention import dequantize_kv_rows, quantize_kv_rows

    return torch.from_numpy(dequantize_kv_rows(quantize_kv_rows(src.detach().numpy())))


def _emulate_int8_kv_cache(model) -> None:
    """Make the PyTorch model store its KV cache rows as the INT8 build does (per token and
    head, quantized when written): each layer's ``layer_cache.scatter(2, index, rows)`` writes
    the rows quantized and dequantized, so later reads see exactly the stored values."""
    import torch

    class _Int8RowCache(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.scatter and len(args) >= 4:
                args = (args[0], args[1], args[2], _fake_quantize_rows(args[3])) + tuple(args[4:])
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)

    for layer in model.language_model.model.layers:
        attn = layer.self_attn

        def forward(x, cos, sin, positions, layer_cache, _orig=attn.forward):
            return _orig(x, cos, sin, positions, layer_cache.as_subclass(_Int8RowCache))

        attn.forward = forward


def check_reference(build_dir: str, weights_path: str | None = None):
    """The reference ``run --check`` compares with: for an fp32 build (or with explicit
    ``--weights``) the fp32 PyTorch model; for a quantized build the PyTorch model with the
    build's dequantized weights, so the check tests the compiler, not the rounding."""
    manifest = read_manifest(build_dir)
    if manifest.get("quant", "fp32") != "fp32" and weights_path is None and manifest.get("quantization", {}).get("params"):
        return DequantizedReference(build_dir)
    return reference_for_build(build_dir, weights_path)


# ---------------------------------------------------------------- the measurement


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _sequence(backend, patches, prompt_ids):
    """Image tokens and the prefill of image + prompt (docs/bundle-format.md, steps 1-4)."""
    image_tokens = backend.encode_batch(np.ascontiguousarray(patches[: backend.image_batch], dtype=np.float32))
    rows = [image_tokens.reshape(-1, image_tokens.shape[-1])[: patches.shape[0] * backend.tokens_per_patch]]
    c = backend.chunk
    for i in range(0, len(prompt_ids), c):
        ids = np.zeros(c, np.int64)
        part = prompt_ids[i : i + c]
        ids[: len(part)] = part
        rows.append(backend.embed_chunk(ids)[: len(part)])
    seq = np.concatenate(rows).astype(np.float32)
    backend.reset_cache()
    logits = None
    for start in range(0, seq.shape[0], c):
        chunk = seq[start : start + c]
        valid = chunk.shape[0]
        if valid < c:
            chunk = np.concatenate([chunk, np.zeros((c - valid, chunk.shape[1]), np.float32)])
        logits = backend.prefill_chunk(np.ascontiguousarray(chunk), start, valid)
    return image_tokens, np.array(logits, copy=True), seq.shape[0]


def _teacher_forced(backend, fed: list, position: int) -> list:
    """Decode logits when fed the tokens ``fed`` (the reference's), right after the prefill."""
    return [np.array(backend.decode_step(int(tok), position + j), copy=True) for j, tok in enumerate(fed)]


def _greedy(backend, first_logits, position: int, n: int) -> list:
    tokens = [int(np.argmax(first_logits[0]))]
    while len(tokens) < n:
        logits = backend.decode_step(tokens[-1], position + len(tokens) - 1)
        tokens.append(int(np.argmax(logits[0])))
    return tokens


def eval_patches(cfg, seed: int = 0) -> np.ndarray:
    """One deterministic normalized patch ``[1, 3, S, S]`` (smooth random image in [-1, 1])."""
    rng = np.random.default_rng(1000 + seed)
    s = cfg.vision.image_size
    coarse = rng.uniform(-1, 1, (3, 12, 12)).astype(np.float32)
    img = np.kron(coarse, np.ones((1, s // 12 + 1, s // 12 + 1), np.float32))[:, :s, :s]
    return (img + 0.1 * rng.standard_normal((3, s, s)).astype(np.float32)).clip(-1, 1)[None]


def evaluate(model: str = "tiny", modes=MODES, tokens: int = 64, seed: int = 0, group_size: int = 32,
             prompt_ids=None, work_dir: str | None = None, disabled_passes=()) -> dict:
    """Compile ``model`` in each mode and measure it against the fp32 PyTorch reference."""
    from .. import progress
    from ..runtime_stubs.generate import CompiledModel
    from ..lowering.artifacts.compile import CompileRequest, compile_model
    from ..lowering.models import load_config

    cfg = load_config(model)
    if prompt_ids is None:
        prompt_ids = [int(v) for v in np.random.default_rng(seed).integers(3, cfg.decoder.vocab_size, 24)]
    patches = eval_patches(cfg, seed)
    n_rows = cfg.image_tokens_per_patch + len(prompt_ids)
    if n_rows + tokens > cfg.runtime.kv_capacity:
        tokens = cfg.runtime.kv_capacity - n_rows
    ref = TorchReference(cfg, None, seed)
    ref_image, ref_prefill, n = _sequence(ref, patches, prompt_ids)
    ref_tokens = _greedy(ref, ref_prefill, n, tokens)
    ref_first = ref_tokens[0]
    ref.reset_cache()
    _sequence(ref, patches, prompt_ids)
    ref_decode = _teacher_forced(ref, ref_tokens[:-1], n)

    own_tmp = work_dir is None
    work_dir = work_dir or tempfile.mkdtemp(prefix="bluelower-eval-quant-")
    rows = []
    try:
        for mode in modes:
            out = os.path.join(work_dir, f"{cfg.name}-{mode}")
            t0 = time.perf_counter()
            manifest = compile_model(CompileRequest(model=model, out_dir=out, quant=mode, seed=seed, group_size=group_size,
                                                    disabled_passes=tuple(disabled_passes)))
            compile_s = time.perf_counter() - t0
            built = CompiledModel(out)
            image, prefill, _ = _sequence(built, patches, prompt_ids)
            greedy = _greedy(built, prefill, n, tokens)
            built.reset_cache()
            _sequence(built, patches, prompt_ids)
            decode = _teacher_forced(built, ref_tokens[:-1], n)
            deq = check_reference(out)
            deq.reset_cache()
            _sequence(deq, patches, prompt_ids)
            deq_decode = _teacher_forced(deq, ref_tokens[:-1], n)
            prefix = next((i for i, (a, b) in enumerate(zip(greedy, ref_tokens)) if a != b), len(ref_tokens))
            top1 = [int(np.argmax(d[0])) == t for d, t in zip(decode, ref_tokens[1:])]
            top1.insert(0, int(np.argmax(prefill[0])) == ref_first)
            rows.append({
                "mode": mode,
                "image_tokens_rel_err": _rel(image, ref_image),
                "prefill_logits_rel_err": _rel(prefill, ref_prefill),
                "decode_logits_rel_err": float(np.mean([_rel(a, b) for a, b in zip(decode, ref_decode)])),
                "teacher_forced_top1": float(np.mean(top1)),
                "greedy_prefix": int(prefix),
                "greedy_tokens": len(ref_tokens),
                "kernel_rel_err": float(np.max([_rel(a, b) for a, b in zip(decode, deq_decode)])),
                "weights_bytes": int(manifest.get("quantization", {}).get("weights_bytes", 0)),
                "decode_weights_bytes_per_call": int(manifest["functions"]["decode"].get("weights_bytes_per_call", 0)),
                "compile_s": round(compile_s, 1),
            })
            progress.log(f"eval-quant {cfg.name} {mode}: " + json.dumps({k: v for k, v in rows[-1].items() if k != "mode"}))
    finally:
        if own_tmp:
            shutil.rmtree(work_dir, ignore_errors=True)
    return {"model": cfg.name, "seed": seed, "group_size": group_size, "tokens": len(ref_tokens),
            "prompt_ids": list(prompt_ids), "reference_tokens": ref_tokens, "results": rows}


# ---------------------------------------------------------------- report


def format_table(report: dict) -> str:
    head = ("| mode | image tokens rel. err | prefill logits rel. err | decode logits rel. err (teacher-forced, mean) "
            "| top-1 agreement (teacher-forced) | greedy: identical leading tokens | kernel vs dequantized PyTorch "
            "| stored weights | decode reads / call |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in report["results"]:
        lines.append(
            f"| {r['mode']} | {r['image_tokens_rel_err']:.2e} | {r['prefill_logits_rel_err']:.2e} "
            f"| {r['decode_logits_rel_err']:.2e} | {100 * r['teacher_forced_top1']:.1f}% "
            f"| {r['greedy_prefix']} / {r['greedy_tokens']} | {r['kernel_rel_err']:.1e} "
            f"| {r['weights_bytes'] / 1e6:.2f} MB | {r['decode_weights_bytes_per_call'] / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


_DOC_HEAD = """# Quantization: formats, where they apply, accuracy

Generated by `{command}` (bluelower/eval_quant.py); edit the text there, not here.

## Modes (`bluelower compile --quant`, default `w4a16kv8`)

| mode | decoder linear weights (q/k/v/o, MLP, lm_head) | token-embedding table | ViT + projector linear weights | KV cache |
|---|---|---|---|---|
| `fp32` | fp32 | fp32 | fp32 | fp32 |
| `w8` | INT8 per output channel | INT8 + fp32 scale per row | INT8 per output channel | fp32 |
| `w4a16` | INT4 symmetric, group-wise along K (group 32, `CompileRequest.group_size` / `CompileOptions.extra["group_size"]`) | INT4 + fp16 scale per group of 32 | INT8 per output channel | fp32 |
| `w4a16kv8` | as `w4a16` | as `w4a16` | as `w4a16` | INT8, one scale per (layer, k/v, head, token) (`QuantizeKVCache`, below) |

Activations stay float32 in every mode ("a16" is the target precision on the phone; the
host kernels compute in float32). Norms, the patch-embedding convolution, the ViT's
position embedding and biases stay fp32. Formats and kernels: docs/kernels.md.

## How it is compiled

`QuantizeWeights` (phase `quantization`, bluelower/passes/quantize_weights.py) finds each
linear layer over a weight parameter, `R.call_tir(NT_matmul, (x, W))` after
FuseTransposeMatmul, and replaces it with `R.call_tir(int4_linear_MxNxK_g32, (x,
W.int4_packed, W.int4_scales))` (or `int8_linear`) over two NEW function parameters that
take `W`'s place in the signature. No fp32 or dequantized weight exists at run time; the
kernels dequantize in registers. Shapes the kernels cannot take directly (N or K not a
multiple of 32, e.g. SigLIP's 4304) are zero-padded: the activation along K
(`R.concat` with zeros), the output sliced back to N.

The pass records a parameter table (new name -> source weight, quantizer, args);
`build.py` writes `params.safetensors` from it tensor by tensor (reading one fp32 weight
from the checkpoint or the seeded generator, quantizing it, writing its two parts;
bluelower/lowering/quantized_params.py), so a 3B model never has all fp32 weights in
memory. The manifest lists the new names in `functions.<f>.params`, the bytes each call
reads in `functions.<f>.weights_bytes_per_call` (embedding rows gathered, not the table)
and the table itself in `quantization` (`mode`, `group_size`, `params`, `source_shapes`,
`weights_bytes`). Runtimes bind parameters by name and need no change.

**The token-embedding table.** The decoder's `embed_tokens` table (100096 x 2560 in
BlueLM-V-3B, 1.025 GB in fp32) is used only by lookups, `R.take(table, ids, axis=0)` as
both frontends import them (ONNX also reads `R.shape_of(table)`, which becomes the static
shape). `QuantizeWeights` stores it in a *row* layout with the same quantization rules as
the linear weights (`kernels/quant.py`: `quantize_int4_rows`, `quantize_int8_rows`):

| mode | parameters replacing `...embed_tokens.weight` | bytes (3B) |
|---|---|---|
| `w4a16`, `w4a16kv8` | `.int4_rows_packed` uint8 `[V, K/2]` (two codes per byte, `u = q + 8`, column `2j` in the low nibble) + `.int4_rows_scales` float16 `[V, K/32]` | 144.1 MB |
| `w8` | `.int8_rows_packed` int8 `[V, K]` + `.int8_rows_scales` float32 `[V]` | 256.6 MB |

One row's codes and scales are contiguous, so a lookup reads exactly its rows (the
blocked linear layouts would spread one row over 16/32-byte strides). Each lookup becomes
`R.call_tir(embedding_gather_int4_TxVxK_g32, (ids, packed, scales))`
(`kernels/embedding.py`), which first checks every id is in `[0, V)` and fails with
"token id out of range of the embedding table" otherwise (the fp32 `R.take(...,
mode="fast")` it replaces reads out of bounds unchecked; the CLI and `generate.py` also
reject such prompt ids before running), then dequantizes only the gathered rows
(`float32(code) * float32(scale)`, bit-exact with `dequantize_int4_rows`). The pass's
manifest stats: `embedding_tables_quantized`, `int4_embedding_lookups` /
`int8_embedding_lookups` (tiny: 2, `embed` and `decode`), `embedding_bytes_fp32`,
`embedding_bytes_stored`. The ViT's position embedding stays fp32.

## The INT8 KV cache (`w4a16kv8`)

`QuantizeKVCache` (phase `quantization`, bluelower/passes/quantize_kv_cache.py) runs on
the output of `PlanKVCache` and `FuseAttention`: the cache parameter of `prefill` and
`decode` becomes ONE `int8` buffer `[L, 2, kv_heads, capacity, head_dim + 4]`. Each row
(layer, k|v, head, position) holds `head_dim` codes and then the row's float32 scale as 4
little-endian bytes: `scale = max|x| / 127`, `code = clip(round(x / scale), -127, 127)`,
`x ~= code * scale` (a zero row has scale 0). The in-place write kernels quantize each new
row as they write it (same capacity check); the fused attention kernels read codes and
scales straight from the cache and dequantize in registers (`(q . codes_k) * scale_k`,
`p * scale_v * codes_v`), so no fp32 copy of the cache exists. Signatures keep their
parameter order; the manifest's `kv_cache` gives the pass's `shape`, `dtype: int8`,
`layout`, `bytes` and `bytes_per_token` (and `functions.prefill/decode.inputs` the same
cache type), so runtimes allocating the cache from the manifest need no change.

{kv_sizes}

## `run --check` on a quantized build

An fp32 build must give exactly PyTorch's tokens. A quantized build is checked against
PyTorch run with **the build's own weights, dequantized exactly as the kernels see them**
(`bluelower.reports.eval_quant.check_reference`), so `--check` tests the compiler (the kernels,
the rewrite, the parameter conversion), not the rounding: tokens match unless float
summation order flips a near-tie argmax. The rounding itself is measured below.
With the INT8 KV cache the reference also stores its cache rows through the INT8 format
(quantized and dequantized as they are written), so the check still isolates the compiler.
`run --check --weights FP32.safetensors` still compares with the fp32 model.

## BlueLM-V-3B sizes (from shapes, no weights materialized)

`bluelower.lowering.quant.params.weight_bytes_by_part(load_config("bluelm-v-3b"), mode)`:

{sizes}

## Accuracy against the fp32 PyTorch reference

Seeded random weights (`init_std` of the config), one deterministic image patch and a
24-id random prompt; {tokens} greedy tokens. Columns:
image tokens / prefill logits: `||y - y_ref|| / ||y_ref||`; decode logits: the same,
mean over the decode steps with both models fed the reference's tokens (teacher-forced);
top-1 agreement: share of the {tokens} positions (prefill + decode, teacher-forced) whose
argmax equals the reference's token; greedy: free-running generation, leading tokens
identical to the reference's (EOS does not stop); kernel: max decode-logit error against
PyTorch with the dequantized weights (the kernels' own arithmetic).

Random Gaussian weights have no outlier channels, so these errors are a lower bound
for a real checkpoint's; random models also have flat logit distributions (many near
ties), so the greedy prefix is a pessimistic agreement measure.
"""


def _sizes_table() -> str:
    from ..lowering.models import load_config
    from ..lowering.quant.params import weight_bytes_by_part

    cfg = load_config("bluelm-v-3b")
    lines = ["| mode | decoder linear (incl. lm_head) | bits / weight | embedding table | vision | projector | total |",
             "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        p = weight_bytes_by_part(cfg, mode)
        lines.append(f"| {mode} | {p['decoder_linear'] / 1e9:.3f} GB | {p['decoder_linear_bits_per_weight']:.2f} "
                     f"| {p['decoder_embedding'] / 1e9:.3f} GB | {p['vision'] / 1e9:.3f} GB | {p['projector'] / 1e9:.3f} GB "
                     f"| {p['total'] / 1e9:.3f} GB |")
    return "\n".join(lines)


def _kv_sizes_table() -> str:
    from ..lowering.models import load_config
    from ..passes.quantize_kv_cache import kv_cache_bytes

    lines = ["| model | capacity | fp32 cache | INT8 cache (w4a16kv8) | bytes / token fp32 -> INT8 |", "|---|---|---|---|---|"]
    for name in ("tiny", "bluelm-v-3b"):
        cfg = load_config(name)
        f, q = kv_cache_bytes(cfg, "fp32"), kv_cache_bytes(cfg, "w4a16kv8")
        lines.append(f"| {name} | {f['capacity']} | {f['bytes'] / 2**20:.2f} MiB ({f['bytes']} B) "
                     f"| {q['bytes'] / 2**20:.2f} MiB ({q['bytes']} B) | {f['bytes_per_token']} -> {q['bytes_per_token']} |")
    return "\n".join(lines)


def write_doc(path: str, reports: list, command: str | None = None) -> None:
    """docs/quantization.md from ``evaluate`` reports."""
    if command is None:
        models = " ".join(f"--model {r['model']}" for r in reports)
        command = f"bluelower eval-quant {models} --write-doc {os.path.relpath(path)}"
    text = _DOC_HEAD.format(command=command, sizes=_sizes_table(), kv_sizes=_kv_sizes_table(),
                            tokens=reports[0]["tokens"] if reports else 64)
    for r in reports:
        text += (f"\n### `{r['model']}` (seed {r['seed']}, group size {r['group_size']}, {r['tokens']} tokens)\n\n"
                 + format_table(r) + "\n")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
