"""Verification-length policies: how many drafted tokens ℓ_r each request verifies this step.

Glossary (paper §3.2.2): request r drafted γ_r tokens with calibrated confidences c_{r,k}
(c_k: probability that x_k survives given x_<k did). a_{r,j} = ∏_{i≤j} c_{r,i} is the prefix
survival of j tokens. A step verifies B = Σ_r (1 + ℓ_r) target tokens and is expected to
commit τ* = Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j}) tokens; SPS(B) is the profiled steps per second, and
Θ = τ*·SPS(B) the expected token throughput.

The cost model: the engine pads a step's rows to the longest one, so what a step really costs
is a function of its shape, R rows × W = 1 + max_r ℓ_r tokens, not of B alone. A
:class:`CostModel` answers SPS for (R, W, B); the profiled table (:mod:`dspark.profiling`)
reads (R, W), :class:`FlatCost` reads B (the paper's flattened-token model). Algorithm 1 is
the same under either: every admission changes (W, B), and Θ is evaluated there.

Every policy maps (γ_r, c_{r,·}) to ℓ_r ≤ γ_r. Losslessness needs only one property of it:
the decision ℓ_r ≥ k must not depend on x_{r,k} (nor later tokens), because c_{r,k+1} is
computed from x_{r,k}. Fixed lengths and the static threshold (which reads c_{r,1..k} only)
have it trivially; DSpark has it because of its early stop (Appendix A): candidates are
admitted in descending a, and (r, k+1) can never precede (r, k), so the admission of (r, k)
is settled before any quantity that depends on x_{r,k} is looked at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from dspark.errors import DsparkError


@dataclass(frozen=True)
class Schedule:
    """The verification lengths of one step."""

    lengths: list[int]
    """ℓ_r per request, 0 <= ℓ_r <= γ_r."""
    expected_tokens: float | None = None
    """τ*: tokens the step is expected to commit under the confidences (DSpark only)."""
    survival_scale: float = 1.0
    """The factor the prefix survivals were scaled by (DSpark's online feedback)."""


class CostModel(Protocol):
    """What DSpark needs from a cost table (see :mod:`dspark.profiling`)."""

    padded: bool
    """True when a step costs by its padded shape (R, W); False when by its B tokens."""

    def covers(self, requests: int, width: int) -> bool:
        """Whether steps of ``requests`` rows of up to ``width`` tokens each can be costed."""

    def describe_coverage(self) -> str:
        """What the table covers, for error messages."""

    def steps_per_second(self, requests: int, widths: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        """SPS of steps of ``requests`` rows, padded widths # [N] and budgets # [N] -> # [N] float."""


class FlatCost:
    """SPS as a function of the total tokens B only: the paper's model, exact for an engine
    that flattens the step's tokens instead of padding them. ``sps[b - 1]`` is SPS(B = b)."""

    padded = False

    def __init__(self, sps) -> None:
        self.sps = tuple(float(v) for v in sps)
        if not self.sps or any(not (v > 0.0) for v in self.sps):
            raise ValueError("SPS values must be positive, one per B = 1, 2, ...")

    def covers(self, requests: int, width: int) -> bool:
        return requests * width <= len(self.sps)

    def describe_coverage(self) -> str:
        return f"B <= {len(self.sps)}"

    def steps_per_second(self, requests: int, widths: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(self.sps, dtype=torch.float32, device=budgets.device)
        return table[budgets.long() - 1]


class Policy(Protocol):
    """Chooses ℓ_r for every request of a step."""

    name: str
    max_draft: int | None
    """Most tokens worth drafting per request (None: the drafter's whole block)."""
    needs_confidences: bool

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        """``drafted`` γ_r per request # [R] (host ints), ``confidences`` # [R, W] (W >= max γ_r;
        entries at or beyond γ_r are ignored) or None -> ℓ_r per request."""

    def check_shape(self, requests: int, width: int) -> None:
        """Raise DsparkError if steps of ``requests`` rows of up to ``width`` tokens cannot be
        scheduled."""


def _check(drafted: Sequence[int], confidences: torch.Tensor | None, needed: bool, name: str) -> None:
    if any(g < 0 for g in drafted):
        raise ValueError(f"drafted lengths must be >= 0, got {list(drafted)}")
    if confidences is None:
        if needed and any(drafted):
            raise DsparkError(
                f"the {name} policy needs confidences c_k, but the drafter returned none "
                "(only DSpark drafters with a confidence head provide them)"
            )
        return
    width = max(drafted, default=0)
    if confidences.dim() != 2 or confidences.shape[0] != len(drafted) or confidences.shape[1] < width:
        raise ValueError(
            f"confidences must be [R={len(drafted)}, W>={width}], got {tuple(confidences.shape)}"
        )


class FixedGamma:
    """Verify min(γ_r, gamma) tokens: the whole block when ``gamma`` is None (fixed-γ)."""

    needs_confidences = False

    def __init__(self, gamma: int | None = None, name: str | None = None) -> None:
        if gamma is not None and gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.max_draft = gamma
        self.name = name or ("fixed" if gamma is None else f"fixed-{gamma}")

    def check_shape(self, requests: int, width: int) -> None:
        return None

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        _check(drafted, confidences, False, self.name)
        cap = self.gamma
        return Schedule([g if cap is None else min(g, cap) for g in drafted])


def gamma_one() -> FixedGamma:
    """γ = 1: one draft token per request and step, the analogue of the paper's MTP-1."""
    return FixedGamma(1, name="gamma-1")


class StaticThreshold:
    """Cut each block at its first c_k below ``threshold`` (single-request heuristics)."""

    needs_confidences = True
    max_draft = None

    def __init__(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold = threshold
        self.name = f"threshold-{threshold:g}"

    def check_shape(self, requests: int, width: int) -> None:
        return None

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        _check(drafted, confidences, True, self.name)
        if confidences is None:
            return Schedule([0] * len(drafted))
        width = confidences.shape[1]
        valid = torch.arange(width, device=confidences.device) < torch.tensor(drafted, device=confidences.device).view(-1, 1)
        keep = (confidences >= self.threshold) & valid  # [R, W]
        lengths = keep.long().cumprod(dim=1).sum(dim=1)  # leading run of kept slots
        return Schedule(lengths.tolist())  # host sync: the engine slices the blocks on the host


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

    def __init__(self, cost: CostModel, decay: float = 0.8, feedback: bool = True) -> None:
        if cost is None:
            raise DsparkError(
                "the dspark policy needs a cost table SPS(R, W); measure one with `dspark profile`"
            )
        self.cost, self.decay, self.feedback = cost, decay, feedback
        self._fixed: dict[int, float] = {}
        """Seconds of drafting per step before any slot is drafted (context fold, backbone),
        an exponential average per batch size R over earlier steps."""
        self._per_slot: dict[int, float] = {}
        """Seconds per drafted slot (LM head, transition bias, sampling), likewise."""
        self._accepted, self._predicted = 0.0, 0.0
        """Decayed sums over earlier steps of drafted tokens accepted and of Σ a predicted."""

    def _average(self, table: dict[int, float], key: int, value: float) -> None:
        old = table.get(key)
        table[key] = value if old is None else self.decay * old + (1 - self.decay) * value

    def observe_drafting(self, requests: int, fixed_s: float, per_slot_s: float | None = None) -> None:
        """Record a finished step's drafting time for batches of ``requests``: ``fixed_s``
        before the first slot, ``per_slot_s`` per slot drafted (None: no slot was drafted).

        A step then costs fixed(R) + (W - 1)·per_slot(R) + 1 / SPS(R, W): on a CPU drafting is
        a large part of a step, and each verified slot must first be drafted. Only earlier
        steps feed it, so it cannot depend on this step's drafted tokens.
        """
        self._average(self._fixed, requests, fixed_s)
        if per_slot_s is not None:
            self._average(self._per_slot, requests, per_slot_s)

    def observe_outcome(self, schedule: Schedule, requests: int, accepted: int) -> None:
        """Record how many drafted tokens a finished step accepted under ``schedule``."""
        if schedule.expected_tokens is None or not any(schedule.lengths):
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

        def rate(widths: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
            sps = self.cost.steps_per_second(requests, widths, budgets)
            return 1.0 / (fixed + per_slot * (widths - 1) + 1.0 / sps)

        return rate

    def drafting_pays(self, schedule: Schedule, requests: int) -> bool:
        """Whether ``schedule``'s predicted Θ, drafting time included, beats a plain step that
        drafts nothing: the engine's backoff asks this after each drafted step."""
        if schedule.expected_tokens is None or not any(schedule.lengths):
            return False
        width = torch.tensor([1 + max(schedule.lengths)])
        budget = torch.tensor([requests + sum(schedule.lengths)])
        one = torch.ones(1, dtype=torch.long)
        drafted = schedule.expected_tokens * float(self.step_rate(requests)(width, budget)[0])
        plain = requests * float(self.cost.steps_per_second(requests, one, one * requests)[0])
        return drafted > plain

    def check_shape(self, requests: int, width: int) -> None:
        if not self.cost.covers(requests, width):
            raise DsparkError(
                f"steps may verify {requests} requests × up to {width} tokens but the cost table "
                f"covers only {self.cost.describe_coverage()}; rerun `dspark profile` with a larger "
                "--max-requests or --max-draft"
            )

    def schedule(self, drafted: Sequence[int], confidences: torch.Tensor | None) -> Schedule:
        _check(drafted, confidences, True, self.name)
        num = len(drafted)
        self.check_shape(num, 1 + max(drafted, default=0))
        if confidences is None or not any(drafted):
            return Schedule([0] * num, float(num))
        solve = dspark_levels if self.cost.padded else dspark_lengths
        scale = self.survival_scale
        lengths, tau = solve(confidences, drafted, self.step_rate(num), scale)
        values = torch.cat([lengths.to(tau.dtype), tau.view(1)]).tolist()  # the one host sync
        return Schedule([int(v) for v in values[:-1]], values[-1], scale)


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


POLICY_HELP = "plain | fixed[:γ] | gamma1 | threshold:<t> | dspark"


def make_policy(spec: str, cost: CostModel | None = None) -> Policy:
    """Build a policy from its command-line name (see POLICY_HELP).

    ``plain`` verifies the anchor only (ℓ = 0); pair it with the ``none`` drafter to avoid
    drafting at all. ``dspark`` needs ``cost``; it never falls back to verifying everything.
    """
    kind, _, arg = spec.partition(":")
    try:
        if kind == "plain" and not arg:
            return FixedGamma(0, name="plain")
        if kind == "fixed":
            return FixedGamma(int(arg) if arg else None)
        if kind == "gamma1" and not arg:
            return gamma_one()
        if kind == "threshold" and arg:
            return StaticThreshold(float(arg))
    except ValueError as exc:
        raise DsparkError(f"bad policy {spec!r}: {exc}") from None
    if kind == "dspark" and not arg:
        return DSparkScheduler(cost)
    raise DsparkError(f"unknown policy {spec!r}; choose one of: {POLICY_HELP}")
