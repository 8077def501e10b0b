"""Per-request K/V for many requests at once: one row (a *slot*) per request in [S, H, L, D].

The batched engine keeps every request's target K/V (and the DSpark drafter its context K/V)
in a slot of preallocated buffers. A forward over R requests hands the model a *view*: the
requests' slots, where each one's new tokens start, and how many key positions to read. The
view writes the new K/V at those per-request offsets and returns the slots' histories padded
to one length; a boolean mask (:func:`ragged_causal_mask`) hides what lies beyond each
request's own positions. Nothing is ever copied back: "rolling back" a request is just
starting its next write earlier, and the masked tail is overwritten before anyone can see it.

The views duck-type the one method transformers' attention calls on a cache, ``update``.
"""

from __future__ import annotations

import torch


class SlotCache:
    """K/V buffers # [S, H_kv, L, D] per layer; slot s holds one request's positions 0..L-1."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_slots, kv_heads, capacity, head_dim)
        # Zeros, not empty(): a masked position still enters attn @ V with weight 0, and
        # 0 * NaN from uninitialised memory would poison the row.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.capacity = capacity

    @classmethod
    def for_hf_config(cls, config, num_slots: int, capacity: int, dtype, device) -> "SlotCache":
        """Buffers shaped for a transformers decoder config (full attention in every layer)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, num_slots, capacity, kv_heads, head_dim, dtype, device)

    def grow(self, capacity: int) -> None:
        """Make every slot hold ``capacity`` positions, keeping what they hold (a copy)."""
        if capacity <= self.capacity:
            return
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, : self.capacity] = old
                buffers[i] = new
        self.capacity = capacity

    def write(self, layer: int, slots: torch.Tensor, starts: torch.Tensor, key, value) -> None:
        """Store key/value # [R, H, T, D] at positions starts[r] .. starts[r]+T-1 of slots[r]."""
        t = key.shape[-2]
        cols = starts.unsqueeze(1) + torch.arange(t, device=starts.device)  # [R, T]
        rows = slots.unsqueeze(1)  # [R, 1]
        # Advanced indices split by a slice put their dims first: the target is [R, T, H, D].
        self.keys[layer][rows, :, cols] = key.transpose(1, 2).to(self.keys[layer].dtype)
        self.values[layer][rows, :, cols] = value.transpose(1, 2).to(self.values[layer].dtype)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0..length-1 of ``slots`` # [R] -> keys, values # [R, H, length, D]."""
        return (
            self.keys[layer][:, :, :length].index_select(0, slots),
            self.values[layer][:, :, :length].index_select(0, slots),
        )


class SlotWriteView:
    """A transformers cache for one forward: append new K/V per row, attend over the history.

    Row r's new tokens sit at positions starts[r].. of slot slots[r]; every row reads
    positions 0..kv_len-1 of its slot, and the caller's mask hides the rest.
    """

    def __init__(self, cache: SlotCache, slots: torch.Tensor, starts: torch.Tensor, kv_len: int) -> None:
        if kv_len > cache.capacity:
            raise ValueError(f"{kv_len} key positions exceed the slot capacity {cache.capacity}")
        self.cache, self.slots, self.starts, self.kv_len = cache, slots, starts, kv_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.cache.write(layer_idx, self.slots, self.starts, key_states, value_states)
        return self.cache.read(layer_idx, self.slots, self.kv_len)

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write without reading (the DSpark drafter folds new context K/V this way)."""
        self.cache.write(layer, self.slots, self.starts, key, value)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len


class SlotContextView:
    """A read-only context for the DSpark backbone: [context of each slot; the block's own K/V].

    Like :class:`~dspark.drafters.dspark.model.ContextKV`, block K/V are returned but never
    stored; rows are padded to ``ctx_len`` context positions and the caller's mask hides the
    padding.
    """

    def __init__(self, cache: SlotCache, slots: torch.Tensor, ctx_len: int) -> None:
        self.cache, self.slots, self.ctx_len = cache, slots, ctx_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.cache.read(layer_idx, self.slots, self.ctx_len)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def ragged_causal_mask(starts: torch.Tensor, num_new: int, kv_len: int, window: int | None = None) -> torch.Tensor:
    """Bool mask # [R, 1, T, kv_len]: query t of row r sees key k iff k <= starts[r] + t
    (and, given a sliding ``window``, k > starts[r] + t - window, as transformers' overlay).

    Keys before starts[r] are the row's committed history; keys starts[r]..starts[r]+t are
    this forward's own tokens up to t. Every query sees at least itself, so no row of the
    softmax is empty, padded query rows included.
    """
    query_pos = starts.view(-1, 1, 1) + torch.arange(num_new, device=starts.device).view(1, -1, 1)
    keys = torch.arange(kv_len, device=starts.device).view(1, 1, -1)
    mask = keys <= query_pos
    if window is not None:
        mask &= keys > query_pos - window
    return mask.unsqueeze(1)


def context_block_mask(ctx_lens: torch.Tensor, ctx_len: int, block: int) -> torch.Tensor:
    """Bool mask # [R, 1, γ, ctx_len + γ]: row r sees its first ctx_lens[r] context positions
    and its whole own block, in both directions (the DSpark block attention)."""
    ctx = torch.arange(ctx_len, device=ctx_lens.device).view(1, -1) < ctx_lens.view(-1, 1)  # [R, C]
    own = torch.ones(ctx_lens.shape[0], block, dtype=torch.bool, device=ctx_lens.device)
    return torch.cat([ctx, own], dim=-1).view(-1, 1, 1, ctx_len + block).expand(-1, 1, block, -1)
