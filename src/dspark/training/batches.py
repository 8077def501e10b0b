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
    greedy_labels: torch.Tensor | None = None
    """[B] bool: rows whose CE label is the target's greedy token (text the target did not
    write); None means no such row."""


def global_batch_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> list[int]:
    """Dataset indices of the global batch at ``step``: epochs walk fresh permutations."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(i, dataset_size)
        perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        out.append(int(perm[offset]))
    return out


def sample_anchors(loss_mask: Sequence[int], count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``count`` anchor positions a, ascending, where inference can place an anchor.

    At inference the anchor is the last committed token, which the target itself produced:
    a response token, never the last prompt token (the prefill emits the first response
    token). So a and a + 1 must both be response tokens.
    """
    mask = torch.as_tensor(loss_mask, dtype=torch.bool)
    candidates = (mask[:-1] & mask[1:]).nonzero().squeeze(-1)  # loss_mask[a] == loss_mask[a + 1] == 1
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
    greedy = torch.tensor([r.greedy_labels for r in rows], dtype=torch.bool)
    for b, (index, row) in enumerate(zip(indices, rows)):
        n = len(row.input_ids)
        ids[b, :n] = torch.as_tensor(row.input_ids)
        attn[b, :n] = 1
        loss[b, :n] = torch.as_tensor(row.loss_mask)
        # Seeded by (seed, step, dataset index): the same anchors whatever the rank layout.
        generator = torch.Generator().manual_seed(seed + 1_000_003 * step + index)
        anchors.append(sample_anchors(row.loss_mask, anchors_per_sequence, generator))
    return Batch(ids, attn, loss, torch.stack(anchors), list(indices), greedy if bool(greedy.any()) else None)


def block_targets(
    batch: Batch, gamma: int, greedy_tokens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels, validity and target-logit positions for every slot # -> 3 × [B, N, γ].

    Slot k of the block at anchor a predicts token a + k; its target distribution p_t is the
    target's output at position a + k - 1. A slot is valid when a + k is a response token.
    The label is the token at a + k, except in rows with ``batch.greedy_labels``, where it is
    the target's greedy token at a + k - 1, taken from ``greedy_tokens`` # [B, S].
    """
    ids, loss_mask, anchors = batch.input_ids, batch.loss_mask, batch.anchors
    seq = ids.shape[1]
    label_pos = _label_positions(batch, gamma)  # [B, N, γ]
    inside = label_pos < seq
    safe = label_pos.clamp_max(seq - 1)
    flat = safe.view(ids.shape[0], -1)
    labels = ids.gather(1, flat).view_as(safe)
    valid = inside & (loss_mask.gather(1, flat).view_as(safe) == 1) & (anchors.unsqueeze(-1) >= 0)
    if batch.greedy_labels is not None:
        if greedy_tokens is None or greedy_tokens.shape != ids.shape:
            raise ValueError(f"rows with greedy labels need greedy_tokens of shape {tuple(ids.shape)}")
        greedy = greedy_tokens.to(ids.device).gather(1, (safe - 1).view(ids.shape[0], -1)).view_as(safe)
        labels = torch.where(batch.greedy_labels.to(ids.device).view(-1, 1, 1), greedy, labels)
    return labels, valid, safe - 1


def target_positions(batch: Batch, gamma: int) -> torch.Tensor:
    """Where p_t of each slot is read: position a + k - 1, clamped inside the row # -> [B, N, γ]."""
    return _label_positions(batch, gamma).clamp_max(batch.input_ids.shape[1] - 1) - 1


def _label_positions(batch: Batch, gamma: int) -> torch.Tensor:
    return batch.anchors.clamp_min(0).unsqueeze(-1) + torch.arange(1, gamma + 1)  # [B, N, γ]
