"""The package's import graph has no cycles and respects the layers of docs/ARCHITECTURE.md.

Every ``import`` / ``from ... import`` of a dspark module in every file under ``src/dspark``
is an edge, imports inside functions included (a lazy import still ties two modules
together). ``from dspark.a import b`` is an edge to ``dspark.a.b`` when that is a module,
else to ``dspark.a``; a package means its ``__init__.py``. Importing ``dspark.a.b`` also runs
``dspark/a/__init__.py`` first, but that is no edge here: a package's ``__init__`` that
re-exports its own submodules would otherwise always sit on a cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "dspark"

LAYERS = {
    "dspark": 0,  # the package's own __init__ (the version string only)
    "dspark.errors": 0,
    "dspark.sampling": 0,
    "dspark.verify": 0,
    "dspark.timing": 0,
    "dspark.target": 1,
    "dspark.drafters": 2,
    "dspark.scheduling": 2,
    "dspark.engine": 3,
    "dspark.evaluation": 4,
    "dspark.training": 4,
    "dspark.serving": 4,  # the HTTP server over the batched engine; `dspark serve` starts it
    "dspark.cli": 5,  # every command, and the error boundary (dspark.cli.edge); the only importer of typer
    "dspark.__main__": 6,
}
"""Rank of each layer: a module may import its own layer and lower ranks only."""
INDEPENDENT = {("dspark.drafters", "dspark.scheduling"), ("dspark.scheduling", "dspark.drafters")}
"""Layers of one rank that must not import each other: drafters and schedulers talk only
through the engine (a DraftGate is a plain callable the engine builds from a policy)."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root / package``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_edges(root: Path, package: str) -> tuple[dict[str, Path], list[Edge], list[str]]:
    """(modules, edges between them, imports of ``package`` modules that do not exist)."""
    modules = module_files(root, package)
    edges, missing = [], []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in dict.fromkeys(targets):
                if target != package and not target.startswith(package + "."):
                    continue
                if target not in modules:
                    missing.append(f"{path.relative_to(root)}:{node.lineno}: {target}")
                elif target != name:
                    edges.append(Edge(name, target, node.lineno))
    return modules, edges, missing


