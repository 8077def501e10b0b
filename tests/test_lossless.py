"""End-to-end losslessness of SpeculativeEngine.generate on tiny random targets.

Oracles that share no code with the engine's loop (only warp_probs, which *defines* the
target distribution and has its own tests in test_verify.py):

- sampling: the exact distribution of the first NEW_TOKENS generated tokens, enumerated by
  running the HF model on prompt + every prefix (no cache) and multiplying the warped
  conditionals along the chain. The engine's empirical distribution over N_RUNS seeds must
  pass a chi-square test at false-positive rate ALPHA (stats_helpers);
- greedy: a plain argmax loop over the full sequence, token for token.

With NEW_TOKENS = 4 the first token comes from the prefill and the next round verifies up to
γ = 2 draft tokens, so accepted, recovered and bonus tokens all occur inside the window.

These checks catch gross mistakes (a residual replaced by p, q placed without d2t) but not
subtle ones: accepting with min(1, 1.05·p/q), or a residual mixed with 10 % of p, pass them
(p-values 0.17 and 0.12 on the sharpened-target check). test_engine_mutants.py has the
engine-level checks designed, with stated miss rates, to catch those two.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch

import dspark.verify
from conftest import tiny_llama, tiny_target
from dspark.drafters.base import DraftBlock, DraftInput, Drafter, NoDrafter
from dspark.drafters.draft_model import DraftModelDrafter
from dspark.drafters.ngram import NgramConfig, NgramDrafter
from dspark.engine import GenerationRequest, SpeculativeEngine
from dspark.errors import IncompatibleDrafterError
from dspark.sampling import SamplingParams, sample_from_logits, warp_probs
from stats_helpers import GoodnessOfFit, chisquare_gof

V = 6
TARGET_SEED, TARGET_SCALE = 0, 8.0  # peaked (top token ~0.2-0.5) but far from one-hot
PROMPT = [0, 1, 2, 3, 4, 5, 0, 1, 2]  # every token occurs, so the n-gram drafter always matches
NEW_TOKENS = 4
N_RUNS = 2000  # power: with 1500 runs a bonus token drawn from the wrong row of p slipped through

T1 = SamplingParams(temperature=1.0)
NUCLEUS = SamplingParams(temperature=0.7, top_k=5, top_p=0.8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs cost more than the matmuls


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE)


class FixedLogitDrafter:
    """A mock drafter whose q is one fixed, skewed distribution at every position."""

    name = "fixed-logits"
    feature_layer_ids: tuple[int, ...] = ()

    def __init__(self, logits: torch.Tensor, gamma: int) -> None:
        self.logits = logits  # [V]
        self.gamma = gamma

    def check_target(self, target) -> None:
        if target.vocab_size != self.logits.shape[-1]:
            raise IncompatibleDrafterError("vocabulary mismatch")

    def reset(self) -> None:
        return None

    def accepted(self, num_accepted: int) -> None:
        return None

    def propose(self, draft_input: DraftInput) -> DraftBlock:
        gamma = min(self.gamma, draft_input.max_tokens)
        if gamma <= 0:
            return DraftBlock.empty(draft_input.tokens.device)
        rows = self.logits.expand(gamma, -1)  # [γ, V]
        tokens, q = sample_from_logits(rows, draft_input.params, draft_input.generator)
        return DraftBlock(tokens=tokens, q=q)


# Most of q on token 0, which the target rarely picks, and on token 3: frequent rejections.
SKEWED_LOGITS = torch.tensor([3.0, -1.0, -1.0, 1.5, -1.0, -2.0])

DRAFTERS = {
    # An unrelated, very peaked model: q differs strongly from p.
    "other-model": lambda: DraftModelDrafter(tiny_llama(vocab_size=V, seed=7, scale=20.0), gamma=3),
    # The target's own weights, sharpened: q piles extra mass onto the tokens p likes most,
    # so rejections happen where the residual differs most from p.
    "sharpened-target": lambda: DraftModelDrafter(
        tiny_llama(vocab_size=V, seed=TARGET_SEED, scale=4 * TARGET_SCALE), gamma=3
    ),
    "fixed-logits": lambda: FixedLogitDrafter(SKEWED_LOGITS, gamma=3),
    "ngram": lambda: NgramDrafter(NgramConfig(gamma=3, max_ngram=2)),
    # A random-init DSpark drafter: q includes a non-zero Markov bias, sampled slot by slot.
    "dspark": lambda: random_dspark_drafter(),
    # The same over a reduced draft vocabulary: q is zero on OUTSIDE_DRAFT_VOCAB, which only
    # the residual or the bonus token can produce.
    "dspark-reduced-vocab": lambda: random_dspark_drafter(draft_ids=REDUCED_DRAFT_IDS),
    # The same with W1 over the draft vocabulary plus one shared row for the tokens outside it
    # (markov_w1_vocab "draft"): those previous tokens all get one bias.
    "dspark-draft-w1": lambda: random_dspark_drafter(draft_ids=REDUCED_DRAFT_IDS, markov_w1_vocab="draft"),
    # A random-init EAGLE-3 drafter: chain drafting, each step's q sampled from the drafter's
    # own hidden state of the step before.
    "eagle3": lambda: random_eagle3_drafter(),
    # The same over the reduced draft vocabulary.
    "eagle3-reduced-vocab": lambda: random_eagle3_drafter(draft_ids=REDUCED_DRAFT_IDS),
}
REDUCED_DRAFT_IDS = torch.tensor([0, 1, 3, 4])
OUTSIDE_DRAFT_VOCAB = {2, 5}


def random_dspark_drafter(draft_ids: torch.Tensor | None = None, markov_w1_vocab: str = "target"):
    from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel

    like_target = tiny_target(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE)
    torch.manual_seed(11)
    extra = {"markov_w1_vocab": markov_w1_vocab}
    if draft_ids is not None:
        extra["draft_vocab_size"] = draft_ids.numel()
    model = DSparkModel(DSparkConfig.for_target(like_target, num_hidden_layers=1, markov_rank=4, block_size=3, **extra))
    if draft_ids is not None:
        model.set_draft_vocab(draft_ids)
    with torch.no_grad():
        model.markov_head.markov_w2.weight.normal_(std=2.0)
        if markov_w1_vocab == "draft":  # rows large enough that the previous token moves q
            model.markov_head.markov_w1.weight.normal_()
    return DSparkDrafter(model)


def random_eagle3_drafter(draft_ids: torch.Tensor | None = None):
    from dspark.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Model

    like_target = tiny_target(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE)
    torch.manual_seed(13)
    extra = {} if draft_ids is None else {"draft_vocab_size": draft_ids.numel()}
    model = Eagle3Model(Eagle3Config.for_target(like_target, block_size=3, **extra))
    if draft_ids is not None:
        model.set_draft_vocab(draft_ids)
    with torch.no_grad():  # weights large enough that token, features and own state all move q
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    return Eagle3Drafter(model)


def test_mock_drafter_follows_the_protocol():
    assert isinstance(FixedLogitDrafter(SKEWED_LOGITS, gamma=3), Drafter)


# -- the exact target distribution --------------------------------------------------------------


def exact_target_distribution(
    target, prompt: list[int], params: SamplingParams, n_tokens: int
) -> dict[tuple[int, ...], float]:
    """Pr[first n_tokens generated tokens] under plain sampling from the target."""

    @lru_cache(maxsize=None)
    def conditional(prefix: tuple[int, ...]) -> tuple[float, ...]:
        ids = torch.tensor([prompt + list(prefix)])
        with torch.inference_mode():
            logits = target.model(input_ids=ids).logits[0, -1]  # no cache: the plain definition
        check_well_conditioned(logits, params)
        return tuple(warp_probs(logits, params).double().tolist())

    def expand(prefix: tuple[int, ...], prob: float, out: dict) -> None:
        if len(prefix) == n_tokens:
            out[prefix] = prob
            return
        for token, p in enumerate(conditional(prefix)):
            if p > 0.0:
                expand(prefix + (token,), prob * p, out)

    out: dict[tuple[int, ...], float] = {}
    expand((), 1.0, out)
    return out


def check_well_conditioned(logits: torch.Tensor, params: SamplingParams) -> None:
    """Fail loudly if rounding noise between cached and uncached forwards could change the
    top-p support (the chi-square test would then see 'impossible' outcomes)."""
    if params.greedy or params.top_p >= 1.0:
        return
    probs = warp_probs(logits, SamplingParams(temperature=params.temperature, top_k=params.top_k))
    cumulative = probs.double().sort(descending=True).values.cumsum(-1)
    assert float((cumulative - params.top_p).abs().min()) > 1e-4, "top_p sits on a cumulative mass"


@dataclass
class Sampled:
    """Outcomes of N_RUNS engine runs and the speculation that produced them."""

    counts: Counter
    proposed: int
    accepted: int
    rounds: int


def sample_engine(target, drafter, params: SamplingParams, n_runs: int = N_RUNS) -> Sampled:
    engine = SpeculativeEngine(target, drafter)
    counts: Counter = Counter()
    proposed = accepted = rounds = 0
    for seed in range(n_runs):
        result = engine.generate(GenerationRequest(PROMPT, params, max_new_tokens=NEW_TOKENS, seed=seed))
        check_bookkeeping(result)
        counts[tuple(result.token_ids)] += 1
        proposed += sum(result.stats.proposed)
        accepted += sum(result.stats.accepted)
        rounds += result.stats.rounds
    return Sampled(counts, proposed, accepted, rounds)


def check_bookkeeping(result) -> None:
    stats = result.stats
    assert len(result.token_ids) == stats.new_tokens == NEW_TOKENS
    assert stats.rounds == len(stats.accepted) == len(stats.proposed)
    assert all(0 <= a <= p for a, p in zip(stats.accepted, stats.proposed))
    # The prefill commits one token, each round its accepted tokens + 1.
    assert 1 + sum(stats.accepted) + stats.rounds == NEW_TOKENS
    assert math.isclose(stats.tau, (sum(stats.accepted) + stats.rounds) / stats.rounds)
    assert all(0.0 <= a <= 1.0 for a in stats.position_acceptance())


def lossless_check(target, drafter_name: str, params: SamplingParams) -> tuple[GoodnessOfFit, Sampled]:
    """The one chi-square check used by the real tests and by the mutation test."""
    sampled = sample_engine(target, DRAFTERS[drafter_name](), params)
    exact = exact_target_distribution(target, PROMPT, params, NEW_TOKENS)
    return chisquare_gof(sampled.counts, exact), sampled


# -- sampling: distributions are equal ----------------------------------------------------------


@pytest.mark.parametrize(
    "drafter_name, params",
    [
        ("other-model", T1),
        ("other-model", NUCLEUS),
        ("sharpened-target", T1),
        ("fixed-logits", T1),
        ("ngram", T1),
        ("dspark", T1),
        ("dspark-reduced-vocab", T1),
        ("dspark-reduced-vocab", NUCLEUS),
        ("dspark-draft-w1", T1),
        ("eagle3", T1),
        ("eagle3-reduced-vocab", T1),
        ("eagle3-reduced-vocab", NUCLEUS),
    ],
    ids=["other-model-T1", "other-model-nucleus", "sharpened-T1", "fixed-T1", "ngram-T1", "dspark-T1",
         "dspark-reduced-vocab-T1", "dspark-reduced-vocab-nucleus", "dspark-draft-w1-T1", "eagle3-T1", "eagle3-reduced-vocab-T1",
         "eagle3-reduced-vocab-nucleus"],
)
def test_sampled_output_is_target_distributed(target, drafter_name, params):
    fit, sampled = lossless_check(target, drafter_name, params)
    assert fit.cells >= 20, fit  # enough cells for the test to have power
    # The drafter really speculated and was really rejected, so all three kinds of
    # committed token (accepted, recovered, bonus) were exercised.
    assert sampled.proposed >= N_RUNS and 0 < sampled.accepted < sampled.proposed, sampled
    assert not fit.rejected, fit


def test_reduced_vocab_tokens_outside_the_subset_come_from_the_residual_or_bonus(target):
    # The drafter never proposes a token outside its vocabulary, yet such tokens appear after
    # the prefill token in the outputs the chi-square test above accepts: rejection sampling
    # produced them, from the residual max(0, p − q) or p_{γ+1}, where q is zero.
    drafter = DRAFTERS["dspark-reduced-vocab"]()
    blocks = []
    propose = drafter.propose
    drafter.propose = lambda draft_input: blocks.append(propose(draft_input)) or blocks[-1]
    engine = SpeculativeEngine(target, drafter)
    outside_later = 0
    for seed in range(300):
        result = engine.generate(GenerationRequest(PROMPT, T1, max_new_tokens=NEW_TOKENS, seed=seed))
        outside_later += sum(t in OUTSIDE_DRAFT_VOCAB for t in result.token_ids[1:])
    drafted = [b for b in blocks if b.gamma]
    assert drafted and not any(int(t) in OUTSIDE_DRAFT_VOCAB for b in drafted for t in b.tokens)
    for block in drafted:
        assert torch.all(block.q[:, sorted(OUTSIDE_DRAFT_VOCAB)] == 0)
        assert torch.allclose(block.q.sum(-1), torch.ones(block.gamma))
    assert outside_later > 0


def test_the_check_detects_q_placed_without_d2t(target, monkeypatch):
    # Mutant: q over draft indices copied onto target ids 0..N-1 (d2t forgotten) while the
    # tokens are mapped correctly; the same chi-square check must reject it.
    from dspark.drafters.dspark.model import DSparkModel

    def broken_expand_q(self, q):
        full = q.new_zeros(*q.shape[:-1], self.config.vocab_size)
        full[..., : q.shape[-1]] = q
        return full

    monkeypatch.setattr(DSparkModel, "expand_q", broken_expand_q)
    fit, _ = lossless_check(target, "dspark-reduced-vocab", T1)
    assert fit.rejected, fit


def test_the_check_detects_a_broken_residual(target, monkeypatch):
    # Resampling from p instead of normalize(max(0, p - q)) after a rejection must fail the
    # very check above, with the same drafter and seeds.
    monkeypatch.setattr(dspark.verify, "residual_distribution", lambda p, q: p)
    fit, _ = lossless_check(target, "sharpened-target", T1)
    assert fit.rejected, fit


# -- greedy: token for token equal to plain argmax decoding ---------------------------------------


def greedy_oracle(model, prompt: list[int], n_tokens: int) -> list[int]:
    """Plain greedy decoding: the full sequence through the model at every step, no cache."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


