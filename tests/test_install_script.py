"""scripts/install.sh waits (bounded, with a message) for another apt/dpkg process instead of
failing at once (issue 16): scripts/wait-for-apt.sh probed with a lock held the way apt holds
it (fcntl), on stand-in lock files."""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import fcntl, sys, time\nfh = open(sys.argv[1], 'r+b')\nfcntl.lockf(fh, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\ntime.sleep(float(sys.argv[2]))\n")


def _wait(locks: list[str], limit: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, BLUELOWER_APT_LOCKS=" ".join(locks), BLUELOWER_APT_LOCK_WAIT=str(limit), PY=sys.executable)
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {ROOT}/scripts/wait-for-apt.sh; bl_wait_for_apt"],
                          capture_output=True, text=True, env=env, timeout=120)


def _holder(path: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, path, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_free_locks_pass_at_once(tmp_path):
    lock = tmp_path / "lock"
    lock.write_bytes(b"")
    proc = _wait([str(lock), str(tmp_path / "absent")], 10)
    assert proc.returncode == 0 and proc.stderr == ""


def test_a_held_lock_is_waited_for_then_given_up(tmp_path):
    lock = tmp_path / "lock-frontend"
    lock.write_bytes(b"")
    holder = _holder(str(lock), 30)
    try:
        t0 = time.monotonic()
        proc = _wait([str(lock)], 3)
        assert proc.returncode == 1 and 2 <= time.monotonic() - t0 < 30
        lines = proc.stderr.splitlines()
        assert lines[0] == "[install] waiting for another apt/dpkg process to finish (at most 3 s) ..."
        assert lines[-1].startswith("[install] error: another apt/dpkg process still holds its lock after")
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_released_meanwhile_lets_the_install_go_on(tmp_path):
    lock = tmp_path / "lock"
    lock.write_bytes(b"")
    holder = _holder(str(lock), 2)
    proc = _wait([str(lock)], 60)
    holder.wait()
    assert proc.returncode == 0, proc.stderr
    assert "waiting for another apt/dpkg process" in proc.stderr and "apt/dpkg is free after" in proc.stderr
