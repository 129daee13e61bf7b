"""File helpers every layer may use: hashing, per-output locks, this process's temporary
paths, and what SIGINT / SIGTERM do to them.

* :func:`file_sha256`: the SHA-256 of a file.
* :func:`read_user_text`: a text file a user names (``--text``, ``--calibration``): UTF-8,
  not empty, one line otherwise.
* :class:`OutputLock`: one lock file per output path (``.NAME.bluelower-lock`` next to it,
  an ``flock`` held while the command runs, the holder's pid inside), so a second
  bluelower writing the same path fails at once ("... is being written by another
  bluelower (pid N)"). A lock left by a killed process holds no ``flock`` any more: the
  next command takes it over.
* :func:`temp_dir` / :func:`temp_file` / :func:`forget`: temporary paths (unique per
  process) that are removed when the process is interrupted.
* :func:`install_signal_handlers` (the CLI calls it): SIGINT and SIGTERM raise
  :class:`Interrupted` in the main thread; the command unwinds (its ``finally`` blocks
  remove its temporaries and release its locks) and exits 130 / 143 with one line. A
  signal that arrives while the main thread is inside a long C++ call (a TVM pass, LLVM
  code generation) is acted on by a watchdog thread after a short grace period: it removes
  every registered temporary, releases every lock and exits with the same code and line.
  :func:`critical` defers both around the few renames that publish an output, so an
  output is either the old one or the new one, never half of each.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (any size, little memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_bytes(path: str, where: str | None = None) -> bytes:
    """The bytes of ``path``; an unreadable file is one :class:`BlueLowerError` line
    (``WHERE: cannot read: REASON``, ``where`` defaulting to the path)."""
    from .errors import BlueLowerError

    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise BlueLowerError(f"{where or path}: cannot read: {exc.strerror or exc}") from None


def read_user_text(path: str, flag: str, empty_hint: str = "") -> tuple[bytes, str]:
    """``(bytes, text)`` of the UTF-8 text file ``path`` given with option ``flag`` (a
    leading byte-order mark dropped from the text). One-line :class:`BlueLowerError`
    (``FLAG PATH: ...``) when it is missing, not a regular file, unreadable, not UTF-8 (the
    byte offset) or only white space (``empty_hint`` appended)."""
    from .errors import BlueLowerError

    where = f"{flag} {path}"
    if not os.path.exists(path):
        raise BlueLowerError(f"{where}: not found")
    if not os.path.isfile(path):
        raise BlueLowerError(f"{where}: is not a regular file")
    raw = read_bytes(path, where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BlueLowerError(f"{where}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not text.strip():
        raise BlueLowerError(f"{where}: the file is empty" + (f"; {empty_hint}" if empty_hint else ""))
    return raw, text.removeprefix("\ufeff")


# ---------------------------------------------------------------------- signals

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
GRACE_S = 2.0  # how long the main thread has to unwind before the watchdog ends the process


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``exit_code`` is 128 + the signal number (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {SIGNAL_NAMES.get(signum, signum)}")
        self.signum = signum
        self.exit_code = 128 + signum


_lock = threading.RLock()
_temps: dict[str, None] = {}  # insertion-ordered set of paths to remove on an interrupt
_locks: dict[str, "OutputLock"] = {}
_pending: list[int] = []  # signals received (the first one decides the exit code)
_critical = [0]
_installed = [False]
_exiting = threading.Lock()


def _handler(signum, frame) -> None:
    _pending.append(signum)
    if len(_pending) > 1 or _critical[0]:
        return  # already unwinding (the watchdog ends a second one at once), or publishing an output
    raise Interrupted(signum)


def interrupted() -> int | None:
    """The first signal received, if any."""
    return _pending[0] if _pending else None


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived (even if something swallowed the
    exception it raised: a library that catches everything)."""
    if _pending and not _critical[0]:
        raise Interrupted(_pending[0])


@contextlib.contextmanager
def critical():
    """Signals received inside are acted on when it ends (publishing an output)."""
    _critical[0] += 1
    try:
        yield
    finally:
        _critical[0] -= 1
    check_interrupted()


