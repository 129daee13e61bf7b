"""Device bundles: the native runtime, its toolchain, and reproducible tarballs.

``build_bundle`` = ``compile_model`` for the SoC's target (aarch64: the TVM library is
cross-linked with ``aarch64-linux-gnu-g++``) + the C++ runtime ``bluelower-run``
(``bluelower/runtime_stubs``) built for the same architecture against ``libtvm_runtime``
and ``libtvm_ffi`` (for aarch64 taken from the apache-tvm / apache-tvm-ffi manylinux
aarch64 wheels, downloaded once with ``pip download`` and cached), copied into the
bundle's ``lib/``, all hashed in the manifest, plus a byte-reproducible ``.tar.gz``.

With ``ndk=PATH`` the bundle is for Android instead (``lowering/android.py``: the NDK's
clang links ``model.so``, CMake + the NDK toolchain file build the runtime, the TVM
runtime comes from ``tvm_runtime_dir`` or is built from ``tvm_source``).

``run_native`` runs a bundle's own binary: directly for a host bundle, under
``qemu-aarch64 -L /usr/aarch64-linux-gnu`` for an aarch64 bundle on an x86_64 machine.
See docs/native-runtime.md.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata

from ... import progress
from ...errors import BlueLowerError

RUNTIME_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "runtime_stubs",
                           "native")
RUNTIME_SOURCES = ("bluelower_run.cc", "apu_sim.cc", "image.cc", "json.cc", "loaders.cc", "sha256.cc", "util.cc")
RUNTIME_BINARY = "bin/bluelower-run"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
APT_HINT = "apt-get update && apt-get install -y g++-aarch64-linux-gnu qemu-user"
QEMU_SYSROOT = "/usr/aarch64-linux-gnu"
# -ffp-contract=off: the image preprocessing must not fuse multiply-adds (bit exactness);
# the prefix maps keep build paths (tvm_ffi headers' __FILE__, sources) out of the binary.
CXXFLAGS = ("-std=c++17", "-O2", "-fPIE", "-ffp-contract=off", "-fno-fast-math", "-DNDEBUG")
TARBALL_MTIME = 0
# BLUELOWER_RUNTIME_SANITIZE=1: build the runtime with ASan + UBSan (testing only; the
# flags are part of the runtime cache key and of the manifest's native_runtime.compiler).
SANITIZE_FLAGS = ("-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined")


def _cxxflags() -> tuple:
    return CXXFLAGS + (SANITIZE_FLAGS if os.environ.get("BLUELOWER_RUNTIME_SANITIZE") == "1" else ())


def cache_dir() -> str:
    """``$BLUELOWER_CACHE`` or ``~/.cache/bluelower`` (created)."""
    path = os.environ.get("BLUELOWER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bluelower")
    os.makedirs(path, exist_ok=True)
    return path


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished temporary directory ``tmp`` to ``final``, replacing an older one
    (cache entries and runtime builds are written aside and swapped in whole)."""
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------- toolchain


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def arch_of_soc(soc) -> str:
    return host_arch() if soc.is_host else soc.triple.split("-")[0]


def cross_cxx(arch: str) -> str:
    """The C++ compiler for ``arch``; a clear error (with the apt command) if missing."""
    if arch == host_arch():
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise BlueLowerError(f"C++ compiler '{cxx}' not found: install it with apt-get install -y g++")
        return cxx
    if arch != "aarch64":
        raise BlueLowerError(f"no cross toolchain known for '{arch}' (supported: aarch64, the host {host_arch()})")
    cxx = "aarch64-linux-gnu-g++"
    if shutil.which(cxx) is None:
        raise BlueLowerError(f"cross compiler {cxx} not found: install it with `{APT_HINT}`")
    return cxx


def cross_fcompile(triple: str):
    """``export_library`` fcompile for a device triple (build.py's ``_export_kwargs``)."""
    from tvm.support import cc

    arch = triple.split("-")[0]
    return cc.cross_compiler(cross_cxx(arch))


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        raise BlueLowerError(f"python package {name} is not installed") from None


def _ffi_include_dirs() -> list[str]:
    import tvm_ffi

    root = os.path.dirname(os.path.abspath(tvm_ffi.__file__))
    dirs = [os.path.join(root, "include"), os.path.join(root, "3rdparty", "dlpack", "include")]
    for d in dirs:
        if not os.path.isdir(d):
            raise BlueLowerError(f"tvm_ffi headers not found at {d} (is apache-tvm-ffi installed?)")
    return dirs


