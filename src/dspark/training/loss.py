"""The DSpark training objective (paper eqs. 8-12) as pure functions.

L = α_ce·L_ce + α_tv·L_tv + α_conf·L_conf, each term position-weighted by
w_k = exp(-(k-1)/γ_w) and averaged over valid slots:

- L_ce: cross-entropy of the draft distribution p_d on the ground-truth token x*_k (the
  next token of text the target wrote, or the target's greedy token on text it did not);
- L_tv: ‖p_d − p_t‖₁ against the target distribution p_t at the same position;
- L_conf: BCE(c_k, c*_k) with the soft label c*_k = 1 − ½‖p_d − p_t‖₁ (detached), which is the
  exact per-slot acceptance probability of rejection sampling;
- L_soft: the soft cross-entropy −Σ_x p_t(x) log p_d(x), forward KL(p_t ‖ p_d) up to p_t's
  entropy (a constant): EAGLE-3's objective, weighted by α_soft (0 for DSpark and DFlash).

"Averaged" means Σ w_k·ℓ_k / Σ w_k over valid slots; ``denominator`` lets data-parallel
ranks divide by the *global* weight sum so N ranks reproduce one process exactly.

With a reduced draft vocabulary D (N of the V target tokens) p_d is zero outside D, so
‖p_d − p_t‖₁ = Σ_{x∈D} |p_d(x) − p_t(x)| + p_t(V∖D): the target's mass outside D enters as
a constant ``target_outside``, and a label outside D (index -1) has no CE term; L_soft sums
over D only (p_t's mass outside D is out of p_d's reach), so its minimiser is p_t renormalised on D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Mixing weights of the three terms and the position decay."""

    ce: float = 0.1
    """α_ce."""
    tv: float = 0.9
    """α_tv."""
    conf: float = 1.0
    """α_conf (0 when the confidence head is off)."""
    gamma_w: float = 4.0
    """γ_w in w_k = exp(-(k-1)/γ_w); 4 in every DeepSpec config."""
    soft: float = 0.0
    """α_soft, the soft cross-entropy to p_t (EAGLE-3's loss)."""

    def __post_init__(self) -> None:
        if min(self.ce, self.tv, self.conf, self.soft) < 0 or self.ce + self.tv + self.soft <= 0:
            raise ValueError("loss weights must be >= 0 with ce + tv + soft > 0")
        if self.gamma_w <= 0:
            raise ValueError("gamma_w must be > 0")


DSPARK_WEIGHTS = LossWeights()
DFLASH_WEIGHTS = LossWeights(ce=1.0, tv=0.0, conf=0.0)
EAGLE3_WEIGHTS = LossWeights(ce=0.0, tv=0.0, conf=0.0, soft=1.0)
"""Soft CE to p_t at every step of the training-time test; w_k = exp(-(k-1)/4) ≈ 0.78^(k-1) is
close to EAGLE-3's own 0.8^(k-1) step weights."""


def position_weights(gamma: int, gamma_w: float, device=None) -> torch.Tensor:
    """w_k = exp(-(k-1)/γ_w) for k = 1..γ # -> [γ]."""
    k = torch.arange(gamma, dtype=torch.float32, device=device)
    return torch.exp(-k / gamma_w)


@dataclass(frozen=True)
class LossTerms:
    """The objective and its parts for one batch."""

    total: torch.Tensor
    ce: torch.Tensor
    tv: torch.Tensor
    conf: torch.Tensor
    slot_acceptance: torch.Tensor
    """[γ] mean soft acceptance 1 − ½‖p_d − p_t‖₁ per slot (detached)."""
    slot_counts: torch.Tensor
    """[γ] valid slots that entered slot_acceptance."""
    greedy_survival: torch.Tensor | None = None
    """[γ] fraction of blocks whose slots 1..k all match the target's argmax (T = 0 prefix
    survival, exact on text the target wrote greedily); None without ``greedy_index``."""
    soft: torch.Tensor | None = None
    """L_soft (detached); None when α_soft = 0."""

    def tau_estimate(self) -> float:
        """1 + Σ_k Π_{i≤k} acceptance_i: the training-time estimate of τ."""
        return 1.0 + float(self.slot_acceptance.cumprod(0).sum())


