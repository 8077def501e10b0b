"""One request and its end: what to generate, what came out, and where generation stops.

:class:`GenerationRequest` is validated on construction; :class:`StopChecker` finds the end
(max_new_tokens, an EOS id or a stop string) for the batch-1 and the batched engine alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from dspark.engine.stats import GenerationStats
from dspark.sampling import SamplingParams
from dspark.target.model import TargetModel


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and how to continue it."""

    prompt_ids: Sequence[int]
    """Token ids of the prompt (chat template already applied)."""
    params: SamplingParams = SamplingParams()
    """Temperature, top-k and top-p."""
    max_new_tokens: int = 256
    """Stop after this many new tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings; the text is cut before the first one that appears."""
    seed: int = 0
    """Seed of this request's torch.Generator (drafting and verification share it)."""
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks that need a fixed length)."""

    def __post_init__(self) -> None:
        if len(self.prompt_ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class GenerationResult:
    """The committed continuation and how it was produced."""

    token_ids: list[int]
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str = "length"
    """"length", "eos" or "stop"."""


class StopChecker:
    """Finds where a request's generation ends: max_new_tokens, an EOS id, or a stop string
    (shared by the batch-1 and the batched engine)."""

    def __init__(self, target: TargetModel, request: GenerationRequest) -> None:
        self.target = target
        self.limit = request.max_new_tokens
        self.stop = request.stop
        self.eos = frozenset() if request.ignore_eos else target.eos_token_ids
        self.cut = self.limit
        self._checked = 0

    def check(self, committed: list[int]) -> str | None:
        for i in range(self._checked, min(len(committed), self.limit)):
            if committed[i] in self.eos:
                self.cut = i + 1  # the EOS id is kept, as transformers' generate() does
                return "eos"
        self._checked = len(committed)
        if self.stop:
            text = self.target.decode(committed[: self.limit])
            if any(s in text for s in self.stop):
                self.cut = self._shortest_prefix_with_stop(committed)
                return "stop"
        if len(committed) >= self.limit:
            self.cut = self.limit
            return "length"
        return None

    def _shortest_prefix_with_stop(self, committed: list[int]) -> int:
        for k in range(1, len(committed) + 1):
            text = self.target.decode(committed[:k])
            if any(s in text for s in self.stop):
                return k
        return len(committed)

    def text(self, token_ids: list[int]) -> str:
        text = self.target.decode(token_ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text = text[:at]
        return text
