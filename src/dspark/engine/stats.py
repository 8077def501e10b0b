"""Per-generation statistics: τ, per-position acceptance and where the time went."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RoundRecord:
    """One verification round as the evaluation harness and calibration need it."""

    proposed: int
    """Draft tokens verified (γ of the round)."""
    accepted: int
    """Draft tokens accepted (a prefix of the proposed ones)."""
    draft_s: float
    """Seconds spent in ``Drafter.propose``."""
    verify_s: float
    """Seconds spent in the target forward, the rejection rule and the cache rollback."""
    confidences: Any = None
    """[γ] raw c_k of the block as the drafter returned it (a tensor, possibly on the
    accelerator: converting it here would be a host sync per round), or None."""
    margins: Any = None
    """[γ] top-1 minus top-2 draft logit per slot as the drafter returned it, or None."""
    source: str = ""
    """The block's :attr:`~dspark.drafters.base.DraftBlock.source` ('' for a one-source drafter)."""


@dataclass
class GenerationStats:
    """Counters filled in by the engine while one request is generated."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0
    """Verification rounds after prefill (each commits accepted + 1 tokens)."""
    accepted: list[int] = field(default_factory=list)
    """Accepted draft tokens per round."""
    proposed: list[int] = field(default_factory=list)
    """Draft tokens verified per round (γ of that round)."""
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    round_records: list[RoundRecord] = field(default_factory=list)
    """Every round in order, with its own timings and raw confidences."""

    def record_round(
        self,
        proposed: int,
        accepted: int,
        draft_s: float = 0.0,
        verify_s: float = 0.0,
        confidences: Any = None,
        margins: Any = None,
        source: str = "",
    ) -> None:
        self.rounds += 1
        self.proposed.append(proposed)
        self.accepted.append(accepted)
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.round_records.append(RoundRecord(proposed, accepted, draft_s, verify_s, confidences, margins, source))

    @property
    def tau(self) -> float:
        """Mean accepted + bonus tokens per round (1.0 for plain decoding)."""
        return (sum(self.accepted) + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def position_acceptance(self) -> list[float]:
        """Cumulative acceptance per draft slot k: Pr[x_1..x_k all accepted | k verified]."""
        depth = max(self.proposed, default=0)
        rates = []
        for k in range(1, depth + 1):
            verified = sum(1 for p in self.proposed if p >= k)
            survived = sum(1 for p, a in zip(self.proposed, self.accepted) if p >= k and a >= k)
            rates.append(survived / verified if verified else 0.0)
        return rates

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "rounds": self.rounds,
            "tau": self.tau,
            "tokens_per_second": self.tokens_per_second,
            "position_acceptance": self.position_acceptance(),
            "accepted_per_round": self.accepted,
            "proposed_per_round": self.proposed,
            "prefill_s": self.prefill_s,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "wall_s": self.wall_s,
        }


@dataclass(frozen=True)
class StepRecord:
    """One batched verification step."""

    requests: int
    """R: requests verified in this step."""
    budget: int
    """B = Σ_r (1 + ℓ_r): tokens the target verified."""
    drafted: int
    """Σ_r γ_r: tokens drafted (B - R of them were verified)."""
    committed: int
    """Tokens committed over all requests (Σ accepted + R)."""
    expected_tokens: float | None
    """τ* predicted by the scheduler, when it makes a prediction."""
    draft_s: float
    schedule_s: float
    verify_s: float
