"""The batched engine on tiny random targets: exactness against the batch-1 engine, and
losslessness with continuous batching and the scheduler on.

Oracles: :class:`~dspark.engine.SpeculativeEngine` (batch 1, itself checked against plain
argmax decoding and exact distributions in test_lossless.py) and the exact enumerated target
distribution of test_lossless.py.

Two targets. ``rich`` (V = 64) has sharpened attention (q/k weights × 10), so that outputs
depend on every attended position and its rotary position: a wrong mask, position id or
slot changes them. ``target`` (V = 6) is test_lossless's, small enough to enumerate.

Floating point: batching pads rows and masks them, so logits differ from batch 1 by
reduction-order rounding (~1e-6). The targets are fp32 and the smallest top-1/top-2 logit
margin along rich's greedy paths is ~1e-3, so greedy equality is exact; under sampling a
flip would need a uniform draw within ~1e-6 of a CDF boundary.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import dspark.verify
from conftest import tiny_llama, tiny_target
from dspark.drafters.base import BatchDrafter, DraftInput, NoDrafter
from dspark.drafters.draft_model import DraftModelDrafter
from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel
from dspark.drafters.factory import as_batch_drafter
from dspark.drafters.looped import LoopedDrafter
from dspark.drafters.hybrid import HybridDrafter
from dspark.drafters.ngram import NgramConfig, NgramDrafter
from dspark.engine import BatchEngine, GenerationRequest, SpeculativeEngine
from dspark.engine.build import OneRequest, build_engine, build_single_engine
from dspark.errors import DsparkError
from dspark.sampling import SamplingParams
from dspark.scheduling import DSparkScheduler, FixedGamma, FlatCost, StaticThreshold, gamma_one
from dspark.scheduling.calibration import load_calibration
from dspark.scheduling.profiling import CostKey, CostTable
import dspark.engine.batched as batched
from stats_helpers import chisquare_gof
from test_lossless import NEW_TOKENS, PROMPT, T1, TARGET_SCALE, TARGET_SEED, V, exact_target_distribution

GREEDY = SamplingParams()
NUCLEUS = SamplingParams(temperature=0.7, top_k=5, top_p=0.8)
BLOCK = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs cost more than the matmuls


RICH_V = 64


def rich_target():
    target = tiny_target(vocab_size=RICH_V, hidden=32, seed=0, scale=8.0)
    with torch.no_grad():
        for layer in target.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    return target


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE)


@pytest.fixture(scope="module")
def rich():
    return rich_target()


def dspark_drafter(rich: bool = False, seed: int = 11, draft_ids: torch.Tensor | None = None) -> DSparkDrafter:
    """A random DSpark drafter (for the rich or the small target) whose Markov bias and
    confidences vary with x_{k-1}; ``draft_ids`` gives it a reduced draft vocabulary."""
    like_target = rich_target() if rich else tiny_target(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE)
    torch.manual_seed(seed)
    extra = {} if draft_ids is None else {"draft_vocab_size": draft_ids.numel()}
    config = DSparkConfig.for_target(like_target, num_hidden_layers=1, markov_rank=4, block_size=BLOCK, **extra)
    model = DSparkModel(config)
    if draft_ids is not None:
        model.set_draft_vocab(draft_ids)
    with torch.no_grad():  # a strong Markov bias: q far from p, so drafts are often rejected
        model.markov_head.markov_w1.weight.normal_(std=1.0)
        model.markov_head.markov_w2.weight.normal_(std=2.0)
        model.confidence_head.proj.weight.normal_(std=0.2)
        model.confidence_head.proj.bias.fill_(0.5)
    return DSparkDrafter(model)


DRAFTERS = {  # for the rich target
    "none": NoDrafter,
    "ngram": lambda: NgramDrafter(NgramConfig(gamma=4, max_ngram=2)),
    "other-model": lambda: DraftModelDrafter(tiny_llama(vocab_size=RICH_V, hidden=32, seed=7, scale=20.0), gamma=3),
    "dspark": lambda: dspark_drafter(rich=True),
    # Every third token of the rich vocabulary: the others come only from residuals and bonuses.
    "dspark-reduced-vocab": lambda: dspark_drafter(rich=True, draft_ids=torch.arange(0, RICH_V, 3)),
    "dspark+ngram": lambda: HybridDrafter(dspark_drafter(rich=True), NgramDrafter(NgramConfig(gamma=4, max_ngram=2))),
}

# Step time 1 + B/16: every extra verified token costs 1/16 of a plain step, so the schedule
# depends on both the confidences and how many requests share the step.
COST = FlatCost([1.0 / (1.0 + b / 16) for b in range(1, 65)])
# The same curve over this engine's padded shapes: R rows of W tokens cost 1 + R·W/16.
PADDED = CostTable(
    CostKey("tiny", "cpu", "float32", 1), tuple(range(1, 9)),
    tuple(tuple(1.0 / (1.0 + r * w / 16) for w in range(1, 9)) for r in range(1, 9)),
)

POLICIES = {
    "fixed": FixedGamma,
    "gamma-1": gamma_one,
    "threshold": lambda: StaticThreshold(0.5),
    "dspark": lambda: DSparkScheduler(COST, feedback=False),
    "dspark-padded": lambda: DSparkScheduler(PADDED, feedback=False),
    "dspark-served": lambda: DSparkScheduler(PADDED),
}
"""Structural tests fix DSpark's survival scale at 1; ``dspark-served`` runs it as served."""

