"""Compact, resumable, accumulating stores of token-id training sequences.

A store is a folder bound to one way of making its data:

- ``store.json`` ``{"format", "kind", "settings", "target_fingerprint", "tokenizer_fingerprint",
  "created"}``. ``kind`` is ``regenerated`` (the target wrote the assistant tokens, so its CE
  labels are the next tokens) or ``text`` (existing conversations, distilled with the target's
  greedy labels). Reopening a store with other settings or fingerprints is refused, naming the
  keys that differ: a resumed run never mixes two recipes. Adding prompts is always fine.
- complete shards (:mod:`dspark.training.data.shards`), one per :meth:`ShardStore.append`.
  Every open checks each manifest against its npz (file name, size, the record ids of the
  npz's ``ids`` member) and that no shard or prompt id appears twice; every read checks the
  npz's sha1, so a shard changed, swapped or corrupted after it was written is refused in
  one line naming it, never trained on.

The stores fill from :mod:`~dspark.training.data.regen` (the target's own answers) and
:mod:`~dspark.training.data.text` (existing conversations); the trainer reads them through
:mod:`~dspark.training.data.sequences`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import zlib
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from dspark.errors import DsparkError
from dspark.training.data.shards import (
    FORMAT,
    ShardCounts,
    ShardManifest,
    ShardRecord,
    decode_shard,
    encode_shard,
    read_ids,
)

KINDS = ("regenerated", "text")
"""``regenerated``: the target wrote the loss tokens; ``text``: it did not (greedy labels)."""
STORE_FILE = "store.json"
LOCK_FILE = ".lock"
_SHARD_GLOB = "shard_[0-9][0-9][0-9][0-9][0-9].npz"


@dataclass(frozen=True)
class StoreInfo:
    """The contents of ``store.json``: what every shard of the store was made with."""

    kind: str
    """One of :data:`KINDS`."""
    settings: dict[str, Any]
    """Generation or tokenization settings (json values); a rerun must bring the same."""
    target_fingerprint: str | None
    """:func:`~dspark.training.data.fingerprints.target_fingerprint` of the target that wrote
    the answers (None for text stores)."""
    tokenizer_fingerprint: str
    """:func:`~dspark.training.data.fingerprints.tokenizer_fingerprint` of the tokenizer the
    ids belong to."""
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
class StoreSummary:
    """Counts of a whole store."""

    folder: str
    kind: str
    shards: int
    counts: ShardCounts

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss_share_by_domain": self.counts.loss_share_by_domain()}


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
        lock_fd = lock_folder(folder, f"store {folder} is being written by another process")
        try:
            have = _read_info(folder)
            if have is None:
                strays = [p.name for p in folder.iterdir() if p.name != LOCK_FILE]
                if strays:
                    raise DsparkError(f"{folder} is not empty and not a shard store (holds {strays[0]}); use a new folder")
                write_atomic(folder / STORE_FILE, _json_bytes(asdict(want)))
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
        write_atomic(self.folder / manifest.npz_name, payload)
        write_atomic(self.folder / f"shard_{index:05d}.json", _json_bytes(manifest.to_json()))
        self.manifests.append(manifest)
        return manifest

    def read_shard(self, manifest: ShardManifest) -> list[ShardRecord]:
        """The records of one shard, after its bytes are checked against the manifest's size and sha1."""
        path = self.folder / manifest.npz_name
        payload = path.read_bytes()
        if len(payload) != manifest.npz_bytes:
            raise DsparkError(f"{path} has {len(payload)} bytes, its manifest says {manifest.npz_bytes}")
        if hashlib.sha1(payload).hexdigest() != manifest.npz_sha1:
            raise DsparkError(f"{path} does not match its manifest (sha1): it was changed or corrupted after it "
                              "was written; restore it, or remove the shard's npz and json")
        try:
            records = decode_shard(payload)
        except UNREADABLE_NPZ as exc:
            raise DsparkError(f"{path} is not a readable shard ({type(exc).__name__}: {exc})") from None
        _check_ids(path, [r.id for r in records], manifest)
        return records

    def iter_records(self) -> Iterator[ShardRecord]:
        for manifest in self.manifests:
            yield from self.read_shard(manifest)


