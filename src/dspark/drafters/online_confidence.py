"""Confidences learnt online from the committed stream, for drafters without a trained head.

A drafted slot k is labelled *survived* when the tokens the target committed at the block's
positions 1..k equal x_1..x_k. The committed tokens are the target's samples whatever the
engine verified, so every slot of every past block gets its label (up to its first miss),
verified or not: the labels are never censored by the scheduler's own cuts. Labels are counted
per cell (the slot and features of the block) under a Beta prior; c_k is the posterior mean.

For a point-mass draft (prompt lookup) and for greedy drafts the label is exactly the
acceptance event. For a draft sampled from q at T > 0 its mean is p(x_k), which is at most the
acceptance probability min(1, p/q) averaged over x ~ q, so the estimate is conservative there.
The estimate depends only on earlier rounds and on this block: for a deterministic draft
nothing in the block is random, and for a sampled one the schedule reads c_k before x_k is
verified, as a trained head's (Appendix A's condition).

:class:`MarginConfidence` gives any drafter whose blocks carry their top-2 logit margins (a
draft model, DFlash, EAGLE-3) confidences per (slot, margin bin).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from dspark.drafters.base import DraftBatch, DraftBlock, DraftGate, DraftInput

PENDING = 32
"""Most unlabelled blocks kept per request (older ones are dropped unlabelled)."""


class SurvivalCounts:
    """Decayed Beta counts of slot survival per cell, shared by every request of a drafter."""

    def __init__(self, prior_mean: float = 0.3, prior: float = 2.0, horizon: int = 2000) -> None:
        self.prior_mean, self.prior, self.horizon = prior_mean, prior, horizon
        self.counts: dict[Hashable, list[float]] = {}
        """cell -> [survived, labelled]."""

    def confidence(self, cell: Hashable) -> float:
        survived, labelled = self.counts.get(cell, (0.0, 0.0))
        return (survived + self.prior_mean * self.prior) / (labelled + self.prior)

    def record(self, cell: Hashable, survived: bool) -> None:
        count = self.counts.setdefault(cell, [0.0, 0.0])
        if count[1] >= self.horizon:  # forget slowly, so the estimate follows a drifting workload
            keep = 1.0 - 1.0 / self.horizon
            count[0] *= keep
            count[1] *= keep
        count[0] += float(survived)
        count[1] += 1.0


@dataclass
class Pending:
    """A drafted block waiting for the committed tokens at its positions."""

    start: int
    """Position of x_1 in the committed ids."""
    tokens: list[int]
    cells: list[Hashable]
    """The counting cell of each slot."""
    labelled: int = 0


@dataclass
class Labeller:
    """One request's blocks waiting for labels."""

    pending: list[Pending] = field(default_factory=list)

    def add(self, block: Pending) -> None:
        self.pending = [*self.pending[-(PENDING - 1):], block]

    def label(self, tokens: torch.Tensor, record: Callable[[int, Hashable, bool], None]) -> None:
        """Label every slot of a pending block whose position ``tokens`` # [L] (the committed
        ids) now holds, up to its first miss: ``record(k, cell, survived)`` with k 0-based."""
        length, still = tokens.shape[0], []
        for p in self.pending:
            end = min(length, p.start + len(p.tokens))
            if end <= p.start + p.labelled:
                still.append(p)
                continue
            committed = tokens[p.start + p.labelled : end].tolist()  # host sync: labels are host counts
            failed = False
            for x, y in zip(p.tokens[p.labelled:], committed):
                failed = x != y
                record(p.labelled, p.cells[p.labelled], not failed)
                p.labelled += 1
                if failed:
                    break
            if not failed and p.labelled < len(p.tokens):
                still.append(p)
        self.pending = still