PROMPTS = [[3], [0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1], [5, 2, 5, 2, 5, 2, 5], [4, 0, 3, 3, 1], [2, 4] * 6]
RICH_PROMPTS = [[49], [53, 33, 62, 12, 24, 50], [8, 8, 8, 8, 8, 8], [41, 2, 41, 2, 41, 2, 41], [60, 0, 37, 37, 1], [19, 63] * 6]


def mixed_requests(params: SamplingParams = GREEDY) -> list[GenerationRequest]:
    """Requests of mixed prompts and lengths for the rich target."""
    return [GenerationRequest(p, params, max_new_tokens=5 + 3 * i, seed=100 + i) for i, p in enumerate(RICH_PROMPTS)]


@pytest.fixture(scope="module")
def batch1_greedy(rich):
    engine = SpeculativeEngine(rich, NoDrafter())
    return [engine.generate(r).token_ids for r in mixed_requests()]


def check_bookkeeping(batch) -> None:
    """Counters agree: rounds per request, R and B per step, tokens committed."""
    results, stats = batch.results, batch.stats
    assert sum(s.requests for s in stats.steps) == sum(r.stats.rounds for r in results)
    assert sum(s.budget - s.requests for s in stats.steps) == sum(sum(r.stats.proposed) for r in results)
    for r in results:
        assert all(0 <= a <= p for a, p in zip(r.stats.accepted, r.stats.proposed))
        if r.finish_reason == "length":  # the prefill commits 1 token, each round accepted + 1
            assert 1 + sum(r.stats.accepted) + r.stats.rounds == len(r.token_ids)


# -- greedy: token for token equal to batch 1 -----------------------------------------------------------


# Policies that read confidences run with the drafter that has them.
GREEDY_CASES = [
    (d, p) for d in DRAFTERS for p in POLICIES
    if d != "none" or not POLICIES[p]().needs_confidences  # every drafter has confidences now (head, lookup, margins)
]


@pytest.mark.parametrize("drafter_name, policy_name", GREEDY_CASES)
def test_greedy_batch_equals_batch1(rich, batch1_greedy, drafter_name, policy_name):
    # 6 requests of mixed prompts and lengths through 4 slots: requests join and leave.
    engine = BatchEngine(rich, DRAFTERS[drafter_name](), POLICIES[policy_name](), max_batch=4)
    batch = engine.generate(mixed_requests())
    assert [r.token_ids for r in batch.results] == batch1_greedy
    assert all(r.finish_reason == "length" for r in batch.results)
    assert max(s.requests for s in batch.stats.steps) == 4
    check_bookkeeping(batch)
    # It really speculated (a draft model's margin confidences start at the prior, under the
    # static threshold, and these requests are too short for it to learn past it).
    if drafter_name != "none" and (drafter_name, policy_name) != ("other-model", "threshold"):
        assert batch.stats.verify_length > 0


