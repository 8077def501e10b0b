"""Sampling parameters and the pure functions that turn logits into distributions.

Glossary (used across dspark): p is the target distribution, q the draft distribution.
Both are produced by :func:`warp_probs` from raw logits with the *same* parameters, so
the warped target distribution is what speculative decoding preserves exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature == 0`` means greedy (argmax) decoding."""

    temperature: float = 0.0
    """Softmax temperature; 0 selects greedy decoding."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables the filter."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose mass reaches top_p; 1.0 disables the filter."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature > 100.0:
            raise ValueError(f"temperature must be <= 100, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``logits`` # [..., V] -> probs # [..., V] (fp32).

    Greedy parameters give the one-hot distribution of the argmax, which is the T -> 0 limit
    and makes the rejection rule degenerate to exact argmax matching.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the most
        # likely token is therefore always kept.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from ``probs`` # [..., V] -> token ids # [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


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
