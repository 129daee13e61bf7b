"""The package's layering, checked from the code's own imports (docs/architecture.md,
"What each folder may import"): every import of a bluelower module, at module level or
inside a function, goes from a layer to one it may use; no import cycle between modules;
no private name (``_x``) imported from another module."""

from __future__ import annotations

import ast
import os

import networkx as nx

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bluelower")

# layer -> module prefixes (longest prefix wins)
LAYERS = {
    "base": ("bluelower", "bluelower.errors", "bluelower.progress", "bluelower.cache", "bluelower.jobs", "bluelower.files"),
    "targets": ("bluelower.targets",),
    "kernels": ("bluelower.lowering.kernels",),
    "models": ("bluelower.lowering.models",),
    "image": ("bluelower.runtime_stubs.image", "bluelower.runtime_stubs.text"),
    "frontend": ("bluelower.lowering.frontend",),
    "quant": ("bluelower.lowering.quant",),
    "passes": ("bluelower.passes",),
    "bundle": ("bluelower.lowering.artifacts.bundle",),
    "artifacts": ("bluelower.lowering.artifacts",),
    "runtime": ("bluelower.runtime_stubs",),
    "reports": ("bluelower.reports",),
    "api": ("bluelower.api",),
    "cli": ("bluelower.cli",),
}

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "base": set(),
    "targets": {"base"},
    "kernels": {"base"},
    "models": {"base"},
    "image": {"base"},
    "frontend": {"base", "models"},
    "quant": {"base", "kernels", "models", "frontend", "image"},  # image: the tokenizer (a leaf), for calibration text
    "passes": {"base", "kernels", "quant", "targets", "image"},
    "bundle": {"base"},
    "artifacts": {"base", "bundle", "models", "frontend", "quant", "kernels", "passes", "targets", "image"},
    "runtime": {"base", "bundle", "models", "frontend", "quant", "kernels", "image"},
    "reports": {"base", "bundle", "models", "frontend", "quant", "kernels", "passes", "targets", "image", "artifacts",
                "runtime"},
    "api": set(LAYERS) - {"api", "cli"},
    "cli": {"base", "api", "quant", "targets", "reports", "passes"},
}


def layer_of(module: str) -> str:
    best = max((p for prefixes in LAYERS.values() for p in prefixes if module == p or module.startswith(p + ".")),
               key=len)
    return next(name for name, prefixes in LAYERS.items() if best in prefixes)


def modules() -> dict:
    """module name -> (path, is package)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                pkg = rel.endswith(".__init__")
                out[rel[: -len(".__init__")] if pkg else rel] = (path, pkg)
    return out


def imports(mods: dict):
    """``(importer, imported module, names, line)`` for every bluelower import."""
    for mod, (path, pkg) in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("bluelower"):
                        yield mod, a.name, [], node.lineno
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("bluelower"):
                    continue
                names = [a.name for a in node.names]
                # "from pkg import submodule" imports the submodule
                subs = [n for n in names if f"{target}.{n}" in mods]
                for n in subs:
                    yield mod, f"{target}.{n}", [], node.lineno
                rest = [n for n in names if n not in subs]
                if rest or not subs:
                    yield mod, target, rest, node.lineno


def test_every_import_follows_the_layering():
    mods = modules()
    bad = []
    for src, dst, _names, line in imports(mods):
        a, b = layer_of(src), layer_of(dst)
        if a != b and b not in ALLOWED[a]:
            bad.append(f"{src}:{line} ({a}) imports {dst} ({b})")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_no_import_cycle():
    mods = modules()
    g = nx.DiGraph()
    for src, dst, _names, _line in imports(mods):
        if dst in mods and dst != src and not (mods[dst][1] and src.startswith(dst + ".")):
            g.add_edge(src, dst)  # a package's own __init__ importing its modules is not a cycle back
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_no_private_name_crosses_modules():
    mods = modules()
    bad = [f"{src}:{line} imports {n} from {dst}" for src, dst, names, line in imports(mods) for n in names
           if n.startswith("_") and not n.startswith("__") and dst != src]
    assert not bad, "\n".join(bad)


def test_layers_cover_the_package():
    for mod in modules():
        assert layer_of(mod) in ALLOWED, mod
