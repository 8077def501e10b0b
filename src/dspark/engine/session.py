"""An open batch: requests join and leave the batched engine between any two steps.

:class:`~dspark.engine.batched.BatchEngine` owns the loop body (a request's prefill into a
slot, and one step prefill -> draft -> schedule -> verify -> commit over every live
request). :class:`BatchSession` owns what lives across steps: the slot cache, the free
slots, the requests waiting and the ones running. ``BatchEngine.generate`` drives a session
over a fixed list of requests; the server (:mod:`dspark.serving.loop`) drives one for as
long as it runs, adding requests as they arrive and cancelling those whose client left.
There is one loop either way, so a served request is committed exactly as in ``generate``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Protocol

import torch

from dspark.engine.request import GenerationRequest, GenerationResult, RequestState, TokenLogprob, check_request
from dspark.engine.stats import RoundRecord, StepRecord
from dspark.target.model import TargetModel
from dspark.target.slot_cache import SlotCache


@dataclass
class Live:
    """A request in flight in one slot of the batch."""

    handle: Hashable
    """What its caller named it by (:meth:`BatchEngine.generate`: its position in the requests)."""
    slot: int
    state: RequestState
    shown: int = 0
    """Committed ids already reported in :attr:`StepEvents.tokens`."""
    unseen: list[torch.Tensor] = field(default_factory=list)
    """Target features # [n_i, m*d] of committed tokens the drafter has not seen yet, in order
    (a list: steps that skip the drafter add to it without copying what it holds)."""

    def new_features(self) -> torch.Tensor | None:
        """The unseen features as one tensor # [n, m*d], or None without any."""
        if not self.unseen:
            return None
        return self.unseen[0] if len(self.unseen) == 1 else torch.cat(self.unseen)


@dataclass
class StepEvents:
    """What one :meth:`BatchSession.step` did, per request handle."""

    tokens: dict[Hashable, list[int]] = field(default_factory=dict)
    """Ids committed and visible (up to a stop cut) since the last step, the prefill's first
    token included."""
    logprobs: dict[Hashable, list[TokenLogprob]] = field(default_factory=dict)
    """The log-probabilities of :attr:`tokens`, for requests that ask for them."""
    finished: dict[Hashable, GenerationResult] = field(default_factory=dict)
    """Requests that ended in this step; their slots are free already."""
    failed: dict[Hashable, Exception] = field(default_factory=dict)
    """Requests whose prefill raised, whose own verification or commit raised (a broken
    model's NaN logits), or every request of a step whose shared part (drafting, the target
    forward) raised; they hold no slot any more."""
    admitted: list[Hashable] = field(default_factory=list)
    """Requests that joined a slot in this step."""
    record: StepRecord | None = None
    """The verification step, when any request was live after the admissions."""
    rounds: dict[Hashable, RoundRecord] = field(default_factory=dict)
    """Each verified request's round of this step."""
    prefill_s: float = 0.0


@dataclass
class VerifiedStep:
    """What one verification step did."""

    record: StepRecord
    """The step's counters (its target forward covered every live request)."""
    failed: dict[Hashable, Exception] = field(default_factory=dict)
    """Requests whose own verification or commit raised: they committed nothing of this step
    and must leave the batch; every other request committed."""


class SlotEngine(Protocol):
    """What a session needs from the batched engine: its loop body."""

    target: TargetModel
    max_batch: int
    max_draft: int

    def allocate(self, num_slots: int, capacity: int) -> SlotCache:
        """Target and drafter buffers for ``num_slots`` slots of ``capacity`` positions."""

    def prefill_slot(self, handle: Hashable, request: GenerationRequest, slot: int, cache: SlotCache) -> Live:
        """Run a request's prompt into ``slot`` and commit its first token."""

    def verify_step(self, live: list[Live], cache: SlotCache) -> VerifiedStep:
        """One step over every live request; a request that fails on its own is reported, not raised."""