def find_cycles(modules, edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected component of two or more modules."""
    graph: dict[str, list[Edge]] = {m: [] for m in modules}
    for e in edges:
        graph[e.source].append(e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.target not in index:
                connect(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in graph:
        if v not in index:
            connect(v)
    return [_cycle_through(sorted(c)[0], set(c), graph) for c in components]


def _cycle_through(start: str, members: set[str], graph: dict[str, list[Edge]]) -> list[Edge]:
    """A shortest path of edges from ``start`` back to itself inside one component (BFS)."""
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph[v]:
                if e.target not in members:
                    continue
                if e.target == start:
                    path = [e]
                    while path[0].source != start:
                        path.insert(0, came_from[path[0].source])
                    return path
                if e.target not in came_from:
                    came_from[e.target] = e
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in its component")


def describe(cycle: list[Edge], modules) -> str:
    steps = [f"{e.source} ({modules[e.source].name}:{e.line})" for e in cycle]
    return " -> ".join(steps + [cycle[0].source])


def layer_of(module: str) -> str | None:
    """The layer ``module`` lies in: a top-level module or subpackage of dspark (None if unlisted)."""
    for layer in LAYERS:
        if module == layer or (layer != PACKAGE and module.startswith(layer + ".")):
            return layer
    return None


def importers_of(root: Path, package: str, name: str) -> list[str]:
    """``module (file:line)`` for every import of the top-level package ``name`` (``import
    name``, ``import name.x``, ``from name[.x] import ...``) in any module of ``package``,
    imports inside functions included."""
    found = []
    for module, path in module_files(root, package).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(n == name or n.startswith(name + ".") for n in names):
                found.append(f"{module} ({path.name}:{node.lineno})")
    return found


@pytest.fixture(scope="module")
def graph():
    return import_edges(SRC, PACKAGE)


def test_every_dspark_import_names_a_module_that_exists(graph):
    _, _, missing = graph
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_the_module_graph_has_no_cycles(graph):
    modules, edges, _ = graph
    assert len(modules) > 30 and len(edges) > 50  # the walk really saw the package
    cycles = find_cycles(modules, edges)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, modules) for c in cycles)


def test_every_module_belongs_to_a_layer(graph):
    modules, _, _ = graph
    unlisted = [m for m in modules if layer_of(m) is None]
    assert not unlisted, f"modules in no layer of LAYERS: {unlisted}"


def test_imports_follow_the_layers(graph):
    modules, edges, _ = graph
    bad = []
    for e in edges:
        src, dst = layer_of(e.source), layer_of(e.target)
        if src is None or dst is None:
            continue  # test_every_module_belongs_to_a_layer names it
        if LAYERS[dst] > LAYERS[src] or (src, dst) in INDEPENDENT:
            bad.append(f"{e.source} imports {e.target} ({modules[e.source].name}:{e.line}): {src} must not import {dst}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("dspark.drafters", ("dspark.scheduling", "dspark.engine")),
        ("dspark.scheduling", ("dspark.drafters", "dspark.engine")),
        ("dspark.target", ("dspark.drafters", "dspark.scheduling", "dspark.engine")),
    ],
)
def test_protocol_layers_stay_apart(graph, layer, forbidden):
    modules, edges, _ = graph
    assert any(layer_of(m) == layer for m in modules)
    bad = [f"{e.source} -> {e.target} (line {e.line})" for e in edges
           if layer_of(e.source) == layer and layer_of(e.target) in forbidden]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_a_planted_cycle_and_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.a import A\n")
    (pkg / "sub" / "a.py").write_text("from pkg.sub import b\nA = 1\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import C\n    return C\n")  # relative, lazy
    (pkg / "c.py").write_text("import pkg.sub.a\nimport pkg.nowhere\nC = 2\n")
    modules, edges, missing = import_edges(tmp_path, "pkg")
    assert missing == [f"{Path('pkg', 'c.py')}:2: pkg.nowhere"]
    cycles = find_cycles(modules, edges)
    assert len(cycles) == 1
    assert describe(cycles[0], modules).split(" -> ")[0].startswith("pkg.c ")
    assert {e.source for e in cycles[0]} == {"pkg.c", "pkg.sub.a", "pkg.sub.b"}


SHARED_DRAFTER_MODULES = ("dspark.drafters.vocab", "dspark.drafters.families", "dspark.drafters.drafter_config",
                          "dspark.drafters.one_slot")
"""What the DSpark and EAGLE-3 drafters share; neither drafter package imports the other."""


@pytest.mark.parametrize(
    "source, forbidden",
    [
        ("dspark.drafters.dspark", ("dspark.drafters.eagle3",)),
        ("dspark.drafters.eagle3", ("dspark.drafters.dspark",)),
        *[(shared, ("dspark.drafters.dspark", "dspark.drafters.eagle3")) for shared in SHARED_DRAFTER_MODULES],
    ],
)
def test_the_dspark_and_eagle3_drafters_share_modules_but_never_import_each_other(graph, source, forbidden):
    # Both build on the shared drafter modules (vocabulary, layer families, checkpoint checks,
    # the batch-1 wrapper); each stays usable, and readable, without the other.
    modules, edges, _ = graph
    assert any(m == source or m.startswith(source + ".") for m in modules)
    bad = [f"{e.source} -> {e.target} (line {e.line})" for e in edges
           if (e.source == source or e.source.startswith(source + "."))
           and any(e.target == f or e.target.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_typer():
    # Every command lives in dspark.cli; the library below it can be used without typer.
    importers = importers_of(SRC, PACKAGE, "typer")
    assert any(m.startswith("dspark.cli.") for m in importers)  # the walk really saw the commands
    outside = [m for m in importers if layer_of(m.split(" ")[0]) != "dspark.cli"]
    assert not outside, "typer imported outside dspark.cli:\n" + "\n".join(outside)


def test_the_typer_check_catches_every_form_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import typer\n")
    (pkg / "b.py").write_text("def f():\n    from typer.core import TyperGroup\n    return TyperGroup\n")
    (pkg / "c.py").write_text("import typing\nimport typer_extra\nfrom . import typer\n")  # none of these is typer
    assert importers_of(tmp_path, "pkg", "typer") == ["pkg.a (a.py:1)", "pkg.b (b.py:2)"]


ENGINES = ("BatchEngine", "SpeculativeEngine")
"""The engine classes; only the composition root (src/dspark/engine/build.py) constructs them."""


def engine_constructions(paths) -> list[str]:
    """``file:line`` of every call ``BatchEngine(...)`` / ``SpeculativeEngine(...)`` (bare or as
    an attribute) in ``paths``."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ENGINES:
                    found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}")
    return found


def test_engines_are_built_only_by_the_composition_root():
    root = SRC.parent
    built = engine_constructions(sorted((root / "src" / PACKAGE).rglob("*.py")) + sorted((root / "benchmarks").rglob("*.py")))
    assert any(b.startswith(str(Path("src", PACKAGE, "engine", "build.py"))) for b in built)  # the walk saw it
    outside = [b for b in built if not b.startswith(str(Path("src", PACKAGE, "engine", "build.py")) + ":")]
    assert not outside, "engines built outside dspark.engine.build:\n" + "\n".join(outside)
