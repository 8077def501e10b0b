"""Committed results, shipped assets and docs name files by repository-relative paths: an
absolute path of the checkout they were made in means nothing on a user's machine."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("benchmarks/results", "benchmarks/checkpoints", "src/dspark/assets", "docs", "README.md")
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|root|home/[\w.-]+|Users/[\w.-]+)/[\w.-]+")
"""An absolute path under a checkout's usual homes (this project's machines: /work, /root)."""


def committed_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", *CHECKED], cwd=REPO, capture_output=True, text=True)
    if listed.returncode:
        pytest.skip("not a git checkout")
    paths = [REPO / p for p in listed.stdout.split("\0") if p]
    return [p for p in paths if p.suffix in (".json", ".jsonl", ".md", ".txt", ".csv", ".sh", ".py") and p.is_file()]


def machine_paths(text: str) -> list[str]:
    return MACHINE_PATH.findall(text)


def test_the_pattern_finds_machine_paths_and_nothing_else():
    assert machine_paths('"command": "/work/main/.venv/bin/python x"') == ["/work/main"]
    assert machine_paths("at /root/.cache/dspark and /home/alice/runs") == ["/root/.cache", "/home/alice/runs"]
    assert machine_paths("benchmarks/results/eval_t0_hybrid, https://example.org/work/x, ./work/y") == []


def test_no_committed_result_asset_or_doc_holds_a_machine_path():
    found = {}
    for path in committed_text_files():
        hits = machine_paths(path.read_text(encoding="utf-8", errors="ignore"))
        if hits:
            found[str(path.relative_to(REPO))] = sorted(set(hits))[:3]
    assert not found, found
