"""Eval records pooled per dataset and drafter: τ, acceptance per position, speed against plain
decoding on the same turns, the time split, and the held-out check of the confidences."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from dspark.evaluation import metrics
from dspark.evaluation.runner import REFERENCE, GenerationRecord
from dspark.scheduling.calibration import Calibration, CalibrationData, slot_metrics


NEAR_TIE = 1e-3
"""Top-2 logit gap within which a greedy mismatch counts as a near-tie (float rounding)."""


@dataclass(frozen=True)
class Aggregate:
    """One dataset (or "all") and one drafter, pooled over its generations and rounds."""

    dataset: str
    drafter: str
    generations: int
    new_tokens: int
    rounds: int
    wall_s: float
    tokens_per_s: float
    """Total new tokens / total wall seconds."""
    speedup: float
    """tokens_per_s / plain decoding's tokens_per_s on the same turns."""
    tau: float
    cumulative_acceptance: list[float]
    conditional_acceptance: list[float]
    verify_rate: float
    prefill_s: float
    draft_s: float
    verify_s: float
    overhead_s: float
    t_target_1_s: float
    """T_target(1): plain decoding's mean seconds per round (one target forward of one token)."""
    t_draft_s: float
    """Mean drafting seconds per round."""
    t_verify_s: float
    """Mean verification seconds per round (target forward of γ + 1 tokens and the rejection rule)."""
    ideal_speedup: float
    efficiency: float
    mismatches: int
    near_tie_mismatches: int = 0
    """Of them, those at a near-tie: top-2 logits within :data:`NEAR_TIE` where they part."""
    """Greedy turns whose tokens differ from plain decoding's."""
    confidence: dict | None = None
    """Held-out check of the confidence head: per-slot metrics of raw (and calibrated) a_k."""
    sources: dict | None = None
    """A hybrid's rounds per source: {source: {rounds, verified, accepted}} (None otherwise)."""


def aggregate(
    records: Sequence[GenerationRecord],
    drafters: Sequence[str],
    calibrations: Mapping[str, Calibration | None] | None = None,
) -> list[Aggregate]:
    """Per-dataset rows for every drafter, plus pooled "all" rows when there are several datasets."""
    names = list(dict.fromkeys(r.dataset for r in records))
    groups = [(name, [r for r in records if r.dataset == name]) for name in names]
    if len(names) > 1:
        groups.append(("all", list(records)))
    return [row for name, rs in groups for row in _aggregate_group(name, rs, drafters, calibrations or {})]


def _aggregate_group(name, records, drafters, calibrations) -> list[Aggregate]:
    plain = [r for r in records if r.drafter == REFERENCE]
    plain_rounds = sum(len(r.proposed) for r in plain)
    t_target_1 = sum(r.draft_s + r.verify_s for r in plain) / plain_rounds if plain_rounds else float("nan")
    plain_rate = _rate(plain)
    rows = []
    for spec in drafters:
        rs = [r for r in records if r.drafter == spec]
        proposed = [p for r in rs for p in r.proposed]
        accepted = [a for r in rs for a in r.accepted]
        split = metrics.TimeSplit.of(
            sum(r.wall_s for r in rs), sum(r.prefill_s for r in rs), sum(r.draft_s for r in rs), sum(r.verify_s for r in rs)
        )
        rounds = len(proposed)
        tau = metrics.tau(proposed, accepted)
        rate = _rate(rs)
        speedup = rate / plain_rate if plain_rate > 0 else float("nan")
        t_draft = split.draft_s / rounds if rounds else float("nan")
        t_verify = split.verify_s / rounds if rounds else float("nan")
        ideal = metrics.ideal_speedup(tau, t_target_1, t_draft, t_verify)
        rows.append(Aggregate(
            dataset=name, drafter=spec, generations=len(rs), new_tokens=sum(r.new_tokens for r in rs),
            rounds=rounds, wall_s=split.wall_s, tokens_per_s=rate, speedup=speedup, tau=tau,
            cumulative_acceptance=metrics.cumulative_acceptance(proposed, accepted),
            conditional_acceptance=metrics.conditional_acceptance(proposed, accepted),
            verify_rate=metrics.verify_rate(proposed, accepted),
            prefill_s=split.prefill_s, draft_s=split.draft_s, verify_s=split.verify_s, overhead_s=split.overhead_s,
            t_target_1_s=t_target_1, t_draft_s=t_draft, t_verify_s=t_verify,
            ideal_speedup=ideal, efficiency=metrics.efficiency(speedup, ideal),
            mismatches=sum(r.identical_to_plain is False for r in rs),
            near_tie_mismatches=sum(r.identical_to_plain is False and r.mismatch_top2_gap is not None
                                    and r.mismatch_top2_gap <= NEAR_TIE for r in rs),
            confidence=_confidence_check(rs, calibrations.get(spec)),
            sources=_by_source(rs),
        ))
    return rows


def _by_source(records) -> dict | None:
    """Rounds, verified and accepted drafted tokens per source of a hybrid drafter."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        for source, p, a in zip(r.sources or (), r.proposed, r.accepted):
            row = out.setdefault(source or "-", {"rounds": 0, "verified": 0, "accepted": 0})
            row["rounds"] += 1
            row["verified"] += p
            row["accepted"] += a
    return out or None


def _rate(records: Sequence[GenerationRecord]) -> float:
    wall = sum(r.wall_s for r in records)
    return sum(r.new_tokens for r in records) / wall if wall > 0 else float("nan")


def calibration_data(records: Sequence[GenerationRecord]) -> CalibrationData | None:
    """The (c_k, survived?) pairs of every round that carried confidences, or None."""
    rounds = [
        (p, a, c)
        for r in records if r.confidences is not None
        for p, a, c in zip(r.proposed, r.accepted, r.confidences) if p > 0
    ]
    return CalibrationData.from_rounds(rounds) if rounds else None


def _confidence_check(records, calibration: Calibration | None) -> dict | None:
    data = calibration_data(records)
    if data is None:
        return None
    calibrated = None
    if calibration is not None and data.gamma <= calibration.gamma:
        calibrated = [asdict(m) for m in slot_metrics(data, calibration)]
    return {"raw": [asdict(m) for m in slot_metrics(data)], "calibrated": calibrated}