def install_signal_handlers() -> None:
    """SIGINT / SIGTERM -> :class:`Interrupted` in the main thread, and the watchdog for a
    main thread stuck in C++. Idempotent; only from the main thread."""
    if _installed[0] or threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    for fd in (r, w):
        os.set_inheritable(fd, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for sig in SIGNAL_NAMES:
        signal.signal(sig, _handler)
    threading.Thread(target=_watchdog, args=(r,), name="bluelower-signal-watchdog", daemon=True).start()
    _installed[0] = True


def _watchdog(fd: int) -> None:
    seen = 0
    deadline = None
    while True:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        import select

        ready, _, _ = select.select([fd], [], [], timeout)
        if ready:
            data = os.read(fd, 64)
            got = [b for b in data if b in (signal.SIGINT, signal.SIGTERM)]
            seen += len(got)
            if got and deadline is None:
                deadline = time.monotonic() + GRACE_S
            if seen < 2:
                continue
        elif deadline is None:
            continue
        # the grace period is over (or a second signal): the main thread did not get out
        waited = time.monotonic()
        while _critical[0] and time.monotonic() - waited < 10.0:
            time.sleep(0.05)
        signum = _pending[0] if _pending else signal.SIGTERM
        emergency_exit(signum)
        # the main thread is already exiting (it printed the line): give it a moment more
        time.sleep(GRACE_S)
        os._exit(128 + signum)


def cleanup() -> None:
    """Remove every registered temporary and release every lock (interrupts, errors)."""
    with _lock:
        for path in reversed(list(_temps)):
            _remove(path)
        _temps.clear()
        for lk in list(_locks.values()):
            lk.release()


def emergency_exit(signum: int) -> None:
    """Clean up and end the process now with 128 + ``signum`` and one line on stderr."""
    if not _exiting.acquire(blocking=False):
        return  # another thread is already doing it
    try:
        cleanup()
        os.write(2, f"error: interrupted by {SIGNAL_NAMES.get(signum, signum)}\n".encode())
    finally:
        os._exit(128 + signum)


def exit_interrupted(signum: int, message: bool = True) -> None:
    """The main thread's orderly end after an interrupt (the CLI): clean up, one line
    (unless ``message`` is False: the command already printed its one line), and
    ``SystemExit(128 + signum)``."""
    if not _exiting.acquire(blocking=False):
        time.sleep(3600)  # the watchdog is ending the process
    cleanup()
    if message:
        sys.stderr.flush()
        os.write(2, f"error: interrupted by {SIGNAL_NAMES.get(signum, signum)}\n".encode())
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------- temporaries


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def track(path: str) -> str:
    """Register ``path`` (created by this process) for removal on an interrupt."""
    with _lock:
        _temps[os.path.abspath(path)] = None
    return path


def forget(path: str, remove: bool = False) -> None:
    """``path`` is no longer a temporary (it was published, or removed): unregister it,
    removing it first with ``remove``."""
    if remove:
        _remove(path)
    with _lock:
        _temps.pop(os.path.abspath(path), None)


def temp_dir(prefix: str, dir: str | None = None) -> str:  # noqa: A002
    """A fresh directory (unique per process), removed on an interrupt until :func:`forget`."""
    with critical():  # registered before a signal can leave it behind
        return track(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=dir))


def temp_file(prefix: str, dir: str, suffix: str = ".tmp") -> str:  # noqa: A002
    """A fresh empty file (unique per process), removed on an interrupt until :func:`forget`;
    mode 0666 minus the umask (what ``open`` would give), not mkstemp's 0600."""
    with critical():
        fd, path = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=suffix, dir=dir)
        os.close(fd)
        track(path)
    os.chmod(path, 0o666 & ~current_umask())
    return path


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------- locks


class LockedError(Exception):
    """Another live process holds the lock: ``pid`` (None when it could not be read)."""

    def __init__(self, path: str, pid: int | None):
        super().__init__(path)
        self.path, self.pid = path, pid


def lock_path(target: str) -> str:
    """The lock file of an output path: ``.NAME.bluelower-lock`` in the same directory."""
    target = os.path.abspath(target.rstrip("/") or target)
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.bluelower-lock")


class OutputLock:
    """An exclusive, non-blocking lock on an output path (see the module docstring).

    :meth:`acquire` raises :class:`LockedError` when a live process holds it and returns
    True when it took over a lock file left by a process that died (``stale``)."""

    def __init__(self, target: str):
        self.target = os.path.abspath(target)
        self.path = lock_path(target)
        self.fd: int | None = None
        self.stale = False

    def acquire(self) -> "OutputLock":
        with critical():  # held and registered, or neither
            return self._acquire()

    def _acquire(self) -> "OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                # the holder writes its pid just after taking the flock: give it a moment
                pid = _read_pid(fd)
                for _ in range(50):
                    if pid is not None:
                        break
                    time.sleep(0.02)
                    pid = _read_pid(fd)
                os.close(fd)
                raise LockedError(self.target, pid) from None
            try:  # the file may have been removed (and re-created) by its previous holder meanwhile
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.stale = _read_pid(fd) is not None  # a pid left behind: its process died holding it
            mine = f"{os.getpid()}\n".encode()
            os.pwrite(fd, mine, 0)  # then cut what is left of an older, longer pid: never empty
            os.ftruncate(fd, len(mine))
            self.fd = fd
            with _lock:
                _locks[self.path] = self
            return self

    def release(self) -> None:
        with _lock:
            fd, self.fd = self.fd, None
            _locks.pop(self.path, None)
        if fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiting process re-checks the inode
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
