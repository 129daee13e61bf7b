"""The native runtime (bluelower-run) and device bundles (docs/native-runtime.md).

Session fixtures build the tiny model once per bundle kind: an aarch64 bundle for the
Dimensity 9300 (cross-compiled, run under qemu-aarch64) and a host bundle (run
directly). The aarch64 TVM runtime wheels and the runtime binaries are cached in
``~/.cache/bluelower`` (or ``$BLUELOWER_CACHE``), so only the first session downloads.
Needs ``g++`` and, for aarch64, ``apt-get install -y g++-aarch64-linux-gnu qemu-user``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bluelower.errors import BlueLowerError
from bluelower.lowering.artifacts import device
from bluelower.lowering.artifacts.toolchains import gnu

PROMPT = "1,2,3"
MAX_NEW = 8


def _have_aarch64() -> str | None:
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install -y g++-aarch64-linux-gnu qemu-user)"
    return None


def _build(soc: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "bluelower.cli", "-q", "build", "--model", "tiny", "--quant", "fp32", "--soc", soc, "-o",
           out, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def image_npy(tmp_path_factory) -> str:
    rng = np.random.default_rng(7)
    path = str(tmp_path_factory.mktemp("img") / "img.npy")
    np.save(path, rng.integers(0, 256, size=(50, 41, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="session")
def _device(tmp_path_factory, image_npy):
    """Builds the aarch64 bundle, then starts (in the background, so the host tests run
    meanwhile) the qemu generation run and a second build for the reproducibility check."""
    if _have_aarch64():
        yield None
        return
    base = tmp_path_factory.mktemp("dev")
    info = _build("dimensity9300", str(base / "bundle"))
    args = [info["bundle"], "--image", image_npy, "--prompt-ids", PROMPT, "--max-new-tokens", str(MAX_NEW), "--json"]
    cmd, env = device.native_command(info["bundle"], args)
    env["TVM_NUM_THREADS"] = "1"  # leave a core to the builds running alongside
    qemu = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    again = subprocess.Popen([sys.executable, "-m", "bluelower.cli", "-q", "build", "--model", "tiny", "--quant", "fp32",
                              "--soc", "dimensity9300", "-o", str(base / "again"), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jobs = {"info": info, "qemu": qemu, "again": again}
    yield jobs
    for proc in (qemu, again):
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="session")
def device_bundle(_device):
    if _device is None:
        pytest.skip(_have_aarch64())
    return _device


@pytest.fixture(scope="session")
def host_bundle(tmp_path_factory, request):
    if any("device_bundle" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("_device")  # start the aarch64 jobs first, they run alongside
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    out = str(tmp_path_factory.mktemp("host") / "bundle")
    return _build("host", out)


def _reference_tokens(bundle: str, image: str | None, prompt: str, max_new: int, policy: str = "relaxed") -> list:
    """PyTorch tokens; the image preprocessed like `bluelower run` (default: relaxed grid)."""
    from bluelower.lowering.artifacts.bundle import read_manifest
    from bluelower.runtime_stubs.generate import generate, reference_for_build
    from bluelower.runtime_stubs.image import load_image, preprocess_image, select_grid

    rt = read_manifest(bundle)["runtime"]
    patches = None
    if image is not None:
        img = load_image(image)
        grid = None
        if policy == "relaxed":
            grid = select_grid(img.shape[1], img.shape[0], policy="relaxed", max_patches=int(rt.get("max_patches", 9)),
                               image_size=rt["image_size"])
        patches = preprocess_image(img, grid=grid, image_size=rt["image_size"],
                                   mean=tuple(rt["image_mean"]), std=tuple(rt["image_std"]))
    ids = [int(t) for t in prompt.split(",")] if prompt else []
    return generate(reference_for_build(bundle), patches, ids, max_new).tokens


def _native(bundle: str, *args: str) -> subprocess.CompletedProcess:
    cmd, env = device.native_command(bundle, [bundle, *args])
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _one_error_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert proc.stdout == ""


# --------------------------------------------------------------------- generation


def test_host_bundle_matches_pytorch(host_bundle, image_npy, tmp_path):
    bundle = host_bundle["bundle"]
    proc = _native(bundle, "--image", image_npy, "--prompt-ids", PROMPT, "--max-new-tokens", str(MAX_NEW), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] == _reference_tokens(bundle, image_npy, PROMPT, MAX_NEW)
    # float32 image in [0, 1], Fortran order; a prompt longer than one prefill chunk, no image
    f32 = str(tmp_path / "f32.npy")
    rng = np.random.default_rng(3)
    np.save(f32, np.asfortranarray(rng.random((400, 300, 3), dtype=np.float32)))
    long_prompt = ",".join(str(i % 500 + 3) for i in range(70))
    for image, prompt, policy in ((f32, "5", "relaxed"), (image_npy, "5", "none"), (None, long_prompt, "relaxed")):
        args = (["--image", image] if image else []) + ["--prompt-ids", prompt, "--max-new-tokens", "5", "--json",
                                                       "--policy", policy]
        proc = _native(bundle, *args)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["tokens"] == _reference_tokens(bundle, image, prompt, 5, policy)


def test_cli_run_native_check(host_bundle, image_npy):
    cmd = [sys.executable, "-m", "bluelower.cli", "run", host_bundle["bundle"], "--native", "--image", image_npy,
           "--prompt-ids", PROMPT, "--max-new-tokens", "4", "--check", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["match"] and out["tokens"] == out["reference_tokens"]


@pytest.mark.parametrize("policy", ["none", "relaxed"])
@pytest.mark.parametrize("shape,kind", [((50, 41), "u8"), ((7, 3), "u8"), ((1000, 1500), "u8"), ((2400, 1080), "u8"),
                                        ((384, 384), "u8"), ((384, 97), "u8"), ((102, 500), "f32")])
def test_preprocessing_is_bit_exact(host_bundle, tmp_path, shape, kind, policy):
    """The binary's patches (grid None, or the relaxed grid + thumbnail) == preprocess_image, bit for bit."""
    from bluelower.runtime_stubs.image import load_image, preprocess_image, select_grid

    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    arr = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    if kind == "f32":
        arr = rng.random(shape + (3,), dtype=np.float32)
    src, out = str(tmp_path / "img.npy"), str(tmp_path / "px.f32")
    np.save(src, arr)
    proc = _native(host_bundle["bundle"], "--image", src, "--dump-pixels", out, "--policy", policy, "--max-patches", "9")
    assert proc.returncode == 0, proc.stderr
    img = load_image(src)
    grid = select_grid(img.shape[1], img.shape[0], policy="relaxed", max_patches=9) if policy == "relaxed" else None
    ref = preprocess_image(img, grid=grid)
    got = np.fromfile(out, dtype=np.float32).reshape(ref.shape)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


