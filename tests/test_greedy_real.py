"""Greedy speculative decoding equals plain greedy decoding on the real default model.

The oracle is transformers' own ``generate(do_sample=False)``, which shares no code with
the engine. Each drafter must reproduce it token for token on varied prompts.

Random drafters are almost never right, so on their own every round would end at slot 1.
They run behind :class:`BoundaryDrafter`, which makes round after round end at each slot of
the block in turn (and at its end: the bonus token), so that a few short generations roll the
cache back by every possible amount.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_llama
from dspark.drafters import SHIPPED_DRAFTER, make_drafter
from dspark.drafters.base import DraftBlock, DraftInput
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
RANDOM_PROMPTS = [PROMPTS[2], PROMPTS[4], PROMPTS[10]]  # prose with numbers, code, repetition
RANDOM_NEW_TOKENS = 40
"""Random drafters: 3 prompts of 40 tokens end rounds at every slot (asserted) in ~30-50 rounds."""


@pytest.fixture(scope="module")
def oracle(default_target):
    """Plain greedy continuation of a prompt from transformers' generate(), NEW_TOKENS long,
    computed once per prompt on first use and shared by every test of the module."""
    outputs: dict[str, list[int]] = {}
    model = default_target.model

    def continuation(prompt: str) -> list[int]:
        if prompt not in outputs:
            ids = torch.tensor([default_target.encode_prompt(prompt)])
            with torch.inference_mode():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                    do_sample=False, pad_token_id=model.config.eos_token_id,
                )
            outputs[prompt] = out[0, ids.shape[1]:].tolist()
        return outputs[prompt]

    return continuation


def _drafters(target):
    random_small = tiny_llama(vocab_size=target.vocab_size, hidden=32, layers=1, seed=3)
    return {
        "ngram": lambda: NgramDrafter(),
        "draft-model-self": lambda: DraftModelDrafter(target.model, gamma=4, name="self"),
        "draft-model-random": lambda: DraftModelDrafter(random_small, gamma=3, name="random"),
        "dspark-random": lambda: _random_dspark(target),
        "dspark-shipped": lambda: make_drafter("dspark"),
        "dspark+ngram-shipped": lambda: make_drafter("dspark+ngram"),
    }


def _random_dspark(target):
    """A random-init DSpark drafter at the real target's shapes: mostly rejected drafts."""
    from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel

    torch.manual_seed(0)
    model = DSparkModel(DSparkConfig.for_target(target, num_hidden_layers=1, markov_rank=16))
    with torch.no_grad():
        model.markov_head.markov_w2.weight.normal_(std=0.5)
    return DSparkDrafter(model)


class BoundaryDrafter:
    """A drafter whose rounds end at a chosen slot: slot 1, 2, ..., γ + 1 in turn.

    It runs the wrapped drafter as usual (its context, caches and features follow the
    committed tokens as always), then overwrites the first k tokens of the block with plain
    greedy decoding's continuation, k = 0, 1, ..., γ over successive rounds. Under greedy
    verification the round then accepts those k tokens and (barring a lucky random token)
    rejects slot k + 1, or keeps the whole block and adds the bonus token when k = γ.
    """

    def __init__(self, drafter) -> None:
        self.drafter = drafter
        self.reference: tuple[int, list[int]] = (0, [])
        self._rounds = 0

    def __getattr__(self, name):  # name, gamma, feature_layer_ids, check_target, reset, ...
        return getattr(self.drafter, name)

    def follow(self, prompt_len: int, continuation: list[int]) -> None:
        """The next request's prompt length and its plain greedy continuation."""
        self.reference = (prompt_len, continuation)

    def propose(self, draft_input: DraftInput) -> DraftBlock:
        block = self.drafter.propose(draft_input)
        if not block.gamma:
            return block
        prompt_len, continuation = self.reference
        done = draft_input.tokens.shape[0] - prompt_len  # committed tokens, the anchor included
        k = min(self._rounds % (self.drafter.gamma + 1), block.gamma)
        self._rounds += 1
        truth = continuation[done : done + k]  # shorter only past an EOS, where the request stops
        tokens = block.tokens.clone()
        tokens[: len(truth)] = torch.tensor(truth, dtype=tokens.dtype)
        return dataclasses.replace(block, tokens=tokens)


DRAFTERS = ["ngram", "draft-model-self"]
if (SHIPPED_DRAFTER / "config.json").is_file():
    DRAFTERS += ["dspark-shipped", "dspark+ngram-shipped"]


@pytest.mark.parametrize("drafter_name", DRAFTERS)
def test_speculative_greedy_equals_plain_generate(default_target, oracle, drafter_name):
    drafter = _drafters(default_target)[drafter_name]()
    engine = SpeculativeEngine(default_target, drafter)
    accepted = 0
    for prompt in PROMPTS:
        request = GenerationRequest(default_target.encode_prompt(prompt), max_new_tokens=NEW_TOKENS)
        result = engine.generate(request)
        assert result.token_ids == oracle(prompt), f"{drafter_name} diverged on {prompt!r}"
        accepted += sum(result.stats.accepted)
    assert accepted > 0, "the drafter never got a token accepted, so nothing was tested"


@pytest.mark.parametrize("drafter_name", ["draft-model-random", "dspark-random"])
def test_random_drafter_greedy_equals_plain_generate(default_target, oracle, drafter_name):
    drafter = BoundaryDrafter(_drafters(default_target)[drafter_name]())
    engine = SpeculativeEngine(default_target, drafter)
    accepted = []
    for prompt in RANDOM_PROMPTS:
        prompt_ids = default_target.encode_prompt(prompt)
        drafter.follow(len(prompt_ids), oracle(prompt))
        result = engine.generate(GenerationRequest(prompt_ids, max_new_tokens=RANDOM_NEW_TOKENS))
        assert result.token_ids == oracle(prompt)[:RANDOM_NEW_TOKENS], f"{drafter_name} diverged on {prompt!r}"
        accepted += result.stats.accepted
    # Rounds ended at every slot of the block, and after the whole block.
    assert set(range(drafter.gamma + 1)) <= set(accepted), sorted(accepted)