def recorded_target_fingerprint(folder: str | Path) -> str | None:
    """The target fingerprint an existing store is bound to (None: no store yet)."""
    have = _read_info(Path(folder))
    return have.target_fingerprint if have is not None else None


def check_settings(folder: str | Path, kind: str, settings: Mapping[str, Any]) -> None:
    """Refuse at once (before loading a model) when an existing store has another kind or settings."""
    folder = Path(folder)
    have = _read_info(folder)
    if have is not None:
        want = StoreInfo(kind, _json_normal(settings), have.target_fingerprint, have.tokenizer_fingerprint)
        _check_binding(folder, have, want)


# -- helpers -----------------------------------------------------------------------------
def _json_normal(obj: Any) -> Any:
    """``obj`` as json would give it back (tuples become lists), so comparisons are fair."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_atomic(path: Path, payload: bytes) -> None:
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


def lock_folder(folder: Path, busy: str) -> int:
    """Take the exclusive lock on ``folder`` (``flock`` on ``folder/.lock``) and return its descriptor;
    raise DsparkError(``busy``) at once when another process holds it.

    Closing the descriptor releases the lock, and so does the death of the process, so a
    killed writer never leaves a folder locked. Shard stores and training runs both use it.
    """
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DsparkError(busy) from None
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
        except (ValueError, TypeError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
            raise DsparkError(f"{path} is not a valid shard manifest ({exc})") from None
        if npz.name != manifest.npz_name:
            raise DsparkError(f"{path} describes {manifest.npz_name}, not {npz.name}: it was copied from another "
                              "shard; restore it, or remove both files")
        if manifest.npz_bytes != npz.stat().st_size:
            raise DsparkError(f"{npz} does not match its manifest (size); remove both files")
        try:
            ids = read_ids(npz)
        except UNREADABLE_NPZ as exc:
            raise DsparkError(f"{npz} is not a readable shard ({type(exc).__name__}: {exc}); remove both files") from None
        _check_ids(npz, ids, manifest)
        manifests.append(manifest)
    orphans = sorted(p.name for p in folder.glob("shard_[0-9]*.json") if not p.with_suffix(".npz").is_file())
    if orphans:
        raise DsparkError(f"{folder}: manifest {orphans[0]} has no npz beside it; remove it")
    _check_unique(folder, manifests)
    return manifests


UNREADABLE_NPZ = (zipfile.BadZipFile, zlib.error, ValueError, KeyError, EOFError, OSError)
"""What numpy raises on an npz that is not one (a cut or corrupted zip, a missing member)."""


def _check_ids(npz: Path, ids: list[str], manifest: ShardManifest) -> None:
    """Refuse a shard whose npz holds other record ids than its manifest lists (in order)."""
    if ids == manifest.ids:
        return
    listed, held = set(manifest.ids), set(ids)
    unlisted, absent = [i for i in ids if i not in listed], [i for i in manifest.ids if i not in held]
    detail = (f"{len(unlisted)} id(s) of the npz not in the manifest (e.g. {unlisted[0]!r})" if unlisted else
              f"{len(absent)} id(s) of the manifest not in the npz (e.g. {absent[0]!r})" if absent else "the order differs")
    raise DsparkError(f"{npz} holds other records than its manifest lists ({detail}); the manifest was edited "
                      "or belongs to another shard: restore it, or remove both files")


def _check_unique(folder: Path, manifests: list[ShardManifest]) -> None:
    """Refuse a store where one npz (by sha1) or one prompt id is in two shards: it would train twice on it."""
    by_sha1: dict[str, str] = {}
    by_id: dict[str, str] = {}
    for m in manifests:
        if m.npz_sha1 in by_sha1:
            raise DsparkError(f"{folder}: {m.npz_name} is a copy of {by_sha1[m.npz_sha1]}; remove one of them (npz and json)")
        by_sha1[m.npz_sha1] = m.npz_name
        for i in m.ids:
            if i in by_id:
                raise DsparkError(f"{folder}: prompt id {i!r} is in both {by_id[i]} and {m.npz_name}; a store holds each "
                                  "prompt once")
            by_id[i] = m.npz_name


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
