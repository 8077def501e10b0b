"""Confidence calibration: Sequential Temperature Scaling (STS) and its metrics, as pure functions.

Glossary (paper §3.2.1): c_k is the drafter's confidence that draft slot k survives
verification *given that slots 1..k-1 survived*; by the chain rule the prefix survival
probability is a_k = ∏_{i≤k} c_i. A round that verified γ slots and accepted n of them
survived exactly the slots k ≤ n, so its observed prefix survival at slot k is [n ≥ k]
(defined for k ≤ γ only).

STS fits one temperature T_k per slot, left to right: c_k ↦ σ(logit(c_k) / T_k), with T_k
chosen on a 1-D grid to minimise the ECE of the calibrated a_k against the observed prefix
survival, T_1..T_{k-1} held at their fitted values. Temperature scaling preserves the order
of the c_k within a slot, so the head's ranking (its ROC-AUC per slot) is untouched.

:class:`Calibration` is what the scheduler imports: the fitted temperatures, ``apply`` and
the ``calibration.json`` stored beside the drafter's weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

CALIBRATION_FILE = "calibration.json"
METHOD = "sequential_temperature_scaling"
DEFAULT_BINS = 15
"""Equal-width bins of the ECE and the reliability diagram."""
DEFAULT_GRID = tuple(math.exp(x / 50.0) for x in range(-150, 151))
"""T in [e^-3, e^3] ≈ [0.05, 20], log-spaced (ratio e^0.02 ≈ 2%), containing T = 1 exactly."""
DEFAULT_MIN_EVENTS = 10
"""A slot is fitted only when its rounds hold at least this many survivals *and* rejections."""
_EPS = 1e-7  # keeps logit(c) finite for c at 0 or 1


# -- the calibration map ------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Per-slot temperatures that turn raw c_k into calibrated ones."""

    temperatures: tuple[float, ...]
    """T_k for slots k = 1..γ; T > 1 softens an overconfident head."""

    def __post_init__(self) -> None:
        temps = tuple(float(t) for t in self.temperatures)
        if not temps:
            raise ValueError("a calibration needs at least one temperature")
        if any(not (math.isfinite(t) and t > 0) for t in temps):
            raise ValueError(f"temperatures must be finite and > 0, got {list(temps)}")
        object.__setattr__(self, "temperatures", temps)

    @property
    def gamma(self) -> int:
        return len(self.temperatures)

    def apply(self, confidences: torch.Tensor) -> torch.Tensor:
        """Raw c_k # [..., γ'] -> calibrated σ(logit(c_k) / T_k) # [..., γ'], γ' ≤ γ.

        A block shorter than γ (the token budget cut it) uses the first γ' temperatures.
        """
        width = confidences.shape[-1] if confidences.dim() else 0
        if confidences.dim() == 0 or width > self.gamma:
            raise ValueError(
                f"confidences must be [..., γ'] with γ' <= {self.gamma}, got {tuple(confidences.shape)}"
            )
        dtype = torch.promote_types(confidences.dtype, torch.float32)  # fp16/bf16 logits lose the tails
        temps = torch.tensor(self.temperatures[:width], dtype=dtype, device=confidences.device)
        return temperature_scale(confidences.to(dtype), temps).to(confidences.dtype)

    def save(self, drafter_folder: str | Path, **report: Any) -> Path:
        """Write ``calibration.json`` (temperatures + any JSON-serialisable report) into the folder."""
        folder = Path(drafter_folder)
        if not folder.is_dir():
            raise ValueError(f"drafter folder {folder} does not exist")
        path = folder / CALIBRATION_FILE
        body = {"method": METHOD, "temperatures": list(self.temperatures), **report}
        path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, drafter_folder: str | Path) -> "Calibration | None":
        """The calibration stored beside a drafter's weights, or None if it has none."""
        path = Path(drafter_folder) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            temps = body["temperatures"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a calibration file: {exc}") from None
        if body.get("method", METHOD) != METHOD:
            raise ValueError(f"{path}: unknown calibration method {body.get('method')!r}")
        return cls(tuple(temps))


def load_calibration(drafter_folder: str | Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``Calibration.apply`` of the STS calibration saved beside a drafter, if there is one."""
    calibration = Calibration.load(drafter_folder)
    return calibration.apply if calibration is not None else None


def logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p, eps=_EPS)


def temperature_scale(c: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """σ(logit(c) / T), broadcasting c # [...] against T."""
    return torch.sigmoid(logit(c) / temperature)


# -- calibration data -------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationData:
    """(c_k, survived?) pairs of N verification rounds with up to γ slots each."""

    confidences: torch.Tensor
    """[N, γ] float64 raw c_k; NaN where slot k was not verified (k > num_verified)."""
    num_accepted: torch.Tensor
    """[N] int64 accepted draft tokens n of each round."""
    num_verified: torch.Tensor
    """[N] int64 verified draft tokens of each round (≤ γ)."""

    def __post_init__(self) -> None:
        c, n, v = self.confidences, self.num_accepted, self.num_verified
        if c.dim() != 2 or n.shape != (c.shape[0],) or v.shape != (c.shape[0],):
            raise ValueError(
                f"expected confidences [N, γ], num_accepted [N], num_verified [N]; got "
                f"{tuple(c.shape)}, {tuple(n.shape)}, {tuple(v.shape)}"
            )
        if bool(((n < 0) | (n > v) | (v > c.shape[1])).any()):
            raise ValueError("need 0 <= num_accepted <= num_verified <= γ in every round")
        seen = c[self.verified]
        if bool(((seen < 0) | (seen > 1) | seen.isnan()).any()):
            raise ValueError("confidences of verified slots must lie in [0, 1]")

    @classmethod
    def from_rounds(cls, rounds: Iterable[tuple[int, int, Sequence[float]]], gamma: int | None = None) -> "CalibrationData":
        """Build from (verified, accepted, c_1..c_verified) per round; rounds with γ = 0 are skipped."""
        rows = [(int(v), int(a), [float(x) for x in c][: int(v)]) for v, a, c in rounds if int(v) > 0]
        width = gamma if gamma is not None else max((v for v, _, _ in rows), default=0)
        conf = torch.full((len(rows), width), float("nan"), dtype=torch.float64)
        for i, (v, _, c) in enumerate(rows):
            if len(c) < v:
                raise ValueError(f"round {i} verified {v} slots but has {len(c)} confidences")
            conf[i, :v] = torch.tensor(c, dtype=torch.float64)
        return cls(
            conf,
            torch.tensor([a for _, a, _ in rows], dtype=torch.long),
            torch.tensor([v for v, _, _ in rows], dtype=torch.long),
        )

    @property
    def gamma(self) -> int:
        return int(self.confidences.shape[1])

    @property
    def verified(self) -> torch.Tensor:
        """[N, γ] bool: slot k (column k-1) was verified."""
        return torch.arange(1, self.gamma + 1) <= self.num_verified.unsqueeze(1)

    @property
    def survived(self) -> torch.Tensor:
        """[N, γ] bool: observed prefix survival [n ≥ k]."""
        return torch.arange(1, self.gamma + 1) <= self.num_accepted.unsqueeze(1)

    def prefix_survival(self, calibration: Calibration | None = None) -> torch.Tensor:
        """[N, γ] predicted a_k = ∏_{i≤k} c_i (calibrated when given); NaN where not verified."""
        c = self.confidences
        if calibration is not None:
            c = calibration.apply(c.nan_to_num(0.5)).masked_fill(~self.verified, float("nan"))
        return c.cumprod(dim=1)


# -- metrics ------------------------------------------------------------------------------
def expected_calibration_error(pred: torch.Tensor, outcome: torch.Tensor, bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Count-weighted ECE over equal-width bins: Σ_b (n_b / n) |mean pred_b − mean outcome_b|.

    ``pred`` # [..., n] (a leading grid of candidate predictions is allowed), ``outcome`` # [n]
    -> ECE # [...]. The last bin is closed, so pred = 1 falls in it.
    """
    if pred.shape[-1] != outcome.shape[-1] or outcome.dim() != 1:
        raise ValueError(f"pred [..., n] and outcome [n] disagree: {tuple(pred.shape)} vs {tuple(outcome.shape)}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    n = outcome.shape[0]
    lead = pred.shape[:-1]
    if n == 0:
        return torch.full(lead, float("nan"), dtype=torch.float64)
    flat = pred.reshape(-1, n).double()
    y = outcome.double().expand_as(flat)
    index = (flat * bins).long().clamp_(0, bins - 1) + bins * torch.arange(flat.shape[0]).unsqueeze(1)
    # Σ_b (n_b/n)|mean p_b − mean y_b| = Σ_b |Σ_{i∈b} p_i − Σ_{i∈b} y_i| / n
    gap = torch.zeros(flat.shape[0] * bins, dtype=torch.float64).index_add_(0, index.flatten(), (flat - y).flatten())
    return (gap.view(-1, bins).abs().sum(1) / n).reshape(lead)


def roc_auc(score: torch.Tensor, outcome: torch.Tensor) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) formula, ties at mid-rank.

    NaN when only one class occurs.
    """
    if score.shape != outcome.shape or score.dim() != 1:
        raise ValueError(f"score [n] and outcome [n] disagree: {tuple(score.shape)} vs {tuple(outcome.shape)}")
    y = outcome.bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    s = score.double()
    order = torch.argsort(s)
    sorted_s = s[order]
    # mid-ranks: every member of a run of equal scores gets the mean of the run's ranks
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(s)
    ranks[order] = mid[inverse]
    u = ranks[y].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def brier_score(pred: torch.Tensor, outcome: torch.Tensor) -> float:
    """Mean squared error of a probability against 0/1 outcomes; NaN for no samples."""
    if pred.shape != outcome.shape:
        raise ValueError(f"pred and outcome disagree: {tuple(pred.shape)} vs {tuple(outcome.shape)}")
    if pred.numel() == 0:
        return float("nan")
    return float(((pred.double() - outcome.double()) ** 2).mean())


@dataclass(frozen=True)
class SlotMetrics:
    """How well a_k predicts prefix survival at one slot."""

    slot: int
    """k, 1-based."""
    count: int
    """Rounds that verified slot k."""
    survival: float
    """Observed prefix survival rate at slot k."""
    mean_pred: float
    """Mean predicted a_k."""
    ece: float
    auc: float
    brier: float


def slot_metrics(
    data: CalibrationData, calibration: Calibration | None = None, bins: int = DEFAULT_BINS
) -> list[SlotMetrics]:
    """ECE, ROC-AUC and Brier score of (calibrated) a_k against [n ≥ k], slot by slot."""
    a, survived, verified = data.prefix_survival(calibration), data.survived, data.verified
    rows = []
    for k in range(data.gamma):
        m = verified[:, k]
        pred, y = a[m, k], survived[m, k]
        count = int(m.sum())
        rows.append(SlotMetrics(
            slot=k + 1, count=count,
            survival=float(y.double().mean()) if count else float("nan"),
            mean_pred=float(pred.mean()) if count else float("nan"),
            ece=float(expected_calibration_error(pred, y, bins)),
            auc=roc_auc(pred, y), brier=brier_score(pred, y),
        ))
    return rows


# -- fitting ------------------------------------------------------------------------------
def slot_events(data: CalibrationData) -> list[tuple[int, int]]:
    """(survivals, rejections) among the rounds that verified slot k, for k = 1..γ."""
    verified, survived = data.verified, data.survived
    events = []
    for k in range(data.gamma):
        seen = int(verified[:, k].sum())
        hits = int((verified[:, k] & survived[:, k]).sum())
        events.append((hits, seen - hits))
    return events


def fit_sts(
    data: CalibrationData,
    grid: Sequence[float] = DEFAULT_GRID,
    bins: int = DEFAULT_BINS,
    min_events: int = DEFAULT_MIN_EVENTS,
) -> Calibration:
    """Sequential Temperature Scaling: T_1, then T_2 with T_1 fixed, and so on.

    Each T_k minimises ECE(∏_{i<k} c̃_i · σ(logit(c_k)/T), [n ≥ k]) over ``grid`` on the rounds
    that verified slot k; ties go to the candidate nearest T = 1. A slot with fewer than
    ``min_events`` survivals or rejections keeps T = 1: with, say, no survival at all the ECE
    has no interior optimum and runs off to an edge of the grid, and the sharp edge would send
    any later c_k above 0.5 to ~1.
    """
    if not grid or any(t <= 0 for t in grid):
        raise ValueError("the temperature grid must be non-empty and positive")
    temps_grid = torch.tensor(sorted(grid), dtype=torch.float64)  # [G]
    verified, survived = data.verified, data.survived
    prefix = torch.ones(data.confidences.shape[0], dtype=torch.float64)  # ∏_{i<k} c̃_i  [N]
    temperatures = []
    for k, (hits, misses) in enumerate(slot_events(data)):
        m = verified[:, k]
        c = data.confidences[m, k]  # [n_k]
        if min(hits, misses) < min_events or hits + misses == 0:
            temperatures.append(1.0)
            prefix = prefix * data.confidences[:, k].nan_to_num(0.5)
            continue
        candidates = prefix[m] * temperature_scale(c, temps_grid.unsqueeze(1))  # [G, n_k]
        ece = expected_calibration_error(candidates, survived[m, k], bins)  # [G]
        best = ece.min()
        tied = (ece <= best + 1e-12).nonzero().flatten()
        pick = tied[temps_grid[tied].log().abs().argmin()]
        t_k = float(temps_grid[pick])
        temperatures.append(t_k)
        calibrated = temperature_scale(data.confidences[:, k].nan_to_num(0.5), t_k)
        prefix = prefix * calibrated  # rows that skipped slot k never reach slot k+1
    return Calibration(tuple(temperatures))


# -- diagnostics --------------------------------------------------------------------------
@dataclass(frozen=True)
class ReliabilityCurve:
    """Bin statistics of one slot's predicted a_k (empty bins are NaN)."""

    edges: tuple[float, ...]
    """bins + 1 bin edges in [0, 1]."""
    counts: tuple[int, ...]
    mean_pred: tuple[float, ...]
    observed: tuple[float, ...]
    """Observed survival rate per bin."""


def reliability_curve(pred: torch.Tensor, outcome: torch.Tensor, bins: int = DEFAULT_BINS) -> ReliabilityCurve:
    """Per-bin count, mean prediction and observed rate of ``pred`` # [n] against ``outcome`` # [n]."""
    index = (pred.double() * bins).long().clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins).double()
    sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, pred.double())
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, outcome.double())
    safe = counts.clamp(min=1)
    empty = counts == 0
    return ReliabilityCurve(
        edges=tuple(i / bins for i in range(bins + 1)),
        counts=tuple(int(x) for x in counts),
        mean_pred=tuple((sums / safe).masked_fill(empty, float("nan")).tolist()),
        observed=tuple((hits / safe).masked_fill(empty, float("nan")).tolist()),
    )


