"""Target features for training: computed online (default) or read from a memory-mapped cache.

Online, the frozen target runs on each training batch inside the step, so no cache is
needed at any scale. On a small CPU run, where the target forward dominates the step, an
optional fp16 disk cache trades disk for time; its size is printed before it is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dspark.training.batches import Batch, make_batch


@dataclass(frozen=True)
class BatchFeatures:
    """Target-side tensors for one batch."""

    features: torch.Tensor
    """[B, S, m*d] concatenated hidden states of the feature layers."""
    last_hidden: torch.Tensor
    """[B, S, d] the target's final normed hidden state (p_t = softmax(lm_head(.)))."""


class OnlineFeatures:
    """Run the frozen target on each batch."""

    def __init__(self, target, layer_ids: Sequence[int]) -> None:
        self.target = target
        self.layer_ids = tuple(layer_ids)

    def __call__(self, batch: Batch) -> BatchFeatures:
        device = self.target.device
        out = self.target.forward(
            batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            layer_ids=self.layer_ids,
            return_last_hidden=True,
        )
        return BatchFeatures(out.features, out.last_hidden)


class CachedFeatures:
    """Features of every training sequence in one fp16 memmap, written once."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        self.offsets = meta["offsets"]
        self.width = meta["feature_width"]
        self.hidden = meta["hidden_size"]
        self.layer_ids = tuple(meta["layer_ids"])
        rows = self.offsets[-1]
        self.data = np.memmap(folder / "features.f16", dtype=np.float16, mode="r", shape=(rows, self.width + self.hidden))

    @staticmethod
    def estimate_bytes(sequences: Sequence, target, layer_ids: Sequence[int]) -> int:
        tokens = sum(len(s.input_ids) for s in sequences)
        return tokens * (len(layer_ids) + 1) * target.hidden_size * 2

    @classmethod
    def build(cls, folder: str | Path, sequences: Sequence, target, layer_ids: Sequence[int], batch_size: int = 4):
        """Write the cache (resuming is not needed: it is cheap to rebuild and atomic)."""
        folder = Path(folder)
        if (folder / "meta.json").is_file():
            cache = cls(folder)
            if cache.layer_ids == tuple(layer_ids) and cache.offsets[-1] == sum(len(s.input_ids) for s in sequences):
                return cache
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
        meta = {"offsets": offsets, "feature_width": width, "hidden_size": target.hidden_size, "layer_ids": list(layer_ids)}
        (folder / "meta.json").write_text(json.dumps(meta))  # written last: marks the cache complete
        return cls(folder)

    def __call__(self, batch: Batch) -> BatchFeatures:
        rows, width = batch.input_ids.shape
        out = torch.zeros(rows, width, self.width + self.hidden, dtype=torch.float32)
        for b, index in enumerate(batch.indices):
            lo, hi = self.offsets[index], self.offsets[index + 1]
            out[b, : hi - lo] = torch.from_numpy(np.asarray(self.data[lo:hi], dtype=np.float32))
        return BatchFeatures(out[..., : self.width], out[..., self.width :])
