"""Imports point one way (docs/ARCHITECTURE.md, "Layers"): every ``slimdiff`` import in the
package, top-level or inside a function, is checked against the layer table."""
from __future__ import annotations

import ast
from pathlib import Path

import slimdiff

ROOT = Path(slimdiff.__file__).parent

# module prefix -> prefixes it must never import (lazily or not); the longest matching prefix rules
ABOVE_STORAGE = ("slimdiff.compression", "slimdiff.methods", "slimdiff.bench", "slimdiff.cli")
FORBIDDEN = {
    "slimdiff.models": ABOVE_STORAGE + ("slimdiff.io", "slimdiff.runtime", "slimdiff.train", "slimdiff.eval"),
    "slimdiff.models.registry": ABOVE_STORAGE + ("slimdiff.runtime", "slimdiff.train", "slimdiff.eval"),  # names -> io.load
    "slimdiff.diffusion": ABOVE_STORAGE + ("slimdiff.io", "slimdiff.train", "slimdiff.eval"),
    "slimdiff.data": ABOVE_STORAGE + ("slimdiff.io", "slimdiff.runtime", "slimdiff.train", "slimdiff.eval"),
    "slimdiff.result": ABOVE_STORAGE + ("slimdiff.io",),
    "slimdiff.atomic": ABOVE_STORAGE + ("slimdiff.io",),
    "slimdiff.budget": ABOVE_STORAGE + ("slimdiff.io",),
    "slimdiff.io": ABOVE_STORAGE + ("slimdiff.runtime", "slimdiff.train"),
    "slimdiff.schema": ABOVE_STORAGE + ("slimdiff.runtime", "slimdiff.train"),
    "slimdiff.reproducible": ABOVE_STORAGE + ("slimdiff.runtime", "slimdiff.train"),
    "slimdiff.runtime": ABOVE_STORAGE + ("slimdiff.train", "slimdiff.io"),
    "slimdiff.train": ABOVE_STORAGE,
    "slimdiff.eval.compute": ABOVE_STORAGE,
    "slimdiff.eval.quality": ABOVE_STORAGE,
    "slimdiff.eval.judge": ABOVE_STORAGE,
    "slimdiff.eval.report": ABOVE_STORAGE,
    "slimdiff.eval.models": ABOVE_STORAGE,
    "slimdiff.compression": ("slimdiff.bench", "slimdiff.cli"),
}
# the methods layer's own modules that shared machinery may use (Context, record, recover, the spec types)
METHOD_CORE = ("slimdiff.methods.base", "slimdiff.methods.spec")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in found if n == "slimdiff" or n.startswith("slimdiff.")}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_imports_point_one_way():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = _module_name(path)
        prefixes = [p for p in FORBIDDEN if _under(mod, p)]
        rules = [FORBIDDEN[max(prefixes, key=len)]] if prefixes else []
        for imported in _imports(path):
            for rule in rules:
                hit = [p for p in rule if _under(imported, p)]
                if hit:
                    bad.append(f"{mod} imports {imported}")
            if _under(mod, "slimdiff.compression") and _under(imported, "slimdiff.methods") and not any(
                    _under(imported, c) for c in METHOD_CORE) and imported not in ("slimdiff.methods",):
                bad.append(f"{mod} imports the method module {imported}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_runtime_has_no_import_cycle():
    graph = {}
    for path in sorted((ROOT / "runtime").glob("*.py")):
        graph[_module_name(path)] = {i for i in _imports(path) if _under(i, "slimdiff.runtime") and i in
                                     {_module_name(p) for p in (ROOT / "runtime").glob("*.py")}}

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph.get(a, ()))

    cycles = [m for m in graph if reaches(m, m, {m})]
    assert not cycles, f"import cycle through {cycles}"
