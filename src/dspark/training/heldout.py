"""Held-out scoring: every checkpoint's τ estimate on a split by prompt (never the eval sets).

The same fixed batches (same anchors) score every checkpoint, so scores compare across
steps and runs; the best checkpoint is chosen by them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from dspark.drafters.dspark.model import DSparkModel
from dspark.training.batches import global_batch_indices, make_batch
from dspark.training.config import TrainConfig
from dspark.training.step import StepContext


@dataclass(frozen=True)
class HeldoutScore:
    """A checkpoint's score on the held-out split."""

    tau_estimate: float
    """1 + Σ_k Π_{i≤k} a_i from the soft acceptance a_i on held-out blocks (T = 1)."""
    slot_acceptance: list[float]
    """[γ] mean soft acceptance per slot."""
    tau_greedy: float
    """1 + Σ_k (fraction of blocks whose slots 1..k match the target's argmax): τ at T = 0,
    exact on greedily regenerated text, a proxy on text the target did not write."""
    greedy_survival: list[float]
    """[γ] T = 0 prefix survival per slot."""


@torch.no_grad()
def heldout_tau(model: DSparkModel, context: StepContext, heldout: Sequence, config: TrainConfig) -> HeldoutScore:
    """Soft-acceptance τ estimate of ``model`` on fixed held-out batches (same anchors every time)."""
    was_training = model.training
    model.eval()
    sums = greedy_sums = counts = 0.0
    for i in range(config.heldout_batches):
        indices = global_batch_indices(i, config.batch_size, len(heldout), config.seed)
        batch = make_batch(heldout, indices, config.anchors_per_sequence, step=i, seed=config.seed + 1)
        terms = context.loss(model, batch, all_reduce=False)
        sums = sums + terms.slot_acceptance * terms.slot_counts
        greedy_sums = greedy_sums + terms.greedy_survival * terms.slot_counts
        counts = counts + terms.slot_counts
    model.train(was_training)
    acceptance = (sums / counts.clamp_min(1.0)).tolist()  # host sync: once per checkpoint
    survival = (greedy_sums / counts.clamp_min(1.0)).tolist()
    tau = 1.0 + sum(math.prod(acceptance[: k + 1]) for k in range(len(acceptance)))
    return HeldoutScore(
        tau_estimate=tau, slot_acceptance=[round(a, 4) for a in acceptance],
        tau_greedy=1.0 + sum(survival), greedy_survival=[round(a, 4) for a in survival],
    )
