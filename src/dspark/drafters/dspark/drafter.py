"""DSpark drafting: the :class:`~dspark.drafters.base.BatchDrafter` over a trained DSparkModel,
and the batch-1 :class:`~dspark.drafters.base.Drafter` that is the same path at R = 1.

One round: fold the target features of newly committed tokens into the context K/V
(kept across rounds), run the parallel backbone once over [anchor, mask × (γ-1)], then the
sequential loop: for k = 1..γ sample x_k from q_k = softmax((U_k + B(x_{k-1})) / T) (argmax
at T = 0) and compute c_k from [h_k; W1[x_{k-1}]].

Every request's context K/V lives in a slot of one :class:`~dspark.target.slot_cache.SlotCache`;
one backbone pass runs all blocks over their padded contexts under a mask (none for a single
row), and the sequential loop advances every request's slot k together. Given a *gate* (the
engine's :class:`~dspark.drafters.base.DraftGate`), it asks before each slot whether any
request could still verify it, and stops drafting as soon as none can. With the full
vocabulary the LM head then runs only for slots that are drafted, one slot at a time, so that
each slot's drafting cost is the same and the scheduler can price it; with a reduced draft
vocabulary its rows are cheap and one call serves every slot.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dspark.drafters.one_slot import OneSlot
from dspark.drafters.base import DraftBatch, DraftBlock, DraftGate, DraftInput
from dspark.drafters.dspark.model import DSparkModel
from dspark.errors import DsparkError
from dspark.sampling import sample_from_logits
from dspark.target.kernels import AUTO, set_linear_kernel
from dspark.target.loading import cache_root
from dspark.timing import device_clock
from dspark.target.slot_cache import SlotCache, SlotContextView, SlotWriteView, context_block_mask


class DSparkDrafter(OneSlot):
    """The batch-1 :class:`~dspark.drafters.base.Drafter`: the batched drafter at R = 1.

    There is one drafting path: every round of the batch-1 engine is a
    :meth:`BatchedDSparkDrafter.propose_batch` over a single slot, whose context K/V grow
    with the request.
    """

    def __init__(self, model: DSparkModel, name: str | None = None, gamma: int | None = None,
                 linear_kernel: str = AUTO) -> None:
        """``linear_kernel``: as for :class:`~dspark.target.model.TargetModel` (gradient-free
        forwards only, so a model in training is unaffected)."""
        set_linear_kernel(model, linear_kernel, cache_dir=cache_root())
        self.model = model.eval()
        self.config = model.config
        self.name = name or ("dflash" if self.config.is_dflash else "dspark")
        self.feature_layer_ids = tuple(self.config.target_layer_ids)
        self.gamma = min(gamma or self.config.block_size, self.config.block_size)
        self._one: BatchedDSparkDrafter | None = None

    @classmethod
    def load(cls, folder, name: str | None = None, gamma: int | None = None, device: str = "cpu", dtype=None):
        """The drafter saved in ``folder``, on ``device`` in ``dtype`` (the target's; default float32)."""
        model = DSparkModel.from_pretrained(folder, device=device, dtype=dtype or torch.float32)
        return cls(model, name=name, gamma=gamma)

    def check_target(self, target) -> None:
        self.model.attach_target(target)

    def batched(self) -> "BatchedDSparkDrafter":
        """A new batched drafter over the same model (weights shared, slots its own)."""
        return BatchedDSparkDrafter(self.model, self.name, self.gamma)



class BatchedDSparkDrafter:
    """A :class:`~dspark.drafters.base.BatchDrafter` over a DSparkModel: the one drafting path.

    Padding never changes a request's draft: the masks keep padded context positions out of
    every attention (the tests compare it with the teacher-forced :meth:`DSparkModel.forward`).
    """

    def __init__(self, model: DSparkModel, name: str, gamma: int) -> None:
        self.model = model
        self.config = model.config
        self.name = name
        self.feature_layer_ids = tuple(self.config.target_layer_ids)
        self.gamma = gamma
        self._cache: SlotCache | None = None
        self._lengths: list[int] = []  # context positions per slot (= its anchor position)

    def check_target(self, target) -> None:
        self.model.attach_target(target)

    def allocate(self, num_slots: int, capacity: int) -> None:
        hf, weight = self.model.hf_config, self.model.fc.weight
        self._cache = SlotCache(
            len(self.model.layers), num_slots, capacity, hf.num_key_value_heads, hf.head_dim,
            weight.dtype, weight.device,
        )
        self._lengths = [0] * num_slots

    def open(self, slot: int) -> None:
        self._lengths[slot] = 0  # stale K/V stay in the slot, masked until overwritten

    @torch.inference_mode()
    def propose_batch(
        self, slots: Sequence[int], inputs: Sequence[DraftInput], gate: DraftGate | None = None
    ) -> DraftBatch:
        clock = device_clock(self.model.fc.weight.device)
        t0 = clock()
        if self._cache is None:
            raise DsparkError("allocate() must be called before propose_batch()")
        self._fold(slots, [inp.new_features for inp in inputs])
        for s, inp in zip(slots, inputs):
            if self._lengths[s] != inp.tokens.shape[0] - 1:
                raise DsparkError(
                    f"drafter slot {s} holds {self._lengths[s]} context positions but the anchor is "
                    f"at {inp.tokens.shape[0] - 1}; the engine must pass features of every committed token once"
                )
        device = inputs[0].tokens.device
        gammas = [max(0, min(self.gamma, inp.max_tokens)) for inp in inputs]
        rows = [i for i, g in enumerate(gammas) if g > 0]
        blocks = [DraftBlock.empty(device) for _ in inputs]
        if not rows:
            return DraftBatch(blocks)
        model = self.model
        anchors = torch.stack([inputs[i].tokens[-1] for i in rows])  # [R]
        anchor_pos = torch.tensor([self._lengths[slots[i]] for i in rows], device=device)  # [R]
        ctx_len = max(self._lengths[slots[i]] for i in rows)
        block_ids = model.block_input_ids(anchors)  # [R, γ_max]
        width = block_ids.shape[-1]
        positions = anchor_pos.unsqueeze(1) + torch.arange(width, device=device)
        view = SlotContextView(self._cache, torch.tensor([slots[i] for i in rows], device=device), ctx_len)
        # One row sees all of its context and its whole block: no mask, the kernel of a plain block.
        mask = context_block_mask(anchor_pos, ctx_len, width) if len(rows) > 1 else None
        out = model.backbone(block_ids, positions, view, mask, logits=False)
        row_gammas = [gammas[i] for i in rows]
        asked: list[float] = []  # when the gate was first asked (the fixed work was done)

        def ask_gate(k, conf):
            if not asked:
                asked.append(clock())
            return gate(k, rows, row_gammas, conf)

        row_gate = ask_gate if gate is not None and model.confidence_head is not None else None
        drafted, stop = self._sequential(out.hidden, anchors, [inputs[i] for i in rows], row_gammas, row_gate)
        for i, block in zip(rows, drafted):
            blocks[i] = block
        done = clock()
        if not asked:  # ungated, the slot loop is spent whatever the schedule: fixed work
            return DraftBatch(blocks, fixed_s=done - t0)
        return DraftBatch(blocks, stop, fixed_s=asked[0] - t0, slots_s=done - asked[0])

    def propose_free(self, slots: Sequence[int], inputs: Sequence[DraftInput]) -> DraftBatch:
        """Nothing: every block of this drafter costs a forward."""
        return DraftBatch.empty(len(inputs), inputs[0].tokens.device if inputs else "cpu")

    def _fold(self, slots: Sequence[int], features: Sequence[torch.Tensor | None]) -> None:
        """Append the new committed tokens' H_ctx to each slot's context K/V.

        Rounds bring at most γ+1 positions per request and are folded in one padded call;
        a prompt (a request's first round) is folded on its own, unpadded.
        """
        short = [i for i, f in enumerate(features) if f is not None and 0 < f.shape[0] <= self.config.block_size + 1]
        long = [i for i, f in enumerate(features) if f is not None and f.shape[0] > self.config.block_size + 1]
        for i in long:
            self._extend([slots[i]], features[i].unsqueeze(0))
        if short:
            n_max = max(features[i].shape[0] for i in short)
            padded = features[short[0]].new_zeros(len(short), n_max, features[short[0]].shape[-1])
            for j, i in enumerate(short):
                padded[j, : features[i].shape[0]] = features[i]
            # Padded positions get K/V too, past each slot's length, where the mask hides them
            # and the next fold overwrites them.
            self._extend([slots[i] for i in short], padded)
        for i in long + short:
            self._lengths[slots[i]] += features[i].shape[0]

    def _extend(self, slots: Sequence[int], features: torch.Tensor) -> None:
        """Write H_ctx of ``features`` # [R, n, m*d] at each slot's current length."""
        device = features.device
        starts = torch.tensor([self._lengths[s] for s in slots], device=device)
        n = features.shape[1]
        need = max(self._lengths[s] for s in slots) + n
        if need > self._cache.capacity:  # only a batch-1 drafter's slot grows; an engine sizes its own
            self._cache.grow(max(need, 2 * self._cache.capacity))
        positions = starts.unsqueeze(1) + torch.arange(n, device=device)
        view = SlotWriteView(self._cache, torch.tensor(list(slots), device=device), starts, max(self._lengths[s] for s in slots) + n)
        self.model.extend_context(view, self.model.context_states(features), positions)

    def _sequential(self, hidden, anchors, inputs: Sequence[DraftInput], gammas: Sequence[int], gate):
        """Slot k of every request at once, hidden # [R, γ_max, d] -> (blocks, what stopped
        them); ``gate(k, c[R, k+1])`` may stop the loop before slot k+1 is drafted (it is given
        c_{k+1}, which needs no logits) by returning something other than None."""
        head, model = self.model.markov_head, self.model
        num, width = len(inputs), max(gammas)
        # One LM-head call for all slots when every slot is drafted (ungated) or when the head
        # is a reduced vocabulary, whose rows are cheap next to a call; else one per drafted slot.
        one_call = gate is None or model.config.reduced_vocab
        base = model.slot_logits(hidden[:, :width]) if one_call else None  # [R, γ, N]
        prev = anchors  # [R]
        state = head.init_state((num,), anchors.device) if head is not None else None
        drafted, conf, margins, stop = [], [], [], None
        probs: list[list[torch.Tensor]] = [[] for _ in range(num)]
        for k in range(width):
            conf_logits = model.confidence_logits(hidden[:, k], prev)  # [R] or None
            if conf_logits is not None:
                conf.append(torch.sigmoid(conf_logits))
                stop = gate(k, torch.stack(conf, dim=1)) if gate is not None else None
                if stop is not None:
                    break
            logits = base[:, k] if base is not None else model.slot_logits(hidden[:, k])  # [R, N]
            if head is not None:
                bias, state = head.step(model.markov_rows(prev), hidden[:, k], state)
                logits = logits + bias
            top2 = logits.topk(2, dim=-1).values  # [R, 2]
            margins.append(top2[:, 0] - top2[:, 1])
            index = logits.argmax(-1)  # [R] draft indices; greedy rows keep them, rows past their γ ignore them
            for i, inp in enumerate(inputs):
                if k < gammas[i] and not inp.params.greedy:
                    token, q = sample_from_logits(logits[i], inp.params, inp.generator)
                    index[i] = token
                    probs[i].append(model.expand_q(q))  # [V]
            x = model.to_target_ids(index)  # [R]
            drafted.append(x)
            prev = x
        done = len(drafted)
        tokens = torch.stack(drafted, dim=1) if drafted else anchors.new_zeros(num, 0)  # [R, done]
        confidences = torch.stack(conf[:done], dim=1) if conf and done else None  # [R, done]
        margin = torch.stack(margins, dim=1) if done else None  # [R, done]
        blocks = [
            DraftBlock(
                tokens=tokens[i, : min(g, done)],
                q=torch.stack(probs[i][: min(g, done)]) if probs[i] else None,
                confidences=confidences[i, : min(g, done)] if confidences is not None else None,
                margins=margin[i, : min(g, done)] if margin is not None else None,
            )
            for i, g in enumerate(gammas)
        ]
        return blocks, stop
