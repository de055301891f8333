"""The lab and the library apart: `import batchnorm` never loads the lab, the library's
sources never import it, and the lab's modules import each other without a circle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def _imports(path: Path, package: str) -> set[str]:
    """The absolute names of the modules `path` imports anywhere in it (functions included),
    relative imports resolved against `package`, the dotted name of the module itself."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _modules(top: str) -> dict[str, Path]:
    """Every module of the package `top` under src/: dotted name -> file."""
    found = {}
    for path in (SRC / top).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


@pytest.mark.slow
def test_importing_the_library_loads_no_module_of_the_lab():
    code = "import json, sys, batchnorm, batchnorm.tools; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    loaded = json.loads(done.stdout)
    assert "batchnorm" in loaded
    assert [m for m in loaded if m.split(".")[0] == "batchnorm_lab"] == []


def test_no_library_source_imports_the_lab():
    offenders = {
        name: sorted(i for i in _imports(path, _package_of(name, path)) if i.split(".")[0] == "batchnorm_lab")
        for name, path in _modules("batchnorm").items()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_labs_imports_have_no_circle():
    modules = _modules("batchnorm_lab")
    graph = {
        name: {m for m in _imports(path, _package_of(name, path)) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A package's __init__ imported as a side effect of `from pkg import mod` is not an edge
    # of the circle sought: only imports of a module by name count, so drop the edge from a
    # package's module to its own package.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    done, path = set(), []

    def visit(name: str) -> None:
        assert name not in path, "import circle: " + " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
