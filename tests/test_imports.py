"""Imports inside cifarcam/ go one way: no module imports, however indirectly, one that imports it;
and the stages keep their order (the table STAGES below), each used by the others through its
package's face only.

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
            # `from cifarcam.data import splits` names a module; `from cifarcam.data.splits import ImageSet` does not
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
    assert "cifarcam.training.models" in graph["cifarcam.training.checkpoint"]  # module level
    assert "cifarcam.config" in graph["cifarcam.report.run_folder"]  # inside ReportRun.__init__
    assert "cifarcam.config" in graph["cifarcam.data.splits"]  # under TYPE_CHECKING
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_errors_is_a_leaf():
    assert import_graph()["cifarcam.errors"] == set()


# ---------------------------------------------------------------------------------------------
# The stages' borders. Top-level modules are the core (config, errors, results: what every stage
# agrees on); each stage package may import the core and the stages named here, nothing else.
STAGES: dict[str, set[str]] = {
    "data": set(),
    "training": {"data"},
    "search": {"training", "data"},
    "cam": {"training", "data"},  # never the search: it reads the search's results from the run folder
    "report": {"data"},  # test images for figures; the rest is Parquet
}
# Neither may load a deep-learning library, however late: the report runs on a login node, and the
# core is read by every job before it decides anything.
NO_TORCH = {"core", "report"}
TORCH_LIBRARIES = ("torch", "torchvision", "timm", "pytorch_grad_cam", "ray.train")
PROJECT = ROOT.parent


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "core"


def border_crossings(graph: dict[str, set[str]]) -> list[str]:
    """Each import from one stage into another that the table does not allow."""
    crossings = []
    for module, imported in sorted(graph.items()):
        here = stage(module)
        allowed = {"core"} if here == "core" else {here, "core", *STAGES[here]}
        crossings += [f"{module} ({here}) imports {other} ({stage(other)})" for other in sorted(imported) if stage(other) not in allowed]
    return crossings


def torch_imports(module: str, path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found += [f"{module} imports {name}" for name in names if name.split(".")[0] in TORCH_LIBRARIES or name.startswith("ray.train")]
    return found


def face(package: str) -> set[str]:
    """The names a stage package's __init__ exports (its lazy_face call's dict)."""
    init = ROOT / package / "__init__.py"
    call = next(n for n in ast.walk(ast.parse(init.read_text())) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "lazy_face")
    return {name.value for names in call.args[1].values for name in names.elts}


def face_violations(path: Path, module: str) -> list[str]:
    """Imports of another stage that go past its face, or use a name the face does not export."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = [(node.module or "", [a.name for a in node.names])] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        targets += [(a.name, []) for a in node.names] if isinstance(node, ast.Import) else []
        for target, names in targets:
            parts = target.split(".")
            if parts[0] != PACKAGE or len(parts) < 2 or parts[1] not in STAGES or stage(module) == parts[1]:
                continue
            if len(parts) > 2:
                found.append(f"{module} imports {target}: use the face, cifarcam.{parts[1]}")
            found += [f"{module} imports {name} from cifarcam.{parts[1]}, which does not export it" for name in names if name not in face(parts[1])]
    return found


def test_the_stages_keep_their_order():
    graph = import_graph()
    assert {stage(m) for m in graph} == {"core", *STAGES}  # not vacuous: every stage has modules
    assert border_crossings(graph) == []


def test_a_crossing_is_caught():
    """Not vacuous: the report reaching into the search (as report_console once did) or the
    core into training (as config once did) is found."""
    assert border_crossings({"cifarcam.report.console": {"cifarcam.search.runner"}, "cifarcam.config": {"cifarcam.training.models"}}) == [
        "cifarcam.config (core) imports cifarcam.training.models (training)",
        "cifarcam.report.console (report) imports cifarcam.search.runner (search)",
    ]


def test_the_core_and_the_report_load_no_deep_learning_library():
    found = [hit for module, path in module_names().items() if stage(module) in NO_TORCH for hit in torch_imports(module, path)]
    assert found == []
    assert torch_imports("x", ROOT / "training" / "models.py")  # not vacuous


def test_other_stages_and_the_jobs_use_a_stage_through_its_face():
    paths = {module: path for module, path in module_names().items()}
    for folder in ("jobs", "cluster"):
        paths |= {f"{folder}.{p.stem}": p for p in (PROJECT / folder).glob("*.py")}
    assert [v for module, path in sorted(paths.items()) for v in face_violations(path, module)] == []
    assert {"run_search", "CamSettings", "load_splits", "write_report", "load_experiment"} <= set().union(*(face(s) for s in STAGES))


def test_every_name_a_face_exports_exists():
    import importlib

    missing = [f"cifarcam.{s}.{name}" for s in STAGES for name in sorted(face(s)) if not hasattr(importlib.import_module(f"cifarcam.{s}"), name)]
    assert missing == []


def test_a_search_pickled_before_the_packages_still_resumes():
    """Tune pickled a search's callbacks, scheduler and inputs under the old flat module names
    (cifarcam.trial_driver, cifarcam.progress, …): each resolves to the very module it became."""
    import importlib
    import pickle

    from cifarcam.moved_modules import MOVED
    from cifarcam.search.trial_driver import run_trial

    old = pickle.dumps(run_trial, protocol=0).replace(b"cifarcam.search.trial_driver", b"cifarcam.trial_driver")
    assert b"ccifarcam.trial_driver\n" in old and pickle.loads(old) is run_trial  # a trusted literal
    for name, home in MOVED.items():
        assert importlib.import_module(f"cifarcam.{name}") is importlib.import_module(f"cifarcam.{home}")
        assert importlib.import_module(f"cifarcam.{home}").__spec__.name == f"cifarcam.{home}"  # its own spec kept
    assert len(MOVED) >= 35
