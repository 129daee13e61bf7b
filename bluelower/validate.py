"""Input validation shared by every reader: JSON documents, integer ranges, output paths.

The limits here are the ones the native runtime (``runtime_stubs/native/``) enforces too, so
a file the Python side accepts is one ``bluelower-run`` accepts and the other way round
(docs/cli.md, "Validation rules and limits", lists every rule):

* :func:`parse_json` / :func:`read_json`: strict UTF-8, no ``NaN``/``Infinity`` literals, at
  most :data:`MAX_JSON_DEPTH` levels of nesting (``json.cc``'s ``kMaxDepth``), one-line errors
  naming the file, line and column;
* :func:`check_int` / :func:`check_number`: a value in its range, the range in the message
  ("decoder.vocab_size 100000000000000000000 is out of range [1, 2^24]");
* :data:`LIMITS`: the ranges of the runtime shapes a build fixes (``kv_capacity``, ...);
* :func:`check_output_file` / :func:`check_output_dir`: an output path that can be written,
  checked before the work that produces it.
"""

from __future__ import annotations

import json
import math
import os

from .errors import BlueLowerError
from .files import read_bytes

MAX_JSON_DEPTH = 64  # runtime_stubs/native/json.cc kMaxDepth

# (low, high), both inclusive: the runtime shapes of a build, the same in the config schema
# (lowering/models/config.py), the manifest reader (lowering/artifacts/bundle.py) and the
# native runtime (bluelower_run.cc: "runtime values out of range")
LIMITS = {
    "kv_capacity": (1, 1 << 24),
    "prefill_chunk": (1, 1 << 20),
    "image_batch": (1, 64),
    "hidden_size": (1, 1 << 20),
    "vocab_size": (1, 1 << 24),
    "image_size": (1, 8192),
    "max_patches": (1, 64),
}


def bound(n) -> str:
    """``16777216`` -> ``2^24`` (powers of two from 2^10 on), else the number."""
    if isinstance(n, int) and n >= 1024 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return str(n)


def check_int(value, low: int, high: int, what: str) -> int:
    """``value`` as an int in ``[low, high]``; else one line naming ``what`` and the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BlueLowerError(f"{what} must be an integer, got {json.dumps(value, default=str)}")
    if not low <= value <= high:
        raise BlueLowerError(f"{what} {value} is out of range [{bound(low)}, {bound(high)}]")
    return value


def check_number(value, what: str, positive: bool = True, below: float | None = None) -> float:
    """A finite number (> 0 with ``positive``, < ``below`` when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BlueLowerError(f"{what} must be a number, got {json.dumps(value, default=str)}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or (below is not None and value >= below):
        rng = f"(0, {below:g})" if below is not None else "a finite number > 0" if positive else "a finite number"
        raise BlueLowerError(f"{what} {value:g} is out of range {rng}" if below is not None
                             else f"{what} must be {rng}, got {value:g}")
    return value


# ------------------------------------------------------------------------------ JSON


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a 64-bit float")
    return value


def _depth_ok(doc) -> bool:
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return False
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return True


def parse_json(data, where: str):
    """Parse ``data`` (bytes: UTF-8, or str) as strict JSON; one-line errors naming ``where``."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BlueLowerError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
    too_deep = False
    try:
        doc = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
        too_deep = not _depth_ok(doc)
    except json.JSONDecodeError as exc:
        raise BlueLowerError(f"{where}: malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # NaN / Infinity / 1e999
        raise BlueLowerError(f"{where}: malformed JSON: {exc}") from None
    except RecursionError:  # Python's parser recurses: thousands of levels
        too_deep = True
    if too_deep:
        raise BlueLowerError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return doc


def read_json(path: str, what: str = "file"):
    """The JSON document in ``path``; ``what`` names it in the not-found error."""
    if not os.path.exists(path):
        raise BlueLowerError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise BlueLowerError(f"{path}: {what} is a directory, not a JSON file")
    return parse_json(read_bytes(path), path)


# ------------------------------------------------------------------------- output paths


def _probe(directory: str) -> str | None:
    """Why ``directory`` cannot take a new file (a real attempt: permissions, a read-only
    file system, /proc), or None."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".bluelower-probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def check_output_file(path: str, flag: str) -> str:
    """``path`` can be written as a file (its directory exists and takes files, it is not a
    directory): checked before the work that produces it."""
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if os.path.isdir(full):
        raise BlueLowerError(f"{flag} {path}: is a directory")
    if not os.path.isdir(parent):
        raise BlueLowerError(f"{flag} {path}: directory {parent} does not exist")
    why = _probe(parent) or (None if not os.path.exists(full) or os.access(full, os.W_OK) else "not writable")
    if why:
        raise BlueLowerError(f"{flag} {path}: cannot write there ({why})")
    return path


def check_output_dir(path: str, flag: str) -> str:
    """``path`` is a directory that takes files, or can be created (its nearest existing
    ancestor is a directory that takes files)."""
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise BlueLowerError(f"{flag} {path}: exists and is not a directory")
    ancestor = full
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise BlueLowerError(f"{flag} {path}: {ancestor} is not a directory")
    why = _probe(ancestor)
    if why:
        raise BlueLowerError(f"{flag} {path}: cannot write there ({why})")
    return path


# ------------------------------------------------------------------ library output


class captured_stderr:  # noqa: N801  (a context manager, used like a function)
    """Capture what C/C++ libraries (LLVM, TVM) write to file descriptor 2 inside the block:
    it goes to :attr:`text` instead of the terminal (LLVM's "'x' is not a recognized
    processor" lines are turned into one bluelower error by the caller)."""

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False
