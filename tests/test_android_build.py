"""`bluelower build --ndk` (Android bundles) and the Neuron backend's build plumbing
(docs/native-runtime.md, "Android builds" and "APU backend interface").

No real NDK, Neuron SDK or phone is reachable here. The tests use a *fake NDK*: a
directory with the real NDK's layout whose ``aarch64-linux-android<API>-clang(++)`` are
shell wrappers around ``aarch64-linux-gnu-g(cc|++)`` (they log every call) and whose
``build/cmake/android.toolchain.cmake`` only selects that compiler. That exercises
bluelower's side (validation, target triple, NDK linker for model.so, CMake + toolchain
file for the runtime, manifest), not Android itself. All tests here take seconds; the
whole build with the fake NDK (~100 s: a tiny TVM build) runs with
``BLUELOWER_FULL_NDK_TEST=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bluelower.errors import BlueLowerError
from bluelower import cache
from bluelower.lowering.artifacts import device
from bluelower.lowering.artifacts.toolchains import gnu
from bluelower.lowering.artifacts.toolchains import android

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_NEURON = os.path.join(REPO, "tests", "data", "fake_neuron_sdk")
HOST_TAG = android._host_tags()[0]
CROSS = shutil.which("aarch64-linux-gnu-g++")

TOOLCHAIN = """# fake NDK toolchain file (tests): select the wrapper compiler for ANDROID_PLATFORM
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES ANDROID_PLATFORM)
string(REPLACE "android-" "" _api "${ANDROID_PLATFORM}")
set(CMAKE_CXX_COMPILER "${CMAKE_CURRENT_LIST_DIR}/../../toolchains/llvm/prebuilt/%s/bin/aarch64-linux-android${_api}-clang++")
"""


def make_fake_ndk(root: str, api: int = 28, revision: str = "26.1.10909125", parts=("props", "clang", "toolchain")) -> str:
    """A fake NDK at ``root`` with the given parts; the wrappers append to ``root/calls.log``."""
    os.makedirs(root, exist_ok=True)
    if "props" in parts:
        with open(os.path.join(root, "source.properties"), "w") as fh:
            fh.write(f"Pkg.Desc = Android NDK\nPkg.Revision = {revision}\n")
    if "clang" in parts:
        bindir = os.path.join(root, "toolchains", "llvm", "prebuilt", HOST_TAG, "bin")
        os.makedirs(bindir, exist_ok=True)
        log = os.path.join(root, "calls.log")
        for suffix, real in (("clang++", "aarch64-linux-gnu-g++"), ("clang", "aarch64-linux-gnu-gcc")):
            path = os.path.join(bindir, f"aarch64-linux-android{api}-{suffix}")
            with open(path, "w") as fh:
                fh.write(f'#!/bin/sh\necho "{suffix} $*" >> "{log}"\nexec {real} "$@"\n')
            os.chmod(path, 0o755)
    if "toolchain" in parts:
        os.makedirs(os.path.join(root, "build", "cmake"), exist_ok=True)
        with open(os.path.join(root, android.TOOLCHAIN_FILE), "w") as fh:
            fh.write(TOOLCHAIN % HOST_TAG)
    return root


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bluelower.cli", *args], capture_output=True, text=True, cwd=cwd)


def _one_error(proc, needle):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------- NDK validation


def test_ndk_validation_names_what_is_missing(tmp_path):
    with pytest.raises(BlueLowerError, match="no such directory"):
        android.find_ndk(str(tmp_path / "nope"))
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(BlueLowerError) as exc:
        android.find_ndk(empty)
    msg = str(exc.value)
    assert "source.properties" in msg and "toolchains/llvm/prebuilt" in msg and android.TOOLCHAIN_FILE in msg
    # only the toolchain file missing -> only it is named
    partial = make_fake_ndk(str(tmp_path / "partial"), parts=("props", "clang"))
    with pytest.raises(BlueLowerError) as exc:
        android.find_ndk(partial)
    assert "missing build/cmake/android.toolchain.cmake" in str(exc.value) and "source.properties" not in str(exc.value)
    # clang for another API level only -> the missing compiler and the levels present
    ndk = make_fake_ndk(str(tmp_path / "ndk"), api=30)
    with pytest.raises(BlueLowerError, match=r"aarch64-linux-android28-clang\+\+ .*API levels present: 30\.\.30"):
        android.find_ndk(ndk, 28)
    found = android.find_ndk(ndk, 30)
    assert found.revision == "26.1.10909125" and found.api == 30 and found.clangxx.endswith("android30-clang++")
    with pytest.raises(BlueLowerError, match="--android-api 19"):
        android.find_ndk(ndk, 19)


def test_cli_bad_ndk_is_one_line_and_writes_nothing(tmp_path):
    make_fake_ndk(str(tmp_path / "ndk"), parts=("props", "toolchain"))
    proc = _cli("build", "--ndk", "ndk", "-o", "out", cwd=str(tmp_path))
    _one_error(proc, "is not a usable Android NDK: missing toolchains/llvm/prebuilt")
    # a complete NDK but no Android TVM runtime -> says what to pass
    make_fake_ndk(str(tmp_path / "ndk2"))
    proc = _cli("build", "--ndk", "ndk2", "-o", "out", cwd=str(tmp_path))
    _one_error(proc, "--tvm-runtime-dir DIR")
    assert "glibc" in proc.stderr
    proc = _cli("build", "--tvm-source", "x", "-o", "out", cwd=str(tmp_path))
    _one_error(proc, "add --ndk PATH")
    leftovers = sorted(f for f in os.listdir(tmp_path) if f not in ("ndk", "ndk2"))
    assert leftovers == [], leftovers  # no bundle, no tarball, no temporary directory


def test_tvm_runtime_dir_validation(tmp_path):
    d = tmp_path / "rt"
    d.mkdir()
    with pytest.raises(BlueLowerError, match="missing libtvm_runtime.so and libtvm_ffi.so"):
        android.check_runtime_dir(str(d))
    for name in android.RUNTIME_LIBS:
        (d / name).write_bytes(b"not an elf")
    with pytest.raises(BlueLowerError, match="not an ELF file"):
        android.check_runtime_dir(str(d))
    for name in android.RUNTIME_LIBS:  # the Python interpreter: an ELF of this machine
        shutil.copyfile(os.path.realpath(sys.executable), d / name)
    if gnu.host_arch() != "aarch64":
        with pytest.raises(BlueLowerError, match="not an aarch64"):
            android.check_runtime_dir(str(d))
    with pytest.raises(BlueLowerError, match="either --tvm-runtime-dir or --tvm-source"):
        android.runtime_libs(None, str(d), str(d))
    with pytest.raises(BlueLowerError, match="git submodule update"):
        (tmp_path / "tvm" / "src" / "runtime").mkdir(parents=True)
        (tmp_path / "tvm" / "include" / "tvm" / "runtime").mkdir(parents=True)
        (tmp_path / "tvm" / "CMakeLists.txt").write_text("project(tvm)\n")
        android.check_tvm_source(str(tmp_path / "tvm"))


def test_elf_reader_on_the_manylinux_aarch64_libs():
    if CROSS is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed")
    libs = gnu.aarch64_runtime_libs()  # cached wheels (downloaded once)
    info = android.elf_info(libs["libtvm_runtime.so"])
    assert info["class"] == 64 and info["machine"] == android.EM_AARCH64
    assert "libtvm_ffi.so" in info["needed"] and "libc.so.6" in info["needed"]
    assert android.libc_flavour(info) == "glibc"  # why they cannot be an Android runtime
    checked = android.check_runtime_dir(os.path.dirname(libs["libtvm_runtime.so"]))  # accepted, with a warning
    assert sorted(checked) == sorted(android.RUNTIME_LIBS)


def test_tvm_source_build_commands():
    ndk = android.Ndk("/ndk", "26.1.10909125", HOST_TAG, 31)
    configure, build = android.tvm_runtime_cmake_cmds(ndk, "/tvm", "/b", jobs=2)
    assert configure[:5] == ["cmake", "-S", "/tvm", "-B", "/b"]
    for arg in ("-DCMAKE_TOOLCHAIN_FILE=/ndk/build/cmake/android.toolchain.cmake", "-DANDROID_ABI=arm64-v8a",
                "-DANDROID_PLATFORM=android-31", "-DANDROID_STL=c++_shared", "-DUSE_LLVM=OFF", "-DUSE_RPC=OFF"):
        assert arg in configure
    assert build == ["cmake", "--build", "/b", "--target", "tvm_runtime", "-j", "2"]


# --------------------------------------------------------------------- the model library


def test_model_library_is_linked_by_the_ndk_clang(tmp_path):
    """Android target triple + the SoC's CPU features; export_library calls the NDK's clang++."""
    if CROSS is None:
        pytest.skip("aarch64-linux-gnu-g++ not installed")
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from bluelower.lowering.artifacts.compile import _export_kwargs, resolve_soc

    ndk = android.find_ndk(make_fake_ndk(str(tmp_path / "ndk")), 28)
    base = resolve_soc("dimensity9300")
    soc = android.android_soc(base, ndk)
    target = soc.tvm_target_dict()
    assert target["mtriple"] == "aarch64-linux-android"
    assert target["mattr"] == base.tvm_target_dict()["mattr"] and target["mcpu"] == base.tvm_target_dict()["mcpu"]
    assert resolve_soc(soc) is soc
    with pytest.raises(BlueLowerError, match="arm64 Android"):
        android.android_soc(resolve_soc("host"), ndk)

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
            return R.add(x, x)

    ex = relax.build(Mod, soc.tvm_target())  # default pipeline: legalize + lower
    out = str(tmp_path / "model.so")
    ex.export_library(out, **_export_kwargs(soc))
    info = android.elf_info(out)
    assert info["machine"] == android.EM_AARCH64
    calls = open(os.path.join(ndk.root, "calls.log")).read()
    assert "clang++ " in calls and "-shared" in calls and out in calls


# --------------------------------------------------------------------- runtime CMake


def _configure(tmp_path, ndk_root, *extra):
    ndk = android.find_ndk(ndk_root, 28)
    libs = gnu.aarch64_runtime_libs()
    configure, build = android.runtime_cmake_cmds(ndk, gnu.RUNTIME_SRC, str(tmp_path / "b"), libs,
                                                  gnu.ffi_include_dirs())
    assert build[-2:] == ["--target", "bluelower-run"]
    assert "-DANDROID_PLATFORM=android-28" in configure and "-DANDROID_ABI=arm64-v8a" in configure
    return subprocess.run(configure + list(extra), capture_output=True, text=True)


def test_runtime_cmake_configures_with_the_ndk_toolchain_file(tmp_path):
    """The configure step of the Android runtime build, with and without the Neuron SDK."""
    if CROSS is None or shutil.which("cmake") is None:
        pytest.skip("aarch64-linux-gnu-g++ or cmake not installed")
    root = make_fake_ndk(str(tmp_path / "ndk"))
    proc = _configure(tmp_path, root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the neuron APU backend is not built (sim only)" in proc.stdout
    import glob

    compiler = "".join(open(p).read() for p in glob.glob(str(tmp_path / "b" / "CMakeFiles" / "*" / "CMakeCXXCompiler.cmake")))
    assert "aarch64-linux-android28-clang++" in compiler  # CMAKE_CXX_COMPILER from the toolchain file
    shutil.rmtree(tmp_path / "b")
    proc = _configure(tmp_path, root, f"-DNEURON_SDK_DIR={FAKE_NEURON}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Neuron SDK headers found" in proc.stdout
    shutil.rmtree(tmp_path / "b")
    proc = _configure(tmp_path, root, "-DBLUELOWER_REQUIRE_NEURON=ON")
    assert proc.returncode != 0 and "BLUELOWER_REQUIRE_NEURON" in proc.stderr


# --------------------------------------------------------------------- Neuron backend sources


def _syntax(src: str, *flags: str) -> subprocess.CompletedProcess:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not installed")
    inc = gnu.ffi_include_dirs()
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Werror", *flags, *[f"-I{d}" for d in inc],
           os.path.join(gnu.RUNTIME_SRC, src)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_neuron_backend_compiles_against_the_sdk_header():
    """apu_neuron.cc and the dispatcher with BLUELOWER_HAVE_NEURON, against a stand-in of
    neuron/api/RuntimeAPI.h (catches typos; the real SDK is not available here)."""
    flags = ("-DBLUELOWER_HAVE_NEURON=1", f"-I{os.path.join(FAKE_NEURON, 'include')}")
    for src in ("apu_neuron.cc", "apu_sim.cc"):
        proc = _syntax(src, *flags)
        assert proc.returncode == 0, proc.stderr[-2000:]
    # the test can fail: without the header the Neuron build does not compile
    proc = _syntax("apu_neuron.cc", "-DBLUELOWER_HAVE_NEURON=1")
    assert proc.returncode != 0 and "RuntimeAPI.h" in proc.stderr


# --------------------------------------------------------------------- the whole build (opt-in)


@pytest.mark.skipif(os.environ.get("BLUELOWER_FULL_NDK_TEST") != "1", reason="~100 s; set BLUELOWER_FULL_NDK_TEST=1")
def test_full_android_build_with_a_fake_ndk(tmp_path):
    if CROSS is None or shutil.which("cmake") is None:
        pytest.skip("aarch64-linux-gnu-g++ or cmake not installed")
    make_fake_ndk(str(tmp_path / "ndk"), api=29)
    libdir = os.path.dirname(gnu.aarch64_runtime_libs()["libtvm_runtime.so"])
    proc = _cli("-q", "build", "--model", "tiny", "--quant", "fp32", "--ndk", "ndk", "--android-api", "29", "--tvm-runtime-dir", libdir,
                "-o", "out", "--json", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["os"] == "android" and info["android"]["api"] == 29
    m = json.load(open(tmp_path / "out" / "manifest.json"))
    assert m["target"]["mtriple"] == "aarch64-linux-android" and m["target"]["os"] == "android"
    assert m["android"] == {"api": 29, "abi": "arm64-v8a", "ndk_revision": "26.1.10909125", "ndk_host": HOST_TAG}
    assert m["native_runtime"]["os"] == "android" and m["native_runtime"]["tvm_runtime"]["libc"] == "glibc"
    for rel in ("model.so", "bin/bluelower-run", "lib/libtvm_runtime.so"):
        assert android.elf_info(str(tmp_path / "out" / rel))["machine"] == android.EM_AARCH64
    calls = open(tmp_path / "ndk" / "calls.log").read()
    assert "-shared" in calls  # model.so linked by the NDK clang++
    binary = open(tmp_path / "out" / "bin" / "bluelower-run", "rb").read()
    assert b"$ORIGIN" not in binary and cache.cache_dir().encode() not in binary  # no RUNPATH: dlopen()s lib/ itself
    backend = open(tmp_path / "out" / "lib" / "libbluelower_backend.so", "rb").read()
    assert b"$ORIGIN" in backend and cache.cache_dir().encode() not in backend  # RUNPATH: no build paths
    with pytest.raises(BlueLowerError, match="Android bundle: run it on the phone"):
        device.native_command(str(tmp_path / "out"), [])
    # the fake NDK produced glibc binaries, so this bundle runs under qemu: the CMake-built
    # runtime and the android-triple model.so generate the PyTorch reference tokens
    qemu = shutil.which("qemu-aarch64")
    if qemu and os.path.isdir(gnu.QEMU_SYSROOT):
        from bluelower.runtime_stubs.generate import generate, reference_for_build

        out = str(tmp_path / "out")
        env = dict(os.environ, TVM_NUM_THREADS="1")
        run = subprocess.run([qemu, "-L", gnu.QEMU_SYSROOT, os.path.join(out, "bin", "bluelower-run"), out,
                              "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json"],
                             env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["tokens"] == generate(reference_for_build(out), None, [1, 2, 3], 6).tokens
