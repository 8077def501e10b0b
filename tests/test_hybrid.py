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
from dspark.drafters.factory import has_confidences, make_drafter, resolve_drafter
from dspark.drafters.hybrid import HybridDrafter, expected_accepted
from dspark.drafters.ngram import NgramConfig, NgramDrafter
from dspark.engine.batched import BatchEngine
from dspark.engine.request import GenerationRequest
from dspark.errors import DsparkError
from dspark.sampling import SamplingParams
from stats_helpers import chisquare_gof
from test_batch_engine import BLOCK, GREEDY, POLICIES, dspark_drafter, lossless_requests
from test_lossless import NEW_TOKENS, PROMPT, T1, TARGET_SCALE, TARGET_SEED, V, exact_target_distribution
from conftest import tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE)


def one_slot_hybrid(target, c: float | None = None):
    """A batched hybrid of one open slot over a random DSpark drafter (its calibrated c_k all
    ``c``, or as raw) and a lookup without a store; returns it and DSpark's feature width."""
    hybrid = HybridDrafter(dspark_drafter(), NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2, store_tokens=0)),
                           calibrate=None if c is None else (lambda conf: torch.full_like(conf, c)))
    drafter = hybrid.batched()
    drafter.check_target(target)
    drafter.allocate(1, 64)
    drafter.open(0)
    return drafter, hybrid.model.config.hidden_size * len(hybrid.feature_layer_ids)


def hybrid_lossless_check(target, params, store_tokens=0):
    """As test_batch_engine's batched check: N_RUNS requests of PROMPT among distractors, 4 at a
    time under the DSpark scheduler, with the hybrid drafting. ``store_tokens``: lookup across
    requests too (earlier samples of the same prompt: the store then wins most rounds)."""
    requests, ours = lossless_requests(params)
    # DSpark's confidences scaled down to lookup's level, so that each side wins some rounds.
    lookup = NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2, store_tokens=store_tokens))
    # Priced per unit of time, a tiny target's steps cost less than DSpark's drafting and lookup
    # would win nearly every round: the choice is weighed per round here (κ only moves its threshold).
    hybrid = HybridDrafter(dspark_drafter(), lookup, calibrate=lambda c: 0.4 * c, price_drafting=False)
    engine = BatchEngine(target, hybrid, POLICIES["dspark"](), max_batch=4)
    batch = engine.generate(requests)
    counts = Counter(tuple(batch.results[i].token_ids) for i in ours)
    return chisquare_gof(counts, exact_target_distribution(target, PROMPT, params, NEW_TOKENS)), engine, batch


@pytest.mark.parametrize("store_tokens", [0, 4096], ids=["own-ids", "with-store"])
def test_hybrid_output_is_target_distributed(target, store_tokens):
    fit, engine, batch = hybrid_lossless_check(target, T1, store_tokens)
    assert fit.cells >= 20, fit
    # Both sides drafted blocks, and the scheduler verified some of them.
    assert engine.drafter.rounds["lookup"] > 100 and engine.drafter.rounds["model"] > 100, engine.drafter.rounds
    if store_tokens:  # the store's matches were proposed (their cells hold labels of proposed blocks)
        from dspark.drafters.ngram import STORED

        assert engine.drafter.lookup.drafter.stats.labelled[..., STORED].sum() > 500
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
    drafter.lookup._slots[0].stats.survived.fill(1e6)
    drafter.lookup._slots[0].stats.labelled.fill(1e6)
    follow = [DraftInput(torch.tensor(PROMPT + [3]), torch.zeros(1, width), T1, torch.Generator().manual_seed(s), BLOCK)
              for s in (0, 1)]
    blocks = drafter.propose_batch([0, 1], follow).blocks
    assert drafter.rounds == {"lookup": 2, "model": 2}  # the table is shared: both requests trust lookup
    assert all(b.q is None and torch.all(b.confidences > 0.99) for b in blocks)


