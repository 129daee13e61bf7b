"""The bundle verifies itself (issue 16; docs/native-runtime.md, "Verification"): a corrupted
or truncated file anywhere in a device bundle (the manifest and its hash, the binary, the
libraries, model.so, the parameters) is refused by both ``bluelower run --native`` (Python,
before it starts anything) and ``bin/bluelower-run`` (before it maps a library or reads a
weight): one ``error:`` line, non-zero exit, no crash. Python starts nothing but the bundle's
own ``bin/bluelower-run``; the native JSON parser is strict UTF-8; sizes do not overflow.

Session fixtures build the tiny model once as a host bundle (and, for the qemu cases, once
for the Dimensity 9300). Every case damages a fresh copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from bluelower import api
from bluelower.errors import BlueLowerError
from bluelower.lowering.artifacts import device
from bluelower.lowering.artifacts.bundle import write_manifest

FILES = ["manifest.json", "manifest.sha256", "bin/bluelower-run", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so",
         "lib/libbluelower_backend.so", "model.so", "params.safetensors"]


def _build(soc: str, out: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "bluelower.cli", "-q", "build", "--model", "tiny", "--quant", "fp32",
                           "--soc", soc, "-o", out, "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["bundle"]


@pytest.fixture(scope="session")
def host_bundle_dir(tmp_path_factory) -> str:
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    return _build("host", str(tmp_path_factory.mktemp("integrity") / "host"))


@pytest.fixture(scope="session")
def aarch64_bundle_dir(tmp_path_factory) -> str:
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    return _build("dimensity9300", str(tmp_path_factory.mktemp("integrity") / "d9300"))


@pytest.fixture
def copy(tmp_path):
    def make(src: str) -> str:
        dst = str(tmp_path / "b")
        shutil.copytree(src, dst, symlinks=True)
        return dst

    return make


# ------------------------------------------------------------------ helpers


def _direct(bundle: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The bundle's binary itself, no Python check in front (qemu for aarch64, as `run --native`)."""
    binary = os.path.join(bundle, "bin", "bluelower-run")
    with open(binary, "rb") as fh:
        machine = int.from_bytes(fh.read(20)[18:20], "little")
    cmd = [binary, bundle, *args]
    if machine == 183 and os.uname().machine != "aarch64":
        cmd = [shutil.which("qemu-aarch64"), "-L", "/usr/aarch64-linux-gnu", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, TVM_NUM_THREADS="1"))


def _refused(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode not in (0,) and proc.returncode > 0, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-2000:]
    assert proc.stdout == ""


def _python_refuses(bundle: str, needle: str, monkeypatch) -> None:
    """`run --native` (api.run) refuses before it starts any process."""
    started = []

    def no_process(*a, **k):
        started.append(a[0] if a else k.get("args"))
        raise AssertionError(f"a process was started: {started[-1]}")

    monkeypatch.setattr(device.subprocess, "run", no_process)
    monkeypatch.setattr(device.subprocess, "Popen", no_process)
    with pytest.raises(BlueLowerError) as info:
        api.run(bundle, prompt_ids=[1, 2, 3], max_new_tokens=2, native=True)
    msg = str(info.value)
    assert "\n" not in msg and needle.lower() in msg.lower(), msg
    assert started == []
    monkeypatch.undo()


def _rewrite_manifest_bytes(bundle: str, data: bytes) -> None:
    """manifest.json replaced by ``data`` with a matching manifest.sha256 (the content is tested, not the hash)."""
    with open(os.path.join(bundle, "manifest.sha256")) as fh:
        rest = fh.read().splitlines(keepends=True)[1:]
    open(os.path.join(bundle, "manifest.json"), "wb").write(data)
    open(os.path.join(bundle, "manifest.sha256"), "w").write(
        f"{hashlib.sha256(data).hexdigest()}  manifest.json\n" + "".join(rest))


def _edit_manifest(bundle: str, edit) -> None:
    m = json.load(open(os.path.join(bundle, "manifest.json")))
    edit(m)
    write_manifest(bundle, m)


