"""docs/ARCHITECTURE.md stays true: one line per module under src/dspark, and every module,
name and file it mentions exists.

The module table (the ``## Modules`` section) must list every module exactly once, with one
short sentence; anywhere in the doc, a dotted name in backticks (``dspark.engine.build``,
``dspark.scheduling.gate.slot_gate``) must be a module or a name defined at the top of one,
and a ``.py`` path (``engine/batched.py``, ``tests/test_imports.py``) must be a file of the
repository (paths in the pictures are relative to ``src/dspark``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from test_imports import PACKAGE, SRC, module_files

ROOT = SRC.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
MAX_ROLE = 200
"""Characters of one module's sentence at most: a line, not a paragraph."""

ROW = re.compile(r"^\| `([\w.]+)` \| (.*) \|$")
DOTTED = re.compile(r"`(dspark(?:\.\w+)*)`")
PY_PATH = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.py)\b")


def module_rows(doc: str) -> list[tuple[str, str]]:
    """(module, role) for every row of the table in the ``## Modules`` section."""
    section = doc.split("\n## Modules", 1)[1].split("\n## ", 1)[0] if "\n## Modules" in doc else ""
    return [m.groups() for m in map(ROW.match, section.splitlines()) if m]


def top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def problems(doc: str, modules: dict[str, Path], root: Path) -> list[str]:
    """Everything the doc gets wrong about the package (empty when it is true)."""
    found = []
    rows = module_rows(doc)
    listed = [name for name, _ in rows]
    found += [f"module not in the table: {m}" for m in sorted(set(modules) - set(listed))]
    found += [f"listed twice: {m}" for m in sorted({m for m in listed if listed.count(m) > 1})]
    for name, role in rows:
        if name not in modules:
            found.append(f"the table lists a module that does not exist: {name}")
        if not role.strip() or len(role) > MAX_ROLE:
            found.append(f"{name}: its line must be one short sentence (1..{MAX_ROLE} characters, has {len(role)})")
    for dotted in sorted(set(DOTTED.findall(doc))):
        module, _, attr = dotted.rpartition(".")
        if dotted in modules:
            continue
        if module in modules and attr in top_level_names(modules[module]):
            continue
        found.append(f"names {dotted!r}: neither a module nor a name defined in one")
    for path in sorted(set(PY_PATH.findall(doc))):
        if not any((base / path).is_file() for base in (root, root / "src" / PACKAGE, root / "src")):
            found.append(f"names a file that does not exist: {path}")
    return found


def test_the_architecture_doc_lists_every_module_once_and_names_only_what_exists():
    modules = module_files(SRC, PACKAGE)
    doc = DOC.read_text(encoding="utf-8")
    assert len(module_rows(doc)) > 50  # the parse really found the table
    found = problems(doc, modules, ROOT)
    assert not found, "docs/ARCHITECTURE.md is out of date:\n" + "\n".join(found)


def test_the_doc_check_catches_a_missing_line_a_ghost_module_and_a_ghost_file():
    modules = module_files(SRC, PACKAGE)
    doc = DOC.read_text(encoding="utf-8")
    dropped = "\n".join(line for line in doc.splitlines() if not line.startswith("| `dspark.engine.batched` |"))
    assert problems(dropped, modules, ROOT) == ["module not in the table: dspark.engine.batched"]
    ghost = doc.replace("| `dspark.timing` |", "| `dspark.timing` | x |\n| `dspark.clock` |", 1)
    assert problems(ghost, modules, ROOT) == ["the table lists a module that does not exist: dspark.clock",
                                              "names 'dspark.clock': neither a module nor a name defined in one"]
    moved = doc + "\nSee `dspark.engine.build.make_engine` in engine/builder.py.\n"
    assert problems(moved, modules, ROOT) == ["names 'dspark.engine.build.make_engine': neither a module nor a name "
                                              "defined in one", "names a file that does not exist: engine/builder.py"]
