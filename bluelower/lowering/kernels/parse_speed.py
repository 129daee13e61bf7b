"""Faster TVMScript parsing of the kernels the passes build.

TVM's ``@T.prim_func`` decorator calls ``inspect.stack()`` on every use to capture the
caller's frames. ``inspect.stack()`` reads the source line of *every* frame on the stack
(``findsource`` -> ``getmodule``, a scan of ``sys.modules``), which inside a pass
pipeline (deep stacks, torch and TVM loaded) is most of a kernel's parse time: 19.9 s of
the ~35 s the 26 kernel parses of the 3B ``inspect memory`` run took (cProfile, loaded
host).

The frames serve two purposes: the locals of enclosing frames (closure variables, string
annotations) and the caller's *source line*, to detect a ``@T.prim_func`` written inside
an ``@I.ir_module`` class body. bluelower's kernel builders are plain functions (none is
written in a class body), so while :func:`fast_prim_func_frames` is active the decorator
gets ``inspect.stack(0)``: the same frames and locals, without reading source lines. The
parsed PrimFuncs are identical (``tests/test_memory_cache.py`` compares a whole pipeline
with and without it). Only the parser module's own ``inspect`` reference is swapped, for
the duration of the ``with`` block; do not parse ``@I.ir_module`` classes inside it.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import types

_lock = threading.RLock()


def _shim() -> types.ModuleType:
    shim = types.ModuleType("inspect")
    shim.__dict__.update(inspect.__dict__)
    shim.stack = lambda context=1: inspect.stack(0)
    return shim


@contextlib.contextmanager
def fast_prim_func_frames():
    """Within the block, ``@T.prim_func`` captures frames without reading source lines."""
    from tvm.tirx.script.parser import entry

    with _lock:
        saved = entry.inspect
        entry.inspect = _shim()
        try:
            yield
        finally:
            entry.inspect = saved
