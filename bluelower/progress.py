"""Progress output for long steps (weight conversion, tracing, TVM build).

On a terminal a one-line bar is redrawn in place on stderr; otherwise (CI, pipes) each
step is one plain line. ``set_quiet(True)`` (the CLI's ``--quiet``) silences both.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from .files import check_interrupted

_quiet = False
_lock = threading.Lock()  # steps may report from two threads (weights convert beside the TVM build)
_bar = [False]  # a bar is drawn on the terminal's current line


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def log(message: str) -> None:
    """One informational line on stderr."""
    if not _quiet:
        with _lock:
            _clear_bar()
            print(message, file=sys.stderr, flush=True)


def _clear_bar() -> None:
    if _bar[0]:
        sys.stderr.write("\r" + " " * 100 + "\r")
        _bar[0] = False


class Progress:
    """A counter over ``total`` items: a bar on a TTY, a line every ~10% otherwise."""

    def __init__(self, label: str, total: int):
        self.label = label
        self.total = max(int(total), 1)
        self.done = 0
        self._tty = sys.stderr.isatty()
        self._last_decile = -1
        self._start = time.perf_counter()

    def update(self, n: int = 1, item: str = "") -> None:
        check_interrupted()  # a long loop's every step is a point where an interrupt is seen
        self.done = min(self.done + n, self.total)
        if _quiet:
            return
        frac = self.done / self.total
        if self._tty:
            width = 30
            filled = int(width * frac)
            bar = "#" * filled + "-" * (width - filled)
            with _lock:
                sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {item[:40]:<40}")
                sys.stderr.flush()
                _bar[0] = True
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                log(f"{self.label}: {self.done}/{self.total}")

    def close(self) -> None:
        if _quiet:
            return
        elapsed = time.perf_counter() - self._start
        log(f"{self.label}: done ({self.done}/{self.total}, {elapsed:.1f} s)")


@contextlib.contextmanager
def step(label: str):
    """Report the start and duration of one long step."""
    check_interrupted()
    log(f"{label} ...")
    start = time.perf_counter()
    yield
    check_interrupted()
    log(f"{label}: {time.perf_counter() - start:.1f} s")
