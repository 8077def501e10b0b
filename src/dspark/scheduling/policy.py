"""Verification-length policies: how many drafted tokens ℓ_r each request verifies this step.

Glossary (paper §3.2.2): request r drafted γ_r tokens with calibrated confidences c_{r,k}
(c_k: probability that x_k survives given x_<k did). a_{r,j} = ∏_{i≤j} c_{r,i} is the prefix
survival of j tokens. A step verifies B = Σ_r (1 + ℓ_r) target tokens and is expected to
commit τ* = Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j}) tokens; SPS(B) is the profiled steps per second, and
Θ = τ*·SPS(B) the expected token throughput.

Every policy maps (γ_r, c_{r,·}) to ℓ_r ≤ γ_r. Losslessness needs only one property of it:
the decision ℓ_r ≥ k must not depend on x_{r,k} (nor later tokens), because c_{r,k+1} is
computed from x_{r,k}. Fixed lengths and the static threshold (which reads c_{r,1..k} only)
have it trivially; DSpark (:mod:`dspark.scheduling.algorithm1`) has it because of its early
stop (Appendix A).

This module holds the interface (:class:`Schedule`, :class:`Policy`) and the policies that
need no cost model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from dspark.errors import DsparkError


@dataclass(frozen=True)
class Schedule:
    """The verification lengths of one step."""

    lengths: list[int]
    """ℓ_r per request, 0 <= ℓ_r <= γ_r."""
    expected_tokens: float | None = None
    """τ*: tokens the step is expected to commit under the confidences (DSpark only)."""
    survival_scale: float = 1.0
    """The factor the prefix survivals were scaled by (DSpark's online feedback)."""


Calibrate = Callable[[torch.Tensor], torch.Tensor]
"""Raw confidences # [R, W] -> calibrated c_k # [R, W] (``Calibration.apply``)."""


@dataclass(frozen=True)
class StepOutcome:
    """What a finished step cost and gave: what a policy may learn from (earlier steps only)."""

    requests: int
    """R: requests verified in the step."""
    schedule: Schedule
    """The schedule the step ran."""
    accepted: int
    """Drafted tokens accepted over all requests."""
    drafting_fixed_s: float | None = None
    """Seconds of drafting before the first slot; None when the drafter did not run."""
    drafting_per_slot_s: float | None = None
    """Seconds per drafted slot after that; None when not measured apart (eager drafting)."""
    overhead_s: float | None = None
    """Seconds of the step outside drafting and the target forward (scheduling, the
    per-request rule, commits): what a cost table of forwards does not see."""
    context: int | None = None
    """Committed positions of the step's longest request: where the next step's costs are read."""


class Policy(Protocol):
    """Chooses ℓ_r for every request of a step: everything the engine asks of a policy."""

    name: str
    max_draft: int | None
    """Most tokens worth drafting per request (None: the drafter's whole block)."""
    needs_confidences: bool

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        """``drafted`` γ_r per request # [R] (host ints), raw ``confidences`` # [R, W] (W >= max
        γ_r; entries at or beyond γ_r are ignored) or None -> ℓ_r per request. A policy that
        reads confidences calibrates them itself."""

    def check_shape(self, requests: int, width: int) -> None:
        """Raise DsparkError if steps of ``requests`` rows of up to ``width`` tokens cannot be
        scheduled."""

    def drafting_pays(self, schedule: Schedule, requests: int, free: Schedule | None = None) -> bool:
        """Whether a step that ran ``schedule`` was worth drafting for (the engine backs off
        from drafting while it is not), against ``free``: the schedule of what the drafter
        proposes at no cost (a hybrid's lookup blocks), or a plain step when None."""

    def observe(self, outcome: StepOutcome) -> None:
        """Told after every step what it cost and gave."""


def check_inputs(drafted: Sequence[int], confidences: torch.Tensor | None, needed: bool, name: str) -> None:
    """Validate one step's γ_r # [R] and confidences # [R, W] (every policy calls it first)."""
    if any(g < 0 for g in drafted):
        raise ValueError(f"drafted lengths must be >= 0, got {list(drafted)}")
    if confidences is None:
        if needed and any(drafted):
            raise DsparkError(
                f"the {name} policy needs confidences c_k, but the drafter returned none "
                "(DSpark drafters with a confidence head, n-gram lookup and the dspark+ngram hybrid provide them)"
            )
        return
    width = max(drafted, default=0)
    if confidences.dim() != 2 or confidences.shape[0] != len(drafted) or confidences.shape[1] < width:
        raise ValueError(
            f"confidences must be [R={len(drafted)}, W>={width}], got {tuple(confidences.shape)}"
        )


class FixedGamma:
    """Verify min(γ_r, gamma) tokens: the whole block when ``gamma`` is None (fixed-γ)."""

    needs_confidences = False

    def __init__(self, gamma: int | None = None, name: str | None = None) -> None:
        if gamma is not None and gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.max_draft = gamma
        self.name = name or ("fixed" if gamma is None else f"fixed-{gamma}")

    def check_shape(self, requests: int, width: int) -> None:
        return None

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        check_inputs(drafted, confidences, False, self.name)
        cap = self.gamma
        return Schedule([g if cap is None else min(g, cap) for g in drafted])

    def drafting_pays(self, schedule: Schedule, requests: int, free: Schedule | None = None) -> bool:
        return any(schedule.lengths)

    def observe(self, outcome: StepOutcome) -> None:
        return None


def gamma_one() -> FixedGamma:
    """γ = 1: one draft token per request and step, the analogue of the paper's MTP-1."""
    return FixedGamma(1, name="gamma-1")


class StaticThreshold:
    """Cut each block at its first c_k below ``threshold`` (single-request heuristics)."""

    needs_confidences = True
    max_draft = None

    def __init__(self, threshold: float, calibrate: Calibrate | None = None) -> None:
        """``calibrate`` maps raw c_k to calibrated ones before the threshold (None: as raw)."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold, self.calibrate = threshold, calibrate
        self.name = f"threshold-{threshold:g}"

    def check_shape(self, requests: int, width: int) -> None:
        return None

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        check_inputs(drafted, confidences, True, self.name)
        if confidences is None:
            return Schedule([0] * len(drafted))
        c = self.calibrate(confidences) if self.calibrate is not None else confidences
        width = c.shape[1]
        valid = torch.arange(width, device=c.device) < torch.tensor(drafted, device=c.device).view(-1, 1)
        keep = (c >= self.threshold) & valid  # [R, W]
        lengths = keep.long().cumprod(dim=1).sum(dim=1)  # leading run of kept slots
        return Schedule(lengths.tolist())  # host sync: the engine slices the blocks on the host

    def drafting_pays(self, schedule: Schedule, requests: int, free: Schedule | None = None) -> bool:
        return any(schedule.lengths)

    def observe(self, outcome: StepOutcome) -> None:
        return None
