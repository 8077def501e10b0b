"""The README and docs/ link only to what is in the repository, and the README stays short.

Every relative link in README.md, docs/**/*.md and the benchmarks' READMEs must name a file or
folder that exists in this repository and is not git-ignored (a restored checkpoint, say, is
not in a fresh clone), and a ``#fragment`` on a markdown target must name one of its headings
(GitHub's slugs). No link may start with ``../shared`` or be an absolute machine path: those
work on one machine only. Public web addresses are fine. Links inside code are not links.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 450
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]*)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
MACHINE_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|file:)")


def documents(root: Path = REPO) -> list[Path]:
    docs = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    docs += [p for p in (root / "benchmarks" / "README.md", root / "benchmarks" / "checkpoints" / "README.md") if p.exists()]
    return [p for p in docs if p.exists()]


def prose_lines(text: str):
    """(line number, line with code spans removed) for every line outside fenced code."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, CODE_SPAN.sub("", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: Counter = Counter()
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(match.group(1))
            out.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    return out


def ignored(path: Path, root: Path) -> bool:
    if shutil.which("git") is None or not (root / ".git").exists():
        return False
    return subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(path)]).returncode == 0


def broken_links(doc: Path, root: Path = REPO) -> list[str]:
    """Every problem with the links of one markdown file, as 'file:line: target: why'."""
    problems = []
    where = doc.relative_to(root)
    for number, line in prose_lines(doc.read_text(encoding="utf-8")):
        for match in LINK.finditer(line):
            target = match.group(1).strip("<>")
            if not target or re.match(r"^[a-z][a-z0-9+.-]*://", target) or target.startswith("mailto:"):
                continue
            if target.startswith("../shared"):
                problems.append(f"{where}:{number}: {target}: outside the repository (../shared)")
                continue
            if MACHINE_PATH.match(target):
                problems.append(f"{where}:{number}: {target}: an absolute machine path")
                continue
            path_part, _, fragment = target.partition("#")
            path_part = path_part.split("?")[0]
            dest = (doc.parent / path_part).resolve() if path_part else doc
            if not dest.is_relative_to(root.resolve()):
                problems.append(f"{where}:{number}: {target}: outside the repository")
            elif not dest.exists():
                problems.append(f"{where}:{number}: {target}: no such file")
            elif ignored(dest, root):
                problems.append(f"{where}:{number}: {target}: git-ignored, so not in a clone")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                problems.append(f"{where}:{number}: {target}: no heading #{fragment} in {dest.relative_to(root.resolve())}")
    return problems


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_stay_inside_the_repository(doc):
    assert broken_links(doc) == []


def test_docs_exist_and_are_found():
    found = {p.relative_to(REPO).as_posix() for p in documents()}
    assert {"README.md", "docs/results.md", "docs/errors.md"} <= found


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_the_checker_catches_each_kind_of_bad_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("# A heading: with `code`\n\ntext\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/real.md) [ok anchor](docs/real.md#a-heading-with-code) [web](https://example.com/x)\n"
        "`[in code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](docs/missing.md)\n"
        "[shared](../shared/reference/paper.pdf)\n"
        "[abs](/srv/checkout/README.md)\n"
        "[home](~/notes.md)\n"
        "[bad anchor](docs/real.md#no-such-heading)\n"
        "[up and out](../outside.md)\n"
    )
    problems = broken_links(doc, tmp_path)
    assert [p.split(": ", 1)[0] for p in problems] == [f"README.md:{n}" for n in (6, 7, 8, 9, 10, 11)], problems
    assert "no such file" in problems[0] and "../shared" in problems[1] and "absolute" in problems[2]
    assert "absolute" in problems[3] and "no heading" in problems[4] and "outside the repository" in problems[5]
