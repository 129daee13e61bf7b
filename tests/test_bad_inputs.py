"""Bad input of every kind (issue 16, the input side): one row per case, each a command line
(or an API call) on a mutated copy of one input, the exit code and a fragment of the message.

Every row must give exactly one ``error:`` line on stderr (nothing else on stderr, also not
at the file-descriptor level where LLVM and TVM write), no traceback, a non-zero exit, no
output written, and must leave the user's files as they were. Builds are copies of the
session's one tiny fp32 build, edited with consistent hashes (``manifest.sha256`` and the
manifest's ``files``), so only the validation under test can refuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from bluelower.cli import cli

TINY_JSON = os.path.join(os.path.dirname(__file__), "..", "bluelower", "lowering", "models", "bluelm_v", "configs",
                         "tiny.json")
D9300 = os.path.join(os.path.dirname(__file__), "..", "bluelower", "targets", "dimensity9300.toml")


# ----------------------------------------------------------------------------- helpers


def tiny_config(**decoder) -> dict:
    with open(TINY_JSON, encoding="utf-8") as fh:
        data = json.load(fh)
    data["decoder"].update(decoder)
    return data


def write(path, content) -> str:
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as fh:
        fh.write(content if isinstance(content, bytes) else (content if isinstance(content, str)
                                                              else json.dumps(content)))
    return str(path)


def snapshot(root: str) -> dict:
    """path -> sha256 of every file under ``root`` (what "no user file touched" compares)."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def rehash(build: str, manifest: dict | None = None) -> None:
    """Rewrite the manifest (and its detached hash, ``manifest.sha256``) with ``files``
    matching the files: only the edit under test is wrong."""
    from bluelower.files import file_sha256

    if manifest is None:
        with open(os.path.join(build, "manifest.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
    if isinstance(manifest.get("files"), dict):
        manifest["files"] = {f: file_sha256(os.path.join(build, f)) if os.path.isfile(os.path.join(build, f)) else h
                             for f, h in manifest["files"].items()}
    raw_manifest((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())(build)


def edit_manifest(change):
    def mutate(build):
        with open(os.path.join(build, "manifest.json"), encoding="utf-8") as fh:
            m = json.load(fh)
        change(m)
        rehash(build, m)
    return mutate


def raw_manifest(data: bytes):
    """manifest.json replaced by ``data`` (its detached hash updated: only the content is bad)."""
    def mutate(build):
        with open(os.path.join(build, "manifest.json"), "wb") as fh:
            fh.write(data)
        with open(os.path.join(build, "manifest.sha256"), "w", encoding="ascii") as fh:
            fh.write(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")
    return mutate


def edit_param(name: str, make):
    """params.safetensors with tensor ``name`` replaced by ``make(old array)``."""
    def mutate(build):
        from bluelower.lowering.frontend.weights import WeightSource, write_safetensors

        path = os.path.join(build, "params.safetensors")
        src = WeightSource(path)
        data = {n: src.read(n) for n in src.names()}
        data[name] = make(data[name])
        write_safetensors(path + ".new", [(n, a.shape, str(a.dtype)) for n, a in data.items()], lambda n: data[n])
        os.replace(path + ".new", path)
        rehash(build)
    return mutate


def safetensors_bytes(header, body: bytes = b"") -> bytes:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(blob)) + blob + body


def png(width: int, height: int, bit_depth: int = 8, color: int = 2) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): ``color`` 2 = RGB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" + bytes(width * 3 * bit_depth // 8)
    body = zlib.compress(row * min(height, 64))  # (a huge one is refused before its pixels are read)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny(build_tiny) -> str:
    """The session's tiny fp32 build (never modified: rows edit copies)."""
    return build_tiny("fp32")[0]


@pytest.fixture(scope="session")
def other_library(tmp_path_factory) -> str:
    """``model.so`` of another build (a one-function nn.Module: seconds to compile)."""
    import torch

    from bluelower import api

    out = str(tmp_path_factory.mktemp("other") / "build")
    api.compile_module(torch.nn.Linear(4, 4), (torch.zeros(1, 4),), out)
    return os.path.join(out, "model.so")


def invoke(args, capfd):
    """Run the CLI in process; ``(exit code, stderr lines, stdout)`` with fd-level stderr
    (LLVM / TVM write there) included."""
    result = CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)
    fd = capfd.readouterr()
    return result.exit_code, (result.stderr + fd.err).splitlines(), result.stdout


def assert_one_error(code, err, fragment, want_code=None):
    assert code != 0, err
    if want_code is not None:
        assert code == want_code, (code, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    assert fragment in err[0], err[0]


# ------------------------------------------------------------------- configs and SoCs

# (id, files to create: name -> content, command line (NAME: a created file, OUT: the output), code, fragment)
BIG = tiny_config(hidden_size=16384, num_layers=4096, intermediate_size=65536, num_heads=128, num_kv_heads=8,
                  head_dim=128)
NO_VOCAB = tiny_config()
del NO_VOCAB["decoder"]["vocab_size"]
NO_DECODER = tiny_config()
del NO_DECODER["decoder"]
BAD_HEADS = tiny_config()
BAD_HEADS["vision"]["num_heads"] = 5
RISCV = """name = "riscv"
triple = "riscv64-linux-gnu"
[[cpu_clusters]]
name = "big"
cores = 4
clock = "2 GHz"
ops_per_cycle.fp32 = 8
[memory]
capacity = "8 GB"
bandwidth = "20 GB/s"
"""
with open(D9300, encoding="utf-8") as _fh:
    D9300_TEXT = _fh.read()

CONFIG_ROWS = [
    ("no-sections", {"m.json": {"name": "bad"}}, ["compile", "--model", "m.json", "-o", "OUT"], 1,
     "missing section 'vision'"),
    ("no-vocab", {"m.json": NO_VOCAB}, ["compile", "--model", "m.json", "-o", "OUT"], 1,
     "missing key decoder.vocab_size"),
    ("no-decoder", {"m.json": NO_DECODER}, ["compile", "--model", "m.json", "-o", "OUT"], 1,
     "missing section 'decoder'"),
    ("vocab-1e20", {"m.json": tiny_config(vocab_size=10**20)}, ["compile", "--model", "m.json", "-o", "OUT"], 1,
     "decoder.vocab_size 100000000000000000000 is out of range [1, 2^24]"),
    ("hidden-0", {"m.json": tiny_config(hidden_size=0)}, ["compile", "--model", "m.json", "-o", "OUT"], 1,
     "decoder.hidden_size 0 is out of range [1, 2^20]"),
    ("heads-not-divisible", {"m.json": BAD_HEADS}, ["compile", "--model", "m.json", "-o", "OUT"], 1,
     "not divisible by num_heads"),
    ("nested-100k", {"m.json": "[" * 100_000 + "]" * 100_000}, ["compile", "--model", "m.json", "-o", "OUT"], 1,
     "JSON nested deeper than 64 levels"),
    ("nan", {"m.json": json.dumps(tiny_config()).replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')},
     ["compile", "--model", "m.json", "-o", "OUT"], 1, "NaN is not valid JSON"),
    ("float-overflow", {"m.json": json.dumps(tiny_config()).replace('"rope_theta": 10000.0', '"rope_theta": 1e999')},
     ["compile", "--model", "m.json", "-o", "OUT"], 1, "1e999 does not fit a 64-bit float"),
    ("bad-utf8", {"m.json": b'{"name": "\xff"}'}, ["compile", "--model", "m.json", "-o", "OUT"], 1,
     "not valid UTF-8"),
    ("2e12-parameters", {"m.json": BIG}, ["compile", "--model", "m.json", "-o", "OUT"], 1,
     "more than the 25.3 GB memory of SoC 'host'"),
    ("2e12-parameters-inspect", {"m.json": BIG}, ["inspect", "memory", "--model", "m.json"], 1,
     "more than the 25.3 GB memory of SoC 'host'"),
    ("inspect-kv-capacity-0", {}, ["inspect", "memory", "--model", "tiny", "--kv-capacity", "0"], 1,
     "--kv-capacity must be a positive integer, got 0"),
    ("compile-kv-capacity-0", {}, ["compile", "--model", "tiny", "--kv-capacity", "0", "-o", "OUT"], 1,
     "--kv-capacity must be a positive integer, got 0"),
    # SoC files
    ("soc-malformed-toml", {"s.toml": "name = \n"}, ["targets", "show", "s.toml"], 1, "malformed TOML"),
    ("soc-missing-memory", {"s.toml": RISCV.split("[memory]")[0]}, ["targets", "show", "s.toml"], 1,
     "missing required key 'memory'"),
    ("soc-wrong-type", {"s.toml": RISCV.replace("cores = 4", 'cores = "four"')}, ["targets", "show", "s.toml"], 1,
     "wrong type: expected an integer"),
    ("soc-bogus-mcpu", {"s.toml": D9300_TEXT.replace('mcpu = "cortex-x4"', 'mcpu = "cortex-x99"')},
     ["targets", "show", "s.toml"], 1, "LLVM knows no CPU 'cortex-x99' for aarch64-linux-gnu"),
    ("soc-bogus-mcpu-compile", {"s.toml": D9300_TEXT.replace('mcpu = "cortex-x4"', 'mcpu = "cortex-x99"')},
     ["compile", "--model", "tiny", "--soc", "s.toml", "-o", "OUT"], 1, "LLVM knows no CPU 'cortex-x99'"),
    ("soc-bogus-feature", {"s.toml": D9300_TEXT.replace('"neon", "sve2"', '"neon", "bogus"')},
     ["targets", "show", "s.toml"], 1, "LLVM does not recognize bogus"),
    ("soc-riscv-compile", {"s.toml": RISCV}, ["compile", "--model", "tiny", "--soc", "s.toml", "-o", "OUT"], 1,
     "no toolchain links a library for 'riscv64-linux-gnu'"),
    # weights
    ("weights-header-array", {"w.st": safetensors_bytes([1, 2])},
     ["compile", "--model", "tiny", "--weights", "w.st", "-o", "OUT"], 1, "the header is not a JSON object (an array)"),
    ("weights-header-shape", {"w.st": safetensors_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                                                        bytes(4))},
     ["compile", "--model", "tiny", "--weights", "w.st", "-o", "OUT"], 1, "tensor 'a' has a malformed header entry"),
    ("weights-overlap", {"w.st": safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                                                   bytes(8))},
     ["compile", "--model", "tiny", "--weights", "w.st", "-o", "OUT"], 1, "tensors overlap"),
    # other commands
    ("eval-quant-tokens-0", {}, ["eval-quant", "--tokens", "0"], 1, "--tokens 0 is out of range [1, 2^24]"),
    ("eval-quant-write-doc", {}, ["eval-quant", "--write-doc", "/proc/no/report.md"], 1,
     "--write-doc /proc/no/report.md: directory /proc/no does not exist"),
    ("dump-ir-unwritable", {}, ["compile", "--model", "tiny", "-o", "OUT", "--dump-ir", "/proc/ir"], 1,
     "--dump-ir /proc/ir: cannot write there"),
    ("init-weights-unwritable", {}, ["init-weights", "-o", "/proc/w.safetensors"], 1,
     "-o /proc/w.safetensors: cannot write there"),
    ("output-unwritable", {}, ["compile", "--model", "tiny", "-o", "/proc/out"], 1, "/proc/out"),
    # usage errors
    ("usage-missing-option", {}, ["compile"], 2, "Missing option '-o' / '--output' (see 'bluelower compile --help')"),
    ("usage-bad-choice", {}, ["compile", "--frontend", "tf", "-o", "OUT"], 2, "Invalid value for '--frontend'"),
    ("usage-not-an-integer", {}, ["run", "B", "--max-new-tokens", "many"], 2, "'many' is not a valid integer"),
]


@pytest.mark.parametrize("files, args, code, fragment", [r[1:] for r in CONFIG_ROWS], ids=[r[0] for r in CONFIG_ROWS])
def test_bad_file_inputs(tmp_path, capfd, monkeypatch, files, args, code, fragment):
    monkeypatch.chdir(tmp_path)
    for name, content in files.items():
        write(tmp_path / name, content)
    before = snapshot(str(tmp_path))
    out = tmp_path / "out"
    args = [str(out) if a == "OUT" else a for a in args]
    assert_one_error(*invoke(args, capfd)[:2], fragment, code)
    assert not out.exists()
    assert snapshot(str(tmp_path)) == before  # no user file touched, no temporary left


# ------------------------------------------------------------------ builds (manifests)


def _kv_4tib(m):
    cap, shape = 1 << 24, [256, 2, 8, 1 << 24, 16]  # float32: 2^42 bytes
    m["runtime"]["kv_capacity"] = cap
    m["kv_cache"]["shape"] = shape
    for fn in ("prefill", "decode"):
        for inp in m["functions"][fn]["inputs"]:
            if inp["name"] == "kv_cache":
                inp["shape"] = shape


def _aarch64(build):
    with open(os.path.join(build, "model.so"), "r+b") as fh:
        fh.seek(18)
        fh.write((183).to_bytes(2, "little"))  # ELF e_machine: EM_AARCH64
    edit_manifest(lambda m: m["target"].update(mtriple="aarch64-linux-gnu"))(build)


def _del_function(name):
    return edit_manifest(lambda m: m["functions"].pop(name))


def _other_library(path):
    def mutate(build):
        shutil.copyfile(path, os.path.join(build, "model.so"))
        rehash(build)
    return mutate


RUN = ["run", "BUILD", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
MEMORY = ["inspect", "memory", "BUILD"]
SCHEDULE = ["inspect", "schedule", "BUILD"]

# (id, mutation of the build copy, command line (BUILD: the copy), fragment)
BUILD_ROWS = [
    ("broken-json", raw_manifest(b'{"format": "bluelower-bundle", '), RUN, "malformed manifest"),
    ("broken-json-memory", raw_manifest(b'{"format": '), MEMORY, "malformed manifest"),
    ("broken-json-schedule", raw_manifest(b"[1, 2"), SCHEDULE, "malformed manifest"),
    ("invalid-utf8-memory", raw_manifest(b'{"format": "bluelower-bundle\xff"}'), MEMORY, "not valid UTF-8"),
    ("invalid-utf8-schedule", raw_manifest(b'{"format": "\xc3("}'), SCHEDULE, "not valid UTF-8"),
    ("files-as-list", edit_manifest(lambda m: m.update(files=sorted(m["files"]))), RUN, "files must be an object"),
    ("files-dotdot", edit_manifest(lambda m: m["files"].update({"../x": "0" * 64})), RUN, "refusing path '../x'"),
    ("files-absolute", edit_manifest(lambda m: m["files"].update({"/etc/passwd": "0" * 64})), RUN,
     "refusing path '/etc/passwd'"),
    ("files-without-params", edit_manifest(lambda m: m["files"].pop("params.safetensors")), RUN,
     "does not list params.safetensors"),
    ("param-wrong-shape", edit_param("language_model.model.norm.weight", lambda a: np.ones(a.size // 2, a.dtype)),
     RUN, "model.so refused its arguments"),
    ("param-f16", edit_param("language_model.model.norm.weight", lambda a: a.astype(np.float16)), RUN,
     "model.so refused its arguments"),
    ("param-nan", edit_param("language_model.model.norm.weight", lambda a: np.where(np.arange(a.size) == 3, np.nan, a)
                             .astype(a.dtype)), RUN, "tensor 'language_model.model.norm.weight' holds nan at [3]"),
    ("missing-function", _del_function("decode"), RUN, "functions lacks decode"),
    ("kv-4tib", edit_manifest(_kv_4tib), RUN, "the KV cache needs 4096 GiB"),
    ("kv-capacity-2^25", edit_manifest(lambda m: m["runtime"].update(kv_capacity=1 << 25)), RUN,
     "runtime.kv_capacity 33554432 is out of range [1, 2^24]"),
    ("kv-shape-disagrees", edit_manifest(lambda m: m["kv_cache"].update(shape=[2, 2, 2, 1024, 8])), RUN,
     "but functions.prefill takes float32 [2, 2, 2, 1024, 16]"),
    ("runtime-not-object", edit_manifest(lambda m: m.update(runtime=[1])), MEMORY, "runtime must be an object"),
    ("memory-plan-malformed", edit_manifest(lambda m: m["memory_plan"].update(phases="x")), MEMORY,
     "memory_plan is malformed"),
    ("schedule-malformed", edit_manifest(lambda m: m.update(schedule={"tasks": 3})), SCHEDULE,
     "schedule is malformed"),
    ("aarch64-without-native", _aarch64, RUN, "is built for aarch64"),
    # prompts and images on an intact build
    ("prompt-id-underscore", None, ["run", "BUILD", "--prompt-ids", "1_0"], "comma-separated integers, got '1_0'"),
    ("prompt-id-fullwidth", None, ["run", "BUILD", "--prompt-ids", "\uff11,2"], "comma-separated integers"),
    ("prompt-id-exponent", None, ["run", "BUILD", "--prompt-ids", "1e23"], "comma-separated integers"),
    ("prompt-id-1e23", None, ["run", "BUILD", "--prompt-ids", "1" + "0" * 23],
     "prompt ids must be in [0, 512), got 100000000000000000000000"),
    ("prompt-id-vocab", None, ["run", "BUILD", "--prompt-ids", "1,512"], "prompt ids must be in [0, 512), got 512"),
    ("prompt-id-negative", None, ["run", "BUILD", "--prompt-ids", "-1"], "prompt ids must be in [0, 512), got -1"),
    ("max-new-tokens-huge", None, ["run", "BUILD", "--prompt-ids", "1", "--max-new-tokens", str(2**63 - 1)],
     "--max-new-tokens 9223372036854775807 is out of range [1, 1024]"),
    ("max-new-tokens-0", None, ["run", "BUILD", "--prompt-ids", "1", "--max-new-tokens", "0"],
     "--max-new-tokens 0 is out of range [1, 1024]"),
    ("prompt-beyond-kv", None, ["run", "BUILD", "--prompt-ids", ",".join(["5"] * 1100)],
     "exceeds the KV cache capacity of 1024"),
    ("max-patches-0", None, ["run", "BUILD", "--image", "IMG", "--prompt-ids", "1", "--max-patches", "0"],
     "--max-patches 0 is out of range [1, 64]"),
    ("image-beyond-kv", None, ["run", "BUILD", "--image", "IMG", "--prompt-ids", "1", "--max-patches", "64"],
     "image tokens + 1 prompt ids) plus 16 new tokens exceeds the KV cache capacity of 1024"),
    ("png-16-bit", None, ["run", "BUILD", "--image", "PNG16", "--prompt-ids", "1"],
     "unsupported pixel mode 16-bit RGB"),
    ("png-bomb", None, ["run", "BUILD", "--image", "BOMB", "--prompt-ids", "1"], "image too large"),
    ("inspect-image-too-large", None, ["inspect", "image", "BOMB"], "image too large"),
]


@pytest.mark.parametrize("mutate, args, fragment", [r[1:] for r in BUILD_ROWS], ids=[r[0] for r in BUILD_ROWS])
def test_bad_builds_and_run_inputs(tmp_path, capfd, tiny, other_library, mutate, args, fragment):
    build = tmp_path / "build"
    shutil.copytree(tiny, build)
    if mutate is not None:
        mutate(str(build))
    images = {"IMG": write(tmp_path / "wide.png", png(2000, 1000)), "PNG16": write(tmp_path / "16.png", png(40, 30, 16)),
              "BOMB": write(tmp_path / "bomb.png", png(1 << 15, 1 << 14))}
    before = snapshot(str(tmp_path))
    args = [str(build) if a == "BUILD" else images.get(a, a) for a in args]
    assert_one_error(*invoke(args, capfd)[:2], fragment)
    assert snapshot(str(tmp_path)) == before


def test_another_builds_library(tmp_path, capfd, tiny, other_library):
    build = tmp_path / "build"
    shutil.copytree(tiny, build)
    _other_library(other_library)(str(build))
    assert_one_error(*invoke(["run", str(build), "--prompt-ids", "1"], capfd)[:2],
                     "model.so has no function decode (the manifest lists it: a library of another build?)")


def test_the_build_itself_is_fine(tiny, capfd):
    """The rows above fail for their mutation alone: the intact copy runs."""
    code, err, out = invoke(["run", tiny, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"], capfd)
    assert code == 0 and not err and out.startswith("tokens:"), (code, err, out)


# ---------------------------------------------------------------------- weights (API)


def test_weight_dtypes_nan_and_widening(tmp_path, tiny_weights, capsys):
    """--weights: F16/BF16 are widened exactly (said in one progress line), integer tensors
    and NaN/Inf are refused naming the tensor."""
    from bluelower import progress
    from bluelower.errors import BlueLowerError
    from bluelower.lowering.frontend.sources import config_source
    from bluelower.lowering.frontend.weights import WeightSource, write_safetensors

    src = WeightSource(tiny_weights)
    names = src.names()
    target = "language_model.model.norm.weight"

    def variant(path, change):
        data = {n: src.read(n) for n in names}
        data[target] = change(data[target])
        write_safetensors(str(path), [(n, a.shape, str(a.dtype)) for n, a in data.items()], lambda n: data[n])
        return str(path)

    f16 = variant(tmp_path / "f16.st", lambda a: a.astype(np.float16))
    progress.set_quiet(False)
    try:
        source = config_source("tiny", f16).weights
    finally:
        progress.set_quiet(True)
    assert capsys.readouterr().err.strip() == "weights: 1 of 64 tensors stored as F16, widened to float32 (exact)"
    assert source.read(target).dtype == np.float16 and source.read(target).astype(np.float32).tolist() == \
        src.read(target).astype(np.float16).astype(np.float32).tolist()
    i8 = variant(tmp_path / "i8.st", lambda a: a.astype(np.int8))
    with pytest.raises(BlueLowerError, match=f"weight '{target}' is stored as I8; weights must be F32, F16, BF16"):
        config_source("tiny", i8)
    inf = variant(tmp_path / "inf.st", lambda a: np.where(np.arange(a.size) == 5, np.inf, a).astype(a.dtype))
    with pytest.raises(BlueLowerError, match=rf"tensor '{target}' holds inf at \[5\] \(weights must be finite\)"):
        config_source("tiny", inf).weights.read(target)


def test_reference_weights_with_nan_are_one_line(tmp_path, capfd, tiny, tiny_weights):
    """``run --check --weights``: NaN weights refused before the reference runs."""
    from bluelower.lowering.frontend.weights import WeightSource, write_safetensors

    src = WeightSource(tiny_weights)
    data = {n: src.read(n) for n in src.names()}
    data["language_model.lm_head.weight"][0, 0] = np.nan
    path = str(tmp_path / "nan.st")
    write_safetensors(path, [(n, a.shape, str(a.dtype)) for n, a in data.items()], lambda n: data[n])
    assert_one_error(*invoke(["run", tiny, "--prompt-ids", "1", "--check", "--weights", path], capfd)[:2],
                     "tensor 'language_model.lm_head.weight' holds nan at [0, 0]")


def test_large_image_is_refused_before_its_patches_are_made(tmp_path, tiny, monkeypatch):
    """The KV-cache check of an image runs once its grid is known, before preprocessing."""
    from bluelower import api
    from bluelower.errors import BlueLowerError
    from bluelower.runtime_stubs import image

    def never(*a, **k):
        raise AssertionError("preprocessed before the capacity check")

    monkeypatch.setattr(image, "preprocess_image", never)
    img = write(tmp_path / "wide.png", png(2000, 1000))
    with pytest.raises(BlueLowerError, match="exceeds the KV cache capacity of 1024"):
        api.run(tiny, image=img, prompt_ids=[1], max_patches=64)


def test_api_prompt_ids_must_be_integers(tiny):
    from bluelower import api
    from bluelower.errors import BlueLowerError

    for bad in ([1.5], [True], ["3"]):
        with pytest.raises(BlueLowerError, match="prompt ids must be integers"):
            api.run(tiny, prompt_ids=bad)


# ------------------------------------------------------------------ docs/cli.md


def test_every_option_is_documented():
    """Every option of every command's --help appears in docs/cli.md."""
    import click

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md")
    with open(path, encoding="utf-8") as fh:
        doc = fh.read()

    def walk(cmd, prefix):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, prefix + [name])
        else:
            yield prefix, cmd

    missing = []
    for prefix, cmd in walk(cli, []):
        section = doc.split(f"## bluelower {prefix[0]}")[1].split("\n## ")[0] if f"## bluelower {prefix[0]}" in doc \
            else ""
        if not section:
            missing.append(" ".join(prefix) + ": no section")
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-") and opt not in ("-h", "--help") and opt not in section:
                    missing.append(f"{' '.join(prefix)} {opt}")
    assert not missing, missing
