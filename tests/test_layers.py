"""Imports inside ``src/fastvlm`` point down the layer table and never form a cycle.

Every import counts: module level, inside functions, under ``TYPE_CHECKING``. Imports
are read with ``ast``, nothing is executed, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Rank of each part of the package (the first name under ``fastvlm``); a module may
# import its own rank or lower, never higher. The package root is above everything:
# nothing inside the package imports ``fastvlm`` itself.
LAYERS: dict[str, int] = {
    "errors": 0,
    "config": 1,
    "device": 1,
    "config_rules": 1,
    "models": 2,
    "checkpoints": 3,
    "processing": 4,
    "generation": 5,
    "modeling": 6,
    "modeling_args": 6,
    "results": 6,
    "api": 7,
    "cli_options": 7,
    "cli": 8,
    "__main__": 8,
    "server": 8,
    "bench": 8,
    "batch": 8,
    "training": 8,
    "": 9,  # fastvlm/__init__.py
}


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` under ``src``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` (at ``path``) imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import name`` imports the module pkg.name if there is one, else pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    modules = module_files(src, package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str, package: str, layers: dict[str, int]) -> int:
    part = module.removeprefix(package).lstrip(".").split(".")[0]
    if part not in layers:
        raise AssertionError(f"{module}: '{part}' has no layer; add it to LAYERS in {Path(__file__).name}")
    return layers[part]


def upward_imports(graph: dict[str, set[str]], package: str, layers: dict[str, int]) -> list[str]:
    return [
        f"{a} (layer {layer_of(a, package, layers)}) imports {b} (layer {layer_of(b, package, layers)})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if layer_of(b, package, layers) > layer_of(a, package, layers)
    ]


# ---- the package -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC, "fastvlm")


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers(graph):
    assert upward_imports(graph, "fastvlm", LAYERS) == []


def test_the_graph_sees_lazy_imports(graph):
    # Sanity: function-level imports are edges too (cli imports api inside functions only).
    assert "fastvlm.api" in graph["fastvlm.cli"]
    assert "fastvlm.models.fastvlm" in graph["fastvlm.checkpoints.loader"]


# ---- the checker itself, on a small made-up package ------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low/__init__.py": "",
            "pkg/low/a.py": "def f():\n    from ..high import b\n",
            "pkg/high.py": "from .low.a import f\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert find_cycle(graph) == ["pkg.high", "pkg.low.a", "pkg.high"]
    problems = upward_imports(graph, "pkg", {"": 9, "low": 0, "high": 1})
    assert problems == ["pkg.low.a (layer 0) imports pkg.high (layer 1)"]


def test_checker_accepts_downward_imports_and_resolves_package_names(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .high import g\n",
            "pkg/low/__init__.py": "from .a import f\n",
            "pkg/low/a.py": "import os\n\ndef f():\n    return os.sep\n",
            "pkg/high.py": "from .low import a\nfrom .low import f\nimport pkg.low.a\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.high"] == {"pkg.low.a", "pkg.low"}
    assert find_cycle(graph) is None
    assert upward_imports(graph, "pkg", {"": 9, "low": 0, "high": 1}) == []
    with pytest.raises(AssertionError, match="'high' has no layer"):
        upward_imports(graph, "pkg", {"": 9, "low": 0})