@pytest.mark.parametrize("params, source", [(GREEDY, "ngram"), (T1, "dspark")], ids=["greedy", "sampled"])
def test_where_dspark_drafted_a_greedy_request_the_block_expected_to_give_more_is_proposed(target, params, source):
    """DSpark drafts every request on its first round (no history yet). Lookup is sure of
    itself here; a greedy request then gets lookup's block (both are functions of the past), a
    sampled one keeps DSpark's (x ~ q must not be chosen on what it turned out to be)."""
    drafter, width = one_slot_hybrid(target, 0.5)
    drafter.lookup._slots[0].stats.survived.fill(1e6)
    drafter.lookup._slots[0].stats.labelled.fill(1e6)
    inputs = [DraftInput(torch.tensor(PROMPT), torch.zeros(len(PROMPT) - 1, width), params, torch.Generator().manual_seed(0), BLOCK)]
    block = drafter.propose_batch([0], inputs).blocks[0]
    assert block.source == source and block.gamma > 0
    assert drafter._expect[0] == pytest.approx(0.5 + 0.25 + 0.125)  # DSpark's block still counts as its history


def test_specs_build_the_hybrid_and_refuse_what_cannot_be_one(tmp_path):
    from dspark.engine.build import drafter_calibration, hybrid_calibration

    assert resolve_drafter("dspark+ngram").text.endswith("+ngram")
    # The composition root hands the hybrid its DSpark drafter's STS (drafters import no scheduling).
    assert hybrid_calibration("dspark+ngram") is not None and drafter_calibration("dspark+ngram") is None
    calibrate = hybrid_calibration("dspark+ngram")
    assert make_drafter("dspark+ngram", calibrate=calibrate).calibrate is calibrate
    assert hybrid_calibration("dspark") is None
    with pytest.raises(DsparkError, match="DSpark drafter"):
        make_drafter("eagle3:x+ngram")
    with pytest.raises(DsparkError, match="no DSpark drafter"):
        make_drafter(f"dspark:{tmp_path}+ngram")


def test_the_sources_disagree_in_the_checked_runs(target):
    # The chi-square above covers rounds where lookup and DSpark would draft different tokens.
    hybrid = HybridDrafter(dspark_drafter(), NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2)), calibrate=lambda c: 0.4 * c,
                           price_drafting=False)  # on a tiny target DSpark's drafting costs more than a step
    engine = BatchEngine(target, hybrid, POLICIES["dspark"](), max_batch=4)
    seen = {"lookup": [], "model": []}
    for side, inner in (("lookup", engine.drafter.lookup), ("model", engine.drafter.model_drafter)):
        real = inner.propose_batch
        inner.propose_batch = lambda slots, inputs, gate=None, real=real, side=side: seen[side].append(real(slots, inputs, gate)) or seen[side][-1]
    engine.generate([GenerationRequest(PROMPT, T1, max_new_tokens=NEW_TOKENS, seed=s) for s in range(200)])
    disagree = sum(
        int(a.tokens[0]) != int(b.tokens[0])
        for looked, drafted in zip(seen["lookup"], seen["model"])
        for a, b in zip(looked.blocks, drafted.blocks) if a.gamma and b.gamma
    )
    assert disagree > 50, disagree


# -- Appendix A for the choice of source ----------------------------------------------------------
#
# One slot over {A, B}: the target's p = (0.7, 0.3); lookup proposes A (a point mass, fixed by
# the context), DSpark draws x ~ q = (0.5, 0.5). A choice of source that reads only the past
# (here: the round's parity) leaves the first token p-distributed whatever it picks, since each
# source alone is verified losslessly. A choice that reads the target's verdict (lookup only when
# its A would be accepted) gives A with probability 0.7 + 0.3 · 0.7 = 0.91. The real hybrid reads
# lookup's block and the expectations of earlier DSpark blocks (BatchedHybridDrafter._prefer_lookup),
# and drafts before the target runs.
P_AB = torch.tensor([[0.7, 0.3], [0.7, 0.3]])  # [γ+1 = 2, V = 2]
Q_AB = torch.tensor([[0.5, 0.5]])
CHOICE_TRIALS = 4000


def first_token(choose, round_index: int, generator: torch.Generator) -> int:
    from dspark.verify import rejection_sample

    verdict = torch.Generator().set_state(generator.get_state())  # what the verifier will draw next
    lookup_kept = float(torch.rand(1, generator=verdict)) < 0.7
    if choose(round_index, lookup_kept) == "lookup":
        return rejection_sample(torch.tensor([0]), None, P_AB, generator).tokens[0]
    x = torch.multinomial(Q_AB[0], 1, generator=generator)
    return rejection_sample(x, Q_AB, P_AB, generator).tokens[0]


