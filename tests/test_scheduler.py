"""Verification-length policies, the cost table, and Appendix A's counterexample.

Oracles: a line-by-line transcription of Algorithm 1 in plain Python (the vectorized
scheduler must agree with it on random inputs), hand-computed schedules, and, for
Appendix A, the paper's two-token example run through the real rejection sampler, plus an
example where the early stop does verify, whose output distribution is enumerated exactly.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import pytest
import torch
from scipy.stats import binomtest
from typer.testing import CliRunner

from conftest import tiny_target
from dspark.errors import DsparkError
from dspark.scheduling import (
    DSparkScheduler,
    FixedGamma,
    FlatCost,
    StaticThreshold,
    gamma_one,
    make_policy,
    slot_gate,
)
from dspark.scheduling.algorithm1 import prefix_survival
from dspark.scheduling.policy import Schedule, StepOutcome
from dspark.scheduling.profiling import (
    CostKey,
    CostTable,
    cost_key,
    default_requests,
    load_cost_table,
    measure_cost_table,
    require_cost_table,
)
from dspark.verify import rejection_sample
from stats_helpers import ALPHA, MIN_EXPECTED, STRICT_ALPHA, chisquare_gof, chisquare_miss_rate

KEY = CostKey("test-model", "cpu", "float32", 1)


def table(sps: list[float]) -> FlatCost:
    """The paper's cost model: SPS(B) at every B = 1..len(sps)."""
    return FlatCost(sps)


def algorithm_1(confidences: list[list[float]], drafted: list[int], sps, early_stop: bool = True) -> list[int]:
    """Algorithm 1 as printed (lines 1-16); ``early_stop=False`` is the retrospective global
    search of Appendix A, which exists only here, as the counterexample. ``sps(B)``, or
    ``sps(B, W)`` with W = 1 + max ℓ for a padded engine."""
    if sps.__code__.co_argcount == 1:
        flat = sps
        sps = lambda b, w: flat(b)  # noqa: E731
    num = len(drafted)
    cands = []
    for r in range(num):
        a = 1.0
        for j in range(1, drafted[r] + 1):
            a *= confidences[r][j - 1]
            if a > 0:
                cands.append((a, j, r))
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))  # descending a, ties by position
    lengths, budget, tau = [0] * num, num, float(num)
    best, best_lengths = num * sps(num, 1), [0] * num
    for a, j, r in cands:
        lengths[r] = j
        budget += 1
        tau += a
        theta = tau * sps(budget, 1 + max(lengths))
        if theta > best:
            best, best_lengths = theta, list(lengths)
        elif early_stop:
            break
    return best_lengths


def sps_of(cost: FlatCost):
    return lambda b: cost.sps[b - 1]


def padded_sps_of(cost: CostTable, num: int):
    return lambda b, w: float(cost.steps_per_second(num, torch.tensor([w]))[0])


# -- fixed, γ=1, threshold ---------------------------------------------------------------------------


def test_fixed_gamma_one_and_plain():
    drafted = [5, 0, 3]
    assert FixedGamma().schedule(drafted, None).lengths == [5, 0, 3]
    assert FixedGamma(4).schedule(drafted, None).lengths == [4, 0, 3]
    assert gamma_one().schedule(drafted, None).lengths == [1, 0, 1]
    assert gamma_one().max_draft == 1 and gamma_one().name == "gamma-1"
    assert make_policy("plain").schedule(drafted, None).lengths == [0, 0, 0]
    assert make_policy("fixed:7").name == "fixed-7" and make_policy("fixed").max_draft is None


def test_static_threshold_cuts_at_the_first_low_confidence():
    c = torch.tensor([[0.9, 0.4, 0.95, 0.9], [0.3, 0.9, 0.9, 0.9], [0.8, 0.8, 0.8, 0.1]])
    assert StaticThreshold(0.5).schedule([4, 4, 2], c).lengths == [1, 0, 2]
    with pytest.raises(DsparkError, match="needs confidences"):
        StaticThreshold(0.5).schedule([4], None)


def test_policies_validate_their_inputs():
    with pytest.raises(ValueError, match="confidences must be"):
        StaticThreshold(0.5).schedule([3, 3], torch.ones(2, 2))
    with pytest.raises(DsparkError, match="unknown policy"):
        make_policy("verify-everything")
    with pytest.raises(DsparkError, match="bad policy"):
        make_policy("threshold:high")


# -- DSpark (Algorithm 1) -----------------------------------------------------------------------------


def test_dspark_refuses_to_run_without_a_cost_table():
    with pytest.raises(DsparkError, match="dspark profile"):
        make_policy("dspark")
    with pytest.raises(DsparkError, match="needs confidences"):
        DSparkScheduler(table([1.0, 0.9])).schedule([1], None)


def test_dspark_refuses_budgets_beyond_the_table():
    with pytest.raises(DsparkError, match="dspark profile"):
        DSparkScheduler(table([1.0, 0.9, 0.8])).schedule([2, 2], torch.ones(2, 2))


def test_dspark_hand_computed_schedule():
    # a = [[0.9, 0.45], [0.6, 0.06]]; sorted: (0,1) .9, (1,1) .6, (0,2) .45, (1,2) .06.
    c = torch.tensor([[0.9, 0.5], [0.6, 0.1]])
    cost = table([1.0, 1.0, 0.95, 0.8, 0.72, 0.7])
    # Θ: B=2 -> 2.0; +0.9 at B=3: 2.755; +0.6 at B=4: 2.8; +0.45 at B=5: 2.844; +0.06 at B=6: 2.807 (stop)
    schedule = DSparkScheduler(cost).schedule([2, 2], c)
    assert schedule.lengths == [2, 1]
    assert schedule.expected_tokens == pytest.approx(2 + 0.9 + 0.6 + 0.45)


