"""Unit tests of the pure sampling and verification functions (sampling.py, verify.py).

The rejection sampler is checked against the exact distribution of its whole output block,
enumerated by hand from p and q: with m_k = min(p_k, q_k),

    Pr[tokens = (a_1..a_n, b)] = m_1(a_1)..m_n(a_n) * (p_{n+1}(b) - m_{n+1}(b))   for n < γ
    Pr[tokens = (a_1..a_γ, b)] = m_1(a_1)..m_γ(a_γ) * p_{γ+1}(b)                   (bonus)

when x_k ~ q_k independently. Taking the rows of p as the target's conditionals (here they do
not depend on the prefix) the committed tokens are then exactly target-distributed. Every
statistical check uses ALPHA from stats_helpers as its false-positive rate.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from scipy.stats import binomtest

import dspark.verify
from dspark.errors import NonFiniteLogits
from dspark.sampling import GREEDY_TEMPERATURE, SamplingParams, check_logits, sample, warp_probs
from dspark.verify import greedy_verify, point_mass, rejection_sample, residual_distribution, verify
from stats_helpers import ALPHA, chisquare_gof

V = 5
N_DRAWS = 20_000

# Target rows p_1..p_3 and draft rows q_1..q_2 over a vocabulary of 5. q differs strongly from
# p, puts mass where p has none (token 4 of p_1: always rejected) and has none where p has
# some (token 0 of q_1: never drafted, only recovered).
P = torch.tensor(
    [
        [0.40, 0.30, 0.20, 0.10, 0.00],
        [0.05, 0.15, 0.50, 0.10, 0.20],
        [0.25, 0.25, 0.10, 0.30, 0.10],
    ]
)
Q = torch.tensor(
    [
        [0.00, 0.60, 0.05, 0.15, 0.20],
        [0.30, 0.30, 0.10, 0.10, 0.20],
    ]
)


# -- warp_probs and SamplingParams ----------------------------------------------------------


LOGITS = torch.tensor([1.3, -0.2, 2.9, 0.4, 2.1, -1.7, 0.9])


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.6])
def test_temperature_is_softmax_of_scaled_logits(temperature):
    got = warp_probs(LOGITS, SamplingParams(temperature=temperature))
    want = torch.softmax(LOGITS.double() / temperature, -1).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_lower_temperature_sharpens_and_keeps_the_order():
    order = LOGITS.argsort(descending=True)
    tops = []
    for temperature in (2.0, 1.0, 0.5, 0.25):
        probs = warp_probs(LOGITS, SamplingParams(temperature=temperature))
        assert torch.equal(probs.argsort(descending=True), order)
        tops.append(float(probs.max()))
    assert tops == sorted(tops) and tops[0] < tops[-1]
    flat = warp_probs(LOGITS, SamplingParams(temperature=100.0))
    assert float(flat.max() - flat.min()) < 0.05


@pytest.mark.parametrize("k", range(1, len(LOGITS) + 1))
def test_top_k_keeps_the_k_most_likely(k):
    params = SamplingParams(temperature=0.8, top_k=k)
    probs = warp_probs(LOGITS, params)
    kept = set(torch.nonzero(probs).flatten().tolist())
    assert kept == set(LOGITS.topk(k).indices.tolist())
    want = torch.zeros_like(probs)
    idx = torch.tensor(sorted(kept))
    want[idx] = torch.softmax(LOGITS[idx] / 0.8, -1)
    torch.testing.assert_close(probs, want)


def test_top_k_zero_or_above_vocab_disables_the_filter():
    full = warp_probs(LOGITS, SamplingParams(temperature=1.0))
    for k in (0, len(LOGITS), len(LOGITS) + 3):
        torch.testing.assert_close(warp_probs(LOGITS, SamplingParams(temperature=1.0, top_k=k)), full)


def _nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p (brute force)."""
    order = probs.double().argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for token in order:
        kept.append(token)
        mass += float(probs[token])
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize("top_p", [1e-6, 0.2, 0.45, 0.6, 0.8, 0.93, 0.999])
def test_top_p_keeps_the_smallest_nucleus(top_p):
    base = torch.softmax(LOGITS / 0.9, -1)
    probs = warp_probs(LOGITS, SamplingParams(temperature=0.9, top_p=top_p))
    kept = set(torch.nonzero(probs).flatten().tolist())
    assert kept == _nucleus(base, top_p)
    assert int(LOGITS.argmax()) in kept
    want = torch.zeros_like(probs)
    idx = torch.tensor(sorted(kept))
    want[idx] = base[idx] / base[idx].sum()
    torch.testing.assert_close(probs, want)


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.75)
    probs = warp_probs(LOGITS, params)
    after_k = warp_probs(LOGITS, SamplingParams(temperature=1.0, top_k=4))
    assert set(torch.nonzero(probs).flatten().tolist()) == _nucleus(after_k, 0.75)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)