def test_dspark_schedule_is_ragged_and_load_aware(rich):
    engine = BatchEngine(rich, dspark_drafter(rich=True), POLICIES["dspark"](), max_batch=6)
    proposed = [p for r in engine.generate(mixed_requests()).results for p in r.stats.proposed]
    assert {0, 1, 2, 3} <= set(proposed)  # ℓ_r = 0 (a plain step) next to partial and whole blocks
    alone = BatchEngine(rich, dspark_drafter(rich=True), POLICIES["dspark"](), max_batch=1)
    busy = BatchEngine(rich, dspark_drafter(rich=True), POLICIES["dspark"](), max_batch=6)
    requests = [GenerationRequest(RICH_PROMPTS[1], GREEDY, max_new_tokens=24, seed=s) for s in range(6)]
    assert alone.generate(requests).stats.verify_length > busy.generate(requests).stats.verify_length


def test_eos_and_stop_strings_match_batch1():
    target = rich_target()
    target.eos_token_ids = frozenset(range(0, RICH_V, 9))
    requests = [
        GenerationRequest(p, T1, max_new_tokens=3 + s, seed=s, stop=("3",) if s % 2 else ())
        for s, p in enumerate(RICH_PROMPTS * 2)
    ]
    want = [SpeculativeEngine(target, dspark_drafter(rich=True)).generate(r) for r in requests]
    got = BatchEngine(target, dspark_drafter(rich=True), FixedGamma(), max_batch=5).generate(requests).results
    assert [(r.token_ids, r.finish_reason, r.text) for r in got] == [(r.token_ids, r.finish_reason, r.text) for r in want]
    assert {"eos", "stop", "length"} <= {r.finish_reason for r in got}


# -- sampling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drafter_name", ["dspark", "dspark-reduced-vocab", "other-model"])
def test_sampled_output_equals_batch1_with_the_same_seed(rich, drafter_name):
    # Verifying whole blocks, a request consumes its random stream exactly as in batch 1, so
    # its output cannot depend on what else is in the batch: padding changes nothing.
    requests = mixed_requests(T1) + mixed_requests(NUCLEUS)
    want = [SpeculativeEngine(rich, DRAFTERS[drafter_name]()).generate(r).token_ids for r in requests]
    batch = BatchEngine(rich, DRAFTERS[drafter_name](), FixedGamma(), max_batch=5).generate(requests)
    assert [r.token_ids for r in batch.results] == want
    check_bookkeeping(batch)


def test_tiny_temperatures_and_top_p_decode_greedily_beside_sampled_requests(rich, batch1_greedy):
    """T -> 0 is greedy, and a top_p that rounds to 0 keeps the top token: requests asking for
    them decode exactly the greedy answer, in one batch with sampled requests that still get
    their batch-1 samples. (Their distributions used to be NaN, which failed every request of
    the batch.)"""
    odd = [SamplingParams(temperature=1e-37), SamplingParams(temperature=1e-45),
           SamplingParams(temperature=0.7, top_p=1e-300)]
    tiny = [GenerationRequest(r.prompt_ids, odd[i % 3], r.max_new_tokens, seed=r.seed)
            for i, r in enumerate(mixed_requests())]
    sampled = mixed_requests(T1)[:3]
    want = [SpeculativeEngine(rich, dspark_drafter(rich=True)).generate(r).token_ids for r in sampled]
    batch = BatchEngine(rich, dspark_drafter(rich=True), FixedGamma(), max_batch=4).generate(tiny + sampled)
    assert [r.token_ids for r in batch.results] == batch1_greedy + want


N_RUNS = 2000


def lossless_requests(params: SamplingParams) -> tuple[list[GenerationRequest], list[int]]:
    """N_RUNS requests of PROMPT (seeds 0..N-1) with distractors of other prompts, parameters and
    lengths between them, and the positions of PROMPT's requests."""
    requests, ours = [], []
    for seed in range(N_RUNS):
        ours.append(len(requests))
        requests.append(GenerationRequest(PROMPT, params, max_new_tokens=NEW_TOKENS, seed=seed))
        if seed % 2 == 0:
            other = PROMPTS[seed % len(PROMPTS)]
            requests.append(GenerationRequest(other, NUCLEUS if seed % 4 else GREEDY, max_new_tokens=2 + seed % 9, seed=10**6 + seed))
    return requests, ours


