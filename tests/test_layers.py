"""The floors of the house (issue 29): which package may import which, checked on the
source with `ast` (function-local imports included, nothing is imported).

    CLI          trainer/cli.py (the top floor), trainer/__main__.py (a shim that imports it)
    experiments  trainer, solver_service, shared; never the CLI
    trainer      shared only; the pipeline driver (trainer/driver.py) also starts the
                 solver farm (solver_service/farm.py)
    solver_service  shared only
    shared       nothing of the project

and no circle between files: the import graph of the four packages has no cycle.
`benchmarks/` and `deploy/` are scripts above every floor: no package imports them.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "solver_service", "trainer", "experiments")
PROJECT = (*PACKAGES, "benchmarks", "deploy", "tests")
CLI = "trainer.cli"  # the top floor
SHIM = "trainer.__main__"  # `python -m trainer`: imports the CLI and nothing else
# package -> the project packages its modules may import
FLOORS = {
    "shared": {"shared"},
    "solver_service": {"shared", "solver_service"},
    "trainer": {"shared", "trainer"},
    "experiments": {"shared", "solver_service", "trainer", "experiments"},
}
# (importer, imported) allowed beyond its floor, with the reason
EXCEPTIONS = {
    ("trainer.driver", "solver_service.farm"): "the pipeline driver starts the solver farm for stage A",
}


def modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the four packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: pathlib.Path, known) -> list[tuple[str, int]]:
    """(project module, line) of every import in the file, at any depth of the tree:
    `from a.b import c` names a.b.c when c is a module, else a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in known else base, node.lineno))
    return [(m, line) for m, line in found if m.split(".")[0] in PROJECT]


def graph(root: pathlib.Path = ROOT) -> dict[str, list[tuple[str, int]]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def breaches(root: pathlib.Path = ROOT) -> list[str]:
    """One line per import that breaks a floor: 'FILE:LINE imports MODULE (why)'."""
    known = modules(root)
    found = []
    for name, edges in graph(root).items():
        where = known[name].relative_to(root)
        floor = name.split(".")[0]
        for target, line in edges:
            top = target.split(".")[0]
            if name == SHIM:
                if target != CLI:
                    found.append(f"{where}:{line} imports {target} (the entry point only imports the CLI)")
            elif name == CLI:
                if top not in PACKAGES:
                    found.append(f"{where}:{line} imports {target} (no package imports {top}/)")
            elif target in (CLI, SHIM):
                found.append(f"{where}:{line} imports {target} (the CLI is the top floor: nothing imports it)")
            elif top not in FLOORS[floor] and (name, target) not in EXCEPTIONS:
                allowed = ", ".join(sorted(FLOORS[floor] - {floor})) or "nothing of the project"
                found.append(f"{where}:{line} imports {target} ({floor} may import {allowed})")
    return found


def cycles(root: pathlib.Path = ROOT) -> list[list[str]]:
    """The import cycles between files, one per strongly connected group, each as the
    path MODULE -> … -> MODULE."""
    edges = {name: sorted({t for t, _ in targets if t in graph_}) for graph_ in [graph(root)]
             for name, targets in graph_.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in edges[v]:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_cycle_through(group, edges) for group in groups]


def _cycle_through(group: list[str], edges) -> list[str]:
    """One cycle inside a strongly connected group, from its first module back to it."""
    start, inside = group[0], set(group)
    paths, seen = {start: [start]}, {start}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in edges[v]:
            if w == start:
                return paths[v] + [start]
            if w in inside and w not in seen:
                seen.add(w)
                paths[w] = paths[v] + [w]
                todo.append(w)
    return group


def describe(cycle: list[str], root: pathlib.Path = ROOT) -> str:
    known, g = modules(root), graph(root)
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        line = min(line for t, line in g[a] if t == b)
        steps.append(f"{known[a].relative_to(root)}:{line} imports {b}")
    return "; ".join(steps)


def test_every_import_keeps_to_its_floor():
    found = breaches()
    assert not found, "imports that break the floors (tests/test_layers.py):\n" + "\n".join(found)


def test_no_import_circle_between_files():
    found = cycles()
    assert not found, "import circles:\n" + "\n".join(describe(c) for c in found)


def test_the_check_sees_a_breach_and_a_circle(tmp_path):
    """The check itself: a copy of the house with a ground-floor module that imports the
    trainer (function-locally) is named, file and import, and so is the circle it closes."""
    import shutil

    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    labels = tmp_path / "shared" / "labels.py"
    labels.write_text(labels.read_text() + "\n\ndef _late():\n    from trainer.losses import partial_ce\n")
    found = breaches(tmp_path)
    assert any(b.startswith("shared/labels.py:") and "imports trainer.losses (shared may import nothing of the project)" in b
               for b in found), found
    assert [c for c in cycles(tmp_path) if "shared.labels" in c and "trainer.losses" in c]
