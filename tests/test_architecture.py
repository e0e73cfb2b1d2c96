"""The package's structure, as ARCHITECTURE.md draws it, held against the code: who imports
whom (no cycle, counting imports inside functions), short functions, no private imports
from other packages, and plugin.py with hooks and fixtures only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "pytest_yourai"


def module_name(path: Path) -> str:
    """A module's name below the package: "judge", "probe" (its __init__), "probe.build"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}
MAX_FUNCTION_LINES = 60


def resolve(dotted: str) -> str | None:
    """The module of this package that an imported name below ``pytest_yourai.`` is."""
    parts = dotted.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or None


def package_imports(tree: ast.Module) -> set[str]:
    """Modules of this package that a module imports, wherever the import stands."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("pytest_yourai."):
                base = node.module.removeprefix("pytest_yourai.")
                names = [resolve(f"{base}.{alias.name}") for alias in node.names]
                found |= {name for name in names if name is not None} or {resolve(base)}
            elif node.module == "pytest_yourai":
                found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pytest_yourai."):
                    found.add(resolve(alias.name.removeprefix("pytest_yourai.")))
    return found - {None}


GRAPH = {name: package_imports(tree) - {name} for name, tree in MODULES.items()}


def cycles() -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(GRAPH.get(name, ())):
            if state.get(other) == 1:
                found.append([*path[path.index(other) :], other])
            elif other not in state:
                visit(other, [*path, other])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    return found


def test_no_import_cycle() -> None:
    assert cycles() == []


def test_leaves_stay_leaves() -> None:
    """The pure layers import nothing above them (ARCHITECTURE.md, "who may import whom")."""
    for floor in ("fields", "protocol", "results", "errors", "hookspec", "safety", "timelimits"):
        assert GRAPH[floor] == set(), floor
    importers = {name: {m for m, deps in GRAPH.items() if name in deps} for name in GRAPH}
    assert importers["plugin"] == set()
    assert importers["worker"] == importers["controller"] == {"plugin"}
    for command in ("estimate", "fit", "compare", "check"):
        assert importers[command] <= {"cli"}, command
    assert importers["diagnose"] <= {"cli", "log"}
    assert GRAPH["estimator"] <= {
        "census",
        "fields",
        "presets",
        "spawn",
        "supervisor",
        "protocol",
        "errors",
    }
    assert "pytest" not in {
        alias.name
        for node in ast.walk(MODULES["judge"])
        if isinstance(node, ast.Import)
        for alias in node.names
    }


def in_probe(name: str) -> bool:
    return name == "probe" or name.startswith("probe.")


def test_the_pytest_process_never_imports_mlx() -> None:
    """Only the probe package imports mlx (and mlx_lm): a crash in MLX must stay in the probe,
    which the pytest process only spawns; of the rest, only the ``yourai probe`` command
    imports it (to run it in its own process)."""
    importers = {m for m, deps in GRAPH.items() if any(in_probe(d) for d in deps)}
    assert {m for m in importers if not in_probe(m)} <= {"cli"}
    for name, tree in MODULES.items():
        if in_probe(name):
            continue
        for node in ast.walk(tree):
            modules = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            assert not [m for m in modules if m.split(".")[0] in ("mlx", "mlx_lm")], name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_function_over_60_lines(name: str) -> None:
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(MODULES[name])
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_no_private_name_from_another_package() -> None:
    private = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("pytest_yourai") or node.module == "__future__":
                    continue
                if any(part.startswith("_") for part in node.module.split(".")):
                    private.append(f"{name}: from {node.module}")
                private += [
                    f"{name}: {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
            elif isinstance(node, ast.Import):
                private += [
                    f"{name}: import {alias.name}"
                    for alias in node.names
                    if any(part.startswith("_") for part in alias.name.split("."))
                ]
    assert private == []


def test_plugin_holds_hooks_and_fixtures_only() -> None:
    tree = MODULES["plugin"]
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            public = [
                item.name
                for item in node.body
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_")
            ]
            assert all(m.startswith("pytest_") for m in public), (node.name, public)
        elif isinstance(node, ast.FunctionDef):
            fixture = any("fixture" in ast.unparse(d) for d in node.decorator_list)
            assert node.name.startswith("pytest_") or fixture, node.name
