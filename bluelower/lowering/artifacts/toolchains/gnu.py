"""Toolchains for glibc Linux targets: the host and aarch64 (cross-compiled, run under qemu).

The C++ compiler and ``export_library`` fcompile for a SoC's architecture, TVM's runtime
libraries for it (for aarch64 from the apache-tvm / apache-tvm-ffi manylinux aarch64 wheels of
exactly the installed versions, downloaded once and cached), and the native runtime
``bluelower-run`` built from ``runtime_stubs/native`` with pinned flags (cached by a key of its
sources, the compiler, the flags and the libraries). Android is ``toolchains/android.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

from .... import progress
from ....cache import cache_dir
from ....errors import BlueLowerError
from ....files import forget, temp_dir
from ..bundle import BACKEND_LIB, RUNTIME_LIBS, file_sha256, replace_dir

# the native runtime's sources: bluelower/runtime_stubs/native (this file is bluelower/lowering/artifacts/toolchains/gnu.py)
_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RUNTIME_SRC = os.path.join(_PACKAGE, "runtime_stubs", "native")


def runtime_sources(which: str = "sources.txt") -> list[str]:
    """The runtime's ``.cc`` files in link order (``runtime_stubs/native/sources.txt``, the
    list CMakeLists.txt reads too; ``backend_sources.txt``: the backend library's)."""
    with open(os.path.join(RUNTIME_SRC, which), encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]


SOURCE_LISTS = ("sources.txt", "backend_sources.txt")


APT_HINT = "apt-get update && apt-get install -y g++-aarch64-linux-gnu qemu-user"
QEMU_SYSROOT = "/usr/aarch64-linux-gnu"
# -ffp-contract=off: the image preprocessing must not fuse multiply-adds (bit exactness);
# the prefix maps keep build paths (tvm_ffi headers' __FILE__, sources) out of the binary.
CXXFLAGS = ("-std=c++17", "-O2", "-fPIE", "-ffp-contract=off", "-fno-fast-math", "-DNDEBUG")
# BLUELOWER_RUNTIME_SANITIZE=1: build the runtime with ASan + UBSan (testing only; the
# flags are part of the runtime cache key and of the manifest's native_runtime.compiler).
SANITIZE_FLAGS = ("-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined")


def cxxflags() -> tuple:
    return CXXFLAGS + (SANITIZE_FLAGS if os.environ.get("BLUELOWER_RUNTIME_SANITIZE") == "1" else ())


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


def dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        raise BlueLowerError(f"python package {name} is not installed") from None


def ffi_include_dirs() -> list[str]:
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
    tvm_version = dist_version("apache-tvm")
    ffi_version = dist_version("apache-tvm-ffi")
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
    os.makedirs(os.path.dirname(base), exist_ok=True)
    tmp = temp_dir(".extract-", os.path.dirname(base))
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
            json.dump({os.path.basename(p): file_sha256(p) for p in found.values()}, fh, indent=2, sort_keys=True)
        replace_dir(tmp, base)
    finally:
        forget(tmp, remove=True)
    return out


def runtime_libs(arch: str) -> dict:
    if arch == host_arch():
        return _host_runtime_libs()
    if arch == "aarch64":
        return aarch64_runtime_libs()
    raise BlueLowerError(f"no TVM runtime libraries for '{arch}'")


def compiler_id(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else cxx


def _compile_cmd(cxx: str, sources: list[str], out: str, libs: dict) -> list[str]:
    """The executable ``bluelower-run``: links only system libraries (libstdc++, libc, libdl);
    it dlopen()s the bundle's lib/ itself after verifying it."""
    inc = ffi_include_dirs()
    ffi_root = os.path.dirname(inc[0])
    cmd = [cxx, *cxxflags(), f"-ffile-prefix-map={RUNTIME_SRC}=runtime_stubs", f"-ffile-prefix-map={ffi_root}=tvm_ffi"]
    cmd += [f"-I{d}" for d in inc] + sources + ["-o", out]
    cmd += ["-ldl", "-Wl,--build-id=sha1", "-pie"]
    return cmd


def _backend_cmd(cxx: str, sources: list[str], out: str, libs: dict) -> list[str]:
    """``lib/libbluelower_backend.so``: the backends over TVM, RUNPATH ``$ORIGIN`` (its
    libraries sit next to it in lib/)."""
    inc = ffi_include_dirs()
    ffi_root = os.path.dirname(inc[0])
    libdirs = sorted({os.path.dirname(p) for p in libs.values()})
    flags = [("-fPIC" if f == "-fPIE" else f) for f in cxxflags()]
    cmd = [cxx, *flags, f"-ffile-prefix-map={RUNTIME_SRC}=runtime_stubs", f"-ffile-prefix-map={ffi_root}=tvm_ffi"]
    cmd += [f"-I{d}" for d in inc] + sources + ["-shared", "-o", out, f"-Wl,-soname,{BACKEND_LIB}"]
    cmd += [f"-L{d}" for d in libdirs] + [f"-Wl,-rpath-link,{d}" for d in libdirs]
    cmd += ["-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN", "-Wl,--build-id=sha1"]
    return cmd


def build_runtime(arch: str, use_cache: bool = True) -> tuple[str, str]:
    """Build ``bluelower-run`` and ``libbluelower_backend.so`` for ``arch``; return their
    paths (in the cache).

    The cache key is the SHA-256 of the sources, the compiler identity, the flags and the
    libraries linked against, so any change rebuilds; ``BLUELOWER_CACHE=off`` builds afresh
    (into a temporary cache of this process).
    """
    cxx = cross_cxx(arch)
    libs = runtime_libs(arch)
    h = hashlib.sha256()
    srcs = sorted(f for f in os.listdir(RUNTIME_SRC) if f.endswith((".cc", ".h")) or f in SOURCE_LISTS)
    for f in srcs:
        h.update(f.encode() + b"\0")
        with open(os.path.join(RUNTIME_SRC, f), "rb") as fh:
            h.update(fh.read())
    h.update(compiler_id(cxx).encode())
    h.update(" ".join(cxxflags()).encode())
    for name in sorted(libs):
        h.update(file_sha256(libs[name]).encode())
    out_dir = os.path.join(cache_dir(), "runtime", f"{arch}-{h.hexdigest()[:20]}")
    binary, backend = os.path.join(out_dir, "bluelower-run"), os.path.join(out_dir, BACKEND_LIB)
    if use_cache and os.path.isfile(binary) and os.path.isfile(backend):
        return binary, backend
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = temp_dir(".build-", os.path.dirname(out_dir))
    try:
        for make, which, out in ((_compile_cmd, "sources.txt", "bluelower-run"),
                                 (_backend_cmd, "backend_sources.txt", BACKEND_LIB)):
            cmd = make(cxx, [os.path.join(RUNTIME_SRC, s) for s in runtime_sources(which)], os.path.join(tmp, out), libs)
            with progress.step(f"build runtime ({arch}): {out}"):
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=RUNTIME_SRC)
            if proc.returncode != 0:
                errs = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.strip().splitlines() or ["?"]
                raise BlueLowerError(f"building the native runtime with {cxx} failed: {errs[0]}")
        if use_cache and os.path.isfile(binary) and os.path.isfile(backend):
            pass  # another bluelower built the same entry meanwhile: keep it (readers may be copying it)
        else:
            replace_dir(tmp, out_dir)
    finally:
        forget(tmp, remove=True)
    return binary, backend