class SlotScale:
    """Per slot k, observed over predicted conditional survival of a head's calibrated c_k on
    earlier blocks (labelled as above): the factor an offline calibration is off by on this
    workload. Gemma 3's DSpark drafter, calibrated on 20 prompts to a slot-1 mean of 0.15,
    survived 9 of the 70 slots the hybrid verified on the dev sets, and its blocks kept being
    preferred and verified. ``apply`` multiplies c_k by the factor (at most 1): the order of
    the candidates within a block is unchanged, and the factor reads only earlier blocks.
    """

    def __init__(self, prior: float = 10.0, horizon: int = 500) -> None:
        """``prior``: pseudo-labels at exactly the predicted rate (a factor of 1 at first)."""
        self.prior, self.horizon = prior, horizon
        self._sums: dict[int, list[float]] = {}
        """slot k -> [survived, predicted, labels], forgotten slowly past ``horizon`` labels."""

    def record(self, k: int, predicted: float, survived: bool) -> None:
        sums = self._sums.setdefault(k, [0.0, 0.0, 0.0])
        if sums[2] >= self.horizon:  # follow a drifting workload
            sums[:] = [v * (1.0 - 1.0 / self.horizon) for v in sums]
        sums[0] += float(survived)
        sums[1] += predicted
        sums[2] += 1.0

    def factor(self, k: int) -> float:
        survived, predicted, labels = self._sums.get(k, (0.0, 0.0, 0.0))
        rate = predicted / labels if labels else 0.5  # the prior's pseudo-labels survive at the predicted rate
        return (survived + self.prior * rate) / (predicted + self.prior * rate)

    def apply(self, confidences: torch.Tensor) -> torch.Tensor:
        """c # [..., W] -> c_k times slot k's factor, clamped to [0, 1]."""
        width = confidences.shape[-1]
        factors = torch.tensor([self.factor(k) for k in range(width)], dtype=confidences.dtype, device=confidences.device)
        return (confidences * factors).clamp(0.0, 1.0)


MARGIN_EDGES = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Bins of the top-2 logit margin: [0, 0.5), [0.5, 1), ..., [8, inf)."""


def margin_bin(margin: float) -> int:
    return sum(margin >= edge for edge in MARGIN_EDGES)


class MarginConfidence:
    """A batch drafter whose blocks carry margins, with confidences per (slot, margin bin)
    learnt from the committed stream (see the module docstring)."""

    gives_confidences = True

    def __init__(self, inner, counts: SurvivalCounts | None = None) -> None:
        self.inner = inner
        self.name, self.gamma = inner.name, inner.gamma
        self.feature_layer_ids = tuple(inner.feature_layer_ids)
        self.model = getattr(inner, "model", None)
        self.counts = counts if counts is not None else SurvivalCounts()
        self._labellers: dict[int, Labeller] = {}

    def check_target(self, target) -> None:
        self.inner.check_target(target)

    def allocate(self, num_slots: int, capacity: int) -> None:
        self.inner.allocate(num_slots, capacity)
        self._labellers = {}

    def open(self, slot: int) -> None:
        self.inner.open(slot)
        self._labellers[slot] = Labeller()

    def propose_free(self, slots: Sequence[int], inputs: Sequence[DraftInput]) -> DraftBatch:
        return self.inner.propose_free(slots, inputs)

    def propose_batch(self, slots: Sequence[int], inputs: Sequence[DraftInput], gate: DraftGate | None = None) -> DraftBatch:
        """The inner drafter's whole blocks (it has no confidences to gate on), with c_k."""
        batch = self.inner.propose_batch(slots, inputs)
        record = lambda k, cell, survived: self.counts.record(cell, survived)  # noqa: E731
        blocks = []
        for slot, inp, block in zip(slots, inputs, batch.blocks):
            labeller = self._labellers.setdefault(slot, Labeller())
            labeller.label(inp.tokens, record)
            if not block.gamma or block.margins is None:
                blocks.append(block)
                continue
            cells = [(k, margin_bin(m)) for k, m in enumerate(block.margins.tolist())]  # host sync: bins pick cells
            labeller.add(Pending(inp.tokens.shape[0], block.tokens.tolist(), cells))
            c = torch.tensor([self.counts.confidence(cell) for cell in cells], device=block.tokens.device)
            blocks.append(dataclasses.replace(block, confidences=c))
        return dataclasses.replace(batch, blocks=blocks)
