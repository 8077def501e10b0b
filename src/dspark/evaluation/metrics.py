"""Pure functions from per-round (verified, accepted) records to the numbers the eval reports.

Glossary: a round verifies γ draft tokens x_1..x_γ and accepts a prefix of n of them, then
commits n + 1 tokens (the accepted ones and a recovered or bonus token).

- τ: mean committed tokens per round, Σ(n + 1) / rounds (the paper's accepted length,
  bonus included);
- cumulative acceptance a_k (prefix survival): Pr[n ≥ k | slot k verified];
- conditional acceptance (paper Figure 2): Pr[n ≥ k | slot k verified and n ≥ k − 1], the
  acceptance of slot k among rounds where every earlier slot was accepted;
- verify rate: Σ(n + 1) / Σ(γ + 1), the share of target-verified positions that commit a token;
- ideal speedup: τ · T_target(1) / (T_draft + T_verify(γ + 1)), with per-round costs
  measured in the same run; efficiency = measured speedup / ideal speedup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def _check(proposed: Sequence[int], accepted: Sequence[int]) -> None:
    if len(proposed) != len(accepted):
        raise ValueError(f"proposed ({len(proposed)} rounds) and accepted ({len(accepted)}) differ in length")
    for p, a in zip(proposed, accepted):
        if not 0 <= a <= p:
            raise ValueError(f"a round accepted {a} of {p} proposed tokens")


def tau(proposed: Sequence[int], accepted: Sequence[int]) -> float:
    """Committed tokens per round, Σ(n + 1) / rounds; NaN with no rounds."""
    _check(proposed, accepted)
    return (sum(accepted) + len(accepted)) / len(accepted) if accepted else float("nan")


def cumulative_acceptance(proposed: Sequence[int], accepted: Sequence[int]) -> list[float]:
    """a_k = #(n ≥ k) / #(γ ≥ k) for k = 1..max γ (prefix survival)."""
    _check(proposed, accepted)
    rates = []
    for k in range(1, max(proposed, default=0) + 1):
        verified = [a for p, a in zip(proposed, accepted) if p >= k]
        rates.append(sum(a >= k for a in verified) / len(verified))
    return rates


def conditional_acceptance(proposed: Sequence[int], accepted: Sequence[int]) -> list[float]:
    """#(n ≥ k) / #(n ≥ k − 1) over rounds with γ ≥ k, for k = 1..max γ; NaN where none reached k."""
    _check(proposed, accepted)
    rates = []
    for k in range(1, max(proposed, default=0) + 1):
        reached = [a for p, a in zip(proposed, accepted) if p >= k and a >= k - 1]
        rates.append(sum(a >= k for a in reached) / len(reached) if reached else float("nan"))
    return rates


def verify_rate(proposed: Sequence[int], accepted: Sequence[int]) -> float:
    """Σ(n + 1) / Σ(γ + 1); NaN with no rounds."""
    _check(proposed, accepted)
    return (sum(accepted) + len(accepted)) / (sum(proposed) + len(proposed)) if proposed else float("nan")


def ideal_speedup(tau_: float, t_target_1: float, t_draft: float, t_verify: float) -> float:
    """τ · T_target(1) / (T_draft + T_verify): the speedup if nothing but the models cost time."""
    round_s = t_draft + t_verify
    return tau_ * t_target_1 / round_s if round_s > 0 else float("nan")


def efficiency(speedup: float, ideal: float) -> float:
    """Measured speedup as a share of the ideal one."""
    return speedup / ideal if ideal > 0 else float("nan")


@dataclass(frozen=True)
class TimeSplit:
    """Where the wall time of some generations went, in seconds."""

    prefill_s: float
    draft_s: float
    verify_s: float
    overhead_s: float
    """Everything else inside generate(): committing, stop checks, bookkeeping, Python."""

    @classmethod
    def of(cls, wall_s: float, prefill_s: float, draft_s: float, verify_s: float) -> "TimeSplit":
        return cls(prefill_s, draft_s, verify_s, max(wall_s - prefill_s - draft_s - verify_s, 0.0))

    @property
    def wall_s(self) -> float:
        return self.prefill_s + self.draft_s + self.verify_s + self.overhead_s

    def fractions(self) -> dict[str, float]:
        wall = self.wall_s
        parts = {"prefill": self.prefill_s, "draft": self.draft_s, "verify": self.verify_s, "overhead": self.overhead_s}
        return {k: (v / wall if wall > 0 else float("nan")) for k, v in parts.items()}
