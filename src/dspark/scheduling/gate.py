"""Drafting only what a policy may verify: the gate the batched engine hands its drafter."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from dspark.scheduling.policy import Policy, Schedule


class SlotGate:
    """A :class:`~dspark.drafters.base.DraftGate` that stops drafting once ``policy`` would
    verify no further slot: drafting costs what it drafts, so slots that no request will
    verify are never drafted.

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

    def __init__(self, policy: Policy, num: int, calibrate=None, device="cpu") -> None:
        self.policy, self.num, self.calibrate, self.device = policy, num, calibrate, device
        self.schedule: Schedule | None = None
        """The step's schedule once the gate has stopped drafting, else None."""
        self.first_call: float | None = None
        """time.perf_counter() when the drafter first asked (its fixed work was done)."""

    def __call__(self, k: int, rows: Sequence[int], gammas: Sequence[int], confidences: torch.Tensor) -> bool:
        if self.first_call is None:
            self.first_call = time.perf_counter()
        full = torch.full((self.num, k + 1), 0.5, device=self.device)  # 0.5: finite under any calibration
        full[list(rows)] = confidences.to(full.dtype)
        drafted = [0] * self.num
        for i, g in zip(rows, gammas):
            drafted[i] = min(g, k + 1)
        schedule = self.policy.schedule(drafted, self.calibrate(full) if self.calibrate is not None else full)
        if any(ell == k + 1 for ell in schedule.lengths):
            return True
        self.schedule = schedule
        return False