def dspark_loss(
    draft_logits: torch.Tensor,
    target_probs: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    confidence_logits: torch.Tensor | None,
    weights: LossWeights,
    denominator: torch.Tensor | None = None,
    target_outside: torch.Tensor | None = None,
    greedy_index: torch.Tensor | None = None,
) -> LossTerms:
    """Loss over blocks: draft logits and p_t # [n, γ, N], labels/valid # [n, γ], confidence # [n, γ].

    ``labels`` are draft-vocabulary indices (-1: no CE for that slot); ``target_outside``
    # [n, γ] is p_t's mass outside the draft vocabulary (None: the vocabulary is whole);
    ``greedy_index`` # [n, γ] is the draft index of the target's argmax (-1 outside), for the
    T = 0 survival statistic.
    """
    n, gamma, vocab = draft_logits.shape
    if target_probs.shape != draft_logits.shape:
        raise ValueError(f"target_probs {tuple(target_probs.shape)} != draft_logits {(n, gamma, vocab)}")
    if labels.shape != (n, gamma) or valid.shape != (n, gamma):
        raise ValueError(f"labels and valid must be [{n}, {gamma}]")
    if target_outside is not None and target_outside.shape != (n, gamma):
        raise ValueError(f"target_outside must be [{n}, {gamma}], got {tuple(target_outside.shape)}")
    w = position_weights(gamma, weights.gamma_w, draft_logits.device).expand(n, gamma) * valid.float()
    denom = w.sum() if denominator is None else denominator
    denom = denom.clamp_min(1e-8)

    log_pd = draft_logits.float().log_softmax(-1)
    has_label = labels >= 0
    ce = F.nll_loss(log_pd.reshape(-1, vocab), labels.clamp_min(0).reshape(-1), reduction="none").view(n, gamma)
    ce = ce * has_label.float()
    l1 = (log_pd.exp() - target_probs.float()).abs().sum(-1)  # [n, γ] = ‖p_d − p_t‖₁ = 2·TV
    if target_outside is not None:
        l1 = l1 + target_outside.float()
    soft_accept = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)  # c*_k

    zero = draft_logits.new_zeros((), dtype=torch.float32)
    ce_term = (w * ce).sum() / denom
    tv_term = (w * l1).sum() / denom
    conf_term = zero
    if confidence_logits is not None and weights.conf > 0:
        bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), soft_accept, reduction="none")
        conf_term = (w * bce).sum() / denom
    total = weights.ce * ce_term + weights.tv * tv_term + weights.conf * conf_term
    soft_term = None
    if weights.soft > 0:
        soft_ce = -(target_probs.float() * log_pd).sum(-1)  # [n, γ]
        soft_term = (w * soft_ce).sum() / denom
        total = total + weights.soft * soft_term
        soft_term = soft_term.detach()

    counts = valid.float().sum(0)
    acceptance = (soft_accept * valid.float()).sum(0) / counts.clamp_min(1.0)
    greedy = None
    if greedy_index is not None:
        with torch.no_grad():
            match = (draft_logits.argmax(-1) == greedy_index) & valid  # [n, γ]
            survived = match.long().cumprod(-1).float()  # slots 1..k all matched
            greedy = (survived * valid.float()).sum(0) / counts.clamp_min(1.0)
    return LossTerms(total, ce_term.detach(), tv_term.detach(), conf_term.detach(), acceptance, counts, greedy, soft_term)


def expected_tau(acceptance: list[float]) -> float:
    """1 + Σ_k Π_{i≤k} a_i for a per-slot acceptance list (for logs and tests)."""
    return 1.0 + sum(math.prod(acceptance[: k + 1]) for k in range(len(acceptance)))


@dataclass(frozen=True)
class SlotTargets:
    """What the target says about every slot of a batch of blocks."""

    probs: torch.Tensor
    """[B, N, γ, N_draft] p_t on the draft vocabulary."""
    outside: torch.Tensor | None
    """[B, N, γ] p_t's mass outside the draft vocabulary; None when it is whole."""
    greedy: torch.Tensor
    """[B, S] the target's greedy token after each position (full vocabulary ids)."""


@torch.no_grad()
def slot_targets(
    logits: torch.Tensor, target_pos: torch.Tensor, draft_ids: torch.Tensor | None
) -> SlotTargets:
    """p_t at each slot from the target's logits # [B, S, V] at ``target_pos`` # [B, N, γ].

    The softmax runs once per position (not once per slot: with dense anchors every position
    is read by up to γ slots), row by row so a [B, S, V] fp32 softmax never has to fit at once.
    """
    batch, seq, _ = logits.shape
    flat = target_pos.view(batch, -1)  # [B, N*γ]
    probs, outside, greedy = [], [], []
    for b in range(batch):
        p = logits[b].float().softmax(-1)  # [S, V]
        greedy.append(logits[b].argmax(-1))
        if draft_ids is not None:
            p_draft = p.index_select(-1, draft_ids.to(p.device))  # [S, N]
            outside.append((1.0 - p_draft.sum(-1)).clamp_min(0.0)[flat[b]])
            p = p_draft
        probs.append(p[flat[b]])
    shape = target_pos.shape
    return SlotTargets(
        probs=torch.stack(probs).view(*shape, -1),
        outside=torch.stack(outside).view(shape) if draft_ids is not None else None,
        greedy=torch.stack(greedy),
    )
