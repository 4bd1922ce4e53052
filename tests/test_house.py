"""The package's rooms import one another in one direction: no import circles, the validation room at the bottom,
no subpackage importing one above it, and scripts and experiments using only the public API."""

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import nas

PACKAGE = Path(nas.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every `nas.*` module a file imports, late (function-level) imports included; not those for type checkers
    only (`if TYPE_CHECKING:`), which never run."""
    found, tree = set(), ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
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
    groups = {
        tuple(sorted(n for n in reach[node] if node in reach.get(n, ()))) for node in graph if node in reach[node]
    }
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
    assert circles({"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}) == [
        ["a", "b", "c"],
        ["d", "e"],
    ]


# The subpackages from the bottom up: each may import itself and those before it, never one after it.
LAYERS = [
    "errors",
    "options",
    "validation",
    "_lazy",
    "output",
    "models",
    "data",
    "search",
    "training",
    "study",
    "cluster",
    "compare",
    "deploy",
    "dashboard",
]
FACADES = {
    "nas",
    "nas.cli",
    "nas.__main__",
    "nas.build",
    "nas.export",
    "nas.storage",
}  # the public face, above every layer
ROOT = PACKAGE.parent


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1]) if module not in FACADES else len(LAYERS)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, i) for m, imports in graph.items() for i in imports if i != "nas" and layer(i) > layer(m))


def test_every_module_belongs_to_a_layer_or_the_public_face():
    for module in import_graph():
        assert module in FACADES or module.split(".")[1] in LAYERS, module


def test_no_subpackage_imports_one_above_it():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_upward_import():
    assert upward_imports({"nas.models.build": {"nas.study.run"}, "nas.study.run": {"nas.models.build"}}) == [
        ("nas.models.build", "nas.study.run")
    ]


def public_names(module: str) -> set[str]:
    imported = importlib.import_module(module)
    return set(getattr(imported, "__all__", ()))


def test_scripts_and_experiments_import_only_the_public_api():
    """`from nas.X import name` where X is `nas` itself, a subpackage or a facade, and name is in its `__all__`."""
    private = []
    for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("experiments/*/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nas":
                allowed = public_names(node.module) if node.module.count(".") <= 1 else set()
                private += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names if a.name not in allowed
                ]
            elif isinstance(node, ast.Import):
                private += [
                    f"{path.relative_to(ROOT)}: import {a.name}"
                    for a in node.names
                    if a.name.startswith("nas.") and a.name.count(".") > 1
                ]
    assert private == []


def test_every_public_name_can_be_imported():
    for package in ["nas", *(f"nas.{name}" for name in LAYERS[3:])]:
        for name in public_names(package):
            for submodule in pkgutil.iter_modules(importlib.import_module(package).__path__):
                importlib.import_module(f"{package}.{submodule.name}")  # a submodule import sets a package attribute
            value = getattr(importlib.import_module(package), name)
            assert value is not None and not isinstance(value, types.ModuleType), f"{package}.{name} is {value!r}"
