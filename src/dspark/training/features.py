"""Target features for training: computed online (default) or read from a memory-mapped cache.

Online, the frozen target runs on each training batch inside the step, so no cache is
needed at any scale, and p_t comes from that forward's own logits. On a small CPU run,
where the target forward dominates the step, an optional fp16 disk cache trades disk for
time; its size is printed before it is written, and it is keyed by the target, the layers
and the data, so a cache made for another target or other data is never reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dspark.errors import DsparkError
from dspark.training.batches import Batch, make_batch


@dataclass(frozen=True)
class BatchFeatures:
    """Target-side tensors for one batch."""

    features: torch.Tensor
    """[B, S, m*d] concatenated hidden states of the feature layers."""
    last_hidden: torch.Tensor | None = None
    """[B, S, d] the target's final normed hidden state (p_t = softmax(lm_head(.)))."""
    logits: torch.Tensor | None = None
    """[B, S, V] the target's logits, when the forward that made the features gave them."""

    def target_logits(self, target) -> torch.Tensor:
        """[B, S, V] the target's logits: the forward's own, else its LM head over last_hidden."""
        if self.logits is not None:
            return self.logits
        head = target.model.get_output_embeddings()
        with torch.no_grad():
            return head(self.last_hidden.to(device=head.weight.device, dtype=head.weight.dtype))


class OnlineFeatures:
    """Run the frozen target on each batch.

    On a CPU the forward is compute-bound, so each row runs at its own length (padding would
    be paid in full); on an accelerator the padded batch runs in one call.
    """

    def __init__(self, target, layer_ids: Sequence[int], per_row: bool | None = None) -> None:
        self.target = target
        self.layer_ids = tuple(layer_ids)
        self.per_row = target.device.type == "cpu" if per_row is None else per_row

    def __call__(self, batch: Batch) -> BatchFeatures:
        device = self.target.device
        if not self.per_row:
            out = self.target.forward(
                batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                layer_ids=self.layer_ids,
                return_last_hidden=True,
            )
            return BatchFeatures(out.features, out.last_hidden, out.logits)
        lengths = batch.attention_mask.sum(-1).tolist()  # host values: the batch lives on the host
        rows = [
            self.target.forward(batch.input_ids[b : b + 1, :n].to(device), layer_ids=self.layer_ids, return_last_hidden=True)
            for b, n in enumerate(lengths)
        ]
        width = batch.input_ids.shape[1]
        return BatchFeatures(
            _pad_rows([r.features for r in rows], width),
            _pad_rows([r.last_hidden for r in rows], width),
            _pad_rows([r.logits for r in rows], width),
        )


def _pad_rows(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack [1, n_b, D] rows into [B, width, D], zeros past each row's length."""
    out = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    for b, row in enumerate(rows):
        out[b, : row.shape[1]] = row[0]
    return out


class CachedFeatures:
    """Features of every training sequence in one fp16 memmap, written once."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        self.offsets = meta["offsets"]
        self.width = meta["feature_width"]
        self.hidden = meta["hidden_size"]
        self.layer_ids = tuple(meta["layer_ids"])
        self.key = meta.get("key")
        rows = self.offsets[-1]
        self.data = np.memmap(folder / "features.f16", dtype=np.float16, mode="r", shape=(rows, self.width + self.hidden))

    @staticmethod
    def cache_key(sequences: Sequence, target, layer_ids: Sequence[int]) -> str:
        """sha1 of the target (config and LM-head bytes), the layers and every token of the data."""
        digest = hashlib.sha1()
        digest.update(json.dumps(target.model.config.to_dict(), sort_keys=True, default=str).encode())
        head = target.model.get_output_embeddings().weight
        digest.update(head[:: max(1, head.shape[0] // 64)].detach().float().cpu().numpy().tobytes())
        digest.update(json.dumps(list(layer_ids)).encode())
        for s in sequences:
            digest.update(np.asarray(s.input_ids, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    @staticmethod
    def estimate_bytes(sequences: Sequence, target, layer_ids: Sequence[int]) -> int:
        tokens = sum(len(s.input_ids) for s in sequences)
        return tokens * (len(layer_ids) + 1) * target.hidden_size * 2

    @classmethod
    def build(cls, folder: str | Path, sequences: Sequence, target, layer_ids: Sequence[int], batch_size: int = 4):
        """Write the cache (resuming is not needed: it is cheap to rebuild and atomic)."""
        folder = Path(folder)
        key = cls.cache_key(sequences, target, layer_ids)
        if (folder / "meta.json").is_file():
            cache = cls(folder)
            if cache.key == key:
                return cache
            print(f"dspark: {folder} holds features of another target or other data; rebuilding it", flush=True)
            (folder / "meta.json").unlink()
        folder.mkdir(parents=True, exist_ok=True)
        size = cls.estimate_bytes(sequences, target, layer_ids)
        print(f"dspark: writing a feature cache of {size / 2**30:.2f} GiB to {folder}", flush=True)
        offsets = [0]
        for s in sequences:
            offsets.append(offsets[-1] + len(s.input_ids))
        width = len(layer_ids) * target.hidden_size
        data = np.memmap(folder / "features.f16", dtype=np.float16, mode="w+", shape=(offsets[-1], width + target.hidden_size))
        online = OnlineFeatures(target, layer_ids)
        for start in tqdm(range(0, len(sequences), batch_size), desc="feature cache", unit="batch"):
            indices = range(start, min(start + batch_size, len(sequences)))
            out = online(make_batch(sequences, indices, anchors_per_sequence=0, step=0, seed=0))
            both = torch.cat([out.features, out.last_hidden], dim=-1).to(torch.float16).cpu().numpy()
            for b, i in enumerate(indices):
                data[offsets[i] : offsets[i + 1]] = both[b, : offsets[i + 1] - offsets[i]]
        data.flush()
        meta = {
            "key": key, "offsets": offsets, "feature_width": width,
            "hidden_size": target.hidden_size, "layer_ids": list(layer_ids),
        }
        (folder / "meta.json").write_text(json.dumps(meta))  # written last: marks the cache complete
        return cls(folder)

    @classmethod
    def shared(cls, folder: str | Path, sequences: Sequence, target, layer_ids: Sequence[int], rank: int,
               barrier: Callable[[], None]) -> "CachedFeatures":
        """The cache under torchrun: rank 0 writes it (or finds it written), every rank waits at
        ``barrier``, then the others open it; no two ranks ever write the memmap or meta.json."""
        if rank == 0:
            cls.build(folder, sequences, target, layer_ids)
        barrier()
        if not (Path(folder) / "meta.json").is_file():
            raise DsparkError(f"rank {rank}: rank 0 wrote no feature cache at {folder}")
        cache = cls(folder)
        if cache.key != cls.cache_key(sequences, target, layer_ids):
            raise DsparkError(f"rank {rank}: the feature cache at {folder} holds other data than this rank's")
        return cache

    def __call__(self, batch: Batch) -> BatchFeatures:
        rows, width = batch.input_ids.shape
        out = torch.zeros(rows, width, self.width + self.hidden, dtype=torch.float32)
        for b, index in enumerate(batch.indices):
            lo, hi = self.offsets[index], self.offsets[index + 1]
            out[b, : hi - lo] = torch.from_numpy(np.asarray(self.data[lo:hi], dtype=np.float32))
        return BatchFeatures(out[..., : self.width], out[..., self.width :])