def test_dspark_ties_are_broken_by_position():
    # c = 1 makes a_{r,1} = a_{r,2}: (r, 1) must still come first, and equal a across requests
    # go by position before request, so one more admission lands on request 1's first slot.
    c = torch.tensor([[0.8, 1.0], [0.8, 1.0]])
    cost = table([1.0, 1.0, 1.0, 0.95, 0.5, 0.4])  # room for exactly two admissions
    assert DSparkScheduler(cost).schedule([2, 2], c).lengths == [1, 1]
    assert algorithm_1(c.tolist(), [2, 2], sps_of(cost)) == [1, 1]


def test_dspark_verifies_more_when_idle_and_less_when_busy():
    # A latency-bound curve: flat up to B = 16, then the step time grows with B.
    sps = [1.0 if b <= 16 else 16.0 / b for b in range(1, 129)]
    scheduler = DSparkScheduler(table(sps))
    c = torch.tensor([0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6])
    idle = scheduler.schedule([7], c.unsqueeze(0)).lengths
    busy = scheduler.schedule([7] * 16, c.expand(16, -1)).lengths
    assert idle == [7]  # extra tokens are free: verify the whole block
    assert sum(busy) / 16 < 1.0  # the batch is compute-bound: most requests verify nothing extra


def test_drafting_time_enters_the_step_cost():
    # Verify-only step time 1.0 s + 0.25 s per extra token; a = 0.2 per slot does not pay
    # off on verification cost alone: Θ = 1.2 / 1.25 < 1.
    sps = [1.0 / (1.0 + 0.25 * (b - 1)) for b in range(1, 9)]
    scheduler = DSparkScheduler(table(sps), feedback=False)
    c = torch.tensor([[0.2, 1.0, 1.0]])
    assert scheduler.schedule([3], c).lengths == [0]
    scheduler.observe_costs(1, 2.0)  # 2 s of fixed drafting work per step at R = 1, spent anyway
    # Step time 3.0 -> 3.25 -> 3.5 -> 3.75: Θ = 1/3 < 1.2/3.25 < 1.4/3.5 < 1.6/3.75, all three pay.
    assert scheduler.schedule([3], c).lengths == [3]
    assert scheduler.schedule([3, 3], c.expand(2, -1)).lengths == [0, 0]  # R = 2 has no observation
    scheduler.observe_costs(1, 0.0)
    one = torch.tensor([1])
    assert scheduler.step_rate(1)(one, one)[0] == pytest.approx(1 / (0.8 * 2.0 + 1.0))
    # Each slot must also be drafted: at 0.5 s per slot the first one no longer pays,
    # 1.2 / (1.6 + 0.5 + 1.25) < 1 / (1.6 + 1), and the search stops there.
    scheduler.observe_costs(1, 1.6, 0.5)
    assert scheduler.step_rate(1)(one + 1, one + 1)[0] == pytest.approx(1 / (1.6 + 0.5 + 1.25))
    assert scheduler.schedule([3], c).lengths == [0]


def test_the_engines_overhead_dilutes_what_verification_costs():
    # Verifying costs 0.25 s per extra token on a 1 s step: slot 1 at c = 0.2 does not pay
    # (1.2 / 1.25 < 1). With 2 s per step of the engine's own work, paid by plain steps too,
    # every slot pays: 1 / 3 < 1.2 / 3.25 < 1.4 / 3.5 < 1.6 / 3.75.
    sps = [1.0 / (1.0 + 0.25 * (b - 1)) for b in range(1, 9)]
    scheduler = DSparkScheduler(table(sps), feedback=False)
    c = torch.tensor([[0.2, 1.0, 1.0]])
    assert scheduler.schedule([3], c).lengths == [0]
    scheduler.observe(StepOutcome(1, Schedule([0]), 0, overhead_s=2.0))
    assert scheduler.schedule([3], c).lengths == [3]
    one = torch.tensor([1])
    assert scheduler.step_rate(1)(one, one)[0] == pytest.approx(1 / 3.0)
    # drafting_pays compares with a plain step that pays the overhead as well
    schedule = scheduler.schedule([2], torch.tensor([[0.9, 0.9]]))
    scheduler.observe_costs(1, 3.0, 0.5, 2.0)  # 2.71 / (3 + 1 + 2 + 1.5) = 0.36 > 1 / 3
    assert scheduler.drafting_pays(schedule, 1)
    scheduler.observe_costs(1, 9.0, 0.5, 2.0)  # fixed 4.2 s: 2.71 / 8.7 = 0.31 < 1 / 3
    assert not scheduler.drafting_pays(schedule, 1)


def test_drafting_pays_only_when_the_predicted_gain_covers_drafting_time():
    sps = [1.0 / (1.0 + 0.25 * (b - 1)) for b in range(1, 9)]
    scheduler = DSparkScheduler(table(sps), feedback=False)
    c = torch.tensor([[0.9, 0.9]])
    schedule = scheduler.schedule([2], c)  # Θ = 2.71 / 1.5 = 1.81 against 1 for a plain step
    assert schedule.lengths == [2] and scheduler.drafting_pays(schedule, 1)
    scheduler.observe_costs(1, 1.0)  # 1 s of fixed drafting work: 2.71 / 2.5 > 1 still pays
    assert scheduler.drafting_pays(schedule, 1)
    scheduler.observe_costs(1, 3.0, 0.5)  # fixed 1.4 s, 0.5 s per slot: 2.71 / 3.9 < 1
    assert not scheduler.drafting_pays(scheduler.schedule([2], c), 1)
    assert not scheduler.drafting_pays(scheduler.schedule([2], torch.zeros(1, 2)), 1)  # verifies nothing


