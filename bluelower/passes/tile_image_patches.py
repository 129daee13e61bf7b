"""TileImagePatches: split the vision encoder at its patch-embedding Conv2D.

BlueLM-V runs the SigLIP patch-embedding Conv2D on a CPU cluster and the transformer
blocks on the APU, overlapping batch k+1's Conv2D with batch k's blocks. For a scheduler
to place the two stages on different units they must be separate functions.

Requires: an entry function (the ModelSpec's ``image_entry``) whose body is one dataflow block
holding exactly one ``relax.nn.conv2d``, whose leading ``num_input`` parameters are run-time
inputs and the rest weights (named by the ``bluelower.param_names`` attribute); the patch
batch B is already static in its input shape (the importer traces ``runtime.image_batch``).

Ensures: two new functions, ``<entry>_embed(pixel_values, *conv weights) -> conv output
[B, C, g, g]`` and ``<entry>_blocks(patch_embeddings, *other weights) -> image tokens``,
each with ``num_input = 1`` and its own ``bluelower.param_names``; composing them computes
exactly the original function (the original stays, for runtimes that encode in one call).
Stats: ``split`` (functions split), ``embed_bindings``, ``blocks_bindings``.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .instruments import with_stats
from .ir_utils import param_names

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")


def _make_function(params, bindings, ret_var, attrs: dict) -> relax.Function:
    out = relax.Var("out", ret_var.ty)
    block = relax.DataflowBlock(list(bindings) + [relax.VarBinding(out, ret_var)])
    func = relax.Function(params, relax.SeqExpr([block], out), ret_var.ty, True)
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    return relax.utils.copy_with_new_vars(func)


def split_at_conv2d(func: relax.Function, name: str):
    """Return ``(embed_fn, blocks_fn)`` or None when ``func`` does not have the expected form."""
    body = func.body
    if not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1:
        return None
    bindings = list(body.blocks[0].bindings)
    convs = [i for i, b in enumerate(bindings) if isinstance(b.value, relax.Call) and b.value.op.same_as(_CONV2D)]
    if len(convs) != 1:
        return None
    conv_index = convs[0]
    conv_var = bindings[conv_index].var
    num_input = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else 1
    if num_input != 1:
        return None
    names = param_names(func)
    weights = list(func.params[num_input:])

    # backward slice of the conv output
    slice_idx = []
    wanted = {conv_var}
    for i in range(conv_index, -1, -1):
        b = bindings[i]
        if b.var in wanted:
            slice_idx.append(i)
            for v in relax.analysis.free_vars(b.value):
                wanted.add(v)
    slice_idx.reverse()
    stage1 = [bindings[i] for i in slice_idx]
    stage1_vars = {b.var for b in stage1}
    stage2 = [b for i, b in enumerate(bindings) if i not in set(slice_idx)]
    for b in stage2:  # stage 2 may only use the conv output from stage 1
        if any(v in stage1_vars and not v.same_as(conv_var) for v in relax.analysis.free_vars(b.value)):
            return None
    used1 = {v for b in stage1 for v in relax.analysis.free_vars(b.value)}
    used2 = {v for b in stage2 for v in relax.analysis.free_vars(b.value)} | set(relax.analysis.free_vars(body.body))
    if any(p in used2 for p in func.params[:num_input]):
        return None

    def pick(used):
        ws = [w for w in weights if w in used]
        return ws, [names[weights.index(w)] for w in ws] if names else []

    w1, n1 = pick(used1)
    w2, n2 = pick(used2)
    embed = _make_function(
        [func.params[0], *w1], stage1, conv_var,
        {"global_symbol": f"{name}_embed", "num_input": 1, "bluelower.param_names": n1},
    )
    emb_param = relax.Var("patch_embeddings", conv_var.ty)
    # the conv's DataflowVar is re-bound to the new parameter (CanonicalizeBindings folds it)
    blocks = _make_function(
        [emb_param, *w2], [relax.VarBinding(conv_var, emb_param), *stage2], body.body,
        {"global_symbol": f"{name}_blocks", "num_input": 1, "bluelower.param_names": n2},
    )
    return embed, blocks, len(stage1), len(stage2)


@tvm.transform.module_pass(opt_level=0, name="TileImagePatches")
class TileImagePatches:
    """Split ``encode_image`` into a Conv2D stage and a transformer-blocks stage."""

    def __init__(self, entry: str):
        self.entry = entry  # the image entry (the ModelSpec's image_entry)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.entry not in [gv.name_hint for gv in mod.get_global_vars()]:
            return with_stats(mod, "TileImagePatches", split=0)
        result = split_at_conv2d(mod[self.entry], self.entry)
        if result is None:
            return with_stats(mod, "TileImagePatches", split=0, reason="no single conv2d with a separable backward slice")
        embed, blocks, n1, n2 = result
        mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions))
        mod[f"{self.entry}_embed"] = embed
        mod[f"{self.entry}_blocks"] = blocks
        return with_stats(mod, "TileImagePatches", split=1, embed_bindings=n1, blocks_bindings=n2)
