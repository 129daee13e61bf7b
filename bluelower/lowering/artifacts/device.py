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
import os
import shutil
import subprocess
import tarfile
import tempfile

from ... import progress
from ...errors import BlueLowerError
from ...files import forget, temp_dir, temp_file
from .bundle import (BACKEND_LIB, MANIFEST, RUNTIME_BINARY, OutputDir, file_sha256, read_manifest, verify_files,
                     write_manifest)
from .toolchains.gnu import (APT_HINT, QEMU_SYSROOT, arch_of_soc, build_runtime, compiler_id, cross_cxx, cxxflags, dist_version,
                             host_arch, runtime_libs)

TARBALL_MTIME = 0


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
    tmp = temp_file(f".{os.path.basename(tar_path)}.bluelower-tmp-", os.path.dirname(os.path.abspath(tar_path)))
    try:
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
    except BaseException:
        forget(tmp, remove=True)
        raise
    os.replace(tmp, tar_path)
    forget(tmp)
    return file_sha256(tar_path)


def build_bundle(model="tiny", soc: str = "host", out_dir: str = "dist", quant: str = "fp32",
                 weights: str | None = None, frontend: str = "torch", seed: int = 0, checkpoint: str | None = None,
                 kv_capacity: int | None = None, prefill_chunk: int | None = None,
                 tarball: str | None = None, ndk: str | None = None, android_api: int | None = None,
                 tvm_runtime_dir: str | None = None, tvm_source: str | None = None, force: bool = False,
                 recipe=None, calibration: str | None = None, execute_memory_plan: bool | None = None) -> dict:
    """Compile + native runtime + libraries -> bundle directory ``out_dir`` and a
    reproducible tarball (default ``out_dir + '.tar.gz'``). Returns a summary dict.
    Both outputs follow docs/cli.md's "Output safety" (``force``: see :class:`OutputDir`).

    ``ndk``: an Android NDK; the bundle is then for arm64 Android at ``android_api``
    (default ``android.DEFAULT_API``), with the TVM runtime of ``tvm_runtime_dir`` or
    built from ``tvm_source`` (one of them is required). ``recipe`` / ``calibration``: the
    quantization rules and calibration text (``CompileRequest``)."""
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

    from .compile import CompileRequest, compile_model, resolve_soc

    if isinstance(recipe, (str, os.PathLike)):  # a bad rule file / text: one line before the runtime is built
        from ..quant.recipe import load_recipe

        load_recipe(str(recipe))
    if calibration is not None:
        from ..quant.calibrated import read_calibration_text

        read_calibration_text(calibration)
    soc_desc = resolve_soc(soc)
    if the_ndk is not None:
        soc_desc = android.android_soc(soc_desc, the_ndk)
    arch = arch_of_soc(soc_desc)
    if the_ndk is None:
        cross_cxx(arch)  # fail early, before the long compile, if the toolchain is missing
    out_dir = os.path.abspath(out_dir.rstrip("/") or out_dir)
    tarball = os.path.abspath(tarball) if tarball else out_dir + ".tar.gz"
    output = OutputDir(out_dir, force=force, tarball=tarball)
    stage = output.open()  # locks, checks and the temporary sibling, before anything is built
    try:
        if the_ndk is None:
            libs = runtime_libs(arch)
            binary, backend = build_runtime(arch)
            libs_source = "manylinux aarch64 wheels" if arch != host_arch() else "installed python packages"
        else:
            libs, libs_source = android.runtime_libs(the_ndk, tvm_runtime_dir, tvm_source)
            binary, backend = android.build_runtime(the_ndk, libs)
        manifest = compile_model(CompileRequest(model=model, weights=weights, frontend=frontend, soc=soc_desc,
                                                out_dir=stage, quant=quant, seed=seed, checkpoint=checkpoint,
                                                kv_capacity=kv_capacity, prefill_chunk=prefill_chunk, staged=True,
                                                recipe=recipe, calibration=calibration,
                                                execute_memory_plan=execute_memory_plan))
        libs = dict(libs)
        libs[BACKEND_LIB] = backend
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
            files[rel] = file_sha256(os.path.join(stage, rel))
        manifest["files"] = files
        manifest["native_runtime"] = {
            "binary": RUNTIME_BINARY,
            "arch": arch,
            "libs": [f"lib/{n}" for n in lib_names],
            "backend": f"lib/{BACKEND_LIB}",
            "tvm_runtime": {"apache-tvm": dist_version("apache-tvm"), "apache-tvm-ffi": dist_version("apache-tvm-ffi"),
                            "source": libs_source},
            "compiler": compiler_id(cross_cxx(arch)) if the_ndk is None else android.compiler_id(the_ndk),
            "cxxflags": list(cxxflags()) if the_ndk is None else ["CMake Release (runtime_stubs/CMakeLists.txt)"],
        }
        if the_ndk is not None:
            libc = android.libc_flavour(android.elf_info(libs["libtvm_runtime.so"]))
            manifest["native_runtime"]["os"] = "android"
            manifest["native_runtime"]["tvm_runtime"]["libc"] = libc
            manifest["native_runtime"]["build"] = "cmake -DCMAKE_TOOLCHAIN_FILE=<ndk>/" + android.TOOLCHAIN_FILE
            manifest["target"]["os"] = "android"
            manifest["android"] = the_ndk.to_dict()
        write_manifest(stage, manifest)
        prefix = f"bluelower-{manifest['model'].get('name', 'model')}-{soc_desc.name}-{quant}"
        tar_sha = write_tarball(stage, output.tarball_tmp, prefix)
        output.commit()  # the directory and the tarball, together
    finally:
        output.close()
    progress.log(f"wrote {out_dir} and {tarball} (sha256 {tar_sha})")
    summary = {"bundle": out_dir, "tarball": tarball, "tarball_sha256": tar_sha, "arch": arch, "soc": soc_desc.name,
               "files": files}
    if the_ndk is not None:
        summary["os"] = "android"
        summary["android"] = the_ndk.to_dict()
    return summary


