"""The loader's import graph: no cycle between its modules, and no import of the registry server."""

from __future__ import annotations

import ast
from pathlib import Path

import gpu_loader

PACKAGE = Path(gpu_loader.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """Module -> the modules it imports (those under TYPE_CHECKING too: a cycle of type imports is
    still a layering cycle)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                    names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
                else:
                    names = [node.module]
                deps.update(names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = deps
    return graph


def test_gpu_loader_modules_import_each_other_without_a_cycle():
    graph = module_imports()
    local = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(local[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d) :] + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(local):
        if m not in state:
            visit(m, [])
    assert "gpu_loader.layout" in local["gpu_loader.deltadq"]  # the layout module is what they share


def test_gpu_loader_never_imports_the_registry_server():
    offenders = {
        m for m, deps in module_imports().items() if any(d.startswith("registry.server") for d in deps)
    }
    assert not offenders
