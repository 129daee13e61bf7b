"""The one directory bluelower keeps things in between runs.

``$BLUELOWER_CACHE`` (default ``~/.cache/bluelower``) holds downloaded wheels and model
files, built native runtimes and ``inspect memory --model`` results, each in its own
sub-directory. ``BLUELOWER_CACHE=off`` disables result caching (every answer is
recomputed); what must live somewhere while a command runs (a downloaded wheel, a runtime
build) then goes to a temporary directory of this process, removed at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from .files import track

ENV = "BLUELOWER_CACHE"
_OFF = ("off", "0", "no", "none")
_scratch: list = []


def enabled() -> bool:
    """False when ``$BLUELOWER_CACHE`` is ``off``: results are recomputed, not stored."""
    return os.environ.get(ENV, "").strip().lower() not in _OFF


def root() -> str:
    """The cache root: ``$BLUELOWER_CACHE``, ``~/.cache/bluelower``, or (cache off) a
    temporary directory of this process."""
    if not enabled():
        if not _scratch:
            _scratch.append(track(tempfile.mkdtemp(prefix="bluelower-cache-")))  # (removed on an interrupt too)
            atexit.register(shutil.rmtree, _scratch[0], True)
        return _scratch[0]
    value = os.environ.get(ENV, "").strip()
    return value or os.path.join(os.path.expanduser("~"), ".cache", "bluelower")


def cache_dir(*parts: str, create: bool = True) -> str:
    """``root()/part/...``, created unless ``create`` is False."""
    path = os.path.join(root(), *parts)
    if create:
        os.makedirs(path, exist_ok=True)
    return path


def result_dir(*parts: str) -> str | None:
    """Where a cached *result* lives, or None when result caching is off."""
    return os.path.join(root(), *parts) if enabled() else None
