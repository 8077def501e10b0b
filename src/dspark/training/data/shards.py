"""One shard of a store: token-id records, their counts, the manifest, and the npz format.

``shard_00000.npz`` + ``shard_00000.json``, one pair per :meth:`ShardStore.append
<dspark.training.data.store.ShardStore.append>`. The npz holds the ids flat (``uint16`` when
every id fits, else ``uint32``), ``offsets`` # [n + 1], the loss mask bit-packed with
``np.packbits`` and the record ids, sources, domains and finish reasons. Both files are
written under a temporary name, fsynced and renamed; the json manifest comes last and is
what marks a shard complete, so a killed write leaves at most an npz without a manifest,
which readers ignore and the next writer removes. The manifest records the npz's size, sha1
and record ids, which every open and read of the store checks.

Sequences are built from token ids only (prompt ids + generated ids + end of turn); nothing is
ever decoded and re-encoded, so the stored ids are exactly what the target saw and said.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from dspark.training.data.prompts import DOMAINS

FORMAT = "dspark-shards/1"
"""Version tag of the store layout in ``store.json`` and every shard manifest."""


@dataclass(frozen=True)
class ShardRecord:
    """One stored sequence: token ids and the loss mask over them."""

    id: str
    """Prompt id (:func:`dspark.training.data.prompts.prompt_id`): resuming and the held-out split key on it."""
    source: str
    """Where the prompt came from (``sharegpt``, ``magpie-math``, ...)."""
    domain: str
    """code, math or chat."""
    input_ids: Sequence[int]
    """[n] prompt ids then the answer ids (then the end-of-turn id when the answer stopped)."""
    loss_mask: Sequence[int]
    """[n] 1 on the tokens to learn (the answer and its end of turn), 0 elsewhere."""
    finish_reason: str
    """``stop``, ``length`` (max_new_tokens ran out) or ``text`` (nothing was generated)."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(
                f"record {self.id!r}: input_ids [{len(self.input_ids)}] and loss_mask [{len(self.loss_mask)}] differ"
            )
        if not self.input_ids:
            raise ValueError(f"record {self.id!r} is empty")
        if self.domain not in DOMAINS:
            raise ValueError(f"record {self.id!r}: domain must be one of {DOMAINS}, got {self.domain!r}")

    @property
    def num_loss_tokens(self) -> int:
        return int(sum(self.loss_mask))


@dataclass(frozen=True)
class ShardCounts:
    """What a shard (or a whole store) holds."""

    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    sequences_by_domain: dict[str, int] = field(default_factory=dict)
    loss_tokens_by_domain: dict[str, int] = field(default_factory=dict)
    sequences_by_source: dict[str, int] = field(default_factory=dict)
    loss_tokens_by_source: dict[str, int] = field(default_factory=dict)
    finish_reasons: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Sequence[ShardRecord]) -> "ShardCounts":
        by = {name: Counter() for name in ("sd", "ld", "ss", "ls", "fr")}
        for r in records:
            n = r.num_loss_tokens
            by["sd"][r.domain] += 1
            by["ld"][r.domain] += n
            by["ss"][r.source] += 1
            by["ls"][r.source] += n
            by["fr"][r.finish_reason] += 1
        return cls(
            sequences=len(records),
            tokens=sum(len(r.input_ids) for r in records),
            loss_tokens=sum(by["ld"].values()),
            sequences_by_domain=dict(by["sd"]),
            loss_tokens_by_domain=dict(by["ld"]),
            sequences_by_source=dict(by["ss"]),
            loss_tokens_by_source=dict(by["ls"]),
            finish_reasons=dict(by["fr"]),
        )

    def __add__(self, other: "ShardCounts") -> "ShardCounts":
        def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return dict(Counter(a) + Counter(b))

        return ShardCounts(
            self.sequences + other.sequences,
            self.tokens + other.tokens,
            self.loss_tokens + other.loss_tokens,
            add(self.sequences_by_domain, other.sequences_by_domain),
            add(self.loss_tokens_by_domain, other.loss_tokens_by_domain),
            add(self.sequences_by_source, other.sequences_by_source),
            add(self.loss_tokens_by_source, other.loss_tokens_by_source),
            add(self.finish_reasons, other.finish_reasons),
        )

    def loss_share_by_domain(self) -> dict[str, float]:
        """Fraction of the loss tokens in each domain (the data mix the trainer sees)."""
        total = self.loss_tokens or 1
        return {d: self.loss_tokens_by_domain.get(d, 0) / total for d in DOMAINS}


@dataclass(frozen=True)
class ShardManifest:
    """``shard_NNNNN.json``: what one shard holds; its presence marks the shard complete."""

    index: int
    npz_bytes: int
    """Size of the npz; a mismatch means the pair does not belong together."""
    npz_sha1: str
    """sha1 of the npz bytes, checked on every read."""
    kind: str
    settings: dict[str, Any]
    target_fingerprint: str | None
    tokenizer_fingerprint: str
    created: str
    sources: list[str]
    """The distinct sources of its records."""
    ids: list[str]
    """The prompt ids it holds, in stored order."""
    counts: ShardCounts
    format: str = FORMAT

    @property
    def npz_name(self) -> str:
        return f"shard_{self.index:05d}.npz"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ShardManifest":
        obj = dict(obj)
        obj["counts"] = ShardCounts(**obj["counts"])
        return cls(**obj)


def encode_shard(records: Sequence[ShardRecord]) -> bytes:
    """The npz bytes of ``records``: flat ids, offsets # [n + 1], packed mask, string columns."""
    lengths = np.fromiter((len(r.input_ids) for r in records), dtype=np.int64, count=len(records))
    offsets = np.zeros(len(records) + 1, dtype=np.int64)  # [n + 1]
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for r in records for t in r.input_ids), dtype=np.int64, count=int(offsets[-1]))
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << 32):
        raise ValueError("token ids must lie in [0, 2**32)")
    dtype = np.uint16 if not flat.size or flat.max() < 1 << 16 else np.uint32
    mask = np.fromiter((m for r in records for m in r.loss_mask), dtype=np.uint8, count=int(offsets[-1]))
    if mask.size and mask.max() > 1:
        raise ValueError("loss masks must be 0 or 1")
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        tokens=flat.astype(dtype),  # [T]
        offsets=offsets,  # [n + 1]
        loss_mask=np.packbits(mask),  # [ceil(T / 8)]
        ids=np.array([r.id for r in records], dtype=str),  # [n]
        sources=np.array([r.source for r in records], dtype=str),
        domains=np.array([r.domain for r in records], dtype=str),
        finish_reasons=np.array([r.finish_reason for r in records], dtype=str),
    )
    return buffer.getvalue()


def read_ids(source) -> list[str]:
    """The record ids of an npz shard (a path or file): its ``ids`` member only, no token is read."""
    with np.load(source, allow_pickle=False) as z:
        return z["ids"].tolist()


def decode_shard(payload: bytes) -> list[ShardRecord]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        tokens, offsets = z["tokens"], z["offsets"]
        mask = np.unpackbits(z["loss_mask"], count=int(offsets[-1]))
        columns = [z[name].tolist() for name in ("ids", "sources", "domains", "finish_reasons")]
    ids_all, mask_all = tokens.tolist(), mask.tolist()
    return [
        ShardRecord(id_, source, domain, ids_all[a:b], mask_all[a:b], reason)
        for id_, source, domain, reason, a, b in zip(*columns, offsets[:-1].tolist(), offsets[1:].tolist())
    ]
