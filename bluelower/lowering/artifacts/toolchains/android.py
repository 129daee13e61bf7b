"""Android builds of a device bundle (``bluelower build --ndk PATH``).

Three things differ from the glibc aarch64 build of ``device.py``:

* the model library: TVM target triple ``aarch64-linux-android`` (plus the SoC's CPU
  features), ``export_library`` linked by the NDK's ``aarch64-linux-android<API>-clang++``;
* the runtime ``bluelower-run``: configured with CMake and the NDK's toolchain file
  (``ANDROID_ABI=arm64-v8a``, ``ANDROID_PLATFORM=android-<API>``, ``ANDROID_STL=c++_shared``);
* the TVM runtime (``libtvm_runtime.so``, ``libtvm_ffi.so``): the manylinux aarch64 wheels
  are glibc builds and do not load on Android's bionic, so it comes from a prebuilt
  Android directory (``--tvm-runtime-dir``) or is built from a TVM source tree with the
  NDK (``--tvm-source``).

Every check fails with one :class:`BlueLowerError` line naming what is missing.
See docs/native-runtime.md, "Android builds".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import re
import shutil
import struct
import subprocess

from .... import progress
from ....errors import BlueLowerError
from ....targets.soc import SoC

ANDROID_TRIPLE = "aarch64-linux-android"
ANDROID_ABI = "arm64-v8a"
DEFAULT_API = 28  # Android 9; the NDK's oldest arm64 platform is 21
MIN_API = 21
TOOLCHAIN_FILE = os.path.join("build", "cmake", "android.toolchain.cmake")
LIBCXX_SHARED = "libc++_shared.so"
EM_AARCH64 = 183


# ---------------------------------------------------------------------- the NDK


@dataclasses.dataclass(frozen=True)
class Ndk:
    """A validated Android NDK for one API level."""

    root: str
    revision: str
    host_tag: str
    api: int

    @property
    def bindir(self) -> str:
        return os.path.join(self.root, "toolchains", "llvm", "prebuilt", self.host_tag, "bin")

    @property
    def clang(self) -> str:
        return os.path.join(self.bindir, f"{ANDROID_TRIPLE}{self.api}-clang")

    @property
    def clangxx(self) -> str:
        return os.path.join(self.bindir, f"{ANDROID_TRIPLE}{self.api}-clang++")

    @property
    def toolchain_file(self) -> str:
        return os.path.join(self.root, TOOLCHAIN_FILE)

    @property
    def libcxx_shared(self) -> str:
        return os.path.join(self.root, "toolchains", "llvm", "prebuilt", self.host_tag, "sysroot", "usr", "lib",
                            ANDROID_TRIPLE, LIBCXX_SHARED)

    def cmake_args(self) -> list[str]:
        """The CMake cache entries that select the NDK, the ABI and the API level."""
        return [f"-DCMAKE_TOOLCHAIN_FILE={self.toolchain_file}", f"-DANDROID_ABI={ANDROID_ABI}",
                f"-DANDROID_PLATFORM=android-{self.api}", "-DANDROID_STL=c++_shared", "-DCMAKE_BUILD_TYPE=Release"]

    def to_dict(self) -> dict:
        return {"api": self.api, "abi": ANDROID_ABI, "ndk_revision": self.revision, "ndk_host": self.host_tag}


def _host_tags() -> list[str]:
    system = platform.system().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    # NDKs ship x86_64 host tools only (they run under Rosetta on Apple silicon)
    return list(dict.fromkeys([f"{system}-{machine}", f"{system}-x86_64"]))


def ndk_revision(root: str) -> str | None:
    """``Pkg.Revision`` from ``source.properties`` (e.g. ``26.1.10909125``), or None."""
    path = os.path.join(root, "source.properties")
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition("=")
                if sep and key.strip() == "Pkg.Revision" and value.strip():
                    return value.strip()
    except OSError:
        return None
    return None


def _api_levels(bindir: str) -> list[int]:
    pat = re.compile(rf"^{ANDROID_TRIPLE}(\d+)-clang\+\+$")
    levels = []
    if os.path.isdir(bindir):
        for f in os.listdir(bindir):
            m = pat.match(f)
            if m:
                levels.append(int(m.group(1)))
    return sorted(levels)


def validate_api(api) -> int:
    if isinstance(api, bool) or not isinstance(api, int) or api < MIN_API:
        raise BlueLowerError(f"--android-api {api}: must be an Android API level >= {MIN_API} (arm64)")
    return api


def find_ndk(path: str, api: int = DEFAULT_API) -> Ndk:
    """Validate ``path`` as an Android NDK for ``api``; one error naming everything missing."""
    api = validate_api(api)
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise BlueLowerError(f"--ndk {path}: no such directory")
    missing = []
    revision = ndk_revision(root)
    if revision is None:
        missing.append("source.properties with a Pkg.Revision line")
    prebuilt = os.path.join(root, "toolchains", "llvm", "prebuilt")
    host_tag = next((t for t in _host_tags() if os.path.isdir(os.path.join(prebuilt, t, "bin"))), None)
    if host_tag is None:
        missing.append(f"toolchains/llvm/prebuilt/{_host_tags()[0]}/bin (the clang toolchain for this machine)")
    else:
        ndk = Ndk(root, revision or "?", host_tag, api)
        for tool in (ndk.clangxx, ndk.clang):
            if not (os.path.isfile(tool) and os.access(tool, os.X_OK)):
                rel = os.path.relpath(tool, root)
                levels = _api_levels(ndk.bindir)
                have = f" (API levels present: {levels[0]}..{levels[-1]})" if levels else ""
                missing.append(f"{rel} (executable){have}")
    if not os.path.isfile(os.path.join(root, TOOLCHAIN_FILE)):
        missing.append(TOOLCHAIN_FILE)
    if missing:
        raise BlueLowerError(f"--ndk {path} is not a usable Android NDK: missing {'; '.join(missing)}")
    return Ndk(root, revision, host_tag, api)


def compiler_id(ndk: Ndk) -> str:
    proc = subprocess.run([ndk.clangxx, "--version"], capture_output=True, text=True)
    first = proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else os.path.basename(ndk.clangxx)
    return f"{first} (NDK {ndk.revision})"


# ---------------------------------------------------------------------- the model library


@dataclasses.dataclass(frozen=True)
class AndroidSoC(SoC):
    """A SoC description compiled for Android: ``fcompile`` links with the NDK."""

    ndk: Ndk | None = None

    def fcompile(self):
        from tvm.support import cc

        return cc.cross_compiler(self.ndk.clangxx)


def android_soc(soc, ndk: Ndk):
    """``soc`` with the Android triple on every CPU cluster (CPU features kept) and the
    NDK's clang++ as ``export_library``'s linker (build.py ``_export_kwargs``)."""
    if soc.is_host or not soc.triple.startswith("aarch64"):
        raise BlueLowerError(f"--ndk builds arm64 Android bundles; SoC '{soc.name}' is {soc.triple}"
                             f"{' (the host)' if soc.is_host else ''}")

    clusters = tuple(dataclasses.replace(c, triple=ANDROID_TRIPLE) for c in soc.cpu_clusters)
    fields = {f.name: getattr(soc, f.name) for f in dataclasses.fields(SoC)}
    fields.update(triple=ANDROID_TRIPLE, cpu_clusters=clusters)
    return AndroidSoC(**fields, ndk=ndk)


# ---------------------------------------------------------------------- ELF


def elf_info(path: str) -> dict:
    """Machine, class and DT_NEEDED of an ELF file (raises BlueLowerError if not ELF)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise BlueLowerError(f"{path}: cannot read ({exc.strerror})") from None
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise BlueLowerError(f"{path}: not an ELF file")
    is64, little = data[4] == 2, data[5] == 1
    end = "<" if little else ">"
    machine = struct.unpack_from(end + "H", data, 18)[0]
    info = {"class": 64 if is64 else 32, "machine": machine, "needed": [], "android_note": False}
    try:
        if is64:
            shoff, = struct.unpack_from(end + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
            fmt, dyn_fmt = end + "IIQQQQIIQQ", end + "qQ"
        else:
            shoff, = struct.unpack_from(end + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x2E)
            fmt, dyn_fmt = end + "IIIIIIIIII", end + "iI"
        secs = [struct.unpack_from(fmt, data, shoff + i * shentsize) for i in range(shnum)]
        # (name, type, flags, addr, offset, size, link, info, align, entsize)

        def cstr(off):
            return data[off:data.index(b"\0", off)].decode("utf-8", "replace")

        shstr = secs[shstrndx][4] if secs else 0
        for s in secs:
            if secs and cstr(shstr + s[0]) == ".note.android.ident":
                info["android_note"] = True
            if s[1] == 6:  # SHT_DYNAMIC
                strtab = secs[s[6]][4]
                step = struct.calcsize(dyn_fmt)
                for off in range(s[4], s[4] + s[5], step):
                    tag, val = struct.unpack_from(dyn_fmt, data, off)
                    if tag == 0:
                        break
                    if tag == 1:  # DT_NEEDED
                        info["needed"].append(cstr(strtab + val))
    except (struct.error, ValueError, IndexError):
        raise BlueLowerError(f"{path}: malformed ELF file") from None
    return info


def libc_flavour(info: dict) -> str:
    """'bionic', 'glibc' or 'unknown' from DT_NEEDED / the Android ELF note."""
    if "libc.so.6" in info["needed"]:
        return "glibc"
    if info["android_note"] or "libc.so" in info["needed"]:
        return "bionic"
    return "unknown"


# ---------------------------------------------------------------------- TVM runtime for Android

RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
MISSING_RUNTIME = ("an Android build needs a TVM runtime built for Android: pass --tvm-runtime-dir DIR (a prebuilt "
                   "arm64-v8a libtvm_runtime.so + libtvm_ffi.so) or --tvm-source DIR (a TVM source checkout, built "
                   "here with the NDK); the manylinux aarch64 wheels' libraries are glibc builds and do not load on "
                   "Android's bionic")


def check_runtime_dir(path: str) -> dict:
    """``{name: path}`` of the two libraries in ``path``; both must be ELF64 aarch64.
    A glibc build (``libc.so.6``) is accepted with a warning (it will not load on a phone)."""
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise BlueLowerError(f"--tvm-runtime-dir {path}: no such directory")
    missing = [n for n in RUNTIME_LIBS if not os.path.isfile(os.path.join(root, n))]
    if missing:
        raise BlueLowerError(f"--tvm-runtime-dir {path}: missing {' and '.join(missing)}")
    out = {}
    for name in RUNTIME_LIBS:
        p = os.path.join(root, name)
        info = elf_info(p)
        if info["class"] != 64 or info["machine"] != EM_AARCH64:
            raise BlueLowerError(f"--tvm-runtime-dir: {name} is not an aarch64 (ELF64, EM_AARCH64) library "
                                 f"(class {info['class']}, machine {info['machine']})")
        if libc_flavour(info) == "glibc":
            progress.log(f"warning: {p} links glibc (libc.so.6): it will not load on Android")
        out[name] = p
    return out


def tvm_source_version(src: str) -> str | None:
    for rel in (os.path.join("python", "tvm", "libinfo.py"), os.path.join("version.py")):
        try:
            with open(os.path.join(src, rel), encoding="utf-8") as fh:
                m = re.search(r'^__version__\s*=\s*"([^"]+)"', fh.read(), re.M)
            if m:
                return m.group(1)
        except OSError:
            continue
    return None


def check_tvm_source(path: str) -> str:
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise BlueLowerError(f"--tvm-source {path}: no such directory")
    need = ["CMakeLists.txt", os.path.join("src", "runtime"), os.path.join("include", "tvm", "runtime"),
            os.path.join("3rdparty", "tvm-ffi", "CMakeLists.txt")]
    missing = [n for n in need if not os.path.exists(os.path.join(root, n))]
    if missing:
        hint = " (run `git submodule update --init --recursive` in it)" if any("3rdparty" in m for m in missing) else ""
        raise BlueLowerError(f"--tvm-source {path} is not a TVM source tree: missing {', '.join(missing)}{hint}")
    return root


def tvm_runtime_cmake_cmds(ndk: Ndk, src: str, build: str, jobs: int = 2) -> list[list[str]]:
    """Configure + build TVM's runtime only (no LLVM, no RPC, no GPU backends) with the NDK.
    ``tvm_runtime`` depends on ``tvm_ffi_shared`` (3rdparty/tvm-ffi), so both libraries are built."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", src, "-B", build, *gen, *ndk.cmake_args(),
                 "-DUSE_LLVM=OFF", "-DUSE_LIBBACKTRACE=OFF", "-DUSE_RPC=OFF", "-DUSE_CPP_RPC=OFF",
                 "-DUSE_CUDA=OFF", "-DUSE_OPENCL=OFF", "-DUSE_VULKAN=OFF", "-DUSE_METAL=OFF", "-DUSE_ROCM=OFF",
                 "-DUSE_OPENMP=OFF", "-DUSE_PROFILER=OFF", "-DBUILD_STATIC_RUNTIME=OFF"]
    return [configure, ["cmake", "--build", build, "--target", "tvm_runtime", "-j", str(jobs)]]


def _run(cmd: list[str], what: str, cwd: str | None = None) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError:
        raise BlueLowerError(f"{what}: {cmd[0]} not found (install it, e.g. apt-get install -y cmake ninja-build)") from None
    if proc.returncode != 0:
        lines = (proc.stderr + "\n" + proc.stdout).strip().splitlines()
        errs = [ln.strip() for ln in lines if "error" in ln.lower()] or [ln.strip() for ln in lines[-1:]] or ["?"]
        raise BlueLowerError(f"{what} failed: {errs[0]}")


def build_tvm_runtime(ndk: Ndk, tvm_source: str) -> dict:
    """Build libtvm_runtime.so + libtvm_ffi.so for Android from ``tvm_source`` (cached by
    source path, git commit, NDK revision and API level)."""
    from ....cache import cache_dir
    from ....files import forget, temp_dir
    from ..bundle import replace_dir
    from .gnu import dist_version

    src = check_tvm_source(tvm_source)
    src_version = tvm_source_version(src)
    installed = dist_version("apache-tvm")
    if src_version and src_version.split(".dev")[0] != installed.split(".dev")[0]:
        progress.log(f"warning: TVM source {src} is version {src_version}, the compiler is apache-tvm {installed}")
    proc = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = proc.stdout.strip() if proc.returncode == 0 else "no-git"
    key = hashlib.sha256("\0".join([src, commit, ndk.revision, str(ndk.api), ndk.host_tag]).encode()).hexdigest()[:20]
    libdir = os.path.join(cache_dir(), "android", f"tvm-runtime-{key}", "lib")
    out = {n: os.path.join(libdir, n) for n in RUNTIME_LIBS}
    if all(os.path.isfile(p) for p in out.values()):
        return out
    os.makedirs(os.path.dirname(os.path.dirname(libdir)), exist_ok=True)
    tmp = temp_dir(".tvm-build-", os.path.dirname(os.path.dirname(libdir)))
    try:
        build = os.path.join(tmp, "build")
        with progress.step(f"build the TVM runtime for Android (API {ndk.api}) from {src}"):
            for cmd in tvm_runtime_cmake_cmds(ndk, src, build, jobs=os.cpu_count() or 2):
                _run(cmd, "building the TVM runtime with the NDK (" + " ".join(cmd[:3]) + " ...)")
        found = {}
        for root, _dirs, files in os.walk(build):
            for n in RUNTIME_LIBS:
                if n in files and n not in found:
                    found[n] = os.path.join(root, n)
        missing = [n for n in RUNTIME_LIBS if n not in found]
        if missing:
            raise BlueLowerError(f"the TVM runtime build in {build} produced no {' or '.join(missing)}")
        os.makedirs(os.path.join(tmp, "lib"))
        for n, p in found.items():
            shutil.copyfile(p, os.path.join(tmp, "lib", n))
        final = os.path.dirname(libdir)
        shutil.rmtree(os.path.join(tmp, "build"), ignore_errors=True)
        replace_dir(tmp, final)
    finally:
        forget(tmp, remove=True)
    return out


def runtime_libs(ndk: Ndk, tvm_runtime_dir: str | None, tvm_source: str | None) -> tuple[dict, str]:
    """``({name: path}, description)`` of the Android TVM runtime."""
    if tvm_runtime_dir and tvm_source:
        raise BlueLowerError("give either --tvm-runtime-dir or --tvm-source, not both")
    if tvm_runtime_dir:
        return check_runtime_dir(tvm_runtime_dir), f"prebuilt: {os.path.abspath(tvm_runtime_dir)}"
    if tvm_source:
        return build_tvm_runtime(ndk, tvm_source), f"built with the NDK from {os.path.abspath(tvm_source)}"
    raise BlueLowerError(MISSING_RUNTIME)


# ---------------------------------------------------------------------- bluelower-run for Android


def runtime_cmake_cmds(ndk: Ndk, src: str, build: str, libs: dict, ffi_include: list[str]) -> list[list[str]]:
    """Configure + build ``bluelower-run`` (runtime_stubs/CMakeLists.txt) with the NDK."""
    libdir = os.path.dirname(libs["libtvm_runtime.so"])
    if os.path.dirname(libs["libtvm_ffi.so"]) != libdir:
        raise BlueLowerError("libtvm_runtime.so and libtvm_ffi.so must be in one directory")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", src, "-B", build, *gen, *ndk.cmake_args(),
                 f"-DTVM_FFI_INCLUDE={ffi_include[0]}", f"-DDLPACK_INCLUDE={ffi_include[1]}",
                 f"-DTVM_LIB_DIR={libdir}", f"-DTVM_FFI_ROOT={os.path.dirname(ffi_include[0])}"]
    return [configure, ["cmake", "--build", build, "--target", "bluelower-run"]]


def build_runtime(ndk: Ndk, libs: dict) -> tuple[str, str]:
    """Build ``bluelower-run`` and ``libbluelower_backend.so`` for Android; return their paths
    (cached: the key is the sources, the NDK revision/host/API, the toolchain file and the
    linked libraries)."""
    from ....cache import cache_dir
    from ....files import forget, temp_dir
    from ..bundle import BACKEND_LIB, file_sha256, replace_dir
    from .gnu import RUNTIME_SRC, SOURCE_LISTS, ffi_include_dirs

    if shutil.which("cmake") is None:
        raise BlueLowerError("cmake not found (the Android runtime is built with CMake and the NDK toolchain file): "
                             "install it with apt-get install -y cmake")
    h = hashlib.sha256()
    for f in sorted(os.listdir(RUNTIME_SRC)):
        if f.endswith((".cc", ".h")) or f == "CMakeLists.txt" or f in SOURCE_LISTS:
            h.update(f.encode() + b"\0")
            with open(os.path.join(RUNTIME_SRC, f), "rb") as fh:
                h.update(fh.read())
    h.update(compiler_id(ndk).encode())
    h.update(repr(ndk.to_dict()).encode())
    h.update(file_sha256(ndk.toolchain_file).encode())
    for name in sorted(libs):
        h.update(file_sha256(libs[name]).encode())
    out_dir = os.path.join(cache_dir(), "runtime", f"android{ndk.api}-{h.hexdigest()[:20]}")
    binary, backend = os.path.join(out_dir, "bluelower-run"), os.path.join(out_dir, BACKEND_LIB)
    if os.path.isfile(binary) and os.path.isfile(backend):
        return binary, backend
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = temp_dir(".build-", os.path.dirname(out_dir))
    try:
        build = os.path.join(tmp, "cmake")
        with progress.step(f"build runtime (android-{ndk.api}, CMake + NDK)"):
            for cmd in runtime_cmake_cmds(ndk, RUNTIME_SRC, build, libs, ffi_include_dirs()):
                _run(cmd, f"building the native runtime with the NDK ({' '.join(cmd[:3])} ...)")
        for name in ("bluelower-run", BACKEND_LIB):
            built = os.path.join(build, name)
            if not os.path.isfile(built):
                raise BlueLowerError(f"the CMake build in {build} produced no {name}")
            shutil.copyfile(built, os.path.join(tmp, name))
            os.chmod(os.path.join(tmp, name), 0o755)
        shutil.rmtree(build, ignore_errors=True)
        replace_dir(tmp, out_dir)
    finally:
        forget(tmp, remove=True)
    return binary, backend


def extra_libs(ndk: Ndk, elfs: list[str]) -> dict:
    """Libraries the bundle must carry besides TVM's: ``libc++_shared.so`` from the NDK
    when any of ``elfs`` needs it (``ANDROID_STL=c++_shared``; the phone has no copy)."""
    needed = set()
    for p in elfs:
        needed.update(elf_info(p)["needed"])
    if LIBCXX_SHARED not in needed:
        return {}
    if not os.path.isfile(ndk.libcxx_shared):
        raise BlueLowerError(f"the bundle needs {LIBCXX_SHARED} but the NDK has none at "
                             f"{os.path.relpath(ndk.libcxx_shared, ndk.root)}")
    return {LIBCXX_SHARED: ndk.libcxx_shared}
