"""The store of earlier requests' ids (dspark.drafters.suffix_store) and lookup across requests
in the n-gram drafter. Losslessness with the store on runs in test_hybrid.py (its chi-square
check, where the store holds earlier samples of the same prompt) and test_batch_engine.py
(n-gram lookup's greedy and sampled checks use the default config, store on)."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters.base import DraftInput
from dspark.drafters.looped import LoopedDrafter
from dspark.drafters.ngram import OWN, STORED, NgramConfig, NgramDrafter
from dspark.drafters.suffix_store import SEPARATOR, SuffixStore
from dspark.sampling import SamplingParams


def oracle_find(sequences, suffix, limit, min_ngram, max_ngram):
    """The slow oracle: scan every stored sequence, newest occurrence of the longest n-gram."""
    for n in range(min(max_ngram, len(suffix)), min_ngram - 1, -1):
        gram = list(suffix[-n:])
        for seq in reversed(sequences):
            for end in range(len(seq) - 1, n - 1, -1):
                if seq[end - n : end] == gram:
                    return seq[end : end + limit], n
    return None


def test_find_matches_the_oracle_on_random_sequences():
    rng = torch.Generator().manual_seed(0)
    store, kept = SuffixStore(capacity=10_000, min_ngram=1, max_ngram=4), []
    for _ in range(30):
        seq = torch.randint(0, 6, (int(torch.randint(2, 40, (1,), generator=rng)),), generator=rng).tolist()
        store.add(seq)
        kept.append(seq)
        for _ in range(20):
            suffix = torch.randint(0, 6, (5,), generator=rng).tolist()
            assert store.find(suffix, 5) == oracle_find(kept, suffix, 5, 1, 4), suffix


def test_a_continuation_stops_at_the_end_of_its_sequence():
    store = SuffixStore(min_ngram=2, max_ngram=3)
    store.add([1, 2, 3, 4])
    store.add([7, 8])
    assert store.find([9, 2, 3], 5) == ([4], 2)  # not 4, SEPARATOR, 7, 8
    assert store.find([3, 4], 5) is None  # 3, 4 ends its sequence: nothing followed it
    assert store.find([2], 5) is None  # shorter than min_ngram


def test_memory_stays_bounded_and_old_sequences_leave():
    store = SuffixStore(capacity=100, min_ngram=1, max_ngram=3)
    store.add([1, 2, 3, 4, 5])
    for i in range(200):
        store.add([1000 + i, 2000 + i, 3000 + i])
    assert len(store) <= 100
    assert len(store._index) <= 1.5 * 3 * 100  # rebuilt from what is held
    assert store.find([1, 2], 3) is None  # dropped long ago
    assert store.find([1199, 2199], 3) == ([3199], 2)  # the newest is found
    assert SEPARATOR not in store.find([1190], 5)[0]


def test_a_hash_collision_never_proposes_a_wrong_match():
    store = SuffixStore(min_ngram=2, max_ngram=2)
    store.add([1, 2, 3])
    store._index[hash((5, 6))] = store._index[hash((1, 2))]  # (5, 6) lands where (1, 2) was followed
    assert store.find([5, 6], 3) is None
    assert store.find([1, 2], 3) == ([3], 2)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        SuffixStore(capacity=0)
    with pytest.raises(ValueError, match="min_ngram"):
        SuffixStore(min_ngram=3, max_ngram=2)
    with pytest.raises(ValueError, match="store_tokens"):
        NgramConfig(store_tokens=-1)


def propose(drafter, tokens, max_tokens=4):
    return drafter.propose(DraftInput(torch.tensor(tokens), None, SamplingParams(), None, max_tokens))


def test_a_request_enters_the_store_when_its_slot_is_reset_and_later_requests_draft_from_it():
    looped = LoopedDrafter(NgramDrafter(NgramConfig(gamma=4, max_ngram=2, store_tokens=1024)))
    looped.allocate(1, 64)
    looped.open(0)
    first = [10, 11, 12, 13, 14, 15, 16]
    looped.propose_batch([0], [DraftInput(torch.tensor(first), None, SamplingParams(), None, 4)])
    store = looped.drafter.store
    assert len(store) == 0  # still running
    looped.open(0)  # the next request takes the slot: the first is over
    assert len(store) == len(first) + 1
    # The new request's own ids never held 12, 13: only the store can continue it.
    block = looped.propose_batch([0], [DraftInput(torch.tensor([1, 12, 13]), None, SamplingParams(), None, 4)]).blocks[0]
    assert block.tokens.tolist() == [14, 15, 16]
    looped.allocate(1, 64)  # a new session ends the requests in flight too
    assert len(store) == (len(first) + 1) + (3 + 1)  # the second request's ids joined


def test_the_candidate_expected_to_give_more_is_proposed_and_both_are_labelled():
    drafter = NgramDrafter(NgramConfig(gamma=3, max_ngram=2, store_tokens=1024))
    drafter.store.add([5, 6, 9, 9, 9])
    # Own ids: [5, 6] was followed by 7, 8; the store says 9, 9, 9. With no labels both are at
    # the prior and the request's own match wins the tie.
    assert propose(drafter, [5, 6, 7, 8, 5, 6], 3).tokens.tolist() == [7, 8, 5]
    propose(drafter, [5, 6, 7, 8, 5, 6, 9, 9, 9, 4])  # the target committed 9, 9, 9: the store was right
    stats = drafter.stats
    assert stats.survived[:3, 2, :, STORED].sum() == 3 and stats.survived[:3, 2, :, OWN].sum() == 0
    drafter.reset()  # a new request with the same ids: its own match still says 7, 8, 5
    assert propose(drafter, [5, 6, 7, 8, 5, 6], 3).tokens.tolist() == [9, 9, 9]  # the store's cells learnt more


def test_the_incremental_index_agrees_with_the_lookup_oracle():
    from dspark.drafters.ngram import NgramIndex, lookup

    rng = torch.Generator().manual_seed(1)
    for trial in range(40):
        ids = torch.randint(0, 4 + trial % 5, (60,), generator=rng)
        index = NgramIndex(1, 3)
        length = 1
        while length <= ids.shape[0]:
            oracle = lookup(ids[:length], 5, 3, 1)
            fast = index.follow(ids[:length], 5)
            assert (fast is None) == (oracle is None), (trial, length)
            if oracle is not None:
                assert fast == (oracle[0].tolist(), oracle[1]), (trial, length)
            length += int(torch.randint(1, 4, (1,), generator=rng))
    index = NgramIndex(1, 2)  # shown ids that are no continuation of the last: it starts again
    index.follow(torch.tensor([1, 2, 3, 1]), 3)
    assert index.follow(torch.tensor([5, 6, 5]), 3) == ([6, 5], 1)