@pytest.mark.parametrize("choose, p_a", [
    (lambda i, kept: "lookup" if i % 2 else "model", 0.7),  # the past only: lossless
    (lambda i, kept: "lookup", 0.7),
    (lambda i, kept: "model", 0.7),
    (lambda i, kept: "lookup" if kept else "model", 0.91),  # peeks at the verdict: biased
], ids=["past", "lookup", "model", "peeking"])
def test_appendix_a_the_choice_of_source_must_not_read_the_verdict(choose, p_a):
    from scipy.stats import binomtest

    from stats_helpers import STRICT_ALPHA

    generator = torch.Generator().manual_seed(7)
    count_a = sum(first_token(choose, i, generator) == 0 for i in range(CHOICE_TRIALS))
    # At 4000 trials 0.7 and 0.91 lie ~29 standard errors apart: each check has power ~1 at 1e-4.
    assert binomtest(count_a, CHOICE_TRIALS, p_a).pvalue >= STRICT_ALPHA, count_a / CHOICE_TRIALS
    if p_a != 0.7:
        assert binomtest(count_a, CHOICE_TRIALS, 0.7).pvalue < STRICT_ALPHA, count_a / CHOICE_TRIALS


# -- observability ----------------------------------------------------------------------------------


def test_metrics_and_eval_count_rounds_per_source():
    from prometheus_client.parser import text_string_to_metric_families

    from dspark.engine.stats import RoundRecord, StepRecord
    from dspark.evaluation.aggregate import _by_source
    from dspark.serving.metrics import ServeMetrics

    rounds = [RoundRecord(3, 2, 0, 0, torch.tensor([0.9, 0.9, 0.5]), source="ngram"),
              RoundRecord(2, 0, 0, 0, torch.tensor([0.5, 0.4]), source="dspark"),
              RoundRecord(1, 1, 0, 0, torch.tensor([0.8]), source="ngram")]
    served = ServeMetrics("m")
    served.on_step(StepRecord(3, 9, 6, 6, None, 0, 0, 0), rounds, 6, 0, 0)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(served.render().decode()) for s in family.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted({"model_name": "m", **labels}.items())))]

    assert value("dspark:spec_decode_source_num_drafts_total", source="ngram") == 2
    assert value("dspark:spec_decode_source_num_draft_tokens_total", source="ngram") == 4
    assert value("dspark:spec_decode_source_num_accepted_tokens_total", source="ngram") == 3
    assert value("dspark:spec_decode_source_num_accepted_tokens_total", source="dspark") == 0
    # dspark's one round: a_1 = 0.5 predicted, not survived: ECE 0.5 at slot 0
    assert value("dspark:source_acceptance_calibration_error", source="dspark", position="0") == pytest.approx(0.5)

    class Rec:  # the fields of an eval record that _by_source reads
        def __init__(self, sources, proposed, accepted):
            self.sources, self.proposed, self.accepted = sources, proposed, accepted

    assert _by_source([Rec(["ngram", "dspark"], [3, 2], [2, 0]), Rec(["ngram"], [1], [1])]) == {
        "ngram": {"rounds": 2, "verified": 4, "accepted": 3}, "dspark": {"rounds": 1, "verified": 2, "accepted": 0}}
    assert _by_source([Rec(None, [3], [1])]) is None


def test_lookup_still_drafts_while_the_engine_backs_off_from_dspark(target, monkeypatch):
    """Backoff keeps DSpark (costly) out of a step; the hybrid's free path still proposes
    lookup blocks there, and the output stays target-distributed (greedy here: plain's)."""
    import dspark.engine.batched as batched
    from dspark.engine.single import SpeculativeEngine
    from dspark.drafters.base import NoDrafter

    monkeypatch.setattr(batched, "CHEAP_DRAFTING", 0.0)
    # DSpark's confidences calibrated to 0: it never pays, so the engine backs off from it.
    hybrid = HybridDrafter(dspark_drafter(), NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2)), calibrate=torch.zeros_like)
    engine = BatchEngine(target, hybrid, POLICIES["dspark"](), max_batch=2)
    requests = [GenerationRequest(PROMPT * 3, GREEDY, max_new_tokens=24, seed=s) for s in range(2)]
    free = []
    real = engine.drafter.propose_free
    engine.drafter.propose_free = lambda slots, inputs: free.append(real(slots, inputs)) or free[-1]
    results = engine.generate(requests).results
    plain = SpeculativeEngine(target, NoDrafter())
    assert [r.token_ids for r in results] == [plain.generate(r).token_ids for r in requests]
    assert free and any(b.gamma and b.source == "ngram" for batch in free for b in batch.blocks)
    assert sum(sum(r.stats.proposed) for r in results) > 0


