"""The batched speculative decoding loop: prefill -> draft -> schedule -> verify -> commit, for R
requests per step, each verifying its own ℓ_r.

Every live request owns a slot: its committed ids, its target K/V in one row of a
:class:`~dspark.target.slot_cache.SlotCache`, its sampling parameters, a torch.Generator seeded from
the request seed (drafting and verification share it) and its stop checks. Between steps the
batch-1 invariant of :mod:`dspark.engine.single` holds per request: the committed ids end with the
*anchor* and the slot holds K/V of exactly ``len(committed ids) - 1`` positions.

One step: the drafter proposes γ_r tokens per request in one batched call; the policy
(:mod:`dspark.scheduling`) picks ℓ_r <= γ_r from the calibrated confidences c_k (with a
confidence policy, drafting itself stops at the first slot no request will verify:
:func:`~dspark.scheduling.gate.slot_gate`); one target
forward runs [anchor, x_1..x_ℓ_r] for every request, right-padded to the longest row; each
request is verified with its own parameters and generator and commits accepted + recovered
or bonus tokens; a request whose own verification or commit raises (a broken model's NaN
logits) fails alone, and the others commit as if it were not there. Requests join (prefill
into a free slot) and leave (slot freed at once) between steps, so up to ``max_batch``
requests are always in flight; what lives across steps
(slots, waiting and running requests) is a :class:`~dspark.engine.session.BatchSession`, which
``generate`` drives over a fixed list and the server drives for as long as it runs.

Padding never changes a result. A row's real queries carry their own position ids and a mask
(:func:`~dspark.target.slot_cache.ragged_causal_mask`) that shows them only their own history and
their own earlier tokens of this step; padded queries are never read; the K/V they write lie
past the row's committed length, hidden by the mask and overwritten by the next step's
tokens before any query can see them. Rolling back rejected tokens is the same move: the
next write simply starts at the committed length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from dspark.drafters.base import BatchDrafter, DraftInput
from dspark.drafters.factory import as_batch_drafter
from dspark.engine.request import GenerationRequest, GenerationResult, RequestState, check_request
from dspark.engine.session import BatchSession, Live, VerifiedStep
from dspark.engine.stats import StepRecord
from dspark.sampling import check_logits, sample_from_logits
from dspark.scheduling.gate import slot_gate
from dspark.scheduling.policy import Policy, StepOutcome
from dspark.target.model import TargetModel
from dspark.target.ragged import verify_forward
from dspark.target.slot_cache import SlotCache
from dspark.timing import device_clock
from dspark.verify import verify

CHEAP_DRAFTING = 0.02
"""Drafting that took less than this share of its step does not back off, paid or not: what
backoff saves is drafting time, and prompt lookup's is nearly none. Not where the drafter named
free blocks it had to beat (``DraftBatch.free``): a small DSpark drafter beside lookup (Gemma
3's, about 2 % of a step) must still pay for itself."""
MAX_BACKOFF = 128
"""Most steps a lazily drafting engine skips the drafter after drafted steps that did not pay:
while drafting does not pay, looking again costs a drafter pass (and folding the context
since the last look) every this many steps; a drafter that starts to pay is noticed at most
this many steps late."""


@dataclass
class BatchStats:
    """Engine-wide counters of one :meth:`BatchEngine.generate` call."""

    steps: list[StepRecord] = field(default_factory=list)
    prefill_s: float = 0.0
    wall_s: float = 0.0
    new_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Aggregate throughput: new tokens of all requests / wall time (prefills included)."""
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def verify_length(self) -> float:
        """Mean ℓ_r per request and step."""
        rows = sum(s.requests for s in self.steps)
        return sum(s.budget - s.requests for s in self.steps) / rows if rows else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens committed per request and step (accepted + 1)."""
        rows = sum(s.requests for s in self.steps)
        return sum(s.committed for s in self.steps) / rows if rows else 0.0

    def to_dict(self) -> dict:
        return {
            "steps": len(self.steps),
            "new_tokens": self.new_tokens,
            "wall_s": self.wall_s,
            "prefill_s": self.prefill_s,
            "tokens_per_second": self.tokens_per_second,
            "verify_length": self.verify_length,
            "tau": self.tau,
            "mean_requests": sum(s.requests for s in self.steps) / len(self.steps) if self.steps else 0.0,
            "mean_budget": sum(s.budget for s in self.steps) / len(self.steps) if self.steps else 0.0,
            "draft_s": sum(s.draft_s for s in self.steps),
            "schedule_s": sum(s.schedule_s for s in self.steps),
            "verify_s": sum(s.verify_s for s in self.steps),
        }


@dataclass
class BatchResult:
    """Per-request results in the order the requests were given, and the engine's counters."""

    results: list[GenerationResult]
    stats: BatchStats


class BatchEngine:
    """Continuous-batching speculative decoding with a per-step verification policy."""

    def __init__(
        self,
        target: TargetModel,
        drafter,
        policy: Policy,
        max_batch: int = 16,
        lazy_drafting: bool = True,
        backoff: bool = True,
    ) -> None:
        """``lazy_drafting``: with a policy that reads confidences, draft a slot only while some
        request may still verify it (the schedule is the same either way). ``backoff`` (lazy
        drafting only): after k drafted steps in a row where drafting did not pay, skip the
        drafter for min(2^(k-1), MAX_BACKOFF) steps, which are plain decoding steps (or, for a
        hybrid, lookup-only steps). Drafting pays when the policy says so (DSpark: predicted Θ
        with drafting time beats that of the step the drafter's free blocks would make, a
        hybrid's lookup blocks, else a plain step's), else when a drafted token was verified. Both decisions read only the past and
        this step's confidences, never a drafted token's fate, so verification stays lossless."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.drafter: BatchDrafter = as_batch_drafter(drafter)
        self.drafter.check_target(target)
        target.check_layer_ids(self.drafter.feature_layer_ids)
        self.target, self.policy, self.max_batch = target, policy, max_batch
        self.lazy_drafting = lazy_drafting and policy.needs_confidences
        self.backoff = backoff and self.lazy_drafting
        self._skip, self._backoff = 0, 0  # steps left to skip the drafter; the current backoff
        self.clock = device_clock(target.device)
        """Seconds on the target device's clock: the step times the policy learns costs from."""
        self.max_draft = min(self.drafter.gamma, policy.max_draft if policy.max_draft is not None else self.drafter.gamma)
        policy.check_shape(max_batch, 1 + self.max_draft)  # fail now, not in the middle of a run

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_result: Callable[[int, GenerationResult], None] | None = None,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> BatchResult:
        """Serve every request, at most ``max_batch`` at a time, in arrival order;
        ``on_result(i, result)`` is told the moment request i finishes and ``on_tokens(i, ids)``
        each step's newly visible ids of request i (for streaming)."""
        if not requests:
            return BatchResult([], BatchStats())
        for request in requests:
            check_request(self.target, request)
        capacity = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        session = self.session(min(self.max_batch, len(requests)), capacity)
        for i, request in enumerate(requests):
            session.add(i, request)
        results: list[GenerationResult | None] = [None] * len(requests)
        stats = BatchStats()
        start = time.perf_counter()
        while session.busy:
            events = session.step()
            for error in events.failed.values():
                raise error
            stats.prefill_s += events.prefill_s
            if events.record is not None:
                stats.steps.append(events.record)
            if on_tokens is not None:
                for i, ids in events.tokens.items():
                    if ids:
                        on_tokens(i, ids)
            for i, result in events.finished.items():
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
        stats.wall_s = time.perf_counter() - start
        stats.new_tokens = sum(len(r.token_ids) for r in results)
        return BatchResult(results, stats)

    def session(self, num_slots: int, capacity: int) -> BatchSession:
        """An open batch of ``num_slots`` slots for requests of up to ``capacity`` tokens
        (prompt + new); requests join and leave it at any step (the server's loop)."""
        return BatchSession(self, num_slots, capacity)

    def allocate(self, num_slots: int, capacity: int) -> SlotCache:
        """Fresh target and drafter buffers of ``num_slots`` × ``capacity`` positions; a new
        session drafts at once (no backoff carried over)."""
        target = self.target
        dtype = next(target.model.parameters()).dtype
        cache = SlotCache.for_hf_config(target.model.config, num_slots, capacity, dtype, target.device)
        self.drafter.allocate(num_slots, capacity)
        self._skip, self._backoff = 0, 0
        return cache

    def prefill_slot(self, handle: Hashable, request: GenerationRequest, slot: int, cache: SlotCache) -> Live:
        """Run the prompt into ``slot`` and sample the first anchor."""
        state = RequestState.open(self.target, request)
        out = verify_forward(self.target, cache, [slot], [0], state.prompt.unsqueeze(0), self.drafter.feature_layer_ids,
                             logits_to_keep=1)  # the prompt's last position only: it samples the first token
        check_logits(out.logits[0, -1], "the target's logits")  # host sync, once per request
        first, _ = sample_from_logits(state.penalise(out.logits[0, -1:])[0], request.params, state.generator)
        self.drafter.open(slot)
        live = Live(handle, slot, state, unseen=[out.features[0]] if out.features is not None else [])
        state.commit([int(first)], out.logits[0, -1:])  # host sync: the first token must be checked for EOS/stop
        state.stats.prefill_s = time.perf_counter() - state.start
        return live

    def verify_step(self, live: list[Live], cache: SlotCache) -> VerifiedStep:
        """One step over every live request: draft -> schedule -> verify -> commit. A request
        whose own verification or commit raises is reported in ``failed`` (it committed
        nothing of this step); the others commit as if it were not there."""
        target, device, policy = self.target, self.target.device, self.policy
        t0 = self.clock()
        slots = [r.slot for r in live]
        skipped, gated = bool(self._skip), self.lazy_drafting and not self._skip
        inputs = [
            DraftInput(r.state.buf[: r.state.length], None if self._skip else r.new_features(), r.state.request.params,
                       r.state.generator, max_tokens=min(self.max_draft, r.state.max_draft))
            for r in live
        ]
        if self._skip:  # backing off: only free drafting (lookup); the drafter folds these features later
            self._skip -= 1
            batch = self.drafter.propose_free(slots, inputs)
        else:
            gate = slot_gate(policy, len(live), device) if gated else None
            batch = self.drafter.propose_batch(slots, inputs, gate)
            for r in live:
                r.unseen.clear()  # folded into the drafter's context
        blocks = batch.blocks
        t1 = self.clock()
        drafted = [b.gamma for b in blocks]
        # A stopped gate already scheduled the step: drafting stopped where verification does.
        schedule = batch.stop if batch.stop is not None else policy.schedule(drafted, self._confidences(blocks, drafted))
        lengths = schedule.lengths
        backing_off = gated and self.backoff and (any(drafted) or batch.stop is not None)  # confidences were seen
        paid = backing_off and policy.drafting_pays(schedule, len(live), self._free_schedule(batch.free))
        t2 = self.clock()

        feed = torch.zeros(len(live), 1 + max(lengths), dtype=torch.long, device=device)  # [R, T]
        for i, (r, block, ell) in enumerate(zip(live, blocks, lengths)):
            feed[i, 0] = r.state.buf[r.state.length - 1]
            feed[i, 1 : 1 + ell] = block.tokens[:ell]
        out = verify_forward(target, cache, slots, [r.state.length - 1 for r in live], feed, self.drafter.feature_layer_ids)
        forward_s = self.clock() - t2
        accepted: dict[int, int] = {}  # row -> n, for the rows that committed
        failed: dict[Hashable, Exception] = {}
        committed = 0
        # Per request: its own parameters and generator; one host sync each (first_rejection).
        for i, (r, block, ell) in enumerate(zip(live, blocks, lengths)):
            q = block.q[:ell] if block.q is not None else None
            try:
                logits = r.state.penalise(out.logits[i, : ell + 1], block.tokens[:ell])
                result = verify(block.tokens[:ell], q, logits, r.state.request.params, r.state.generator)
                r.state.commit(result.tokens, out.logits[i, : len(result.tokens)])
            except Exception as exc:  # this request only: no other row reads its logits or its state
                failed[r.handle] = exc
                continue
            n = result.num_accepted
            # The slot keeps the anchor and the n accepted tokens: the next write starts at
            # length - 1 after this commit of n + 1 tokens, past exactly those positions.
            if out.features is not None:
                r.unseen.append(out.features[i, : n + 1].clone())  # not a view of the whole step
            accepted[i] = n
            committed += len(result.tokens)
        t3 = self.clock()
        if backing_off:  # drafting that costs next to nothing (lookup) is never worth skipping,
            # unless the drafter named a free alternative it had to beat (a hybrid's lookup blocks)
            self._back_off(paid or (batch.free is None and t1 - t0 < CHEAP_DRAFTING * (t3 - t0)))
        slots_drafted = max(drafted, default=0)
        per_slot = batch.slots_s / slots_drafted if batch.slots_s is not None and slots_drafted else None
        overhead = (t3 - t1) - forward_s  # scheduling, the rule, commits: not in a cost table
        fixed = None if skipped else batch.fixed_s  # backoff's free drafting is not the drafter's cost
        policy.observe(StepOutcome(len(live), schedule, sum(accepted.values()), fixed, per_slot, overhead,
                                   context=max(r.state.length for r in live)))
        for i, n in accepted.items():
            block, ell = blocks[i], lengths[i]
            conf = block.confidences[:ell] if block.confidences is not None else None
            live[i].state.stats.record_round(ell, n, t1 - t0, t3 - t2, conf, source=block.source)  # step times, shared
        record = StepRecord(
            requests=len(live), budget=len(live) + sum(lengths), drafted=sum(drafted), committed=committed,
            expected_tokens=schedule.expected_tokens, draft_s=t1 - t0, schedule_s=t2 - t1, verify_s=t3 - t2,
        )
        return VerifiedStep(record, failed)

    def _free_schedule(self, free):
        """The policy's schedule of the blocks the drafter would have proposed at no cost (None
        when it names none): what drafting must beat to pay."""
        if free is None:
            return None
        drafted = [b.gamma for b in free]
        return self.policy.schedule(drafted, self._confidences(free, drafted)) if any(drafted) else None

    def _back_off(self, paid: bool) -> None:
        """After a drafted step: reset the backoff if drafting paid, else double it."""
        self._backoff = 0 if paid else min(MAX_BACKOFF, max(1, 2 * self._backoff))
        self._skip = self._backoff

    def _confidences(self, blocks, drafted: list[int]) -> torch.Tensor | None:
        """Raw c_k # [R, max γ_r] (the policy calibrates), or None when the policy needs none or
        a block lacks them."""
        if not self.policy.needs_confidences:
            return None
        width = max(drafted)
        if any(g and b.confidences is None for b, g in zip(blocks, drafted)):
            return None
        device = self.target.device
        # 0.5 (logit 0) in the padding keeps any calibration map finite; the policy ignores it.
        conf = torch.full((len(blocks), width), 0.5, device=device)
        for i, (b, g) in enumerate(zip(blocks, drafted)):
            if g:
                conf[i, :g] = b.confidences.to(conf.dtype)
        return conf