# ---------------------------------------------------------------------- running


_ELF_MACHINE = {"aarch64": 183, "x86_64": 62}


def verify_native_bundle(bundle_dir: str) -> dict:
    """Everything ``run --native`` checks before it starts a bundle's binary; returns the
    manifest. The manifest matches ``manifest.sha256``; every file it lists matches its
    SHA-256 (``bin/``, ``lib/``, ``model.so``, ``params.safetensors``, ...); the runtime is
    the bundle's own ``bin/bluelower-run`` (an ELF for the bundle's architecture), its
    libraries are listed, and ``bin/`` and ``lib/`` hold nothing unlisted (the runtime loads
    its libraries from ``lib/``)."""
    manifest = read_manifest(bundle_dir)
    nr = manifest.get("native_runtime")
    if not isinstance(nr, dict):
        raise BlueLowerError(f"{bundle_dir}: not a device bundle (no native runtime; build it with `bluelower build`)")
    if nr.get("os") == "android":
        raise BlueLowerError(f"{bundle_dir} is an Android bundle: run it on the phone (adb push {bundle_dir} "
                             "/data/local/tmp/ && adb shell ...; docs/native-runtime.md, \"Android builds\")")
    if nr.get("binary") != RUNTIME_BINARY:
        raise BlueLowerError(f"{bundle_dir}/{MANIFEST}: native_runtime.binary is {nr.get('binary')!r}: a bundle runs "
                             f"only its own {RUNTIME_BINARY}")
    verify_files(bundle_dir, manifest)
    files = manifest["files"]
    needed = [RUNTIME_BINARY, f"lib/{BACKEND_LIB}"] + [f"lib/{n}" for n in ("libtvm_runtime.so", "libtvm_ffi.so")]
    missing = [rel for rel in needed if rel not in files]
    if missing:
        raise BlueLowerError(f"{bundle_dir}/{MANIFEST}: files does not list {', '.join(missing)} (a bundle from an older "
                             "bluelower, or damaged): rebuild it")
    for sub in ("bin", "lib"):
        root = os.path.join(bundle_dir, sub)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), bundle_dir)
                if name in filenames and rel not in files or os.path.islink(os.path.join(dirpath, name)):
                    raise BlueLowerError(f"{bundle_dir}: {rel} is not a file the manifest lists (nothing unverified "
                                         f"may sit in {sub}/, where the runtime and its libraries are loaded from)")
    arch = nr.get("arch")
    with open(os.path.join(bundle_dir, RUNTIME_BINARY), "rb") as fh:
        head = fh.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20 or int.from_bytes(head[18:20], "little") != _ELF_MACHINE.get(arch):
        raise BlueLowerError(f"{bundle_dir}: {RUNTIME_BINARY} is not an ELF executable for {arch}")
    return manifest