def test_the_backoff_asks_whether_dspark_beat_the_lookup_blocks(target, monkeypatch):
    """The engine hands the policy the schedule of the hybrid's free (lookup) blocks: DSpark's
    drafting pays only when it beats them, not merely a plain step."""
    hybrid = HybridDrafter(dspark_drafter(), NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2)), calibrate=lambda c: 0.4 * c)
    engine = BatchEngine(target, hybrid, POLICIES["dspark"](), max_batch=2)
    asked = []
    real = engine.policy.drafting_pays
    monkeypatch.setattr(engine.policy, "drafting_pays", lambda schedule, requests, free=None: asked.append(free) or real(schedule, requests, free))
    engine.generate([GenerationRequest(PROMPT * 3, GREEDY, max_new_tokens=24, seed=s) for s in range(2)])
    assert asked and any(free is not None and any(free.lengths) for free in asked)


def test_a_cheap_dspark_drafter_still_backs_off_when_lookup_alone_does_as_well(target, monkeypatch):
    """Drafting under CHEAP_DRAFTING of a step never backs off, except where the drafter named
    free blocks to beat: a hybrid's DSpark (Gemma 3's is about 2 % of a step) must pay for itself."""
    import dspark.engine.batched as batched

    monkeypatch.setattr(batched, "CHEAP_DRAFTING", 1.0)  # any drafting counts as cheap
    # DSpark's blocks expect 0.3 + 0.09 + 0.027 = 0.417 (0.3 a slot): it drafts where lookup's
    # blocks expect less, and its blocks never pay beside them.
    hybrid = HybridDrafter(dspark_drafter(), NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2, store_tokens=0)),
                           calibrate=lambda c: torch.full_like(c, 0.3))
    engine = BatchEngine(target, hybrid, POLICIES["dspark"](), max_batch=2)
    free = []
    real = engine.drafter.propose_free
    engine.drafter.propose_free = lambda slots, inputs: free.append(real(slots, inputs)) or free[-1]
    engine.generate([GenerationRequest([0, 1, 2, 3, 4, 5], GREEDY, max_new_tokens=24, seed=s) for s in range(2)])
    assert free  # the engine backed off from DSpark and ran lookup alone


def test_an_overhopeful_dspark_head_is_scaled_to_what_its_greedy_blocks_delivered(target):
    """DSpark's calibrated c_k claim 0.95 everywhere; on greedy requests the hybrid learns from
    the committed stream how its blocks survived and scales c_k down to it, so the scheduler,
    the choice of source and the backoff see what DSpark delivers. Sampled requests teach and
    get nothing (a match understates acceptance there)."""
    from dspark.drafters.online_confidence import SlotScale

    def run(params):
        hybrid = HybridDrafter(dspark_drafter(), NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2, store_tokens=0)),
                               calibrate=lambda c: torch.full_like(c, 0.95), price_drafting=False)
        engine = BatchEngine(target, hybrid, POLICIES["dspark"](), max_batch=4, backoff=False)
        engine.generate([GenerationRequest(PROMPT + [s % V], params, max_new_tokens=NEW_TOKENS, seed=s) for s in range(24)])
        return engine.drafter

    greedy = run(GREEDY)
    survived, predicted, labels = greedy.scale._sums[0]
    assert labels >= 20 and survived < 0.8 * predicted  # the head was over-hopeful here
    assert greedy.scale.factor(0) < 0.85 and greedy.scale.factor(0) == pytest.approx(
        (survived + 10 * predicted / labels) / (predicted + 10 * predicted / labels))
    c = torch.full((1, BLOCK), 0.95)
    assert torch.allclose(greedy._calibrated(c, [True]), greedy.scale.apply(torch.full((1, BLOCK), 0.95)))
    assert torch.equal(greedy._calibrated(c, [False]), c)
    assert not run(T1).scale._sums
    fresh = SlotScale()
    assert fresh.factor(0) == 1.0 and torch.equal(fresh.apply(c), c)


