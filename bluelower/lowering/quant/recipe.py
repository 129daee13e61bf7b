"""Quantization recipes as data: which stored format each weight gets, by rules.

A recipe is an ordered list of rules plus the KV-cache format. For each weight the
compiler (or the evaluation harness) asks :meth:`Recipe.format_for` with the weight's
checkpoint name, its role (the ModelSpec's ``weight_role``) and its use (``"linear"``:
a matmul, ``"table"``: embedding lookups); the **first** rule whose selectors all match
gives the format. A weight no rule matches stays fp32.

Rule-file schema (JSON, or TOML with ``[[rules]]`` tables; unknown keys are errors)::

    {
      "description": "free text (optional)",
      "kv_cache": "int8",                    # "float32" (default) | "int8"
      "rules": [
        {"role": "lm_head", "format": "int8"},
        {"match": "model.layers.*.mlp.down_proj.weight", "layers": [0, 1], "format": "int8"},
        {"role": ["attention", "mlp"], "format": "int4", "group_size": 32,
         "search": true, "method": "gptq"}
      ]
    }

Selectors (all optional; a rule with none matches every weight):

* ``match``: a glob (:mod:`fnmatch`, ``*`` also crosses dots) or a list of globs on the
  checkpoint name (``model.layers.3.self_attn.q_proj.weight``);
* ``role``: a role or a list of roles (:data:`~bluelower.lowering.quant.modes.ROLES`).
  ``lm_head`` is *the weight the logits are computed with*: an untied ``lm_head.weight``,
  or the token table's linear use when the head is tied (the compiler stores a separate
  blocked copy of the table for the logits); ``embedding`` is the table's lookups;
* ``use``: ``"linear"`` or ``"table"``;
* ``layers``: a list of decoder layer indices (the ``N`` of ``.layers.N.`` in the name).

Format fields: ``format`` (required): ``fp32``, ``int4`` (symmetric group-wise, GGUF
Q4_0's rule), ``int4_asym`` (scale + min per group, Q4_1's), ``int8`` (per output channel
/ per table row), ``int8_group`` (per group, Q8_0's); ``group_size`` (grouped formats,
default 32, a positive multiple of 4); ``search`` (INT4 only: the error-minimizing scale /
clip search of ``kernels/quant.py``); ``method``: ``"rtn"`` (default) or ``"gptq"``
(calibrated, linear uses only: :mod:`bluelower.lowering.quant.gptq`). Every error is one
line naming the file, the rule and the field.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field

from ...errors import BlueLowerError
from .modes import DEFAULT_GROUP_SIZE, ROLES

FORMAT_KINDS = ("fp32", "int4", "int4_asym", "int8", "int8_group")
GROUPED_KINDS = ("int4", "int4_asym", "int8_group")
METHODS = ("rtn", "gptq")
USES = ("linear", "table")
KV_CACHE_FORMATS = ("float32", "int8")

_SELECTORS = ("match", "role", "use", "layers")
_FORMAT_FIELDS = ("format", "group_size", "search", "method")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored and how its codes are chosen.

    ``kind`` one of :data:`FORMAT_KINDS`; ``group_size`` only for grouped kinds (0
    otherwise); ``search`` only for INT4 kinds; ``method`` ``rtn`` or ``gptq``."""

    kind: str
    group_size: int = 0
    search: bool = False
    method: str = "rtn"

    @property
    def quantized(self) -> bool:
        return self.kind != "fp32"

    def label(self) -> str:
        """A short name for tables: ``int4_asym/g32+search+gptq``."""
        if not self.quantized:
            return "fp32"
        out = self.kind + (f"/g{self.group_size}" if self.group_size else "")
        return out + ("+search" if self.search else "") + ("+gptq" if self.method == "gptq" else "")


FP32 = WeightFormat("fp32")


