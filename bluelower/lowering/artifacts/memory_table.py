"""Memory accounting per phase: weights resident + KV cache + activation arena (+ held tensors).

The figures a build's manifest carries (``memory_plan``) and that ``bluelower inspect memory``
prints, from MemoryPlan's per-function plans and the weights' stored sizes: one computation
for ``compile`` (here) and ``inspect memory --model`` (``reports/memory.py``, which plans
without building).

Phases (the paper's decoupled encoding, docs/memory.md):

* ``image_encoding``: ViT + projector *and* decoder weights resident (both are loaded
  before the user finishes typing), the ``encode_image`` arena for one patch batch, its
  output, and the image tokens of every patch encoded so far (held until prefill). The
  KV cache is allocated when prefill starts (``generate.py`` resets it after encoding).
* ``prefill``: the ViT weights are released; decoder weights, KV cache, the larger of the
  ``embed`` / ``prefill`` arenas, their outputs, the held image tokens.
* ``decode``: decoder weights, KV cache, the ``decode`` arena and outputs.

Outputs that are newly allocated tensors of the KV cache's shape (the importers'
functional cache update) are counted as a second cache (``kv_copy_bytes``); after
``PlanKVCache`` the functions return the cache they were given and there is none.

Weight bytes: ``QuantizeWeights``' parameter table (``lowering/quant/params.py``) for
every linear weight and the token-embedding table, i.e. exactly the parameters a build
writes for them (``w4a16*``: the table INT4 + fp16 scale per 32, row layout, a lookup
dequantizes only the gathered rows; ``w8``: INT8 + fp32 scale per row); without it the
same formula (int4: 0.5 B + fp16 scale per 32 along K; int8: 1 B + fp32 scale per output
channel / row). Weights QuantizeWeights keeps in fp32 (norms, patch-embedding conv,
position embedding, biases) are counted as *assumed* by the deployment: fp16 in
``w4a16*``, fp32 in ``w8``; ``fp32``: 4 B.
Activations are planned at the mode's activation width: fp32 for ``fp32`` / ``w8``, fp16
for ``w4a16*`` (an fp32 graph is planned with 2-byte float elements). ``kv8``: the cache
is int8 + an fp16 scale per (token, head).
"""

from __future__ import annotations

from ...errors import BlueLowerError
from ..quant.modes import kv_cache_bytes as modes_kv_cache_bytes
from ..quant.modes import quant_mode

PHASES = ("image_encoding", "prefill", "decode")


def act_bytes(quant: str) -> int:
    return quant_mode(quant).act_bytes


def plan_dtype_bytes(quant: str) -> dict | None:
    return {"float32": 2} if act_bytes(quant) == 2 else None


def kv_cache_bytes(cfg, quant: str) -> int:
    """The cache as the plan counts it: INT8 rows (QuantizeKVCache's layout) or float
    elements of the planned activation size (``act_bytes``)."""
    mode = quant_mode(quant)
    d, r = cfg.decoder, cfg.runtime
    if d is None:
        return 0
    return modes_kv_cache_bytes(d.num_layers, d.num_kv_heads, d.head_dim, r.kv_capacity, mode.kv_cache,
                                float_bytes=mode.act_bytes)["bytes"]


# bytes per weight of a stored format (int4: + an fp16 scale per group of 32)
_FORMAT_BYTES = {"int4": 0.5 + 2 / 32, "int8": 1.0, None: 4.0}


def estimated_bytes(cfg, quant: str) -> tuple[int, int]:
    """``(parameters, bytes)`` a build of ``cfg`` at ``quant`` needs at least on the device:
    the weights (``ModelConfig.parameter_estimate``, in the mode's stored formats) and the KV
    cache as the build stores it. From the config alone: no module built, nothing traced."""
    mode = quant_mode(quant)
    est = cfg.parameter_estimate()
    weights = (est["decoder"] * _FORMAT_BYTES[mode.decoder] + est["vision"] * _FORMAT_BYTES[mode.vision]
               + est["other"] * _FORMAT_BYTES[None])
    kv = 0
    if cfg.decoder is not None:
        d = cfg.decoder
        kv = modes_kv_cache_bytes(d.num_layers, d.num_kv_heads, d.head_dim, cfg.runtime.kv_capacity,
                                  mode.kv_cache)["bytes"]
    return sum(est.values()), int(weights) + kv


