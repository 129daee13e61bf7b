"""One kernel from several: the block-parallel linear kernels that read the same input.

A decoder layer calls three linear kernels on one normalized hidden state (q, k, v) and two
on another (gate, up). Each is one ``parallel`` region over its 32-row weight blocks: one
thread-pool launch and barrier each, and short weight streams (SmolLM2's k/v projections
are 6 blocks, 3 per thread). :func:`merge_block_parallel` builds one kernel that runs all
of them in a single parallel region::

    prologue_1; prologue_2; ...                      # each kernel's own (e.g. sums of x)
    for b in T.parallel(NB_1 + NB_2 + ...):
        if b < NB_1:          b_1 = b;          body_1     # each body exactly as it was,
        elif b < NB_1 + NB_2: b_2 = b - NB_1;   body_2     # its loop variable bound to
        else: ...                                          # its own block index

Parameters: every kernel's inputs in order, then every kernel's output (``call_tir``'s
destination-passing order for a tuple of outputs); an input the kernels share is passed
once per kernel. Each block runs the same statements on the same data as before, so the
outputs are bit-identical to the separate kernels' (tests/test_merge_linears.py).

Which kernels qualify is structural: a PrimFunc whose body is zero or more prologue
statements followed by one ``parallel`` loop from 0 (the form every block-parallel kernel
of this package has: ``linear.py``, ``linear_a8.py``); :func:`merge_block_parallel` says in
one line why another does not.
"""

from __future__ import annotations

import re

from tvm import tirx

LINEAR_KERNEL = re.compile(r"^(int4|int8)(_a8)?_linear_")
"""The ``bluelower.kernel`` names of the quantized linear kernels (``int4_linear``,
``int8_linear``, ``int4_a8_linear``, ``int8_a8_linear``): block-parallel over output rows."""


def activation_arity(kernel: str) -> int:
    """How many leading arguments of linear kernel ``kernel`` are the activation (the rest
    are its weights): ``x`` for the float-activation kernels, ``(xq, sx, xsum)`` for the
    int8-activation ones (``linear_a8.py``)."""
    return 3 if "_a8_" in kernel else 1


def _split(func: tirx.PrimFunc):
    """``(prologue statements, the parallel loop)`` of a block-parallel kernel, or a reason."""
    body = func.body
    stmts = list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]
    loop = stmts[-1] if stmts else None
    if not isinstance(loop, tirx.For) or loop.kind != tirx.ForKind.PARALLEL:
        return "its body does not end in one parallel loop"
    if not isinstance(loop.min, tirx.IntImm) or int(loop.min) != 0 or not isinstance(loop.extent, tirx.IntImm):
        return "its parallel loop does not run over a constant range from 0"
    if any(isinstance(s, tirx.For) and s.kind == tirx.ForKind.PARALLEL for s in stmts[:-1]):
        return "it has more than one parallel loop"
    return stmts[:-1], loop


def _distinct(funcs) -> list:
    """``funcs`` with a fresh copy (its own buffers and variables) of every function that
    appears twice (equal-shape kernels are one cached object: k and v): one PrimFunc must
    define each buffer once."""
    from tvm.s_tir import renew_defs

    out = []
    for f in funcs:
        out.append(renew_defs(f) if any(f.same_as(g) for g in out) else f)
    return out


def _parts(funcs):
    """``(funcs with distinct definitions, [(prologue, parallel loop)])``, or the one-line
    reason the first kernel that is not block-parallel gives."""
    funcs = _distinct(funcs)
    parts = []
    for f in funcs:
        split = _split(f)
        if isinstance(split, str):
            kernel = f.attrs["bluelower.kernel"] if f.attrs is not None and "bluelower.kernel" in f.attrs else "a kernel"
            return f"{kernel}: {split}"
        parts.append(split)
    return funcs, parts


def _body(prologue: list, loop):
    return tirx.SeqStmt(list(prologue) + [loop]) if prologue else loop


