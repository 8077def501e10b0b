"""Reduced draft vocabularies in the layout vLLM, SGLang and speculators load.

A drafter may predict over N < V tokens: the N most frequent tokens of its training
targets. Its LM head is then a row subset of the frozen target head (no new weights) and
its Markov head's W2 covers the same N tokens. Two tensors describe the subset, named as
EAGLE-3 / speculators checkpoints name them:

- ``d2t`` # [N] int64 *offsets*: draft index i is target token ``i + d2t[i]``;
- ``t2d`` # [V] bool: True where a target token is in the draft vocabulary.

Draft ids are kept in ascending target order, so ``d2t`` is non-negative and
non-decreasing. q is zero outside the subset, so rejection sampling stays exact: a target
token the drafter can never propose is produced only by the residual or the bonus token.
"""

from __future__ import annotations

from typing import Iterable

import torch


def top_tokens(counts: torch.Tensor, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent target ids of ``counts`` # [V], plus ``always``, ascending # -> [N].

    Ties are broken by the lower id, so the choice is deterministic. ``always`` (stop
    tokens, say) is taken first; the rest of the budget goes by frequency.
    """
    vocab = counts.shape[0]
    if not 1 <= size <= vocab:
        raise ValueError(f"draft vocabulary size must be in 1..{vocab}, got {size}")
    forced = sorted({int(t) for t in always})
    if any(not 0 <= t < vocab for t in forced):
        raise ValueError(f"forced draft tokens {forced} must lie in [0, {vocab})")
    if len(forced) > size:
        raise ValueError(f"{len(forced)} forced tokens do not fit a draft vocabulary of {size}")
    score = counts.double().clone()
    # Descending count, then ascending id: stable sort of ids by -count.
    score[forced] = float("inf")
    order = torch.sort(-score, stable=True).indices
    return order[:size].sort().values


def d2t_t2d(draft_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t # [N] offsets, t2d # [V] bool) for ascending target ids ``draft_ids`` # [N]."""
    check_draft_ids(draft_ids, vocab_size)
    d2t = draft_ids - torch.arange(draft_ids.shape[0], dtype=draft_ids.dtype)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[draft_ids] = True
    return d2t, t2d


def draft_ids_from_d2t(d2t: torch.Tensor) -> torch.Tensor:
    """Target id of every draft index, ``i + d2t[i]`` # [N] -> [N]."""
    return torch.arange(d2t.shape[0], device=d2t.device, dtype=d2t.dtype) + d2t


def target_to_draft_index(draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V] int64: the draft index of each target token, -1 outside the draft vocabulary."""
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=draft_ids.device)
    index[draft_ids] = torch.arange(draft_ids.shape[0], device=draft_ids.device)
    return index


def check_draft_ids(draft_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError unless ``draft_ids`` # [N] is strictly ascending inside [0, vocab_size)."""
    if draft_ids.dim() != 1 or draft_ids.numel() == 0:
        raise ValueError(f"draft ids must be a non-empty [N] tensor, got {tuple(draft_ids.shape)}")
    if int(draft_ids[0]) < 0 or int(draft_ids[-1]) >= vocab_size:
        raise ValueError(f"draft ids must lie in [0, {vocab_size})")
    if draft_ids.numel() > 1 and not bool((draft_ids[1:] > draft_ids[:-1]).all()):
        raise ValueError("draft ids must be strictly ascending (d2t offsets non-decreasing)")

