"""DSparkDrafter: the :class:`~dspark.drafters.base.Drafter` over a trained DSparkModel.

One round: fold the target features of newly committed tokens into the context K/V
(kept across rounds), run the parallel backbone once over [anchor, mask × (γ-1)], then the
sequential loop: for k = 1..γ sample x_k from q_k = softmax((U_k + B(x_{k-1})) / T) (argmax
at T = 0) and compute c_k from [h_k; W1[x_{k-1}]].
"""

from __future__ import annotations

import torch

from dspark.drafters.base import DraftBlock, DraftInput
from dspark.drafters.dspark.model import ContextKV, DSparkModel
from dspark.errors import DsparkError
from dspark.sampling import sample_from_logits


class DSparkDrafter:
    """Semi-autoregressive drafting with a DSpark (or, with the heads off, DFlash) model."""

    def __init__(self, model: DSparkModel, name: str | None = None, gamma: int | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.name = name or ("dflash" if self.config.is_dflash else "dspark")
        self.feature_layer_ids = tuple(self.config.target_layer_ids)
        self.gamma = min(gamma or self.config.block_size, self.config.block_size)
        self._context: ContextKV | None = None

    @classmethod
    def load(cls, folder, name: str | None = None, gamma: int | None = None, device: str = "cpu"):
        return cls(DSparkModel.from_pretrained(folder, device=device), name=name, gamma=gamma)

    def check_target(self, target) -> None:
        self.model.attach_target(target)

    def reset(self) -> None:
        self._context = ContextKV(len(self.model.layers))

    def accepted(self, num_accepted: int) -> None:
        return None  # the accepted tokens' features arrive with the next DraftInput

    @torch.inference_mode()
    def propose(self, draft_input: DraftInput) -> DraftBlock:
        tokens = draft_input.tokens  # [L]
        gamma = min(self.gamma, draft_input.max_tokens)
        if self._context is None:
            self.reset()
        if draft_input.new_features is not None and draft_input.new_features.shape[0]:
            self._fold_context(draft_input.new_features)
        anchor_pos = tokens.shape[0] - 1
        if self._context.length != anchor_pos:
            raise DsparkError(
                f"drafter context holds {self._context.length} positions but the anchor is at "
                f"{anchor_pos}; the engine must pass features of every committed token once"
            )
        if gamma <= 0:
            return DraftBlock.empty(tokens.device)
        model = self.model
        block_ids = model.block_input_ids(tokens[-1]).unsqueeze(0)  # [1, γ_max]
        positions = anchor_pos + torch.arange(block_ids.shape[-1], device=tokens.device).unsqueeze(0)
        out = model.backbone(block_ids, positions, self._context)
        hidden, base = out.hidden[0, :gamma], out.base_logits[0, :gamma]  # [γ, d], [γ, V]
        return self._sequential(hidden, base, tokens[-1], draft_input)

    def _fold_context(self, features: torch.Tensor) -> None:
        """Append H_ctx of new committed tokens # [n, m*d] to every layer's K/V."""
        start = self._context.length
        h_ctx = self.model.context_states(features.unsqueeze(0))
        positions = torch.arange(start, start + features.shape[0], device=features.device).unsqueeze(0)
        self.model.extend_context(self._context, h_ctx, positions)

    def _sequential(self, hidden, base, anchor, draft_input: DraftInput) -> DraftBlock:
        """The sequential stage: left-to-right sampling with the transition bias."""
        head, model = self.model.markov_head, self.model
        params, generator = draft_input.params, draft_input.generator
        gamma = base.shape[0]
        prev = anchor
        state = head.init_state((), anchor.device) if head is not None else None
        drafted, probs, prevs = [], [], []
        for k in range(gamma):
            logits = base[k]
            if head is not None:
                bias, state = head.step(prev, hidden[k], state)
                logits = logits + bias
            x, q = sample_from_logits(logits, params, generator)
            prevs.append(prev)
            drafted.append(x)
            probs.append(q)
            prev = x
        tokens = torch.stack(drafted)
        conf_logits = model.confidence_logits(hidden, torch.stack(prevs))
        confidences = torch.sigmoid(conf_logits) if conf_logits is not None else None
        q = None if probs[0] is None else torch.stack(probs)
        return DraftBlock(tokens=tokens, q=q, confidences=confidences)