def weight_format(kind: str, group_size: int | None = None, search: bool = False, method: str = "rtn",
                  where: str = "weight format") -> WeightFormat:
    """A checked :class:`WeightFormat` (``group_size`` None: the default 32 for grouped kinds).
    Raises :class:`BlueLowerError` naming ``where`` on an unknown kind / method, a bad group
    size, ``search`` on a non-INT4 kind or ``gptq`` on fp32."""
    if kind not in FORMAT_KINDS:
        raise BlueLowerError(f"{where}: unknown format {kind!r} (valid: {', '.join(FORMAT_KINDS)})")
    if method not in METHODS:
        raise BlueLowerError(f"{where}: unknown method {method!r} (valid: {', '.join(METHODS)})")
    if not isinstance(search, bool):
        raise BlueLowerError(f"{where}: search must be true or false, got {search!r}")
    if kind in GROUPED_KINDS:
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 4:
            raise BlueLowerError(f"{where}: group_size must be a positive multiple of 4, got {group_size!r}")
    elif group_size is not None:
        raise BlueLowerError(f"{where}: format {kind!r} has no group_size (per channel / row)")
    else:
        group_size = 0
    if search and not kind.startswith("int4"):
        raise BlueLowerError(f"{where}: search applies to int4 / int4_asym only, not {kind!r}")
    if method == "gptq" and kind not in GROUPED_KINDS:
        raise BlueLowerError(f"{where}: method 'gptq' needs a group-wise format ({', '.join(GROUPED_KINDS)}), "
                             f"not {kind!r}")
    return WeightFormat(kind, group_size, search, method)


@dataclass(frozen=True)
class Rule:
    """Selectors (None: any) and the format of the weights they select."""

    format: WeightFormat
    match: tuple = ()
    roles: tuple = ()
    use: str | None = None
    layers: tuple = ()

    def selects(self, name: str, role: str, use: str) -> bool:
        if self.match and not any(fnmatch.fnmatchcase(name, g) for g in self.match):
            return False
        if self.roles and role not in self.roles:
            return False
        if self.use is not None and use != self.use:
            return False
        if self.layers:
            m = _LAYER.search(name)
            if m is None or int(m.group(1)) not in self.layers:
                return False
        return True


@dataclass(frozen=True)
class Recipe:
    """Ordered rules (first match wins) and the KV-cache format."""

    rules: tuple = ()
    kv_cache: str = "float32"
    description: str = ""
    source: str = field(default="<rules>", compare=False)
    sha256: str | None = field(default=None, compare=False)  # of the rule file it was read from

    def format_for(self, name: str, role: str, use: str = "linear") -> WeightFormat:
        """The format of weight ``name`` (checkpoint name) of ModelSpec role ``role`` in
        ``use`` (``linear`` | ``table``). The token table's linear use (a tied head) is
        matched as role ``lm_head``. A weight no rule selects, or a table whose rule asks
        for ``gptq``, gets: fp32 / the rule's format with ``method`` ``rtn`` (lookups are
        not calibrated)."""
        if use not in USES:
            raise ValueError(f"use must be one of {USES}, got {use!r}")
        if role == "embedding" and use == "linear":
            role = "lm_head"
        for rule in self.rules:
            if rule.selects(name, role, use):
                fmt = rule.format
                if use == "table" and fmt.method == "gptq":
                    fmt = WeightFormat(fmt.kind, fmt.group_size, fmt.search, "rtn")
                return fmt
        return FP32

    @property
    def uses_gptq(self) -> bool:
        return any(r.format.method == "gptq" for r in self.rules)

    def to_data(self) -> dict:
        """The rule-file form (JSON-ready) of this recipe."""
        rules = []
        for r in self.rules:
            d: dict = {}
            if r.match:
                d["match"] = list(r.match) if len(r.match) > 1 else r.match[0]
            if r.roles:
                d["role"] = list(r.roles) if len(r.roles) > 1 else r.roles[0]
            if r.use:
                d["use"] = r.use
            if r.layers:
                d["layers"] = list(r.layers)
            d["format"] = r.format.kind
            if r.format.group_size:
                d["group_size"] = r.format.group_size
            if r.format.search:
                d["search"] = True
            if r.format.method != "rtn":
                d["method"] = r.format.method
            rules.append(d)
        out = {"description": self.description} if self.description else {}
        return {**out, "kv_cache": self.kv_cache, "rules": rules}


def _strings(value, what: str, where: str, valid=None) -> tuple:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise BlueLowerError(f"{where}: {what} must be a string or a non-empty list of strings, got {value!r}")
    for v in items:
        if valid is not None and v not in valid:
            raise BlueLowerError(f"{where}: unknown {what} {v!r} (valid: {', '.join(valid)})")
    return tuple(items)


