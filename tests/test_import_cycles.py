"""No import cycles among rewire_jax's modules (static: the ast of every module, nothing imported).

The rule: every `import` / `from ... import` of a rewire_jax module counts, wherever it sits (module
level, inside a function, under `if TYPE_CHECKING`), so a cycle hidden behind a function-level import
fails too. An edge goes to the module the statement names (`from .x import name` -> `x`, or
`x.name` when that is a submodule); the implicit import of the parent packages is not an edge
(every submodule would otherwise cycle with its package's `__init__`).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "rewire_jax"


def modules() -> dict[str, tuple[Path, bool]]:
    """dotted name -> (file, is a package)."""
    out = {}
    for p in sorted((ROOT / PKG).rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def imported(name: str, path: Path, is_pkg: bool, mods) -> set[str]:
    """The rewire_jax modules that `name` imports anywhere in its source."""
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()

    def add(target: str):
        while target and target not in mods:   # `pkg.mod.attr` -> the module `pkg.mod`
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            if base != PKG and not base.startswith(PKG + "."):
                continue
            for a in node.names:
                add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imported(m, p, is_pkg, mods) for m, (p, is_pkg) in mods.items()}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checker_sees_function_level_imports_and_cycles():
    graph = import_graph()
    # cli imports rewire_jax.eval.cli inside a function; generate imports the grouping module
    assert "rewire_jax.eval.cli" in graph["rewire_jax.cli"]
    assert "rewire_jax.generation.grouping" in graph["rewire_jax.generation.generate"]
    assert "rewire_jax.api" in graph["rewire_jax.generation.queue"]   # `from ..api import` (relative)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({**graph, "rewire_jax.api": graph["rewire_jax.api"] | {"rewire_jax.cli"}})