def batched_lossless_check(target, params: SamplingParams, drafter=None, max_batch: int = 8):
    """N_RUNS requests of PROMPT (seeds 0..N-1) interleaved with distractors of other prompts,
    parameters and lengths, 8 at a time under the DSpark scheduler; chi-square of PROMPT's
    first NEW_TOKENS tokens against the exact target distribution."""
    requests, ours = lossless_requests(params)
    drafter = drafter if drafter is not None else dspark_drafter()
    batch = BatchEngine(target, drafter, POLICIES["dspark"](), max_batch=max_batch).generate(requests)
    results = [batch.results[i] for i in ours]
    counts = Counter(tuple(r.token_ids) for r in results)
    exact = exact_target_distribution(target, PROMPT, params, NEW_TOKENS)
    return chisquare_gof(counts, exact), results


def test_sampled_output_is_target_distributed_with_batching_and_scheduler(target):
    fit, results = batched_lossless_check(target, T1)
    assert fit.cells >= 20, fit
    proposed = [p for r in results for p in r.stats.proposed]
    accepted = sum(a for r in results for a in r.stats.accepted)
    # The scheduler really chose ragged lengths, and drafts were both accepted and rejected.
    assert {0, 1, 2} <= set(proposed), Counter(proposed)
    assert 0 < accepted < sum(proposed)
    assert not fit.rejected, fit


@pytest.mark.parametrize("store_tokens", [0, 4096], ids=["own-ids", "with-store"])
def test_lookup_scheduled_on_its_online_confidences_is_target_distributed(target, store_tokens):
    # n-gram blocks trimmed by Algorithm 1 on confidences learnt from the committed stream
    # (2 requests a step: at 8, this cost never pays for a lookup token); with the store,
    # lookup also copies earlier requests' samples of the same prompt.
    drafter = NgramDrafter(NgramConfig(gamma=BLOCK, max_ngram=2, store_tokens=store_tokens))
    fit, results = batched_lossless_check(target, T1, drafter, max_batch=2)
    assert fit.cells >= 20, fit
    proposed = [p for r in results for p in r.stats.proposed]
    assert {0, 1} <= set(proposed) and (store_tokens or max(proposed) >= 2), Counter(proposed)
    if store_tokens:
        from dspark.drafters.ngram import STORED

        assert drafter.stats.labelled[..., STORED].sum() > 500  # the store matched: its blocks were candidates
    assert 0 < sum(a for r in results for a in r.stats.accepted) < sum(proposed)
    assert not fit.rejected, fit


def test_a_draft_model_scheduled_on_its_margins_is_target_distributed(target):
    # A sampled draft model trimmed by Algorithm 1 on confidences learnt from its margins.
    from dspark.drafters.draft_model import DraftModelDrafter

    drafter = DraftModelDrafter(tiny_llama(vocab_size=V, seed=7, scale=20.0), gamma=BLOCK)
    fit, results = batched_lossless_check(target, T1, drafter, max_batch=2)
    proposed = [p for r in results for p in r.stats.proposed]
    assert {0, 1} <= set(proposed), Counter(proposed)
    assert 0 < sum(a for r in results for a in r.stats.accepted) < sum(proposed)
    assert not fit.rejected, fit


def test_the_batched_check_detects_a_broken_residual(target, monkeypatch):
    monkeypatch.setattr(dspark.verify, "residual_distribution", lambda p, q: p)
    fit, _ = batched_lossless_check(target, T1)
    assert fit.rejected, fit


# -- parts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drafter_name", ["dspark", "dspark-reduced-vocab"])
def test_batched_dspark_drafter_proposes_what_the_batch1_drafter_proposes(rich, drafter_name):
    target = rich
    single = DRAFTERS[drafter_name]()
    batched = as_batch_drafter(DRAFTERS[drafter_name]())
    assert isinstance(batched, BatchDrafter) and not isinstance(batched, LoopedDrafter)
    batched.check_target(target)
    single.check_target(target)
    batched.allocate(num_slots=4, capacity=32)
    layers = single.feature_layer_ids
    prompts = [RICH_PROMPTS[1], RICH_PROMPTS[3], RICH_PROMPTS[5]]
    slots = [2, 0, 3]
    params = [GREEDY, T1, NUCLEUS]
    inputs, want = [], []
    for slot, prompt, p in zip(slots, prompts, params):
        batched.open(slot)
        single.reset()
        tokens = torch.tensor(prompt)
        feats = target.forward(tokens[:-1].unsqueeze(0), layer_ids=layers).features[0]
        want.append(single.propose(DraftInput(tokens, feats, p, torch.Generator().manual_seed(slot), max_tokens=BLOCK)))
        inputs.append(DraftInput(tokens, feats, p, torch.Generator().manual_seed(slot), max_tokens=BLOCK))
    got = batched.propose_batch(slots, inputs).blocks
    for g, w in zip(got, want):
        assert torch.equal(g.tokens, w.tokens)
        torch.testing.assert_close(g.confidences, w.confidences)
        if w.q is not None:
            torch.testing.assert_close(g.q, w.q)
    with pytest.raises(DsparkError, match="anchor"):  # features must arrive exactly once
        batched.propose_batch(slots[:1], [inputs[0]])


