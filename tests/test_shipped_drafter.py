"""The trained DSpark drafter that ships inside the package (the default of `dspark generate`)."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.drafters import SHIPPED_DRAFTER, SHIPPED_DRAFTERS, default_drafter_spec
from dspark.drafters.dspark import DSparkConfig


def test_shipped_drafter_is_small_fp16_and_fits_the_default_target():
    from safetensors.torch import load_file

    weights = SHIPPED_DRAFTER / "model.safetensors"
    assert weights.is_file(), "the package must ship a trained DSpark drafter"
    assert weights.stat().st_size <= 25 * 2**20
    state = load_file(str(weights))
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in state)
    config = DSparkConfig.load(SHIPPED_DRAFTER)
    assert (config.vocab_size, config.hidden_size, config.num_target_layers) == (49152, 576, 30)
    assert config.markov_rank > 0 and config.enable_confidence_head
    assert default_drafter_spec() == "dspark+ngram"  # the hybrid with prompt lookup
    if config.reduced_vocab:  # the speculators layout: d2t offsets and the t2d mask
        assert state["d2t"].dtype == torch.int64 and state["d2t"].shape == (config.num_draft_tokens,)
        assert state["t2d"].dtype == torch.bool and int(state["t2d"].sum()) == config.num_draft_tokens
        assert state["markov_head.markov_w2.weight"].shape[0] == config.num_draft_tokens


def test_shipped_calibration_has_one_temperature_per_slot():
    from dspark.scheduling.calibration import Calibration

    calibration = Calibration.load(SHIPPED_DRAFTER)
    assert calibration is not None, "run `dspark calibrate` on the shipped drafter"
    config = json.loads((SHIPPED_DRAFTER / "config.json").read_text())
    assert len(calibration.temperatures) == config["block_size"]
    assert all(t > 0 for t in calibration.temperatures)


def test_the_gemma3_drafter_is_small_with_w1_over_its_draft_vocabulary():
    """Gemma 3's 262,144-token vocabulary: a V-row W1 alone would be 16.8 MB of fp16 at rank 32."""
    from safetensors.torch import load_file

    folder = SHIPPED_DRAFTERS / "gemma3-270m-dspark"
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    state = load_file(str(weights))
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    config = DSparkConfig.load(folder)
    assert config.vocab_size == 262144 and config.layer_family == "gemma3" and config.reduced_vocab
    assert config.markov_w1_vocab == "draft"
    assert state["markov_head.markov_w1.weight"].shape == (config.num_draft_tokens + 1, config.markov_rank)
    assert default_drafter_spec("gemma3-270m") == f"dspark:{folder}+ngram"
    from dspark.scheduling.calibration import Calibration

    assert len(Calibration.load(folder).temperatures) == config.block_size


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["vllm", "sglang", "llama.cpp", "speculators", "deepspec"])
def test_the_shipped_smollm2_drafter_exports_for_every_engine(engine, tmp_path):
    """A Qwen3 backbone (issue 24): every engine's exporter takes the shipped drafter as it is."""
    from typer.testing import CliRunner

    from dspark.cli.main import app

    assert DSparkConfig.load(SHIPPED_DRAFTER).layer_family == "qwen3"
    result = CliRunner().invoke(app, ["convert", "export", str(SHIPPED_DRAFTER), str(tmp_path / "out"), "--engine", engine, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["engine"] == engine and summary["keys"] and summary["serve"]
    if engine == "sglang":  # calibrated, so SGLang gets its STS file
        assert (tmp_path / "out" / "sts.json").is_file()
