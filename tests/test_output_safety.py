"""Output safety (issue 16; docs/cli.md, "Output safety"): an output path that is not a
bluelower build is never touched without --force (and --force moves it aside, never deletes
it), an existing tarball likewise, a lock per output path (concurrent builds: one wins, the
other fails at once, the result is intact), temporaries unique per process, SIGINT /
SIGTERM: one line, exit 130 / 143, nothing left behind.

Most cases drive :class:`bundle.OutputDir` directly (milliseconds); the end-to-end cases
run ``bluelower compile --model tiny`` (refusals happen before the model is imported).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from bluelower import files
from bluelower.errors import BlueLowerError
from bluelower.lowering.artifacts import bundle
from bluelower.lowering.artifacts.bundle import MARKER, OutputDir, verify_files, write_manifest, write_marker


def _cli(*args, cwd=None, **kw):
    return subprocess.run([sys.executable, "-m", "bluelower.cli", *args], capture_output=True, text=True, cwd=cwd,
                          **kw)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ") or "Traceback" in ln]


def _one_error(proc, needle: str, code: int = 1) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    errs = _error_lines(proc.stderr)
    assert len(errs) == 1 and needle in errs[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _snapshot(root) -> dict:
    """Every file under ``root`` (relative path -> bytes), for "nothing was touched"."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _leftovers(parent) -> list[str]:
    """Temporaries and locks bluelower could have left next to its outputs."""
    return sorted(n for n in os.listdir(parent) if ".bluelower-" in n or n.startswith(".bluelower"))


def _fake_build(d: str, seed: int = 0, extra: dict | None = None) -> None:
    """What compile_model writes, in miniature: model.so, params, manifest (+ hash), marker."""
    os.makedirs(d, exist_ok=True)
    for name, data in {"model.so": b"so%d" % seed, "params.safetensors": b"p%d" % seed, **(extra or {})}.items():
        os.makedirs(os.path.dirname(os.path.join(d, name)) or d, exist_ok=True)
        open(os.path.join(d, name), "wb").write(data)
    names = ["model.so", "params.safetensors", *(extra or {})]
    write_manifest(d, {"format": "bluelower-bundle", "format_version": 1, "inputs": {"seed": seed},
                       "files": {n: files.file_sha256(os.path.join(d, n)) for n in names}})
    write_marker(d)


def _manifest(d) -> dict:
    return json.loads(open(os.path.join(d, "manifest.json"), "rb").read())


def _write(path, data: bytes = b"user data") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").write(data)


def _produce(out: str, seed: int, force: bool = False, tarball: str | None = None) -> OutputDir:
    o = OutputDir(out, force=force, tarball=tarball)
    tmp = o.open()
    try:
        _fake_build(tmp, seed)
        if tarball:
            from bluelower.lowering.artifacts.device import write_tarball

            write_tarball(tmp, o.tarball_tmp, "bluelower-fake-host-fp32")
        o.commit()
    finally:
        o.close()
    return o


# ------------------------------------------------------------------ what an existing -o is

USER_DIRS = {  # name -> files of a directory the user owns (relative path -> bytes)
    "web app with a manifest.json": {"manifest.json": b'{"name": "my app", "start_url": "/"}', "index.html": b"<html>",
                                     "js/app.js": b"main()"},
    "only a manifest.json": {"manifest.json": b'{"short_name": "x"}'},
    "a bluelower manifest next to the user's files": {"manifest.json": b'{"format": "bluelower-bundle"}',
                                                       "notes.txt": b"mine"},
    "unrelated files": {"a.txt": b"a", "sub/b.bin": b"\0\1"},
}


@pytest.mark.parametrize("case", sorted(USER_DIRS))
def test_a_directory_that_is_not_a_build_is_refused_and_untouched(tmp_path, case):
    out = tmp_path / "out"
    for rel, data in USER_DIRS[case].items():
        _write(out / rel, data)
    before = _snapshot(out)
    with pytest.raises(BlueLowerError, match="refusing to replace it .*--force"):
        OutputDir(str(out)).open()
    assert _snapshot(out) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("case", sorted(USER_DIRS))
