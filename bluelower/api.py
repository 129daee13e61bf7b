"""The Python API: what ``cli.py`` and the tests call.

* :func:`compile` a model for a SoC into a build directory (library, parameters, manifest);
* :func:`bundle` a device bundle (build + native runtime + TVM runtime libraries + tarball);
* :func:`run` a build (host Relax VM or the bundle's native binary), optionally checked
  against the PyTorch reference;
* :func:`init_weights`, :func:`inspect_image`, :func:`inspect_memory`,
  :func:`inspect_schedule`, :func:`eval_quant`: the other commands.

Every user error is a :class:`~bluelower.errors.BlueLowerError` (one line, an exit code).
"""

from __future__ import annotations

import json
import os

from .errors import BlueLowerError
from .lowering.quant.modes import DEFAULT_GROUP_SIZE, DEFAULT_QUANT

POLICIES = ("relaxed", "anyres", "internvl", "none")


def compile(model="tiny", output: str = "build", *, checkpoint: str | None = None, soc: str = "host",  # noqa: A001
            quant: str = DEFAULT_QUANT, weights: str | None = None, frontend: str = "torch", dump_ir: str | None = None,
            disable_passes=(), seed: int = 0, group_size: int = DEFAULT_GROUP_SIZE, prefill_chunk: int | None = None,
            kv_capacity: int | None = None, force: bool = False, recipe=None, calibration: str | None = None,
            execute_memory_plan: bool | None = None) -> dict:
    """Compile ``model`` (a shipped config name, a JSON path or a config object; or
    ``checkpoint``: a Hugging Face directory or a GGUF file) for ``soc`` into ``output``;
    return the manifest. An existing ``output`` that is not a bluelower build is refused
    unless ``force`` (then it is moved aside to ``output.old``; docs/cli.md, "Output safety").
    ``recipe``: quantization rules (a JSON/TOML path or a ``quant.recipe.Recipe``; default:
    the mode's default recipe); ``calibration``: a UTF-8 text, GPTQ for the weights whose rule
    says method gptq (without ``recipe``: the default recipe with GPTQ on the decoder
    linears); docs/quantization.md. ``execute_memory_plan``: intermediates are allocated from
    MemoryPlan's one arena per call (docs/memory.md), not TVM's storage tokens; None (the
    default): yes unless ``disable_passes`` leaves out MemoryPlan or AcceptBufferOffsets."""
    from .lowering.artifacts.compile import CompileRequest, compile_model

    return compile_model(CompileRequest(model=model, weights=weights, checkpoint=checkpoint, frontend=frontend, soc=soc,
                                        out_dir=output, quant=quant, dump_ir=dump_ir,
                                        disabled_passes=tuple(disable_passes), seed=seed, group_size=group_size,
                                        prefill_chunk=prefill_chunk, kv_capacity=kv_capacity, force=force,
                                        recipe=recipe, calibration=calibration,
                                        execute_memory_plan=execute_memory_plan))


def compile_module(module, entries, output: str = "build", *, name: str | None = None, roles=None,
                   soc: str = "host", quant: str = "fp32", group_size: int = DEFAULT_GROUP_SIZE,
                   dump_ir: str | None = None, disable_passes=(), recipe=None) -> dict:
    """Compile any ``torch.nn.Module`` through the same pipeline: ``entries`` maps a method of
    the module (``"forward"``, ...) to its example inputs (a tuple of tensors: the compiled
    function's static shapes and dtypes), or is the example inputs of ``forward`` itself.
    ``roles`` gives the weights' roles for ``quant`` (a dict or a function name -> role;
    default: every linear weight a decoder linear, every lookup table a token embedding), and
    ``recipe`` their formats (as for :func:`compile`; default: the mode's default recipe).
    Tracing is on meta tensors (tensors an entry creates must take an input's device); the
    weights are the module's own. Returns the manifest; the build runs with
    ``runtime_stubs.generate.CompiledModel(output).call(name, *inputs)``."""
    from .lowering.artifacts.compile import CompileRequest, compile_model
    from .lowering.frontend.sources import module_source

    if not isinstance(entries, dict):
        entries = {"forward": tuple(entries)}
    source = module_source(module, entries, name=name, roles=roles)
    return compile_model(CompileRequest(model=source.cfg, source=source, soc=soc, out_dir=output, quant=quant,
                                        dump_ir=dump_ir, disabled_passes=tuple(disable_passes), group_size=group_size,
                                        recipe=recipe))