def merge_block_parallel(funcs, name: str):
    """One PrimFunc running every kernel of ``funcs`` (each: inputs..., one output) in a
    single parallel region (module docstring), tagged ``bluelower.kernel = name`` and
    ``bluelower.merged`` (the kernels' names); or a one-line reason it cannot."""
    found = _parts(funcs)
    if isinstance(found, str):
        return found
    funcs, parts = found
    dtype = str(parts[0][1].loop_var.ty)
    if any(str(loop.loop_var.ty) != dtype for _p, loop in parts):
        return "the kernels' block indices have different types"
    b = tirx.Var("b", dtype)
    offsets, total = [], 0
    for _p, loop in parts:
        offsets.append(total)
        total += int(loop.extent)
    branch = None
    for (_p, loop), off in reversed(list(zip(parts, offsets))):
        own = tirx.SeqStmt([tirx.stmt.Bind(loop.loop_var, b - tirx.IntImm(dtype, off) if off else b), loop.body])
        branch = own if branch is None else tirx.IfThenElse(b < tirx.IntImm(dtype, off + int(loop.extent)), own, branch)
    loop = tirx.For(b, tirx.IntImm(dtype, 0), tirx.IntImm(dtype, total), tirx.ForKind.PARALLEL, branch)
    body = _body([s for p, _l in parts for s in p], loop)
    inputs = [p for f in funcs for p in list(f.params)[:-1]]
    outputs = [list(f.params)[-1] for f in funcs]
    kernels = [str(f.attrs["bluelower.kernel"]) for f in funcs]
    out = tirx.PrimFunc(inputs + outputs, body, funcs[0].ret_type, funcs[0].attrs)
    return out.with_attr("bluelower.kernel", name).with_attr("bluelower.merged", kernels)


def merge_gated_pair(gate: tirx.PrimFunc, up: tirx.PrimFunc, name: str, act: str = "silu"):
    """One PrimFunc for a gated MLP's two projections and its activation: each parallel
    iteration ``b`` runs block ``b`` of ``gate``, block ``b`` of ``up``, then for those rows
    ``h = (g * sigmoid(g)) * u`` (SiLU; the elementwise kernel TVM legalizes
    ``silu(g) * u`` to computes the same three float32 operations in the same order, with
    the same ``sigmoid``). Parameters: ``gate``'s inputs, ``up``'s inputs, then the outputs
    ``g``, ``u`` and ``h``. Both kernels must be block-parallel over the same blocks of the
    same output shape; otherwise a one-line reason."""
    if act != "silu":
        return f"activation {act!r}: only silu is fused"
    found = _parts([gate, up])
    if isinstance(found, str):
        return found
    (gate, up), ((pg, lg), (pu, lu)) = found
    yg, yu = gate.params[-1], up.params[-1]
    shape = [int(d) for d in yg.shape]
    if [int(d) for d in yu.shape] != shape or len(shape) != 2 or str(yg.dtype) != "float32" \
            or str(yu.dtype) != "float32":
        return "gate and up outputs differ in shape or are not float32 [M, N]"
    if int(lg.extent) != int(lu.extent) or shape[1] % int(lg.extent) != 0 or str(lg.loop_var.ty) != str(lu.loop_var.ty):
        return "gate and up are not parallel over the same row blocks"
    dtype = str(lg.loop_var.ty)
    rows = shape[1] // int(lg.extent)
    b, m, r = tirx.Var("b", dtype), tirx.Var("m", dtype), tirx.Var("r", dtype)
    h = tirx.decl_buffer(yg.shape, "float32", "h")
    n = b * tirx.IntImm(dtype, rows) + r
    g = yg[m, n]
    epilogue = tirx.For(m, tirx.IntImm(dtype, 0), tirx.IntImm(dtype, shape[0]), tirx.ForKind.SERIAL,
                        tirx.For(r, tirx.IntImm(dtype, 0), tirx.IntImm(dtype, rows), tirx.ForKind.SERIAL,
                                 tirx.BufferStore(h, (g * tirx.sigmoid(g)) * yu[m, n], [m, n])))
    iteration = tirx.SeqStmt([tirx.stmt.Bind(lg.loop_var, b), lg.body, tirx.stmt.Bind(lu.loop_var, b), lu.body, epilogue])
    loop = tirx.For(b, tirx.IntImm(dtype, 0), lg.extent, tirx.ForKind.PARALLEL, iteration)
    body = _body(list(pg) + list(pu), loop)
    params = list(gate.params)[:-1] + list(up.params)[:-1] + [yg, yu, h]
    kernels = [str(gate.attrs["bluelower.kernel"]), str(up.attrs["bluelower.kernel"])]
    out = tirx.PrimFunc(params, body, gate.ret_type, gate.attrs)
    return out.with_attr("bluelower.kernel", name).with_attr("bluelower.merged", kernels + [act])
