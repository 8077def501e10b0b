"""Any batch-1 drafter as a :class:`~dspark.drafters.base.BatchDrafter`.

:class:`LoopedDrafter` adapts a :class:`~dspark.drafters.base.Drafter` by giving every slot
its own shallow copy (models are shared, per-request state is not) and looping; the DSpark
drafter has a truly batched path instead (one backbone pass for the whole batch).
"""

from __future__ import annotations

import copy
import time
from typing import Sequence

from dspark.drafters.base import DraftBatch, DraftGate, DraftInput, Drafter

class LoopedDrafter:
    """Any batch-1 drafter, one shallow copy per slot, proposing request by request."""

    def __init__(self, drafter: Drafter, gamma: int | None = None) -> None:
        self.drafter = drafter
        self.name = drafter.name
        self.feature_layer_ids = tuple(drafter.feature_layer_ids)
        self.gamma = gamma if gamma is not None else drafter.gamma
        self.gives_confidences = getattr(drafter, "gives_confidences", False)
        self._slots: list[Drafter | None] = []

    def check_target(self, target) -> None:
        self.drafter.check_target(target)

    def allocate(self, num_slots: int, capacity: int) -> None:
        for drafter in self._slots:  # their requests are over (n-gram lookup stores their ids)
            if drafter is not None:
                drafter.reset()
        self._slots = [None] * num_slots

    def open(self, slot: int) -> None:
        if self._slots[slot] is not None:  # the slot's last request is over
            self._slots[slot].reset()
        # Drafters keep per-request state only in attributes that reset() rebinds, so a
        # shallow copy shares the weights and owns its state.
        drafter = copy.copy(self.drafter)
        drafter.reset()
        self._slots[slot] = drafter

    def propose_free(self, slots: Sequence[int], inputs: Sequence[DraftInput]) -> DraftBatch:
        """Nothing (a looped drafter may be a draft model; n-gram lookup never backs off)."""
        return DraftBatch.empty(len(inputs), inputs[0].tokens.device if inputs else "cpu")

    def propose_batch(
        self, slots: Sequence[int], inputs: Sequence[DraftInput], gate: DraftGate | None = None
    ) -> DraftBatch:
        """Whole blocks (the gate is not asked): all of drafting is fixed work."""
        t0 = time.perf_counter()
        blocks = [self._slots[s].propose(inp) for s, inp in zip(slots, inputs)]
        ran = any(b.gamma for b in blocks)
        return DraftBatch(blocks, fixed_s=time.perf_counter() - t0 if ran else None)