def rule_from_data(data, where: str) -> Rule:
    """One rule from its dict form; one-line :class:`BlueLowerError` naming ``where``."""
    if not isinstance(data, dict):
        raise BlueLowerError(f"{where}: a rule must be an object/table, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SELECTORS) - set(_FORMAT_FIELDS))
    if unknown:
        raise BlueLowerError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(_SELECTORS + _FORMAT_FIELDS)})")
    if "format" not in data:
        raise BlueLowerError(f"{where}: missing 'format' (one of {', '.join(FORMAT_KINDS)})")
    if not isinstance(data["format"], str):
        raise BlueLowerError(f"{where}: format must be a string, got {data['format']!r}")
    fmt = weight_format(data["format"], data.get("group_size"), data.get("search", False),
                        data.get("method", "rtn"), where)
    match = _strings(data["match"], "match", where) if "match" in data else ()
    roles = _strings(data["role"], "role", where, ROLES) if "role" in data else ()
    use = data.get("use")
    if use is not None and use not in USES:
        raise BlueLowerError(f"{where}: unknown use {use!r} (valid: {', '.join(USES)})")
    layers = data.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in layers):
        raise BlueLowerError(f"{where}: layers must be a list of layer indices (integers >= 0), got {layers!r}")
    return Rule(fmt, match, roles, use, tuple(layers))


def recipe_from_data(data, source: str = "<rules>") -> Recipe:
    """A :class:`Recipe` from the rule-file structure (a dict with ``rules``, or a bare list
    of rules). One-line :class:`BlueLowerError` naming ``source`` and the rule on any error."""
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict):
        raise BlueLowerError(f"{source}: expected an object with 'rules' (or a list of rules)")
    unknown = sorted(set(data) - {"rules", "kv_cache", "description"})
    if unknown:
        raise BlueLowerError(f"{source}: unknown key {unknown[0]!r} (valid: rules, kv_cache, description)")
    rules = data.get("rules")
    if not isinstance(rules, list):
        raise BlueLowerError(f"{source}: 'rules' must be a list of rules")
    kv = data.get("kv_cache", "float32")
    if kv not in KV_CACHE_FORMATS:
        raise BlueLowerError(f"{source}: unknown kv_cache {kv!r} (valid: {', '.join(KV_CACHE_FORMATS)})")
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise BlueLowerError(f"{source}: description must be a string")
    parsed = tuple(rule_from_data(r, f"{source}: rule {i + 1}") for i, r in enumerate(rules))
    return Recipe(parsed, kv, desc, source)


