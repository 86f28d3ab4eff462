"""The package's import graph: no cycles, and no private name imported across modules.

Static: every module of the installed `efflm` is parsed with `ast`, nothing of it runs.
Modules are found with importlib's finders (what `importlib.util.find_spec` asks, without
importing the parent package) and pkgutil, following the package's own imports too (an
editable install maps subpackages to folders outside efflm/). Imports inside functions
count; those under `if TYPE_CHECKING:` do not. `from a.b import c` is an edge to `a.b.c`
when that is a module, else to `a.b`; `import a.b.c` is an edge to `a.b.c` only (each
package's `__init__` is a node of its own). The imports of `efflm.cli` are left out:
they are lazy on purpose (start-up time).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import pkgutil
import sys

import pytest

PACKAGE = "efflm"
NOT_SOURCES = {"efflm.cli"}


@dataclasses.dataclass(frozen=True)
class Import:
    target: str  # the module imported (from)
    name: str | None  # the attribute taken from it; None when the target is the module
    line: int
    in_function: bool


@functools.cache
def _find_spec(name: str):
    """`importlib.util.find_spec(name)`, without running the parent packages' code."""
    parent = name.rpartition(".")[0]
    if not parent:
        return importlib.util.find_spec(name)
    parent_spec = _find_spec(parent)
    if parent_spec is None or parent_spec.submodule_search_locations is None:
        return None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(name, list(parent_spec.submodule_search_locations)) if find else None
        if spec is not None:
            return spec
    return None


def _is_module(name: str) -> bool:
    return _in_package(name) and _find_spec(name) is not None


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """(module or "", names or None, level, line, in_function) of each import statement."""

    def __init__(self):
        self.found, self._depth = [], 0

    def visit_If(self, node):
        if not _is_type_checking(node.test):
            return self.generic_visit(node)
        for child in node.orelse:  # the else branch runs
            self.visit(child)

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.name, None, 0, node.lineno, self._depth > 0))

    def visit_ImportFrom(self, node):
        names = [alias.name for alias in node.names]
        self.found.append((node.module or "", names, node.level, node.lineno, self._depth > 0))


def imports_of(source: str, module: str, is_package: bool, is_module) -> list[Import]:
    """The resolved imports of `module`'s source; `is_module(name)` says what is a module."""
    collector = _Collector()
    collector.visit(ast.parse(source))
    out = []
    for target, names, level, line, in_function in collector.found:
        if level:  # relative: from the module's package, one level up per extra dot
            base = module.split(".")[:None if is_package else -1]
            base = base[:len(base) - level + 1]
            target = ".".join(base + ([target] if target else []))
        if names is None:
            out.append(Import(target, None, line, in_function))
            continue
        for name in names:
            if name != "*" and is_module(f"{target}.{name}"):
                out.append(Import(f"{target}.{name}", None, line, in_function))
            else:
                out.append(Import(target, name, line, in_function))
    return out


