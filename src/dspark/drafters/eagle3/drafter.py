"""EAGLE-3 chain drafting: the batch-1 :class:`~dspark.drafters.base.Drafter` over an Eagle3Model.

One round, anchor at position a = L - 1 of the L committed tokens:

1. fold: the pairs not cached yet (token x_j with the target's fused state g_{j-1}, from the
   features of the committed tokens the drafter has not seen) run through the layer in one
   causal pass; their K/V stay cached across rounds. The last of them is the anchor's pair,
   and its output is step 1's h^{(1)};
2. chain: for k = 1..γ, x_k ~ q_k = warp(softmax(lm_head(norm(h^{(k)})))) (argmax at T = 0);
   step k + 1 runs the layer at position a + k on [embed(x_k); h^{(k)}], the drafter's own
   state in place of the target's, attending to the cached pairs and the chain so far.

The chain's K/V came from the drafter's own states, so the next round crops them before it
folds the real pairs of the accepted tokens. q is expanded to the target vocabulary (zero
outside a reduced draft vocabulary), so rejection sampling stays exact. The batched engine
runs this drafter through :class:`~dspark.drafters.looped.LoopedDrafter`. The slow oracle in
the tests is the unrolled training forward :meth:`Eagle3Model.forward` on the drafted tokens.
"""

from __future__ import annotations

import torch

from dspark.drafters.base import DraftBlock, DraftInput
from dspark.drafters.eagle3.model import Eagle3Model, StepKV
from dspark.errors import DsparkError
from dspark.sampling import sample_from_logits
from dspark.target.kernels import ONEDNN, set_linear_kernel


class Eagle3Drafter:
    """Chain drafting with an :class:`Eagle3Model` and its own KV cache (one request at a time)."""

    def __init__(self, model: Eagle3Model, name: str = "eagle3", gamma: int | None = None,
                 linear_kernel: str = ONEDNN) -> None:
        """``linear_kernel``: as for :class:`~dspark.target.model.TargetModel` (gradient-free
        forwards only)."""
        set_linear_kernel(model, linear_kernel)
        self.model = model.eval()
        self.config = model.config
        self.name = name
        self.feature_layer_ids = tuple(self.config.target_layer_ids)
        # γ may exceed the training horizon (the chain just runs on), but the default is it.
        self.gamma = gamma or self.config.block_size
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        self.reset()

    @classmethod
    def load(cls, folder, gamma: int | None = None, device: str = "cpu", dtype=None) -> "Eagle3Drafter":
        """The drafter saved in ``folder``, on ``device`` in ``dtype`` (default float32)."""
        return cls(Eagle3Model.from_pretrained(folder, device=device, dtype=dtype or torch.float32), gamma=gamma)

    def check_target(self, target) -> None:
        self.model.attach_target(target)

    def reset(self) -> None:
        self._cache = StepKV()
        self._pairs = 0  # pairs 0..P-1 (all from target features) whose K/V are cached

    @torch.inference_mode()
    def propose(self, draft_input: DraftInput) -> DraftBlock:
        model, tokens = self.model, draft_input.tokens
        length = tokens.shape[0]
        h = self._fold(tokens, draft_input.new_features)  # [1, d] step 1's h at the anchor
        gamma = min(self.gamma, draft_input.max_tokens)
        if gamma <= 0:
            return DraftBlock.empty(tokens.device)
        params, generator = draft_input.params, draft_input.generator
        drafted, probs = [], []
        for k in range(gamma):
            if k > 0:  # step k + 1 at position a + k: the drafter's own h in place of the target's state
                position = torch.full((1, 1), length - 1 + k, device=tokens.device)
                h = model.step(model.embed(drafted[-1].view(1, 1)), h.unsqueeze(1), position, self._cache, None)[:, 0]
            index, q = sample_from_logits(model.logits(h[0]), params, generator)  # draft index, q over N
            drafted.append(model.to_target_ids(index))
            if q is not None:
                probs.append(model.expand_q(q))  # [V]
        return DraftBlock(tokens=torch.stack(drafted), q=torch.stack(probs) if probs else None)

    def _fold(self, tokens: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Run the uncached pairs P..L-1 through the layer and cache them # -> [1, d] (the anchor's h).

        ``features`` # [n, m*d] are those of positions L-1-n .. L-2, i.e. g_{j-1} of pairs
        L-n .. L-1; the first round also has pair 0, which reads zeros.
        """
        model, length = self.model, tokens.shape[0]
        if features is None:
            raise DsparkError("the EAGLE-3 drafter needs the target features of every committed token")
        if self._pairs == 0:
            features = torch.cat([features.new_zeros(1, features.shape[-1]), features])
        n = features.shape[0]
        if self._pairs + n != length:
            raise DsparkError(
                f"the EAGLE-3 drafter holds {self._pairs} pairs and got {n} new ones for {length} committed "
                "tokens; the engine must pass features of every committed token once"
            )
        self._cache.crop(self._pairs)  # the last chain's K/V came from the drafter's own states
        positions = torch.arange(self._pairs, length, device=tokens.device).unsqueeze(0)  # [1, n]
        mask = None
        if n > 1:  # causal among the new pairs; every cached pair is visible
            mask = torch.ones(n, length, dtype=torch.bool, device=tokens.device).tril(self._pairs).view(1, 1, n, length)
        h = model.step(model.embed(tokens[self._pairs :].unsqueeze(0)), model.fuse(features).unsqueeze(0),
                       positions, self._cache, mask)
        self._pairs = length
        return h[:, -1]
