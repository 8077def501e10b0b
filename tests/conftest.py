"""Shared fixtures: tiny random-init targets (milliseconds) and the real default model (slow)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(vocab_size: int = 8, seed: int = 0, hidden: int = 16, layers: int = 2, scale: float = 1.0):
    """A random LlamaForCausalLM small enough to enumerate its output distribution.

    ``scale`` multiplies the LM head so the next-token distributions are far from uniform.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.requires_grad_(False)
    return model


def tiny_target(**kwargs):
    from dspark.target import TargetModel

    return TargetModel(tiny_llama(**kwargs), tokenizer=None, name="tiny")


def random_dspark_model(target, seed: int = 1, **overrides):
    """A random-init DSparkModel for ``target`` in eval mode, with random (not zero) Markov and
    confidence heads so that every path matters; ``overrides`` go to DSparkConfig.for_target."""
    from dspark.drafters.dspark import DSparkConfig, DSparkModel

    torch.manual_seed(seed)
    model = DSparkModel(DSparkConfig.for_target(target, **overrides)).eval()
    with torch.no_grad():
        if model.markov_head is not None:
            model.markov_head.markov_w2.weight.normal_(std=0.5)
        if model.confidence_head is not None:
            model.confidence_head.proj.weight.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: thread hand-offs cost more than their
    matmuls, and a second busy process makes multi-threaded torch an order of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def default_target():
    """The embedded SmolLM2-135M-Instruct (de-quantized once into the user cache)."""
    from dspark.target import TargetModel

    return TargetModel.load(None)
