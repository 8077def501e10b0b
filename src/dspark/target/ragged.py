"""One target forward over ragged rows: each row continues its own slot at its own position.

The batched engine's verification step and its prefills, and the cost tables that time that
step, all run through :func:`verify_forward`. Row r's real queries carry their own position
ids and a mask (:func:`~dspark.target.slot_cache.ragged_causal_mask`) that shows them only
their own history and their own earlier tokens of this forward, so right-padding a row never
changes its logits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dspark.target.model import TargetModel, TargetOutput
from dspark.target.slot_cache import SlotCache, SlotWriteView, ragged_causal_mask


def verify_forward(
    target: TargetModel,
    cache: SlotCache,
    slots: Sequence[int],
    starts: Sequence[int],
    feed: torch.Tensor,
    layer_ids: Sequence[int] = (),
    logits_to_keep: int = 0,
) -> TargetOutput:
    """One ragged target forward: row r of ``feed`` # [R, T] continues slot slots[r] at
    position starts[r]; returns logits # [R, T, V] (padded rows' tails are garbage)."""
    device = feed.device
    num_new = feed.shape[1]
    kv_len = max(starts) + num_new
    starts_t = torch.tensor(list(starts), device=device)
    view = SlotWriteView(cache, torch.tensor(list(slots), device=device), starts_t, kv_len)
    positions = starts_t.unsqueeze(1) + torch.arange(num_new, device=device)
    mask = ragged_causal_mask(starts_t, num_new, kv_len)
    if target.sliding_window is not None:  # one mask per layer type, as transformers builds them
        mask = {"full_attention": mask, "sliding_attention": ragged_causal_mask(starts_t, num_new, kv_len, target.sliding_window)}
    return target.forward(feed, view, layer_ids, attention_mask=mask, position_ids=positions, logits_to_keep=logits_to_keep)
