"""Greedy speculative decoding equals plain greedy decoding on the real default model.

The oracle is transformers' own ``generate(do_sample=False)``, which shares no code with
the engine. Each drafter must reproduce it token for token on varied prompts.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from dspark.drafters import SHIPPED_DRAFTER, make_drafter
from dspark.drafters.draft_model import DraftModelDrafter
from dspark.drafters.ngram import NgramDrafter
from dspark.engine import GenerationRequest, SpeculativeEngine

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in three sentences why the sky is blue.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
    "List five fruits and their colours as a markdown table.",
    "def quicksort(arr):\n    # complete this function",
    "Translate 'The cat sleeps on the warm windowsill' into French.",
    "Write a haiku about autumn leaves.",
    "What is the capital of Australia? Answer, then repeat the answer twice.",
    "Write a SQL query that selects the ten most recent orders from a table named orders.",
    "Give me a JSON object describing a book with title, author and year.",
    "Repeat after me: one two three four five, one two three four five.",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def oracle(default_target):
    """Plain greedy continuations from transformers' generate()."""
    outputs = {}
    model = default_target.model
    for prompt in PROMPTS:
        ids = torch.tensor([default_target.encode_prompt(prompt)])
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                do_sample=False, pad_token_id=model.config.eos_token_id,
            )
        outputs[prompt] = out[0, ids.shape[1]:].tolist()
    return outputs


def _drafters(target):
    random_small = tiny_llama(vocab_size=target.vocab_size, hidden=32, layers=1, seed=3)
    return {
        "ngram": lambda: NgramDrafter(),
        "draft-model-self": lambda: DraftModelDrafter(target.model, gamma=4, name="self"),
        "draft-model-random": lambda: DraftModelDrafter(random_small, gamma=3, name="random"),
        "dspark-random": lambda: _random_dspark(target),
        "dspark-shipped": lambda: make_drafter("dspark"),
    }


def _random_dspark(target):
    """A random-init DSpark drafter at the real target's shapes: mostly rejected drafts."""
    from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel

    torch.manual_seed(0)
    model = DSparkModel(DSparkConfig.for_target(target, num_hidden_layers=1, markov_rank=16))
    with torch.no_grad():
        model.markov_head.markov_w2.weight.normal_(std=0.5)
    return DSparkDrafter(model)


DRAFTERS = ["ngram", "draft-model-self", "draft-model-random", "dspark-random"]
if (SHIPPED_DRAFTER / "config.json").is_file():
    DRAFTERS.append("dspark-shipped")


@pytest.mark.parametrize("drafter_name", DRAFTERS)
def test_speculative_greedy_equals_plain_generate(default_target, oracle, drafter_name):
    drafter = _drafters(default_target)[drafter_name]()
    engine = SpeculativeEngine(default_target, drafter)
    accepted = 0
    for prompt in PROMPTS:
        request = GenerationRequest(default_target.encode_prompt(prompt), max_new_tokens=NEW_TOKENS)
        result = engine.generate(request)
        assert result.token_ids == oracle[prompt], f"{drafter_name} diverged on {prompt!r}"
        accepted += sum(result.stats.accepted)
    if drafter_name not in ("draft-model-random", "dspark-random"):
        assert accepted > 0, "the drafter never got a token accepted, so nothing was tested"
