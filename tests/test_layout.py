"""The package layout as the README states it, checked on the source itself (its AST): which way
the imports run, no module reaching into another's private names, no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"nst.engine": ROOT / "engine", "nst.export": ROOT / "export", "nst.cli": ROOT / "cli"}


def _modules() -> dict[str, Path]:
    """`nst.engine.transfer` -> its file, for every module of the three packages."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *parts)) if parts[-1] != "__init__" else ".".join((pkg, *parts[:-1]))
            out[name] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk_runtime(tree: ast.AST):
    """Every node that runs, skipping `if TYPE_CHECKING:` blocks (they import nothing at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module: str) -> list[tuple[str, str | None, ast.AST]]:
    """(imported module, name taken from it or None, node) for each nst import `module` runs."""
    path = MODULES[module]
    out: list[tuple[str, str | None, ast.AST]] = []
    for node in _walk_runtime(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:  # `from . import onnx_meta`: a module, not a name
                    out.append((f"{base}.{a.name}", None, node))
                elif base in MODULES:
                    out.append((base, a.name, node))
    return out


def test_the_walk_sees_the_packages():
    assert {"nst.engine.transfer", "nst.engine.layers", "nst.export.onnx_export", "nst.cli.app"} <= set(MODULES)
    targets = {m for m, _, _ in imports("nst.engine.transfer")}
    assert "nst.engine.config" in targets and "nst.engine.losses" in targets


def test_no_module_takes_another_modules_private_names():
    bad = []
    for module, path in MODULES.items():
        aliases = {}
        for target, name, node in imports(module):
            if name is not None and name.startswith("_") and target != module:
                bad.append(f"{module} imports {target}.{name}")
            if name is None and isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    aliases[a.asname or a.name.rsplit(".", 1)[-1]] = target
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    bad.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in imports(m) if t != m}) for m in MODULES}
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: finished

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("package, forbidden", [("nst.engine", ("nst.export", "nst.cli", "typer", "rich")), ("nst.export", ("nst.cli", "typer"))])
def test_imports_run_one_way(package, forbidden):
    bad = []
    for module, path in MODULES.items():
        if not module.startswith(package):
            continue
        for node in _walk_runtime(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [_base(module, path, node)] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{module} imports {n}" for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_layers_imports_no_torch():
    code = "import sys, nst.engine.layers; print(sorted(m for m in ('torch', 'numpy', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
