"""A bounded store of earlier requests' token sequences, for prompt lookup across requests
(SuffixDecoding's global tree, llama.cpp's ``ngram-mod`` pool, vLLM's
``suffix_decoding_max_cached_requests``): answers to similar prompts repeat each other's
phrasing, so the suffix of a request often continues as some earlier request did.

Each finished request's ids (prompt and output) enter the store; every n-gram of them with
``min_ngram <= n <= max_ngram`` maps to where its most recent occurrence was followed.
:meth:`SuffixStore.find` looks up the longest suffix of a request's ids that the store holds and
returns the ids that followed it. Memory stays bounded: past ``capacity`` ids the oldest
sequences are dropped, and the index is rebuilt from what is left when stale entries pile up.

Losslessness: the store holds committed ids of earlier requests only, so a block it proposes
is a function of the past, like a lookup in the request's own ids; verification is unchanged.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

SEPARATOR = -1
"""Between two stored sequences: no continuation runs across it."""


class SuffixStore:
    """n-gram -> what followed its latest occurrence, over the last ``capacity`` stored ids."""

    def __init__(self, capacity: int = 1 << 16, min_ngram: int = 2, max_ngram: int = 8) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.capacity, self.min_ngram, self.max_ngram = capacity, min_ngram, max_ngram
        self._ids: list[int] = []
        """Stored ids, sequences separated by SEPARATOR; ``_ids[0]`` is absolute position ``_offset``."""
        self._offset = 0
        self._lengths: deque[int] = deque()
        """Length of each stored sequence with its separator, oldest first."""
        self._index: dict[int, int] = {}
        """hash(n-gram) -> absolute position of the id that followed its latest occurrence
        (a hash, not the tuple: a third of the memory; :meth:`find` checks the ids it lands on)."""

    def __len__(self) -> int:
        """Ids held (separators included)."""
        return len(self._ids)

    def add(self, ids: Sequence[int]) -> None:
        """Store one finished request's ids (prompt and output), dropping the oldest past capacity."""
        ids = list(ids)[-(self.capacity - 1) :]  # room for its separator
        if len(ids) < 2:
            return
        start = self._offset + len(self._ids)
        self._ids.extend(ids)
        self._ids.append(SEPARATOR)
        self._lengths.append(len(ids) + 1)
        for end in range(1, len(ids)):  # ids[:end] is followed by ids[end]
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._index[hash(tuple(ids[end - n : end]))] = start + end
        dropped = 0
        while len(self._ids) - dropped > self.capacity:
            dropped += self._lengths.popleft()
        if dropped:
            del self._ids[:dropped]
            self._offset += dropped
        if 2 * len(self._index) > 3 * (self.max_ngram - self.min_ngram + 1) * self.capacity:  # half again stale
            self._rebuild()

    def find(self, suffix: Sequence[int], limit: int) -> tuple[list[int], int] | None:
        """(Up to ``limit`` ids that followed the longest stored n-gram ending ``suffix``, n), or None."""
        suffix = list(suffix)
        for n in range(min(self.max_ngram, len(suffix)), self.min_ngram - 1, -1):
            gram = suffix[len(suffix) - n :]
            at = self._index.get(hash(tuple(gram)))
            if at is None or at - n < self._offset:  # never stored, or dropped since
                continue
            at -= self._offset
            if self._ids[at - n : at] != gram:  # another n-gram with the same hash
                continue
            follow = self._ids[at : at + limit]
            if SEPARATOR in follow:
                follow = follow[: follow.index(SEPARATOR)]
            if follow:
                return follow, n
        return None

    def _rebuild(self) -> None:
        """Index only the ids still held (their absolute positions do not change)."""
        ids, self._ids, self._lengths, self._index = self._ids, [], deque(), {}
        start = 0
        while start < len(ids):
            end = ids.index(SEPARATOR, start)
            self.add(ids[start:end])
            start = end + 1
