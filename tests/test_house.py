"""The house rules that a reader can check: no function in ``orchestrator/`` over 60
lines, and no import circle between its modules, counting the imports made inside
functions (an import moved into a function to dodge a circle is still a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "orchestrator"
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in ``source`` longer than ``limit``."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > limit
    ]


def imported(source: str, known: dict[str, Path], own: str) -> set[str]:
    """The modules of ``known`` that ``source`` imports, anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known and name != own and name != "orchestrator"}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
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


def test_no_function_in_the_package_is_over_60_lines() -> None:
    over = {
        f"{name}.{function}": lines
        for name, path in modules().items()
        for function, lines in long_functions(path.read_text(), MAX_FUNCTION_LINES)
    }
    assert over == {}


def test_no_import_circle_in_the_package() -> None:
    known = modules()
    graph = {name: imported(path.read_text(), known, name) for name, path in known.items()}
    assert circles(graph) == []


def test_the_checks_find_what_they_look_for() -> None:
    """The detectors themselves, on made-up input: a 61-line function and a 3-circle."""
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    assert long_functions(f"def f():\n{body}\n", 60) == [("f", 61)]
    assert long_functions(f"def f():\n{body}\n", 61) == []
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    known = {"orchestrator.x": Path("x"), "orchestrator.y": Path("y")}
    source = "def f():\n    from orchestrator.y import thing\n"
    assert imported(source, known, "orchestrator.x") == {"orchestrator.y"}
