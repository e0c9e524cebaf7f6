"""The limits that keep the codebase readable, checked rather than remembered: modules and functions small
enough to read in one sitting, and Ray confined to the executor so stages and the rest of the engine run
(and are tested) without it."""

from __future__ import annotations

import ast
from pathlib import Path

import augpipe

PACKAGE = Path(augpipe.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
RAY_MODULES = {"pipeline/executor.py", "pipeline/ray_cluster.py", "pipeline/ray_dispatch.py"}


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_package_is_where_the_limits_look():
    assert len(MODULES) > 50 and {_rel(p) for p in MODULES} >= RAY_MODULES


def test_no_module_is_longer_than_the_limit():
    long = {_rel(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_longer_than_the_limit():
    long = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{_rel(path)}:{node.name}"] = lines
    assert long == {}


def test_only_the_ray_executor_imports_ray():
    importers = {_rel(p) for p in MODULES if "ray" in _imported_roots(ast.parse(p.read_text()))}
    assert importers == RAY_MODULES