class BatchSession:
    """An open batch over one engine (see the module docstring). Each :meth:`step` admits
    waiting requests into free slots (one prefill each), runs one verification step over
    every live request and frees the slots of those that finished.

    Not thread safe: one thread owns a session and its engine.
    """

    def __init__(self, engine: SlotEngine, num_slots: int, capacity: int) -> None:
        """``capacity``: most prompt + new tokens of one request."""
        if not 1 <= num_slots <= engine.max_batch:
            raise ValueError(f"num_slots must lie in 1..{engine.max_batch} (max_batch), got {num_slots}")
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2 tokens, got {capacity}")
        self.engine, self.num_slots, self.capacity = engine, num_slots, capacity
        # Rows padded to the longest block write up to max_draft positions past their own end.
        self.cache = engine.allocate(num_slots, capacity + engine.max_draft + 1)
        self._pending: deque[tuple[Hashable, GenerationRequest]] = deque()
        self._free = list(range(num_slots - 1, -1, -1))  # slot 0 is taken first
        self._live: list[Live] = []

    @property
    def busy(self) -> bool:
        """Whether any request waits or runs."""
        return bool(self._pending or self._live)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._live)

    def handles(self) -> list[Hashable]:
        """Every request waiting or running."""
        return [h for h, _ in self._pending] + [r.handle for r in self._live]

    def add(self, handle: Hashable, request: GenerationRequest) -> None:
        """Queue ``request`` (ValueError if it cannot run); it joins the next step with a free slot."""
        check_request(self.engine.target, request)
        need = len(request.prompt_ids) + request.max_new_tokens
        if need > self.capacity:
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                f"exceeds the {self.capacity} tokens a slot holds"
            )
        self._pending.append((handle, request))

    def cancel(self, handle: Hashable) -> bool:
        """Drop a waiting or running request and free its slot at once; False if unknown. The
        slot's stale K/V need no clearing: the next prefill writes from position 0 and the
        mask hides everything past a row's own length."""
        for i, (h, _) in enumerate(self._pending):
            if h == handle:
                del self._pending[i]
                return True
        for i, r in enumerate(self._live):
            if r.handle == handle:
                self._free.append(self._live.pop(i).slot)
                return True
        return False

    def step(self) -> StepEvents:
        """Admit, verify once, retire."""
        events = StepEvents()
        while self._pending and self._free:  # requests join between steps
            handle, request = self._pending.popleft()
            slot = self._free.pop()
            try:
                live = self.engine.prefill_slot(handle, request, slot, self.cache)
            except Exception as exc:  # this request only: its slot goes back, the others go on
                self._free.append(slot)
                events.failed[handle] = exc
                continue
            self._live.append(live)
            events.admitted.append(handle)
            events.prefill_s += live.state.stats.prefill_s
        self._retire(events)
        if not self._live:
            return events
        try:
            step = self.engine.verify_step(self._live, self.cache)
        except Exception as exc:  # a shared part raised: every request's state is unknown
            failed = {r.handle: exc for r in self._live}
        else:
            events.record, failed = step.record, step.failed
        for r in self._live:  # who failed leaves; the slot's stale K/V need no clearing (see cancel)
            if r.handle in failed:
                events.failed[r.handle] = failed[r.handle]
                self._free.append(r.slot)
        self._live = [r for r in self._live if r.handle not in failed]
        events.rounds = {r.handle: r.state.stats.round_records[-1] for r in self._live}
        self._retire(events)
        return events

    def _retire(self, events: StepEvents) -> None:
        """Report new visible ids; move finished requests to ``events`` and free their slots."""
        still = []
        for r in self._live:
            visible = r.state.committed[: r.state.stops.cut]
            if len(visible) > r.shown:
                events.tokens.setdefault(r.handle, []).extend(visible[r.shown :])
                if r.state.request.logprobs is not None:
                    events.logprobs.setdefault(r.handle, []).extend(r.state.logprobs[r.shown : len(visible)])
                r.shown = len(visible)
            if r.state.finish is None:
                still.append(r)
            else:
                events.finished[r.handle] = r.state.result()
                self._free.append(r.slot)
        self._live = still
