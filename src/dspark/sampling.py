"""Sampling parameters and the pure functions that turn logits into distributions.

Glossary (used across dspark): p is the target distribution, q the draft distribution.
Both are produced by :func:`warp_probs` from raw logits with the *same* parameters, so
the warped target distribution is what speculative decoding preserves exactly.

Nothing a request asks for can turn finite logits into NaN: a temperature below
:data:`GREEDY_TEMPERATURE` is greedy decoding (the T -> 0 limit), the warp divides logits
already shifted by their maximum (so nothing overflows), and top-p always keeps the most
likely token. Logits that are not finite come from a broken model; :func:`check_logits`
turns them into a :class:`~dspark.errors.NonFiniteLogits` error of the one request, and
:func:`sample` never raises or asserts on the device, whatever its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.errors import NonFiniteLogits

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are greedy decoding (vLLM's ``_SAMPLING_EPS`` in its
``SamplingParams``). Greedy is the T -> 0 limit of the warp and is applied to p and q alike,
so speculative decoding stays exactly lossless with respect to it. Sampling at T = 1e-5 would
differ only among tokens within ~1e-4 of the top logit: any token further below it has
probability under e^-10 there."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature < GREEDY_TEMPERATURE`` (0 included) means
    greedy (argmax) decoding."""

    temperature: float = 0.0
    """Softmax temperature; 0 (or anything below ``GREEDY_TEMPERATURE``) selects greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables the filter."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose mass reaches top_p; 1.0 disables the filter."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token the output holds already (-2..2)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted once per earlier occurrence in the output (-2..2)."""
    repetition_penalty: float = 1.0
    """vLLM's / transformers': the logit of a token in the prompt or the output is divided by
    it when positive, multiplied when negative (> 0; 1 disables it)."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature > 100.0:
            raise ValueError(f"temperature must be <= 100, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must lie in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must lie in (0, 10], got {self.repetition_penalty}")

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes the logits (they then depend on the tokens before)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: T = 0, or a temperature so small that T -> 0 is what it means."""
        return self.temperature < GREEDY_TEMPERATURE


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``logits`` # [..., V] -> probs # [..., V] (fp32).

    Greedy parameters give the one-hot distribution of the argmax, which is the T -> 0 limit
    and makes the rejection rule degenerate to exact argmax matching. For finite logits the
    result is finite whatever the parameters: see the module docstring.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    # Shift before dividing: (l - max) / T <= 0 cannot overflow to +inf however small T is,
    # and the most likely token keeps exp(0) = 1, so the softmax below never divides by 0.
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p. The most likely
        # token is always kept, even for a top_p that rounds to 0 in float32 (1e-300).
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, output_counts: torch.Tensor, prompt_mask: torch.Tensor,
    draft_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The penalised logits # [n, V] of n consecutive positions, as vLLM orders them
    (repetition, then frequency and presence). Row j continues the output counted in
    ``output_counts`` # [V] by the draft tokens x_1..x_j (``draft_tokens`` # [>= n - 1]):
    a penalty reads every token before its position, drafted ones included, so verification
    applies it per position. ``prompt_mask`` # [V] bool marks the prompt's tokens (repetition
    only). Penalties are a function of the tokens before a position, so p stays a
    distribution over the next token given its prefix and rejection sampling stays exact."""
    n, vocab = logits.shape
    counts = output_counts.float().expand(n, vocab)
    if n > 1:
        drafted = torch.nn.functional.one_hot(draft_tokens[: n - 1], vocab).float().cumsum(0)  # [n-1, V]
        counts = counts + torch.cat([torch.zeros_like(drafted[:1]), drafted])
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        seen = prompt_mask | (counts > 0)
        scaled = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


def check_logits(logits: torch.Tensor, what: str = "the model's logits") -> None:
    """Raise :class:`NonFiniteLogits` unless every row of ``logits`` # [..., V] is usable: no
    NaN, no +inf, and some finite entry (-inf alone marks an impossible token). One host sync."""
    if not bool(usable(logits)):
        raise NonFiniteLogits(f"{what} hold NaN or inf: the model is broken or overflowed in its dtype")


def usable(logits: torch.Tensor) -> torch.Tensor:
    """Whether ``logits`` # [..., V] can be sampled (see :func:`check_logits`) -> bool # [] on
    the device, so a caller can fold the test into a sync it makes anyway."""
    bad = logits.isnan() | logits.isposinf()
    return ~bad.any() & logits.isfinite().any(-1).all()


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from ``probs`` # [..., V] -> token ids # [...].

    The exponential race argmax(p / E), E ~ Exp(1) i.i.d., picks token i with probability
    p_i / sum(p). It is the very algorithm (and random stream) of ``torch.multinomial(p, 1)``
    (ATen's one-sample fast path), without its validity check: that check is a host sync and
    raises (a device assert on some paths) on NaN, which in a batched step would take every
    request down with one broken row. Here a NaN row yields some in-range id, never an error;
    callers check the logits (:func:`check_logits`) where they sync anyway.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    race = torch.empty_like(flat).exponential_(1, generator=generator)
    # E = 0 has probability ~2^-53 on the CPU; p / 0 would make a zero-probability token win.
    race.clamp_min_(torch.finfo(race.dtype).tiny)
    return (flat / race).argmax(-1).reshape(probs.shape[:-1])


def sample_from_logits(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw tokens from ``logits`` # [..., V]; return (tokens # [...], probs # [..., V] or None).

    The probabilities are None under greedy decoding, where the draw is the argmax.
    """
    if params.greedy:
        return logits.argmax(-1), None
    probs = warp_probs(logits, params)
    return sample(probs, generator), probs
