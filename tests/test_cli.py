"""The CLI answers bad input with one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_llama
from dspark.cli.main import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["generate", *args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["   "], "prompt is empty"),
        (["hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
        (["hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["hi", "--max-new-tokens", "1000000000"], "--max-new-tokens"),
        (["hi", "--temperature", "-0.5"], "temperature must be >= 0"),
        (["hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["hi", "--top-k", "-1"], "top_k"),
        (["hi", "--gamma", "0"], "--gamma"),
        (["hi", "--model", "/no/such/model/folder"], "unknown model"),
        (["hi", "--model", "/no/such/file.gguf"], "GGUF file not found"),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_help_lists_generate():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "generate" in result.output


@pytest.mark.slow
def test_unknown_drafter_is_a_clear_error():
    result = _run("hi", "--drafter", "telepathy", "--max-new-tokens", "4")
    assert result.exit_code == 2
    assert "unknown drafter 'telepathy'" in result.stderr


@pytest.mark.slow
def test_drafter_with_other_vocabulary_is_refused(tmp_path):
    tiny_llama(vocab_size=100).save_pretrained(tmp_path / "tiny")
    result = _run("hi", "--drafter", f"model:{tmp_path / 'tiny'}", "--max-new-tokens", "4")
    assert result.exit_code == 2
    assert "vocabulary (100) does not match the target's (49152)" in result.stderr


@pytest.mark.slow
def test_context_window_overflow_is_a_clear_error():
    result = _run("hi", "--max-new-tokens", "100000")
    assert result.exit_code == 2
    assert "context window" in result.stderr


@pytest.mark.slow
def test_json_output_has_the_documented_fields():
    result = _run("Count from one to ten.", "--max-new-tokens", "24", "--json", "--compare")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("text", "token_ids", "tau", "rounds", "tokens_per_second", "speedup"):
        assert key in data
    assert len(data["token_ids"]) <= 24
    assert data["identical_to_plain"] is True
    assert data["tau"] >= 1.0
