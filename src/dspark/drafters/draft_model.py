"""An independent draft model: any HF causal LM sharing the target's tokenizer.

This is classic speculative sampling (and transformers' assisted generation): the small
model runs autoregressively γ times, sampling x_k ~ q_k with the request's parameters, and
keeps its own KV cache, which is cropped back to the committed prefix before each round.
"""

from __future__ import annotations

import torch

from dspark.drafters.base import DraftBlock, DraftInput
from dspark.errors import IncompatibleDrafterError
from dspark.sampling import sample_from_logits
from dspark.target.model import crop_cache, new_dynamic_cache


class DraftModelDrafter:
    """Draft with a smaller causal LM (a :class:`~dspark.drafters.base.Drafter`)."""

    feature_layer_ids: tuple[int, ...] = ()

    def __init__(self, model: torch.nn.Module, gamma: int = 5, name: str = "draft-model") -> None:
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        self.model = model.eval()
        self.gamma = gamma
        self.name = name
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._cache = None
        self._cached: list[int] = []  # token ids whose K/V the cache holds, in order

    @classmethod
    def load(cls, spec: str, gamma: int = 5, device: str = "cpu", dtype=None) -> "DraftModelDrafter":
        """``dtype``: a ``torch.dtype`` (the target's, from the composition root); None is
        ``--dtype auto`` for ``device``."""
        from dspark.target.loading import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(spec, dtype=dtype, device=device, with_tokenizer=False)
        return cls(model, gamma=gamma, name=f"model:{spec}")

    def check_target(self, target) -> None:
        # Tokenizers may pad the embedding matrix differently; the ids the target can emit
        # must all exist in the draft vocabulary and mean the same thing.
        if self.vocab_size != target.vocab_size:
            raise IncompatibleDrafterError(
                f"draft model vocabulary ({self.vocab_size}) does not match the target's "
                f"({target.vocab_size}); a draft model must share the target's tokenizer"
            )

    def reset(self) -> None:
        self._cache = None
        self._cached = []


    @torch.inference_mode()
    def propose(self, draft_input: DraftInput) -> DraftBlock:
        tokens = draft_input.tokens
        gamma = min(self.gamma, draft_input.max_tokens)
        if gamma <= 0:
            return DraftBlock.empty(tokens.device)
        committed = tokens.tolist()  # host sync: once per round, to diff against the cache
        keep = _common_prefix(self._cached, committed[:-1])
        if self._cache is None:
            self._cache = new_dynamic_cache(self.model.config)
        crop_cache(self._cache, keep)
        feed = tokens[keep:].unsqueeze(0)  # [1, n] the unseen committed tokens, anchor last
        drafted, probs, margins = [], [], []
        for _ in range(gamma):
            logits = self.model(input_ids=feed, cache=self._cache, use_cache=True).logits[0, -1]
            top2 = logits.topk(2).values
            margins.append(top2[0] - top2[1])
            x, q = sample_from_logits(logits, draft_input.params, draft_input.generator)
            drafted.append(x)
            probs.append(q)
            feed = x.view(1, 1)
        draft = torch.stack(drafted)
        # The cache now holds every committed id and all drafts but the last (never fed).
        self._cached = committed + draft[:-1].tolist()
        q = None if probs[0] is None else torch.stack(probs)
        return DraftBlock(tokens=draft, q=q, margins=torch.stack(margins))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
