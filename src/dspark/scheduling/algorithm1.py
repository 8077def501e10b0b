"""DSpark's hardware-aware prefix scheduler (Algorithm 1), without host syncs.

Glossary as in :mod:`dspark.scheduling.policy`: a_{r,j} = ∏_{i≤j} c_{r,i} is the prefix
survival of j drafted tokens of request r, τ* the tokens a step is expected to commit and
Θ = τ*·SPS the expected token throughput, SPS coming from a
:class:`~dspark.scheduling.cost.CostModel`.

Candidates are admitted in descending a, and (r, k+1) can never precede (r, k), so the
admission of (r, k) is settled before any quantity that depends on x_{r,k} is looked at: the
early stop keeps the schedule non-anticipating (Appendix A), hence verification lossless.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dspark.errors import DsparkError
from dspark.scheduling.cost import CostModel
from dspark.scheduling.policy import Calibrate, Schedule, StepOutcome, check_inputs

CONTEXT_STEP = 32
"""Granularity (positions) at which the scheduler moves along the cost table's context axis."""


class DSparkScheduler:
    """The hardware-aware prefix scheduler (Algorithm 1) over a profiled cost table.

    Candidates (r, j) are taken in descending a_{r,j}, ties broken by position j (then by
    request), so (r, j) always precedes (r, j+1). Starting from B = R and τ* = R, each one is
    admitted while Θ = τ*·SPS(B) strictly improves; the first non-improvement stops the
    search, which is what keeps the scheduler non-anticipating (Appendix A).

    On a padded cost (``cost.padded``, the measured table of this engine) the candidates are
    whole *levels*: admitting (r, j) pays for width j + 1 in every row, after which every
    row's slots up to j cost nothing more, so level j = {(r, j) : all r} is admitted or not as
    one. Levels come in the order of their total survival Σ_r a_{r,j}, which is the order of
    j, and the search again stops at the first level that does not improve Θ. The decision
    ℓ_r ≥ j reads a_{·,≤j} only, never a_{r,j+1}: still non-anticipating, and at R = 1 it is
    Algorithm 1 exactly.
    """

    name = "dspark"
    needs_confidences = True
    max_draft = None

    def __init__(
        self, cost: CostModel, decay: float = 0.8, feedback: bool = True, calibrate: Calibrate | None = None
    ) -> None:
        """``calibrate`` maps the drafter's raw c_k to calibrated ones (STS; None: as raw)."""
        if cost is None:
            raise DsparkError(
                "the dspark policy needs a cost table SPS(R, W); measure one with `dspark profile`"
            )
        self.cost, self.decay, self.feedback, self.calibrate = cost, decay, feedback, calibrate
        self._fixed: dict[int, float] = {}
        """Seconds of drafting per step before any slot is drafted (context fold, backbone),
        an exponential average per batch size R over earlier steps."""
        self._per_slot: dict[int, float] = {}
        self._overhead: dict[int, float] = {}
        """Seconds per step outside drafting and the forward, likewise: paid by plain steps too."""
        """Seconds per drafted slot (LM head, transition bias, sampling), likewise."""
        self._accepted, self._predicted = 0.0, 0.0
        """Decayed sums over earlier steps of drafted tokens accepted and of Σ a predicted."""
        self._context: int | None = None
        """Committed positions of the longest request of the step before, rounded up to
        ``CONTEXT_STEP``: where the cost table is read (a step adds at most 1 + γ positions)."""
        self._cost_now = cost.at(None)

    def _average(self, table: dict[int, float], key: int, value: float) -> None:
        old = table.get(key)
        table[key] = value if old is None else self.decay * old + (1 - self.decay) * value

    def observe(self, outcome: StepOutcome) -> None:
        """Learn from a finished step: its accepted tokens against the prediction, and what
        it cost beyond the forward (drafting, when the drafter ran, and the engine's rest)."""
        self.observe_outcome(outcome.schedule, outcome.requests, outcome.accepted)
        self.observe_context(outcome.context)
        self.observe_costs(outcome.requests, outcome.drafting_fixed_s, outcome.drafting_per_slot_s, outcome.overhead_s)

    def observe_costs(
        self, requests: int, fixed_s: float | None, per_slot_s: float | None = None, overhead_s: float | None = None
    ) -> None:
        """Record a finished step's times for batches of ``requests``: drafting ``fixed_s``
        before the first slot (None: the drafter did not run) and ``per_slot_s`` per slot
        drafted (None: no slot was drafted), and ``overhead_s`` outside drafting and the forward.

        A step then costs fixed(R) + (W - 1)·per_slot(R) + overhead(R) + 1 / SPS(R, W), and a
        plain step overhead(R) + 1 / SPS(R, 1): on a CPU drafting is a large part of a step,
        each verified slot must first be drafted, and the engine's own work dilutes what a
        verified token costs. Only earlier steps feed it, so it cannot depend on this step's
        drafted tokens.
        """
        if overhead_s is not None:
            self._average(self._overhead, requests, overhead_s)
        if fixed_s is not None:
            self._average(self._fixed, requests, fixed_s)
        if per_slot_s is not None:
            self._average(self._per_slot, requests, per_slot_s)

    def observe_context(self, context: int | None) -> None:
        """Read the cost table at ``context`` committed positions from now on (None: keep)."""
        if context is None:
            return
        bucket = -(-context // CONTEXT_STEP) * CONTEXT_STEP
        if bucket != self._context:
            self._context, self._cost_now = bucket, self.cost.at(bucket)

    def observe_outcome(self, schedule: Schedule, requests: int, accepted: int) -> None:
        """Record how many drafted tokens a finished step accepted under ``schedule``.

        A step that verified no draft brings no evidence, and the evidence held so far ages by
        ``decay``: the scale drifts back to 1. Without that, a scale that once fell near 0 (lookup
        blocks predicted to survive that did not) would stop every verification, and with it
        every new outcome, for good: Gemma 3's eval verified nothing after its first dataset.
        """
        if schedule.expected_tokens is None or not any(schedule.lengths):
            self._accepted *= self.decay
            self._predicted *= self.decay
            return
        predicted = (schedule.expected_tokens - requests) / schedule.survival_scale
        self._accepted = self.decay * self._accepted + accepted
        self._predicted = self.decay * self._predicted + predicted

    @property
    def survival_scale(self) -> float:
        """Observed / predicted accepted tokens on earlier steps (1 until there are some).

        STS is fit offline, on one split and one temperature; serving other prompts or
        temperatures, calibrated survival can still be off by a roughly constant factor (the
        shipped drafter's slot 1 is overconfident on code and math). Scaling every a_{r,j}
        by this ratio keeps their order, so the search and its early stop are unchanged,
        and it reads only earlier steps' outcomes, so the schedule stays non-anticipating.
        A pseudo-count of one predicted token keeps the first steps near 1.
        """
        if not self.feedback:
            return 1.0
        return (self._accepted + 1.0) / (self._predicted + 1.0)

    def step_rate(self, requests: int):
        """SPS of the whole step for a batch of ``requests``: (widths # [N], budgets # [N]) -> # [N]."""
        fixed, per_slot = self._fixed.get(requests, 0.0), self._per_slot.get(requests, 0.0)
        overhead = self._overhead.get(requests, 0.0)

        def rate(widths: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
            sps = self._cost_now.steps_per_second(requests, widths, budgets)
            return 1.0 / (fixed + per_slot * (widths - 1) + overhead + 1.0 / sps)

        return rate

    def drafting_pays(self, schedule: Schedule, requests: int, free: Schedule | None = None) -> bool:
        """Whether ``schedule``'s predicted Θ, drafting time included, beats the step that
        drafts nothing costly: ``free``'s (a hybrid's lookup blocks, verified at no drafting
        cost) or, when None or empty, a plain step. The engine's backoff asks this after each
        drafted step."""
        if schedule.expected_tokens is None or not any(schedule.lengths):
            return False
        width = torch.tensor([1 + max(schedule.lengths)])
        budget = torch.tensor([requests + sum(schedule.lengths)])
        drafted = schedule.expected_tokens * float(self.step_rate(requests)(width, budget)[0])
        overhead = self._overhead.get(requests, 0.0)
        if free is not None and free.expected_tokens is not None and any(free.lengths):
            width = torch.tensor([1 + max(free.lengths)])
            budget = torch.tensor([requests + sum(free.lengths)])
            free_step = overhead + 1.0 / float(self._cost_now.steps_per_second(requests, width, budget)[0])
            return drafted > free.expected_tokens / free_step
        one = torch.ones(1, dtype=torch.long)
        plain_step = overhead + 1.0 / float(self._cost_now.steps_per_second(requests, one, one * requests)[0])
        return drafted > requests / plain_step

    def check_shape(self, requests: int, width: int) -> None:
        if not self.cost.covers(requests, width):
            raise DsparkError(
                f"steps may verify {requests} requests × up to {width} tokens but the cost table "
                f"covers only {self.cost.describe_coverage()}; rerun `dspark profile` with a larger "
                "--max-requests or --max-draft"
            )

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        check_inputs(drafted, confidences, True, self.name)
        num = len(drafted)
        self.check_shape(num, 1 + max(drafted, default=0))
        if confidences is None or not any(drafted):
            return Schedule([0] * num, float(num))
        solve = dspark_levels if self.cost.padded else dspark_lengths
        scale = self.survival_scale
        c = self.calibrate(confidences) if self.calibrate is not None else confidences
        lengths, tau = solve(c, drafted, self.step_rate(num), scale)
        values = torch.cat([lengths.to(tau.dtype), tau.view(1)]).tolist()  # the one host sync
        return Schedule([int(v) for v in values[:-1]], values[-1], scale)


def prefix_survival(confidences: torch.Tensor, drafted: Sequence[int], scale: float = 1.0) -> torch.Tensor:
    """a_{r,j} = ∏_{i≤j} c_{r,i} # [R, W] (times ``scale``, at most 1), zero at and beyond γ_r."""
    width = confidences.shape[1]
    valid = torch.arange(width, device=confidences.device) < torch.tensor(drafted, device=confidences.device).view(-1, 1)
    a = torch.cumprod(confidences.float().clamp(0.0, 1.0), dim=1)
    if scale != 1.0:
        a = (a * scale).clamp(max=1.0)
    return a.masked_fill(~valid, 0.0)


def dspark_lengths(confidences: torch.Tensor, drafted: Sequence[int], sps, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 without host syncs: (ℓ # [R] long, τ* # [] float).

    ``sps(widths, budgets)`` is the step rate of this batch size. The greedy admission path is
    evaluated for all prefixes at once: the k-th admitted candidate gives B_k = R + k,
    W_k = 1 + the largest position admitted so far and τ*_k = R + Σ_{i≤k} a_(i), and the search
    stops at the first k with Θ_k <= Θ_{k-1} (while it improves, Θ_{k-1} is the best so far).
    """
    num = confidences.shape[0]
    a = prefix_survival(confidences, drafted, scale)  # [R, W]
    # j-major flattening (index j*R + r) + a stable descending sort = ties broken by position.
    flat = a.t().reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    a_sorted = flat[order]  # candidates with a = 0 (invalid, or never surviving) sort last
    steps = torch.arange(1, a_sorted.shape[0] + 1, device=a.device)
    widths = 2 + torch.cummax(torch.div(order, num, rounding_mode="floor"), 0).values  # 1 + position
    admitted, tau_star = _early_stop(a_sorted, widths, num + steps, sps, num)
    taken = torch.arange(a_sorted.shape[0], device=a.device) < admitted
    lengths = torch.zeros(num, dtype=torch.long, device=a.device).scatter_add_(0, order % num, taken.long())
    return lengths, tau_star


def dspark_levels(confidences: torch.Tensor, drafted: Sequence[int], sps, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 over levels, for a padded engine: (ℓ # [R] long, τ* # [] float).

    Admitting level j gives W = j + 1, ℓ_r = min(γ_r, j), B = Σ_r (1 + ℓ_r) and
    τ* = R + Σ_{i≤j} Σ_r a_{r,i}; levels are admitted while Θ = τ*·SPS(R, W) strictly improves.
    """
    num, width = confidences.shape[0], max(drafted)
    device = confidences.device
    a = prefix_survival(confidences[:, :width], drafted, scale)  # [R, J]
    gain = a.sum(dim=0)  # [J], non-increasing in j
    caps = torch.tensor(list(drafted), device=device)
    levels = torch.arange(1, width + 1, device=device)
    budgets = num + torch.minimum(caps.unsqueeze(0), levels.unsqueeze(1)).sum(dim=1)  # [J]
    admitted, tau_star = _early_stop(gain, levels + 1, budgets, sps, num)
    return torch.minimum(caps, admitted), tau_star


def _early_stop(gains: torch.Tensor, widths: torch.Tensor, budgets: torch.Tensor, sps, num: int):
    """The admission search of Algorithm 1 over candidates already in their order: candidate k
    adds ``gains[k]`` expected tokens and makes the step (``widths[k]``, ``budgets[k]``).
    Starting from τ* = R at (W = 1, B = R), candidates are admitted while Θ = τ*·SPS strictly
    improves (and they add something); the first that does not stops the search. Returns
    (how many were admitted # [], τ* after them # [])."""
    tau = num + torch.cumsum(gains, 0)  # [N]
    theta = tau * sps(widths, budgets)  # [N]
    one = torch.ones(1, dtype=torch.long, device=gains.device)
    theta_prev = torch.cat([num * sps(one, one * num), theta[:-1]])
    admitted = ((theta > theta_prev) & (gains > 0)).long().cumprod(0).sum()  # the leading run # []
    tau_star = torch.where(admitted > 0, tau[(admitted - 1).clamp_min(0)], torch.tensor(float(num), device=gains.device))
    return admitted, tau_star