def bundle(model="tiny", output: str = "dist", *, checkpoint: str | None = None, soc: str = "dimensity9300",
           quant: str = DEFAULT_QUANT, weights: str | None = None, seed: int = 0, tarball: str | None = None,
           ndk: str | None = None, android_api: int | None = None, tvm_runtime_dir: str | None = None,
           tvm_source: str | None = None, kv_capacity: int | None = None, prefill_chunk: int | None = None,
           force: bool = False, recipe=None, calibration: str | None = None,
           execute_memory_plan: bool | None = None) -> dict:
    """A device bundle in ``output`` and its reproducible tarball; return a summary (paths,
    tarball SHA-256, architecture, files). ``force``, ``recipe``, ``calibration``: as for
    :func:`compile` (``force`` for the directory and the tarball)."""
    from .lowering.artifacts.device import build_bundle

    return build_bundle(model=model, soc=soc, out_dir=output, quant=quant, weights=weights, seed=seed, tarball=tarball,
                        ndk=ndk, android_api=android_api, tvm_runtime_dir=tvm_runtime_dir, tvm_source=tvm_source,
                        checkpoint=checkpoint, kv_capacity=kv_capacity, prefill_chunk=prefill_chunk, force=force,
                        recipe=recipe, calibration=calibration, execute_memory_plan=execute_memory_plan)


def image_patches(manifest: dict, image, policy: str = "relaxed", max_patches: int | None = None, fits=None):
    """Preprocess ``image`` (a path) for a build: ``(patches [k, 3, S, S] or None, grid or None)``.
    ``fits(image_rows)`` is called with the rows the image will take once its grid is known,
    before any patch is preprocessed (the KV-cache check of a large image)."""
    from .runtime_stubs.image import load_image, preprocess_image, select_grid
    from .validate import LIMITS, check_int

    if image is None:
        return None, None
    if policy not in POLICIES:
        raise BlueLowerError(f"unknown --policy '{policy}' (valid: {', '.join(POLICIES)})")
    rt = manifest["runtime"]
    if rt.get("image_size") is None:
        raise BlueLowerError("this build has no image encoder (a text-only model): drop --image")
    if max_patches is not None:
        check_int(max_patches, *LIMITS["max_patches"], "--max-patches")
    img = load_image(image)
    grid = None
    if policy != "none":
        limit = max_patches if max_patches is not None else int(rt.get("max_patches", 9))
        height, width = img.shape[:2]
        grid = select_grid(width, height, policy=policy, max_patches=limit, image_size=rt["image_size"])
    if fits is not None:
        count = 1 if grid is None or grid[0] * grid[1] == 1 else grid[0] * grid[1] + 1  # + the global thumbnail
        fits(count * int(rt.get("image_tokens_per_patch") or 0))
    patches = preprocess_image(img, grid=grid, image_size=rt["image_size"],
                               mean=tuple(rt["image_mean"]), std=tuple(rt["image_std"]))
    return patches, grid


def parse_prompt_ids(text: str) -> list[int]:
    """``--prompt-ids 1,2,3`` as the native runtime parses it (``runtime_stubs/text.py``)."""
    from .runtime_stubs.text import parse_prompt_ids as parse

    return parse(text)