def test_calibration_is_applied_before_scheduling(rich, tmp_path):
    requests = mixed_requests()
    never = BatchEngine(rich, dspark_drafter(rich=True), DSparkScheduler(COST, calibrate=torch.zeros_like))
    assert never.generate(requests).stats.verify_length == 0.0  # a_{r,1} = 0: nothing to admit
    sure = BatchEngine(rich, dspark_drafter(rich=True), StaticThreshold(0.99, torch.ones_like))
    assert all(set(r.stats.proposed) - {0} for r in sure.generate(requests).results)
    assert load_calibration(tmp_path) is None
    from dspark.scheduling.calibration import Calibration

    Calibration((2.0, 2.0, 2.0)).save(tmp_path)
    apply = load_calibration(tmp_path)
    torch.testing.assert_close(apply(torch.tensor([[0.5, 0.9]])), torch.tensor([[0.5, 0.75]]))


def test_dspark_engine_loads_its_cost_table_or_says_so(target, tmp_path):
    with pytest.raises(DsparkError, match="no cost table.*dspark profile"):
        build_engine(target, dspark_drafter(), "dspark", max_batch=2, profile_dir=tmp_path)
    engine = build_engine(target, dspark_drafter(), "dspark", max_batch=2, profile_dir=tmp_path, profile_if_missing=True)
    cost = engine.policy.cost  # measured on first use and saved
    assert (cost.max_requests, cost.max_width) == (2, 1 + BLOCK)
    again = build_engine(target, dspark_drafter(), "dspark", max_batch=2, profile_dir=tmp_path)
    assert again.policy.cost == engine.policy.cost
    with pytest.raises(DsparkError, match="covers R <= 2 requests.*dspark profile"):  # too small for 4 slots
        build_engine(target, dspark_drafter(), "dspark", max_batch=4, profile_dir=tmp_path)
    plain = build_engine(target, dspark_drafter(), "plain", max_batch=2)  # plain decoding drafts nothing
    assert isinstance(plain.drafter.drafter, NoDrafter)
    with pytest.raises(DsparkError, match="covers only B <= 64.*dspark profile"):
        BatchEngine(target, dspark_drafter(), DSparkScheduler(COST), max_batch=32)


class CountingDrafter:
    """Counts the batched drafter's calls and the slots it drafts."""

    def __init__(self, drafter) -> None:
        self.inner = as_batch_drafter(drafter)
        self.calls = 0
        for name in ("name", "feature_layer_ids", "gamma", "check_target", "allocate", "open"):
            setattr(self, name, getattr(self.inner, name))

    def propose_batch(self, slots, inputs, gate=None):
        self.calls += 1
        return self.inner.propose_batch(slots, inputs, gate)

    def propose_free(self, slots, inputs):
        return self.inner.propose_free(slots, inputs)


@pytest.mark.parametrize("cost", [COST, PADDED], ids=["flat", "padded"])
def test_lazy_drafting_drafts_less_and_schedules_the_same(rich, batch1_greedy, cost):
    def run(lazy: bool):
        policy = DSparkScheduler(cost, feedback=False)
        policy.observe_costs = lambda *args: None  # timings differ between the runs; costs must not
        engine = BatchEngine(rich, dspark_drafter(rich=True), policy, max_batch=4, lazy_drafting=lazy, backoff=False)
        return engine.generate(mixed_requests())

    eager, lazy = run(False), run(True)
    assert [r.token_ids for r in lazy.results] == batch1_greedy
    assert [(s.requests, s.budget, s.committed) for s in lazy.stats.steps] == [
        (s.requests, s.budget, s.committed) for s in eager.stats.steps
    ]
    assert [s.expected_tokens for s in lazy.stats.steps] == pytest.approx([s.expected_tokens for s in eager.stats.steps])
    assert sum(s.drafted for s in lazy.stats.steps) < sum(s.drafted for s in eager.stats.steps)


