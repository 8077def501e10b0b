"""The prompt mix: prompts from several pools, deduplicated, with evaluation prompts refused.

A drafter must never train on the prompts it is evaluated on, so every prompt is checked
against every user turn of the evaluation sets (:class:`EvalOverlapFilter`) before it joins
the mix; :func:`mix_prompts` draws each pool's share in a seeded order and shuffles the lot.
"""

from __future__ import annotations

import os
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from dspark.errors import DsparkError
from dspark.training.data.prompts import PromptRecord, read_jsonl, user_turns

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


# -- keeping evaluation sets out ---------------------------------------------------------
def normalize_text(text: str) -> str:
    """Lowercase, NFKC, straight quotes, whitespace collapsed: the form overlap checks compare."""
    return " ".join(unicodedata.normalize("NFKC", text).translate(_QUOTES).lower().split())


class EvalOverlapFilter:
    """Refuses prompts that overlap an evaluation prompt; a drafter must never train on eval sets.

    After :func:`normalize_text`, a text overlaps when it equals an eval prompt, contains an
    eval prompt's first ``prefix_chars`` characters, or (being at least ``min_chars`` long)
    is itself a piece of an eval prompt, which catches a GSM8K question stripped of the
    instruction suffix the eval copy carries.
    """

    def __init__(self, eval_texts: Iterable[str], prefix_chars: int = 200, min_chars: int = 40) -> None:
        if prefix_chars < 1 or min_chars < 1:
            raise ValueError(f"prefix_chars and min_chars must be >= 1, got {prefix_chars}, {min_chars}")
        normalized = {normalize_text(t) for t in eval_texts} - {""}
        if not normalized:
            raise DsparkError("no evaluation prompts to filter against; refusing to mix unfiltered data")
        self.num_eval_texts = len(normalized)
        self.min_chars = min_chars
        self._exact = frozenset(normalized)
        self._blob = "\n".join(sorted(normalized))  # normalized text holds no newline
        self._longest = max(map(len, normalized))
        # Eval texts shorter than min_chars must match exactly: their prefix is a common phrase.
        prefixes = sorted({t[:prefix_chars] for t in normalized if len(t) >= min_chars})
        # Any occurrence of a pattern at least 2k - 1 long covers, at some offset j < k, a
        # k-window of the text that starts at a multiple of k. Indexing every pattern's
        # windows at offsets 0..k-1 lets a scan look only at those len/k text windows.
        self._k = max(1, min(16, (min_chars + 1) // 2))
        self._anchors: dict[str, list[tuple[str, int]]] = {}
        for prefix in prefixes:
            for j in range(self._k):
                self._anchors.setdefault(prefix[j : j + self._k], []).append((prefix, j))

    @classmethod
    def from_dir(cls, eval_dir: str | Path, **kwargs: int) -> "EvalOverlapFilter":
        """Every user turn of every ``*.jsonl`` in ``eval_dir`` (gsm8k, humaneval, mbpp, mt-bench)."""
        eval_dir = Path(eval_dir)
        files = sorted(eval_dir.glob("*.jsonl")) if eval_dir.is_dir() else []
        if not files:
            raise DsparkError(f"no evaluation sets (*.jsonl) in {eval_dir}; pass --eval-dir")
        texts = [t for f in files for _, obj in read_jsonl(f) for t in user_turns(obj)]
        return cls(texts, **kwargs)

    def overlaps(self, text: str) -> bool:
        t = normalize_text(text)
        if t in self._exact:
            return True
        if self.min_chars <= len(t) <= self._longest and t in self._blob:
            return True
        k = self._k
        for i in range(0, len(t) - k + 1, k):
            for prefix, j in self._anchors.get(t[i : i + k], ()):
                if i >= j and t.startswith(prefix, i - j):
                    return True
        return False

    def record_overlaps(self, record: PromptRecord) -> bool:
        return any(self.overlaps(turn) for turn in record.turns)


def default_eval_dir() -> Path:
    """``$DSPARK_EVAL_DIR``, else the built-in evaluation sets shipped with the package."""
    if os.environ.get("DSPARK_EVAL_DIR"):
        return Path(os.environ["DSPARK_EVAL_DIR"])
    from dspark.evaluation.datasets import ASSET_DIR

    return ASSET_DIR


# -- mixing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptPool:
    """One source's prompts and how many of them the mix takes."""

    name: str
    """Label in reports, e.g. ``sharegpt`` or ``magpie-code``."""
    records: Sequence[PromptRecord]
    """Candidates; the mix draws from them in a seeded random order."""
    n: int | None = None
    """How many to take; None takes every clean, unique one."""

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 0:
            raise ValueError(f"pool {self.name!r}: n must be >= 0, got {self.n}")


@dataclass(frozen=True)
class PoolReport:
    """What the mix did with one pool."""

    name: str
    """The pool's label."""
    available: int
    """Candidates in the pool."""
    requested: int | None
    """The pool's n (None: all)."""
    taken: int
    """Prompts that went into the mix."""
    dropped_eval: int
    """Drawn but refused for overlapping an evaluation prompt."""
    dropped_duplicate: int
    """Drawn but already taken (same normalized text) from this or an earlier pool."""


@dataclass(frozen=True)
class MixResult:
    """The mixed prompts, shuffled, and a report per pool."""

    records: list[PromptRecord]
    """The taken prompts of every pool, shuffled together with the mix's seed."""
    pools: list[PoolReport]
    """One report per pool, in the order drawn."""

    def by_domain(self) -> dict[str, int]:
        return dict(Counter(r.domain for r in self.records))

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": len(self.records),
            "by_domain": self.by_domain(),
            "pools": [vars(p) for p in self.pools],
            "dropped_eval": sum(p.dropped_eval for p in self.pools),
            "dropped_duplicate": sum(p.dropped_duplicate for p in self.pools),
        }


def mix_prompts(pools: Sequence[PromptPool], eval_filter: EvalOverlapFilter, seed: int = 0) -> MixResult:
    """Take ``n`` clean, unique prompts from each pool in a seeded order, then shuffle the lot.

    Pools are drawn in the given order, so a prompt in two pools counts for the first one.
    Refused and duplicate prompts are skipped and replaced by later draws; a pool that runs out
    contributes fewer than ``n``.
    """
    seen: set[str] = set()
    taken: list[PromptRecord] = []
    reports = []
    for pool in pools:
        order = list(pool.records)
        random.Random(f"{seed}:{pool.name}").shuffle(order)
        want = len(order) if pool.n is None else pool.n
        count = dropped_eval = dropped_dup = 0
        for record in order:
            if count >= want:
                break
            key = "\n".join(normalize_text(t) for t in record.turns)
            if key in seen:
                dropped_dup += 1
                continue
            if eval_filter.record_overlaps(record):
                dropped_eval += 1
                continue
            seen.add(key)
            taken.append(record)
            count += 1
        reports.append(PoolReport(pool.name, len(order), pool.n, count, dropped_eval, dropped_dup))
    random.Random(seed).shuffle(taken)
    return MixResult(records=taken, pools=reports)
