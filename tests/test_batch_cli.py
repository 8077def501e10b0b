"""``dspark batch``: the prompt file's checks, and greedy answers equal plain decoding's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dspark.cli.batch import read_prompts
from dspark.errors import DsparkError

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.mark.parametrize(
    "body, message",
    [
        ("", "holds no prompts"),
        ("{not json\n", "not JSON"),
        ("[1, 2]\n", "expected a JSON object"),
        ('{"prompt": "a", "n": 2}\n', "unknown field"),
        ('{"prompt": "a", "turns": ["b"]}\n', "exactly one of"),
        ('{"prompt": "   "}\n', "empty"),
        ('{"turns": []}\n', "empty"),
    ],
)
def test_bad_prompt_files_name_the_line(tmp_path, body, message):
    path = tmp_path / "p.jsonl"
    path.write_text(body)
    with pytest.raises(DsparkError, match=message):
        read_prompts(path)


def test_good_prompt_lines_are_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"id": "x", "turns": ["b", "c"], "seed": 3}\n{"messages": [{"role": "user", "content": "c"}]}\n')
    assert [line.get("id") for line in read_prompts(path)] == [None, "x", None]


def run_batch(prompts: Path, out: Path, *args: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dspark", "batch", str(prompts), "--out", str(out), "--max-new-tokens", "12", *args],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: str(r["id"]))


@pytest.mark.slow
def test_batch_greedy_answers_equal_plain_decoding(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Write a haiku.", "What is 7*6?", "def fib(n):")))
    plain = run_batch(prompts, tmp_path / "plain.jsonl", "--policy", "plain")
    spec = run_batch(prompts, tmp_path / "spec.jsonl", "--policy", "fixed:3", "--max-batch", "2")
    assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain]
    assert all(r["new_tokens"] == 12 or r["finish_reason"] != "length" for r in spec)
    summary = json.loads((tmp_path / "spec.summary.json").read_text())
    assert summary["policy"] == "fixed-3" and summary["tokens_per_second"] > 0


@pytest.mark.slow
def test_a_tiny_temperature_or_top_p_line_decodes_greedily_and_every_result_is_written(tmp_path):
    """Lines asking for temperature 1e-37 or top_p 1e-300 give the greedy answer beside a
    sampled line; one such line used to end the whole run with no result written."""
    prompts = tmp_path / "p.jsonl"
    lines = [{"id": "greedy", "prompt": "What is 7*6?"}, {"id": "tiny-t", "prompt": "What is 7*6?", "temperature": 1e-37},
             {"id": "tiny-p", "prompt": "What is 7*6?", "temperature": 0.8, "top_p": 1e-300},
             {"id": "sampled", "prompt": "def fib(n):", "temperature": 0.8}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = {r["id"]: r for r in run_batch(prompts, tmp_path / "out.jsonl", "--policy", "fixed:3", "--max-batch", "4")}
    assert set(got) == {"greedy", "tiny-t", "tiny-p", "sampled"}
    assert got["tiny-t"]["token_ids"] == got["greedy"]["token_ids"] == got["tiny-p"]["token_ids"]