def _host_runtime_libs() -> dict:
    import tvm
    import tvm_ffi

    tvm_lib = os.path.join(os.path.dirname(os.path.abspath(tvm.__file__)), "lib", "libtvm_runtime.so")
    ffi_lib = os.path.join(os.path.dirname(os.path.abspath(tvm_ffi.__file__)), "lib", "libtvm_ffi.so")
    for p in (tvm_lib, ffi_lib):
        if not os.path.isfile(p):
            raise BlueLowerError(f"TVM runtime library not found: {p}")
    return {"libtvm_runtime.so": tvm_lib, "libtvm_ffi.so": ffi_lib}


def _download_wheels(dest: str, tvm_version: str, ffi_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
           "--implementation", "cp", "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
           f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}", "-d", dest]
    progress.log("downloading the aarch64 apache-tvm wheels (once; cached in " + dest + ")")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise BlueLowerError(f"cannot download the aarch64 TVM wheels ({' '.join(cmd[2:])}): {last}")


def aarch64_runtime_libs() -> dict:
    """``{name: path}`` of libtvm_runtime.so / libtvm_ffi.so for aarch64, from the
    manylinux aarch64 wheels of the installed TVM versions (downloaded once, cached)."""
    tvm_version = _dist_version("apache-tvm")
    ffi_version = _dist_version("apache-tvm-ffi")
    base = os.path.join(cache_dir(), "aarch64", f"tvm-{tvm_version}-ffi-{ffi_version}")
    libdir = os.path.join(base, "lib")
    out = {name: os.path.join(libdir, name) for name in RUNTIME_LIBS}
    if all(os.path.isfile(p) for p in out.values()):
        return out
    wheels = os.path.join(cache_dir(), "wheels")
    os.makedirs(wheels, exist_ok=True)

    def find():
        found = {}
        for f in sorted(os.listdir(wheels)):
            if not f.endswith(".whl") or "aarch64" not in f:
                continue
            if f.startswith(f"apache_tvm-{tvm_version}-"):
                found["tvm"] = os.path.join(wheels, f)
            elif f.startswith(f"apache_tvm_ffi-{ffi_version}-"):
                found["ffi"] = os.path.join(wheels, f)
        return found

    found = find()
    if len(found) < 2:
        _download_wheels(wheels, tvm_version, ffi_version)
        found = find()
        if len(found) < 2:
            raise BlueLowerError(f"pip download did not produce the aarch64 wheels in {wheels}")
    tmp = tempfile.mkdtemp(prefix=".extract-", dir=os.path.dirname(base) if os.path.isdir(os.path.dirname(base)) else None)
    try:
        os.makedirs(os.path.join(tmp, "lib"))
        for key, member in (("tvm", "tvm/lib/libtvm_runtime.so"), ("ffi", "tvm_ffi/lib/libtvm_ffi.so")):
            try:
                with zipfile.ZipFile(found[key]) as zf, zf.open(member) as src, \
                        open(os.path.join(tmp, "lib", os.path.basename(member)), "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise BlueLowerError(f"{found[key]}: not a usable wheel ({exc}); delete it and retry") from None
        with open(os.path.join(tmp, "wheels.json"), "w") as fh:
            json.dump({os.path.basename(p): _sha256_file(p) for p in found.values()}, fh, indent=2, sort_keys=True)
        replace_dir(tmp, base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def runtime_libs(arch: str) -> dict:
    if arch == host_arch():
        return _host_runtime_libs()
    if arch == "aarch64":
        return aarch64_runtime_libs()
    raise BlueLowerError(f"no TVM runtime libraries for '{arch}'")


def _compiler_id(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else cxx


def _compile_cmd(cxx: str, sources: list[str], out: str, libs: dict) -> list[str]:
    inc = _ffi_include_dirs()
    ffi_root = os.path.dirname(inc[0])
    libdirs = sorted({os.path.dirname(p) for p in libs.values()})
    cmd = [cxx, *_cxxflags(), f"-ffile-prefix-map={RUNTIME_SRC}=runtime_stubs", f"-ffile-prefix-map={ffi_root}=tvm_ffi"]
    cmd += [f"-I{d}" for d in inc] + sources + ["-o", out]
    cmd += [f"-L{d}" for d in libdirs] + [f"-Wl,-rpath-link,{d}" for d in libdirs]
    cmd += ["-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/../lib", "-Wl,--build-id=sha1", "-pie"]
    return cmd


def build_runtime(arch: str, use_cache: bool = True) -> str:
    """Build ``bluelower-run`` for ``arch``; return the binary's path (in the cache).

    The cache key is the SHA-256 of the sources, the compiler identity, the flags and the
    libraries linked against, so any change rebuilds. ``BLUELOWER_NO_CACHE=1`` forces it.
    """
    cxx = cross_cxx(arch)
    libs = runtime_libs(arch)
    h = hashlib.sha256()
    srcs = sorted(f for f in os.listdir(RUNTIME_SRC) if f.endswith((".cc", ".h")))
    for f in srcs:
        h.update(f.encode() + b"\0")
        with open(os.path.join(RUNTIME_SRC, f), "rb") as fh:
            h.update(fh.read())
    h.update(_compiler_id(cxx).encode())
    h.update(" ".join(_cxxflags()).encode())
    for name in sorted(libs):
        h.update(_sha256_file(libs[name]).encode())
    out_dir = os.path.join(cache_dir(), "runtime", f"{arch}-{h.hexdigest()[:20]}")
    binary = os.path.join(out_dir, "bluelower-run")
    if use_cache and os.environ.get("BLUELOWER_NO_CACHE") != "1" and os.path.isfile(binary):
        return binary
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(out_dir))
    try:
        tmp_bin = os.path.join(tmp, "bluelower-run")
        cmd = _compile_cmd(cxx, [os.path.join(RUNTIME_SRC, s) for s in RUNTIME_SOURCES], tmp_bin, libs)
        with progress.step(f"build runtime ({arch})"):
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=RUNTIME_SRC)
        if proc.returncode != 0:
            errs = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.strip().splitlines() or ["?"]
            raise BlueLowerError(f"building the native runtime with {cxx} failed: {errs[0]}")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return binary


# ---------------------------------------------------------------------- bundles


def _tar_mode(name: str, is_dir: bool) -> int:
    if is_dir or name.startswith("bin/") or name.endswith(".so"):
        return 0o755
    return 0o644


def write_tarball(bundle_dir: str, tar_path: str, prefix: str) -> str:
    """A byte-reproducible ``.tar.gz`` of ``bundle_dir`` under ``prefix/``: sorted
    entries, mtime 0, uid/gid 0, no user/group names, fixed modes, gzip mtime 0 and no
    file name in the gzip header. Returns its SHA-256."""
    entries = []
    for root, dirs, files in os.walk(bundle_dir):
        dirs.sort()
        rel_root = os.path.relpath(root, bundle_dir)
        for d in dirs:
            entries.append((os.path.normpath(os.path.join(rel_root, d)), True))
        for f in files:
            entries.append((os.path.normpath(os.path.join(rel_root, f)), False))
    entries.sort()
    tmp = tar_path + ".tmp"
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=TARBALL_MTIME, compresslevel=9) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
                def info(name, is_dir, size=0):
                    ti = tarfile.TarInfo(f"{prefix}/{name}" if name != "." else prefix)
                    ti.mtime = TARBALL_MTIME
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    ti.mode = _tar_mode(name, is_dir)
                    ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
                    ti.size = size
                    return ti

                tar.addfile(info(".", True))
                for name, is_dir in entries:
                    path = os.path.join(bundle_dir, name)
                    if os.path.islink(path):
                        raise BlueLowerError(f"{path}: symlinks are not allowed in a bundle")
                    if is_dir:
                        tar.addfile(info(name, True))
                    else:
                        with open(path, "rb") as fh:
                            tar.addfile(info(name, False, os.path.getsize(path)), fh)
    os.replace(tmp, tar_path)
    return _sha256_file(tar_path)