def load_recipe(path: str) -> Recipe:
    """Read a rule file (``.json``, or ``.toml`` with ``[[rules]]``). Raises a one-line
    :class:`BlueLowerError` for a missing / unreadable / malformed file or any bad rule."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise BlueLowerError(f"cannot read quantization rules {path}: {exc.strerror or exc}") from None
    if path.endswith(".toml"):
        import tomllib

        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BlueLowerError(f"{name}: not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BlueLowerError(f"{name}: not valid JSON: {exc}") from None
    import dataclasses
    import hashlib

    return dataclasses.replace(recipe_from_data(data, name), sha256=hashlib.sha256(raw).hexdigest())


def uniform_recipe(decoder: WeightFormat, table: WeightFormat | None = None, lm_head: WeightFormat | None = None,
                   vision: WeightFormat | None = None, kv_cache: str = "float32", description: str = "") -> Recipe:
    """The recipe of a ``--quant`` mode shape: one format for the decoder linears, optionally
    others for the token table's lookups, the logits' weight (default: as the table's linear
    copy, i.e. ``decoder``) and the vision tower / projector (default: ``int8``)."""
    rules = []
    if lm_head is not None:
        rules.append(Rule(lm_head, roles=("lm_head",)))
    if table is not None:
        rules.append(Rule(table, roles=("embedding",), use="table"))
    rules.append(Rule(vision or weight_format("int8"), roles=("vision", "projector")))
    rules.append(Rule(decoder, roles=("attention", "mlp", "lm_head", "embedding")))
    return Recipe(tuple(rules), kv_cache, description)


#: The default recipes, in the rule-file form. ``w4a16kv8`` measured on SmolLM2-135M
#: (``benchmarks/quant_recipe.py``): the lm_head is the one weight INT4 cannot take (alone in
#: INT4 it costs 14 % perplexity, the token table's lookups 3 %), asymmetric INT4 with the
#: search is the best 4-bit format at group 32 on both the checkpoint's weights and a rotated
#: (off-grid) equivalent; GPTQ (``"method": "gptq"``) is opt-in: it needs calibration text.
DEFAULT_RULES = {
    "w8": {
        "description": "INT8 per output channel / per row everywhere",
        "kv_cache": "float32",
        "rules": [{"role": ["attention", "mlp", "lm_head", "embedding", "vision", "projector"], "format": "int8"}],
    },
    "w4a16kv8": {
        "description": "decoder linears and the token table's lookups INT4 asymmetric group 32 with the scale/clip "
                       "search; the logits' weight (lm_head, also when tied) INT8 per row; vision INT8; INT8 KV cache",
        "kv_cache": "int8",
        "rules": [{"role": "lm_head", "format": "int8"},
                  {"role": "embedding", "use": "table", "format": "int4_asym", "group_size": 32, "search": True},
                  {"role": ["vision", "projector"], "format": "int8"},
                  {"role": ["attention", "mlp"], "format": "int4_asym", "group_size": 32, "search": True}],
    },
}
DEFAULT_RULES["w4a16"] = {**DEFAULT_RULES["w4a16kv8"], "kv_cache": "float32",
                          "description": DEFAULT_RULES["w4a16kv8"]["description"].removesuffix("; INT8 KV cache")}
# the a8 modes store the same weights (linear_a8 has kernels for every format: int4, int4_asym,
# int8, int8_group); fp32 quantizes nothing
DEFAULT_RULES["w4a8"] = {**DEFAULT_RULES["w4a16"]}
DEFAULT_RULES["w4a8kv8"] = {**DEFAULT_RULES["w4a16kv8"]}
DEFAULT_RULES["w8a8"] = {**DEFAULT_RULES["w8"]}
DEFAULT_RULES["fp32"] = {"description": "every weight fp32", "kv_cache": "float32", "rules": []}


def default_recipe(mode: str) -> Recipe:
    """The default recipe of a ``--quant`` mode (:data:`DEFAULT_RULES`): what ``compile``
    stores each weight as without ``--recipe``."""
    if mode not in DEFAULT_RULES:
        raise BlueLowerError(f"no default quantization recipe for '{mode}' (have: {', '.join(DEFAULT_RULES)})")
    return recipe_from_data(DEFAULT_RULES[mode], f"default recipe {mode}")


def with_group_size(recipe: Recipe, group_size: int) -> Recipe:
    """``recipe`` with every group-wise format at ``group_size`` (``CompileRequest.group_size``
    on a default recipe)."""
    import dataclasses

    weight_format(FORMAT_KINDS[1], group_size, where="group size")  # checked: a positive multiple of 4
    rules = tuple(dataclasses.replace(r, format=dataclasses.replace(r.format, group_size=group_size))
                  if r.format.kind in GROUPED_KINDS else r for r in recipe.rules)
    return dataclasses.replace(recipe, rules=rules)


def calibrated_recipe(recipe: Recipe, roles: tuple = ("attention", "mlp"), keep_rtn: tuple = ()) -> Recipe:
    """``recipe`` with method ``gptq`` for the weights of ``roles`` its rules store in a
    group-wise format (linear uses): ``compile --calibration`` without ``--recipe``.

    Each such rule is preceded by a copy restricted to ``roles`` with method ``gptq`` (the rule
    itself stays for its other roles, and is dropped when it has no other), and, for a rule
    without ``match``, by one copy per glob of ``keep_rtn`` that keeps round-to-nearest for the
    weights it matches. Every weight keeps the format the recipe gives it.

    All decoder linears by default: on SmolLM2-135M with its residual stream rotated (weights
    off any grid; ``benchmarks/quant_recipe.py --rotated``) the ``w4a16kv8`` default recipe
    gives 2.70 x fp32 perplexity round-to-nearest, 1.39 x with GPTQ on every decoder linear and
    1.86 x with v_proj kept round-to-nearest (``keep_rtn=("model.layers.*.self_attn.v_proj.weight",)``)."""
    import dataclasses

    rules = []
    for r in recipe.rules:
        wanted = tuple(x for x in (r.roles or roles) if x in roles)
        if wanted and r.format.kind in GROUPED_KINDS and r.format.method != "gptq" and r.use in (None, "linear"):
            if not r.match:
                rules.extend(dataclasses.replace(r, match=(glob,), roles=wanted) for glob in keep_rtn)
            rules.append(dataclasses.replace(r, roles=wanted, format=dataclasses.replace(r.format, method="gptq")))
            if r.roles and set(r.roles) <= set(roles):
                continue  # every weight it selects is selected by the copies first
        rules.append(r)
    what = "GPTQ on the decoder linears" + (f" (round-to-nearest: {', '.join(keep_rtn)})" if keep_rtn else "")
    desc = f"{recipe.description}; {what}" if recipe.description else what
    return dataclasses.replace(recipe, rules=tuple(rules), description=desc)
