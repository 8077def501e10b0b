"""Hybrid drafting: prompt lookup where it is confident, the DSpark drafter elsewhere, chosen
per request and per round, under one scheduler.

The two fail in different places: DSpark's slot 1 survives about half the time and its later
slots rarely, while a lookup that matches quoted or repeated text keeps surviving for many
slots. Each round, every request first gets a lookup block (free: no forward) with its online
confidences (:mod:`dspark.drafters.ngram`). Its expected accepted tokens Σ_j ∏_{i≤j} c_i are
compared with what the DSpark drafter's blocks were expected to give this request on earlier
rounds (calibrated, as the scheduler sees them), per unit of time: DSpark's blocks cost its
drafting, measured as the hybrid runs. Where lookup is at least as good, DSpark does not draft
for that request this round. DSpark drafts the others in one batched call, and
folds every request's new context there, so it can take a request back at any round; a round
in which every request takes lookup's block does not call DSpark at all (its context fold
costs a forward), and DSpark folds those features when it next drafts.

Where DSpark drafted a greedy request that also had a lookup block, the block expected to give
more accepted tokens is proposed: both are then deterministic functions of the committed
tokens (DSpark's greedy draft is its argmax), so reading DSpark's drafted tokens, through its
c_k, to choose cannot bias anything; a sampled request keeps DSpark's block, whose x ~ q must
not be chosen on what it turned out to be.

Each block keeps its own q (a point mass for lookup) and calibrated c_k, so verification and
Algorithm 1 are unchanged. Losslessness: the choice reads only the past and the lookup block,
which is a function of the committed tokens, never a sampled draft token; each block is then
verified as its drafter's own, and the schedule stays non-anticipating (DSpark's rows through
the same gate as alone, lookup's rows carry no randomness at all).

Calibration: the policy of an engine over this drafter gets no ``calibrate`` of its own; the
drafter applies DSpark's STS to DSpark's rows (lookup's are calibrated as learnt), and for
greedy requests then scales each slot's c_k by how DSpark's earlier greedy blocks survived
against that prediction (:class:`~dspark.drafters.online_confidence.SlotScale`; labels from
the committed stream, every drafted block, proposed or not): a drafter whose offline
calibration is too hopeful on this workload is then scheduled, preferred and backed off from
on what it delivers. Greedy only: there a match with the committed token is exactly the
acceptance event, while at T > 0 it would understate a sampled draft's acceptance.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch

from dspark.drafters.base import DraftBatch, DraftBlock, DraftGate, DraftInput
from dspark.drafters.looped import LoopedDrafter
from dspark.drafters.one_slot import OneSlot
from dspark.drafters.ngram import NgramDrafter
from dspark.drafters.online_confidence import Labeller, Pending, SlotScale

LOOKUP, MODEL = "ngram", "dspark"
"""The sources a hybrid's blocks name (:attr:`~dspark.drafters.base.DraftBlock.source`)."""
EXPECT_DECAY = 0.7
"""Weight of the past in a request's expected DSpark tokens per round."""


def expected_accepted(confidences: torch.Tensor | None) -> float:
    """Σ_j a_j = Σ_j ∏_{i≤j} c_i: expected accepted tokens if the whole block is verified."""
    if confidences is None or not confidences.numel():
        return 0.0
    return float(confidences.float().clamp(0, 1).cumprod(0).sum())  # host sync: one per block


class HybridDrafter(OneSlot):
    """DSpark + prompt lookup as a batch-1 :class:`~dspark.drafters.base.Drafter`;
    :meth:`batched` gives the batched engine's form."""

    gives_confidences = True

    def __init__(self, model_drafter, lookup: NgramDrafter | None = None, calibrate=None, price_drafting: bool = True) -> None:
        """``model_drafter``: a DSparkDrafter with a confidence head; ``calibrate``: its STS;
        ``price_drafting``: weigh DSpark's blocks against lookup's per unit of time (False: per
        round, as if drafting were free; tests of other choices on tiny models use it)."""
        self.model_drafter, self.calibrate, self.price_drafting = model_drafter, calibrate, price_drafting
        self.lookup = lookup if lookup is not None else NgramDrafter()
        self.name = f"{model_drafter.name}+{self.lookup.name}"
        self.feature_layer_ids = tuple(model_drafter.feature_layer_ids)
        self.gamma = max(model_drafter.gamma, self.lookup.gamma)
        self.model = model_drafter.model
        self._one: BatchedHybridDrafter | None = None

    def check_target(self, target) -> None:
        self.model_drafter.check_target(target)

    def batched(self) -> "BatchedHybridDrafter":
        return BatchedHybridDrafter(self.model_drafter.batched(), LoopedDrafter(self.lookup), self.calibrate, self.name,
                                    self.price_drafting)