def test_drafting_pays_only_when_it_beats_what_the_free_blocks_would_give():
    # A hybrid's lookup blocks cost nothing to draft: DSpark's drafting pays only when its
    # blocks, drafting time included, beat a step that verifies lookup's blocks instead.
    sps = [1.0 / (1.0 + 0.25 * (b - 1)) for b in range(1, 9)]
    scheduler = DSparkScheduler(table(sps), feedback=False)
    drafted = scheduler.schedule([2], torch.tensor([[0.9, 0.9]]))  # τ* 2.71, W = 3: Θ 2.71 / 1.5 without drafting time
    scheduler.observe_costs(1, 0.3)  # 0.3 s of drafting: Θ = 2.71 / 1.8 = 1.51
    weak = scheduler.schedule([2], torch.tensor([[0.5, 0.5]]))  # verifies 1: Θ 1.5 / 1.25 = 1.2
    strong = scheduler.schedule([3], torch.tensor([[0.95, 0.95, 0.95]]))  # τ* 3.71 / 1.75 = 2.12
    assert scheduler.drafting_pays(drafted, 1)  # against a plain step (Θ 1)
    assert scheduler.drafting_pays(drafted, 1, weak)
    assert not scheduler.drafting_pays(drafted, 1, strong)
    assert scheduler.drafting_pays(drafted, 1, scheduler.schedule([2], torch.zeros(1, 2)))  # verifies nothing: plain


def test_feedback_scales_survival_by_what_earlier_steps_accepted():
    sps = [1.0 / (1.0 + 0.25 * (b - 1)) for b in range(1, 9)]
    c = torch.tensor([[0.8, 0.8]])
    scheduler = DSparkScheduler(table(sps))
    first = scheduler.schedule([2], c)  # Θ: 1 -> 1.8 / 1.25 -> 2.44 / 1.5: verifies both
    assert first.lengths == [2] and first.survival_scale == 1.0
    for _ in range(20):  # predicted 1.44 drafted tokens a step, none accepted
        scheduler.observe_outcome(first, 1, 0)
    assert scheduler.survival_scale < 0.15
    assert scheduler.schedule([2], c).lengths == [0]  # overconfident: stop verifying
    for _ in range(60):
        scheduler.observe_outcome(first, 1, 2)  # 2 accepted per 1.44 predicted
    assert scheduler.survival_scale == pytest.approx((2 / 0.2 + 1) / (1.44 / 0.2 + 1), rel=1e-3)
    assert DSparkScheduler(table(sps), feedback=False).survival_scale == 1.0


def test_a_scale_that_stopped_verification_recovers_as_its_evidence_ages():
    # Over-predicted steps drive the scale near 0 and the scheduler stops verifying; the steps
    # that follow verify nothing, so they bring no outcome. The old evidence must age, or the
    # scheduler never verifies again.
    sps = [1.0 / (1.0 + 0.25 * (b - 1)) for b in range(1, 9)]
    c = torch.tensor([[0.8, 0.8]])
    scheduler = DSparkScheduler(table(sps))
    first = scheduler.schedule([2], c)
    for _ in range(20):
        scheduler.observe_outcome(first, 1, 0)
    steps = 0
    while scheduler.schedule([2], c).lengths == [0] and steps < 100:
        scheduler.observe_outcome(scheduler.schedule([2], c), 1, 0)  # a step that verified nothing
        steps += 1
    assert steps < 30 and scheduler.schedule([2], c).lengths != [0]  # verifies again


def test_dspark_matches_the_transcribed_algorithm_on_random_inputs():
    rng = random.Random(0)
    for trial in range(300):
        num = rng.randint(1, 6)
        gamma = rng.randint(1, 7)
        drafted = [rng.randint(0, gamma) for _ in range(num)]
        # coarse values make ties (across requests and c = 1 within a block) common
        c = [[rng.choice([0.0, 0.25, 0.5, 0.75, 0.9, 1.0]) for _ in range(gamma)] for _ in range(num)]
        max_b = num * (1 + gamma)
        sps = sorted((rng.uniform(0.2, 1.0) for _ in range(max_b)), reverse=True)
        if trial % 3 == 0:  # jagged, non-monotone curves too
            sps = [rng.uniform(0.2, 1.0) for _ in range(max_b)]
        cost = table(sps + [0.1])
        got = DSparkScheduler(cost).schedule(drafted, torch.tensor(c)).lengths
        assert got == algorithm_1(c, drafted, sps_of(cost)), (c, drafted, sps)


def random_padded_table(rng: random.Random, max_requests: int, max_width: int) -> CostTable:
    grid = sorted({1, max_requests, *(rng.randint(1, max_requests) for _ in range(2))})
    rows = [[rng.uniform(1.0, 5.0) for _ in range(max_width)] for _ in grid]
    return CostTable(KEY, tuple(grid), tuple(tuple(row) for row in rows))