def native_command(bundle_dir: str, args: list[str], verify: bool = True) -> tuple[list[str], dict]:
    """The command line and environment that run ``bundle_dir``'s own binary, after
    :func:`verify_native_bundle` (``verify=False``: the caller has just verified it)."""
    manifest = verify_native_bundle(bundle_dir) if verify else read_manifest(bundle_dir)
    nr = manifest["native_runtime"]
    binary = os.path.join(os.path.abspath(bundle_dir), RUNTIME_BINARY)
    # the binary links only system libraries; it loads lib/ itself (dlopen) after hashing it,
    # so lib/ is not put on the loader's search path
    env = dict(os.environ)
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


def run_native(bundle_dir: str, image: str | None, prompt_ids: str | None, max_new_tokens: int, as_json: bool = True,
               extra: tuple = (), prompt: str | None = None, on_line=None) -> subprocess.CompletedProcess:
    """Run the bundle's binary; a PNG/JPEG image is decoded here (Pillow) and handed over
    as a temporary ``.npy`` (the native runtime reads ``.npy`` only).

    ``prompt``: text for ``--prompt`` (the binary encodes it), instead of ``prompt_ids``
    (``"1,2,3"``). ``on_line(line)``: called with each line of the binary's stdout as it
    is printed (streaming, e.g. with ``--json-stream`` in ``extra``); stdout is also
    returned whole."""
    import numpy as np

    tmpdir = None
    base_cmd, env = native_command(bundle_dir, [])  # the whole bundle verified before anything else
    try:
        if image is not None and not image.endswith(".npy"):
            from ...runtime_stubs.image import load_image

            tmpdir = temp_dir("bluelower-img-")
            path = os.path.join(tmpdir, "image.npy")
            np.save(path, load_image(image))
            image = path
        args = [os.path.abspath(bundle_dir)]
        if image is not None:
            args += ["--image", image]
        if prompt is not None:
            args += ["--prompt", prompt]
        elif prompt_ids is not None:
            args += ["--prompt-ids", prompt_ids]
        args += ["--max-new-tokens", str(max_new_tokens)]
        if as_json:
            args.append("--json")
        args += list(extra)
        cmd = base_cmd + args
        if on_line is None:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace")
        with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty stderr cannot block the binary
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, encoding="utf-8",
                                    errors="replace", bufsize=1)
            lines = []
            try:
                for line in proc.stdout:
                    lines.append(line)
                    on_line(line)
            except BaseException:  # the caller failed (or Ctrl-C): do not leave the binary running
                proc.kill()
                proc.wait()
                raise
            rc = proc.wait()
            err.seek(0)
            stderr = err.read().decode("utf-8", errors="replace")
        return subprocess.CompletedProcess(cmd, rc, "".join(lines), stderr)
    finally:
        if tmpdir:
            forget(tmpdir, remove=True)


def tarball_sha256(path: str) -> str:
    return file_sha256(path)


__all__ = ["build_bundle", "run_native", "native_command", "write_tarball"]
