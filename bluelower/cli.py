"""The ``bluelower`` command line: a thin layer over the Python API.

Every user error (:class:`bluelower.errors.BlueLowerError`) becomes one line on stderr and
a non-zero exit; no traceback.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__, progress
from .errors import BlueLowerError


class _Group(click.Group):
    """Turns BlueLowerError into one line + exit code, anywhere below the group."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BlueLowerError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
    from .lowering.image import inspect_image

    info = inspect_image(path=img, size=size, policy=policy, max_patches=max_patches)
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



def main() -> None:
    cli(prog_name="bluelower")


if __name__ == "__main__":
    main()
