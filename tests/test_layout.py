"""The package's layout holds (docs/design.md, "Components"): no import cycle, and each folder's boundaries.

Imports are read from the source (every ``import`` statement, those inside functions included), so
a lazy import cannot hide a cycle or an arrow running the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gcml_app"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Module -> every module it imports (the app's own resolved to modules, others to their top package)."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            for t in targets:
                if t.startswith("gcml_app"):
                    while t not in modules and "." in t:  # "gcml_app.rounds.run_round" -> "gcml_app.rounds"
                        t = t.rsplit(".", 1)[0]
                    if t != name and t != "gcml_app":
                        found.add(t)
                else:
                    found.add(t.split(".")[0])
        graph[name] = found
    return graph


GRAPH = _imports()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m not in graph:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_inside_the_package():
    own = {k: {m for m in v if m.startswith("gcml_app")} for k, v in GRAPH.items()}
    # a package's __init__ re-exporting its modules is not an arrow back
    own = {k: {m for m in v if not k.startswith(m + ".")} for k, v in own.items()}
    assert _cycle(own) is None, f"import cycle: {' -> '.join(_cycle(own))}"


# folder -> what none of its modules may import
BOUNDARIES = [
    ("gcml_app.ml", {"monailabel", "fastapi", "requests", "starlette", "gcml_app.store", "gcml_app.rounds",
                     "gcml_app.site", "gcml_app.federation", "gcml_app.sim"}),
    ("gcml_app.federation", {"gcml_app.rounds", "gcml_app.site", "gcml_app.sim", "gcml_app.ml.dcml",
                             "gcml_app.ml.supervised", "monailabel"}),
    ("gcml_app.rounds", {"gcml_app.site", "gcml_app.sim", "fastapi", "monailabel"}),
    ("gcml_app.util", {"torch", "safetensors", "gcml_app.store", "gcml_app.ml", "gcml_app.rounds", "gcml_app.site",
                       "gcml_app.federation", "gcml_app.config"}),
    ("gcml_app.store", {"gcml_app.rounds", "gcml_app.site", "gcml_app.federation", "gcml_app.ml", "gcml_app.sim"}),
    ("gcml_app.config", {"torch", "gcml_app.store", "gcml_app.ml", "gcml_app.rounds", "gcml_app.site"}),
    ("gcml_app.errors", {"gcml_app.site", "gcml_app.rounds", "gcml_app.ml", "torch"}),
    ("gcml_app.sim", {"gcml_app.demo", "gcml_app.cli"}),
]


@pytest.mark.parametrize("folder, forbidden", BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_each_folder_keeps_its_boundaries(folder, forbidden):
    wrong = {(m, t) for m, targets in GRAPH.items() if m == folder or m.startswith(folder + ".")
             for t in targets for f in forbidden if t == f or t.startswith(f + ".")}
    assert not wrong, f"{folder} must not import {sorted(forbidden)}; found {sorted(wrong)}"


def test_the_train_entry_imports_nothing_heavy_before_it_runs():
    """MONAI Label's train subprocess imports it first, to relay to the warm trainer before torch is imported."""
    for module in ("gcml_app.site.train_entry", "gcml_app.site.process", "gcml_app.site"):
        top = {t for t in GRAPH[module] if not t.startswith("gcml_app")}
        assert top <= {"gc", "os", "sys", "time", "itertools", "pathlib", "__future__", "monailabel"}, (module, top)


def test_publish_is_called_only_by_the_round_loop():
    """``store.publish`` is reached from the round's commit and adoption (``rounds/loop.py``), nowhere else."""
    callers = set()
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "publish":
                callers.add(_module(path))
    assert callers == {"gcml_app.rounds.loop"}


def test_the_old_asgi_path_serves_the_guarded_app():
    """A service file written for an earlier release (``--uvicorn_app gcml_app.server:app``) keeps the guard."""
    import gcml_app.server
    import gcml_app.site.server

    assert gcml_app.server.app is gcml_app.site.server.app