def test_force_moves_a_foreign_directory_aside_never_deletes_it(tmp_path, case):
    out = tmp_path / "out"
    for rel, data in USER_DIRS[case].items():
        _write(out / rel, data)
    before = _snapshot(out)
    o = _produce(str(out), seed=1, force=True)
    assert o.moved_aside == [(str(out), str(out) + ".old")]
    assert _snapshot(str(out) + ".old") == before  # every user file, byte for byte
    verify_files(str(out), _manifest(out))
    # a second --force keeps both older ones
    (out / "extra.txt").write_text("added to the build by the user")
    _produce(str(out), seed=2, force=True)
    assert os.path.isdir(str(out) + ".old.1") and (tmp_path / "out.old.1" / "extra.txt").exists()
    assert _leftovers(tmp_path) == []


def test_a_previous_build_or_an_empty_directory_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _produce(str(out), seed=1)  # empty: replaced
    assert json.loads((out / "manifest.json").read_text())["inputs"]["seed"] == 1
    _produce(str(out), seed=2)  # ours: replaced
    assert json.loads((out / "manifest.json").read_text())["inputs"]["seed"] == 2
    assert (out / MARKER).is_file() and not (tmp_path / "out.old").exists()
    # a build from before the marker, holding only its listed files: replaced too
    (out / MARKER).unlink()
    _produce(str(out), seed=3)
    assert json.loads((out / "manifest.json").read_text())["inputs"]["seed"] == 3
    assert _leftovers(tmp_path) == []


def test_a_build_with_a_user_file_added_is_refused(tmp_path):
    out = tmp_path / "out"
    _produce(str(out), seed=1)
    (out / "my-notes.txt").write_text("keep me")
    with pytest.raises(BlueLowerError, match="is a bluelower build, but it holds files bluelower did not write: "
                                             "my-notes.txt"):
        OutputDir(str(out)).open()
    assert (out / "my-notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_output_path_that_is_a_file_or_a_symlink_is_refused(tmp_path, kind):
    out = tmp_path / "out"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "x").write_text("x")
    if kind == "file":
        out.write_text("a file")
    else:
        out.symlink_to(target)
    with pytest.raises(BlueLowerError, match="refusing to replace"):
        OutputDir(str(out)).open()
    assert (target / "x").read_text() == "x" and os.path.lexists(out)


def test_the_directory_is_checked_again_before_it_is_replaced(tmp_path):
    """A file the user drops into the old build while the new one is being written is not lost."""
    out = tmp_path / "out"
    _produce(str(out), seed=1)
    o = OutputDir(str(out))
    tmp = o.open()
    _fake_build(tmp, 2)
    (out / "added-meanwhile.txt").write_text("mine")
    with pytest.raises(BlueLowerError, match="added-meanwhile.txt"):
        o.commit()
    o.close()
    assert (out / "added-meanwhile.txt").read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text())["inputs"]["seed"] == 1
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ tarballs


