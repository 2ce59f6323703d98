"""The house's layout as a specification: the dependency direction of DESIGN.md and no import
cycles, read from the sources' import statements (module level and inside functions alike)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("codec", "registry", "gpu_loader", "cli", "migrations", "eval")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _type_checking_only(stmt: ast.stmt) -> bool:
    test = stmt.test if isinstance(stmt, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, *, top_level_only: bool) -> set[str]:
    """The project modules `name` imports (a `from pkg import sub` of a submodule counts as sub)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = list(ast.walk(tree))
    if top_level_only:  # run at import: module level and its `if`/`try` blocks, not `if TYPE_CHECKING:`
        nodes = [
            n
            for stmt in tree.body
            if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not _type_checking_only(stmt)
            for n in ast.walk(stmt)
        ]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{alias.name}" for alias in node.names]
            out.update(s for s in subs if s in MODULES)
            if not all(s in MODULES for s in subs):
                out.add(target)
    return {m for m in out if m.split(".")[0] in PACKAGES and m in MODULES}


def _layer(module: str) -> str:
    if module.startswith("registry."):
        return ".".join(module.split(".")[:2])
    return module.split(".")[0]


# What each layer may import besides itself (DESIGN.md's dependency direction).
ALLOWED = {
    "codec": set(),
    "registry": {"codec"},
    "registry.common": {"codec", "registry"},
    "registry.client": {"codec", "registry", "registry.common"},
    "registry.server": {"codec", "registry", "registry.common", "migrations"},
    "migrations": {"registry", "registry.server"},
    "gpu_loader": {"codec", "registry", "registry.common", "registry.client"},
    "eval": {"codec", "gpu_loader"},
    "cli": {
        "codec",
        "registry",
        "registry.common",
        "registry.client",
        "registry.server",
        "gpu_loader",
        "eval",
    },
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_import_follows_the_dependency_direction(module):
    layer = _layer(module)
    wrong = sorted(
        m
        for m in _imports(module, MODULES[module], top_level_only=False)
        if _layer(m) != layer and _layer(m) not in ALLOWED[layer]
    )
    assert not wrong, f"{module} ({layer}) imports {wrong}"


def test_no_module_level_import_cycle():
    graph = {m: _imports(m, p, top_level_only=True) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
