"""Prompt-lookup (n-gram) drafting: copy what followed the latest earlier match of the suffix.

Training-free and deterministic, so q is a point mass on each proposed token; rejection
sampling against a point mass accepts x with probability p(x) and otherwise resamples from
p with x removed, which keeps the output exactly target-distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.drafters.base import DraftBlock, DraftInput


@dataclass(frozen=True)
class NgramConfig:
    """Prompt-lookup settings."""

    gamma: int = 7
    """Most tokens proposed per round."""
    max_ngram: int = 3
    """Longest suffix to look up; shorter ones are tried when it does not match."""
    min_ngram: int = 1
    """Shortest suffix that may be looked up."""

    def __post_init__(self) -> None:
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")


class NgramDrafter:
    """Prompt-lookup decoding as a :class:`~dspark.drafters.base.Drafter`."""

    name = "ngram"
    feature_layer_ids: tuple[int, ...] = ()

    def __init__(self, config: NgramConfig = NgramConfig()) -> None:
        self.config = config
        self.gamma = config.gamma

    def check_target(self, target) -> None:
        return None

    def reset(self) -> None:
        return None


    def propose(self, draft_input: DraftInput) -> DraftBlock:
        tokens = draft_input.tokens  # [L]
        gamma = min(self.config.gamma, draft_input.max_tokens)
        if gamma <= 0:
            return DraftBlock.empty(tokens.device)
        found = lookup(tokens, gamma, self.config.max_ngram, self.config.min_ngram)
        return DraftBlock(tokens=found if found is not None else tokens[:0])


def lookup(tokens: torch.Tensor, gamma: int, max_ngram: int, min_ngram: int) -> torch.Tensor | None:
    """Tokens that followed the most recent earlier occurrence of the longest matching suffix."""
    length = tokens.shape[0]
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n :]
        windows = tokens[: length - 1].unfold(0, n, 1)  # [L-n, n]; excludes the suffix itself
        hits = (windows == suffix).all(-1).nonzero()
        if hits.numel():
            start = int(hits[-1, 0]) + n  # host sync: the match position picks the slice
            follow = tokens[start : start + gamma]
            if follow.numel():
                return follow
    return None