def gb(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9)):
        if n >= scale / 10:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1e6:.3g} MB"


def check_fits(cfg, quant: str, soc) -> int:
    """The estimated bytes (:func:`estimated_bytes`), or one line when they exceed the
    SoC's memory (``memory.capacity``): checked before anything is traced."""
    params, need = estimated_bytes(cfg, quant)
    have = soc.memory.capacity_bytes
    if need > have:
        raise BlueLowerError(f"{cfg.name}: about {params:.3g} parameters; weights and KV cache need at least "
                             f"{gb(need)} at --quant {quant}, more than the {gb(have)} memory of SoC '{soc.name}'")
    return need


def _other_weight_bytes(shape, quant: str) -> int:
    """A weight QuantizeWeights keeps (norms, biases, the position embedding): stored fp32,
    counted at the planned activation size (the APU's 16-bit tensors under ``w4a16*``)."""
    n = 1
    for s in shape:
        n *= int(s)
    return act_bytes(quant) * n


def weight_bytes(cfg, quant: str, recipe=None) -> tuple[dict, str]:
    """``({source weight name: stored bytes}, how)``; ``recipe``: the weights' formats (default:
    the mode's default recipe, as a compile without ``--recipe``)."""
    from ..frontend.weights import model_weight_specs
    from ..quant.params import nbytes, quantized_param_specs

    quant_mode(quant)  # one line for an unknown mode
    specs = model_weight_specs(cfg)
    out = {}
    qspecs, transforms = quantized_param_specs(cfg, quant, recipe=recipe)
    how = "QuantizeWeights parameter specs (linear weights, token-embedding table) + assumed storage of the others"
    for name, (shape, dtype) in qspecs.items():
        if name in transforms:
            src = transforms[name].source
            out[src] = out.get(src, 0) + nbytes(shape, dtype)
    for name, (shape, _dtype) in specs.items():
        if name not in out:
            out[name] = _other_weight_bytes(shape, quant)
    return out, how


def _fn_total(plan: dict) -> int:
    return plan["arena_bytes"]


def nbytes_host(output) -> int:
    """Bytes of a planned output ``[name, planned bytes, shape, dtype]`` at its real dtype."""
    from ...passes.memory_plan import DTYPE_BYTES

    _name, _nb, shape, dtype = output
    n = 1
    for s in shape:
        n *= int(s)
    return n * DTYPE_BYTES[dtype]


