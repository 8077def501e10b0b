"""The target's CPU attention with grouped K/V heads (dspark.target.attention) against
transformers' own sdpa attention, the oracle, on ragged verification steps."""

from __future__ import annotations

import pytest
import torch

from dspark.target import TargetModel
from dspark.target import attention
from dspark.target.ragged import verify_forward
from dspark.target.slot_cache import SlotCache
from conftest import TINY_MODELS


def _pair(family):
    fast = TargetModel(TINY_MODELS[family](vocab_size=32, hidden=32, layers=3), None, linear_kernel="aten")
    slow_model = TINY_MODELS[family](vocab_size=32, hidden=32, layers=3)
    slow = TargetModel(slow_model, None, linear_kernel="aten")
    slow_model.set_attn_implementation("sdpa")  # transformers' own
    return fast, slow


def _ragged_logits(target, seed=0):
    """Two rows at different positions of one slot cache: a prefill, then a 4-token step each."""
    g = torch.Generator().manual_seed(seed)
    cache = SlotCache.for_hf_config(target.model.config, 2, 64, torch.float32, target.device)
    prompts = [torch.randint(0, 32, (1, n), generator=g) for n in (11, 6)]
    with torch.no_grad():
        for slot, ids in enumerate(prompts):
            verify_forward(target, cache, [slot], [0], ids)
        feed = torch.randint(0, 32, (2, 4), generator=g)
        return verify_forward(target, cache, [0, 1], [11, 6], feed).logits


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_grouped_sdpa_matches_transformers_sdpa_on_ragged_steps(family):
    fast, slow = _pair(family)
    assert fast.grouped_sdpa and fast.model.config._attn_implementation == attention.ATTENTION_NAME
    assert slow.model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_ragged_logits(fast), _ragged_logits(slow), rtol=1e-5, atol=1e-5)


def test_grouped_sdpa_runs_where_transformers_would_repeat_heads(monkeypatch):
    """It takes the masked multi-query case itself (and a mutant that forgets the mask there is
    caught), and leaves one-query steps to transformers."""
    fast, slow = _pair("llama")
    reference = _ragged_logits(slow)
    taken = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        taken.append((q.shape[2], kw.get("enable_gqa", False)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _ragged_logits(fast)
    assert (4, True) in taken and all(not gqa for t, gqa in taken if t == 1)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None, **kw: real(q, k, v, **kw))  # the mutant: mask dropped
    assert not torch.allclose(_ragged_logits(fast), reference, atol=1e-3)
