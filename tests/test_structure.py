"""The package's structure: its import graph has no cycle (imports inside
functions count), the engine does not import the application, and the
random streams have one home."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "tallytrain"


def modules() -> Dict[str, str]:
    """{dotted module name: path} of every .py file in the package."""
    out = {}
    for base, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return out


def extensions() -> Set[str]:
    """Dotted names of the compiled extensions (tallytrain._C), where built."""
    out = set()
    for base, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith((".so", ".pyd")):
                rel = os.path.relpath(os.path.join(base, name.split(".")[0]), ROOT)
                out.add(rel.replace(os.sep, "."))
    return out | {f"{PACKAGE}._C"}


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package's modules it imports, anywhere in its code. A
    name imported from a package counts as its submodule where one exists;
    compiled extensions (tallytrain._C) are leaves and left out."""
    mods = modules()
    compiled = extensions()
    graph = {}
    for mod, path in mods.items():
        is_package = path.endswith("__init__.py")
        here = mod.split(".") if is_package else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (
                    ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).rstrip(".")
                    if node.level
                    else node.module or ""
                )
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                    for a in node.names
                    if f"{base}.{a.name}" not in compiled
                ]
            for target in targets:
                while target and target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in mods and target != mod:
                    deps.add(target)
        graph[mod] = deps
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "tallytrain.fl.methods.base" in graph["tallytrain.fl.registry"]
    assert "tallytrain.app.experiment" in graph["tallytrain.cli"]  # imported in functions


def test_the_package_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize(
    "engine", ["tallytrain.fl", "tallytrain.data", "tallytrain.ops", "tallytrain.comm"]
)
def test_the_engine_does_not_import_the_application(engine):
    graph = import_graph()
    app = {m for m in graph if m.startswith(("tallytrain.app", "tallytrain.cli"))}
    for mod, deps in graph.items():
        if mod == engine or mod.startswith(engine + "."):
            assert not deps & app, f"{mod} imports {sorted(deps & app)}"


def test_random_stream_numbers_are_distinct_and_defined_once():
    from tallytrain import streams

    numbers = {name: value for name, value in vars(streams).items() if name.endswith("_STREAM")}
    assert len(numbers) >= 10 and len(set(numbers.values())) == len(numbers)
    for mod, path in modules().items():
        if mod == "tallytrain.streams":
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        assigned = {
            t.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        assigned |= {
            e.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Tuple)
            for e in t.elts
            if isinstance(e, ast.Name)
        }
        assert not {n for n in assigned if n.endswith("_STREAM")}, mod