def test_backoff_skips_the_drafter_while_nothing_is_verified(rich, batch1_greedy, monkeypatch):
    monkeypatch.setattr(batched, "CHEAP_DRAFTING", 0.0)  # tiny models: drafting is never cheap next to them
    never = CountingDrafter(dspark_drafter(rich=True))
    batch = BatchEngine(rich, never, DSparkScheduler(COST, calibrate=torch.zeros_like), max_batch=4).generate(mixed_requests())
    assert [r.token_ids for r in batch.results] == batch1_greedy  # skipped rounds fold their features later
    assert batch.stats.verify_length == 0.0 and never.calls <= len(batch.stats.steps) // 3
    sure = CountingDrafter(dspark_drafter(rich=True))
    sure_policy = POLICIES["dspark"]()
    sure_policy.calibrate = torch.ones_like
    batch = BatchEngine(rich, sure, sure_policy, max_batch=4).generate(mixed_requests())
    assert sure.calls == len(batch.stats.steps)  # every step verified drafts: no backoff


def test_drafting_that_costs_next_to_nothing_never_backs_off(rich, batch1_greedy, monkeypatch):
    monkeypatch.setattr(batched, "CHEAP_DRAFTING", 1.0)  # every drafter counts as cheap (lookup on a real target)
    never = CountingDrafter(dspark_drafter(rich=True))
    batch = BatchEngine(rich, never, DSparkScheduler(COST, calibrate=torch.zeros_like), max_batch=4).generate(mixed_requests())
    assert [r.token_ids for r in batch.results] == batch1_greedy
    assert batch.stats.verify_length == 0.0 and never.calls == len(batch.stats.steps)


def test_errors_are_clear(target, rich):
    from test_lossless import FixedLogitDrafter

    with pytest.raises(DsparkError, match="needs confidences"):  # a drafter with neither a head nor margins
        BatchEngine(rich, FixedLogitDrafter(torch.zeros(RICH_V), gamma=2), DSparkScheduler(COST), max_batch=4).generate(mixed_requests())
    with pytest.raises(ValueError, match="context window"):
        BatchEngine(target, NoDrafter(), FixedGamma()).generate([GenerationRequest([1], max_new_tokens=1000)])
    with pytest.raises(ValueError, match="max_batch"):
        BatchEngine(target, NoDrafter(), FixedGamma(), max_batch=0)
    assert BatchEngine(target, NoDrafter(), FixedGamma()).generate([]).results == []


def test_auto_policy_schedules_drafters_with_confidences_and_verifies_whole_blocks_otherwise(rich, tmp_path):
    engine = build_engine(rich, dspark_drafter(rich=True), "auto", profile_dir=tmp_path, profile_if_missing=True)
    assert engine.policy.name == "dspark"
    for name in ("ngram", "other-model"):  # lookup's online confidences; the draft model's from its margins
        assert build_engine(rich, DRAFTERS[name](), "auto", profile_dir=tmp_path, profile_if_missing=True).policy.name == "dspark"
    from test_lossless import FixedLogitDrafter

    assert build_engine(rich, FixedLogitDrafter(torch.zeros(RICH_V), gamma=2), "auto").policy.name == "fixed"
    no_head = dspark_drafter(rich=True)
    no_head.model.confidence_head = None  # DFlash has none: its margins give confidences instead
    assert build_engine(rich, no_head, "auto", profile_dir=tmp_path).policy.name == "dspark"


@pytest.mark.parametrize("drafter_name", ["none", "ngram", "dspark", "dspark+ngram"])
def test_one_request_engine_streams_what_it_returns_and_equals_plain_decoding(rich, batch1_greedy, drafter_name, tmp_path):
    """`dspark generate`'s engine: the batched engine at R = 1 behind generate(request)."""
    engine = build_single_engine(rich, DRAFTERS[drafter_name](), policy="auto", profile_dir=tmp_path,
                                 profile_if_missing=True)
    assert isinstance(engine, OneRequest)
    for request, expected in zip(mixed_requests(), batch1_greedy):
        streamed: list[int] = []
        result = engine.generate(request, on_tokens=streamed.extend)
        assert result.token_ids == expected and streamed == expected