def test_greedy_is_one_hot_argmax_on_any_batch_shape():
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0))
    probs = warp_probs(logits, SamplingParams(temperature=0.0))
    assert probs.shape == logits.shape
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 11).float())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": 1e3},
        {"temperature": 1.0, "top_p": 0.0},
        {"temperature": 1.0, "top_p": -0.5},
        {"temperature": 1.0, "top_p": 1.01},
        {"temperature": 1.0, "top_k": -1},
    ],
)
def test_sampling_params_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_accept_edge_values():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=1e-3, top_p=1.0, top_k=0).greedy
    SamplingParams(temperature=100.0, top_p=1e-9, top_k=1)


# -- no request can make the warp or the draw fail ------------------------------------------
# A NaN in one request's distribution used to raise inside the shared batched step and fail
# every request in it (issue 26).

# Logits as large as a real model's (|l| ~ 30): l / 1e-37 overflows float32, and a subnormal
# temperature overflows any logit.
BIG_LOGITS = LOGITS * 12.0


@pytest.mark.parametrize("temperature", [1e-37, 1e-45, 5e-324, GREEDY_TEMPERATURE / 2])
def test_temperatures_below_the_threshold_are_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    one_hot = torch.nn.functional.one_hot(BIG_LOGITS.argmax(), len(LOGITS)).float()
    assert torch.equal(warp_probs(BIG_LOGITS, params), one_hot)
    tokens = torch.tensor([int(BIG_LOGITS.argmax()), 0])
    logits = torch.stack([BIG_LOGITS, BIG_LOGITS, BIG_LOGITS.flip(0)])  # [γ+1, V]
    assert verify(tokens, None, logits, params, torch.Generator().manual_seed(0)) == greedy_verify(tokens, logits)
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy


@pytest.mark.parametrize("temperature", [GREEDY_TEMPERATURE, 1e-3, 0.7, 100.0])
@pytest.mark.parametrize("scale", [1.0, 1e6, 1e37])
def test_the_warp_is_finite_for_any_temperature_and_finite_logits(temperature, scale):
    probs = warp_probs(LOGITS * scale, SamplingParams(temperature=temperature, top_k=5, top_p=0.9))
    assert bool(probs.isfinite().all()) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    assert int(probs.argmax()) == int(LOGITS.argmax())
    plain = warp_probs(LOGITS * scale, SamplingParams(temperature=temperature))
    assert bool(plain.isfinite().all()) and int(plain.argmax()) == int(LOGITS.argmax())


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-9])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    probs = warp_probs(BIG_LOGITS, SamplingParams(temperature=1.0, top_p=top_p))
    assert torch.equal(probs, torch.nn.functional.one_hot(BIG_LOGITS.argmax(), len(LOGITS)).float())


