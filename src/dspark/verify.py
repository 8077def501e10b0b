"""Lossless verification: the speculative-sampling rejection rule as pure functions.

Glossary: the drafter proposes tokens x_1..x_γ with draft distributions q_1..q_γ. One target
forward over [anchor, x_1..x_γ] gives target distributions p_1..p_{γ+1}. Verification keeps
the longest prefix of *accepted* tokens, then appends one more token: a *recovered* token
drawn from the residual normalize(max(0, p_k - q_k)) at the first rejection k, or a *bonus*
token drawn from p_{γ+1} when every draft token was accepted. τ counts accepted + 1.

Why it is lossless (Leviathan et al. 2023, Chen et al. 2023): token x_k ~ q_k is kept with
probability min(1, p_k(x)/q_k(x)), so Pr[keep and emit x] = min(q_k(x), p_k(x)); on rejection
the residual supplies the missing mass p_k(x) - min(q_k(x), p_k(x)). Their sum is p_k(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark.errors import NonFiniteLogits
from dspark.sampling import SamplingParams, check_logits, sample, usable, warp_probs


@dataclass(frozen=True)
class VerifyResult:
    """Tokens to commit after one verification: ``num_accepted`` draft tokens + 1 more."""

    tokens: list[int]
    """Accepted draft tokens followed by the recovered or bonus token."""
    num_accepted: int
    """How many draft tokens survived (0..γ)."""


def point_mass(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """q for a deterministic drafter (n-gram): one-hot rows # [γ] -> [γ, V]."""
    return torch.nn.functional.one_hot(tokens, vocab_size).float()


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)) for p, q # [V] -> [V].

    If p == q up to rounding the residual has no mass; rejection then had (numerically)
    zero probability, and p itself is the correct conditional.
    """
    residual = (p - q).clamp_min(0.0)
    total = residual.sum()
    if total <= 1e-12:  # host sync: only on the (rare) rejection path, once per round
        return p
    return residual / total


def first_rejection(accept: torch.Tensor) -> int:
    """Index of the first False in ``accept`` # [γ] bool, or γ when all are True."""
    rejected = (~accept).nonzero()
    # One host sync per round: the engine needs the accepted length on the host anyway.
    return int(rejected[0, 0]) if rejected.numel() else int(accept.shape[0])


def rejection_sample(
    draft_tokens: torch.Tensor,
    q: torch.Tensor | None,
    p: torch.Tensor,
    generator: torch.Generator | None,
) -> VerifyResult:
    """Verify ``draft_tokens`` # [γ] drafted from ``q`` # [γ, V] against ``p`` # [γ+1, V].

    ``q = None`` means a point mass on each draft token. ``p`` and ``q`` must already be
    warped with the same :class:`SamplingParams`.
    """
    gamma = draft_tokens.shape[0]
    if p.dim() != 2 or p.shape[0] != gamma + 1:
        raise ValueError(f"p must be [γ+1, V] = [{gamma + 1}, V], got {tuple(p.shape)}")
    if q is None:
        q = point_mass(draft_tokens, p.shape[-1])
    if q.shape != (gamma, p.shape[-1]):
        raise ValueError(f"q must be [γ, V] = [{gamma}, {p.shape[-1]}], got {tuple(q.shape)}")
    idx = draft_tokens.unsqueeze(-1)
    p_x = p[:gamma].gather(-1, idx).squeeze(-1)  # [γ]
    q_x = q.gather(-1, idx).squeeze(-1)  # [γ]
    u = torch.rand(gamma, generator=generator, device=p.device)
    # u < p/q written without the division so that q(x) = 0 (never sampled) is safe.
    accept = u * q_x < p_x
    n = first_rejection(accept)
    if n < gamma:
        last = sample(residual_distribution(p[n], q[n]), generator)
    else:
        last = sample(p[gamma], generator)
    return VerifyResult(tokens=draft_tokens[:n].tolist() + [int(last)], num_accepted=n)


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> VerifyResult:
    """T = 0: accept while the draft equals the target argmax # [γ], [γ+1, V]."""
    gamma = draft_tokens.shape[0]
    best = target_logits.argmax(-1)  # [γ+1]
    n = first_rejection(best[:gamma] == draft_tokens)
    return VerifyResult(tokens=draft_tokens[:n].tolist() + [int(best[n])], num_accepted=n)


def verify(
    draft_tokens: torch.Tensor,
    q: torch.Tensor | None,
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> VerifyResult:
    """Dispatch to greedy matching or rejection sampling # [γ], [γ, V]|None, [γ+1, V].

    Raises :class:`~dspark.errors.NonFiniteLogits` when the target's logits (or, when
    sampling, q) hold NaN or inf: the rule would commit garbage, so the request fails instead.
    """
    ok = usable(target_logits)
    if not params.greedy and q is not None:
        ok = ok & q.isfinite().all()
    if not bool(ok):  # host sync: one per request and round, beside first_rejection's
        check_logits(target_logits, "the target's logits")
        raise NonFiniteLogits("the drafter's q holds NaN or inf: the drafter is broken or overflowed in its dtype")
    if params.greedy:
        return greedy_verify(draft_tokens, target_logits)
    return rejection_sample(draft_tokens, q, warp_probs(target_logits, params), generator)
