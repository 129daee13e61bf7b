"""From a model config (+ weights) to a build directory: import, pass pipeline, TVM build,
parameters, manifest.

The output is written into a temporary sibling directory and renamed into place at the
end, so a failed or interrupted compile never leaves a half-written output directory.
"""

from __future__ import annotations

import json
import os
import platform
import re
import threading
import time
from dataclasses import dataclass

import numpy as np

from ... import __version__, progress
from ...errors import BlueLowerError
from ...validate import check_output_dir
from ..models import spec_for
from ..models.config import ModelConfig
from ..quant.modes import DEFAULT_GROUP_SIZE, DEFAULT_QUANT, quant_mode
from ..quant.params import GPTQ_CARRY, StoredParams, format_policy, param_producer
from ..frontend.weights import model_weight_specs, random_weight, write_safetensors
from ...files import check_interrupted
from .memory_table import check_fits, plan_dtype_bytes
from .bundle import (BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, LIBRARY, PARAMS, TOKENIZER, OutputDir, file_sha256,
                     write_manifest, write_marker)



@dataclass
class CompileRequest:
    model: object = "tiny"  # a shipped config name, a JSON path or a config object
    weights: str | None = None  # safetensors in the module's own weight names (with ``model``)
    checkpoint: str | None = None  # a Hugging Face directory or a GGUF file (instead of ``model``)
    source: object = None  # a ready ModelSource (``api.compile_module``: a user's nn.Module)
    frontend: str = "torch"
    soc: str = "host"
    out_dir: str = "build"
    quant: str = DEFAULT_QUANT
    dump_ir: str | None = None
    disabled_passes: tuple = ()
    seed: int = 0
    group_size: int = DEFAULT_GROUP_SIZE  # INT4 group size (w4a16, w4a16kv8)
    prefill_chunk: int | None = None  # default: the config's runtime.prefill_chunk
    kv_capacity: int | None = None  # default: the config's runtime.kv_capacity
    force: bool = False  # an existing out_dir that is not a bluelower build is moved aside (never deleted)
    staged: bool = False  # out_dir is an empty directory the caller owns and publishes (device bundles)
    recipe: object = None  # quantization rules: a JSON/TOML path or a Recipe (None: the mode's default recipe)
    calibration: str | None = None  # a UTF-8 text: GPTQ for the weights whose rule says method gptq
    # intermediates from MemoryPlan's one arena (AcceptBufferOffsets), not TVM's storage tokens;
    # None: the default (the arena unless --disable-pass leaves out MemoryPlan/AcceptBufferOffsets)
    execute_memory_plan: bool | None = None


def resolve_soc(name_or_path: str):
    """The SoC description (bluelower.targets) for a name or a TOML path; an already
    loaded description (e.g. device.py's Android variant) is returned as it is."""
    from ...targets import soc as soc_mod

    if isinstance(name_or_path, soc_mod.SoC):
        return name_or_path
    return soc_mod.load_soc(name_or_path)