def test_sample_draws_exactly_what_torch_multinomial_draws():
    """The oracle: torch.multinomial(p, 1) from the same generator state, token for token, and
    the generator left in the same state (a seeded request's stream is unchanged)."""
    gen = torch.Generator().manual_seed(0)
    for seed in range(200):
        vocab = (5, 64, 5000)[seed % 3]
        probs = torch.softmax(torch.randn(3, vocab, generator=gen) * 3, -1)
        probs[probs < probs.median()] = 0.0  # zero-probability tokens too
        probs = probs / probs.sum(-1, keepdim=True)
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(sample(probs, ours), torch.multinomial(probs, 1, generator=theirs).squeeze(-1))
        assert torch.equal(sample(probs[0], ours), torch.multinomial(probs[0], 1, generator=theirs).squeeze(-1))
        assert torch.rand(1, generator=ours) == torch.rand(1, generator=theirs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_sample_never_raises_on_a_broken_distribution(bad):
    probs = torch.tensor([[0.2, bad, 0.3], [0.0, 0.0, 0.0]])
    tokens = sample(probs, torch.Generator().manual_seed(0))
    assert tokens.shape == (2,) and bool(((tokens >= 0) & (tokens < 3)).all())


def test_verify_refuses_logits_that_are_not_finite():
    draft, gen = torch.tensor([1, 0]), torch.Generator().manual_seed(0)
    sampled = SamplingParams(temperature=0.8)
    for params in (SamplingParams(), sampled):
        for bad in (float("nan"), float("inf")):
            logits = GREEDY_LOGITS[:3].clone()
            logits[1, 2] = bad
            with pytest.raises(NonFiniteLogits, match="the target's logits hold NaN or inf"):
                verify(draft, None, logits, params, gen)
    q = Q.clone()
    q[0, 1] = float("nan")
    with pytest.raises(NonFiniteLogits, match="the drafter's q"):
        verify(draft, q, GREEDY_LOGITS[:3], sampled, gen)
    masked = GREEDY_LOGITS[:3].clone()
    masked[:, 4] = float("-inf")  # an impossible token is not an error
    assert verify(draft, None, masked, sampled, gen).tokens[-1] != 4
    with pytest.raises(NonFiniteLogits):
        check_logits(torch.full((2, 5), float("-inf")))  # a row with no possible token is


# -- rejection sampling: the exact block distribution ---------------------------------------


def exact_block_distribution(p: torch.Tensor, q: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Pr[committed tokens] when x_k ~ q_k independently and the rows of p are the target."""
    gamma, vocab = q.shape
    p64, q64 = p.double(), q.double()
    m = torch.minimum(p64[:gamma], q64)  # Pr[x_k = a and accepted]
    out: dict[tuple[int, ...], float] = {}
    for n in range(gamma + 1):
        last = p64[n] if n == gamma else p64[n] - m[n]  # bonus, or rejection then residual
        for prefix in itertools.product(range(vocab), repeat=n):
            reach = math.prod(float(m[k, a]) for k, a in enumerate(prefix))
            for b in range(vocab):
                out[prefix + (b,)] = reach * float(last[b])
    return out


def draw_blocks(p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor | None, seed: int):
    """N_DRAWS verifications; the draft is sampled from q (or fixed when q is None)."""
    draft_gen = torch.Generator().manual_seed(seed)
    verify_gen = torch.Generator().manual_seed(seed + 1)
    blocks = []
    for _ in range(N_DRAWS):
        x = draft if q is None else torch.multinomial(q, 1, generator=draft_gen).squeeze(-1)
        result = rejection_sample(x, q, p, verify_gen)
        assert result.num_accepted == len(result.tokens) - 1
        assert result.tokens[: result.num_accepted] == x[: result.num_accepted].tolist()
        blocks.append(tuple(result.tokens))
    return blocks


CASES = {
    "gamma1-dense-q": (1, "dense"),
    "gamma2-dense-q": (2, "dense"),
    "gamma1-point-mass": (1, "point"),
    "gamma2-point-mass": (2, "point"),
}
# Fixed draft for the point-mass cases: token 2 is p_1's 3rd most likely, token 4 has p_2 = 0.2.
POINT_DRAFT = torch.tensor([2, 4])


def _case(name: str):
    gamma, kind = CASES[name]
    p = P[: gamma + 1]
    if kind == "dense":
        return p, Q[:gamma], None, Q[:gamma]
    draft = POINT_DRAFT[:gamma]
    return p, None, draft, point_mass(draft, V)


def test_exact_block_distribution_is_a_distribution_with_target_marginals():
    # Self-check of the oracle: it sums to 1 and its committed tokens follow p row by row.
    for name in CASES:
        p, _, _, q_rows = _case(name)
        exact = exact_block_distribution(p, q_rows)
        assert sum(exact.values()) == pytest.approx(1.0, abs=1e-6)
        first = [sum(v for k, v in exact.items() if k[0] == a) for a in range(V)]
        assert first == pytest.approx(P[0].double().tolist(), abs=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_rejection_sample_matches_the_exact_block_distribution(name):
    p, q, draft, q_rows = _case(name)
    blocks = draw_blocks(p, q, draft, seed=1234)
    joint = chisquare_gof(Counter(blocks), exact_block_distribution(p, q_rows))
    assert not joint.rejected, joint
    # The first committed token is p_1-distributed whatever q is.
    first = chisquare_gof(Counter(b[0] for b in blocks), dict(enumerate(p[0].double().tolist())))
    assert not first.rejected, first
    # Given that the first token was accepted, the second is p_2-distributed.
    second = Counter(b[1] for b in blocks if len(b) >= 2)
    fit = chisquare_gof(second, dict(enumerate(p[1].double().tolist())))
    assert not fit.rejected, fit


def test_the_block_check_detects_a_wrong_residual(monkeypatch):
    # The check above can fail: resampling from p instead of the residual inflates the
    # tokens where q > p.
    monkeypatch.setattr(dspark.verify, "residual_distribution", lambda p, q: p)
    p, q, draft, q_rows = _case("gamma2-dense-q")
    blocks = draw_blocks(p, q, draft, seed=1234)
    assert chisquare_gof(Counter(blocks), exact_block_distribution(p, q_rows)).rejected


def test_point_mass_acceptance_probability_is_p_of_the_draft():
    gen = torch.Generator().manual_seed(7)
    for token in range(V):
        accepted = sum(
            rejection_sample(torch.tensor([token]), None, P[:2], gen).num_accepted for _ in range(4000)
        )
        test = binomtest(accepted, 4000, float(P[0, token]))
        assert test.pvalue >= ALPHA, (token, accepted)


def test_residual_distribution_of_a_point_mass_removes_the_draft_token():
    p = P[1]
    for token in range(V):
        want = p.clone()
        want[token] = 0.0
        want /= want.sum()
        torch.testing.assert_close(residual_distribution(p, point_mass(torch.tensor(token), V)), want)


def test_residual_distribution_is_the_normalized_positive_part():
    got = residual_distribution(P[0], Q[0])
    # p - q = [0.40, -0.30, 0.15, -0.05, -0.20] -> positive part [0.40, 0, 0.15, 0, 0] / 0.55
    want = torch.tensor([0.40, 0.0, 0.15, 0.0, 0.0]) / 0.55
    torch.testing.assert_close(got, want)


def test_residual_distribution_of_equal_p_and_q_is_p():
    torch.testing.assert_close(residual_distribution(P[2], P[2].clone()), P[2])


def test_rejection_sample_with_no_draft_samples_p():
    gen = torch.Generator().manual_seed(3)
    draws = [rejection_sample(torch.zeros(0, dtype=torch.long), None, P[:1], gen) for _ in range(5000)]
    assert all(r.num_accepted == 0 and len(r.tokens) == 1 for r in draws)
    fit = chisquare_gof(Counter(r.tokens[0] for r in draws), dict(enumerate(P[0].double().tolist())))
    assert not fit.rejected, fit


def test_rejection_sample_is_reproducible_from_the_seed():
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return [rejection_sample(torch.tensor([1, 0]), Q, P, gen).tokens for _ in range(50)]

    assert run(5) == run(5)
    assert run(5) != run(6)


# -- greedy verification ----------------------------------------------------------------------


# Target argmax per position: 2, 0, 3, 1.
GREEDY_LOGITS = torch.tensor(
    [
        [0.1, 0.2, 3.0, 0.0, -1.0],
        [2.5, 0.3, 0.1, 2.4, 0.0],
        [0.0, 0.0, 0.0, 0.5, 0.4],
        [-1.0, 4.0, 3.9, 0.0, 0.0],
    ]
)


@pytest.mark.parametrize(
    "draft, accepted, tokens",
    [
        ([2, 0, 3], 3, [2, 0, 3, 1]),  # all accepted + bonus
        ([2, 0, 4], 2, [2, 0, 3]),
        ([2, 3, 3], 1, [2, 0]),  # a later match after a miss does not count
        ([4, 0, 3], 0, [2]),
    ],
)
def test_greedy_verify_accepts_the_argmax_prefix(draft, accepted, tokens):
    result = greedy_verify(torch.tensor(draft), GREEDY_LOGITS)
    assert (result.num_accepted, result.tokens) == (accepted, tokens)
    # verify() dispatches to it under greedy parameters and ignores q.
    via = verify(torch.tensor(draft), torch.full((3, V), 0.2), GREEDY_LOGITS, SamplingParams(), None)
    assert (via.num_accepted, via.tokens) == (accepted, tokens)


def test_greedy_verify_with_no_draft_emits_the_argmax():
    result = greedy_verify(torch.zeros(0, dtype=torch.long), GREEDY_LOGITS[2:3])
    assert (result.num_accepted, result.tokens) == (0, [3])


# -- shape validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p_shape, q_shape",
    [
        ((2, V), (2, V)),  # p has γ rows, not γ+1
        ((4, V), (2, V)),  # p has γ+2 rows
        ((3 * V,), (2, V)),  # p is flat
        ((3, V), (3, V)),  # q has γ+1 rows
        ((3, V), (2, V + 1)),  # q has another vocabulary
        ((3, V), (2 * V,)),  # q is flat
    ],
)
def test_rejection_sample_rejects_bad_shapes(p_shape, q_shape):
    p = torch.full(p_shape, 1.0 / V)
    q = torch.full(q_shape, 1.0 / V)
    with pytest.raises(ValueError):
        rejection_sample(torch.tensor([0, 1]), q, p, torch.Generator().manual_seed(0))


def test_rejection_sample_rejects_bad_p_shape_with_point_mass_q():
    with pytest.raises(ValueError):
        rejection_sample(torch.tensor([0, 1]), None, torch.full((2, V), 0.2), None)