def run(build_dir: str, *, image: str | None = None, prompt: str | None = None, prompt_ids=(), system: str | None = None,
        max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
        check: bool = False, weights: str | None = None, native: bool = False, policy: str | None = None,
        max_patches: int | None = None, on_text=None) -> dict:
    """Generate from a build: the image's tokens and the prompt, then new tokens until a stop id.

    ``prompt``: text, wrapped in the checkpoint's chat template (``system``: an optional system
    message) and tokenized with the build's tokenizer; the image's rows go where the template
    puts the image (docs/compile-your-own-model.md). ``prompt_ids``: token ids instead (the
    image first). Greedy unless ``temperature`` > 0 (then ``top_k`` / ``top_p``, reproducible
    with ``seed``). ``on_text(chunk)`` receives the decoded text as it is generated.

    Returns ``{"tokens", ...}`` (+ ``"text"`` with a tokenizer; the host runtime's timings and
    prompt rows, or what the native binary printed). With ``check`` the PyTorch reference of
    the build (its dequantized weights for a quantized build) generates from the same inputs:
    ``reference_tokens`` and ``match`` are added."""
    from .lowering.artifacts.bundle import read_manifest
    from .runtime_stubs.generate import CompiledModel, check_capacity, generate, load_tokenizer
    from .runtime_stubs.text import Sampler, build_prompt, check_prompt_ids

    policy = policy or "relaxed"
    manifest = read_manifest(build_dir)
    rt = manifest["runtime"]
    if rt.get("vocab_size") is None:
        raise BlueLowerError(f"{build_dir} has no decoder (an image encoder alone): there is nothing to generate with")
    capacity = rt["kv_capacity"]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= capacity:
        raise BlueLowerError(f"--max-new-tokens {max_new_tokens} is out of range [1, {capacity}] (the build's KV "
                             "cache capacity)")
    tokenizer = load_tokenizer(build_dir, manifest)
    if prompt is not None and len(prompt_ids):
        raise BlueLowerError("give --prompt or --prompt-ids, not both")
    if prompt is not None:
        if tokenizer is None:
            raise BlueLowerError(f"{build_dir} has no tokenizer (compiled from a config, not a checkpoint): "
                                 "give --prompt-ids")
        info = manifest.get("tokenizer") or {}
        segments = build_prompt(tokenizer, info.get("chat_template"), prompt, has_image=image is not None,
                                image_placeholder=info.get("image_token"), system=system)
        segments = _wrap_image(tokenizer, segments, info.get("image_wrap") or ("", ""))
    else:
        segments = check_prompt_ids(prompt_ids, rt["vocab_size"])
    n_ids = sum(len(seg) for seg in segments if isinstance(seg, list)) if prompt is not None else len(segments)

    def fits(image_rows: int) -> None:
        check_capacity(image_rows, n_ids, max_new_tokens, capacity)

    if image is None:
        fits(0)

    def sampler():
        return None if temperature == 0 and top_k == 0 and top_p == 1.0 else Sampler(temperature, top_k, top_p, seed)

    # the native binary decodes and streams the text itself
    stream = tokenizer.stream(skip_special_tokens=True) if tokenizer is not None and on_text is not None and not native \
        else None

    def on_token(tok):
        if stream is not None:
            piece = stream.put(tok)
            if piece:
                on_text(piece)

    if native:
        if policy not in ("none", "relaxed"):
            raise BlueLowerError("--native implements --policy relaxed and none only")
        if sampler() is not None:
            raise BlueLowerError("--native generates greedily: drop --temperature/--top-k/--top-p, or run without --native")
        if prompt is not None and system is not None:
            raise BlueLowerError("--native has no --system: the binary wraps the text in the chat prompt rendered at "
                                 "compile time, which has no system message (drop --system, or run without --native)")
        out = _run_native(build_dir, image, segments if prompt is None else None, max_new_tokens, policy, max_patches,
                          prompt=prompt, on_text=on_text)
        patches = image_patches(manifest, image, policy, max_patches, fits)[0] if check else None
        if prompt is not None:  # the binary's own encoding against build_prompt's (the reference's input)
            ids = [i for seg in segments if isinstance(seg, list) for i in seg]
            before = next((sum(len(s) for s in segments[:k]) for k, s in enumerate(segments) if not isinstance(s, list)),
                          None)
            out["prompt_match"] = out.get("prompt_ids") == ids and out.get("image_position") == before
    else:
        patches, grid = image_patches(manifest, image, policy, max_patches, fits)  # before the build is loaded
        compiled = CompiledModel(build_dir)
        out = generate(compiled, patches, segments, max_new_tokens, sampler=sampler(), on_token=on_token).to_json()
        if grid is not None:
            out["grid"] = list(grid)
            out["patches"] = int(patches.shape[0])
    if stream is not None:
        rest = stream.flush()
        if rest:
            on_text(rest)
    if tokenizer is not None and "text" not in out:  # (the native binary's own text is kept)
        out["text"] = tokenizer.decode(out["tokens"], skip_special_tokens=True)
    if check:
        from .reports.eval_quant import check_reference
        from .runtime_stubs.generate import reference_for_build

        ref = generate(check_reference(build_dir, weights), patches, segments, max_new_tokens, sampler=sampler())
        out["reference_tokens"] = ref.tokens
        out["match"] = ref.tokens == out["tokens"] and out.get("prompt_match", True)
        if manifest.get("quant", "fp32") != "fp32" and not native:
            out["vs_fp32"] = _distance_to_fp32(compiled, reference_for_build(build_dir, weights), patches, segments,
                                               out["tokens"])
    return out