class BatchedHybridDrafter:
    """The hybrid as a :class:`~dspark.drafters.base.BatchDrafter`."""

    gives_confidences = True

    def __init__(self, model_drafter, lookup: LoopedDrafter, calibrate, name: str, price_drafting: bool = True) -> None:
        self.model_drafter, self.lookup, self.calibrate, self.name = model_drafter, lookup, calibrate, name
        self.price_drafting = price_drafting
        self.model = model_drafter.model
        self.feature_layer_ids = tuple(model_drafter.feature_layer_ids)
        self.gamma = max(model_drafter.gamma, lookup.gamma)
        self._expect: list[float | None] = []
        """Per slot: decayed mean of Σ a_j over DSpark's earlier blocks for its request."""
        self._expect_all: float | None = None
        """The same over every request: a new request's prior."""
        self.rounds = {"lookup": 0, "model": 0}
        """Blocks drafted by each side (a report, read by no decision)."""
        self.scale = SlotScale()
        """DSpark's calibrated c_k against its greedy blocks' survival (shared by every request)."""
        self._labellers: list[Labeller] = []
        self._step_s: float | None = None
        """Decayed mean seconds of a step without DSpark's drafting (between calls here)."""
        self._model_s: float | None = None
        """Decayed mean seconds of DSpark's batched call where it drafted."""
        self._last: tuple[float, float] | None = None
        """(start of the previous call, DSpark's seconds in it)."""
        self._unfolded: list[list[torch.Tensor]] = []
        """Per slot: target features DSpark has not folded yet, oldest first (rounds where
        every request took lookup's block skip DSpark altogether)."""

    def check_target(self, target) -> None:
        self.model_drafter.check_target(target)

    def allocate(self, num_slots: int, capacity: int) -> None:
        self.model_drafter.allocate(num_slots, capacity)
        self.lookup.allocate(num_slots, capacity)
        self._expect = [None] * num_slots
        self._labellers = [Labeller() for _ in range(num_slots)]
        self._unfolded = [[] for _ in range(num_slots)]

    def open(self, slot: int) -> None:
        self.model_drafter.open(slot)
        self.lookup.open(slot)
        self._expect[slot] = None
        self._labellers[slot] = Labeller()
        self._unfolded[slot] = []

    def propose_batch(self, slots: Sequence[int], inputs: Sequence[DraftInput], gate: DraftGate | None = None) -> DraftBatch:
        t0 = time.perf_counter()
        self._tick(t0)
        for s, inp in zip(slots, inputs):
            self._labellers[s].label(inp.tokens, lambda k, predicted, survived: self.scale.record(k, predicted, survived))
        greedy = [inp.params.greedy for inp in inputs]
        looked = self.lookup.propose_batch(slots, inputs).blocks
        use_lookup = [self._prefer_lookup(s, b) for s, b in zip(slots, looked)]
        if all(use_lookup):  # DSpark drafts for nobody: it folds these features when it next drafts
            for s, inp in zip(slots, inputs):
                if inp.new_features is not None and inp.new_features.shape[0]:
                    self._unfolded[s].append(inp.new_features)
            return self._lookup_only(looked, t0)
        # DSpark sees every request (it folds their context) but drafts only the others.
        model_inputs = [dataclasses.replace(inp, new_features=self._features(s, inp), max_tokens=0 if use else inp.max_tokens)
                        for s, inp, use in zip(slots, inputs, use_lookup)]
        lookup_rows = [i for i, use in enumerate(use_lookup) if use]

        def model_gate(k: int, rows: Sequence[int], gammas: Sequence[int], confidences: torch.Tensor):
            c = self._calibrated(confidences, [greedy[r] for r in rows])
            extra = torch.full((len(lookup_rows), k + 1), 0.5, dtype=c.dtype, device=c.device)
            for j, i in enumerate(lookup_rows):
                known = looked[i].confidences[: k + 1]
                extra[j, : known.shape[0]] = known.to(c.dtype)
            return gate(k, [*rows, *lookup_rows], [*gammas, *(looked[i].gamma for i in lookup_rows)], torch.cat([c, extra]))

        lookup_s = time.perf_counter() - t0
        batch = self.model_drafter.propose_batch(slots, model_inputs, model_gate if gate is not None else None)
        if not all(use_lookup):
            model_s = time.perf_counter() - t0 - lookup_s
            self._model_s = model_s if self._model_s is None else EXPECT_DECAY * self._model_s + (1 - EXPECT_DECAY) * model_s
            self._last = (t0, model_s)
        blocks, stop = [], batch.stop
        for i, (s, use) in enumerate(zip(slots, use_lookup)):
            block = batch.blocks[i]
            if block.gamma and block.confidences is not None:
                if greedy[i]:  # labelled whether proposed or not: the scale is not censored by the choice
                    sts = self.calibrate(block.confidences) if self.calibrate is not None else block.confidences
                    start = inputs[i].tokens.shape[0]
                    self._labellers[s].add(Pending(start, block.tokens.tolist(), sts.tolist()))  # host sync: labels are host values
                block = dataclasses.replace(block, confidences=self._calibrated(block.confidences.unsqueeze(0), [greedy[i]])[0])
            if block.gamma and not use:
                expected = expected_accepted(block.confidences)
                self._observe(s, expected)
                if inputs[i].params.greedy and expected_accepted(looked[i].confidences) > expected:
                    use, stop = True, None  # the gate's schedule was for DSpark's block: schedule again
            if use:
                blocks.append(dataclasses.replace(looked[i], source=LOOKUP))
                self.rounds["lookup"] += 1
            else:
                blocks.append(dataclasses.replace(block, source=MODEL))
                self.rounds["model"] += bool(block.gamma)
        fixed = batch.fixed_s + lookup_s if batch.fixed_s is not None else (lookup_s if any(use_lookup) else None)
        # Where DSpark ran (even if its gate kept every slot), the engine asks whether that beat
        # lookup's blocks alone.
        ran = batch.fixed_s is not None
        free = [dataclasses.replace(b, source=LOOKUP) if b.gamma else b for b in looked] if ran else None
        return DraftBatch(blocks, stop, fixed, batch.slots_s, free=free)

    def propose_free(self, slots: Sequence[int], inputs: Sequence[DraftInput]) -> DraftBatch:
        """Lookup's blocks alone, for the steps the engine's backoff keeps DSpark out of: the
        lookup costs no forward, and the scheduler trims its blocks like any other."""
        t0 = time.perf_counter()
        self._tick(t0)
        return self._lookup_only(self.lookup.propose_batch(slots, inputs).blocks, t0)

    def _lookup_only(self, looked: Sequence[DraftBlock], t0: float) -> DraftBatch:
        """A step of lookup's blocks alone, drafted since ``t0``."""
        blocks = [dataclasses.replace(b, source=LOOKUP) if b.gamma else b for b in looked]
        self.rounds["lookup"] += sum(1 for b in blocks if b.gamma)
        return DraftBatch(blocks, fixed_s=time.perf_counter() - t0 if any(b.gamma for b in blocks) else None)

    def _features(self, slot: int, draft_input: DraftInput) -> torch.Tensor | None:
        """The features DSpark has not seen for ``slot``: the held-back ones, then this round's."""
        held, self._unfolded[slot] = self._unfolded[slot], []
        if not held:
            return draft_input.new_features
        new = draft_input.new_features
        return torch.cat([*held, *([new] if new is not None and new.shape[0] else [])])

    def _calibrated(self, confidences: torch.Tensor, greedy: Sequence[bool]) -> torch.Tensor:
        """DSpark's raw c # [R, W] -> STS-calibrated, and scaled by :attr:`scale` in greedy rows."""
        c = self.calibrate(confidences) if self.calibrate is not None else confidences
        if not any(greedy):
            return c
        rows = torch.tensor(list(greedy), device=c.device).view(-1, 1)
        return torch.where(rows, self.scale.apply(c), c)

    def _tick(self, now: float) -> None:
        """A call starts: the time since the previous one, less DSpark's part of it, is a step
        without DSpark's drafting (gaps of over 5x the mean, idle time between requests, are not)."""
        if self._last is not None:
            step = now - self._last[0] - self._last[1]
            if self._step_s is None:
                self._step_s = step
            elif 0 < step < 5 * self._step_s:
                self._step_s = EXPECT_DECAY * self._step_s + (1 - EXPECT_DECAY) * step
        self._last = (now, 0.0)

    def drafting_cost(self) -> float:
        """κ = 1 + DSpark's drafting seconds / a step's without them, as measured so far (1
        before both are): what a round costs with DSpark's block against lookup's."""
        if not self.price_drafting or not self._model_s or not self._step_s:
            return 1.0
        return 1.0 + self._model_s / self._step_s

    def _prefer_lookup(self, slot: int, block: DraftBlock) -> bool:
        """Whether this request's lookup block is expected to commit, per unit of time, at
        least what DSpark's blocks gave it (any request's, before its own; with no history,
        DSpark drafts): (1 + Σa_lookup)·κ >= 1 + Σa_DSpark, with κ = :meth:`drafting_cost`."""
        if not block.gamma:
            return False
        expect = self._expect[slot] if self._expect[slot] is not None else self._expect_all
        return expect is not None and (1.0 + expected_accepted(block.confidences)) * self.drafting_cost() >= 1.0 + expect

    def _observe(self, slot: int, expected: float) -> None:
        def mix(old: float | None) -> float:
            return expected if old is None else EXPECT_DECAY * old + (1 - EXPECT_DECAY) * expected

        self._expect[slot] = mix(self._expect[slot])
        self._expect_all = mix(self._expect_all)
