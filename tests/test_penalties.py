"""Presence, frequency and repetition penalties under speculative decoding.

A penalty makes p at each position a function of every token before it, drafted ones included,
so verification applies it per position (sampling.apply_penalties, row j counting x_1..x_j).
p is still a distribution over the next token given its prefix, so rejection sampling stays
exact: the output must be distributed as plain sampling with the penalties, which this file
checks by exact enumeration against a slow oracle that applies the penalties by hand.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import pytest
import torch

import dspark.verify
from dspark.engine import GenerationRequest
from dspark.engine.batched import BatchEngine
from dspark.sampling import SamplingParams, warp_probs
from dspark.scheduling import DSparkScheduler, FixedGamma
from stats_helpers import chisquare_gof
from test_batch_engine import COST
from test_lossless import DRAFTERS, NEW_TOKENS, PROMPT, TARGET_SCALE, TARGET_SEED, V, check_bookkeeping, sample_engine
from conftest import tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")

PENALISED = SamplingParams(temperature=1.0, presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.5)
STRONG = SamplingParams(temperature=1.0, presence_penalty=2.0, frequency_penalty=2.0)


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE)


def oracle_logits(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: tuple[int, ...]) -> torch.Tensor:
    """The penalties by hand, token by token (vLLM's order: repetition, then frequency and presence)."""
    out = logits.double().clone()
    for token in range(out.shape[0]):
        count = output.count(token)
        if token in prompt or count:
            out[token] = out[token] / params.repetition_penalty if out[token] > 0 else out[token] * params.repetition_penalty
        out[token] -= params.frequency_penalty * count + params.presence_penalty * (count > 0)
    return out


def exact_penalised(target, params: SamplingParams) -> dict[tuple[int, ...], float]:
    @lru_cache(maxsize=None)
    def conditional(prefix: tuple[int, ...]) -> tuple[float, ...]:
        with torch.inference_mode():
            logits = target.model(input_ids=torch.tensor([PROMPT + list(prefix)])).logits[0, -1]
        return tuple(warp_probs(oracle_logits(logits, params, PROMPT, prefix), params).double().tolist())

    out: dict[tuple[int, ...], float] = {}

    def expand(prefix, prob):
        if len(prefix) == NEW_TOKENS:
            out[prefix] = prob
            return
        for token, p in enumerate(conditional(prefix)):
            if p > 0:
                expand(prefix + (token,), prob * p)

    expand((), 1.0)
    return out


@pytest.mark.parametrize("drafter_name", ["other-model", "sharpened-target", "ngram", "dspark"])
def test_penalised_sampling_is_target_distributed(target, drafter_name):
    sampled = sample_engine(target, DRAFTERS[drafter_name](), PENALISED)
    fit = chisquare_gof(sampled.counts, exact_penalised(target, PENALISED))
    assert fit.cells >= 20, fit
    assert 0 < sampled.accepted < sampled.proposed, sampled  # accepted, recovered and bonus tokens all occur
    assert not fit.rejected, fit


def test_the_penalty_check_detects_penalties_that_ignore_the_drafted_tokens(target, monkeypatch):
    # Mutant: every row penalised as if no drafted token came before it (the output counts only).
    real = dspark.sampling.apply_penalties

    def stale(logits, params, counts, mask, draft_tokens=None):
        return real(logits, params, counts, mask, None) if logits.shape[0] == 1 else torch.cat(
            [real(logits[j : j + 1], params, counts, mask) for j in range(logits.shape[0])])

    monkeypatch.setattr(dspark.engine.request, "apply_penalties", stale)
    # A drafter close to the target, so that rows after accepted drafted tokens are common.
    sampled = sample_engine(target, DRAFTERS["sharpened-target"](), STRONG)
    assert chisquare_gof(sampled.counts, exact_penalised(target, STRONG)).rejected


def test_penalised_batched_engine_under_the_scheduler(target):
    requests = [GenerationRequest(PROMPT, PENALISED, max_new_tokens=NEW_TOKENS, seed=s) for s in range(2000)]
    batch = BatchEngine(target, DRAFTERS["dspark"](), DSparkScheduler(COST, feedback=False), max_batch=8).generate(requests)
    fit = chisquare_gof(Counter(tuple(r.token_ids) for r in batch.results), exact_penalised(target, PENALISED))
    assert sum(sum(r.stats.proposed) for r in batch.results) > 0
    assert not fit.rejected, fit


def test_greedy_with_penalties_equals_penalised_plain_decoding(target):
    greedy = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3)
    want, ids = [], list(PROMPT)
    with torch.inference_mode():
        for _ in range(8):
            logits = target.model(input_ids=torch.tensor([ids])).logits[0, -1]
            want.append(int(oracle_logits(logits, greedy, PROMPT, tuple(want)).argmax()))
            ids.append(want[-1])
    for name in ("ngram", "dspark", "other-model"):
        policy = FixedGamma() if name == "other-model" else DSparkScheduler(COST)
        result = BatchEngine(target, DRAFTERS[name](), policy, max_batch=2).generate(
            [GenerationRequest(PROMPT, greedy, max_new_tokens=8)]).results[0]
        assert result.token_ids == want, name


def test_penalties_are_validated():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert not SamplingParams().penalized and SamplingParams(repetition_penalty=1.1).penalized