def test_dspark_blocks_are_labelled_at_their_own_positions(target):
    drafter, width = one_slot_hybrid(target, 0.95)
    first = DraftInput(torch.tensor(PROMPT), torch.zeros(len(PROMPT) - 1, width), GREEDY, None, BLOCK)
    block = drafter.propose_batch([0], [first]).blocks[0]
    assert block.source == "dspark" and block.gamma >= 2
    x1, x2 = int(block.tokens[0]), int(block.tokens[1])
    committed = PROMPT + [x1, (x2 + 1) % V]  # x_1 accepted, x_2 rejected
    drafter.propose_batch([0], [DraftInput(torch.tensor(committed), torch.zeros(2, width), GREEDY, None, BLOCK)])
    assert drafter.scale._sums == {0: [1.0, pytest.approx(0.95), 1.0], 1: [0.0, pytest.approx(0.95), 1.0]}


def test_rounds_without_dspark_defer_its_context_fold_and_change_none_of_its_blocks(target, monkeypatch):
    """Rounds where every request takes lookup's block skip DSpark; it folds their features
    when it next drafts, and then drafts exactly what a DSpark drafter that folded every round
    drafts (the same block and confidences)."""
    drafter, width = one_slot_hybrid(target)
    reference = dspark_drafter().batched()
    reference.check_target(target)
    reference.allocate(1, 64)
    reference.open(0)
    g = torch.Generator().manual_seed(0)
    ids, feats = list(PROMPT), torch.randn(len(PROMPT) - 1, width, generator=g)
    folds = []
    real = drafter.model_drafter._fold
    monkeypatch.setattr(drafter.model_drafter, "_fold", lambda slots, f: folds.append([x.shape[0] for x in f]) or real(slots, f))
    for round_index, lookup_wins in enumerate([True, True, False]):
        monkeypatch.setattr(drafter, "_prefer_lookup", lambda slot, block, wins=lookup_wins: wins and bool(block.gamma))
        inp = DraftInput(torch.tensor(ids), feats, GREEDY, None, BLOCK)
        ours = drafter.propose_batch([0], [inp]).blocks[0]
        theirs = reference.propose_batch([0], [inp]).blocks[0]
        if lookup_wins:
            assert ours.source == "ngram"
        else:
            assert ours.source == "dspark" and torch.equal(ours.tokens, theirs.tokens)
            torch.testing.assert_close(ours.confidences, theirs.confidences)
        ids = ids + [int(torch.randint(0, V, (1,), generator=g)) for _ in range(2)]
        feats = torch.randn(2, width, generator=g)
    assert folds == [[len(PROMPT) - 1 + 2 + 2]]  # one fold: the prompt's and two rounds' features at once


def test_lookup_is_weighed_against_dspark_per_unit_of_time(target):
    """A round with DSpark's block costs its drafting too: with κ = 1 + drafting / step, a
    lookup block expecting less than DSpark's history can still be the better buy."""
    drafter, _ = one_slot_hybrid(target)
    drafter._expect_all = 1.0  # DSpark's blocks gave 1 token: 2 per round with the bonus
    block = drafter.lookup.propose_batch([0], [DraftInput(torch.tensor(PROMPT), None, GREEDY, None, BLOCK)]).blocks[0]
    assert block.gamma
    lookup = expected_accepted(block.confidences)  # a fresh table: below 1
    assert lookup < 1.0 and drafter.drafting_cost() == 1.0 and not drafter._prefer_lookup(0, block)
    for start in (0.0, 1.0, 2.0):  # steps of 1 s, DSpark drafting in each for 2/(1 + lookup) - 1 of it and more
        drafter._tick(start)
        drafter._last = (start, 2.0 / (1.0 + lookup) - 1.0 + 0.01)
        drafter._model_s = drafter._last[1]
    assert drafter.drafting_cost() == pytest.approx(1.0 + drafter._model_s / drafter._step_s)
    assert drafter._prefer_lookup(0, block)  # (1 + Σa)·κ >= 2
    drafter.price_drafting = False
    assert not drafter._prefer_lookup(0, block)