def levels_algorithm(confidences: list[list[float]], drafted: list[int], sps) -> list[int]:
    """Algorithm 1 for a padded engine, transcribed: admit level j (slot j of every request)
    while Θ = τ*·SPS(B, W = j + 1) improves; stop at the first level that does not."""
    num = len(drafted)
    survival = []
    for r in range(num):
        a, row = 1.0, []
        for j in range(max(drafted)):
            a = a * confidences[r][j] if j < drafted[r] else 0.0
            row.append(a)
        survival.append(row)
    best, tau, admitted = num * sps(num, 1), float(num), 0
    for j in range(1, max(drafted) + 1):
        gain = sum(row[j - 1] for row in survival)
        if gain <= 0:
            break
        tau += gain
        theta = tau * sps(num + sum(min(g, j) for g in drafted), j + 1)
        if theta <= best:
            break
        best, admitted = theta, j
    return [min(g, admitted) for g in drafted]


def test_dspark_on_the_padded_cost_matches_the_transcribed_level_algorithm():
    rng = random.Random(1)
    for _ in range(300):
        num, gamma = rng.randint(1, 6), rng.randint(1, 7)
        drafted = [rng.randint(0, gamma) for _ in range(num)]
        c = [[rng.choice([0.0, 0.25, 0.5, 0.75, 0.9, 1.0]) for _ in range(gamma)] for _ in range(num)]
        cost = random_padded_table(rng, 6, 8)
        got = DSparkScheduler(cost).schedule(drafted, torch.tensor(c)).lengths
        want = levels_algorithm(c, drafted, padded_sps_of(cost, num)) if any(drafted) else [0] * num
        assert got == want, (c, drafted, cost)
        if num == 1:  # one request: levels are Algorithm 1's candidates
            assert got == algorithm_1(c, drafted, padded_sps_of(cost, num))


def test_padding_makes_a_paid_width_free_for_every_request():
    # Width 2 costs 2x a plain step at R = 1 but only 1.2x at R = 4; c_1 = 0.4 pays for the
    # latter, and then every request verifies its first slot, even the one with c_1 = 0.
    cost = CostTable(KEY, (1, 4), ((1.0, 0.5), (1.0, 1 / 1.2)))
    assert DSparkScheduler(cost).schedule([1], torch.tensor([[0.4]])).lengths == [0]
    busy = DSparkScheduler(cost).schedule([1] * 4, torch.tensor([[0.5], [0.5], [0.5], [0.0]]))
    assert busy.lengths == [1, 1, 1, 1] and busy.expected_tokens == pytest.approx(5.5)


def test_prefix_survival_ignores_slots_past_the_draft():
    a = prefix_survival(torch.tensor([[0.5, 0.5, 0.5]]), [2])
    assert a.tolist() == [[0.5, 0.25, 0.0]]


# -- Appendix A: selection bias without the early stop --------------------------------------------------

APPENDIX_COST = FlatCost((1.0, 0.5, 0.45))
APPENDIX_PADDED = CostTable(KEY, (1,), ((1.0, 0.5, 0.45),))
"""The same curve as this engine's measured table: one request, W = B."""
P_TARGET = torch.tensor([0.7, 0.3])  # p_t(A), p_t(B)
Q_DRAFT = torch.tensor([0.5, 0.5])  # p_d(A), p_d(B)
A_TOKEN = 0
TRIALS = 4000
"""Power: under 0.85 the count of A sits (0.85 - 0.7) / sqrt(0.21 / 4000) ≈ 21 standard errors
from what 0.7 predicts, so the check below rejects the biased scheduler with certainty."""


def appendix_a_first_token(schedule_fn, generator: torch.Generator) -> int:
    """One round of the appendix's R = 1, γ = 2 example: returns the first output token Y.

    c_1 = 0.8 is known before x_1 is drawn; c_2 depends on x_1 through the Markov feature:
    0.9 when x_1 = A, 0 when x_1 = B. The round is then verified by the real rejection
    sampler over the ℓ tokens the scheduler admitted.
    """
    x = torch.multinomial(Q_DRAFT.expand(2, -1), 1, generator=generator).view(2)  # x_1, x_2 ~ p_d
    c2 = 0.9 if int(x[0]) == A_TOKEN else 0.0
    ell = schedule_fn([2], torch.tensor([[0.8, c2]]))
    q = Q_DRAFT.expand(ell, -1)
    p = P_TARGET.expand(ell + 1, -1)
    return rejection_sample(x[:ell], q, p, generator).tokens[0]


def count_a(schedule_fn) -> int:
    generator = torch.Generator().manual_seed(1234)
    return sum(appendix_a_first_token(schedule_fn, generator) == A_TOKEN for _ in range(TRIALS))


def test_appendix_a_the_paper_numbers():
    sps = sps_of(APPENDIX_COST)
    assert algorithm_1([[0.8, 0.9]], [2], sps, early_stop=False) == [2]  # Θ2 = 1.134 is the max
    assert algorithm_1([[0.8, 0.0]], [2], sps, early_stop=False) == [0]  # Θ0 = 1.0 is the max
    real = DSparkScheduler(APPENDIX_COST)
    for c2 in (0.9, 0.0):  # Θ1 = 0.9 < Θ0 = 1.0: stop before c_2 is ever read
        assert real.schedule([2], torch.tensor([[0.8, c2]])).lengths == [0]


