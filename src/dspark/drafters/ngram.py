"""Prompt-lookup (n-gram) drafting: copy what followed the latest earlier match of the suffix,
with a confidence per slot learnt online, so DSpark's scheduler can trim its blocks.

Training-free and deterministic, so q is a point mass on each proposed token; rejection
sampling against a point mass accepts x with probability p(x) and otherwise resamples from
p with x removed, which keeps the output exactly target-distributed.

**Confidences without censoring.** For a point mass, c_k = P(x_k accepted | x_<k accepted) is
p(x_k | prefix) under the target's warped distribution, and the token the target commits at
that position is a sample from exactly that distribution, whatever the engine verified. So
every slot of every past proposal is labelled from the committed stream alone: slot k of a
proposal survived iff the committed tokens at its positions 1..k equal x_1..x_k. Slots the
scheduler did not verify are labelled too, so the estimator's labels are not censored by its
own schedule, from its first round on. :class:`LookupStats` keeps the labels' counts per
(slot k, suffix length n, the request's recent slot-1 rate, where the match was) with a Beta
prior, shared by every request; c_k is their posterior mean.

**Lookup across requests.** Besides the request's own ids, a match may come from a
:class:`~dspark.drafters.suffix_store.SuffixStore` of earlier requests' ids, shared by every
request of the drafter (a request's ids enter it when the slot it ran in is reset for the
next one). Each round the two candidates compete on their expected accepted tokens,
Σ_j ∏_{i≤j} c_i, each from its own cells. A lookup draft is a function of the committed tokens,
so any confidence computed from them keeps a schedule non-anticipating (Appendix A): nothing
in the block is random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dspark.drafters.base import DraftBlock, DraftInput
from dspark.drafters.online_confidence import Labeller, Pending
from dspark.drafters.suffix_store import SuffixStore


@dataclass(frozen=True)
class NgramConfig:
    """Prompt-lookup settings."""

    gamma: int = 7
    """Most tokens proposed per round."""
    max_ngram: int = 3
    """Longest suffix to look up; shorter ones are tried when it does not match."""
    min_ngram: int = 1
    """Shortest suffix that may be looked up."""
    store_tokens: int = 1 << 16
    """Most ids of earlier requests kept for lookup across requests (0: the request's own ids only)."""
    store_max_ngram: int = 4
    """Longest suffix looked up in the earlier requests' ids."""

    def __post_init__(self) -> None:
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        if self.store_tokens < 0:
            raise ValueError(f"store_tokens must be >= 0, got {self.store_tokens}")
        if self.store_max_ngram < self.min_ngram:
            raise ValueError("need store_max_ngram >= min_ngram")

    @property
    def longest(self) -> int:
        """Longest suffix either lookup may match."""
        return max(self.max_ngram, self.store_max_ngram if self.store_tokens else 0)


RATE_BINS = 4
"""The request's recent slot-1 survival rate, in equal bins; one more bin before it has any."""
RATE_DECAY = 0.8
"""Weight of the past in a request's recent slot-1 rate."""
OWN, STORED = 0, 1
"""Where a lookup matched: the request's own ids, or the store of earlier requests'."""


class LookupStats:
    """Labelled slot survivals of lookup proposals, shared by every request of a drafter.

    Counts per (slot k, suffix length n, rate bin, OWN or STORED) with a Beta(``prior_mean``·``prior``,
    (1 - ``prior_mean``)·``prior``) prior; counts decay by ``decay`` per label in a cell once it
    holds ``horizon`` labels, so the estimate follows a drifting workload."""

    def __init__(self, gamma: int, max_ngram: int, prior_mean: float = 0.3, prior: float = 2.0, horizon: int = 2000) -> None:
        shape = (gamma, max_ngram + 1, RATE_BINS + 1, 2)
        # numpy, not torch: a label is a few scalar updates, ~20x cheaper on numpy's indexing.
        self.survived = np.zeros(shape)
        self.labelled = np.zeros(shape)
        self.prior_mean, self.prior, self.horizon = prior_mean, prior, horizon

    def confidences(self, gamma: int, n: int, rate_bin: int, where: int = OWN) -> torch.Tensor:
        """c_1..c_γ # [γ] float32: posterior mean survival of each slot."""
        return torch.from_numpy(self.confidence_array(gamma, n, rate_bin, where)).float()

    def confidence_array(self, gamma: int, n: int, rate_bin: int, where: int = OWN) -> np.ndarray:
        """:meth:`confidences` as float64 numpy."""
        s, t = self.survived[:gamma, n, rate_bin, where], self.labelled[:gamma, n, rate_bin, where]
        return (s + self.prior_mean * self.prior) / (t + self.prior)

    def record(self, k: int, n: int, rate_bin: int, where: int, survived: bool) -> None:
        """One label: slot k (0-based) of a proposal from a suffix of length n, matched
        ``where``, survived or not."""
        cell = (k, n, rate_bin, where)
        if self.labelled[cell] >= self.horizon:
            keep = 1.0 - 1.0 / self.horizon
            self.survived[cell] *= keep
            self.labelled[cell] *= keep
        self.survived[cell] += float(survived)
        self.labelled[cell] += 1.0


class NgramDrafter:
    """Prompt-lookup decoding as a :class:`~dspark.drafters.base.Drafter`, with confidences."""

    name = "ngram"
    feature_layer_ids: tuple[int, ...] = ()
    gives_confidences = True

    def __init__(self, config: NgramConfig = NgramConfig(), stats: LookupStats | None = None,
                 store: SuffixStore | None = None) -> None:
        """``stats``: the label counts to share (a new table when None); ``store``: the earlier
        requests' ids to share (a new one of ``config.store_tokens`` when None and that is > 0).
        Per-request copies of this drafter (the batched engine's) share both, and learn together."""
        self.config = config
        self.gamma = config.gamma
        self.stats = stats if stats is not None else LookupStats(config.gamma, config.longest)
        if store is None and config.store_tokens:
            store = SuffixStore(config.store_tokens, config.min_ngram, config.store_max_ngram)
        self.store = store
        self._own: NgramIndex | None = None
        self.reset()

    def check_target(self, target) -> None:
        return None

    def reset(self) -> None:
        """Forget the request; the ids it was last shown enter the store (the request is over)."""
        if self._own is not None and self.store is not None:
            self.store.add(self._own.ids)
        self._own = NgramIndex(self.config.min_ngram, self.config.max_ngram)
        self._labeller = Labeller()
        self._shadow = Labeller()
        """The candidates not proposed: labelled for the counts, not for the request's rate."""
        self._rate: float | None = None

    def propose(self, draft_input: DraftInput) -> DraftBlock:
        tokens = draft_input.tokens  # [L]
        self._own.extend(tokens)  # also what enters the store when the request is over
        self._label(tokens)
        gamma = min(self.config.gamma, draft_input.max_tokens)
        if gamma <= 0:
            return DraftBlock.empty(tokens.device)
        rate_bin = self.rate_bin()
        candidates = []  # (expected accepted tokens Σ_j ∏_{i≤j} c_i, c, pending labels)
        for where, (follow, n) in self._candidates(tokens, gamma):
            c = self.stats.confidence_array(len(follow), n, rate_bin, where)
            candidates.append((float(c.cumprod().sum()), c, Pending(tokens.shape[0], follow, [(n, rate_bin, where)] * len(follow))))
        if not candidates:
            return DraftBlock(tokens=tokens[:0], confidences=torch.zeros(0, device=tokens.device))
        best = max(range(len(candidates)), key=lambda i: candidates[i][0])  # a tie keeps the request's own match
        for i, (_, _, pending) in enumerate(candidates):
            # The loser is labelled too, so neither source's cells are censored by the choice.
            (self._labeller if i == best else self._shadow).add(pending)
        _, c, pending = candidates[best]
        return DraftBlock(tokens=torch.tensor(pending.tokens, dtype=tokens.dtype, device=tokens.device),
                          confidences=torch.from_numpy(c).float().to(tokens.device))

    def _candidates(self, tokens: torch.Tensor, gamma: int):
        """(OWN, (ids, n)) for the request's own match and (STORED, (ids, n)) for the store's,
        each where there is one."""
        own = self._own.find(gamma)
        if own is not None:
            yield OWN, own
        if self.store is not None and len(self.store):
            stored = self.store.find(self._own.ids[-self.config.store_max_ngram :], gamma)
            if stored is not None:
                yield STORED, stored

    def rate_bin(self) -> int:
        """This request's recent slot-1 survival rate, binned (RATE_BINS before any label)."""
        if self._rate is None:
            return RATE_BINS
        return min(RATE_BINS - 1, int(self._rate * RATE_BINS))

    def _label(self, tokens: torch.Tensor) -> None:
        """Label the pending proposals' slots whose positions are now committed."""

        def record(k: int, cell: tuple[int, int, int], survived: bool) -> None:
            self.stats.record(k, *cell, survived)
            if k == 0:
                self._rate = float(survived) if self._rate is None else RATE_DECAY * self._rate + (1 - RATE_DECAY) * survived

        self._labeller.label(tokens, record)
        self._shadow.label(tokens, lambda k, cell, survived: self.stats.record(k, *cell, survived))


class NgramIndex:
    """One request's committed ids, indexed by n-gram as they arrive: the fast path of
    :func:`lookup` (its oracle; the two agree on every input, tests/test_suffix_store.py),
    O(new ids) per round instead of a scan of the whole context."""

    def __init__(self, min_ngram: int, max_ngram: int) -> None:
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.ids: list[int] = []
        self._at: dict[tuple[int, ...], int] = {}
        """n-gram -> position of the id that followed its latest occurrence."""

    def follow(self, tokens: torch.Tensor, gamma: int) -> tuple[list[int], int] | None:
        """As :func:`lookup` on ``tokens`` # [L], the committed ids (which only grow between calls)."""
        self.extend(tokens)
        return self.find(gamma)

    def extend(self, tokens: torch.Tensor) -> None:
        """Index ``tokens`` # [L], the committed ids, past those already seen (a sequence that
        does not continue them starts the index again)."""
        known = len(self.ids)
        if tokens.shape[0] < known or (known and int(tokens[known - 1]) != self.ids[-1]):
            self.__init__(self.min_ngram, self.max_ngram)  # not a continuation of what it saw: start again
            known = 0
        for x in tokens[known:].tolist():  # host sync: the ids committed since the last round
            i = len(self.ids)
            self.ids.append(x)
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                self._at[tuple(self.ids[i - n : i])] = i

    def find(self, gamma: int) -> tuple[list[int], int] | None:
        """(Up to ``gamma`` ids that followed the latest earlier occurrence of the longest
        indexed suffix, its length), or None."""
        length = len(self.ids)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            at = self._at.get(tuple(self.ids[length - n :]))
            if at is not None:
                return self.ids[at : at + gamma], n
        return None


def lookup(tokens: torch.Tensor, gamma: int, max_ngram: int, min_ngram: int) -> tuple[torch.Tensor, int] | None:
    """(Tokens that followed the most recent earlier occurrence of the longest matching suffix,
    that suffix's length), or None. The slow oracle of :class:`NgramIndex`."""
    length = tokens.shape[0]
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n :]
        windows = tokens[: length - 1].unfold(0, n, 1)  # [L-n, n]; excludes the suffix itself
        hits = (windows == suffix).all(-1).nonzero()
        if hits.numel():
            start = int(hits[-1, 0]) + n  # host sync: the match position picks the slice
            follow = tokens[start : start + gamma]
            if follow.numel():
                return follow, n
    return None