def test_tarballs(tmp_path):
    out, tar = tmp_path / "out", tmp_path / "out.tar.gz"
    tar.write_bytes(b"the user's own tarball")
    with pytest.raises(BlueLowerError, match=r"out.tar.gz exists and is not a tarball bluelower wrote; refusing to "
                                             r"overwrite it"):
        OutputDir(str(out), tarball=str(tar)).open()
    assert tar.read_bytes() == b"the user's own tarball" and not out.exists()
    _produce(str(out), seed=1, tarball=str(tar), force=True)  # moved aside
    assert (tmp_path / "out.tar.gz.old").read_bytes() == b"the user's own tarball"
    assert bundle.tarball_state(str(tar)) == ("ours", "")
    _produce(str(out), seed=2, tarball=str(tar))  # its own tarball: replaced without --force
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        manifest = json.load(tf.extractfile("bluelower-fake-host-fp32/manifest.json"))
    assert names[:2] == ["bluelower-fake-host-fp32", f"bluelower-fake-host-fp32/{MARKER}"]
    assert manifest["inputs"]["seed"] == 2 == json.loads((out / "manifest.json").read_text())["inputs"]["seed"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where,needle", [
    ("missing/t.tar.gz", "directory {tmp}/missing does not exist"),
    ("out/t.tar.gz", "is inside the output directory"),
    ("out", "is inside the output directory"),
])
def test_bad_tarball_paths_are_refused_before_anything_is_written(tmp_path, where, needle):
    with pytest.raises(BlueLowerError, match=needle.format(tmp=tmp_path).replace("/", "/")):
        OutputDir(str(tmp_path / "out"), tarball=str(tmp_path / where)).open()
    assert os.listdir(tmp_path) == []


def test_tarball_into_a_missing_directory_is_refused_before_the_build(tmp_path):
    t0 = time.monotonic()
    proc = _cli("build", "--model", "tiny", "--soc", "host", "-o", str(tmp_path / "b"), "--tarball",
                str(tmp_path / "nope" / "b.tar.gz"))
    _one_error(proc, "does not exist")
    assert "import" not in proc.stderr and "build runtime" not in proc.stderr  # nothing was built
    assert os.listdir(tmp_path) == [] and time.monotonic() - t0 < 60


def test_cli_refuses_a_web_app_directory_and_an_existing_tarball(tmp_path):
    """The issue's cases end to end: `compile -o` over a web app (its files are kept) and
    `build` over the user's own DIR.tar.gz (kept), both before anything is compiled."""
    app = tmp_path / "app"
    for rel, data in USER_DIRS["web app with a manifest.json"].items():
        _write(app / rel, data)
    before = _snapshot(app)
    proc = _cli("compile", "--model", "tiny", "-o", str(app))
    _one_error(proc, "is not a bluelower build")
    assert "--force" in proc.stderr and _snapshot(app) == before
    (tmp_path / "dist.tar.gz").write_bytes(b"mine")
    proc = _cli("build", "--model", "tiny", "--soc", "host", "-o", str(tmp_path / "dist"))
    _one_error(proc, "dist.tar.gz exists and is not a tarball bluelower wrote")
    assert (tmp_path / "dist.tar.gz").read_bytes() == b"mine" and not (tmp_path / "dist").exists()
    assert _leftovers(tmp_path) == []


def test_output_on_a_file_system_that_cannot_be_written(tmp_path):
    proc = _cli("compile", "--model", "tiny", "-o", "/proc/bluelower-out")
    _one_error(proc, "/proc")
    proc = _cli("compile", "--model", "tiny", "-o", str(tmp_path / "o"), "--dump-ir", str(tmp_path / "o" / "ir"))
    _one_error(proc, "is inside the output directory")


# ------------------------------------------------------------------ locks and concurrency