@pytest.mark.parametrize("cost", [APPENDIX_COST, APPENDIX_PADDED], ids=["flat", "padded"])
def test_appendix_a_global_search_is_biased_and_the_early_stop_is_not(cost):
    def global_search(drafted, c):
        return algorithm_1(c.tolist(), drafted, sps_of(APPENDIX_COST), early_stop=False)[0]

    def real(drafted, c):
        return DSparkScheduler(cost).schedule(drafted, c).lengths[0]

    # On this example the real scheduler never verifies (ℓ = 0 whatever x_1), so its half below
    # only shows that it samples p; the VERIFYING example further down tests the early stop
    # where it admits drafted tokens.
    biased = count_a(global_search)
    assert binomtest(biased, TRIALS, 0.7).pvalue < ALPHA, biased / TRIALS  # not the target ...
    assert binomtest(biased, TRIALS, 0.85).pvalue >= ALPHA, biased / TRIALS  # ... but the bias
    causal = count_a(real)
    assert binomtest(causal, TRIALS, 0.7).pvalue >= ALPHA, causal / TRIALS


# -- Appendix A, exactly: the early stop where it does verify ------------------------------------------
#
# On the paper's example the real scheduler always returns ℓ = 0, so its output is p by
# construction and a scheduler that never verifies would pass the check above just as well. The
# cases below enumerate the exact output distribution of a round (the rejection rule's
# Pr[keep x] = min(1, p(x)/q(x)) and residual norm(max(0, p − q)), in rational arithmetic, over
# every draft x_1, x_2 ~ q), for any scheduler, on an example where the real scheduler verifies
# one or two drafted tokens: ℓ ≥ 1 depends on the anchor (through c_1, known before x_1 is
# drawn) and ℓ = 2 on x_1 (through c_2), never on the token being admitted. An *anticipating*
# scheduler, one that peeks at x_k to decide ℓ ≥ k, is exactly biased there, and the same
# sampled check through the real rejection sampler must catch it.


@dataclass(frozen=True)
class Example:
    """R = 1, γ = 2 over {A, B}: one round after the anchor, x_1, x_2 ~ q, verified against
    p_1 = p(·|anchor), p_2 = p(·|x_1), p_3 = p(·|x_2)."""

    p: dict[int, tuple[Fraction, Fraction]]
    """The target's next-token distribution after each token (a Markov chain)."""
    q: tuple[Fraction, Fraction]
    """The draft distribution of both slots."""
    c1: dict[int, float]
    """c_1 after each anchor: pre-token information."""
    c2: dict[int, float]
    """c_2 after each x_1: the Markov confidence head reads the drafted token."""


B_TOKEN = 1 - A_TOKEN
PAPER = Example(
    p={A_TOKEN: (Fraction(7, 10), Fraction(3, 10)), B_TOKEN: (Fraction(7, 10), Fraction(3, 10))},
    q=(Fraction(1, 2), Fraction(1, 2)), c1={A_TOKEN: 0.8, B_TOKEN: 0.8}, c2={A_TOKEN: 0.9, B_TOKEN: 0.0},
)
VERIFYING = Example(
    p={A_TOKEN: (Fraction(7, 10), Fraction(3, 10)), B_TOKEN: (Fraction(2, 5), Fraction(3, 5))},
    q=(Fraction(4, 5), Fraction(1, 5)), c1={A_TOKEN: 0.8, B_TOKEN: 0.3}, c2={A_TOKEN: 0.9, B_TOKEN: 0.0},
)
"""q(A) > p(A|A): a drafted A is rejected 1/8 of the time and the residual is then B, after
which the next round (anchor B) verifies nothing; so ℓ = 0, 1 and 2 all occur."""
VERIFYING_COST = FlatCost((1.0, 0.7, 0.6))
"""After anchor A (c_1 = 0.8): Θ0 = 1 < Θ1 = 1.8·0.7 = 1.26, so x_1 is verified; then
Θ2 = 2.52·0.6 = 1.512 > Θ1 when x_1 = A (c_2 = 0.9): ℓ = 2, and a_2 = 0 when x_1 = B: ℓ = 1.
After anchor B (c_1 = 0.3): Θ1 = 1.3·0.7 = 0.91 < Θ0: stop, ℓ = 0."""
VERIFYING_PADDED = CostTable(KEY, (1,), ((1.0, 0.7, 0.6),))

Scheduler = Callable[[torch.Tensor, tuple[int, int]], int]
"""(c_1, c_2 # [1, 2], the drafts (x_1, x_2)) -> ℓ. Only an anticipating scheduler reads x."""


def real_scheduler(cost) -> Scheduler:
    scheduler = DSparkScheduler(cost)
    return lambda c, x: scheduler.schedule([2], c).lengths[0]


def global_search(cost: FlatCost) -> Scheduler:
    return lambda c, x: algorithm_1(c.tolist(), [2], sps_of(cost), early_stop=False)[0]


def peeking(scheduler: Scheduler, k: int) -> Scheduler:
    """``scheduler``, except that x_k is admitted only when it is A: ℓ ≥ k reads x_k."""

    def schedule(c, x):
        ell = scheduler(c, x)
        return k - 1 if ell >= k and x[k - 1] != A_TOKEN else ell

    return schedule


def confidences(example: Example, anchor: int, x: tuple[int, int]) -> torch.Tensor:
    return torch.tensor([[example.c1[anchor], example.c2[x[0]]]])  # [1, 2]


