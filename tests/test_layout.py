"""The package's architecture as docs/design.md states it ("Layout"): no import cycles (imports
inside functions included, so none can hide one) and every subpackage importing only the
layers below it. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import griffin_export

PACKAGE = Path(griffin_export.__file__).parent

#: What each part may import besides itself: the layers of docs/design.md, bottom up.
ALLOWED: dict[str, set[str]] = {
    "_version": set(),
    "errors": set(),
    "core": {"errors"},
    "storage": {"errors", "core"},
    "formats": {"errors", "core", "storage"},
    "engines": {"errors", "core", "storage", "formats"},
    "build": {"_version", "errors", "core", "storage", "formats", "engines"},
    "runtime": {"errors", "core", "storage", "formats"},
    "evaluation": {"_version", "errors", "core", "storage", "formats", "runtime"},
}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under package ``root``."""
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth of its code (functions too).
    Imports of a parent package (its ``__init__``, which runs first anyway) are not edges."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.append(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (plain DFS, Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def part(module: str) -> str:
    """``griffin_export.core.scoring`` -> ``core``; the package itself -> ``""``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def test_the_package_has_no_import_cycle() -> None:
    """Catches a module importing one that imports it back, including through an import inside
    a function (formats.verify once pulled build.export that way to recompute prompts)."""
    assert cycles(import_graph(PACKAGE)) == []


def test_a_cycle_hidden_in_a_function_is_found(tmp_path: Path) -> None:
    """The walker itself: a cycle closed only by a function-level import must be reported (a
    walker that read top-level imports alone would pass the package above vacuously)."""
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg.b import g\n")
    (root / "b.py").write_text("def g():\n    from pkg.a import x\n    return x\n")
    assert cycles(import_graph(root)) == [["pkg.a", "pkg.b"]]


def test_every_part_imports_only_the_layers_below_it() -> None:
    """Catches an upward import (the export format reaching into the pipeline, the core into
    checkpoint I/O, the runtime into evaluation) even before it closes a cycle."""
    upward = []
    for module, targets in import_graph(PACKAGE).items():
        here = part(module)
        if not here:
            continue  # the package's __init__ re-exports the public API from every part
        assert here in ALLOWED, f"{module}: a part docs/design.md does not list"
        upward += [
            f"{module} -> {target}"
            for target in sorted(targets)
            if part(target) != here and part(target) not in ALLOWED[here]
        ]
    assert upward == []


def test_the_public_api_resolves() -> None:
    """Every name ``__all__`` promises exists (a re-export left pointing at a moved or renamed
    function fails here, not in a user's import)."""
    missing = [name for name in griffin_export.__all__ if not hasattr(griffin_export, name)]
    assert missing == []
