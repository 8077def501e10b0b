"""EAGLE-3 chain drafting over an Eagle3Model: one path, batched; the batch-1 drafter is it at R = 1.

One round, anchor at position a = L - 1 of the L committed tokens of each request:

1. fold: the pairs not cached yet (token x_j with the target's fused state g_{j-1}, from the
   features of the committed tokens the drafter has not seen) run through the layer in one
   causal pass; their K/V stay in the request's slot of a
   :class:`~dspark.target.slot_cache.SlotCache` across rounds. The last of them is the
   anchor's pair, and its output is step 1's h^{(1)};
2. chain: for k = 1..γ, x_k ~ q_k = warp(softmax(lm_head(norm(h^{(k)})))) (argmax at T = 0);
   step k + 1 runs the layer at position a + k on [embed(x_k); h^{(k)}], the drafter's own
   state in place of the target's, attending to the cached pairs and the chain so far.

The chain's K/V came from the drafter's own states; the next fold starts at the slot's pair
count and overwrites them with the real pairs of the accepted tokens. q is expanded to the
target vocabulary (zero outside a reduced draft vocabulary), so rejection sampling stays
exact. The slow oracle in the tests is the unrolled training forward
:meth:`Eagle3Model.forward` on the drafted tokens; drafting R requests together is also
compared with drafting each alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dspark.drafters.base import DraftBatch, DraftBlock, DraftGate, DraftInput
from dspark.drafters.one_slot import OneSlot
from dspark.drafters.eagle3.model import Eagle3Model
from dspark.errors import DsparkError
from dspark.sampling import sample_from_logits
from dspark.target.kernels import AUTO, set_linear_kernel
from dspark.target.loading import cache_root
from dspark.timing import device_clock
from dspark.target.slot_cache import SlotCache, SlotWriteView, ragged_causal_mask


class Eagle3Drafter(OneSlot):
    """The batch-1 :class:`~dspark.drafters.base.Drafter`: the batched drafter at R = 1.

    There is one drafting path, as for DSpark: every round of the batch-1 engine is a
    :meth:`BatchedEagle3Drafter.propose_batch` over a single slot that grows with the request.
    """

    def __init__(self, model: Eagle3Model, name: str = "eagle3", gamma: int | None = None,
                 linear_kernel: str = AUTO) -> None:
        """``linear_kernel``: as for :class:`~dspark.target.model.TargetModel` (gradient-free
        forwards only)."""
        set_linear_kernel(model, linear_kernel, cache_dir=cache_root())
        self.model = model.eval()
        self.config = model.config
        self.name = name
        self.feature_layer_ids = tuple(self.config.target_layer_ids)
        # γ may exceed the training horizon (the chain just runs on), but the default is it.
        self.gamma = gamma or self.config.block_size
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        self._one: BatchedEagle3Drafter | None = None

    @classmethod
    def load(cls, folder, gamma: int | None = None, device: str = "cpu", dtype=None) -> "Eagle3Drafter":
        """The drafter saved in ``folder``, on ``device`` in ``dtype`` (default float32)."""
        return cls(Eagle3Model.from_pretrained(folder, device=device, dtype=dtype or torch.float32), gamma=gamma)

    def check_target(self, target) -> None:
        self.model.attach_target(target)

    def batched(self) -> "BatchedEagle3Drafter":
        """The batched drafter over the same model (weights shared, slots its own)."""
        return BatchedEagle3Drafter(self.model, self.name, self.gamma)



class BatchedEagle3Drafter:
    """A :class:`~dspark.drafters.base.BatchDrafter` over an Eagle3Model: the same rounds as
    :class:`Eagle3Drafter` for R requests at once, one layer call per fold and per chain step.

    Each request's K/V live in a slot of a :class:`~dspark.target.slot_cache.SlotCache`. A fold
    writes every row's new pairs at its own offset (padded to the longest, under the ragged
    causal mask); chain step k writes at position a_r + k. Nothing is cropped: the next fold
    starts at the row's pair count and overwrites the chain, and the mask hides anything
    stale past a row's own positions. The batch-1 :class:`Eagle3Drafter` is the reference it
    is tested against.
    """

    def __init__(self, model: Eagle3Model, name: str, gamma: int) -> None:
        self.model = model
        self.config = model.config
        self.name = name
        self.feature_layer_ids = tuple(self.config.target_layer_ids)
        self.gamma = gamma
        self._cache = None
        self._pairs: list[int] = []

    def check_target(self, target) -> None:
        self.model.attach_target(target)

    def allocate(self, num_slots: int, capacity: int) -> None:
        hf, weight = self.model.hf_config, self.model.fc.weight
        # + γ: a chain writes up to γ - 1 positions past the anchor.
        self._cache = SlotCache(1, num_slots, capacity + self.gamma, hf.num_key_value_heads, hf.head_dim,
                                weight.dtype, weight.device)
        self._pairs = [0] * num_slots

    def open(self, slot: int) -> None:
        self._pairs[slot] = 0  # stale K/V stay in the slot, masked until overwritten

    @torch.inference_mode()
    def propose_batch(self, slots: Sequence[int], inputs: Sequence[DraftInput], gate: DraftGate | None = None) -> DraftBatch:
        """Whole blocks (EAGLE-3 has no confidences, so the gate is never asked)."""
        clock = device_clock(next(self.model.parameters()).device)
        t0 = clock()
        if self._cache is None:
            raise DsparkError("allocate() must be called before propose_batch()")
        device = inputs[0].tokens.device
        h = self._fold(slots, inputs)  # [R, d] step 1 at every anchor
        gammas = [max(0, min(self.gamma, inp.max_tokens)) for inp in inputs]
        rows = [i for i, g in enumerate(gammas) if g > 0]
        blocks = [DraftBlock.empty(device) for _ in inputs]
        if not rows:
            return DraftBatch(blocks)
        model = self.model
        index = torch.tensor(rows, device=device)
        h = h.index_select(0, index)  # [R', d]
        anchors = torch.tensor([self._pairs[slots[i]] - 1 for i in rows], device=device)  # [R'] anchor positions
        row_slots = torch.tensor([slots[i] for i in rows], device=device)
        drafted, probs, margins = [], [[] for _ in rows], []
        for k in range(max(gammas[i] for i in rows)):
            if k > 0:  # every row steps; rows past their γ draft tokens nobody reads
                starts = anchors + k
                kv_len = int(starts.max()) + 1  # host sync: once per chain step
                view = SlotWriteView(self._cache, row_slots, starts, kv_len)
                mask = ragged_causal_mask(starts, 1, kv_len)  # pairs <= a_r and this chain
                h = model.step(model.embed(drafted[-1].unsqueeze(1)), h.unsqueeze(1), starts.unsqueeze(1), view, mask)[:, 0]
            logits = model.logits(h)  # [R', N]
            top2 = logits.topk(2, dim=-1).values  # [R', 2]
            margins.append(top2[:, 0] - top2[:, 1])
            choice = logits.argmax(-1)
            for j, i in enumerate(rows):
                if k < gammas[i] and not inputs[i].params.greedy:
                    token, q = sample_from_logits(logits[j], inputs[i].params, inputs[i].generator)
                    choice[j] = token
                    probs[j].append(model.expand_q(q))  # [V]
            drafted.append(model.to_target_ids(choice))
        tokens = torch.stack(drafted, dim=1)  # [R', γ_max]
        margin = torch.stack(margins, dim=1)  # [R', γ_max]
        for j, i in enumerate(rows):
            blocks[i] = DraftBlock(tokens=tokens[j, : gammas[i]], q=torch.stack(probs[j]) if probs[j] else None,
                                   margins=margin[j, : gammas[i]])
        return DraftBatch(blocks, fixed_s=clock() - t0)

    def propose_free(self, slots: Sequence[int], inputs: Sequence[DraftInput]) -> DraftBatch:
        """Nothing: every block of this drafter costs a forward."""
        return DraftBatch.empty(len(inputs), inputs[0].tokens.device if inputs else "cpu")

    def _fold(self, slots: Sequence[int], inputs: Sequence[DraftInput]) -> torch.Tensor:
        """Write every row's new pairs into its slot # -> [R, d], each row's last output (its anchor's h)."""
        model = self.model
        feats, starts = [], []
        for s, inp in zip(slots, inputs):
            f = inp.new_features
            if f is None:
                raise DsparkError("the EAGLE-3 drafter needs the target features of every committed token")
            if self._pairs[s] == 0:
                f = torch.cat([f.new_zeros(1, f.shape[-1]), f])  # pair 0 reads zeros
            if self._pairs[s] + f.shape[0] != inp.tokens.shape[0]:
                raise DsparkError(
                    f"drafter slot {s} holds {self._pairs[s]} pairs and got {f.shape[0]} new ones for "
                    f"{inp.tokens.shape[0]} committed tokens; the engine must pass features of every committed token once"
                )
            feats.append(f)
            starts.append(self._pairs[s])
        lengths = [f.shape[0] for f in feats]
        n = max(lengths)
        device = inputs[0].tokens.device
        need = max(st + n for st in starts) + self.gamma
        if need > self._cache.capacity:
            self._cache.grow(max(need, 2 * self._cache.capacity))
        width = feats[0].shape[-1]
        padded = feats[0].new_zeros(len(feats), n, width)
        ids = torch.zeros(len(feats), n, dtype=torch.long, device=device)
        for r, (f, st, inp) in enumerate(zip(feats, starts, inputs)):
            padded[r, : f.shape[0]] = f
            ids[r, : f.shape[0]] = inp.tokens[st:]
        start = torch.tensor(starts, device=device)
        kv_len = max(st + n for st in starts)
        view = SlotWriteView(self._cache, torch.tensor(list(slots), device=device), start, kv_len)
        positions = start.unsqueeze(1) + torch.arange(n, device=device)
        # Padded entries are written past each row's pairs, where the mask hides them and the
        # chain or the next fold overwrites them.
        mask = ragged_causal_mask(start, n, kv_len) if len(feats) > 1 or n > 1 else None
        h = model.step(model.embed(ids), model.fuse(padded), positions, view, mask)  # [R, n, d]
        for s, length in zip(slots, lengths):
            self._pairs[s] += length
        last = torch.tensor([length - 1 for length in lengths], device=device)
        return h[torch.arange(len(feats), device=device), last]