def _distance_to_fp32(compiled, fp32, patches, segments, tokens) -> dict:
    """How far a quantized build is from the fp32 model on the tokens it generated, both
    teacher-forced on them: top-1 agreement (the fp32 model's argmax is the build's token) and
    the largest logit difference."""
    import numpy as np

    from .runtime_stubs.generate import generate

    ours = generate(compiled, patches, segments, len(tokens), forced=tokens, keep_logits=True).logits
    theirs = generate(fp32, patches, segments, len(tokens), forced=tokens, keep_logits=True).logits
    agree = float(np.mean(np.argmax(theirs, axis=-1) == np.asarray(tokens)))
    return {"top1_agreement": round(agree, 4), "max_logit_error": float(np.abs(ours - theirs).max()),
            "fp32_greedy_equal": bool(np.all(np.argmax(theirs, axis=-1) == np.asarray(tokens)))}


def _wrap_image(tokenizer, segments: list, wrap) -> list:
    """The checkpoint processor's text around the image's rows (Idefics3's
    ``<fake_token_around_image><global-img>`` ... ``<fake_token_around_image>``)."""
    before, after = wrap
    out = []
    for seg in segments:
        if isinstance(seg, list):
            out.append(seg)
            continue
        if before:
            out.append(tokenizer.encode_piece(before))
        out.append(seg)
        if after:
            out.append(tokenizer.encode_piece(after))
    return out


class NativeRuntimeError(BlueLowerError):
    """The native runtime refused its input or failed; ``exit_code`` is its own."""


def _stream_reader(on_text):
    """A line callback for the binary's ``--json-stream``: each token's text to ``on_text``."""

    def on_line(line: str) -> None:
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            return
        if isinstance(msg, dict) and "tokens" not in msg and msg.get("text"):
            on_text(msg["text"])

    return on_line


def _exit_status(code: int) -> str:
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"native runtime was killed by {name}"
    return f"native runtime exited with status {code}"


def _run_native(build_dir, image, ids, max_new_tokens, policy, max_patches, prompt=None, on_text=None) -> dict:
    """The bundle's binary with ``ids`` (a list) or ``prompt`` (text it encodes itself);
    ``on_text(chunk)`` gets its streamed text (``--json-stream``: one JSON line per token)."""
    from .lowering.artifacts.device import run_native

    extra = ("--policy", policy) + (("--max-patches", str(max_patches)) if max_patches is not None else ())
    on_line = None
    if on_text is not None:
        extra += ("--json-stream",)
        on_line = _stream_reader(on_text)
    proc = run_native(build_dir, image, None if ids is None else ",".join(str(i) for i in ids), max_new_tokens,
                      as_json=True, extra=extra, prompt=prompt, on_line=on_line)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [_exit_status(proc.returncode)]
        last = lines[-1][len("error: "):] if lines[-1].startswith("error: ") else lines[-1]
        err = NativeRuntimeError(last)
        err.exit_code = proc.returncode if proc.returncode > 0 else 1
        raise err
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1] if lines else "")  # the result is the last line (--json-stream: after the tokens')
    except json.JSONDecodeError:
        raise BlueLowerError(f"native runtime printed no JSON: {proc.stdout.strip()[:200]}") from None


def init_weights(model="tiny", output: str = "weights.safetensors", seed: int = 0) -> str:
    """Seeded random weights for ``model`` in the Hugging Face safetensors layout."""
    from .lowering.frontend.weights import init_weights as write
    from .lowering.models import load_config

    from .validate import check_output_file

    check_output_file(output, "-o")
    write(load_config(model), output, seed)
    return output


def inspect_image(path: str | None = None, size: str | None = None, policy: str = "relaxed", max_patches: int = 9) -> dict:
    from .runtime_stubs.image import inspect_image as inspect

    return inspect(path=path, size=size, policy=policy, max_patches=max_patches)


