"""Drafting only what a policy may verify: the gate the batched engine hands its drafter."""

from __future__ import annotations

from typing import Sequence

import torch

from dspark.scheduling.policy import Policy, Schedule


def slot_gate(policy: Policy, num: int, device: torch.device | str = "cpu"):
    """A :class:`~dspark.drafters.base.DraftGate` over ``num`` requests that stops drafting
    once ``policy`` would verify no further slot, returning the step's schedule: drafting
    costs what it drafts, so slots that no request will verify are never drafted.

    Asked before slot k+1 is drafted, it schedules the step as if every block ended at slot
    k+1; c_{k+1} is already known (it needs x_k, not x_{k+1}). If no request gets ℓ = k+1,
    drafting stops and that schedule is the step's: it is exactly the schedule of the whole
    blocks, whatever slots k+1.. would have held. Fixed lengths and the static threshold
    decide each request from its own first k+1 confidences. For DSpark, the search stops at
    its first non-improving candidate; every (r, k+1) lies at or after that point (none was
    admitted), every (r, j > k+1) after its (r, k+1), so the longer blocks only add
    candidates the search never reaches. The step's ℓ is thus the whole-block schedule's,
    itself non-anticipating, and verification stays lossless.
    """

    def gate(k: int, rows: Sequence[int], gammas: Sequence[int], confidences: torch.Tensor) -> Schedule | None:
        full = torch.full((num, k + 1), 0.5, device=device)  # 0.5: finite under any calibration
        full[list(rows)] = confidences.to(full.dtype)
        drafted = [0] * num
        for i, g in zip(rows, gammas):
            drafted[i] = min(g, k + 1)
        schedule = policy.schedule(drafted, full)
        return None if any(ell == k + 1 for ell in schedule.lengths) else schedule

    return gate