def _flip(path: str, where: str = "middle") -> None:
    data = bytearray(open(path, "rb").read())
    if os.path.basename(path) == "manifest.json":
        i = data.index(b'"soc": "') + 9  # inside a string: still valid JSON, only the hash can tell
    elif os.path.basename(path) == "manifest.sha256":
        i = 3  # a hex digit -> another hex digit
        data[i] = ord("0") if data[i] != ord("0") else ord("1")
        open(path, "wb").write(bytes(data))
        return
    else:
        i = len(data) - 1 if where == "end" else len(data) // 2
    data[i] ^= 0x01
    open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


# ------------------------------------------------------------------ every file, flipped or cut in half

NEEDLE = {  # (file, damage) -> what both refusals name (the Python reader may meet a cut manifest first)
    ("manifest.json", "truncate"): ("manifest.json", "manifest.json"),
    ("manifest.sha256", "flip"): ("manifest.json does not match its SHA-256 in manifest.sha256",) * 2,
    ("manifest.sha256", "truncate"): ("manifest.sha256: malformed",) * 2,
}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("rel", FILES)
def test_a_damaged_file_is_refused_by_both_runtimes(host_bundle_dir, copy, monkeypatch, rel, damage):
    bundle = copy(host_bundle_dir)
    path = os.path.join(bundle, rel)
    # the binary: damaged where the loader does not look (its section headers), so it starts and must refuse itself
    (_flip(path, "end" if rel.startswith("bin/") else "middle") if damage == "flip" else _truncate(path))
    py_needle, native_needle = NEEDLE.get((rel, damage), (f"{rel} does not match its SHA-256",) * 2)
    _python_refuses(bundle, py_needle, monkeypatch)
    if rel == "bin/bluelower-run" and damage == "truncate":
        # the one file the binary cannot check before the kernel maps it: what checks it instead
        proc = subprocess.run(["sha256sum", "-c", "manifest.sha256"], cwd=bundle, capture_output=True, text=True)
        assert proc.returncode != 0 and "bin/bluelower-run: FAILED" in proc.stdout, proc.stdout
        return
    _refused(_direct(bundle, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"), native_needle)


def test_cli_run_native_refuses_in_one_line(host_bundle_dir, copy):
    bundle = copy(host_bundle_dir)
    _truncate(os.path.join(bundle, "lib", "libtvm_ffi.so"))
    proc = subprocess.run([sys.executable, "-m", "bluelower.cli", "run", bundle, "--native", "--prompt-ids", "1,2,3"],
                          capture_output=True, text=True)
    _refused(proc, "lib/libtvm_ffi.so does not match its SHA-256 in the manifest")


def test_an_intact_bundle_verifies_with_standard_tools_too(host_bundle_dir):
    proc = subprocess.run(["sha256sum", "-c", "manifest.sha256"], cwd=host_bundle_dir, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["manifest.json: OK", "bin/bluelower-run: OK"]
    out = _direct(host_bundle_dir, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--json")
    assert out.returncode == 0, out.stderr
    # the executable links system libraries only: no bundle file is mapped before the checks
    needed = subprocess.run(["readelf", "-d", os.path.join(host_bundle_dir, "bin", "bluelower-run")],
                            capture_output=True, text=True).stdout
    assert "tvm" not in needed and "RUNPATH" not in needed and "RPATH" not in needed


# ------------------------------------------------------------------ consistent hashes, bad content

CONTENT_CASES = {
    # name -> (edit(bundle), python needle or None (Python's reader accepts it), native needle)
    "invalid UTF-8 inside a string": (
        lambda b: _rewrite_manifest_bytes(b, open(os.path.join(b, "manifest.json"), "rb").read()
                                          .replace(b'"soc": "host"', b'"soc": "h\xffst"', 1)),
        "UTF-8", "invalid UTF-8 in string"),
    "an overlong UTF-8 form": (
        lambda b: _rewrite_manifest_bytes(b, open(os.path.join(b, "manifest.json"), "rb").read()
                                          .replace(b'"soc": "host"', b'"soc": "h\xc1\xafst"', 1)),
        "UTF-8", "invalid UTF-8 in string"),
    "a duplicate key": (
        lambda b: _rewrite_manifest_bytes(b, open(os.path.join(b, "manifest.json"), "rb").read()
                                          .replace(b'"format_version": 1', b'"format_version": 1, "format_version": 1', 1)),
        None, 'duplicate key "format_version"'),
    "the runtime named as /bin/echo": (
        lambda b: _edit_manifest(b, lambda m: m["native_runtime"].update(binary="/bin/echo")),
        "a bundle runs only its own bin/bluelower-run", None),
    "the runtime named through ..": (
        lambda b: _edit_manifest(b, lambda m: m["native_runtime"].update(binary="bin/../../../bin/echo")),
        "a bundle runs only its own bin/bluelower-run", None),
    "an unlisted library in lib/": (
        lambda b: open(os.path.join(b, "lib", "libc.so.6"), "wb").write(b"\x7fELF..."),
        "lib/libc.so.6 is not a file the manifest lists", "lib/libc.so.6 is not a file the manifest lists"),
    "an unlisted program in bin/": (
        lambda b: open(os.path.join(b, "bin", "helper"), "wb").write(b"#!/bin/sh\n"),
        "bin/helper is not a file the manifest lists", "bin/helper is not a file the manifest lists"),
    "a listed path outside the bundle": (
        lambda b: _edit_manifest(b, lambda m: m["files"].update({"../outside": "0" * 64})),
        "refusing path '../outside'", "refusing path '../outside'"),
    "an absolute listed path": (
        lambda b: _edit_manifest(b, lambda m: m["files"].update({"/etc/hostname": "0" * 64})),
        "refusing path '/etc/hostname'", "refusing path '/etc/hostname'"),
    "a library replaced by a symlink to an identical copy": (
        lambda b: (shutil.copyfile(os.path.join(b, "lib", "libtvm_ffi.so"), os.path.join(b, "..", "ffi-copy.so")),
                   os.remove(os.path.join(b, "lib", "libtvm_ffi.so")),
                   os.symlink(os.path.abspath(os.path.join(b, "..", "ffi-copy.so")), os.path.join(b, "lib", "libtvm_ffi.so"))),
        "symbolic link", "symbolic link"),
    "no manifest.sha256": (
        lambda b: os.remove(os.path.join(b, "manifest.sha256")),
        "missing manifest.sha256", "missing manifest.sha256"),
    "manifest.sha256 disagreeing with the manifest on the binary": (
        lambda b: open(os.path.join(b, "manifest.sha256"), "a").write("0" * 64 + "  model.so\n"),
        "disagree on the SHA-256 of model.so", "disagree on the SHA-256 of model.so"),
    "a library no longer listed": (
        lambda b: _edit_manifest(b, lambda m: m["files"].pop("lib/libbluelower_backend.so")),
        "lib/libbluelower_backend.so", "lib/libbluelower_backend.so"),
    "params.safetensors not listed": (
        lambda b: _edit_manifest(b, lambda m: m["files"].pop("params.safetensors")),
        "does not list params.safetensors", "does not list params.safetensors"),
    # the runtime limits (validate.LIMITS) are the native runtime's: both refuse beyond them
    "kv_capacity beyond 2^24": (
        lambda b: _edit_manifest(b, lambda m: m["runtime"].update(kv_capacity=(1 << 24) + 1)),
        "runtime.kv_capacity 16777217 is out of range [1, 2^24]", "runtime values out of range"),
    "a zero prefill chunk": (
        lambda b: _edit_manifest(b, lambda m: m["runtime"].update(prefill_chunk=0)),
        "runtime.prefill_chunk 0 is out of range", "runtime values out of range"),
    "an image batch of 65": (
        lambda b: _edit_manifest(b, lambda m: m["runtime"].update(image_batch=65)),
        "runtime.image_batch 65 is out of range [1, 64]", "runtime values out of range"),
    "a vocabulary beyond 2^24": (
        lambda b: _edit_manifest(b, lambda m: m["runtime"].update(vocab_size=(1 << 24) + 1)),
        "runtime.vocab_size 16777217 is out of range", "runtime values out of range"),
    "a hidden size beyond 2^20": (
        lambda b: _edit_manifest(b, lambda m: m["runtime"].update(hidden_size=(1 << 20) + 1)),
        "runtime.hidden_size 1048577 is out of range", "runtime values out of range"),
}


@pytest.mark.parametrize("case", sorted(CONTENT_CASES))
def test_bad_content_with_consistent_hashes(host_bundle_dir, copy, monkeypatch, case):
    bundle = copy(host_bundle_dir)
    edit, py_needle, native_needle = CONTENT_CASES[case]
    edit(bundle)
    if py_needle is not None:
        _python_refuses(bundle, py_needle, monkeypatch)
    if native_needle is not None:
        _refused(_direct(bundle, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"), native_needle)


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize("value,needle,code", [
    ("9223372036854775807", "exceeds the KV cache capacity", 1),  # INT64_MAX: used to overflow n + max_new_tokens
    ("9223372036854775806", "exceeds the KV cache capacity", 1),
    ("9223372036854775808", "--max-new-tokens must be an integer", 2),  # beyond int64
    ("-9223372036854775808", "--max-new-tokens must be at least 1", 2),
])
def test_max_new_tokens_cannot_overflow(host_bundle_dir, value, needle, code):
    proc = _direct(host_bundle_dir, "--prompt-ids", "1,2,3", "--max-new-tokens", value)
    _refused(proc, needle)
    assert proc.returncode == code


def test_max_new_tokens_overflow_through_run_native(host_bundle_dir):
    with pytest.raises(BlueLowerError, match="KV cache capacity"):  # (Python's own check, or the binary's)
        api.run(host_bundle_dir, prompt_ids=[1, 2, 3], max_new_tokens=2**63 - 1, native=True)


# ------------------------------------------------------------------ aarch64 under qemu (the SIGBUS cases)


@pytest.mark.parametrize("rel", ["lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "lib/libbluelower_backend.so",
                                 "model.so"])
def test_aarch64_truncated_library_is_refused_under_qemu(aarch64_bundle_dir, copy, monkeypatch, rel):
    """These crashed with SIGBUS under qemu: the loader mapped the cut library before main."""
    bundle = copy(aarch64_bundle_dir)
    _truncate(os.path.join(bundle, rel))
    _python_refuses(bundle, f"{rel} does not match its SHA-256", monkeypatch)
    _refused(_direct(bundle, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"), f"{rel} does not match its SHA-256")


def test_aarch64_damaged_binary(aarch64_bundle_dir, copy, monkeypatch):
    bundle = copy(aarch64_bundle_dir)
    _flip(os.path.join(bundle, "bin", "bluelower-run"), "end")
    _refused(_direct(bundle, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"), "bin/bluelower-run does not match")
    _truncate(os.path.join(bundle, "bin", "bluelower-run"))
    _python_refuses(bundle, "bin/bluelower-run does not match its SHA-256", monkeypatch)


# ------------------------------------------------------------------ prompt ids: one grammar


@pytest.mark.parametrize("text", ["1_0", "\uff11", "1e3", "1,,2", "0x10", "1.0", "+", " 1 , +2 ", "-0"])
def test_prompt_ids_parse_alike(host_bundle_dir, text):
    """``--prompt-ids`` is parsed by Python (``text.parse_prompt_ids``) exactly as by
    ``bluelower-run``: both refuse or both accept (an id out of the vocabulary aside)."""
    from bluelower.runtime_stubs.text import parse_prompt_ids

    try:
        ids = parse_prompt_ids(text)
    except BlueLowerError:
        ids = None
    proc = _direct(host_bundle_dir, "--prompt-ids", text, "--max-new-tokens", "1")
    if ids is None:
        _refused(proc, "--prompt-ids")
    else:
        assert proc.returncode == 0, (text, ids, proc.stderr[-1000:])
