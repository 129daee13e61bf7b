"""How many CPUs bluelower's parallel steps use (planning workers, weight conversion threads)."""

from __future__ import annotations

import os

from .errors import BlueLowerError


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def env_jobs() -> int | None:
    """``$BLUELOWER_JOBS`` as a number (None when unset); a one-line error when malformed."""
    env = os.environ.get("BLUELOWER_JOBS", "").strip()
    if not env:
        return None
    try:
        jobs = int(env)
    except ValueError:
        raise BlueLowerError(f"BLUELOWER_JOBS must be a whole number, got '{env}'") from None
    if jobs < 1:
        raise BlueLowerError(f"BLUELOWER_JOBS must be at least 1, got {jobs}")
    return jobs
