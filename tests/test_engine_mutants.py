"""Engine-level losslessness checks with the power to catch subtle mutants of the rejection rule.

The chi-square checks of test_lossless.py and test_batch_engine.py (a tiny random target, 2000
runs of 4 tokens) catch gross mistakes but let two subtle mutants of ``dspark.verify`` through:

- *ratio × 1.05*: accept x_k with min(1, 1.05·p(x)/q(x)) instead of min(1, p(x)/q(x));
- *residual + 10 % p*: after a rejection resample from 0.9·norm(max(0, p − q)) + 0.1·p.

The checks here are built to catch both, through the real loops of SpeculativeEngine and of
BatchEngine (16 requests a step), at T = 1.

Design. The target is a fixed-logit mock over V = {A, B}: p = (π, 1 − π), π = 0.85, at every
position whatever the context, behind the real :class:`~dspark.target.TargetModel` adapter and
caches. Its output is therefore i.i.d. p, and under any lossless engine the number of A among
all committed tokens of n runs of N tokens is exactly Binomial(nN, π). The drafter proposes
γ = 32 tokens from q = (0.99, 0.01): A is drafted almost always and kept with probability
π/0.99 ≈ 0.859, a drafted B is always kept, and the residual after a rejection is a point mass
on B. Both mutants move mass onto A: ratio × 1.05 keeps a drafted A with probability 0.902,
and the mixed residual emits A after 8.5 % of rejections instead of never. The mixed residual
is the hard one: it acts once per round, and a round commits τ ≈ 6.6 tokens.

The check is the exact two-sided binomial test of the pooled count of A at STRICT_ALPHA = 1e-4
(the 2-cell chi-square without its normal approximation), so its false-positive rate is at
most 1e-4 whatever the rounds look like. Its miss rate against each mutant follows from the
mutant's exact output distribution: a dynamic program over the engine's rounds (γ_r = min(γ,
N − committed − 1), as the engines cap it) gives the distribution of one run's count of A,
FFT convolution that of n runs. With N = 96 and n = 600 runs (~8600 rounds) the check passes
counts in [48626, 49292] of 57600 (exact false-positive rate 9.95e-5) and misses the mixed
residual (mean share of A 0.8616 instead of 0.85) with probability 2.5e-5, ratio × 1.05 (0.8915)
with probability 3e-15; test_the_check_has_the_stated_power recomputes these and fails if a miss
rate exceeds 1e-4.

What the mock gives up: p does not depend on the context, so a wrong row of p, position or
cache bug is invisible here; the context-dependent tiny targets of test_lossless.py and
test_batch_engine.py cover those. The mutants are injected where the engines look the rule up
(``dspark.verify.rejection_sample`` through ``verify``, and ``dspark.verify.residual_distribution``),
as test_lossless.py and test_verify.py inject theirs, and each test checks that its mutant ran.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest

import dspark.verify
from dspark.engine import BatchEngine, GenerationRequest, SpeculativeEngine
from dspark.sampling import SamplingParams, sample, warp_probs
from dspark.scheduling import FixedGamma
from dspark.target import TargetModel
from dspark.verify import VerifyResult, first_rejection, point_mass
from stats_helpers import STRICT_ALPHA, binomial_acceptance_region, pmf_of_sum
from test_lossless import FixedLogitDrafter

A, B = 0, 1
PI, Q_A = 0.85, 0.99
GAMMA = 32
NEW_TOKENS = 96  # N
N_RUNS = 600  # n: the miss rates above are for this n
MAX_BATCH = 16
PROMPT = [A, B]
T1 = SamplingParams(temperature=1.0)
MISS_RATE = 1e-4
"""The most a check may miss a mutant by design."""

TARGET_LOGITS = torch.tensor([math.log(PI), math.log(1 - PI)])
DRAFT_LOGITS = torch.tensor([math.log(Q_A), math.log(1 - Q_A)])
CORRECT_RESIDUAL = dspark.verify.residual_distribution


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs cost more than the matmuls


class FixedLogitLM(torch.nn.Module):
    """A stand-in for a transformers causal LM: the same next-token logits at every position.

    It grows whichever cache it is handed (the batch-1 DynamicCache, the batched engine's slot
    view) by one dummy K/V entry per fed position, so rollback and the ragged masks work as
    with a real model.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        from transformers import LlamaConfig

        super().__init__()
        vocab = logits.shape[-1]
        self.config = LlamaConfig(
            vocab_size=vocab, hidden_size=2, intermediate_size=2, num_hidden_layers=1, num_attention_heads=1,
            num_key_value_heads=1, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        self.lm_head = torch.nn.Linear(2, vocab, bias=False)  # only its shape is read: the vocabulary
        self.register_buffer("logits", logits.float())  # [V]

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, cache=None, **kwargs) -> SimpleNamespace:
        batch, n = input_ids.shape
        if cache is not None:
            kv = torch.zeros(batch, 1, n, 2)  # [B, H_kv, n, D]
            cache.update(kv, kv, 0)
        return SimpleNamespace(logits=self.logits.expand(batch, n, -1), hidden_states=None)  # [B, n, V]