def phase_table(cfg, quant: str, sigs_params: dict, plans: dict, n_patches: int | None = None,
                kv_in_place: bool = False, recipe=None) -> dict:
    """Per-phase totals from function plans. ``sigs_params``: entry -> weight names;
    ``recipe``: the weights' formats (:func:`weight_bytes`)."""
    wbytes, how = weight_bytes(cfg, quant, recipe)
    r, d = cfg.runtime, cfg.decoder
    ab = act_bytes(quant)
    vision_w = sum(wbytes[p] for p in sigs_params.get("encode_image", []))
    dec_names = set()
    for fn in ("embed", "prefill", "decode"):
        dec_names |= set(sigs_params.get(fn, []))
    decoder_w = sum(wbytes[p] for p in dec_names)
    kv = kv_cache_bytes(cfg, quant)
    kv_elems = [d.num_layers, 2, d.num_kv_heads, r.kv_capacity, d.head_dim] if d is not None else None

    def outputs(fn: str) -> tuple[int, int]:
        """(non-cache outputs, cache copies)."""
        other = copy = 0
        for _name, nb, shape, _dtype in plans.get(fn, {}).get("outputs", []):
            if list(shape) == kv_elems:
                copy += 0 if kv_in_place else kv
            else:
                other += nb
        return other, copy

    n_patches = n_patches if n_patches is not None else r.image_batch
    width = d.hidden_size if d is not None else (cfg.vision.hidden_size if cfg.vision is not None else 0)
    image_tokens = n_patches * cfg.image_tokens_per_patch * width * ab
    phases = []

    def add(name, weights, kv_b, fns, held, note, sequence=False):
        """``fns``: alternatives (one call at a time, the largest counts) or, with
        ``sequence``, calls made one after another, each consuming the previous one's
        output (TileImagePatches' stages): that output stays alive during the next call."""
        from ...passes.memory_plan import effective

        fns = [f for f in fns if f in plans]
        if not fns:  # a phase the model has no function for (text-only: no image encoding)
            return
        arena = lb = out_b = copy_b = tvm_b = host_b = vm_b = 0
        prev_out = prev_out_host = 0
        for f in fns:
            other, copy = outputs(f)
            a = effective(plans, f, "arena_bytes")
            live = a + other + copy + (prev_out if sequence else 0)
            if live > arena + out_b + copy_b:
                arena, out_b, copy_b = a, other + (prev_out if sequence else 0), copy
            # on the arena's basis: the previous stage's output is in outputs_bytes, not here
            lb = max(lb, effective(plans, f, "liveness_lower_bound_bytes"))
            tvm_b = max(tvm_b, plans[f].get("tvm_static_plan_bytes", 0) + (prev_out_host if sequence else 0))
            # what the host VM requests from its allocator during the call(s): summed over a
            # sequence (the per-call storages are requested anew each call)
            h = effective(plans, f, "tvm_host_alloc_bytes")
            host_b = host_b + h if sequence else max(host_b, h)
            v = effective(plans, f, "vm_alloc_bytes")  # this build's VM: the executed arena or TVM's tokens
            vm_b = vm_b + v if sequence else max(vm_b, v)
            prev_out = other
            prev_out_host = sum(nbytes_host(o) for o in plans[f].get("outputs", []))
        phases.append({
            "name": name, "weights_bytes": weights, "kv_cache_bytes": kv_b, "arena_bytes": arena,
            "liveness_lower_bound_bytes": lb, "outputs_bytes": out_b, "kv_copy_bytes": copy_b,
            "held_bytes": held, "tvm_static_plan_bytes": tvm_b, "tvm_host_alloc_bytes": host_b,
            "vm_alloc_bytes": vm_b,
            "total_bytes": weights + kv_b + arena + out_b + copy_b + held, "functions": list(fns),
            "calls": "sequence" if sequence else "one of", "note": note,
        })

    # the host runtime (generate.py) runs TileImagePatches' two stages
    # when the build has them, not the one-call encode_image: plan what they execute
    stages = ["encode_image_embed", "encode_image_blocks"]
    split = all(f in plans for f in stages)
    add("image_encoding", vision_w + decoder_w, 0, stages if split else ["encode_image"], image_tokens,
        f"ViT + decoder weights resident; arena for one batch of {r.image_batch} patches; "
        f"{n_patches} patches' image tokens held", sequence=split)
    add("prefill", decoder_w, kv, ["embed", "prefill"], image_tokens,
        f"ViT weights released; chunk of {r.prefill_chunk} rows; image tokens held until prefilled")
    add("decode", decoder_w, kv, ["decode"], 0, "one token per call")
    peak = max(phases, key=lambda p: p["total_bytes"]) if phases else {"total_bytes": 0, "name": None}
    return {
        "model": cfg.name, "quant": quant, "peak_bytes": peak["total_bytes"], "peak_phase": peak["name"],
        "phases": phases,
        "kv_capacity": r.kv_capacity, "prefill_chunk": r.prefill_chunk, "image_batch": r.image_batch,
        "image_patches": n_patches, "activation_bytes": ab, "weights_bytes_how": how,
        "kv_update_in_place": kv_in_place or not any(
            list(o[2]) == kv_elems for f in ("prefill", "decode") for o in plans.get(f, {}).get("outputs", [])),
        "functions": {f: {k: v for k, v in p.items() if k not in ("tensors", "outputs")} for f, p in plans.items()},
    }


def manifest_memory_plan(cfg, quant: str, params: dict, plans: dict, recipe=None) -> dict:
    """The manifest's ``memory_plan``: per-function plans (compact offsets) + the phase table.
    ``params``: function -> the model weights it reads; ``recipe``: the build's."""
    table = phase_table(cfg, quant, params, plans, recipe=recipe)
    table["functions"] = {f: {**{k: v for k, v in p.items() if k != "outputs"}, "outputs": p["outputs"]}
                          for f, p in plans.items()}
    return table
