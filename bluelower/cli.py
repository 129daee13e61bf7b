"""The ``bluelower`` command line: a thin layer over the Python API.

Every user error becomes one line on stderr (``error: ...``) and a non-zero exit, no
traceback: a :class:`bluelower.errors.BlueLowerError` (its exit code), a usage error (a
missing or malformed option: exit 2), an ``OSError`` on a path the user gave (a read-only
or missing location: exit 1), running out of memory (exit 1). Python warnings of the
libraries bluelower drives (torch, TVM, onnx, Pillow) are not printed. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import warnings

import click

from . import __version__, api, files, progress
from .errors import BlueLowerError
from .lowering.quant.modes import DEFAULT_GROUP_SIZE, DEFAULT_QUANT, MODES, QUANT_MODES

_QUANT_HELP = "; ".join(f"{m.name} = {m.summary}" for m in MODES.values()) + ". See docs/quantization.md."


def _error(message: str, code: int):
    click.echo("error: " + " ".join(str(message).split()), err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns user errors into one line + exit code, anywhere below the group."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            super().main(args, prog_name or "bluelower", complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:  # --help, --version
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:  # `bluelower` alone: its help
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.exceptions.Abort:
            _error("aborted", 1)
        except click.ClickException as exc:  # usage errors: click's "Usage: ... Error: ..." as one line
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _error(exc.format_message().rstrip(".") + hint, exc.exit_code)
        sys.exit(0)

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the libraries' warnings (torch, TVM, onnx, Pillow)
                return super().invoke(ctx)
        except BlueLowerError as exc:
            _error(exc, exc.exit_code)
        except OSError as exc:
            if exc.filename is None:
                raise
            _error(f"{exc.filename}: {exc.strerror or exc}", 1)
        except MemoryError as exc:
            _error(f"out of memory ({exc})" if str(exc) else "out of memory", 1)


@click.group(name="bluelower", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bluelower")
@click.option("--quiet", "-q", is_flag=True, help="No progress output on stderr.")
def cli(quiet: bool) -> None:
    """bluelower: compile a PyTorch vision-language model (BlueLM-V) for a phone SoC."""
    progress.set_quiet(quiet)


@cli.group()
def inspect() -> None:
    """Inspect images, memory plans and schedules."""


@cli.group()
def targets() -> None:
    """SoC descriptions (TOML data files)."""


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


# Commands live below, grouped by feature. Keep each one thin: parse, call the API, print.
# --- foundation commands ---

_MODEL_HELP = "A shipped config (tiny, bluelm-v-3b) or a path to a .json config."
_FORCE_HELP = ("Write even if the output path exists and is not a bluelower build: the existing directory or file is "
               "moved aside to PATH.old (never deleted).")
_ARENA_HELP = ("Allocate each call's intermediates from the memory plan's one arena at its offsets (kernels take "
               "offsets; manifest memory_plan executed_arena_bytes), or with --no-execute-memory-plan from TVM's "
               "storage tokens [default: the arena, unless --disable-pass MemoryPlan/AcceptBufferOffsets]. "
               "See docs/memory.md.")
_RECIPE_HELP = ("Quantization rules (JSON, or TOML with [[rules]]): which format each weight is stored in, first "
                "matching rule wins [default: the --quant mode's recipe]. See docs/quantization.md.")
_CALIBRATION_HELP = ("A UTF-8 calibration text: GPTQ chooses the codes of the weights whose rule says method gptq "
                     "(without --recipe: the default recipe with GPTQ on the decoder linears). LLaMA-family "
                     "checkpoints with a tokenizer (--hf / --gguf).")


@cli.command("compile")
@click.option("--model", "model", default=None, metavar="NAME|PATH.json", help=_MODEL_HELP + " [default: tiny]")
@click.option("--hf", "hf", default=None, metavar="DIR",
              help="A Hugging Face model directory (config.json, safetensors shards, tokenizer) instead of --model.")
@click.option("--gguf", "gguf", default=None, metavar="FILE", help="A llama.cpp GGUF file instead of --model.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="With --model: safetensors in the model's weight names (default: seeded random weights).")
@click.option("--frontend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="torch.export or ONNX (+ onnxsim) import.")
@click.option("--soc", default="host", show_default=True, metavar="NAME|PATH.toml", help="Target SoC.")
@click.option("--quant", default=DEFAULT_QUANT, show_default=True, metavar="|".join(QUANT_MODES), help=_QUANT_HELP)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--dump-ir", type=click.Path(file_okay=False), default=None,
              help="Write the IR as TVMScript after every pass into this directory.")
@click.option("--disable-pass", "disabled", multiple=True, metavar="NAME", help="Skip a pass (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights without --weights.")
@click.option("--prefill-chunk", type=int, default=None, metavar="N",
              help="Rows per prefill call (default: the config's runtime.prefill_chunk); must divide the KV capacity.")
@click.option("--kv-capacity", type=int, default=None, metavar="N",
              help="KV-cache capacity in tokens (default: the config's; a checkpoint: 2048 or its context length).")
@click.option("--recipe", default=None, metavar="FILE.json|FILE.toml", help=_RECIPE_HELP)
@click.option("--calibration", default=None, metavar="FILE.txt", help=_CALIBRATION_HELP)
@click.option("--execute-memory-plan/--no-execute-memory-plan", default=None, help=_ARENA_HELP)
@click.option("--force", is_flag=True, help=_FORCE_HELP)
def compile_cmd(model, hf, gguf, weights, frontend, soc, quant, out_dir, dump_ir, disabled, seed, prefill_chunk,
                kv_capacity, recipe, calibration, execute_memory_plan, force) -> None:
    """Compile a model for a SoC into an output directory (library, params, manifest)."""
    sources = [x for x in (model, hf, gguf) if x is not None]
    if len(sources) > 1:
        raise BlueLowerError("give one of --model, --hf, --gguf")
    api.compile(model or "tiny", out_dir, checkpoint=hf or gguf, soc=soc, quant=quant, weights=weights,
                frontend=frontend, dump_ir=dump_ir, disable_passes=disabled, seed=seed, prefill_chunk=prefill_chunk,
                kv_capacity=kv_capacity, force=force, recipe=recipe, calibration=calibration,
                execute_memory_plan=execute_memory_plan)


@cli.command("run")
@click.argument("build_dir", type=click.Path())
@click.option("--image", default=None, help="PNG/JPEG or .npy [H, W, 3] image.")
@click.option("--prompt", default=None, help="Prompt text, in the checkpoint's chat template (builds with a tokenizer).")
@click.option("--system", default=None, help="A system message for --prompt.")
@click.option("--prompt-ids", default="", help="Comma-separated prompt token ids, e.g. 1,2,3 (instead of --prompt).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k most likely tokens (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling threshold.")
@click.option("--seed", type=int, default=None, help="Seed of the sampler (reproducible sampling).")
@click.option("--check", is_flag=True, help="Also run the PyTorch reference; exit 4 on any token mismatch.")
@click.option("--weights", default=None, help="fp32 weights for --check (default: the build's own; a quantized build is checked against PyTorch with its dequantized weights).")
@click.option("--json", "as_json", is_flag=True, help="Print {\"tokens\": [...], ...} as JSON.")
@click.option("--native", is_flag=True, help="Run the bundle's own bluelower-run binary (qemu-aarch64 for aarch64).")
@click.option("--policy", type=click.Choice(api.POLICIES), default=None,
              help="Dynamic-resolution grid policy [default: relaxed; none = one squashed patch; "
                   "--native supports relaxed and none].")
@click.option("--max-patches", type=int, default=None,
              help="Largest grid m*n [default: the SoC's max_patches from the manifest, else 9].")
def run_cmd(build_dir, image, prompt, system, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, check,
            weights, as_json, native, policy, max_patches) -> None:
    """Generate from a compiled build: the image and the prompt, then new tokens until EOS.

    With --prompt the text streams to stdout as it is generated (greedy unless --temperature)."""
    streamed = []

    def on_text(piece: str) -> None:
        streamed.append(piece)
        click.echo(piece, nl=False)
        sys.stdout.flush()

    out = api.run(build_dir, image=image, prompt=prompt, system=system, prompt_ids=api.parse_prompt_ids(prompt_ids),
                  max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  check=check, weights=weights, native=native, policy=policy, max_patches=max_patches,
                  on_text=None if as_json or prompt is None else on_text)
    if as_json:
        echo_json(out)
    else:
        if streamed:
            click.echo("")
        else:
            click.echo("tokens: " + " ".join(str(t) for t in out["tokens"]))
        if check:
            click.echo("reference: " + " ".join(str(t) for t in out["reference_tokens"]))
            click.echo("check: " + ("tokens match PyTorch" if out["match"] else "MISMATCH against PyTorch")
                       + " (same precision: the build's dequantized weights)" * ("vs_fp32" in out))
            if "vs_fp32" in out:
                d = out["vs_fp32"]
                click.echo(f"vs fp32: top-1 agreement {d['top1_agreement']:.1%}, max logit error "
                           f"{d['max_logit_error']:.3g} (the fp32 model teacher-forced on these tokens)")
    if check and not out["match"]:
        click.echo("error: generated tokens differ from the PyTorch reference", err=True)
        sys.exit(4)


@cli.command("build")
@click.option("--model", "model", default=None, metavar="NAME|PATH.json", help=_MODEL_HELP + " [default: tiny]")
@click.option("--hf", "hf", default=None, metavar="DIR", help="A Hugging Face model directory instead of --model.")
@click.option("--gguf", "gguf", default=None, metavar="FILE", help="A llama.cpp GGUF file instead of --model.")
@click.option("--kv-capacity", type=int, default=None, metavar="N", help="KV-cache capacity in tokens.")
@click.option("--prefill-chunk", type=int, default=None, metavar="N", help="Rows per prefill call.")
@click.option("--soc", default="dimensity9300", show_default=True, metavar="NAME|PATH.toml",
              help="Target SoC (dimensity9300: aarch64 cross build; host: this machine).")
@click.option("--quant", default=DEFAULT_QUANT, show_default=True, metavar="|".join(QUANT_MODES), help=_QUANT_HELP)
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Hugging Face-style safetensors (default: seeded random weights).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights without --weights.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Bundle directory; the tarball is written next to it as OUTPUT.tar.gz.")
@click.option("--tarball", default=None, type=click.Path(dir_okay=False), help="Tarball path instead.")
@click.option("--ndk", default=None, metavar="PATH",
              help="Android NDK: build an arm64 Android bundle (NDK clang, CMake + the NDK toolchain file).")
@click.option("--android-api", type=int, default=None, metavar="N", help="Android API level with --ndk [default: 28].")
@click.option("--tvm-runtime-dir", default=None, metavar="DIR",
              help="With --ndk: prebuilt Android libtvm_runtime.so + libtvm_ffi.so (arm64-v8a).")
@click.option("--tvm-source", default=None, metavar="DIR",
              help="With --ndk: a TVM source tree; its runtime is built with the NDK.")
@click.option("--recipe", default=None, metavar="FILE.json|FILE.toml", help=_RECIPE_HELP)
@click.option("--calibration", default=None, metavar="FILE.txt", help=_CALIBRATION_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary (paths, tarball SHA-256) as JSON.")
@click.option("--execute-memory-plan/--no-execute-memory-plan", default=None, help=_ARENA_HELP)
@click.option("--force", is_flag=True, help=_FORCE_HELP)
def build_cmd(model, hf, gguf, kv_capacity, prefill_chunk, soc, quant, weights, seed, out_dir, tarball, ndk, android_api,
              tvm_runtime_dir, tvm_source, recipe, calibration, as_json, execute_memory_plan, force) -> None:
    """Build a device bundle: model library, weights, native runtime + TVM runtime libs, tarball."""
    if len([x for x in (model, hf, gguf) if x is not None]) > 1:
        raise BlueLowerError("give one of --model, --hf, --gguf")
    info = api.bundle(model or "tiny", out_dir, checkpoint=hf or gguf, soc=soc, quant=quant, weights=weights, seed=seed,
                      tarball=tarball, ndk=ndk, android_api=android_api, tvm_runtime_dir=tvm_runtime_dir,
                      tvm_source=tvm_source, kv_capacity=kv_capacity, prefill_chunk=prefill_chunk, force=force,
                      recipe=recipe, calibration=calibration, execute_memory_plan=execute_memory_plan)
    if as_json:
        echo_json({k: v for k, v in info.items()})
    else:
        click.echo(f"bundle:  {info['bundle']}")
        click.echo(f"tarball: {info['tarball']}")
        click.echo(f"sha256:  {info['tarball_sha256']}")


@cli.command("init-weights")
@click.option("--model", "model", default="tiny", show_default=True, metavar="NAME|PATH.json", help=_MODEL_HELP)
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False), help="Output .safetensors.")
@click.option("--seed", type=int, default=0, show_default=True)
def init_weights_cmd(model, out_path, seed) -> None:
    """Write seeded random weights in the Hugging Face safetensors layout."""
    progress.log(f"wrote {api.init_weights(model, out_path, seed)}")


@cli.command("passes")
def passes_cmd() -> None:
    """List the compile pipeline's passes in order."""
    from .passes.pipeline import build_pipeline

    phase = None
    for spec in build_pipeline():
        if spec.phase != phase:
            phase = spec.phase
            click.echo(f"[{phase}]")
        click.echo(f"  {spec.name:<24} {spec.description}")