def exact_round(example: Example, anchor: int, schedule: Scheduler):
    """Pr[the round commits these tokens] and Pr[ℓ = 0, 1, 2], exactly."""
    out: dict[tuple[int, ...], Fraction] = defaultdict(Fraction)
    lengths = [Fraction(0)] * 3
    for x in itertools.product((A_TOKEN, B_TOKEN), repeat=2):
        reach = example.q[x[0]] * example.q[x[1]]
        ell = schedule(confidences(example, anchor, x), x)
        lengths[ell] += reach
        rows = [example.p[anchor], example.p[x[0]], example.p[x[1]]]  # p_1, p_2, p_3
        prefix: tuple[int, ...] = ()
        for k in range(ell):
            p, token = rows[k], x[k]
            keep = min(Fraction(1), p[token] / example.q[token])
            residual = [max(Fraction(0), p[t] - example.q[t]) for t in (A_TOKEN, B_TOKEN)]
            for t in (A_TOKEN, B_TOKEN):
                if residual[t]:
                    out[prefix + (t,)] += reach * (1 - keep) * residual[t] / sum(residual)
            reach *= keep
            prefix += (token,)
        for t in (A_TOKEN, B_TOKEN):  # every admitted token kept: the bonus token from p_{ℓ+1}
            out[prefix + (t,)] += reach * rows[ell][t]
    return dict(out), lengths


def exact_output(example: Example, schedule: Scheduler) -> dict[tuple[int, int], Fraction]:
    """Pr[the first two committed tokens after anchor A]: a second round, anchored at the first
    token, when the first round commits only one."""
    out: dict[tuple[int, int], Fraction] = defaultdict(Fraction)
    first, _ = exact_round(example, A_TOKEN, schedule)
    for tokens, prob in first.items():
        if len(tokens) >= 2:
            out[tokens[:2]] += prob
            continue
        second, _ = exact_round(example, tokens[0], schedule)
        for more, prob2 in second.items():
            out[(tokens[0], more[0])] += prob * prob2
    return dict(out)


def target_output(example: Example) -> dict[tuple[int, int], Fraction]:
    return {(a, b): example.p[A_TOKEN][a] * example.p[a][b] for a in (A_TOKEN, B_TOKEN) for b in (A_TOKEN, B_TOKEN)}


def test_appendix_a_exact_first_token_of_the_paper_example():
    sps = FlatCost((1.0, 0.5, 0.45))

    def first_is_a(schedule: Scheduler) -> Fraction:
        return sum(p for tokens, p in exact_output(PAPER, schedule).items() if tokens[0] == A_TOKEN)

    assert first_is_a(global_search(sps)) == Fraction(85, 100)  # the paper's 0.85
    assert first_is_a(real_scheduler(sps)) == Fraction(7, 10)
    _, lengths = exact_round(PAPER, A_TOKEN, real_scheduler(sps))
    assert lengths == [1, 0, 0]  # why that case is weak: the real scheduler never verifies


@pytest.mark.parametrize("cost", [VERIFYING_COST, VERIFYING_PADDED], ids=["flat", "padded"])
def test_appendix_a_exact_early_stop_verifies_and_is_unbiased(cost):
    real = real_scheduler(cost)
    after_a, lengths = exact_round(VERIFYING, A_TOKEN, real)
    assert lengths == [0, Fraction(1, 5), Fraction(4, 5)]  # x_1 always verified, x_2 when x_1 = A
    _, after_b = exact_round(VERIFYING, B_TOKEN, real)
    assert after_b == [1, 0, 0]
    assert exact_output(VERIFYING, real) == target_output(VERIFYING)
    # The global search agrees with the early stop here (it is unbiased too); peeking is not.
    assert exact_output(VERIFYING, global_search(VERIFYING_COST)) == target_output(VERIFYING)
    for k in (1, 2):
        assert exact_output(VERIFYING, peeking(real, k)) != target_output(VERIFYING), k


TWO_TOKEN_TRIALS = 1500
"""Draws of the first two committed tokens. The chi-square check over their 4 outcomes runs at
STRICT_ALPHA = 1e-4 (false-positive rate 1e-4; the seed is fixed, so a run is deterministic).
Its miss rate against each peeking scheduler, from the exact distributions above and the
noncentral chi-square, is asserted to stay under 1e-4: 2.5e-14 peeking at x_1, 2.5e-8 at x_2."""


def sample_two_tokens(example: Example, schedule: Scheduler, generator: torch.Generator):
    """The first two committed tokens after anchor A through the real rejection sampler, and
    the ℓ of every round it took."""
    committed, lengths, anchor = [], [], A_TOKEN
    q = torch.tensor([float(v) for v in example.q])
    while len(committed) < 2:
        x = torch.multinomial(q.expand(2, -1), 1, generator=generator).view(2)  # x_1, x_2 ~ q
        drafts = (int(x[0]), int(x[1]))
        ell = schedule(confidences(example, anchor, drafts), drafts)
        lengths.append(ell)
        context = [anchor, *drafts][: ell + 1]  # p_k is the target after the k-th fed token
        p = torch.tensor([[float(v) for v in example.p[t]] for t in context])  # [ℓ+1, 2]
        committed += rejection_sample(x[:ell], q.expand(ell, -1), p, generator).tokens
        anchor = committed[-1]
    return tuple(committed[:2]), lengths


def sampled_fit(schedule: Scheduler):
    generator = torch.Generator().manual_seed(2024)
    counts, lengths = Counter(), Counter()
    for _ in range(TWO_TOKEN_TRIALS):
        tokens, ells = sample_two_tokens(VERIFYING, schedule, generator)
        counts[tokens] += 1
        lengths.update(ells)
    exact = {k: float(v) for k, v in target_output(VERIFYING).items()}
    return chisquare_gof(counts, exact), lengths


