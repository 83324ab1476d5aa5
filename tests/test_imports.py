"""Imports inside cifarcam/ go one way: no module imports, however indirectly, one that imports it.

A function-level import hides a cycle from Python (it runs later) but not from a reader, who must
still know both modules to change either; so this counts every import statement, at module level,
inside functions and under ``if TYPE_CHECKING:`` alike. Static: nothing is imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "cifarcam"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """``cifarcam.x`` -> its file, for every module of the package (``cifarcam`` is __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(source: str, module: str, known: set[str]) -> set[str]:
    """The package's modules that ``source`` (the text of ``module``) imports anywhere in it."""
    package = module if f"{module}.__init__" in known else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from cifarcam import data` names a module; `from cifarcam.data import ImageSet` does not
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    # `import cifarcam.a.b` imports cifarcam.a.b; keep the longest known prefix of each name
    resolved = set()
    for name in found:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in known:
                resolved.add(".".join(parts[:n]))
                break
    return resolved - {module}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    known = set(modules) | {f"{m}.__init__" for m, p in modules.items() if p.name == "__init__.py"}
    return {m: imported_modules(p.read_text(), m, known) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_collector_sees_every_kind_of_import():
    known = {"cifarcam", "cifarcam.__init__", "cifarcam.a", "cifarcam.b", "cifarcam.c", "cifarcam.d", "cifarcam.e", "cifarcam.f"}
    source = (
        "from typing import TYPE_CHECKING\nimport os\nimport cifarcam.a\nfrom cifarcam.b import Thing\n"
        "if TYPE_CHECKING:\n    from cifarcam.c import Hint\n"
        "def f():\n    from cifarcam import d\n    from . import e\n"
        "    importlib.import_module('cifarcam.f')\n"
    )
    assert imported_modules(source, "cifarcam.x", known) == {"cifarcam.a", "cifarcam.b", "cifarcam.c", "cifarcam.d", "cifarcam.e", "cifarcam.f"}


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    # Not vacuous: the package's modules were found and their imports, function-level ones too, seen.
    assert len(graph) >= 20 and sum(map(len, graph.values())) >= 30, graph
    assert "cifarcam.models" in graph["cifarcam.checkpoint"]  # module level
    assert "cifarcam.models" in graph["cifarcam.config"]  # inside validate_train
    assert "cifarcam.config" in graph["cifarcam.data"]  # under TYPE_CHECKING
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_errors_is_a_leaf():
    assert import_graph()["cifarcam.errors"] == set()
