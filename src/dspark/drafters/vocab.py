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
:class:`DraftVocabulary` is the model side, shared by the DSpark and EAGLE-3 models.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from dspark.errors import DsparkError


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



class DraftVocabulary:
    """The draft vocabulary of a drafter model (mixed into its ``nn.Module``).

    The model has a ``config`` with ``vocab_size`` V, ``num_draft_tokens`` N and
    ``reduced_vocab``; with a reduced vocabulary :meth:`register_draft_vocab` gives it the
    ``d2t`` # [N] and ``t2d`` # [V] buffers, saved under the speculators names.
    """

    config: Any
    d2t: torch.Tensor
    t2d: torch.Tensor

    def register_draft_vocab(self) -> None:
        """Register d2t/t2d (zeros: :meth:`set_draft_vocab` or a checkpoint fills them)."""
        if self.config.reduced_vocab:
            self.register_buffer("d2t", torch.zeros(self.config.num_draft_tokens, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(self.config.vocab_size, dtype=torch.bool))
        self._head_rows: tuple[tuple, torch.Tensor] | None = None  # (key, [N, d]) cache of draft_rows()
        self._oov_index: tuple[tuple, torch.Tensor] | None = None  # (key, [V]) cache of draft_index_or_oov()

    @torch.no_grad()
    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        """Fill d2t/t2d from ascending target ids # [N] (N = config.draft_vocab_size)."""
        if not self.config.reduced_vocab:
            raise DsparkError("this drafter predicts over the whole target vocabulary; it has no d2t")
        if draft_ids.shape != self.d2t.shape:
            raise ValueError(f"draft ids must be [{self.d2t.shape[0]}], got {tuple(draft_ids.shape)}")
        d2t, t2d = d2t_t2d(draft_ids.cpu().long(), self.config.vocab_size)
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """Target id of each draft index # [N], or None for the full vocabulary."""
        return draft_ids_from_d2t(self.d2t) if self.config.reduced_vocab else None

    def check_draft_vocab(self) -> None:
        """Raise DsparkError unless d2t and t2d describe one valid, consistent subset."""
        if not self.config.reduced_vocab:
            return
        ids = self.draft_ids.cpu()
        try:
            check_draft_ids(ids, self.config.vocab_size)
        except ValueError as exc:
            raise DsparkError(f"the drafter's d2t is not a valid draft vocabulary: {exc}") from None
        if not torch.equal(d2t_t2d(ids, self.config.vocab_size)[1], self.t2d.cpu()):
            raise DsparkError("the drafter's t2d does not match its d2t")

    def to_target_ids(self, draft_index: torch.Tensor) -> torch.Tensor:
        """Target ids of draft indices # [...] (the identity for the full vocabulary)."""
        return draft_index if not self.config.reduced_vocab else draft_index + self.d2t[draft_index]

    def expand_q(self, q: torch.Tensor) -> torch.Tensor:
        """q over draft indices # [..., N] -> over the target vocabulary # [..., V], zero outside."""
        if not self.config.reduced_vocab:
            return q
        full = q.new_zeros(*q.shape[:-1], self.config.vocab_size)
        return full.index_copy_(-1, self.draft_ids, q)

    def draft_index_or_oov(self, tokens: torch.Tensor) -> torch.Tensor:
        """Draft index of target tokens # [...], N for a token outside the draft vocabulary.

        Cached like :meth:`draft_rows`: the [V] table is rebuilt only when d2t changes.
        """
        if not self.config.reduced_vocab:
            return tokens
        key = (self.d2t.data_ptr(), self.d2t._version, tokens.device)
        stale = self._oov_index is not None and self._oov_index[1].is_inference() and not torch.is_inference_mode_enabled()
        if self._oov_index is None or self._oov_index[0] != key or stale:
            index = target_to_draft_index(self.draft_ids.to(tokens.device), self.config.vocab_size)
            self._oov_index = (key, index.masked_fill(index < 0, self.config.num_draft_tokens))
        return self._oov_index[1][tokens]

    def draft_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of the draft tokens of a target head ``weight`` # [V, d] -> [N, d] (all of it for N = V).

        Cached: rebuilt only when the head or d2t changes (a checkpoint load copies into d2t
        in place).
        """
        if not self.config.reduced_vocab:
            return weight
        key = (weight.data_ptr(), weight.dtype, self.d2t.data_ptr(), self.d2t._version)
        # Rows gathered while drafting (inference mode) cannot enter autograd: training rebuilds them.
        stale = self._head_rows is not None and self._head_rows[1].is_inference() and not torch.is_inference_mode_enabled()
        if self._head_rows is None or self._head_rows[0] != key or stale:
            self._head_rows = (key, weight.detach()[self.draft_ids.to(weight.device)])
        return self._head_rows[1]
