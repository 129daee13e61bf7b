"""Analytic task graph of one BlueLM-V request and its predicted timeline on a SoC.

A request is: encode an image of ``image_grid`` (m wide x n high local 384x384 patches,
plus one global thumbnail when m*n > 1), prefill ``prompt_tokens`` decoder tokens in
chunks, then ``decode_tokens`` single-token steps. FLOPs and bytes come from the model
config's dimensions; each task's cost on each unit comes from
:mod:`bluelower.targets.cost_model`; :func:`bluelower.targets.scheduler.list_schedule`
places the tasks.

Tasks (phase in brackets)

* ``conv[k]`` [image_encode]: SigLIP's patch-embedding Conv2D of patch batch k, fp32, on a
  CPU cluster only (the paper's design: Conv2D on the CPU, transformer blocks on the NPU).
* ``vit[k]`` [image_encode]: the ViT blocks of batch k (depends on ``conv[k]``); with
  ``pipeline=True``, ``conv[k+1]`` does not wait for ``vit[k]``, so the CPU's Conv2D of
  batch k+1 overlaps the APU's ViT of batch k. ``pipeline=False`` chains them.
* ``proj[k]`` [image_encode]: the 2x2 downsampler + MLP projector of batch k.
* ``prefill[c]`` [prefill]: decoder chunk c (depends on chunk c-1 and all projector tasks).
* ``decode[i]`` [decode]: one decode step (depends on the previous step / last chunk).

Counting assumptions (besides those of the cost model):

* A multiply-add is 2 ops. Biases, norms, activations and RoPE add no FLOPs (they are
  O(tokens x width), negligible against the matmuls) but count as operators.
* Weights are read from DRAM once per call: ViT and projector at 8 bits, decoder linear
  layers and lm_head at ``w`` bits plus one fp16 scale per ``group_size`` weights
  (INT4 + fp16 scales per 32 weights = 4.5 bits). The embedding table is gathered (one
  row per token), not streamed.
* Graphs have static shapes (MediaTek's public stack): attention always spans the full
  KV-cache capacity (masked), the last prefill chunk is padded to the chunk size, and
  every decode step reads the whole ``kv_capacity`` cache at ``kv`` bits.
* Only the last prefill chunk runs the lm_head (for the last token).
* The number of compiled-graph calls of a task is ``ceil(operators / max_ops_per_graph)``
  on the APU (1 on a CPU), with the operator counts of ``VIT_LAYER_OPS`` and
  ``DECODER_LAYER_OPS``.
* Activations between layers stay on chip; only task inputs/outputs are counted.
* No time for image loading/resizing (the paper's 0.47 s), tokenization or sampling.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import networkx as nx

from ..errors import BlueLowerError
from ..lowering.models import load_config
from ..lowering.models.config import ModelConfig
from ..targets.cost_model import APU_UNIT, Work, candidate_costs, cost, units_of
from ..runtime_stubs.image import patch_count
from ..targets.scheduler import Schedule, add_task, list_schedule, summarize
from ..targets.soc import SoC, load_soc

#: Operators in one SigLIP encoder layer as the APU sees them (biases folded into matmuls).
VIT_LAYER_OPS = ("layer_norm", "matmul", "matmul", "matmul", "matmul", "softmax", "matmul", "matmul",
                 "add", "layer_norm", "matmul", "gelu", "matmul", "add")
#: Operators in one LLaMA-style decoder layer (SDPA decomposed into matmul/softmax/matmul).
DECODER_LAYER_OPS = ("rms_norm", "matmul", "matmul", "matmul", "rope", "rope", "matmul", "softmax",
                     "matmul", "matmul", "add", "rms_norm", "matmul", "matmul", "silu", "multiply",
                     "matmul", "add")
PROJECTOR_OPS = ("reshape", "concat", "matmul", "matmul", "gelu", "matmul")

VISION_WEIGHT_BITS = 8  # paper: ViT + projector weights INT8
VISION_ACT_DTYPES = ("fp16", "fp32")  # paper: ViT/projector activations FP16
CONV_DTYPES = ("fp32",)  # assumed: the CPU Conv2D runs in fp32


@dataclass(frozen=True)
class Quant:
    """Decoder quantization ``w<bits>a<bits>kv<bits>`` (e.g. ``w4a16kv8``)."""

    weight_bits: int
    act_bits: int
    kv_bits: int
    group_size: int = 32

    @property
    def weight_bytes_per_param(self) -> float:
        scales = 2.0 / self.group_size if self.weight_bits < 16 else 0.0  # one fp16 scale per group
        return self.weight_bits / 8 + scales

    @property
    def act_dtypes(self) -> tuple[str, ...]:
        return {8: ("int8", "int16", "fp16", "fp32"), 16: ("int16", "fp16", "fp32")}[self.act_bits]


def parse_quant(quant: str, group_size: int = 32) -> Quant:
    m = re.fullmatch(r"w(4|8|16)a(8|16)kv(8|16)", quant)
    if not m:
        raise BlueLowerError(f"unknown quantization '{quant}': expected w<4|8|16>a<8|16>kv<8|16>, e.g. w4a16kv8")
    if group_size < 1:
        raise BlueLowerError(f"group_size must be >= 1, got {group_size}")
    return Quant(int(m.group(1)), int(m.group(2)), int(m.group(3)), group_size)


def _calls(n_ops: int, unit_kind: str, max_ops: int) -> int:
    return max(1, math.ceil(n_ops / max_ops)) if unit_kind == "apu" else 1


class RequestModel:
    """FLOPs / bytes / operator counts of each task kind for one model config and quant."""

    def __init__(self, config: ModelConfig, quant: Quant):
        self.cfg, self.q = config, quant
        v, d = config.vision, config.decoder
        self.vit_layer_params = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
        self.vit_tokens = v.num_tokens
        self.patch_tokens = config.image_tokens_per_patch
        pj = config.projector
        self.proj_params = (v.hidden_size * pj.downsample_factor**2 * pj.downsample_size
                            + pj.downsample_size * d.hidden_size + d.hidden_size**2)
        qd, kvd = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        self.dec_layer_params = 2 * d.hidden_size * qd + 2 * d.hidden_size * kvd + 3 * d.hidden_size * d.intermediate_size
        self.lm_head_params = d.vocab_size * d.hidden_size
        self.kv_bytes_per_pos = d.num_layers * 2 * kvd * quant.kv_bits / 8

    # -- vision --------------------------------------------------------------------------
    def conv(self, b: int) -> Work:
        v = self.cfg.vision
        k = v.num_channels * v.patch_size**2
        flops = b * 2 * self.vit_tokens * k * v.hidden_size
        by = k * v.hidden_size * 4 + b * (v.num_channels * v.image_size**2 * 4 + self.vit_tokens * v.hidden_size * 2)
        return Work(flops, by, CONV_DTYPES, frozenset({"conv2d"}), 1)

    def vit(self, b: int) -> tuple[Work, int]:
        v = self.cfg.vision
        P, h = self.vit_tokens, v.hidden_size
        flops = b * v.num_layers * (2 * P * self.vit_layer_params + 4 * P * P * h)
        by = v.num_layers * self.vit_layer_params * VISION_WEIGHT_BITS / 8 + b * 2 * P * h * 2
        n_ops = v.num_layers * len(VIT_LAYER_OPS) + 1  # + post layer norm
        return Work(flops, by, VISION_ACT_DTYPES, frozenset(VIT_LAYER_OPS)), n_ops

    def projector(self, b: int) -> tuple[Work, int]:
        flops = b * 2 * self.patch_tokens * self.proj_params
        by = self.proj_params * VISION_WEIGHT_BITS / 8 + b * (self.vit_tokens * self.cfg.vision.hidden_size * 2
                                                              + self.patch_tokens * self.cfg.decoder.hidden_size * 2)
        return Work(flops, by, VISION_ACT_DTYPES, frozenset(PROJECTOR_OPS)), len(PROJECTOR_OPS)

    # -- decoder -------------------------------------------------------------------------
    def decoder_step(self, tokens: int, lm_head: bool) -> tuple[Work, int]:
        """One decoder call over ``tokens`` new tokens (a prefill chunk or one decode step)."""
        d, r = self.cfg.decoder, self.cfg.runtime
        qd = d.num_heads * d.head_dim
        attn = d.num_layers * 4 * tokens * r.kv_capacity * qd
        params = d.num_layers * self.dec_layer_params + (self.lm_head_params if lm_head else 0)
        flops = 2 * tokens * d.num_layers * self.dec_layer_params + attn + (2 * self.lm_head_params if lm_head else 0)
        by = (params * self.q.weight_bytes_per_param
              + r.kv_capacity * self.kv_bytes_per_pos  # read the (static) cache
              + tokens * self.kv_bytes_per_pos  # write the new entries
              + tokens * d.hidden_size * 2)  # gathered embedding rows (fp16)
        n_ops = 1 + d.num_layers * len(DECODER_LAYER_OPS) + (2 if lm_head else 0)  # gather, layers, norm + head
        kinds = frozenset(DECODER_LAYER_OPS) | {"gather"}
        return Work(flops, by, self.q.act_dtypes, kinds), n_ops


def _costs(work: Work, n_ops: int, soc: SoC, only: list[str] | None = None) -> dict[str, float]:
    """Per-unit seconds, with the call count of each unit kind folded into the work."""
    max_ops = soc.apu.max_ops_per_graph if soc.apu else 1
    out = {}
    for u in units_of(soc):
        if only is not None and u.name not in only:
            continue
        w = Work(work.flops, work.bytes, work.dtypes, work.op_kinds, _calls(n_ops, u.kind, max_ops))
        c = cost(w, u)
        if c is not None:
            out[u.name] = c.seconds
    if not out:
        candidate_costs(work, units_of(soc), only)  # raises the descriptive error
    return out


def build_request_graph(config: ModelConfig, soc: SoC, image_grid: tuple[int, int] | None = (2, 4),
                        prompt_tokens: int = 2048, decode_tokens: int = 64, quant: str = "w4a16kv8",
                        image_batch: int | None = None, prefill_chunk: int | None = None,
                        pipeline: bool = True, group_size: int = 32) -> tuple[nx.DiGraph, dict]:
    """The task DAG of one request (see the module docstring) and a dict describing it."""
    q = parse_quant(quant, group_size)
    rm = RequestModel(config, q)
    B = image_batch or soc.image_batch
    chunk = prefill_chunk or soc.prefill_chunk
    cap = config.runtime.kv_capacity
    if B < 1 or chunk < 1:
        raise BlueLowerError(f"image_batch and prefill_chunk must be >= 1, got {B} and {chunk}")
    if prompt_tokens < 1 or decode_tokens < 0:
        raise BlueLowerError(f"need prompt_tokens >= 1 and decode_tokens >= 0, got {prompt_tokens}, {decode_tokens}")
    if prompt_tokens > cap:
        raise BlueLowerError(f"prompt of {prompt_tokens} tokens exceeds the KV-cache capacity {cap}")
    patches = patch_count(image_grid).total_patches if image_grid else 0
    image_tokens = patches * rm.patch_tokens
    if image_tokens > prompt_tokens:
        raise BlueLowerError(f"the {image_grid[0]}:{image_grid[1]} image alone is {image_tokens} tokens, "
                             f"more than prompt_tokens={prompt_tokens}")
    cpu_units = [c.name for c in soc.cpu_clusters]
    g = nx.DiGraph()
    batches = [B] * (patches // B) + ([patches % B] if patches % B else [])
    proj_names = []
    for k, b in enumerate(batches):
        w = rm.conv(b)
        deps = [f"vit[{k - 1}]"] if (k and not pipeline) else []
        add_task(g, f"conv[{k}]", "image_encode", _costs(w, 1, soc, only=cpu_units), deps=deps,
                 patches=b, flops=w.flops, bytes=w.bytes)
        w, n_ops = rm.vit(b)
        add_task(g, f"vit[{k}]", "image_encode", _costs(w, n_ops, soc), deps=[f"conv[{k}]"],
                 patches=b, flops=w.flops, bytes=w.bytes)
        w, n_ops = rm.projector(b)
        add_task(g, f"proj[{k}]", "image_encode", _costs(w, n_ops, soc), deps=[f"vit[{k}]"],
                 patches=b, flops=w.flops, bytes=w.bytes)
        proj_names.append(f"proj[{k}]")
    n_chunks = math.ceil(prompt_tokens / chunk)
    prev = None
    for c in range(n_chunks):
        last = c == n_chunks - 1
        w, n_ops = rm.decoder_step(chunk, lm_head=last)
        deps = ([prev] if prev else []) + (proj_names if c == 0 else [])
        add_task(g, f"prefill[{c}]", "prefill", _costs(w, n_ops, soc), deps=deps,
                 tokens=min(chunk, prompt_tokens - c * chunk), flops=w.flops, bytes=w.bytes)
        prev = f"prefill[{c}]"
    w, n_ops = rm.decoder_step(1, lm_head=True)
    costs = _costs(w, n_ops, soc)
    for i in range(decode_tokens):
        add_task(g, f"decode[{i}]", "decode", costs, deps=[prev], flops=w.flops, bytes=w.bytes)
        prev = f"decode[{i}]"
    info = {
        "model": config.name, "soc": soc.name, "quant": quant, "group_size": group_size,
        "image_grid": list(image_grid) if image_grid else None, "image_patches": patches,
        "image_tokens": image_tokens, "image_batches": batches, "pipeline": pipeline,
        "prompt_tokens": prompt_tokens, "prefill_chunk": chunk, "prefill_chunks": n_chunks,
        "decode_tokens": decode_tokens, "kv_capacity": cap,
        "decoder_weight_bytes": (config.decoder.num_layers * rm.dec_layer_params + rm.lm_head_params)
        * q.weight_bytes_per_param,
    }
    return g, info


def predict(config: ModelConfig | str, soc: SoC | str, image_grid: tuple[int, int] | None = (2, 4),
            prompt_tokens: int = 2048, decode_tokens: int = 64, quant: str = "w4a16kv8",
            image_batch: int | None = None, prefill_chunk: int | None = None, pipeline: bool = True,
            group_size: int = 32) -> Schedule:
    """List-schedule one request on ``soc``; ``schedule.info`` holds the parameters and a summary.

    ``image_grid=None`` skips the image. Batch and chunk default to the SoC's preferences.
    """
    if isinstance(config, str):
        config = load_config(config)
    if isinstance(soc, str):
        soc = load_soc(soc)
    g, info = build_request_graph(config, soc, image_grid, prompt_tokens, decode_tokens, quant,
                                  image_batch, prefill_chunk, pipeline, group_size)
    units = [u.name for u in units_of(soc)]
    sched = list_schedule(g, units=units, title=f"{config.name} on {soc.name}", info=info)
    sched.info["summary"] = summarize(sched)
    return sched


__all__ = ["predict", "build_request_graph", "parse_quant", "Quant", "RequestModel", "APU_UNIT"]
