"""Training sequences out of shard stores (and responses jsonl), and the held-out split by prompt id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from dspark.errors import DsparkError
from dspark.training.data.store import ShardStore
from dspark.training.data.tokenize import TokenizeConfig, TrainingSequence, load_training_sequences

MIN_LOSS_TOKENS = 16
"""Sequences with fewer loss tokens (after truncation) are not worth a training slot."""


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
    stores = open_stores(folders)
    sequences = []
    jobs = [(s, m) for s in stores for m in s.manifests]
    for store, manifest in tqdm(jobs, desc="loading shards", unit="shard", disable=not progress):
        greedy = store.kind == "text"
        for r in store.read_shard(manifest):
            ids, mask = list(r.input_ids[:max_length]), list(r.loss_mask[:max_length])
            if sum(mask) >= min_loss_tokens:
                sequences.append(TrainingSequence(ids, mask, r.id, greedy_labels=greedy, domain=r.domain))
    return sequences


def open_stores(folders: Sequence[str | Path]) -> list[ShardStore]:
    """Open stores to read together, refusing what would train on the same data twice.

    A folder named twice (however spelled: paths are resolved) and a shard present in two
    stores (the same npz sha1: a copied store) are refused, as are stores of different
    tokenizers or (regenerated) targets. Opening checks every shard against its manifest
    (:meth:`ShardStore.open <dspark.training.data.store.ShardStore.open>`), so the CLI calls
    this before loading a model.
    """
    named: dict[Path, str | Path] = {}
    for folder in folders:
        key = Path(folder).expanduser().resolve()
        if key in named:
            raise DsparkError(f"store {folder} is given twice (also as {named[key]}); each store is read once")
        named[key] = folder
    stores = [ShardStore.open(f) for f in folders]
    shards: dict[str, Path] = {}
    for store in stores:
        for m in store.manifests:
            where = store.folder / m.npz_name
            if m.npz_sha1 in shards:
                raise DsparkError(f"{where} is the same shard as {shards[m.npz_sha1]} (a copied store?); "
                                  "each shard is read once")
            shards[m.npz_sha1] = where
    _check_compatible(stores)
    return stores


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


def load_training_data(paths: Sequence[Path], tokenizer, max_length: int, heldout_fraction: float,
                       data_fraction: float = 1.0) -> HeldoutSplit:
    """Sequences of every store folder and responses jsonl in ``paths``, split into train /
    held-out by prompt id; ``data_fraction`` < 1 keeps that share of the training prompts (by
    id hash: scaling studies). A jsonl is tokenized with ``tokenizer``'s chat template."""
    stores = [p for p in paths if p.is_dir()]
    sequences = load_sequences(stores, max_length=max_length) if stores else []
    for path in paths:
        if path.is_file():
            sequences += load_training_sequences(path, tokenizer, TokenizeConfig(max_length=max_length))
    split = split_heldout(sequences, fraction=heldout_fraction)
    if data_fraction < 1.0:
        kept = [s for s in split.train if is_heldout(s.id, data_fraction, salt="data-fraction")]
        split = HeldoutSplit(kept, split.heldout)
    return split


def _check_compatible(stores: Sequence[ShardStore]) -> None:
    tokenizers = {s.info.tokenizer_fingerprint for s in stores}
    if len(tokenizers) > 1:
        names = ", ".join(f"{s.folder} ({s.info.tokenizer_fingerprint[:8]})" for s in stores)
        raise DsparkError(f"the stores were tokenized by different tokenizers: {names}")
    targets = {s.info.target_fingerprint for s in stores if s.kind == "regenerated"}
    if len(targets) > 1:
        names = ", ".join(f"{s.folder} ({(s.info.target_fingerprint or '')[:8]})" for s in stores if s.kind == "regenerated")
        raise DsparkError(f"the regenerated stores were written by different targets: {names}")