def inspect_memory(build_dir: str | None = None, *, model=None, soc: str = "host", quant: str = DEFAULT_QUANT,
                   image_grid: str | None = None, kv_capacity: int | None = None, prefill_chunk: int | None = None,
                   jobs: int | None = None, recipe=None) -> dict:
    """Peak memory per phase of a build, or (``model``) of a plan without building (``recipe``:
    the weights' quantization rules, a path or a Recipe, as for :func:`compile`)."""
    from .reports import memory

    if (build_dir is None) == (model is None):
        raise BlueLowerError("give either a BUILD_DIR or --model NAME (not both)")
    if build_dir is not None:
        if recipe is not None:
            raise BlueLowerError("--recipe plans a --model; a build's manifest records its own rules")
        return memory.inspect_build(build_dir)
    if isinstance(recipe, str):
        from .lowering.quant.recipe import load_recipe

        recipe = load_recipe(recipe)
    return memory.inspect_model(model, soc=soc, quant=quant, image_grid=image_grid, kv_capacity=kv_capacity,
                                prefill_chunk=prefill_chunk, jobs=jobs, recipe=recipe)


def inspect_schedule(build_dir: str, trace: str | None = None, plot: str | None = None) -> dict:
    """A build's predicted schedule; optionally written as a Chrome trace and a Gantt chart."""
    from .reports import schedule

    from .validate import check_output_file

    for flag, path in (("--trace", trace), ("--plot", plot)):
        if path:
            check_output_file(path, flag)
    info = schedule.inspect_schedule(build_dir)
    if trace:
        schedule.write_trace(build_dir, trace)
    if plot:
        schedule.write_plot(build_dir, plot)
    return info


def eval_quant(models=("tiny",), modes=None, tokens: int = 64, seed: int = 0, group_size: int = DEFAULT_GROUP_SIZE,
               disable_passes=(), write_doc: str | None = None, *, checkpoint: str | None = None,
               text: str | None = None, text_tokens: int = 512, greedy_tokens: int = 32, sensitivity: bool = False,
               keep_builds: str | None = None, doc_command: str | None = None) -> list:
    """Accuracy of each quant mode against the fp32 PyTorch reference, per model.

    With ``checkpoint`` (a Hugging Face directory or a GGUF file) and ``text`` (a UTF-8 file):
    one host build per mode, measured on the text's first ``text_tokens`` tokens as the build
    runs (``reports/eval_text.py``: perplexity, top-1 agreement and max logit error against
    the fp32 reference, per phase, greedy tokens, optionally the per-layer ``sensitivity``);
    ``keep_builds``: a directory to keep the builds in (else a temporary one); ``doc_command``:
    the command ``write_doc``'s section names as the one that regenerates it."""
    from .lowering.quant.modes import QUANT_MODES, quant_mode
    from .reports import eval_quant as ev
    from .validate import check_int, check_output_dir, check_output_file

    check_int(tokens, 1, 1 << 24, "--tokens")
    check_int(group_size, 2, 1 << 16, "--group-size")
    for mode in modes or ():
        quant_mode(mode)
    if modes is not None and not modes:
        raise BlueLowerError("--modes lists no quant mode")
    if write_doc:
        check_output_file(write_doc, "--write-doc")
    if (checkpoint is None) != (text is None):
        raise BlueLowerError("eval-quant: --text goes with --gguf / --hf (a real checkpoint), and they need a --text")
    if checkpoint is not None:
        from .reports import eval_text

        check_int(text_tokens, 2, 1 << 24, "--text-tokens")
        check_int(greedy_tokens, 1, 1 << 16, "--greedy-tokens")
        if keep_builds:
            check_output_dir(keep_builds, "--keep-builds")
            os.makedirs(keep_builds, exist_ok=True)
        report = eval_text.evaluate_checkpoint(checkpoint, text, modes or QUANT_MODES, tokens=text_tokens,
                                               greedy_tokens=greedy_tokens, with_sensitivity=sensitivity,
                                               work_dir=keep_builds,
                                               group_size=None if group_size == DEFAULT_GROUP_SIZE else group_size)
        if write_doc:
            command = doc_command or (f"bluelower eval-quant --{'hf' if os.path.isdir(checkpoint) else 'gguf'} "
                       f"{report['checkpoint']} --text {report['text']} --text-tokens {text_tokens}"
                       f"{' --sensitivity' if sensitivity else ''} --modes {','.join(m['mode'] for m in report['modes'])}"
                       f" --write-doc {os.path.basename(write_doc)}")
            eval_text.write_section(write_doc, report["checkpoint"], eval_text.format_text_table(report), command,
                                    fingerprint=report["code_fingerprint"])
        return [report]
    reports = [ev.evaluate(m, modes=tuple(modes or QUANT_MODES), tokens=tokens, seed=seed, group_size=group_size,
                           disabled_passes=tuple(disable_passes)) for m in models]
    if write_doc:
        ev.write_doc(write_doc, reports)
    return reports
