"""Prompt lookup's online confidences (dspark.drafters.ngram): labels come from the committed
stream, for verified and unverified slots alike, and c_k is their posterior mean."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters.base import DraftInput
from dspark.drafters.looped import LoopedDrafter
from dspark.drafters.ngram import OWN, RATE_BINS, LookupStats, NgramConfig, NgramDrafter
from dspark.sampling import SamplingParams


def propose(drafter, tokens, max_tokens=3):
    return drafter.propose(DraftInput(torch.tensor(tokens), None, SamplingParams(), None, max_tokens))


def test_every_slot_is_labelled_from_what_was_committed_up_to_its_first_miss():
    drafter = NgramDrafter(NgramConfig(gamma=3, max_ngram=2))
    block = propose(drafter, [5, 6, 7, 8, 5, 6])  # suffix [5, 6] matched: proposes 7, 8, 5
    assert block.tokens.tolist() == [7, 8, 5] and block.confidences.shape == (3,)
    assert torch.allclose(block.confidences, torch.full((3,), 0.3))  # the prior, before any label
    # The target committed 7, 8, then 9: slots 1-2 survived and slot 3 failed, whatever the
    # scheduler verified (the committed stream is the target's either way).
    propose(drafter, [5, 6, 7, 8, 5, 6, 7, 8, 9])
    stats = drafter.stats
    assert stats.labelled[:, 2, RATE_BINS, OWN].tolist() == [1, 1, 1] and stats.survived[:, 2, RATE_BINS, OWN].tolist() == [1, 1, 0]
    assert drafter.rate_bin() == RATE_BINS - 1  # slot 1 survived: this request's rate is 1


def test_a_proposal_waits_for_its_positions_and_stops_at_a_miss():
    drafter = NgramDrafter(NgramConfig(gamma=3, max_ngram=1))
    propose(drafter, [1, 2, 3, 1])  # suffix [1]: proposes 2, 3, 1
    propose(drafter, [1, 2, 3, 1, 2])  # one position committed: slot 1 only
    assert drafter.stats.labelled[:, 1].sum() == 1
    propose(drafter, [1, 2, 3, 1, 2, 4, 4])  # slot 2 missed (4 ≠ 3); slot 3 is never labelled
    assert drafter.stats.labelled[:3, 1, RATE_BINS, OWN].tolist() == [1, 1, 0]


def test_confidences_follow_the_labels_and_copies_share_them():
    stats = LookupStats(gamma=2, max_ngram=1, prior_mean=0.5, prior=2.0)
    for survived in [True] * 8:
        stats.record(0, 1, RATE_BINS, OWN, survived)
    assert stats.confidences(2, 1, RATE_BINS).tolist() == pytest.approx([(8 + 1) / (8 + 2), 0.5])
    looped = LoopedDrafter(NgramDrafter(NgramConfig(gamma=2, max_ngram=1), stats))
    looped.allocate(2, 16)
    looped.open(0), looped.open(1)
    assert looped._slots[0].stats is looped._slots[1].stats is stats  # one table, per-request state apart
    assert looped._slots[0]._labeller is not looped._slots[1]._labeller


def test_the_table_forgets_slowly_once_a_cell_is_full():
    stats = LookupStats(gamma=1, max_ngram=1, horizon=10)
    for _ in range(10):
        stats.record(0, 1, 0, OWN, True)
    for _ in range(200):
        stats.record(0, 1, 0, OWN, False)
    assert stats.labelled[0, 1, 0, OWN] <= 10 + 1e-9 and stats.confidences(1, 1, 0)[0] < 0.06  # the prior alone: 0.6 / 12


def test_margin_confidences_are_counted_per_slot_and_margin_bin_from_the_committed_stream():
    """A drafter without a head (a draft model, DFlash, EAGLE-3) gets c_k per (slot, margin
    bin), labelled from what the target committed, up to each block's first miss."""
    from dspark.drafters.base import DraftBatch, DraftBlock
    from dspark.drafters.online_confidence import MarginConfidence, margin_bin

    class Fixed:  # proposes [7, 8, 9] with margins 0.1, 3, 10 after any context
        name, gamma, feature_layer_ids = "fixed", 3, ()

        def check_target(self, target): ...
        def allocate(self, num_slots, capacity): ...
        def open(self, slot): ...

        def propose_batch(self, slots, inputs, gate=None):
            return DraftBatch([DraftBlock(torch.tensor([7, 8, 9]), margins=torch.tensor([0.1, 3.0, 10.0])) for _ in inputs])

    drafter = MarginConfidence(Fixed())
    drafter.allocate(1, 32)
    drafter.open(0)
    first = drafter.propose_batch([0], [DraftInput(torch.tensor([1, 2]), None, SamplingParams(), None, 3)]).blocks[0]
    assert torch.allclose(first.confidences, torch.full((3,), 0.3))  # the prior
    # The target committed 7, then 5: slot 1 survived in bin 0, slot 2 (margin 3) failed, slot 3 unlabelled.
    drafter.propose_batch([0], [DraftInput(torch.tensor([1, 2, 7, 5]), None, SamplingParams(), None, 3)])
    assert drafter.counts.counts == {(0, margin_bin(0.1)): [1.0, 1.0], (1, margin_bin(3.0)): [0.0, 1.0]}
    assert [margin_bin(m) for m in (0.0, 0.5, 3.0, 100.0)] == [0, 1, 3, 5]
