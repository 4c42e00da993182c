"""The package's import structure: every module imports on its own, and the imports at module level form
no cycle (a cycle works or breaks depending on which module a user imports first)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("i3cl_core", "flows")

ALONE = """
import importlib, pkgutil, sys
import i3cl_core, flows
names = sorted(
    {m.name for p in (i3cl_core, flows) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")}
)
failed = []
for name in names:
    for k in [k for k in sys.modules if k.split(".")[0] in ("i3cl_core", "flows")]:
        # as in a fresh interpreter (third-party modules stay loaded: they do not matter here)
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {e!r}")
print(len(names))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, name: str, known: set[str], inside_functions: bool = False) -> set[str]:
    """The project modules ``path`` imports at module level (not under TYPE_CHECKING); with
    ``inside_functions`` also those imported inside functions and classes (deferred imports)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def add(node) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(
                    node.body
                    + node.orelse
                    + getattr(node, "finalbody", [])
                    + [n for h in getattr(node, "handlers", []) for n in h.body]
                )
            elif inside_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for inner in ast.walk(node):
                    add(inner)
            else:
                add(node)

    visit(tree.body)
    out = set()
    for target in found:  # the deepest project module each import names
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def test_every_module_imports_on_its_own():
    res = subprocess.run([sys.executable, "-c", ALONE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert int(res.stdout.split()[0]) > 50


@pytest.mark.parametrize("inside_functions", [False, True], ids=["module level", "with deferred imports"])
def test_imports_form_no_cycle(inside_functions):
    """No cycle among the imports at module level, nor once the imports deferred into functions count too (a
    deferred cycle is a layering problem the module level hides: the checkpoint reader inside the backbone,
    the pipeline's helpers inside the ensemble)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {
        name: module_level_imports(path, name, set(files), inside_functions) for name, path in files.items()
    }
    # a package imports its submodules' names through __init__; importing a submodule runs the package's
    # __init__ first, which is not a cycle of the submodule's own making
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
    # and the check sees real edges: the trainer imports the config package at module level
    assert "i3cl_core.config" in graph["i3cl_core.engine.train"]
