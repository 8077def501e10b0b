"""A batch-1 drafter over its own batched form: the DSpark, EAGLE-3 and hybrid drafters each
have one drafting path (their batched drafter); the batch-1 engine talks to one slot of it."""

from __future__ import annotations

from dspark.drafters.base import DraftBlock, DraftInput

INITIAL_CONTEXT = 512
"""Positions the one slot starts with; a batch-1 drafter's slot grows with its context."""


class OneSlot:
    """Mixin for a :class:`~dspark.drafters.base.Drafter` that has ``batched()``: ``reset``
    opens one slot of a fresh batched drafter, ``propose`` drafts through it."""

    _one = None

    def batched(self):
        raise NotImplementedError

    def reset(self) -> None:
        self._one = self.batched()
        self._one.allocate(1, INITIAL_CONTEXT)
        self._one.open(0)

    def propose(self, draft_input: DraftInput) -> DraftBlock:
        if self._one is None:
            self.reset()
        return self._one.propose_batch([0], [draft_input]).blocks[0]
