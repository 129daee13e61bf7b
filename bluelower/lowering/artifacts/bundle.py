"""The build directory format: file names, the manifest (read, write, verify) and safe output.

A leaf module: the compile driver, the device bundle, the host runtime and the reports all
read and write builds through it (docs/bundle-format.md).

* :func:`read_manifest` / :func:`write_manifest`: the one reader and writer of
  ``manifest.json`` (format and version checked on read; sorted keys, 2-space indent on write,
  so equal manifests are equal bytes) and of its detached hash ``manifest.sha256``.
* :func:`verify_files`: the manifest matches ``manifest.sha256`` and every file it lists
  matches its SHA-256.
* :class:`OutputDir`: a build is written into a temporary sibling of the output directory
  under a lock and renamed into place at the end, so a failed, interrupted or concurrent
  build never leaves a half-written output and never touches a directory or tarball that
  bluelower did not write (docs/cli.md, "Output safety"); :func:`replace_dir` swaps a
  finished cache directory in whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from ... import progress
from ...errors import BlueLowerError
from ...validate import LIMITS, check_int, parse_json
from ...files import (LockedError, OutputLock, check_interrupted, critical, current_umask, file_sha256,  # noqa: F401
                      forget, read_bytes, temp_dir, temp_file, track)

BUNDLE_FORMAT = "bluelower-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest.sha256"  # sha256sum -c format: manifest.json (+ bin/bluelower-run in a device bundle)
MARKER = ".bluelower-build"  # "bluelower wrote this directory"
MARKER_TEXT = ("bluelower build directory (format bluelower-bundle). Written by bluelower: `bluelower compile/build -o` "
               "replaces this directory only while it holds nothing but the files its manifest.json lists.\n")
LIBRARY = "model.so"
PARAMS = "params.safetensors"
TOKENIZER = "tokenizer.json"  # the checkpoint's tokenizer (builds from --hf / --gguf)
RUNTIME_BINARY = "bin/bluelower-run"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
BACKEND_LIB = "libbluelower_backend.so"  # the runtime's TVM-facing half, dlopen()ed after verification
_HEX64 = re.compile(r"[0-9a-f]{64}")


def read_manifest(build_dir: str) -> dict:
    """The manifest of ``build_dir``; one-line errors for a missing or foreign build."""
    if not os.path.isdir(build_dir):
        raise BlueLowerError(f"build directory not found: {build_dir}")
    path = os.path.join(build_dir, MANIFEST)
    if not os.path.isfile(path):
        raise BlueLowerError(f"{build_dir} is not a bluelower build (no {MANIFEST}); compile one with "
                             "`bluelower compile -o DIR`")
    try:
        manifest = parse_json(read_bytes(path), path)
    except BlueLowerError as exc:
        raise BlueLowerError(f"malformed manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BlueLowerError(f"{path}: not a bluelower manifest")
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BlueLowerError(
            f"{path}: format version {manifest.get('format_version')} is not supported (expected {BUNDLE_FORMAT_VERSION})"
        )
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: dict, path: str) -> None:
    """The sections every reader uses have their types and the native runtime's limits
    (``validate.LIMITS``): ``runtime``, ``functions`` (the calling convention's entries of the
    model: ``embed``/``prefill``/``decode`` with a vocabulary, ``encode_image`` with an image
    size), ``kv_cache`` (its shape is the one ``prefill``/``decode`` take, its capacity
    ``runtime.kv_capacity``)."""

    def fail(key: str, msg: str):
        raise BlueLowerError(f"{path}: {key} {msg}")

    def section(key: str) -> dict:
        value = manifest.get(key)
        if not isinstance(value, dict):
            fail(key, "must be an object")
        return value

    rt, functions = section("runtime"), section("functions")
    lm = rt.get("vocab_size") is not None
    required = ("kv_capacity", "prefill_chunk", "image_batch") + (("vocab_size", "hidden_size") if lm else ())
    for key, (low, high) in LIMITS.items():
        if rt.get(key) is not None or key in required:
            try:
                check_int(rt.get(key), low, high, f"runtime.{key}")
            except BlueLowerError as exc:
                raise BlueLowerError(f"{path}: {exc}") from None
    for key in ("eos_token_id", "image_tokens_per_patch"):
        if rt.get(key) is not None and (isinstance(rt[key], bool) or not isinstance(rt[key], int) or rt[key] < 0):
            fail(f"runtime.{key}", "must be a non-negative integer")
    if rt.get("image_size") is not None:
        for key in ("image_mean", "image_std"):
            v = rt.get(key)
            if (not isinstance(v, list) or len(v) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                fail(f"runtime.{key}", "must be a list of 3 numbers")
        if 0 in rt["image_std"]:
            fail("runtime.image_std", "must not contain 0")
    for name, fn in functions.items():
        where = f"functions.{name}"
        if not isinstance(fn, dict) or not isinstance(fn.get("inputs"), list) or not isinstance(fn.get("params"), list):
            fail(where, "must be an object with 'inputs' and 'params' lists")
        for inp in fn["inputs"]:
            shape = inp.get("shape") if isinstance(inp, dict) else None
            if (not isinstance(shape, list) or not isinstance(inp.get("dtype"), str)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                fail(f"{where}.inputs", "must be objects with a shape (non-negative integers) and a dtype")
        if not all(isinstance(p, str) for p in fn["params"]):
            fail(f"{where}.params", "must be weight names")
    needed = (("embed", "prefill", "decode") if lm else ()) + (("encode_image",) if rt.get("image_size") else ())
    missing = [f for f in needed if f not in functions]
    if missing:
        fail("functions", f"lacks {', '.join(missing)} (a model with {'a vocabulary' if lm else 'an image size'} "
                          "has these entries)")
    if not lm:
        return
    kv = section("kv_cache")
    shape = kv.get("shape")
    if (not isinstance(shape, list) or len(shape) != 5
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        fail("kv_cache.shape", "must be 5 positive integers [layers, 2, kv_heads, capacity, head_dim(+4 int8)]")
    if kv.get("dtype") not in ("float32", "int8"):
        fail("kv_cache.dtype", f"must be float32 or int8, got {json.dumps(kv.get('dtype'))}")
    if shape[3] != rt["kv_capacity"] or shape[1] != 2:
        fail("kv_cache.shape", f"{shape} does not hold 2 x runtime.kv_capacity {rt['kv_capacity']} rows per head")
    for fn in ("prefill", "decode"):
        cache = [i for i in functions[fn]["inputs"] if i.get("name") == "kv_cache"]
        if cache and (cache[0]["shape"] != shape or cache[0]["dtype"] != kv["dtype"]):
            fail("kv_cache", f"is {kv['dtype']} {shape}, but functions.{fn} takes {cache[0]['dtype']} "
                             f"{cache[0]['shape']}")


def manifest_hash_lines(build_dir: str, data: bytes, manifest: dict) -> str:
    """The content of ``manifest.sha256`` (``sha256sum -c`` format): ``manifest.json``'s
    hash, and in a device bundle also ``bin/bluelower-run``'s: the two files nothing else can
    check before they are used (the manifest's ``files`` hashes cover everything else; the
    kernel maps the binary before it can check anything)."""
    lines = [f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n"]
    binary = (manifest.get("files") or {}).get(RUNTIME_BINARY)
    if binary:
        lines.append(f"{binary}  {RUNTIME_BINARY}\n")
    return "".join(lines)


def write_manifest(build_dir: str, manifest: dict) -> None:
    """``manifest.json`` (sorted keys, 2-space indent) and its ``manifest.sha256``."""
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    with open(os.path.join(build_dir, MANIFEST), "wb") as fh:
        fh.write(data)
    with open(os.path.join(build_dir, MANIFEST_SHA256), "w", encoding="ascii") as fh:
        fh.write(manifest_hash_lines(build_dir, data, manifest))


_HASH_LINE = re.compile(rb"([0-9a-f]{64})  ([^\n]+)\n")


def check_manifest_hash(build_dir: str) -> dict:
    """``manifest.sha256``: its first line is ``<sha256>  manifest.json`` and matches the
    manifest's bytes. Returns ``{path: sha256}`` of its further lines (``verify_files`` checks
    that the manifest's ``files`` agree, and hashes those files with the others)."""
    path = os.path.join(build_dir, MANIFEST_SHA256)
    if not os.path.isfile(path) or os.path.islink(path):
        raise BlueLowerError(f"{build_dir}: missing {MANIFEST_SHA256} (the manifest's own hash; a build from an older "
                             "bluelower, or damaged): rebuild it")
    with open(path, "rb") as fh:
        data = fh.read(4097)
    entries, pos = {}, 0
    while pos < len(data):
        m = _HASH_LINE.match(data, pos)
        if m is None or len(data) > 4096:
            entries = None
            break
        entries[m.group(2).decode("utf-8", errors="replace")] = m.group(1).decode()
        pos = m.end()
    if not entries or next(iter(entries)) != MANIFEST:
        raise BlueLowerError(f"{path}: malformed (expected '<sha256>  {MANIFEST}' lines in `sha256sum` format)")
    if file_sha256(os.path.join(build_dir, MANIFEST)) != entries.pop(MANIFEST):
        raise BlueLowerError(f"{build_dir}: {MANIFEST} does not match its SHA-256 in {MANIFEST_SHA256} "
                             "(corrupt or modified)")
    return entries


