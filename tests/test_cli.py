"""``dspark generate`` on its success paths. Bad input is ``tests/test_cli_errors.py``: it runs
the real entry point in a subprocess, where a traceback check can fail (under CliRunner it
cannot: the runner catches exceptions itself)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dspark.cli.main import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["generate", *args])


def test_help_lists_generate():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "generate" in result.output


def test_generate_help_names_device_and_dtype():
    result = runner.invoke(app, ["generate", "--help"])
    assert result.exit_code == 0 and "--device" in result.output and "--dtype" in result.output


@pytest.mark.slow
def test_json_output_has_the_documented_fields():
    result = _run("Count from one to ten.", "--max-new-tokens", "24", "--json", "--compare")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("text", "token_ids", "tau", "rounds", "tokens_per_second", "speedup", "verify_length"):
        assert key in data
    assert data["policy"] == "dspark"  # auto: the shipped drafter has a confidence head
    assert len(data["token_ids"]) <= 24
    assert data["identical_to_plain"] is True
    assert data["tau"] >= 1.0


@pytest.mark.slow
def test_generate_schedules_lookup_on_its_online_confidences():
    result = _run("Count from one to ten.", "--max-new-tokens", "16", "--json", "--compare", "--drafter", "ngram")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["policy"] == "dspark" and data["identical_to_plain"] is True
    result = _run("Count from one to ten.", "--max-new-tokens", "16", "--json", "--compare", "--drafter", "dspark+ngram")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["policy"] == "dspark" and data["identical_to_plain"] is True


@pytest.mark.slow
def test_generate_in_bfloat16_matches_plain_decoding():
    """--dtype bfloat16 loads the target and the DSpark drafter in bf16; greedy output stays plain decoding's."""
    result = _run("Count from one to ten.", "--max-new-tokens", "8", "--dtype", "bfloat16", "--json", "--compare")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["drafter"] == "dspark+ngram" and data["identical_to_plain"] is True


def test_make_drafter_puts_the_dspark_drafter_in_the_given_dtype():
    import torch

    from dspark.drafters import make_drafter

    drafter = make_drafter("dspark", dtype=torch.bfloat16)
    assert {p.dtype for p in drafter.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in make_drafter("dspark").model.parameters()} == {torch.float32}
    assert {p.dtype for p in make_drafter("dspark+ngram", dtype=torch.bfloat16).model.parameters()} == {torch.bfloat16}


def test_make_drafter_puts_a_draft_model_in_the_given_dtype(tmp_path):
    """Issue 29 item 10: the model: drafter honours --dtype (the target's) too."""
    import torch

    from conftest import tiny_llama
    from dspark.drafters import make_drafter

    tiny_llama(vocab_size=32, hidden=16).save_pretrained(tmp_path / "draft")
    drafter = make_drafter(f"model:{tmp_path / 'draft'}", dtype=torch.bfloat16)
    assert {p.dtype for p in drafter.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in make_drafter(f"model:{tmp_path / 'draft'}").model.parameters()} == {torch.float32}


def test_each_target_gets_its_own_shipped_drafter_else_ngram(tmp_path, monkeypatch):
    import dspark.drafters.factory as factory

    assert factory.default_drafter_spec() == factory.default_drafter_spec("smollm2-135m-instruct") == "dspark+ngram"
    assert factory.shipped_dspark_spec() == "dspark"
    assert factory.default_drafter_spec("gpt2") == "ngram"  # the SmolLM2 drafter does not fit another target
    shipped = tmp_path / "drafters"
    (shipped / "gemma3-270m-dspark").mkdir(parents=True)
    (shipped / "gemma3-270m-dspark" / "config.json").write_text("{}")
    monkeypatch.setattr(factory, "SHIPPED_DRAFTERS", shipped)
    assert factory.default_drafter_spec("gemma3-270m") == f"dspark:{shipped / 'gemma3-270m-dspark'}+ngram"
    assert factory.default_drafter_spec() == "ngram"  # no folder for the default target in this fake package
    # A bare `dspark` means the drafter shipped for the target; other specs are kept as given.
    assert factory.resolve_drafter("dspark", "gemma3-270m").text == f"dspark:{shipped / 'gemma3-270m-dspark'}"
    assert factory.resolve_drafter(None, "gemma3-270m").text == f"dspark:{shipped / 'gemma3-270m-dspark'}+ngram"
    assert factory.resolve_drafter("dspark+ngram", "gemma3-270m").text == f"dspark:{shipped / 'gemma3-270m-dspark'}+ngram"
    assert factory.resolve_drafter("dspark", "gpt2").text == "dspark"  # none shipped: the default target's (refused later)
    assert factory.resolve_drafter("ngram", "gemma3-270m").text == "ngram"
    assert factory.resolve_drafter("dspark:/x", "gemma3-270m").text == "dspark:/x"
    hybrid = factory.resolve_drafter(None, "gemma3-270m")
    assert (hybrid.kind, hybrid.arg, hybrid.hybrid) == ("dspark", str(shipped / "gemma3-270m-dspark"), True)
    assert hybrid.folder == shipped / "gemma3-270m-dspark" and hybrid.calibration_folder is None  # calibrates its own rows
    assert hybrid.base.calibration_folder == shipped / "gemma3-270m-dspark" and not hybrid.base.hybrid
    assert factory.resolve_drafter(hybrid) is hybrid  # read once: a parsed spec passes through


