"""LegalizeOps with one legalization per distinct call.

TVM's ``LegalizeOps`` legalizes every operator call on its own: ``call_te`` builds a TE
compute, turns it into a PrimFunc and asks the module for an equal one it already holds. A
32-layer decoder makes the same calls thousands of times (the 3B on the Dimensity 9300:
16,856 calls, 6,602 of them ``astype`` rounding to the APU's fp16, ~135 distinct kernels),
and that was 7.5 s of a compile.

This pass runs TVM's ``LegalizeOps`` with every operator's own legalization wrapped by a
cache: a call whose operator, attributes and arguments' types (every argument a variable
of a static-shape tensor type) match one already legalized into ``R.call_tir(f, args)``
reuses ``f`` for its own arguments. Anything else (constants, symbolic shapes, a result
that is not a plain ``call_tir`` of the call's own arguments) is legalized by TVM as
before. The module is the one ``LegalizeOps`` makes (tests/test_legalize_cache.py: structural
equality on the tiny model's pipeline before LegalizeOps, fp32 and quantized, host and the
Dimensity 9300).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax

from .instruments import with_stats
from .ir_utils import dtype_of, static_shape

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _static_tensor(arg) -> tuple | None:
    if not isinstance(arg, relax.Var):
        return None
    shape = static_shape(arg)
    return None if shape is None else (shape, dtype_of(arg))


def _key(call: relax.Call):
    args = [_static_tensor(a) for a in call.args]
    if any(a is None for a in args):
        return None
    attrs = None if call.attrs is None else tvm_ffi.structural_hash(call.attrs)
    ty_args = tuple(tvm_ffi.structural_hash(s) for s in call.ty_args)
    return (call.op.name, attrs, tuple(args), ty_args)


def _reusable(call: relax.Call, out) -> bool:
    """``out`` is ``R.call_tir(f, (call's args, in order), out_sinfo)`` with no TIR vars."""
    if not (isinstance(out, relax.Call) and out.op.same_as(_CALL_TIR) and len(out.args) == 2):
        return False
    args = out.args[1]
    return isinstance(args, relax.Tuple) and len(args.fields) == len(call.args) and all(
        a.same_as(b) for a, b in zip(args.fields, call.args))


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and tvm_ffi.structural_equal(a, b))


def _cached(legalize, stats: dict):
    seen: dict = {}

    def run(bb, call):
        key = _key(call)
        hit = seen.get(key) if key is not None else None
        # the key holds hashes: a hit is checked against the call it was made for
        if hit is not None and _same(hit["attrs"], call.attrs) and len(hit["ty_args"]) == len(call.ty_args) and all(
                _same(a, b) for a, b in zip(hit["ty_args"], call.ty_args)):
            stats["reused"] += 1
            return relax.Call(_CALL_TIR, [hit["gv"], relax.Tuple(list(call.args))], hit["out_attrs"],
                              hit["out_ty_args"])
        out = legalize(bb, call)
        stats["legalized"] += 1
        if key is not None and key not in seen and _reusable(call, out):
            seen[key] = {"gv": out.args[0], "out_attrs": out.attrs, "out_ty_args": list(out.ty_args),
                         "attrs": call.attrs, "ty_args": list(call.ty_args)}
        return out

    return run


def _ops_in(mod: tvm.IRModule) -> set:
    names = set()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            names.add(e.op.name)

    for _gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return names


@tvm.transform.module_pass(opt_level=0, name="LegalizeOps")
class CachedLegalizeOps:
    """``relax.transform.LegalizeOps()``, each distinct call legalized once (run it in the
    target's scope, as LegalizeOps)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        stats = {"legalized": 0, "reused": 0}
        custom = {}
        for name in sorted(_ops_in(mod)):
            op = tvm.ir.Op.get(name)
            legalize = op.get_attr("FLegalize")
            if legalize is not None:
                custom[name] = _cached(legalize, stats)
        out = relax.transform.LegalizeOps(customize_legalize_map=custom)(mod)
        return with_stats(out, "LegalizeOps", **stats)