# --- image commands ---


@inspect.command("image")
@click.argument("img", required=False, metavar="[IMG]")
@click.option("--size", default=None, metavar="WxH", help="Image size instead of a file, e.g. 1080x2400.")
@click.option(
    "--policy", default="relaxed", show_default=True, metavar="relaxed|anyres|internvl",
    help="Grid selection policy.",
)
@click.option("--max-patches", type=int, default=9, show_default=True, help="Largest m*n allowed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_image_cmd(img, size, policy, max_patches, as_json) -> None:
    """Grid, patches and image tokens for IMG (PNG/JPEG/.npy) or --size WxH."""
    info = api.inspect_image(path=img, size=size, policy=policy, max_patches=max_patches)
    if as_json:
        echo_json(info)
        return
    width, height = info["size"]
    m, n = info["grid"]
    click.echo(f"size:             {width}x{height}")
    click.echo(f"policy:           {info['policy']} (max {info['max_patches']} patches)")
    click.echo(f"grid:             [{m}, {n}]  ({m} wide x {n} high)")
    click.echo(f"local patches:    {info['local_patches']}")
    click.echo(f"global thumbnail: {'yes' if info['global_thumbnail'] else 'no'}")
    click.echo(f"image tokens:     {info['image_tokens']} ({info['total_patches']} patches)")

# --- target commands ---
@targets.command("list")
def targets_list() -> None:
    """List the shipped SoC descriptions."""
    from .targets.soc import list_socs, load_soc

    for name in list_socs():
        click.echo(f"{name}\t{load_soc(name).description}")


@targets.command("show")
@click.argument("name_or_path")
@click.option("--json", "as_json", is_flag=True, help="Print the validated description as JSON.")
def targets_show(name_or_path: str, as_json: bool) -> None:
    """Validate and print a SoC: a shipped NAME or a PATH.toml."""
    from .targets.soc import load_soc

    soc = load_soc(name_or_path)
    soc.tvm_target()  # TVM must accept the target too
    if as_json:
        echo_json(soc.to_dict())
    else:
        click.echo(soc.describe())



@inspect.command("memory")
@click.argument("build_dir", required=False, type=click.Path())
@click.option("--model", "model", default=None, metavar="NAME|PATH.json", help="Plan without building: " + _MODEL_HELP)
@click.option("--soc", default="host", show_default=True, metavar="NAME|PATH.toml", help="Target SoC (with --model).")
@click.option("--quant", default=DEFAULT_QUANT, show_default=True, metavar="|".join(QUANT_MODES),
              help="Quant mode of the plan (with --model).")
@click.option("--image-grid", default=None, metavar="MxN", help="Image grid, e.g. 2x4 = 8 local + 1 global patches.")
@click.option("--kv-capacity", type=int, default=None, help="KV cache capacity (default: the config's).")
@click.option("--prefill-chunk", type=int, default=None, help="Prefill chunk (default: the config's).")
@click.option("--recipe", default=None, metavar="FILE.json|FILE.toml",
              help="With --model: quantization rules of the plan (as compile --recipe).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (peak_bytes, phases).")
@click.option("-j", "--jobs", type=int, default=None,
              help="With --model: above 1, each entry function is planned in its own worker process; 1 plans "
                   "in this process (default: $BLUELOWER_JOBS, else the usable CPUs; small models: 1).")
def inspect_memory_cmd(build_dir, model, soc, quant, image_grid, kv_capacity, prefill_chunk, recipe, as_json,
                       jobs) -> None:
    """Peak memory per phase (weights + KV cache + activation arena) of a build or, with --model, of a plan."""
    from .reports import memory

    info = api.inspect_memory(build_dir, model=model, soc=soc, quant=quant, image_grid=image_grid,
                              kv_capacity=kv_capacity, prefill_chunk=prefill_chunk, jobs=jobs, recipe=recipe)
    if as_json:
        echo_json(info)
    else:
        click.echo(memory.format_table(info))


@inspect.command("schedule")
@click.argument("build_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON (makespan_s, phase_seconds, tasks, ...).")
@click.option("--trace", "trace", default=None, type=click.Path(dir_okay=False), help="Write a Chrome trace (open in ui.perfetto.dev).")
@click.option("--plot", "plot", default=None, type=click.Path(dir_okay=False), help="Write a Gantt chart (PNG).")
def inspect_schedule_cmd(build_dir, as_json, trace, plot) -> None:
    """Predicted schedule of a build's APU partitions and CPU segments (per phase, per unit, per task)."""
    from .reports import schedule as schedule_report

    info = api.inspect_schedule(build_dir, trace=trace, plot=plot)
    if as_json:
        echo_json(info)
    else:
        click.echo(schedule_report.format_table(info))


@cli.command("eval-quant")
@click.option("--model", "models", multiple=True, metavar="NAME|PATH.json", help="Model(s) to evaluate (default: tiny).")
@click.option("--modes", default=",".join(QUANT_MODES), show_default=True, help="Comma-separated quant modes.")
@click.option("--tokens", type=int, default=64, show_default=True, help="Greedy tokens to compare.")
@click.option("--group-size", type=int, default=DEFAULT_GROUP_SIZE, show_default=True, help="INT4 group size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and the prompt.")
@click.option("--disable-pass", "disabled", multiple=True, metavar="NAME", help="Skip a pass (repeatable).")
@click.option("--write-doc", default=None, type=click.Path(dir_okay=False), help="Write the report as Markdown (docs/quantization.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@click.option("--hf", default=None, metavar="DIR", help="A Hugging Face checkpoint to evaluate on --text (one host build per mode).")
@click.option("--gguf", default=None, metavar="FILE", help="A GGUF checkpoint to evaluate on --text (one host build per mode).")
@click.option("--text", default=None, metavar="FILE", help="UTF-8 text for --hf/--gguf: perplexity, top-1 agreement and max logit error vs fp32.")
@click.option("--text-tokens", type=int, default=512, show_default=True, help="Tokens of --text evaluated (its first N).")
@click.option("--greedy-tokens", type=int, default=32, show_default=True, help="Greedy tokens compared with fp32 (after 16 of the text).")
@click.option("--sensitivity", is_flag=True, help="With --hf/--gguf: the per-layer INT4 sensitivity table (needs transformers).")
@click.option("--keep-builds", default=None, metavar="DIR", help="With --hf/--gguf: keep the builds here (else a temporary directory).")
def eval_quant_cmd(models, modes, tokens, group_size, seed, disabled, write_doc, as_json, hf, gguf, text,
                   text_tokens, greedy_tokens, sensitivity, keep_builds) -> None:
    """Accuracy of each --quant mode against the fp32 PyTorch reference (image tokens, logits, tokens);
    with --hf/--gguf and --text, on a real checkpoint and text through the compiled builds."""
    from .reports import eval_quant

    if hf and gguf:
        raise BlueLowerError("give --hf or --gguf, not both")
    checkpoint = hf or gguf
    if checkpoint and models:
        raise BlueLowerError("give --model or --hf/--gguf, not both")
    if (sensitivity or keep_builds) and not checkpoint:
        raise BlueLowerError("--sensitivity and --keep-builds go with --hf/--gguf and --text")
    reports = api.eval_quant(models or ("tiny",), modes=[x.strip() for x in modes.split(",") if x.strip()],
                             tokens=tokens, seed=seed, group_size=group_size, disable_passes=disabled,
                             write_doc=write_doc, checkpoint=checkpoint, text=text, text_tokens=text_tokens,
                             greedy_tokens=greedy_tokens, sensitivity=sensitivity, keep_builds=keep_builds)
    if checkpoint:
        from .reports import eval_text

        if as_json:
            echo_json(reports[0])
        else:
            click.echo(eval_text.format_text_table(reports[0]))
    elif as_json:
        echo_json(reports if len(reports) > 1 else reports[0])
    else:
        for report in reports:
            click.echo(f"{report['model']} (seed {report['seed']}, {report['tokens']} tokens, group {report['group_size']})")
            click.echo(eval_quant.format_table(report))


def main() -> None:
    """The ``bluelower`` command. SIGINT / SIGTERM end any command with one line and exit 130 /
    143, its temporaries removed and its locks released (``files.install_signal_handlers``)."""
    files.install_signal_handlers()
    try:
        cli(prog_name="bluelower")
    except BaseException as exc:  # noqa: B036 (an interrupt may reach here as any exception type)
        signum = files.interrupted()
        if signum is None:
            raise
        # a SystemExit with an error: the command already said why, on one line
        files.exit_interrupted(signum, message=not (isinstance(exc, SystemExit) and exc.code not in (0, None)))


if __name__ == "__main__":
    main()
