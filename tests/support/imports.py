"""The import graph of the `gateway` package, read from the source (no module is imported).

Nodes are packages one level below `gateway` (`gateway.sla`, `gateway.routing`, ...) and its
top-level modules (`gateway.app`); an edge `a -> b` means a module of `a` imports one of `b`,
at module level or inside a function. Imports under `if TYPE_CHECKING:` are kept apart: they
exist for the type checker only and never run (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "gateway"


@dataclass
class Graph:
    #: (from node, to node) -> the importing modules
    runtime: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    typing: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def edges(self, *, with_typing: bool = False) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        pairs = list(self.runtime) + (list(self.typing) if with_typing else [])
        for a, b in pairs:
            out.setdefault(a, set()).add(b)
        return out


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def node(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _exists(name: str) -> bool:
    target = ROOT.parent / name.replace(".", "/")
    return target.is_dir() or target.with_suffix(".py").exists()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            ids |= {id(sub) for sub in ast.walk(stmt)}
    return ids


def imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(imported gateway module or name, under TYPE_CHECKING) of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = _type_checking_nodes(tree)
    for stmt in ast.walk(tree):
        names: list[str] = []
        if isinstance(stmt, ast.Import):
            names = [alias.name for alias in stmt.names]
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
            # `from gateway import alerts` names a module; `from gateway.x import y` a name.
            names = [stmt.module] + [f"{stmt.module}.{alias.name}" for alias in stmt.names]
        for name in names:
            if name.startswith("gateway."):
                yield name, id(stmt) in typing_only


def graph() -> Graph:
    result = Graph()
    for path in sorted(ROOT.rglob("*.py")):
        source = node(module_name(path))
        for name, typing_only in imports(path):
            target = node(name)
            if target in (source, "gateway") or not _exists(target):
                continue
            edges = result.typing if typing_only else result.runtime
            edges.setdefault((source, target), set()).add(module_name(path))
    # A runtime edge also counts once; typing holds only the edges that are typing-only.
    for pair in list(result.typing):
        if pair in result.runtime:
            del result.typing[pair]
    return result


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:  # noqa: C901  (Tarjan's algorithm as published; split, it no longer reads as one)
    """The strongly connected components with more than one node (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    nodes = set(edges) | {b for targets in edges.values() for b in targets}
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return sorted(found)


if __name__ == "__main__":  # python3 -m tests.support.imports: the cycles, for a review
    g = graph()
    for label, with_typing in (("runtime", False), ("runtime + TYPE_CHECKING", True)):
        print(f"package cycles ({label}):")
        edges = g.edges(with_typing=with_typing)
        for component in cycles(edges) or [["none"]]:
            print("  ", " ".join(component))
            for a in component:
                for b in sorted(edges.get(a, ())):
                    if b in component:
                        via = g.runtime.get((a, b)) or g.typing.get((a, b), set())
                        print(f"      {a} -> {b}: {', '.join(sorted(via))}")