def test_appendix_a_the_sampled_check_has_the_stated_power():
    exact = {k: float(v) for k, v in target_output(VERIFYING).items()}
    assert min(exact.values()) * TWO_TOKEN_TRIALS >= MIN_EXPECTED  # no pooling: the cells below are the check's
    for k in (1, 2):
        biased = {t: float(v) for t, v in exact_output(VERIFYING, peeking(real_scheduler(VERIFYING_COST), k)).items()}
        assert chisquare_miss_rate(exact, biased, TWO_TOKEN_TRIALS, STRICT_ALPHA) <= 1e-4, k


@pytest.mark.parametrize("cost", [VERIFYING_COST, VERIFYING_PADDED], ids=["flat", "padded"])
def test_appendix_a_sampled_early_stop_verifies_and_is_unbiased(cost):
    fit, lengths = sampled_fit(real_scheduler(cost))
    rounds = sum(lengths.values())
    assert (lengths[1] + lengths[2]) / rounds > 0.3, lengths  # it really verifies drafted tokens,
    assert lengths[2] / rounds > 0.1, lengths  # two of them when x_1 made c_2 high,
    assert lengths[0] > 0, lengths  # and none after anchor B
    assert fit.pvalue >= STRICT_ALPHA, fit


@pytest.mark.parametrize("k", [1, 2])
def test_appendix_a_sampled_check_catches_a_peeking_scheduler(k):
    fit, _ = sampled_fit(peeking(real_scheduler(VERIFYING_COST), k))
    assert fit.pvalue < STRICT_ALPHA, fit


# -- the cost table -----------------------------------------------------------------------------------


def test_cost_table_interpolates_step_time_over_requests_and_round_trips(tmp_path):
    # R = 1: 0.1 s at W = 1, 0.2 s at W = 2; R = 3: 0.3 s and 0.4 s.
    cost = CostTable(KEY, (1, 3), ((10.0, 5.0), (1 / 0.3, 2.5)))
    widths = torch.tensor([1, 2])
    torch.testing.assert_close(cost.steps_per_second(1, widths), torch.tensor([10.0, 5.0]))
    torch.testing.assert_close(cost.steps_per_second(2, widths), torch.tensor([1 / 0.2, 1 / 0.3]))
    assert cost.covers(3, 2) and not cost.covers(4, 2) and not cost.covers(3, 3)
    path = cost.save(tmp_path)
    assert path.name == KEY.filename() and json.loads(path.read_text())["key"]["threads"] == 1
    assert CostTable.load(path) == cost
    with pytest.raises(ValueError, match="increase from 1"):
        CostTable(KEY, (2, 3), ((1.0,), (1.0,)))
    with pytest.raises(ValueError, match="same widths"):
        CostTable(KEY, (1, 3), ((1.0, 1.0), (1.0,)))
    old = {"format": 1, "key": KEY.__dict__, "budgets": [1, 2], "steps_per_s": [1.0, 0.5]}
    path.write_text(json.dumps(old))
    with pytest.raises(DsparkError, match="measure it again with `dspark profile`"):
        CostTable.load(path)


def test_default_requests_grid():
    assert default_requests(16) == [1, 2, 3, 4, 6, 9, 13, 16]
    assert default_requests(1) == [1] and default_requests(3) == [1, 2, 3]


def test_missing_or_short_table_is_an_error_naming_dspark_profile(tmp_path):
    target = tiny_target(vocab_size=8)
    assert load_cost_table(target, tmp_path) is None
    with pytest.raises(DsparkError, match="no cost table.*dspark profile"):
        require_cost_table(target, tmp_path)
    CostTable(cost_key(target), (1, 2), ((2.0, 1.0), (1.0, 0.5))).save(tmp_path)
    assert load_cost_table(target, tmp_path).max_requests == 2
    with pytest.raises(DsparkError, match="covers R <= 2 requests of W <= 2 tokens.*dspark profile"):
        require_cost_table(target, tmp_path, max_requests=16, max_draft=1)


def test_measure_profiles_the_engine_step_and_saves_on_first_use(tmp_path):
    torch.set_num_threads(1)
    target = tiny_target(vocab_size=8)
    calls = []
    cost = require_cost_table(
        target, tmp_path, profile_if_missing=True, max_requests=2, max_draft=2, context=8, repeats=1,
        progress=lambda r, w, s: calls.append((r, w)),
    )
    assert cost.requests == (1, 2) and cost.max_width == 3
    assert calls == [(r, w) for _sweep in range(2) for r in (1, 2) for w in (1, 2, 3)]  # warm-up + 1 timed sweep
    assert cost.key == cost_key(target) and load_cost_table(target, tmp_path) == cost
    seconds = [[1 / v for v in row] for row in cost.steps_per_s]  # noise removed: monotone in R and W
    assert all(row == sorted(row) for row in seconds) and all(a <= b for a, b in zip(seconds[0], seconds[1]))
    again = measure_cost_table(target, max_requests=2, max_draft=0, context=4, repeats=1)
    assert again.max_width == 1