def build_bundle(model: str = "tiny", soc: str = "host", out_dir: str = "dist", quant: str = "fp32",
                 weights: str | None = None, frontend: str = "torch", seed: int = 0,
                 tarball: str | None = None, ndk: str | None = None, android_api: int | None = None,
                 tvm_runtime_dir: str | None = None, tvm_source: str | None = None) -> dict:
    """Compile + native runtime + libraries -> bundle directory ``out_dir`` and a
    reproducible tarball (default ``out_dir + '.tar.gz'``). Returns a summary dict.

    ``ndk``: an Android NDK; the bundle is then for arm64 Android at ``android_api``
    (default ``android.DEFAULT_API``), with the TVM runtime of ``tvm_runtime_dir`` or
    built from ``tvm_source`` (one of them is required)."""
    from .toolchains import android

    if ndk is None and (android_api is not None or tvm_runtime_dir or tvm_source):
        raise BlueLowerError("--android-api, --tvm-runtime-dir and --tvm-source apply to Android builds: add --ndk PATH")
    the_ndk = None
    if ndk is not None:
        # everything the Android build needs is checked first (before importing torch/TVM)
        the_ndk = android.find_ndk(ndk, android.DEFAULT_API if android_api is None else android_api)
        if shutil.which("cmake") is None:
            raise BlueLowerError("cmake not found (the Android runtime is built with CMake and the NDK toolchain "
                                 "file): install it with apt-get install -y cmake")
        if not (tvm_runtime_dir or tvm_source):
            raise BlueLowerError(android.MISSING_RUNTIME)

    from .compile import MANIFEST, CompileRequest, _commit_output, _prepare_output, compile_model, resolve_soc

    soc_desc = resolve_soc(soc)
    if the_ndk is not None:
        soc_desc = android.android_soc(soc_desc, the_ndk)
    arch = arch_of_soc(soc_desc)
    if the_ndk is None:
        cross_cxx(arch)  # fail early, before the long compile, if the toolchain is missing
    out_dir = os.path.abspath(out_dir.rstrip("/") or out_dir)
    tarball = os.path.abspath(tarball) if tarball else out_dir + ".tar.gz"
    tmp = _prepare_output(out_dir)
    try:
        if the_ndk is None:
            libs = runtime_libs(arch)
            binary = build_runtime(arch)
            libs_source = "manylinux aarch64 wheels" if arch != host_arch() else "installed python packages"
        else:
            libs, libs_source = android.runtime_libs(the_ndk, tvm_runtime_dir, tvm_source)
            binary = android.build_runtime(the_ndk, libs)
        stage = os.path.join(tmp, "bundle")
        manifest = compile_model(CompileRequest(model=model, weights=weights, frontend=frontend, soc=soc_desc,
                                                out_dir=stage, quant=quant, seed=seed))
        libs = dict(libs)
        if the_ndk is not None:  # libc++_shared.so when the binary, model.so or TVM's libs need it
            libs.update(android.extra_libs(the_ndk, [binary, os.path.join(stage, "model.so"), *libs.values()]))
        lib_names = sorted(libs)
        os.makedirs(os.path.join(stage, "bin"))
        os.makedirs(os.path.join(stage, "lib"))
        shutil.copyfile(binary, os.path.join(stage, RUNTIME_BINARY))
        os.chmod(os.path.join(stage, RUNTIME_BINARY), 0o755)
        for name in lib_names:
            shutil.copyfile(libs[name], os.path.join(stage, "lib", name))
            os.chmod(os.path.join(stage, "lib", name), 0o755)
        files = dict(manifest["files"])
        for rel in [RUNTIME_BINARY] + [f"lib/{n}" for n in lib_names]:
            files[rel] = _sha256_file(os.path.join(stage, rel))
        manifest["files"] = files
        manifest["native_runtime"] = {
            "binary": RUNTIME_BINARY,
            "arch": arch,
            "libs": [f"lib/{n}" for n in lib_names],
            "tvm_runtime": {"apache-tvm": _dist_version("apache-tvm"), "apache-tvm-ffi": _dist_version("apache-tvm-ffi"),
                            "source": libs_source},
            "compiler": _compiler_id(cross_cxx(arch)) if the_ndk is None else android.compiler_id(the_ndk),
            "cxxflags": list(_cxxflags()) if the_ndk is None else ["CMake Release (runtime_stubs/CMakeLists.txt)"],
        }
        if the_ndk is not None:
            libc = android.libc_flavour(android.elf_info(libs["libtvm_runtime.so"]))
            manifest["native_runtime"]["os"] = "android"
            manifest["native_runtime"]["tvm_runtime"]["libc"] = libc
            manifest["native_runtime"]["build"] = "cmake -DCMAKE_TOOLCHAIN_FILE=<ndk>/" + android.TOOLCHAIN_FILE
            manifest["target"]["os"] = "android"
            manifest["android"] = the_ndk.to_dict()
        with open(os.path.join(stage, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.write("\n")
        prefix = f"bluelower-{manifest['model'].get('name', 'model')}-{soc_desc.name}-{quant}"
        tar_sha = write_tarball(stage, tarball, prefix)
        # move the staged bundle into place (tmp itself is discarded)
        _commit_output(stage, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress.log(f"wrote {out_dir} and {tarball} (sha256 {tar_sha})")
    summary = {"bundle": out_dir, "tarball": tarball, "tarball_sha256": tar_sha, "arch": arch, "soc": soc_desc.name,
               "files": files}
    if the_ndk is not None:
        summary["os"] = "android"
        summary["android"] = the_ndk.to_dict()
    return summary


# ---------------------------------------------------------------------- running


def native_command(bundle_dir: str, args: list[str]) -> tuple[list[str], dict]:
    """The command line and environment that run ``bundle_dir``'s own binary."""
    from ...runtime_stubs.generate import read_manifest

    manifest = read_manifest(bundle_dir)
    nr = manifest.get("native_runtime")
    if not isinstance(nr, dict):
        raise BlueLowerError(f"{bundle_dir}: not a device bundle (no native runtime; build it with `bluelower build`)")
    binary = os.path.join(os.path.abspath(bundle_dir), nr.get("binary", RUNTIME_BINARY))
    if not os.path.isfile(binary):
        raise BlueLowerError(f"{bundle_dir}: missing file {nr.get('binary', RUNTIME_BINARY)}")
    if nr.get("os") == "android":
        raise BlueLowerError(f"{bundle_dir} is an Android bundle: run it on the phone (adb push {bundle_dir} "
                             "/data/local/tmp/ && adb shell ...; docs/native-runtime.md, \"Android builds\")")
    env = dict(os.environ)
    libdir = os.path.join(os.path.abspath(bundle_dir), "lib")
    env["LD_LIBRARY_PATH"] = libdir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    arch = nr.get("arch")
    if arch == host_arch():
        return [binary, *args], env
    if arch == "aarch64":
        qemu = shutil.which("qemu-aarch64")
        if qemu is None:
            raise BlueLowerError(f"qemu-aarch64 not found (needed to run an aarch64 bundle here): install it with `{APT_HINT}`")
        if not os.path.isdir(QEMU_SYSROOT):
            raise BlueLowerError(f"{QEMU_SYSROOT} not found (the aarch64 C/C++ libraries): `{APT_HINT}`")
        return [qemu, "-L", QEMU_SYSROOT, binary, *args], env
    raise BlueLowerError(f"{bundle_dir}: cannot run a bundle for '{arch}' on {host_arch()}")


def run_native(bundle_dir: str, image: str | None, prompt_ids: str, max_new_tokens: int, as_json: bool = True,
               extra: tuple = ()) -> subprocess.CompletedProcess:
    """Run the bundle's binary; a PNG/JPEG image is decoded here (Pillow) and handed over
    as a temporary ``.npy`` (the native runtime reads ``.npy`` only)."""
    import numpy as np

    tmpdir = None
    try:
        if image is not None and not image.endswith(".npy"):
            from ...runtime_stubs.image import load_image

            tmpdir = tempfile.mkdtemp(prefix="bluelower-img-")
            path = os.path.join(tmpdir, "image.npy")
            np.save(path, load_image(image))
            image = path
        args = [os.path.abspath(bundle_dir)]
        if image is not None:
            args += ["--image", image]
        args += ["--prompt-ids", prompt_ids, "--max-new-tokens", str(max_new_tokens)]
        if as_json:
            args.append("--json")
        args += list(extra)
        cmd, env = native_command(bundle_dir, args)
        return subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


def tarball_sha256(path: str) -> str:
    return _sha256_file(path)


__all__ = ["build_bundle", "build_runtime", "run_native", "native_command", "write_tarball", "cross_fcompile",
           "aarch64_runtime_libs", "cache_dir"]
