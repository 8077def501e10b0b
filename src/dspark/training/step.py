"""The target side of one training step: features, p_t per slot, labels, and the loss.

Shared by the training loop and by held-out scoring, so a checkpoint is scored with
exactly the loss it was trained on.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from dspark.drafters.dspark.config import DSparkConfig
from dspark.drafters.vocab import target_to_draft_index
from dspark.target.loading import cuda_half_dtype
from dspark.training.batches import Batch, block_targets, target_positions
from dspark.training.loss import LossTerms, LossWeights, dspark_loss, position_weights, slot_targets


class StepContext:
    """The target side of a training step: features, p_t per slot, labels, the loss."""

    def __init__(self, target, features, drafter_config: DSparkConfig, weights: LossWeights, draft_ids, device, world) -> None:
        self.target, self.features, self.config = target, features, drafter_config
        self.weights, self.device, self.world = weights, device, world
        self.draft_ids = None if draft_ids is None else draft_ids.to(device)
        self.autocast = (torch.autocast("cuda", dtype=cuda_half_dtype(device)) if device.type == "cuda"
                         else contextlib.nullcontext())

    def loss(self, model, batch: Batch, all_reduce: bool = True) -> LossTerms:
        gamma = self.config.block_size
        feats = self.features(batch)
        with torch.no_grad():
            target_pos = target_positions(batch, gamma).to(self.device)
            targets = slot_targets(feats.target_logits(self.target), target_pos, self.draft_ids)
        labels, valid, _ = block_targets(batch, gamma, targets.greedy.cpu())
        labels, valid = labels.to(self.device), valid.to(self.device)
        greedy = targets.greedy.gather(1, target_pos.view(target_pos.shape[0], -1)).view_as(target_pos)
        if self.draft_ids is not None:
            index = target_to_draft_index(self.draft_ids, self.config.vocab_size)  # [V], -1 outside
            labels, greedy = index[labels], index[greedy]
        world = self.world if all_reduce else 1
        denominator = global_denominator(valid, gamma, self.weights.gamma_w, world)
        with self.autocast:
            output = model(feats.features.to(self.device), batch.input_ids.to(self.device), batch.anchors.to(self.device))
        n_blocks = labels.shape[0] * labels.shape[1]
        conf = output.confidence_logits
        return dspark_loss(
            output.draft_logits.reshape(n_blocks, gamma, -1),
            targets.probs.reshape(n_blocks, gamma, -1),
            labels.reshape(n_blocks, -1),
            valid.reshape(n_blocks, -1),
            None if conf is None else conf.reshape(n_blocks, -1),
            self.weights,
            denominator=denominator,
            target_outside=None if targets.outside is None else targets.outside.reshape(n_blocks, -1),
            greedy_index=greedy.reshape(n_blocks, -1),
        )


def global_denominator(valid: torch.Tensor, gamma: int, gamma_w: float, world: int) -> torch.Tensor:
    """Σ of the position weights over valid slots of the *global* batch: every rank divides by it."""
    w = (position_weights(gamma, gamma_w, valid.device) * valid.float()).sum()
    if world > 1:
        dist.all_reduce(w)
    return w
