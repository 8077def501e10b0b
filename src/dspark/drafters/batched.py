"""Drafting for many requests at once: the interface the batched engine talks to.

A :class:`BatchDrafter` keeps per-request state in *slots* (one per live request) and
proposes one :class:`~dspark.drafters.base.DraftBlock` per request in a single call.
:class:`LoopedDrafter` adapts any batch-1 :class:`~dspark.drafters.base.Drafter` by giving
every slot its own shallow copy (models are shared, per-request state is not) and looping;
the DSpark drafter has a truly batched path (one backbone pass for the whole batch).
"""

from __future__ import annotations

import copy
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from dspark.drafters.base import DraftBlock, DraftInput, Drafter, NoDrafter

DraftGate = Callable[[int, Sequence[int], Sequence[int], torch.Tensor], bool]
"""``gate(k, rows, gammas, confidences)``, asked before slot k+1 (1-based) is drafted:
``rows`` are the indices (into the call's inputs) of the requests being drafted, ``gammas``
their most tokens, and ``confidences`` # [len(rows), k+1] their raw c_1..c_{k+1}. False stops
drafting: every block keeps its first k tokens. A drafter without confidences ignores it."""

DEFAULT_GAMMA_CAP = 16
"""Tokens per round assumed for a drafter that does not say how many it proposes."""


@runtime_checkable
class BatchDrafter(Protocol):
    """What the batched engine needs from a drafter."""

    name: str
    feature_layer_ids: tuple[int, ...]
    gamma: int
    """Most tokens proposed per request and round; the engine sizes its caches with it."""

    def check_target(self, target) -> None:
        """Raise IncompatibleDrafterError when the drafter cannot serve ``target``."""

    def allocate(self, num_slots: int, capacity: int) -> None:
        """Prepare ``num_slots`` slots of up to ``capacity`` positions; drops all state."""

    def open(self, slot: int) -> None:
        """A new request takes ``slot``: forget what the slot held."""

    def propose_batch(
        self, slots: Sequence[int], inputs: Sequence[DraftInput], gate: DraftGate | None = None
    ) -> list[DraftBlock]:
        """One block per request; ``inputs[i]`` belongs to the request in ``slots[i]``. A
        drafter may ignore ``gate`` (and then drafts whole blocks)."""

    def accepted(self, slots: Sequence[int], num_accepted: Sequence[int]) -> None:
        """Told after verification how many tokens of each request's block survived."""


class LoopedDrafter:
    """Any batch-1 drafter, one shallow copy per slot, proposing request by request."""

    def __init__(self, drafter: Drafter, gamma: int | None = None) -> None:
        self.drafter = drafter
        self.name = drafter.name
        self.feature_layer_ids = tuple(drafter.feature_layer_ids)
        self.gamma = gamma if gamma is not None else _gamma_of(drafter)
        self._slots: list[Drafter | None] = []

    def check_target(self, target) -> None:
        self.drafter.check_target(target)

    def allocate(self, num_slots: int, capacity: int) -> None:
        self._slots = [None] * num_slots

    def open(self, slot: int) -> None:
        # Drafters keep per-request state only in attributes that reset() rebinds, so a
        # shallow copy shares the weights and owns its state.
        drafter = copy.copy(self.drafter)
        drafter.reset()
        self._slots[slot] = drafter

    def propose_batch(
        self, slots: Sequence[int], inputs: Sequence[DraftInput], gate: DraftGate | None = None
    ) -> list[DraftBlock]:
        return [self._slots[s].propose(inp) for s, inp in zip(slots, inputs)]

    def accepted(self, slots: Sequence[int], num_accepted: Sequence[int]) -> None:
        for s, n in zip(slots, num_accepted):
            self._slots[s].accepted(n)


def _gamma_of(drafter: Drafter) -> int:
    if isinstance(drafter, NoDrafter):
        return 0
    gamma = getattr(drafter, "gamma", None)
    if gamma is None:
        gamma = getattr(getattr(drafter, "config", None), "gamma", None)
    return int(gamma) if gamma is not None else DEFAULT_GAMMA_CAP


def as_batch_drafter(drafter) -> BatchDrafter:
    """The batched form of ``drafter``: itself if it already is one, DSpark's own batched path,
    else a LoopedDrafter."""
    from dspark.drafters.dspark.drafter import BatchedDSparkDrafter, DSparkDrafter

    if isinstance(drafter, BatchDrafter):
        return drafter
    if isinstance(drafter, DSparkDrafter):
        return BatchedDSparkDrafter(drafter)
    return LoopedDrafter(drafter)
