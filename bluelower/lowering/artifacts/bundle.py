"""The build directory format: file names, the manifest (read, write, verify) and atomic output.

A leaf module: the compile driver, the device bundle, the host runtime and the reports all
read and write builds through it (docs/bundle-format.md).

* :func:`read_manifest` / :func:`write_manifest`: the one reader and writer of
  ``manifest.json`` (format and version checked on read; sorted keys, 2-space indent on write,
  so equal manifests are equal bytes).
* :func:`verify_files`: every file the manifest lists matches its SHA-256.
* :func:`prepare_output` / :func:`commit_output`: a build is written into a temporary sibling
  of the output directory and renamed into place at the end, so a failed or interrupted build
  never leaves a half-written output; :func:`replace_dir` swaps a finished directory in whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from ...errors import BlueLowerError
from ...files import file_sha256  # noqa: F401  (part of the bundle API: the manifest's hashes)

BUNDLE_FORMAT = "bluelower-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.safetensors"
TOKENIZER = "tokenizer.json"  # the checkpoint's tokenizer (builds from --hf / --gguf)
RUNTIME_BINARY = "bin/bluelower-run"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")


def read_manifest(build_dir: str) -> dict:
    """The manifest of ``build_dir``; one-line errors for a missing or foreign build."""
    if not os.path.isdir(build_dir):
        raise BlueLowerError(f"build directory not found: {build_dir}")
    path = os.path.join(build_dir, MANIFEST)
    if not os.path.isfile(path):
        raise BlueLowerError(f"{build_dir} is not a bluelower build (no {MANIFEST}); compile one with "
                             "`bluelower compile -o DIR`")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BlueLowerError(f"{path}: malformed manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BlueLowerError(f"{path}: not a bluelower manifest")
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BlueLowerError(
            f"{path}: format version {manifest.get('format_version')} is not supported (expected {BUNDLE_FORMAT_VERSION})"
        )
    return manifest


def write_manifest(build_dir: str, manifest: dict) -> None:
    with open(os.path.join(build_dir, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.write("\n")


def verify_files(build_dir: str, manifest: dict) -> None:
    """Every file of ``manifest["files"]`` exists and matches its SHA-256."""
    for name, digest in sorted(manifest.get("files", {}).items()):
        path = os.path.join(build_dir, name)
        if not os.path.isfile(path):
            raise BlueLowerError(f"{build_dir}: missing file {name}")
        if file_sha256(path) != digest:
            raise BlueLowerError(f"{build_dir}: {name} does not match its SHA-256 in the manifest (corrupt or modified)")


def prepare_output(out_dir: str) -> str:
    """Check ``out_dir`` can be (re)written; return a fresh temporary sibling directory."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        try:  # like `mkdir -p`: `-o build/tiny` works in a fresh checkout
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise BlueLowerError(f"cannot create the output directory's parent {parent}: {exc.strerror}") from None
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise BlueLowerError(f"output path exists and is not a directory: {out_dir}")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
            raise BlueLowerError(f"output directory {out_dir} is not empty and is not a bluelower build; refusing to replace it")
    return tempfile.mkdtemp(prefix=".bluelower-", dir=parent)


def commit_output(tmp: str, out_dir: str) -> None:
    """Move the finished ``tmp`` (from :func:`prepare_output`) to ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        old = tmp + ".old"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished temporary directory ``tmp`` to ``final``, replacing an older one
    (cache entries and runtime builds are written aside and swapped in whole)."""
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
