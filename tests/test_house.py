"""The package's rooms import one another in one direction: no import circles, the validation room at the bottom."""

import ast
from pathlib import Path

import nas

PACKAGE = Path(nas.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every `nas.*` module a file imports, late (function-level) imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nas"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nas"))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach one another through imports (strongly connected, two or more)."""
    reach = {node: reachable(graph, node) for node in graph}
    groups = {tuple(sorted(n for n in reach[node] if node in reach.get(n, ()))) for node in graph if node in reach[node]}
    return sorted(list(g) for g in groups)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_the_validation_room_imports_nothing_of_nas_but_the_errors():
    assert imports_of(PACKAGE / "validation.py") == {"nas.errors"}


def test_no_module_of_the_package_is_in_an_import_circle():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_circles_and_nothing_else():
    assert circles({"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}) == [["a", "b", "c"], ["d", "e"]]
