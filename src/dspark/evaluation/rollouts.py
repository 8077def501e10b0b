"""Calibration rollouts: the drafting rounds of real generations, and STS fitted on them.

``dspark calibrate`` runs a drafter with a confidence head over the calibration split of the
prompt sets (:func:`collect_rounds`), then fits Sequential Temperature Scaling on the pooled
rounds and reports per-slot metrics, reliability curves and static-threshold sweeps before
and after (:func:`fit_calibration`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from dspark.evaluation.datasets import EvalDataset
from dspark.evaluation.runner import Encoder, EvalSettings
from dspark.scheduling.calibration import (
    DEFAULT_GRID,
    DEFAULT_MIN_EVENTS,
    Calibration,
    CalibrationData,
    ReliabilityCurve,
    SlotMetrics,
    SweepPoint,
    fit_sts,
    reliability_curve,
    slot_events,
    slot_metrics,
    threshold_sweep,
)

SWEEP_THRESHOLDS = tuple(i / 20 for i in range(20))
"""0.0, 0.05, ..., 0.95: the static-threshold sweep (0 = verify the full block)."""


def collect_rounds(
    datasets: Sequence[EvalDataset],
    engine,
    settings: EvalSettings,
    encode: Encoder,
    progress=None,
) -> dict[str, list[tuple[int, int, list[float]]]]:
    """Per dataset, (verified, accepted, raw c_1..c_γ) of every drafting round of real rollouts.

    Turn t is asked after the engine's own answer to turn t − 1, which is the target's answer:
    speculative decoding is lossless.
    """
    from dspark.errors import DsparkError

    by_dataset: dict[str, list[tuple[int, int, list[float]]]] = {}
    for dataset in datasets:
        rounds = by_dataset.setdefault(dataset.name, [])
        for conversation in dataset.conversations:
            history: list[dict] = []
            for t, user in enumerate(conversation.turns, 1):
                messages = history + [{"role": "user", "content": user}]
                request = settings.request(encode(messages), t)
                if progress is not None:
                    progress.set_description(f"{dataset.name} #{conversation.index}.{t}")
                result = engine.generate(request)
                for r in result.stats.round_records:
                    if r.proposed == 0:
                        continue
                    if r.confidences is None:
                        raise DsparkError(
                            f"drafter {engine.drafter.name!r} returns no confidences; calibration needs a "
                            "drafter with a confidence head (a DSpark checkpoint)"
                        )
                    rounds.append((r.proposed, r.accepted, r.confidences.tolist()))  # host sync, off the clock
                if progress is not None:
                    progress.update()
                history = messages + [{"role": "assistant", "content": result.text}]
    return by_dataset


@dataclass(frozen=True)
class CalibrationFit:
    """STS fitted on rollouts, with the before/after diagnostics ``dspark calibrate`` reports."""

    calibration: Calibration
    rounds: int
    """Drafting rounds the fit saw (all datasets pooled)."""
    bins: int
    before: list[SlotMetrics]
    """Per slot: raw a_k against prefix survival."""
    after: list[SlotMetrics]
    """Per slot: calibrated a_k against prefix survival (same rounds: in-sample)."""
    reliability_before: list[ReliabilityCurve]
    reliability_after: list[ReliabilityCurve]
    sweeps: dict[str, dict[str, list[SweepPoint]]]
    """Dataset name (and "all") -> {"raw": [...], "calibrated": [...]} static-threshold sweeps."""
    sweep_rounds: dict[str, int]
    unfitted: list[int]
    """Slots (1-based) with too few survivals or rejections to fit; they keep T = 1."""

    def to_json(self) -> dict:
        return {
            "temperatures": list(self.calibration.temperatures),
            "unfitted_slots": self.unfitted,
            "bins": self.bins,
            "rounds": self.rounds,
            "before": [asdict(m) for m in self.before],
            "after": [asdict(m) for m in self.after],
            "mean_ece_before": _mean([m.ece for m in self.before]),
            "mean_ece_after": _mean([m.ece for m in self.after]),
            "reliability": {"before": [asdict(c) for c in self.reliability_before],
                            "after": [asdict(c) for c in self.reliability_after]},
            "sweep": {
                name: {"rounds": self.sweep_rounds[name],
                       **{kind: [asdict(p) for p in points] for kind, points in sweep.items()}}
                for name, sweep in self.sweeps.items()
            },
        }


def fit_calibration(
    rounds: Mapping[str, Sequence[tuple[int, int, Sequence[float]]]],
    bins: int,
    min_events: int = DEFAULT_MIN_EVENTS,
    thresholds: Sequence[float] = SWEEP_THRESHOLDS,
) -> CalibrationFit:
    """STS on the pooled rounds of every dataset, plus per-slot metrics, reliability curves and
    the threshold sweep pooled ("all") and per dataset, like the paper's per-domain Figure 5."""
    data = CalibrationData.from_rounds([r for rs in rounds.values() for r in rs])
    calibration = fit_sts(data, bins=bins, min_events=min_events)
    unfitted = [k + 1 for k, (hits, misses) in enumerate(slot_events(data))
                if min(hits, misses) < min_events or hits + misses == 0]
    parts = {"all": data}
    if len(rounds) > 1:
        parts.update({name: CalibrationData.from_rounds(rs, gamma=data.gamma) for name, rs in rounds.items() if rs})
    curves = {}
    for name, cal in (("before", None), ("after", calibration)):
        a, seen, survived = data.prefix_survival(cal), data.verified, data.survived
        curves[name] = [reliability_curve(a[seen[:, k], k], survived[seen[:, k], k], bins) for k in range(data.gamma)]
    return CalibrationFit(
        calibration=calibration,
        rounds=int(data.confidences.shape[0]),
        bins=bins,
        before=slot_metrics(data, bins=bins),
        after=slot_metrics(data, calibration, bins=bins),
        reliability_before=curves["before"],
        reliability_after=curves["after"],
        sweeps={name: {"raw": threshold_sweep(part, thresholds), "calibrated": threshold_sweep(part, thresholds, calibration)}
                for name, part in parts.items()},
        sweep_rounds={name: int(part.confidences.shape[0]) for name, part in parts.items()},
        unfitted=unfitted,
    )


