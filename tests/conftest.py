"""Shared fixtures: tiny random-init targets (milliseconds) and the real default model (slow)."""

from __future__ import annotations

import os

import pytest
import torch

# The suite runs in parallel workers (pytest-xdist, `-n 2` in pyproject's addopts): each
# worker takes an equal share of the cores, so two workers never oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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


def tiny_qwen3(vocab_size: int = 8, seed: int = 0, hidden: int = 16, layers: int = 2, scale: float = 1.0):
    """A random Qwen3ForCausalLM (per-head q/k norms) shaped like :func:`tiny_llama`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return _scaled_head(Qwen3ForCausalLM(config), scale)


GEMMA3_SOFTCAP = 3.0
"""The tiny Gemma 3's final-logit soft cap: small enough to bind on its logits (Gemma 2 used 30)."""


def tiny_gemma3(vocab_size: int = 8, seed: int = 0, hidden: int = 16, layers: int = 3, scale: float = 1.0,
                softcap: float | None = GEMMA3_SOFTCAP, sliding_window: int = 4):
    """A random Gemma3ForCausalLM: sandwich norms, sqrt(d)-scaled embedding, q/k norms, local
    (sliding-window, θ = 10k) and global (full, θ = 1M) layers, and final-logit soft-capping.

    Random-init Gemma norms are zeros, i.e. the identity, so the norm weights are randomised
    too. ``sliding_window`` is shorter than the tests' sequences, so the local layers do
    mask. The LM head is untied from the embedding so ``scale`` sharpens logits only.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, query_pre_attn_scalar=hidden // 2,
        max_position_embeddings=256, sliding_window=sliding_window,
        layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(layers)],
        final_logit_softcapping=softcap, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.normal_(std=0.3)
    return _scaled_head(model, scale)


def _scaled_head(model, scale: float):
    model.eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.requires_grad_(False)
    return model


TINY_MODELS = {"llama": tiny_llama, "qwen3": tiny_qwen3, "gemma3": tiny_gemma3}
"""Tiny random-init causal LMs by drafter layer family (the family the target's model_type maps to)."""


def tiny_target(family: str = "llama", **kwargs):
    from dspark.target import TargetModel

    return TargetModel(TINY_MODELS[family](**kwargs), tokenizer=None, name="tiny" if family == "llama" else f"tiny-{family}")


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