@pytest.fixture(scope="module")
def target() -> TargetModel:
    return TargetModel(FixedLogitLM(TARGET_LOGITS), tokenizer=None, name="fixed-logits")


def warped(logits: torch.Tensor) -> tuple[float, float]:
    """(Pr A, Pr B) as the engine computes them (float32 softmax), in float64."""
    probs = warp_probs(logits, T1).double()
    return float(probs[A]), float(probs[B])


# -- the mutants ------------------------------------------------------------------------------------


def rejection_sample_with_ratio(scale: float):
    """``dspark.verify.rejection_sample`` with one change: accept with min(1, scale·p/q).

    A copy, because the ratio is inline in the real function; at scale 1 it must draw exactly
    what the real one draws (test_the_ratio_mutant_at_scale_one_is_the_real_rule).
    """

    def mutant(draft_tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, generator) -> VerifyResult:
        gamma = draft_tokens.shape[0]
        if q is None:
            q = point_mass(draft_tokens, p.shape[-1])
        idx = draft_tokens.unsqueeze(-1)
        p_x = p[:gamma].gather(-1, idx).squeeze(-1)  # [γ]
        q_x = q.gather(-1, idx).squeeze(-1)  # [γ]
        u = torch.rand(gamma, generator=generator, device=p.device)
        accept = u * q_x < scale * p_x  # the mutation
        n = first_rejection(accept)
        if n < gamma:
            last = sample(dspark.verify.residual_distribution(p[n], q[n]), generator)
        else:
            last = sample(p[gamma], generator)
        return VerifyResult(tokens=draft_tokens[:n].tolist() + [int(last)], num_accepted=n)

    return mutant


