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
from typing import Protocol, Sequence

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


class Policy(Protocol):
    """Chooses ℓ_r for every request of a step."""

    name: str
    max_draft: int | None
    """Most tokens worth drafting per request (None: the drafter's whole block)."""
    needs_confidences: bool

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        """``drafted`` γ_r per request # [R] (host ints), ``confidences`` # [R, W] (W >= max γ_r;
        entries at or beyond γ_r are ignored) or None -> ℓ_r per request."""

    def check_shape(self, requests: int, width: int) -> None:
        """Raise DsparkError if steps of ``requests`` rows of up to ``width`` tokens cannot be
        scheduled."""


def check_inputs(drafted: Sequence[int], confidences: torch.Tensor | None, needed: bool, name: str) -> None:
    """Validate one step's γ_r # [R] and confidences # [R, W] (every policy calls it first)."""
    if any(g < 0 for g in drafted):
        raise ValueError(f"drafted lengths must be >= 0, got {list(drafted)}")
    if confidences is None:
        if needed and any(drafted):
            raise DsparkError(
                f"the {name} policy needs confidences c_k, but the drafter returned none "
                "(only DSpark drafters with a confidence head provide them)"
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


def gamma_one() -> FixedGamma:
    """γ = 1: one draft token per request and step, the analogue of the paper's MTP-1."""
    return FixedGamma(1, name="gamma-1")


class StaticThreshold:
    """Cut each block at its first c_k below ``threshold`` (single-request heuristics)."""

    needs_confidences = True
    max_draft = None

    def __init__(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold = threshold
        self.name = f"threshold-{threshold:g}"

    def check_shape(self, requests: int, width: int) -> None:
        return None

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        check_inputs(drafted, confidences, True, self.name)
        if confidences is None:
            return Schedule([0] * len(drafted))
        width = confidences.shape[1]
        valid = torch.arange(width, device=confidences.device) < torch.tensor(drafted, device=confidences.device).view(-1, 1)
        keep = (confidences >= self.threshold) & valid  # [R, W]
        lengths = keep.long().cumprod(dim=1).sum(dim=1)  # leading run of kept slots
        return Schedule(lengths.tolist())  # host sync: the engine slices the blocks on the host