@functools.cache
def package_imports() -> dict[str, list[Import]]:
    """Module name -> its imports within the package, for every module of the package."""
    graph, todo = {}, [PACKAGE]
    while todo:
        name = todo.pop()
        spec = _find_spec(name)
        if name in graph or spec is None or not (spec.origin or "").endswith(".py"):
            continue
        locations = spec.submodule_search_locations
        with open(spec.origin, encoding="utf-8") as f:
            found = imports_of(f.read(), name, locations is not None, _is_module)
        graph[name] = [i for i in found if _in_package(i.target)]
        todo += [i.target for i in graph[name]]  # cli's too: it reaches efflm.bench
        if locations is not None:
            todo += [f"{name}.{m.name}" for m in pkgutil.iter_modules(list(locations))]
    for name in NOT_SOURCES:
        graph[name] = []
    return graph


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(edges: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside `within` (breadth first)."""
    previous, frontier = {}, [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w not in within or w in previous:
                    continue
                previous[w] = v
                if w == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(previous[path[-1]])
                    return path[::-1]
                following.append(w)
        frontier = following
    return []


def find_cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """One shortest cycle through each module that is on a cycle, without repeats."""
    edges = {v: {i.target for i in imports} for v, imports in graph.items()}
    cycles, seen = [], set()
    for component in _strongly_connected(edges):
        if len(component) == 1 and component[0] not in edges.get(component[0], ()):
            continue
        for start in component:
            cycle = _shortest_cycle(edges, start, set(component))
            ring = cycle[:-1]
            key = tuple(ring[ring.index(min(ring)):] + ring[:ring.index(min(ring))])
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return sorted(cycles, key=lambda c: (len(c), c))


def _where(graph, source: str, target: str) -> str:
    lines = list(dict.fromkeys(f"line {i.line}" + (" (in a function)" if i.in_function else "")
                               for i in graph[source] if i.target == target))
    more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
    return f"{source} imports {target} at {', '.join(lines[:3])}{more}"


def test_the_graph_covers_the_package():
    graph = package_imports()
    for name in ("efflm", "efflm.config", "efflm.train.trainer", "efflm.train.loss",
                 "efflm.pallas_kernels.fused_cross_entropy", "efflm.bench.kernels"):
        assert name in graph, f"{name} was not found"
    assert "efflm.pallas_kernels.fused_cross_entropy" in {
        i.target for i in graph["efflm.train.loss"]}
    assert graph["efflm.cli"] == []


def test_the_parser_on_a_sample():
    source = "\n".join([
        "from typing import TYPE_CHECKING",
        "import efflm.a.b",
        "from efflm.a import b, _c",
        "from . import d",
        "from ..e import f",
        "if TYPE_CHECKING:",
        "    from efflm.skipped import x",
        "else:",
        "    import efflm.g",
        "def h():",
        "    from efflm.i import j",
    ])
    modules = {"efflm.a.b", "efflm.p.d"}
    found = imports_of(source, "efflm.p.q", False, modules.__contains__)
    assert [(i.target, i.name, i.in_function) for i in found] == [
        ("typing", "TYPE_CHECKING", False), ("efflm.a.b", None, False),
        ("efflm.a.b", None, False), ("efflm.a", "_c", False), ("efflm.p.d", None, False),
        ("efflm.e", "f", False), ("efflm.g", None, False), ("efflm.i", "j", True)]
    # A package's relative imports start from the package itself.
    (init,) = imports_of("from . import d", "efflm.p", True, modules.__contains__)
    assert init.target == "efflm.p.d"
    ring = {"a": [Import("b", None, 1, False)], "b": [Import("a", None, 2, True)],
            "c": [Import("c", None, 3, False)], "d": [Import("a", None, 4, False)]}
    assert find_cycles(ring) == [["c", "c"], ["a", "b", "a"]]


def test_no_import_cycles():
    graph = package_imports()
    cycles = find_cycles(graph)
    if cycles:
        lines = [f"{len(cycles)} import cycle(s) among {PACKAGE}'s modules (one shortest "
                 "cycle through each module on one; imports in functions count, "
                 f"{', '.join(sorted(NOT_SOURCES))} and `if TYPE_CHECKING:` do not):"]
        for cycle in cycles:
            lines.append("  " + " -> ".join(cycle))
            lines += [f"      {_where(graph, a, b)}" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("\n".join(lines), pytrace=False)


def test_no_private_names_imported_across_modules():
    graph = package_imports()
    found = [f"  {source} line {i.line}: from {i.target} import {i.name}"
             for source, imports in sorted(graph.items()) for i in imports
             if i.name and i.name.startswith("_") and not i.name.startswith("__")
             and i.target != source]
    if found:
        pytest.fail(f"{len(found)} private name(s) imported from another module of "
                    f"{PACKAGE} (make the name public or move the code):\n" + "\n".join(found),
                    pytrace=False)