def calibration_report(fit: CalibrationFit, drafter: str, model: str, settings: EvalSettings, gamma: int | None,
                       min_events: int, datasets: Sequence[EvalDataset]) -> dict:
    """The body of ``calibration_report.json``: what was fitted on which rollouts, and the fit."""
    import datetime as dt

    return {
        "drafter": drafter,
        "model": model,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "temperature": settings.temperature,
        "max_new_tokens": settings.max_new_tokens,
        "seed": settings.seed,
        "gamma": gamma,
        "min_events": min_events,
        "datasets": {d.name: {"path": d.path, "split": d.split, "conversations": [c.index for c in d.conversations]}
                     for d in datasets},
        **fit.to_json(),
    }


def saved_summary(report: dict) -> dict:
    """What ``calibration.json`` keeps of a :func:`calibration_report` beside the temperatures."""
    summary = {k: report[k] for k in ("drafter", "model", "date", "temperature", "bins", "rounds", "unfitted_slots",
                                      "mean_ece_before", "mean_ece_after", "datasets")}
    summary["per_slot"] = [{"slot": b["slot"], "ece_before": b["ece"], "ece_after": a["ece"], "auc": a["auc"],
                            "brier_before": b["brier"], "brier_after": a["brier"]}
                           for b, a in zip(report["before"], report["after"])]
    return summary


def grid_edge_slots(temperatures: Sequence[float], grid: Sequence[float] = DEFAULT_GRID) -> list[int]:
    """Slots (1-based) whose fitted T_k sits on an edge of the search grid: no interior optimum
    (temperature scaling cannot move c_k across 0.5)."""
    edges = (min(grid), max(grid))
    return [k + 1 for k, t in enumerate(temperatures) if any(abs(t - e) < 1e-9 * e for e in edges)]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")