def tool_versions() -> dict:
    import torch
    import tvm

    import onnx

    return {
        "bluelower": __version__,
        "tvm": tvm.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def compile_model(req: CompileRequest) -> dict:
    """Compile ``req.model`` for ``req.soc`` into ``req.out_dir``; return the manifest."""
    import tvm
    from tvm import relax

    from ...passes.ir_utils import result, without_results
    from ...passes.pipeline import BuildContext, check_disabled, run_pipeline
    from ..frontend.importer import import_model

    quant_mode(req.quant)  # a one-line error for an unknown mode
    check_disabled(req.disabled_passes, req.execute_memory_plan)
    recipe = request_recipe(req)  # a bad rule file: one line before the model is read
    model = model_source(req)
    cfg = with_runtime(model.cfg, kv_capacity=req.kv_capacity, prefill_chunk=req.prefill_chunk)
    soc = resolve_soc(req.soc)
    if getattr(soc, "apu", None) is not None and cfg.vision is not None and soc.image_batch != cfg.runtime.image_batch:
        # the APU's preferred patch batch (TileImagePatches compiles the image entry for it)
        cfg = cfg.replace_runtime(image_batch=soc.image_batch)
    # before anything is traced: the SoC (LLVM knows its CPU, a toolchain links its triple),
    # the model fits its memory, the IR dump directory can be written
    target = soc.tvm_target()
    export_kwargs = _export_kwargs(soc)
    check_fits(cfg, req.quant, soc)
    if req.dump_ir:
        check_output_dir(req.dump_ir, "--dump-ir")
    specs = model_weight_specs(cfg)
    source = model.weights
    spec = spec_for(cfg)
    formats = format_policy(req.quant, recipe, group_size=req.group_size,
                            source_dtype=getattr(source, "source_dtype", None))
    calibration = calibration_plan(req, cfg, spec, model, formats)  # its one-line errors before anything is traced

    if req.dump_ir:
        out_abs, ir_abs = os.path.abspath(req.out_dir), os.path.abspath(req.dump_ir)
        if ir_abs == out_abs or ir_abs.startswith(out_abs + os.sep):
            raise BlueLowerError(f"--dump-ir {req.dump_ir} is inside the output directory {req.out_dir}, which the "
                                 "build replaces: choose a directory outside it")
    output = None
    if req.staged:
        tmp = req.out_dir
    else:
        output = OutputDir(req.out_dir, force=req.force)
        tmp = output.open()
    try:
        t_start = time.perf_counter()
        stages = {}
        with progress.step("import"):
            mod, sigs = import_model(cfg, req.frontend)  # weights bind at run time, not at import
        # the plan counts activations at the mode's width, as `inspect memory --model` does
        ctx = BuildContext(target=target, quant=req.quant, group_size=req.group_size, soc=soc, spec=spec,
                           entry_functions=tuple(sigs), image_batch=cfg.runtime.image_batch, weight_formats=formats,
                           plan_dtype_bytes=plan_dtype_bytes(req.quant), execute_memory_plan=req.execute_memory_plan)
        # the parameters are converted and written on a thread from the moment the quantization
        # passes have decided every stored tensor, beside the rest of the pipeline and the TVM build
        cancelled = threading.Event()
        writer = early = None  # early: the stored tensors as the quantization phase left them

        def start_writer(phase, mod_now):
            nonlocal writer, early
            if phase != "quantization" or writer is not None:
                return
            early, _ = stored_params(mod_now, list(sigs), specs)
            prebuild_search_kernels(early, specs)  # on this thread: one TVM compiler call at a time
            writer = _Background(lambda: _write_params(req, tmp, cfg, spec, model, source, specs, early, formats,
                                                       recipe, calibration, cancelled), "write params")
            writer.start()

        try:
            mod, pass_stats = run_pipeline(mod, ctx, disabled=req.disabled_passes, dump_ir_dir=req.dump_ir,
                                           phase_done=start_writer)
            imported = list(sigs)
            if writer is None:  # a pipeline without a quantization phase
                start_writer("quantization", mod)
            stored, sigs = stored_params(mod, imported, specs)
            if (stored.specs, stored.transforms) != (early.specs, early.transforms):
                raise AssertionError("a pass after the quantization phase changed the stored parameters")
            stages["import + passes"] = time.perf_counter() - t_start
            t = time.perf_counter()
            with progress.step("TVM build"):
                ex = relax.build(without_results(mod), target, relax_pipeline=None)
                ex.export_library(os.path.join(tmp, LIBRARY), **export_kwargs)
            stages["TVM build"] = time.perf_counter() - t
        except BaseException:
            cancelled.set()  # the build's error is the one reported; the writer stops at its next tensor
            if writer is not None:
                writer.join(quiet=True)
            raise
        calibrated = writer.join()
        stages["params (beside passes and build)"] = writer.seconds
        files = [LIBRARY, PARAMS]
        manifest = _manifest(cfg, spec, req, soc, target, sigs, pass_stats, source)
        if model.tokenizer is not None:
            manifest["tokenizer"] = _write_tokenizer(tmp, model.tokenizer)
            files.append(TOKENIZER)
        manifest["kv_cache"] = _kv_cache_entry(cfg, sigs, result(mod, "kv_cache"))
        stored.update_manifest(manifest, req.quant, req.group_size, lambda w: spec.weight_role(w) == "embedding")
        if quant_mode(req.quant).quantizes_weights:
            manifest["quantization"]["recipe"] = recipe_manifest(req, recipe)
            manifest["quantization"]["calibration"] = calibration_manifest(calibration, calibrated)
        plans = result(mod, "memory_plan")
        if plans is not None:
            from .memory_table import manifest_memory_plan

            manifest["memory_plan"] = manifest_memory_plan(cfg, req.quant, stored.source_params(), plans, recipe)
        for key in ("apu_partitions", "schedule"):  # PartitionForAPU, ScheduleOperators
            value = result(mod, key)
            if value is not None:
                manifest[key] = value
        manifest["files"] = {f: file_sha256(os.path.join(tmp, f)) for f in files}
        write_manifest(tmp, manifest)
        write_marker(tmp)
        check_interrupted()
        if output is not None:
            output.commit()
    finally:
        if output is not None:
            output.close()
    stages["total"] = time.perf_counter() - t_start
    progress.log("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
    if not req.staged:
        progress.log(f"wrote {os.path.abspath(req.out_dir)}")
    return manifest


def stored_params(mod, imported: list, specs: dict) -> tuple:
    """``(stored, signatures)``: what ``params.safetensors`` holds for ``mod`` (packed weights
    where QuantizeWeights put them) and the entry signatures as the passes left them (packed
    weights, the INT8 cache, added stages), the imported entries first."""
    from ...passes.ir_utils import result
    from ..frontend.entries import module_signatures

    sigs = module_signatures(mod)
    sigs = {**{n: sigs[n] for n in imported if n in sigs}, **{n: s for n, s in sigs.items() if n not in imported}}
    return StoredParams.from_build(sigs, specs, result(mod, "quantized_params", {})), sigs


def prebuild_search_kernels(stored, specs) -> None:
    """Build the scale-search kernels the parameters will use now, before the library's TVM
    build starts beside the weight conversion (one TVM compiler call at a time). A run of
    each on zeros builds it (kernels/search.py caches them per process)."""
    from ..kernels import search

    sizes = set()
    for t in stored.transforms.values():
        shape = specs.get(t.source, ((),))[0]
        gs = int(t.args.get("group_size") or 0)
        if not t.args.get("search") or "int4" not in t.quantizer or not gs or len(shape) != 2:
            continue
        if int(np.prod(shape)) // gs >= search.KERNEL_MIN_GROUPS:
            sizes.add(("asym" in t.quantizer, gs))
    for asym, gs in sorted(sizes):
        zeros = np.zeros((search.KERNEL_MIN_GROUPS, gs), np.float32)
        search.search_asym(zeros) if asym else search.search_sym(zeros, 7, -8)


class _Background:
    """``fn()`` on a thread; :meth:`join` returns its result or raises its exception."""

    def __init__(self, fn, name: str):
        self.seconds = 0.0
        self._fn, self._out, self._exc = fn, None, None
        self._thread = threading.Thread(target=self._run, name=f"bluelower-{name}", daemon=True)

    def _run(self):
        t = time.perf_counter()
        try:
            self._out = self._fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the main thread by join)
            self._exc = exc
        self.seconds = time.perf_counter() - t

    def start(self):
        self._thread.start()

    def join(self, quiet: bool = False):
        """Wait for it; its result, or its exception re-raised (``quiet``: not raised)."""
        while self._thread.is_alive():
            self._thread.join(0.2)  # wakes up for the main thread's signal handler
        if self._exc is not None and not quiet:
            raise self._exc
        return self._out


class _Cancelled(Exception):
    """The build failed beside the parameter writer: stop converting."""


def _write_params(req, tmp, cfg, spec, model, source, specs, stored, formats, recipe, calibration, cancelled):
    """Convert and write ``params.safetensors`` (GPTQ first where the rules ask for it);
    return the calibration result (or None)."""
    def produce(name: str) -> np.ndarray:
        if cancelled.is_set():
            raise _Cancelled()
        if source is not None:
            return source.read(name).astype(np.float32)
        return random_weight(name, specs[name][0], req.seed, cfg.runtime.init_std)

    read_quantized = getattr(source, "read_quantized", None)
    codes = calibrated = None
    targets = {t.source for t in stored.transforms.values() if t.args.get("carry") == GPTQ_CARRY}
    try:
        if targets:  # GPTQ for exactly the weights the pass gave the calibrated codes' carry
            from ..quant.calibrated import CodeStore, calibrate

            if calibration is None:
                raise BlueLowerError(f"{recipe.source}: the rules ask for method 'gptq' (for "
                                     f"{sorted(targets)[0]}): add --calibration FILE")

            codes = CodeStore(os.path.join(tmp, ".calibration"))
            calibrated = calibrate(source, cfg, spec, formats, targets, calibration["sequences"], codes)
            base = read_quantized

            def read_quantized(name: str):
                return codes.read_quantized(name) if name in codes else base(name)

        write_safetensors(
            os.path.join(tmp, PARAMS),
            stored.safetensors_specs(),
            param_producer(stored.transforms, produce, read_quantized),
            label="write params",
        )
    finally:
        if codes is not None:
            codes.close()
    return calibrated


def request_recipe(req: CompileRequest):
    """The recipe the build stores weights by: ``req.recipe`` (a rule file, read by
    ``load_recipe``: one-line errors; or a Recipe), else the mode's default recipe
    (``params.mode_recipe``), with GPTQ on the decoder linears under ``--calibration``
    (``recipe.calibrated_recipe``). ``--quant fp32`` takes neither rules nor calibration."""
    from ..quant.params import mode_recipe
    from ..quant.recipe import Recipe, calibrated_recipe, load_recipe

    if not quant_mode(req.quant).quantizes_weights and (req.recipe is not None or req.calibration):
        which = "--recipe" if req.recipe is not None else "--calibration"
        raise BlueLowerError(f"{which} applies to a mode that quantizes weights; --quant {req.quant} stores every "
                             "weight fp32")
    if req.recipe is None:
        recipe = mode_recipe(req.quant, req.group_size)
        return calibrated_recipe(recipe) if req.calibration else recipe
    if isinstance(req.recipe, Recipe):
        return req.recipe
    return load_recipe(str(req.recipe))


def calibration_plan(req: CompileRequest, cfg, spec, model, formats) -> dict | None:
    """Checks of the recipe's GPTQ rules against ``--calibration``, before anything is traced:
    rules asking for GPTQ need a calibration text; a calibration text needs a LLaMA-family
    model with a tokenizer, at least one sequence of tokens and a rule asking for GPTQ (a
    GGUF's quantized tensors are carried instead: a note, not an error). Returns None without
    ``--calibration``, else ``{"text", "sequences"}``."""
    from ..quant.params import linear_weight_names

    recipe = formats.recipe
    linear = dict(linear_weight_names(cfg))
    if cfg.decoder is not None and getattr(cfg.decoder, "tie_word_embeddings", False):
        for name, (shape, _dtype) in model_weight_specs(cfg).items():
            if spec.weight_role(name) == "embedding" and len(shape) == 2:
                linear[name] = tuple(shape)  # the logits' use of a tied table
    wanted = [n for n, shape in linear.items()
              if (c := formats(n, spec.weight_role(n), tuple(shape), "linear")) is not None and c.carry == GPTQ_CARRY]
    if not req.calibration:
        if wanted:
            raise BlueLowerError(f"{recipe.source}: the rules ask for method 'gptq' (e.g. for {wanted[0]}), which "
                                 "chooses codes on a calibration text: add --calibration FILE")
        return None
    from ..quant.calibrated import calibration_sequences, check_calibration_model, read_calibration_text

    text = read_calibration_text(req.calibration)
    check_calibration_model(cfg, model.tokenizer, req.calibration)
    if not recipe.uses_gptq:
        if req.recipe is None:
            raise BlueLowerError(f"--calibration {req.calibration}: --quant {req.quant} stores no decoder linear in a "
                                 "group-wise format GPTQ calibrates (int4, int4_asym, int8_group): use a w4 mode, or "
                                 "--recipe with \"method\": \"gptq\" rules")
        raise BlueLowerError(f"--calibration {req.calibration}: no rule of {recipe.source} asks for method 'gptq': "
                             "add \"method\": \"gptq\" to the rules to calibrate, or drop --calibration")
    sequences = calibration_sequences(text, model.tokenizer, cfg)
    if not wanted:
        progress.log(f"calibration: nothing to calibrate (every weight a 'gptq' rule selects is stored as the "
                     f"checkpoint's own quantized bits or kept fp32)")
    return {"text": text, "sequences": sequences}


def recipe_manifest(req: CompileRequest, recipe) -> dict:
    """The manifest's ``quantization.recipe``: where the rules came from and the rules."""
    data = recipe.to_data()
    path = None if req.recipe is None or not isinstance(req.recipe, (str, os.PathLike)) else os.path.abspath(req.recipe)
    return {"file": path, "sha256": recipe.sha256,
            "default": f"{req.quant}{' + gptq' if req.calibration else ''}" if req.recipe is None else None,
            "description": data.get("description", ""), "rules": data["rules"]}


def calibration_manifest(plan: dict | None, result) -> dict | None:
    """The manifest's ``quantization.calibration`` (None without ``--calibration``)."""
    if plan is None:
        return None
    from ..quant.gptq import DEFAULT_DAMP

    seqs = plan["sequences"]
    return {"file": os.path.abspath(plan["text"].path), "sha256": plan["text"].sha256, "method": "gptq",
            "tokens": int(sum(len(s) for s in seqs)), "sequences": len(seqs),
            "sequence_length": int(max(len(s) for s in seqs)), "damp": DEFAULT_DAMP, "act_order": False,
            "weights": result.weights if result is not None else 0}


def model_source(req: CompileRequest):
    """The request's config, weights and tokenizer (``frontend/sources.py``)."""
    from ..frontend.sources import checkpoint_source, config_source

    if req.source is not None:
        return req.source
    if req.checkpoint is not None:
        if req.weights:
            raise BlueLowerError("--weights goes with --model; a checkpoint (--hf / --gguf) carries its own weights")
        return checkpoint_source(req.checkpoint, kv_capacity=req.kv_capacity, prefill_chunk=req.prefill_chunk)
    return config_source(req.model, req.weights)


def with_runtime(cfg: ModelConfig, kv_capacity: int | None = None, prefill_chunk: int | None = None) -> ModelConfig:
    """``cfg`` compiled for another KV-cache capacity / prefill chunk (``--kv-capacity``,
    ``--prefill-chunk``): the chunk must divide the capacity."""
    for flag, value in (("--kv-capacity", kv_capacity), ("--prefill-chunk", prefill_chunk)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BlueLowerError(f"{flag} must be a positive integer, got {value}")
    cap = kv_capacity if kv_capacity is not None else cfg.runtime.kv_capacity
    chunk = prefill_chunk if prefill_chunk is not None else cfg.runtime.prefill_chunk
    if cap % chunk != 0:
        which = "--prefill-chunk" if prefill_chunk is not None else "the config's prefill chunk"
        raise BlueLowerError(f"{which} {chunk} must be a positive divisor of the KV cache capacity {cap}")
    if (cap, chunk) == (cfg.runtime.kv_capacity, cfg.runtime.prefill_chunk):
        return cfg
    return cfg.replace_runtime(kv_capacity=cap, prefill_chunk=chunk)


def with_prefill_chunk(cfg: ModelConfig, chunk: int) -> ModelConfig:
    """``cfg`` compiled for another prefill chunk (``compile --prefill-chunk N``)."""
    return with_runtime(cfg, prefill_chunk=chunk)


def _write_tokenizer(build_dir: str, info) -> dict:
    """``tokenizer.json`` into the build and the manifest's ``tokenizer`` section, with the
    chat template's single-turn prompt split around the user's text (``chat_prompt``: what a
    runtime without Jinja, the native one, wraps a prompt in)."""
    from ...runtime_stubs.text import Tokenizer, chat_prompt_parts

    with open(os.path.join(build_dir, TOKENIZER), "w", encoding="utf-8") as fh:
        fh.write(info.json_text)
    out = info.manifest()
    plain = Tokenizer(info.json_text)
    out["bos_token"] = plain.id_to_token(info.bos_token_id) if info.bos_token_id is not None else None
    out["eos_token"] = plain.id_to_token(info.eos_token_ids[0]) if info.eos_token_ids else None
    tok = Tokenizer(info.json_text, bos_token=out["bos_token"], eos_token=out["eos_token"],
                    chat_template=info.chat_template)
    out["chat_prompt"] = chat_prompt_parts(tok, info.chat_template) if info.chat_template else None
    out.update(native_prompt_parts(tok, info.chat_template, out["chat_prompt"], info.image_token))
    return out


# Marks the user's text in a compile-time render (a private-use character no template or
# tokenizer gives a meaning to); probes check that the split reproduces real renders.
_NATIVE_MARK = "\U000f0004"
_NATIVE_PROBES = ("What is in this picture?", "  spaced\n\nlines  ", "\tx y\u3000")
_USER_TEXT = {"verbatim": lambda t: t, "strip": str.strip}


def native_prompt_parts(tok, template: str | None, chat_prompt: dict | None, image_token: str | None) -> dict:
    """What a runtime without Jinja (``bluelower-run``) needs besides ``chat_prompt`` so that
    its ids are ``text.build_prompt``'s:

    * ``user_text``: how the template writes the user's text: ``"verbatim"`` (``prefix +
      text + suffix``), ``"strip"`` (the template trims it, as Llama 3's ``| trim``), or None
      when neither reproduces the template's own renders of a few probe texts;
    * ``chat_prompt_image``: the image-first user turn as ``prefix`` + IMAGE + ``middle`` +
      text + ``suffix``, encoded as ``encode(prefix)``, IMAGE, ``encode_piece(middle + text +
      suffix)``. At the template's ``image_token`` placeholder when it renders image parts
      and writes it once, before the text; else (a text-only template) ``chat_prompt`` with
      the image just before the user's text. None without a template, or when the image
      turn cannot be split (the placeholder twice or after the text, no ``user_text``).
    """
    none = {"user_text": None, "chat_prompt_image": None}
    if not template:
        return none
    from ...runtime_stubs.text import ChatTemplateError, image_placeholder_positions, render_chat

    def render(content):
        return render_chat(template, [{"role": "user", "content": content}], add_generation_prompt=True,
                           bos_token=tok.bos_token, eos_token=tok.eos_token)

    def image_turn(text):
        return render([{"type": "image"}, {"type": "text", "text": text}])

    image_parts = None  # (prefix, middle, suffix) around the placeholder and the text
    if image_token:
        try:
            rendered = image_turn(_NATIVE_MARK)
        except ChatTemplateError:
            rendered = None  # a text-only template: content must be a string
        spans = image_placeholder_positions(rendered, image_token) if rendered is not None else []
        if len(spans) > 1:
            return none  # build_prompt refuses it too
        if spans:
            (start, end), = spans
            if _NATIVE_MARK in rendered[:start] or rendered[end:].count(_NATIVE_MARK) != 1:
                return none
            image_parts = (rendered[:start],) + tuple(rendered[end:].split(_NATIVE_MARK))
    if image_parts is None and chat_prompt is None:
        return none
    for mode, f in _USER_TEXT.items():
        try:
            ok = chat_prompt is None or all(
                render(p) == chat_prompt["prefix"] + f(p) + chat_prompt["suffix"] for p in _NATIVE_PROBES)
            if ok and image_parts is not None:
                pre, mid, suf = image_parts
                ok = all(image_turn(p) == pre + image_token + mid + f(p) + suf for p in _NATIVE_PROBES)
        except ChatTemplateError:
            ok = False
        if ok:
            break
    else:
        return none
    if image_parts is None:
        image_parts = (chat_prompt["prefix"], "", chat_prompt["suffix"])
    return {"user_text": mode, "chat_prompt_image": dict(zip(("prefix", "middle", "suffix"), image_parts))}


# model.so without debug sections: the DWARF TVM emits records the kernels' source lines,
# so a comment moved in a kernel file would change the library; linked with -S its bytes
# depend on the code alone (and it is smaller)
LINK_OPTIONS = ("-Wl,-S",)


# the triples a compile links a library for (Android: ``build --ndk``, its own fcompile)
LINKABLE_TRIPLE = re.compile(r"^(x86_64|aarch64)-(?:[A-Za-z0-9_]+-)?linux-gnu$")


def _export_kwargs(soc) -> dict:
    """How ``export_library`` links ``model.so`` for ``soc``; one line (before anything is
    traced) for a triple no toolchain here links."""
    fcompile = getattr(soc, "fcompile", None)
    if callable(fcompile):
        return {"fcompile": fcompile(), "options": list(LINK_OPTIONS)}
    if getattr(soc, "is_host", True):
        return {"options": list(LINK_OPTIONS)}
    from .toolchains.gnu import cross_fcompile, host_arch  # aarch64-linux-gnu-g++, clear error if missing

    triple = str(soc.triple)
    if not LINKABLE_TRIPLE.match(triple):
        raise BlueLowerError(f"{soc.source or soc.name}: 'triple': no toolchain links a library for '{triple}' "
                             "(supported: x86_64 / aarch64 *-linux-gnu, Android with `bluelower build --ndk`)")
    if triple.split("-")[0] == host_arch():
        return {"options": list(LINK_OPTIONS)}
    return {"fcompile": cross_fcompile(triple), "options": list(LINK_OPTIONS)}


def _manifest(cfg: ModelConfig, spec, req: CompileRequest, soc, target, sigs, pass_stats, source) -> dict:
    d, r = cfg.decoder, cfg.runtime
    functions = {}
    for name, sig in sigs.items():
        functions[name] = sig.to_dict()
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": cfg.to_dict(),
        "soc": soc.name,
        "target": _target_dict(target),
        "frontend": req.frontend,
        "quant": req.quant,
        "tool_versions": tool_versions(),
        "inputs": {
            "config_sha256": _config_sha(cfg),
            "weights_sha256": source.sha256() if source is not None else None,
            "weights_path": os.path.abspath(source.path) if getattr(source, "path", None) and not req.checkpoint else None,
            "checkpoint": os.path.abspath(req.checkpoint) if req.checkpoint else None,
            "seed": req.seed,
        },
        "runtime": {
            "kv_capacity": r.kv_capacity,
            "prefill_chunk": r.prefill_chunk,
            "image_batch": r.image_batch,
            "max_patches": int(getattr(soc, "max_patches", 9)),
            "eos_token_id": r.eos_token_id,
            "stop_token_ids": list(r.stop_token_ids),
            "bos_token_id": r.bos_token_id,
            "image_token_id": r.image_token_id,
            "image_size": cfg.vision.image_size if cfg.vision is not None else None,
            "image_tokens_per_patch": cfg.image_tokens_per_patch,
            "hidden_size": d.hidden_size if d is not None else None,
            "vocab_size": d.vocab_size if d is not None else None,
            "image_mean": list(spec.image_mean),
            "image_std": list(spec.image_std),
        },
        "functions": functions,
        "passes": pass_stats,
    }


def _kv_cache_entry(cfg: ModelConfig, sigs: dict, produced: dict | None) -> dict:
    """The manifest's ``kv_cache``: what the pipeline produced. ``QuantizeKVCache`` reports
    the INT8 buffer (shape, dtype, layout). Otherwise the cache is the float32 ``kv_cache``
    input of ``decode``; None for a model without a decoder."""
    if produced and produced.get("dtype"):
        keys = ("shape", "dtype", "layout", "scale_dtype", "bytes", "bytes_per_token")
        return {k: produced[k] for k in keys if k in produced}
    shape = spec_for(cfg).kv_cache_shape(cfg)
    if shape is None:
        return None
    shape = list(shape)
    dtype = "float32"
    for inp in getattr(sigs.get("decode"), "inputs", []):
        if inp.get("name") == "kv_cache":
            shape, dtype = list(inp["shape"]), str(inp["dtype"])
    elems = 1
    for x in shape:
        elems *= int(x)
    itemsize = int(np.dtype(dtype).itemsize)
    return {"shape": shape, "dtype": dtype, "layout": f"{dtype} [L, 2 (k, v), kv_heads, capacity, head_dim]",
            "bytes": elems * itemsize, "bytes_per_token": elems * itemsize // int(shape[3])}


def _config_sha(cfg: ModelConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def _target_dict(target) -> dict:
    out = {"kind": target.kind.name}
    for key in ("mtriple", "mcpu", "mattr", "num-cores"):
        if key in target.attrs:
            value = target.attrs[key]
            out[key] = [str(v) for v in value] if key == "mattr" else (int(value) if key == "num-cores" else str(value))
    return out