# --------------------------------------------------------------------- failures


@pytest.fixture
def broken(host_bundle, tmp_path):
    """A fresh copy of the host bundle to damage."""
    dst = str(tmp_path / "b")
    shutil.copytree(host_bundle["bundle"], dst, symlinks=True)
    return dst


def _direct(bundle: str, *args: str) -> subprocess.CompletedProcess:
    """The host binary itself (no Python manifest check in front of it)."""
    return subprocess.run([os.path.join(bundle, "bin", "bluelower-run"), bundle, *args], capture_output=True, text=True)


def _run(bundle, image_npy, *extra):
    return _direct(bundle, "--image", image_npy, "--prompt-ids", PROMPT, "--max-new-tokens", "4", *extra)


def _rehash(bundle, name):
    from bluelower.lowering.artifacts.bundle import write_manifest

    m = json.load(open(os.path.join(bundle, "manifest.json")))
    m["files"][name] = hashlib.sha256(open(os.path.join(bundle, name), "rb").read()).hexdigest()
    write_manifest(bundle, m)  # manifest.json and its manifest.sha256


def _write_manifest_text(bundle, text: str) -> None:
    """``manifest.json`` replaced by ``text``, with a matching manifest.sha256 (what is then
    tested is the manifest's content, not its hash)."""
    with open(os.path.join(bundle, "manifest.sha256")) as fh:
        rest = fh.read().splitlines(keepends=True)[1:]
    open(os.path.join(bundle, "manifest.json"), "w").write(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    open(os.path.join(bundle, "manifest.sha256"), "w").write(f"{digest}  manifest.json\n" + "".join(rest))


def test_flipped_byte_in_params(broken, image_npy):
    path = os.path.join(broken, "params.safetensors")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    _one_error_line(_run(broken, image_npy), "params.safetensors does not match its SHA-256")


def test_truncated_params(broken, image_npy):
    path = os.path.join(broken, "params.safetensors")
    size = os.path.getsize(path)
    os.truncate(path, size - 1000)
    _one_error_line(_run(broken, image_npy), "params.safetensors does not match its SHA-256")
    _rehash(broken, "params.safetensors")  # hash fixed up: the safetensors parser must catch it
    _one_error_line(_run(broken, image_npy), "truncated")
    os.truncate(path, 4)
    _rehash(broken, "params.safetensors")
    _one_error_line(_run(broken, image_npy), "truncated")


def test_missing_model_so(broken, image_npy):
    os.remove(os.path.join(broken, "model.so"))
    _one_error_line(_run(broken, image_npy), "missing file model.so")


def test_bad_format_version(broken, image_npy):
    path = os.path.join(broken, "manifest.json")
    m = json.load(open(path))
    m["format_version"] = 2
    _write_manifest_text(broken, json.dumps(m))
    _one_error_line(_run(broken, image_npy), "format version 2 is not supported")
    _write_manifest_text(broken, '{"format": "bluelower-bundle", "format_version": 1, "files": {')
    _one_error_line(_run(broken, image_npy), "malformed JSON")


def test_wrong_soc_and_prompt_beyond_cache(host_bundle, image_npy, tmp_path):
    bundle = host_bundle["bundle"]
    _one_error_line(_run(bundle, image_npy, "--soc", "dimensity9300"), "built for SoC 'host', not 'dimensity9300'")
    capacity = json.load(open(os.path.join(bundle, "manifest.json")))["runtime"]["kv_capacity"]
    proc = _direct(bundle, "--image", image_npy, "--prompt-ids", PROMPT, "--max-new-tokens", str(capacity))
    _one_error_line(proc, f"exceeds the KV cache capacity of {capacity}")
    bad = str(tmp_path / "bad.npy")
    np.save(bad, np.zeros((4, 4), np.uint8))
    _one_error_line(_run(bundle, bad), "expected an [H, W, 3] array")
    np.save(bad, np.full((4, 4, 3), 2.0, np.float32))
    _one_error_line(_run(bundle, bad), "must lie in [0, 1]")
    _one_error_line(_direct(bundle, "--prompt-ids", "1,x"), "comma-separated integers")


def test_apu_backend_selection(host_bundle, image_npy):
    """The default build has only `sim`: `neuron` (built only with the Neuron SDK headers)
    and unknown names are one-line errors; `--apu-backend` is an alias of `--backend`."""
    bundle = host_bundle["bundle"]
    _one_error_line(_run(bundle, image_npy, "--backend", "neuron"),
                    "APU backend 'neuron' is not compiled into this runtime (built without the Neuron SDK headers")
    _one_error_line(_run(bundle, image_npy, "--apu-backend", "npu"), "unknown APU backend 'npu' (available: sim)")
    proc = _direct(bundle, "--prompt-ids", PROMPT, "--max-new-tokens", "2", "--apu-backend", "sim", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backend"] == "sim"


def test_missing_cross_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BlueLowerError, match="apt-get install -y g\\+\\+-aarch64-linux-gnu"):
        gnu.cross_cxx("aarch64")


# --------------------------------------------------------------------- aarch64 (last: they wait for
# the background qemu run and second build started by the _device fixture)


def test_aarch64_bundle_matches_pytorch_under_qemu(device_bundle, image_npy):
    bundle = device_bundle["info"]["bundle"]
    manifest = json.load(open(os.path.join(bundle, "manifest.json")))
    assert manifest["native_runtime"]["arch"] == "aarch64"
    for rel in ("bin/bluelower-run", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "model.so"):
        with open(os.path.join(bundle, rel), "rb") as fh:
            head = fh.read(20)
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, rel  # EM_AARCH64
        assert manifest["files"][rel] == hashlib.sha256(open(os.path.join(bundle, rel), "rb").read()).hexdigest()
    expected = _reference_tokens(bundle, image_npy, PROMPT, MAX_NEW)
    stdout, stderr = device_bundle["qemu"].communicate(timeout=600)
    assert device_bundle["qemu"].returncode == 0, stderr
    out = json.loads(stdout)
    assert out["arch"] == "aarch64"
    assert out["tokens"] == expected
    assert set(out["timings_s"]) >= {"image_encode", "embed", "prefill", "decode"}


def test_two_builds_give_the_same_tarball(device_bundle):
    stdout, stderr = device_bundle["again"].communicate(timeout=600)
    assert device_bundle["again"].returncode == 0, stderr[-3000:]
    again = json.loads(stdout)
    assert again["tarball_sha256"] == device_bundle["info"]["tarball_sha256"]
    with open(again["tarball"], "rb") as fh:
        assert fh.read(10)[4:8] == b"\0\0\0\0"  # gzip mtime 0
    import tarfile

    with tarfile.open(again["tarball"]) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert any(n.endswith("/bin/bluelower-run") for n in names)


def test_quantized_aarch64_bundle_matches_quantized_host_bundle(tmp_path):
    """w4a16kv8 (INT4/INT8 kernels, INT8 KV cache): the aarch64 runtime under qemu gives the
    host build's tokens, and both match the dequantized PyTorch reference."""
    if _have_aarch64():
        pytest.skip(_have_aarch64())
    outs = {}
    for soc in ("host", "dimensity9300"):
        cmd = [sys.executable, "-m", "bluelower.cli", "-q", "build", "--model", "tiny", "--soc", soc,
               "--quant", "w4a16kv8", "-o", str(tmp_path / soc), "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[soc] = json.loads(proc.stdout)["bundle"]
    prompt = ",".join(str(i % 400 + 3) for i in range(40))
    tokens = {}
    for soc, bundle in outs.items():
        cmd, env = device.native_command(bundle, [bundle, "--prompt-ids", prompt, "--max-new-tokens", "8", "--json"])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        tokens[soc] = json.loads(proc.stdout)["tokens"]
    assert tokens["dimensity9300"] == tokens["host"]
    from bluelower.reports.eval_quant import check_reference
    from bluelower.runtime_stubs.generate import generate

    ids = [int(t) for t in prompt.split(",")]
    assert tokens["host"] == generate(check_reference(outs["host"], None), None, ids, 8).tokens