def test_cost_table_reads_step_time_at_a_context_between_and_beyond_the_measured_ones(tmp_path):
    # R = 1, W = 1..2: 0.1 / 0.2 s at context 256, 0.3 / 0.6 s at context 1024 (linear in between).
    long = CostTable(KEY, (1,), ((1 / 0.3, 1 / 0.6),), context=1024)
    cost = CostTable(KEY, (1,), ((10.0, 5.0),), context=256, longer=(long,))
    widths = torch.tensor([1, 2])
    seconds = lambda c: (1 / cost.at(c).steps_per_second(1, widths)).tolist()  # noqa: E731
    assert seconds(None) == pytest.approx([0.1, 0.2]) and seconds(100) == pytest.approx([0.1, 0.2])
    assert seconds(640) == pytest.approx([0.2, 0.4])  # halfway
    assert seconds(1792) == pytest.approx([0.5, 1.0])  # the last slope goes on
    assert cost.contexts == (256, 1024) and cost.at(640).longer == ()
    assert CostTable.load(cost.save(tmp_path)) == cost
    with pytest.raises(ValueError, match="same key"):
        CostTable(KEY, (1,), ((10.0, 5.0),), longer=(CostTable(KEY, (1,), ((1.0,),), context=512),))
    with pytest.raises(ValueError, match="contexts must increase"):
        CostTable(KEY, (1,), ((10.0, 5.0),), context=256, longer=(CostTable(KEY, (1,), ((1.0, 1.0),), context=128),))
    # A table saved before contexts (format 2) still loads, as one context.
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": 2, "key": KEY.__dict__, "requests": [1], "steps_per_s": [[10.0, 5.0]],
                                "context": 256, "created": ""}))
    assert CostTable.load(path) == CostTable(KEY, (1,), ((10.0, 5.0),))


def test_scheduler_costs_a_step_at_the_context_of_the_step_before():
    # Verifying a second token costs little at context 256 and a lot at 4096: with slot 1's
    # survival at 0.6, DSpark verifies it at the short context and not at the long one.
    long = CostTable(KEY, (1,), ((1.0, 0.2),), context=4096)
    cost = CostTable(KEY, (1,), ((1.0, 0.95),), context=256, longer=(long,))
    scheduler = DSparkScheduler(cost, feedback=False)
    c = torch.tensor([[0.6]])
    assert scheduler.schedule([1], c).lengths == [1]
    scheduler.observe(StepOutcome(1, Schedule([0]), 0, context=4000))
    assert scheduler.schedule([1], c).lengths == [0]
    scheduler.observe(StepOutcome(1, Schedule([0]), 0, context=200))
    assert scheduler.schedule([1], c).lengths == [1]


def test_measuring_times_steps_on_the_device_clock(monkeypatch):
    # A GPU's queued work is counted only by a clock that waits for the device: the profile
    # must read dspark.timing.device_clock, here a fake that advances 0.25 s per reading.
    readings = iter(range(10**6))
    monkeypatch.setattr("dspark.timing.device_clock", lambda device: lambda: 0.25 * next(readings))
    cost = measure_cost_table(tiny_target(vocab_size=8), max_requests=1, max_draft=1, context=[4, 8], repeats=1)
    assert cost.contexts == (4, 8)
    for at in (cost, *cost.longer):
        assert at.steps_per_s == ((4.0, 4.0),)


def test_a_gpu_table_is_keyed_by_the_device_name_and_not_by_host_threads():
    target = tiny_target(vocab_size=8)
    assert cost_key(target, threads=3).threads == 3
    target.device = torch.device("meta")  # no GPU here: any device but the CPU goes the same way
    key = cost_key(target, threads=3)
    assert key.device == "meta" and key.threads == 0 and "threads" not in key.describe()

# -- the drafting gate ------------------------------------------------------------------------------


def gated_schedule(policy, drafted: list[int], c: torch.Tensor):
    """What the engine gets when the drafter asks the gate before each slot: (schedule, slots drafted)."""
    rows = [i for i, g in enumerate(drafted) if g]
    gate = slot_gate(policy, len(drafted))
    for k in range(max(drafted)):
        stop = gate(k, rows, [drafted[i] for i in rows], c[rows, : k + 1])
        if stop is not None:
            return stop, k
    return None, max(drafted)


@pytest.mark.parametrize("kind", ["flat", "padded", "threshold", "fixed"])
def test_the_gate_stops_drafting_without_changing_the_schedule(kind):
    rng = random.Random(2)
    stopped = 0
    for _ in range(300):
        num, gamma = rng.randint(1, 6), rng.randint(1, 7)
        drafted = [rng.randint(0, gamma) for _ in range(num)]
        if not any(drafted):
            continue
        c = torch.tensor([[rng.choice([0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 1.0]) for _ in range(gamma)] for _ in range(num)])
        policy = {
            "flat": lambda: DSparkScheduler(table([rng.uniform(0.2, 1.0) for _ in range(num * (1 + gamma))])),
            "padded": lambda: DSparkScheduler(random_padded_table(rng, 6, 8)),
            "threshold": lambda: StaticThreshold(0.5),
            "fixed": lambda: FixedGamma(rng.randint(0, gamma)),
        }[kind]()
        full = policy.schedule(drafted, c)
        early, slots = gated_schedule(policy, drafted, c)
        if early is None:
            continue
        stopped += 1
        assert early.lengths == full.lengths
        assert early.expected_tokens == (None if full.expected_tokens is None else pytest.approx(full.expected_tokens))
        assert max(full.lengths) <= slots < max(drafted)  # what is verified was drafted
    assert stopped > (0 if kind == "fixed" else 50)


def test_profile_command_help_and_bad_input():
    from dspark.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["profile", "--help"])
    assert result.exit_code == 0 and "--max-requests" in result.output
    result = runner.invoke(app, ["profile", "--max-requests", "0"])
    assert result.exit_code == 2 and "--max-requests must be >= 1" in result.stderr