def test_a_second_writer_fails_at_once_and_a_stale_lock_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    first = OutputDir(out)
    first.open()
    t0 = time.monotonic()
    with pytest.raises(BlueLowerError, match=rf"out is being written by another bluelower \(pid {os.getpid()}\)"):
        OutputDir(out).open()
    assert time.monotonic() - t0 < 1.0
    first.close()
    assert _leftovers(tmp_path) == []
    # a writer killed with SIGKILL: its lock file and temporary directory stay behind
    code = ("import os, sys, time; from bluelower.lowering.artifacts.bundle import OutputDir\n"
            f"o = OutputDir({out!r}); t = o.open(); open(os.path.join(t, 'half'), 'w').write('x')\n"
            "print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    left = _leftovers(tmp_path)
    assert any(n.endswith(".bluelower-lock") for n in left) and any(".bluelower-tmp-" in n for n in left)
    o = _produce(out, seed=5)  # takes the lock over and removes the dead writer's temporary
    assert o._locks == []
    assert _leftovers(tmp_path) == []
    assert json.loads(open(os.path.join(out, "manifest.json")).read())["inputs"]["seed"] == 5


def test_temporary_names_are_unique_per_process(tmp_path):
    a = files.temp_dir(".x.bluelower-tmp-", str(tmp_path))
    b = files.temp_file(".x.bluelower-tmp-", str(tmp_path))
    assert f"-{os.getpid()}-" in os.path.basename(a) and f"-{os.getpid()}-" in os.path.basename(b)
    assert oct(os.stat(b).st_mode & 0o777) == oct(0o666 & ~files.current_umask())
    files.forget(a, remove=True)
    files.forget(b, remove=True)
    assert os.listdir(tmp_path) == []


def test_concurrent_builds_to_one_path(tmp_path):
    """Two `build -o same` at once (different seeds): one wins, the other fails at once with
    the winner's pid; the directory and the tarball are both the winner's, intact."""
    out = str(tmp_path / "dist")
    cmd = [sys.executable, "-m", "bluelower.cli", "build", "--model", "tiny", "--quant", "fp32", "--soc", "host",
           "-o", out, "--json"]
    procs = [subprocess.Popen(cmd + ["--seed", str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in (1, 2)]
    results = [(p.pid, *p.communicate(timeout=900), p.returncode) for p in procs]
    ok = [r for r in results if r[3] == 0]
    bad = [r for r in results if r[3] != 0]
    assert len(ok) == 1 and len(bad) == 1, [r[2][-1500:] for r in results]
    winner_pid, _out, _err, _ = ok[0]
    _one_error(subprocess.CompletedProcess([], bad[0][3], bad[0][1], bad[0][2]),
               f"is being written by another bluelower (pid {winner_pid})")
    assert "import" not in bad[0][2]  # it failed before doing any work
    seed = json.loads(ok[0][1])["files"] and bundle.read_manifest(out)["inputs"]["seed"]
    verify_files(out, bundle.read_manifest(out))
    with tarfile.open(out + ".tar.gz") as tf:
        prefix = tf.getnames()[0]
        inner = json.load(tf.extractfile(f"{prefix}/manifest.json"))
        params = tf.extractfile(f"{prefix}/params.safetensors").read()
    assert inner["inputs"]["seed"] == seed
    assert params == open(os.path.join(out, "params.safetensors"), "rb").read()
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------ signals


def _interrupt(tmp_path, sig: int, after: str, out: str):
    """`bluelower compile` to ``out``, signalled once a stderr line starts with ``after``."""
    proc = subprocess.Popen([sys.executable, "-m", "bluelower.cli", "compile", "--model", "tiny", "--quant", "fp32",
                             "-o", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(after):
            time.sleep(0.3)
            proc.send_signal(sig)
            break
    else:
        proc.wait()
        pytest.fail(f"the compile ended before '{after}': {''.join(seen)[-2000:]}")
    t0 = time.monotonic()
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    return proc.returncode, "".join(seen) + rest, time.monotonic() - t0


@pytest.mark.parametrize("sig,after", [
    (signal.SIGINT, "import: "),        # during the pass pipeline (TVM passes, Python and C++)
    (signal.SIGTERM, "TVM build ..."),  # inside relax.build: LLVM code generation in C++
])
def test_signal_mid_build(tmp_path, sig, after):
    out = str(tmp_path / "out")
    _fake_build(out, seed=9)  # a previous build: must survive the interrupted one unchanged
    before = _snapshot(out)
    code, stderr, took = _interrupt(tmp_path, sig, after, out)
    assert code == 128 + sig, stderr[-2000:]
    errs = _error_lines(stderr)
    assert errs == [f"error: interrupted by {signal.Signals(sig).name}"], stderr[-2000:]
    assert took < 15  # the watchdog ends a main thread stuck in C++ after 2 s
    assert _snapshot(out) == before
    assert _leftovers(tmp_path) == []
