"""The hybrid drafter (dspark.drafters.hybrid): lookup where it is confident, DSpark elsewhere,
per request and round. Greedy equality with plain decoding runs in test_batch_engine.py
(``dspark+ngram`` is one of its drafters); here: the output distribution, the choice and the
wiring from a spec."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import dspark.verify
from dspark.drafters.base import DraftInput
from dspark.drafters.factory import has_confidences, make_drafter, resolve_drafter_spec
from dspark.drafters.hybrid import HybridDrafter, expected_accepted
from dspark.drafters.ngram import NgramConfig, NgramDrafter
from dspark.engine.batched import BatchEngine
from dspark.engine.request import GenerationRequest
from dspark.errors import DsparkError
from dspark.sampling import SamplingParams
from stats_helpers import chisquare_gof
from test_batch_engine import BLOCK, GREEDY, NUCLEUS, POLICIES, PROMPTS, dspark_drafter
from test_lossless import NEW_TOKENS, PROMPT, T1, TARGET_SCALE, TARGET_SEED, V, exact_target_distribution
from conftest import tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")

N_RUNS = 2000


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE)


def hybrid_lossless_check(target, params):
    """As test_batch_engine's batched check: N_RUNS requests of PROMPT among distractors, 4 at a
    time under the DSpark scheduler, with the hybrid drafting."""
    requests, ours = [], []
    for seed in range(N_RUNS):
        ours.append(len(requests))
        requests.append(GenerationRequest(PROMPT, params, max_new_tokens=NEW_TOKENS, seed=seed))
        if seed % 2 == 0:
            other = PROMPTS[seed % len(PROMPTS)]
            requests.append(GenerationRequest(other, NUCLEUS if seed % 4 else GREEDY, max_new_tokens=2 + seed % 9, seed=10**6 + seed))
    # DSpark's confidences scaled down to lookup's level, so that each side wins some rounds.
    hybrid = HybridDrafter(dspark_drafter(), NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2)), calibrate=lambda c: 0.4 * c)
    engine = BatchEngine(target, hybrid, POLICIES["dspark"](), max_batch=4)
    batch = engine.generate(requests)
    counts = Counter(tuple(batch.results[i].token_ids) for i in ours)
    return chisquare_gof(counts, exact_target_distribution(target, PROMPT, params, NEW_TOKENS)), engine, batch


def test_hybrid_output_is_target_distributed(target):
    fit, engine, batch = hybrid_lossless_check(target, T1)
    assert fit.cells >= 20, fit
    # Both sides drafted blocks, and the scheduler verified some of them.
    assert engine.drafter.rounds["lookup"] > 100 and engine.drafter.rounds["model"] > 100, engine.drafter.rounds
    assert batch.stats.verify_length > 0
    assert not fit.rejected, fit


def test_the_hybrid_check_detects_a_broken_residual(target, monkeypatch):
    monkeypatch.setattr(dspark.verify, "residual_distribution", lambda p, q: p)
    fit, _, _ = hybrid_lossless_check(target, T1)
    assert fit.rejected, fit


def test_lookup_takes_a_request_only_where_it_expects_at_least_what_dspark_gave(target):
    hybrid = HybridDrafter(dspark_drafter(), NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2)),
                           calibrate=lambda c: torch.full_like(c, 0.5))  # DSpark: Σ a = 0.5 + 0.25 = 0.75 per block of 2
    drafter = hybrid.batched()
    drafter.check_target(target)
    drafter.allocate(2, 64)
    for slot in (0, 1):
        drafter.open(slot)
    width = hybrid.model.config.hidden_size * len(hybrid.feature_layer_ids)
    first = [DraftInput(torch.tensor(PROMPT), torch.zeros(len(PROMPT) - 1, width), T1, torch.Generator().manual_seed(s), BLOCK)
             for s in (0, 1)]
    blocks = drafter.propose_batch([0, 1], first).blocks
    assert drafter.rounds == {"lookup": 0, "model": 2}  # no DSpark history yet: DSpark drafts
    assert all(torch.allclose(b.confidences, torch.full_like(b.confidences, 0.5)) for b in blocks)
    assert drafter._expect == [pytest.approx(expected_accepted(blocks[0].confidences))] * 2
    # Now make lookup sure of itself for request 0 only.
    drafter.lookup._slots[0].stats.survived.fill_(1e6)
    drafter.lookup._slots[0].stats.labelled.fill_(1e6)
    follow = [DraftInput(torch.tensor(PROMPT + [3]), torch.zeros(1, width), T1, torch.Generator().manual_seed(s), BLOCK)
              for s in (0, 1)]
    blocks = drafter.propose_batch([0, 1], follow).blocks
    assert drafter.rounds == {"lookup": 2, "model": 2}  # the table is shared: both requests trust lookup
    assert all(b.q is None and torch.all(b.confidences > 0.99) for b in blocks)


def test_specs_build_the_hybrid_and_refuse_what_cannot_be_one(tmp_path):
    assert resolve_drafter_spec("dspark+ngram").endswith("+ngram")
    with pytest.raises(DsparkError, match="DSpark drafter"):
        make_drafter("eagle3:x+ngram")
    with pytest.raises(DsparkError, match="no DSpark drafter"):
        make_drafter(f"dspark:{tmp_path}+ngram")