GREEDY_PROMPTS = [[3], [0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1], [5, 2, 5, 2, 5, 2, 5], [4, 0, 3, 3, 1]]
GREEDY_DRAFTERS = {
    "none": NoDrafter,
    "ngram": lambda: NgramDrafter(NgramConfig(gamma=4)),
    "other-model": DRAFTERS["other-model"],
    "same-model": lambda: DraftModelDrafter(tiny_llama(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE), gamma=4),
    "fixed-logits": DRAFTERS["fixed-logits"],
    "dspark": DRAFTERS["dspark"],
    "eagle3": DRAFTERS["eagle3"],
    "eagle3-reduced-vocab": DRAFTERS["eagle3-reduced-vocab"],
}


@pytest.mark.parametrize("drafter_name", list(GREEDY_DRAFTERS))
def test_greedy_output_equals_plain_argmax_decoding(target, drafter_name):
    engine = SpeculativeEngine(target, GREEDY_DRAFTERS[drafter_name]())
    for prompt in GREEDY_PROMPTS:
        want = greedy_oracle(target.model, prompt, 16)
        got = engine.generate(GenerationRequest(prompt, SamplingParams(), max_new_tokens=16))
        assert got.token_ids == want, prompt
        assert got.finish_reason == "length"


def test_greedy_draft_equal_to_target_is_always_accepted(target):
    # Prefill gives 1 token; the next rounds verify γ = min(3, remaining - 1) = 3, 3.
    drafter = DraftModelDrafter(tiny_llama(vocab_size=V, seed=TARGET_SEED, scale=TARGET_SCALE), gamma=3)
    result = SpeculativeEngine(target, drafter).generate(GenerationRequest(PROMPT, SamplingParams(), max_new_tokens=9))
    stats = result.stats
    assert (stats.rounds, stats.proposed, stats.accepted) == (2, [3, 3], [3, 3])
    assert stats.tau == 4.0
    assert stats.position_acceptance() == [1.0, 1.0, 1.0]
    assert result.token_ids == greedy_oracle(target.model, PROMPT, 9)


def test_plain_decoding_bookkeeping(target):
    result = SpeculativeEngine(target, NoDrafter()).generate(GenerationRequest(PROMPT, T1, max_new_tokens=5))
    stats = result.stats
    assert (stats.rounds, stats.proposed, stats.accepted) == (4, [0] * 4, [0] * 4)
    assert stats.tau == 1.0 and stats.position_acceptance() == []