@pytest.mark.parametrize(
    "spec, kind, arg, hybrid, folder, calibration_folder",
    [
        ("none", "none", "", False, None, None),
        ("ngram", "ngram", "", False, None, None),
        ("model:org/draft", "model", "org/draft", False, None, None),
        ("dspark", "dspark", "", False, "shipped", "shipped"),
        ("dspark+ngram", "dspark", "", True, "shipped", None),
        ("dspark:/d/x:y", "dspark", "/d/x:y", False, "/d/x:y", "/d/x:y"),  # the first colon splits
        ("dflash:/d/f", "dflash", "/d/f", False, "/d/f", "/d/f"),
        ("eagle3:/d/e", "eagle3", "/d/e", False, "/d/e", None),
        ("eagle3", "eagle3", "", False, ".", None),
        ("dspark+ngram+ngram", "dspark+ngram", "", True, None, None),  # refused by make_drafter
        ("bogus:x", "bogus", "x", False, None, None),
    ],
)
def test_resolve_drafter_reads_every_kind_of_spec(spec, kind, arg, hybrid, folder, calibration_folder):
    from pathlib import Path

    from dspark.drafters import SHIPPED_DRAFTER, resolve_drafter

    as_path = lambda p: SHIPPED_DRAFTER if p == "shipped" else (None if p is None else Path(p))  # noqa: E731
    d = resolve_drafter(spec)
    assert (d.text, d.kind, d.arg, d.hybrid) == (spec, kind, arg, hybrid)
    assert d.folder == as_path(folder) and d.calibration_folder == as_path(calibration_folder)


@pytest.mark.slow  # three subprocesses that import torch and transformers: ~30 s on a busy 2-core machine
def test_generate_with_a_tiny_temperature_or_top_p_is_greedy_decoding(tmp_path):
    """`--temperature 1e-37` and `--top-p 1e-300` on a model whose logits reach ~100 (so l / T
    overflows float32) print the greedy answer; they used to exit with a crash trace after
    loading the model ("probability tensor contains either inf, nan or element < 0")."""
    import os
    import subprocess
    import sys

    import torch

    from conftest import tiny_llama
    from dspark.target import TargetModel
    from serve_helpers import load_tokenizer

    tokenizer = load_tokenizer()
    folder = tmp_path / "tiny-loud"
    target = TargetModel(tiny_llama(vocab_size=len(tokenizer), hidden=16, layers=3, scale=300.0), tokenizer)
    target.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with torch.no_grad():
        logits = target.model(torch.tensor([target.encode_prompt("Hello there.", chat=True)])).logits
    assert float(logits.abs().max()) > 40  # l / 1e-37 is past float32's max

    def generate(*args: str) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "dspark", "generate", "Hello there.", "--model", str(folder),
                               "--drafter", "none", "--max-new-tokens", "8", "--json", *args],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        return json.loads(done.stdout)

    greedy = generate("--temperature", "0")["token_ids"]
    assert generate("--temperature", "1e-37")["token_ids"] == greedy
    assert generate("--temperature", "1", "--top-p", "1e-300", "--seed", "3")["token_ids"] == greedy