def residual_mixed_with_p(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return 0.9 * CORRECT_RESIDUAL(p, q) + 0.1 * p


MUTANTS = {
    "ratio-x1.05": ("rejection_sample", rejection_sample_with_ratio(1.05)),
    "residual+0.1p": ("residual_distribution", residual_mixed_with_p),
}
"""name -> (the function of dspark.verify it replaces, the replacement)."""
MUTANT_RULES = {"ratio-x1.05": {"accept_scale": 1.05}, "residual+0.1p": {"residual_mix": 0.1}}
"""The same mutants in the exact dynamic program."""


def test_the_ratio_mutant_at_scale_one_is_the_real_rule():
    # The copy differs from the real rule in the one line only: same inputs, same seeds, same draws.
    gen = torch.Generator().manual_seed(0)
    copy = rejection_sample_with_ratio(1.0)
    for trial in range(200):
        gamma, vocab = trial % 4, 2 + trial % 5
        p = torch.softmax(3 * torch.randn(gamma + 1, vocab, generator=gen), -1)
        q = torch.softmax(3 * torch.randn(gamma, vocab, generator=gen), -1)
        draft = torch.multinomial(q, 1, generator=gen).view(gamma) if gamma else torch.zeros(0, dtype=torch.long)
        real = dspark.verify.rejection_sample(draft, q, p, torch.Generator().manual_seed(trial))
        assert copy(draft, q, p, torch.Generator().manual_seed(trial)) == real
        real = dspark.verify.rejection_sample(draft, None, p, torch.Generator().manual_seed(trial))
        assert copy(draft, None, p, torch.Generator().manual_seed(trial)) == real


# -- the exact distribution of a run's count of A --------------------------------------------------


def count_pmf(p_a: float, q_a: float, accept_scale: float = 1.0, residual_mix: float = 0.0) -> np.ndarray:
    """Pr[k of a run's NEW_TOKENS committed tokens are A], k = 0..N, for the engine's rounds.

    The prefill samples p; each round drafts γ_r = min(GAMMA, N − committed − 1) tokens from q
    and keeps x with probability min(1, accept_scale·p(x)/q(x)); at the first rejection it
    commits one token from (1 − residual_mix)·norm(max(0, p − q)) + residual_mix·p, after γ_r
    acceptances one bonus token from p. Polynomials in z, the power of z counting A.
    """
    p, q = np.array([p_a, 1 - p_a]), np.array([q_a, 1 - q_a])
    keep = q * np.minimum(1.0, accept_scale * p / q)  # Pr[x drafted and kept], x = A, B
    residual = np.maximum(p - q, 0.0) / np.maximum(p - q, 0.0).sum()
    rejected = (1 - keep.sum()) * ((1 - residual_mix) * residual + residual_mix * p)
    # One token as a polynomial: the coefficient of z^0 is Pr[B], that of z^1 Pr[A].
    kept, recovered, bonus = (np.array([w[B], w[A]]) for w in (keep, rejected, p))
    # reach[m]: Pr[a run has committed exactly m tokens at a round boundary, with z^k for k A]
    reach = [np.zeros(NEW_TOKENS + 1) for _ in range(NEW_TOKENS + 1)]
    reach[1][:2] = bonus  # the prefill's token
    for m in range(1, NEW_TOKENS):
        gamma = min(GAMMA, NEW_TOKENS - m - 1)
        prefix = np.ones(1)  # n tokens kept so far
        for n in range(gamma + 1):
            last = bonus if n == gamma else recovered
            add = np.convolve(np.convolve(reach[m], prefix), last)[: NEW_TOKENS + 1]
            reach[m + n + 1][: len(add)] += add
            prefix = np.convolve(prefix, kept)
    return reach[NEW_TOKENS]


def test_the_check_has_the_stated_power():
    p_a, _ = warped(TARGET_LOGITS)
    q_a, _ = warped(DRAFT_LOGITS)
    # Self-check of the dynamic program: with the correct rule a run's count is Binomial(N, π).
    np.testing.assert_allclose(count_pmf(p_a, q_a), binom.pmf(np.arange(NEW_TOKENS + 1), NEW_TOKENS, p_a), atol=1e-12)
    trials = N_RUNS * NEW_TOKENS
    lo, hi = binomial_acceptance_region(trials, p_a, STRICT_ALPHA)
    false_positive = binom.cdf(lo - 1, trials, p_a) + binom.sf(hi, trials, p_a)
    assert false_positive <= STRICT_ALPHA
    for name, rule in MUTANT_RULES.items():
        total = pmf_of_sum(count_pmf(p_a, q_a, **rule), N_RUNS)  # Pr[n runs commit s A in all]
        miss = float(total[lo : hi + 1].sum())
        assert miss <= MISS_RATE, (name, miss)


# -- the engines ----------------------------------------------------------------------------------------


def run_single(target, seed0: int) -> list:
    engine = SpeculativeEngine(target, FixedLogitDrafter(DRAFT_LOGITS, gamma=GAMMA))
    return [
        engine.generate(GenerationRequest(PROMPT, T1, max_new_tokens=NEW_TOKENS, seed=seed0 + i)) for i in range(N_RUNS)
    ]


def run_batched(target, seed0: int) -> list:
    engine = BatchEngine(target, FixedLogitDrafter(DRAFT_LOGITS, gamma=GAMMA), FixedGamma(), max_batch=MAX_BATCH)
    requests = [GenerationRequest(PROMPT, T1, max_new_tokens=NEW_TOKENS, seed=seed0 + i) for i in range(N_RUNS)]
    batch = engine.generate(requests)
    assert max(s.requests for s in batch.stats.steps) == MAX_BATCH  # R > 1 requests per step
    return batch.results


ENGINES = {"single": (run_single, 0), "batched": (run_batched, 10**6)}
"""name -> (runner, first seed): the two engines draw independent samples."""


def strict_check(results) -> float:
    """The p-value of the pooled count of A against Binomial(n·N, π)."""
    assert all(len(r.token_ids) == NEW_TOKENS for r in results)
    count = sum(r.token_ids.count(A) for r in results)
    return binomtest(count, len(results) * NEW_TOKENS, warped(TARGET_LOGITS)[0]).pvalue


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_strict_check_accepts_the_correct_rule(target, engine):
    run, seed0 = ENGINES[engine]
    results = run(target, seed0)
    proposed = [p for r in results for p in r.stats.proposed]
    accepted = [a for r in results for a in r.stats.accepted]
    # Accepted, recovered (a rejection) and bonus (a whole block kept) tokens all occur.
    assert 0 < sum(accepted) < sum(proposed)
    assert any(0 < a == p for a, p in zip(accepted, proposed))
    pvalue = strict_check(results)
    assert pvalue >= STRICT_ALPHA, pvalue


@pytest.mark.parametrize("mutant", list(MUTANTS))
@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_strict_check_catches_the_mutant(target, engine, mutant, monkeypatch):
    name, replacement = MUTANTS[mutant]
    calls = []

    def counted(*args):
        calls.append(1)
        return replacement(*args)

    monkeypatch.setattr(dspark.verify, name, counted)
    run, seed0 = ENGINES[engine]
    results = run(target, seed0)
    assert calls, f"the engine never called dspark.verify.{name}: the mutant was not injected"
    pvalue = strict_check(results)
    assert pvalue < STRICT_ALPHA, pvalue
