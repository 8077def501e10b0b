"""Deterministic batching and anchor sampling.

Both are pure functions of (seed, step), so a resumed run sees exactly the data and anchors
an uninterrupted run would have seen, and N data-parallel ranks together see exactly what
one process sees: rank r takes rows r, r+N, ... of the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Batch:
    """Right-padded sequences with their anchors."""

    input_ids: torch.Tensor
    """[B, S] token ids (0-padded)."""
    attention_mask: torch.Tensor
    """[B, S] 1 on real tokens."""
    loss_mask: torch.Tensor
    """[B, S] 1 on assistant tokens that may be predicted."""
    anchors: torch.Tensor
    """[B, N] anchor positions, -1 where a sequence had fewer candidates."""
    indices: list[int]
    """Dataset index of each row."""


def global_batch_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> list[int]:
    """Dataset indices of the global batch at ``step``: epochs walk fresh permutations."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(i, dataset_size)
        perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        out.append(int(perm[offset]))
    return out


def sample_anchors(loss_mask: Sequence[int], count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``count`` anchor positions a whose next token (a + 1) is a response token."""
    mask = torch.as_tensor(loss_mask, dtype=torch.bool)
    candidates = (mask[1:]).nonzero().squeeze(-1)  # a such that loss_mask[a + 1] == 1
    if candidates.numel() > count:
        pick = torch.randperm(candidates.numel(), generator=generator)[:count]
        candidates = candidates[pick.sort().values]
    out = torch.full((count,), -1, dtype=torch.long)
    out[: candidates.numel()] = candidates
    return out


def make_batch(
    sequences: Sequence,
    indices: Sequence[int],
    anchors_per_sequence: int,
    step: int,
    seed: int,
) -> Batch:
    """Collate ``sequences[i]`` (objects with input_ids and loss_mask) for i in ``indices``."""
    rows = [sequences[i] for i in indices]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    loss = torch.zeros(len(rows), width, dtype=torch.long)
    anchors = []
    for b, (index, row) in enumerate(zip(indices, rows)):
        n = len(row.input_ids)
        ids[b, :n] = torch.as_tensor(row.input_ids)
        attn[b, :n] = 1
        loss[b, :n] = torch.as_tensor(row.loss_mask)
        # Seeded by (seed, step, dataset index): the same anchors whatever the rank layout.
        generator = torch.Generator().manual_seed(seed + 1_000_003 * step + index)
        anchors.append(sample_anchors(row.loss_mask, anchors_per_sequence, generator))
    return Batch(ids, attn, loss, torch.stack(anchors), list(indices))


def block_targets(batch: Batch, gamma: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, validity and target-logit positions for every slot # -> 3 × [B, N, γ].

    Slot k of the block at anchor a predicts token a + k; its target distribution p_t is the
    target's output at position a + k - 1. A slot is valid when a + k is a response token.
    """
    ids, loss_mask, anchors = batch.input_ids, batch.loss_mask, batch.anchors
    seq = ids.shape[1]
    a = anchors.clamp_min(0).unsqueeze(-1)
    k = torch.arange(1, gamma + 1)
    label_pos = a + k  # [B, N, γ]
    inside = label_pos < seq
    safe = label_pos.clamp_max(seq - 1)
    flat = safe.view(ids.shape[0], -1)
    labels = ids.gather(1, flat).view_as(safe)
    valid = inside & (loss_mask.gather(1, flat).view_as(safe) == 1) & (anchors.unsqueeze(-1) >= 0)
    return labels, valid, safe - 1