def check_relative_path(build_dir: str, name) -> str:
    """A path the manifest names: relative, inside the build, no ``..``, no symlink."""
    if (not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise BlueLowerError(f"{build_dir}/{MANIFEST}: files: refusing path {name!r} (must be relative, inside the build)")
    return name


def verify_files(build_dir: str, manifest: dict) -> None:
    """The manifest matches ``manifest.sha256``, and every file of ``manifest["files"]``
    exists as a regular file (not a symlink) and matches its SHA-256."""
    detached = check_manifest_hash(build_dir)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BlueLowerError(f"{build_dir}/{MANIFEST}: files must be an object of path -> sha256")
    for name, digest in detached.items():
        if name != MANIFEST and files.get(name) != digest:
            raise BlueLowerError(f"{build_dir}: {MANIFEST_SHA256} and {MANIFEST} disagree on the SHA-256 of {name}")
    for required in (LIBRARY, PARAMS):
        if required not in files:
            raise BlueLowerError(f"{build_dir}/{MANIFEST}: files does not list {required}")
    real_root = os.path.realpath(build_dir)
    for name, digest in sorted(files.items()):
        check_relative_path(build_dir, name)
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise BlueLowerError(f"{build_dir}/{MANIFEST}: files: the SHA-256 of {name} is not 64 hex digits")
        path = os.path.join(build_dir, name)
        if os.path.lexists(path) and os.path.realpath(path) != os.path.join(real_root, name):
            raise BlueLowerError(f"{build_dir}: {name} is (behind) a symbolic link (a build holds regular files only)")
        if not os.path.isfile(path):
            raise BlueLowerError(f"{build_dir}: missing file {name}")
        if file_sha256(path) != digest:
            raise BlueLowerError(f"{build_dir}: {name} does not match its SHA-256 in the manifest (corrupt or modified)")


# ---------------------------------------------------------------------- output directories


def write_marker(build_dir: str) -> None:
    """The file that says "bluelower wrote this directory" (``.bluelower-build``)."""
    with open(os.path.join(build_dir, MARKER), "w", encoding="utf-8") as fh:
        fh.write(MARKER_TEXT)


def _listing(path: str, limit: int = 3) -> str:
    return ", ".join(path[:limit]) + (f" and {len(path) - limit} more" if len(path) > limit else "")


def build_dir_state(path: str) -> tuple[str, str]:
    """What is at an output path: ``("absent" | "empty" | "ours" | "foreign", why)``.

    ``ours``: a directory holding ``manifest.json`` with ``"format": "bluelower-bundle"``,
    the ``.bluelower-build`` marker and nothing else but the files the manifest lists (and
    its ``manifest.sha256``); a build from before the marker, with nothing but its listed
    files, counts too. Anything else that exists is ``foreign``; ``why`` says what made it so."""
    if not os.path.lexists(path):
        return "absent", ""
    if os.path.islink(path) or not os.path.isdir(path):
        return "foreign", "it is not a directory" if not os.path.islink(path) else "it is a symbolic link"
    try:
        top = os.listdir(path)
    except OSError as exc:
        return "foreign", f"cannot list it: {exc.strerror}"
    if not top:
        return "empty", ""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        return "foreign", f"it has no {MANIFEST}"
    except (OSError, ValueError):
        return "foreign", f"its {MANIFEST} is not a bluelower manifest"
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        return "foreign", f"its {MANIFEST} is not a bluelower manifest"
    listed = manifest.get("files")
    allowed = {MANIFEST, MANIFEST_SHA256, MARKER}
    if isinstance(listed, dict):
        allowed |= {os.path.normpath(str(k)) for k in listed}
    dirs = {os.path.dirname(a) for a in allowed} - {""}
    for d in list(dirs):
        while os.path.dirname(d):
            d = os.path.dirname(d)
            dirs.add(d)
    extra = []
    for root, dnames, fnames in os.walk(path):
        rel_root = os.path.relpath(root, path)
        for name in sorted(dnames) + sorted(fnames):
            rel = os.path.normpath(os.path.join(rel_root, name))
            full = os.path.join(root, name)
            if os.path.islink(full):
                extra.append(rel)
            elif name in dnames:
                if rel not in dirs:
                    extra.append(rel + "/")
            elif rel not in allowed:
                extra.append(rel)
        dnames[:] = [d for d in dnames if os.path.normpath(os.path.join(rel_root, d)) in dirs
                     and not os.path.islink(os.path.join(root, d))]
    if extra:
        return "foreign", f"it holds files bluelower did not write: {_listing(sorted(extra))}"
    return "ours", ""


def tarball_state(path: str) -> tuple[str, str]:
    """``("absent" | "ours" | "foreign", why)`` for a tarball path: ``ours`` is a tarball
    bluelower wrote (its first entries ``bluelower-*/`` and ``bluelower-*/.bluelower-build``)."""
    if not os.path.lexists(path):
        return "absent", ""
    if os.path.islink(path) or not os.path.isfile(path):
        return "foreign", "it is not a regular file"
    import tarfile

    try:
        with tarfile.open(path, mode="r|gz") as tar:
            first = tar.next()
            second = tar.next()
    except (OSError, EOFError, tarfile.TarError, ValueError):
        return "foreign", "it is not a tarball bluelower wrote"
    if (first is not None and second is not None and first.isdir() and first.name.startswith("bluelower-")
            and "/" not in first.name and second.name == f"{first.name}/{MARKER}"):
        return "ours", ""
    return "foreign", "it is not a tarball bluelower wrote"


def _aside(path: str) -> str:
    """A free name to move ``path`` to: ``PATH.old``, ``PATH.old.1``, ..."""
    cand, n = path + ".old", 0
    while os.path.lexists(cand):
        n += 1
        cand = f"{path}.old.{n}"
    return cand


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.bluelower-tmp-"


def _writable_dir(parent: str, what: str) -> None:
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BlueLowerError(f"cannot write {what}: {parent} is not writable")


class OutputDir:
    """An output directory (and optionally a tarball) being written by this process.

    :meth:`open` locks the output path(s) (a second bluelower writing the same path fails at
    once), checks what is there, removes temporaries a killed bluelower left next to it, and
    returns a fresh temporary sibling to write into; :meth:`commit` publishes it (and the
    tarball written to :attr:`tarball_tmp`) in a few renames that signals cannot split;
    :meth:`close` removes whatever was not published and releases the locks.

    An existing ``out_dir`` is replaced only when it is a bluelower build holding nothing but
    its own files, or empty; an existing tarball only when bluelower wrote it. Anything else
    is refused unless ``force``, which moves it aside to ``PATH.old`` (``.old.1``, ...):
    bluelower never deletes a file it did not write."""

    def __init__(self, out_dir: str, force: bool = False, tarball: str | None = None, what: str = "-o"):
        self.out_dir = os.path.abspath(out_dir.rstrip("/") or out_dir)
        self.tarball = os.path.abspath(tarball) if tarball else None
        self.force = force
        self.what = what
        self.tmp: str | None = None
        self.tarball_tmp: str | None = None
        self._locks: list = []
        self.moved_aside: list[tuple[str, str]] = []

    # -- checks
    def _refusal(self, path: str, why: str, kind: str) -> BlueLowerError:
        return BlueLowerError(f"{path} exists and {why}; refusing to {kind} it (choose another path, or pass --force "
                              f"to move it aside to {_aside(path)} first)")

    def _check_dir(self) -> str:
        state, why = build_dir_state(self.out_dir)
        if state == "foreign" and not self.force:
            if why.startswith("it holds"):
                why = "is a bluelower build, but " + why
            else:
                why = "is not a bluelower build (" + why + ")"
            raise self._refusal(self.out_dir, why, "replace")
        return state

    def _check_tarball(self) -> str:
        state, why = tarball_state(self.tarball)
        if state == "foreign" and not self.force:
            raise self._refusal(self.tarball, why.replace("it is", "is", 1), "overwrite")
        return state

    def open(self) -> str:
        out, parent = self.out_dir, os.path.dirname(self.out_dir)
        if not os.path.basename(out) or out == parent:
            raise BlueLowerError(f"{self.what} {out}: not a usable output directory")
        if self.tarball is not None:
            tdir = os.path.dirname(self.tarball)
            if self.tarball == out or self.tarball.startswith(out + os.sep):
                raise BlueLowerError(f"--tarball {self.tarball} is inside the output directory {out}")
            if out.startswith(self.tarball + os.sep):
                raise BlueLowerError(f"the output directory {out} is inside --tarball {self.tarball}")
            if not os.path.isdir(tdir) and os.path.abspath(tdir) != os.path.abspath(parent):
                raise BlueLowerError(f"--tarball {self.tarball}: directory {tdir} does not exist")
        if not os.path.isdir(parent):
            try:  # like `mkdir -p`: `-o build/tiny` works in a fresh checkout
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise BlueLowerError(f"cannot create the output directory's parent {parent}: {exc.strerror}") from None
        _writable_dir(parent, out)
        if self.tarball is not None:
            _writable_dir(os.path.dirname(self.tarball), self.tarball)
        # locks first (sorted: one order for every process), then the checks
        for target in sorted({out} | ({self.tarball} if self.tarball else set())):
            try:
                self._locks.append(OutputLock(target).acquire())
            except LockedError as exc:
                self.close()
                who = f"pid {exc.pid}" if exc.pid else "pid unknown"
                raise BlueLowerError(f"{target} is being written by another bluelower ({who}); wait for it to "
                                     "finish, or choose another path") from None
            except OSError as exc:
                self.close()
                raise BlueLowerError(f"cannot lock {target}: {exc.strerror}") from None
        try:
            self._check_dir()
            if self.tarball is not None:
                self._check_tarball()
            for target in [out] + ([self.tarball] if self.tarball else []):
                self._remove_stale(target)
            self.tmp = temp_dir(_temp_prefix(out), parent)
            os.chmod(self.tmp, 0o777 & ~current_umask())  # what mkdir would give (mkdtemp makes it 0700)
            if self.tarball is not None:
                self.tarball_tmp = temp_file(_temp_prefix(self.tarball), os.path.dirname(self.tarball))
        except OSError as exc:  # e.g. a read-only file system the access check did not see
            self.close()
            raise BlueLowerError(f"cannot write next to {out}: {exc.strerror}") from None
        except BaseException:
            self.close()
            raise
        return self.tmp

    @staticmethod
    def _remove_stale(target: str) -> None:
        """Temporaries of ``target`` left by a bluelower that was killed: we hold the lock,
        so nobody is writing them."""
        parent, prefix = os.path.dirname(target), _temp_prefix(target)
        for name in sorted(os.listdir(parent)):
            if name.startswith(prefix):
                path = os.path.join(parent, name)
                progress.log(f"removing {path} (left by an interrupted bluelower)")
                forget(path, remove=True)

    # -- publishing
    def commit(self) -> None:
        """Publish the temporary directory as ``out_dir`` (and the tarball)."""
        check_interrupted()  # an interrupt that something swallowed: do not publish
        state = self._check_dir()  # again: the directory may have changed during the build
        tstate = self._check_tarball() if self.tarball is not None else "absent"
        with critical():
            old = None
            if state in ("ours", "empty"):
                old = self.tmp + ".old"
                os.rename(self.out_dir, old)
                track(old)
            elif state == "foreign":
                aside = _aside(self.out_dir)
                os.rename(self.out_dir, aside)
                self.moved_aside.append((self.out_dir, aside))
            os.rename(self.tmp, self.out_dir)
            forget(self.tmp)
            if self.tarball is not None:
                if tstate == "foreign":
                    aside = _aside(self.tarball)
                    os.rename(self.tarball, aside)
                    self.moved_aside.append((self.tarball, aside))
                os.replace(self.tarball_tmp, self.tarball)
                forget(self.tarball_tmp)
                self.tarball_tmp = None
            self.tmp = None
            if old is not None:
                forget(old, remove=True)
        for path, aside in self.moved_aside:
            progress.log(f"--force: moved the existing {path} aside to {aside}")

    def close(self) -> None:
        """Remove what was not published; release the locks."""
        for path in (self.tmp, self.tarball_tmp):
            if path:
                forget(path, remove=True)
        self.tmp = self.tarball_tmp = None
        for lk in reversed(self._locks):
            lk.release()
        self._locks.clear()

    def __enter__(self) -> "OutputDir":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished temporary directory ``tmp`` to ``final``, replacing an older one
    (cache entries and runtime builds are written aside and swapped in whole: ``final`` is
    never missing or half-written for a reader)."""
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    with critical():
        old = None
        if os.path.isdir(final):
            old = temp_dir(_temp_prefix(final), os.path.dirname(final) or ".")
            os.rename(final, os.path.join(old, "old"))
        os.rename(tmp, final)
        forget(tmp)
        if old is not None:
            forget(old, remove=True)
