"""The house rules that a reader can check: no function in ``orchestrator/`` over 60
lines, no file over 450 (the worker loop within 250), no import circle between its
modules, counting the imports made inside functions (an import moved into a function to
dodge a circle is still a circle), and no import inside a function at all except of an
optional heavy dependency, with a comment saying which."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "orchestrator"
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 450
MAX_WORKER_LINES = 250  # orchestrator/train/worker.py: the Ray touch-points only


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


def function_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import made inside a function of ``source`` that is not
    allowed: one of this package, or one without a comment on its line or the line above
    that names its top-level package (``# ray.data: heavy ...``)."""
    lines = source.splitlines()
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                module = node.names[0].name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                module = node.module
            else:
                continue
            top = module.split(".")[0]
            said = [lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""]
            commented = any("#" in line and top in line.split("#", 1)[1] for line in said)
            if top == "orchestrator" or not commented:
                found.append((node.lineno, module))
    return sorted(set(found))


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


def test_no_import_inside_a_function_except_heavy_optional_ones() -> None:
    found = {
        f"{name}:{line}": module
        for name, path in modules().items()
        for line, module in function_imports(path.read_text())
    }
    assert found == {}


def test_no_file_in_the_package_is_over_450_lines_and_the_worker_within_250() -> None:
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in lengths.items() if n >= MAX_FILE_LINES} == {}
    assert lengths["orchestrator.train.worker"] <= MAX_WORKER_LINES


def test_the_method_facts_are_a_leaf_and_the_old_config_path_still_imports() -> None:
    """``orchestrator/config/method.py`` imports nothing of the project; every name the
    config package exports resolves from ``orchestrator.config`` (the path before the
    split into a package)."""
    known = modules()
    method = known["orchestrator.config.method"]
    assert imported(method.read_text(), known, "orchestrator.config.method") == set()
    config = importlib.import_module("orchestrator.config")
    missing = [name for name in config.__all__ if not hasattr(config, name)]
    assert missing == [] and len(config.__all__) > 50


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
    assert function_imports(source) == [(2, "orchestrator.y")]
    bare = "def f():\n    import scipy\n"
    assert function_imports(bare) == [(2, "scipy")]
    said = "def f():\n    # scipy: heavy\n    import scipy\n"
    assert function_imports(said) == []
    wrong = "def f():\n    # matplotlib: heavy\n    import scipy\n"
    assert function_imports(wrong) == [(3, "scipy")]