@dataclass(frozen=True)
class SweepPoint:
    """Static-threshold verification replayed on recorded rounds (paper Figure 5)."""

    threshold: float
    accepted_per_step: float
    """Committed tokens per round: accepted drafts + the recovered/bonus token."""
    rejected_per_step: float
    """Verified draft tokens per round that were not accepted (wasted target work)."""
    verified_per_step: float
    """ℓ + 1 per round: the drafts kept by the threshold plus the anchor."""
    acceptance_rate: float
    """accepted_per_step / verified_per_step."""


def threshold_sweep(
    data: CalibrationData, thresholds: Sequence[float], calibration: Calibration | None = None
) -> list[SweepPoint]:
    """Verify only the prefix with a_k ≥ threshold; count what each round would have committed.

    a_k is non-increasing in k, so the kept slots form a prefix of length ℓ; a round that
    accepted n of its slots commits min(n, ℓ) + 1 tokens and wastes ℓ − min(n, ℓ). The replay is
    exact per round (acceptance of slot k depends only on slots ≤ k), though with fewer tokens
    verified later rounds would have started elsewhere.
    """
    a = data.prefix_survival(calibration).nan_to_num(-1.0)  # unverified slots are never kept
    n = data.num_accepted
    rounds = max(int(n.shape[0]), 1)
    points = []
    for t in thresholds:
        ell = (a >= t).sum(dim=1)
        committed = torch.minimum(n, ell) + 1
        accepted = float(committed.sum()) / rounds
        verified = float((ell + 1).sum()) / rounds
        points.append(SweepPoint(
            threshold=float(t), accepted_per_step=accepted,
            rejected_per_step=verified - accepted, verified_per_step=verified,
            acceptance_rate=accepted / verified if verified else float("nan"),
        ))
    return points
