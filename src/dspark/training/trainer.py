"""Train a DSpark (or DFlash) drafter against a frozen target, on 1 or N processes.

One code path for 1 and N processes: under ``torchrun`` each rank takes its rows of the same
global batch (see :mod:`dspark.training.batches`) and DDP averages gradients; the loss is
normalised by the *global* weight sum so N ranks reproduce one process exactly.

Checkpoints: ``out/step_XXXXXXXX/`` holds the drafter (config.json + model.safetensors,
loadable as a drafter) and ``training_state.pt`` (optimizer, scheduler, step, RNG); the file
``out/latest`` names the newest complete one. Restarting with the same ``out`` resumes from
it: since data order and anchors are functions of (seed, step), nothing is lost or repeated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dspark.drafters.dspark.config import DSparkConfig
from dspark.drafters.dspark.model import DSparkModel
from dspark.errors import DsparkError
from dspark.training.batches import block_targets, global_batch_indices, make_batch
from dspark.training.loss import DFLASH_WEIGHTS, LossWeights, dspark_loss


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (saved as train_config.json)."""

    out_dir: str
    """Checkpoints, logs and the final drafter go here."""
    variant: str = "dspark"
    """"dspark" (Markov + confidence heads, CE+TV+BCE) or "dflash" (heads off, CE only)."""
    num_layers: int = 2
    """Draft transformer layers."""
    block_size: int = 7
    """γ."""
    markov_rank: int = 32
    """r of the Markov head (dspark only)."""
    markov_head_type: str = "vanilla"
    """"vanilla" or "rnn" (dspark only)."""
    target_layer_ids: tuple[int, ...] = ()
    """Feature layers; empty = 5 spread over the target's depth."""
    init_from_target: bool = True
    """Warm-start the draft layers from the target's top layers (DSparkModel.init_from_target)."""
    steps: int = 1000
    """Optimizer steps in total."""
    batch_size: int = 4
    """Sequences per step across all ranks (the global batch)."""
    anchors_per_sequence: int = 16
    """N: blocks sampled per sequence."""
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    loss_ce: float = 0.1
    loss_tv: float = 0.9
    loss_conf: float = 1.0
    gamma_w: float = 7.0
    """Position decay γ_w of w_k = exp(-(k-1)/γ_w)."""
    save_every: int = 200
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in ("dspark", "dflash"):
            raise ValueError(f"variant must be dspark or dflash, got {self.variant!r}")
        for name in ("steps", "batch_size", "anchors_per_sequence", "num_layers", "block_size", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")

    @property
    def loss_weights(self) -> LossWeights:
        if self.variant == "dflash":
            return dataclasses.replace(DFLASH_WEIGHTS, gamma_w=self.gamma_w)
        return LossWeights(ce=self.loss_ce, tv=self.loss_tv, conf=self.loss_conf, gamma_w=self.gamma_w)

    def drafter_config(self, target) -> DSparkConfig:
        overrides = dict(num_hidden_layers=self.num_layers, block_size=self.block_size)
        if self.target_layer_ids:
            overrides["target_layer_ids"] = tuple(self.target_layer_ids)
        if self.variant == "dflash":
            overrides.update(markov_rank=0, enable_confidence_head=False)
        else:
            overrides.update(markov_rank=self.markov_rank, markov_head_type=self.markov_head_type)
        return DSparkConfig.for_target(target, **overrides)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


@dataclass(frozen=True)
class StepLog:
    """What one logged step reports."""

    step: int
    lr: float
    loss: float
    ce: float
    tv: float
    conf: float
    slot_acceptance: list[float]
    prefix_survival: list[float]
    tau_estimate: float
    elapsed_s: float


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    warmup = max(1, int(config.warmup_ratio * config.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    config: TrainConfig,
    target,
    sequences: Sequence,
    features=None,
    stop_after: int | None = None,
    progress: bool = True,
) -> Path:
    """Train (or resume) and return the folder of the last checkpoint.

    ``features`` maps a Batch to BatchFeatures (default: the online target forward).
    ``stop_after`` ends this call after that many steps (tests use it to simulate a kill).
    """
    from dspark.training.features import OnlineFeatures

    if not sequences:
        raise DsparkError("no training sequences")
    rank, world = _world()
    if config.batch_size % world:
        raise DsparkError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
    out = Path(config.out_dir)
    device = target.device
    drafter_config = config.drafter_config(target)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = DSparkModel(drafter_config).to(device)
    model.attach_target(target)
    if config.init_from_target:
        model.init_from_target(target)
    features = features or OnlineFeatures(target, drafter_config.target_layer_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    start_step = _resume(out, config, model, optimizer, scheduler)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(config.to_json())
        _trim_log(out / "train_log.jsonl", start_step)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    weights = config.loss_weights
    end = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
    bar = tqdm(range(start_step, end), initial=start_step, total=config.steps, disable=not progress or rank != 0, desc=f"train {config.variant}")
    started = time.perf_counter()
    last_saved = None
    for step in bar:
        indices = global_batch_indices(step, config.batch_size, len(sequences), config.seed)[rank::world]
        batch = make_batch(sequences, indices, config.anchors_per_sequence, step, config.seed)
        feats = features(batch)
        labels, valid, target_pos = block_targets(batch, drafter_config.block_size)
        labels, valid, target_pos = labels.to(device), valid.to(device), target_pos.to(device)
        with torch.no_grad():
            hidden = feats.last_hidden.to(device)
            flat = target_pos.view(hidden.shape[0], -1)
            picked = hidden.gather(1, flat.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            target_logits = model.lm_head(picked.to(model.lm_head.weight.dtype)).view(*labels.shape, -1)
        denominator = _global_denominator(valid, drafter_config.block_size, weights.gamma_w, world)
        with autocast:
            output = ddp(feats.features.to(device), batch.input_ids.to(device), batch.anchors.to(device))
        n_blocks = labels.shape[0] * labels.shape[1]
        conf = output.confidence_logits
        terms = dspark_loss(
            output.draft_logits.reshape(n_blocks, drafter_config.block_size, -1),
            target_logits.reshape(n_blocks, drafter_config.block_size, -1),
            labels.reshape(n_blocks, -1),
            valid.reshape(n_blocks, -1),
            None if conf is None else conf.reshape(n_blocks, -1),
            weights,
            denominator=denominator,
        )
        optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; scale so the sum matches one process.
        (terms.total * world).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        done = step + 1
        if done % config.log_every == 0 or done == end:
            log = _log_entry(done, scheduler, terms, world, started)  # collective: every rank
            if rank == 0:
                with open(out / "train_log.jsonl", "a") as fh:
                    fh.write(json.dumps(dataclasses.asdict(log)) + "\n")
                bar.set_postfix(loss=f"{log.loss:.3f}", tau=f"{log.tau_estimate:.2f}")
        if done % config.save_every == 0 or done == config.steps:
            last_saved = _save(out, done, model, optimizer, scheduler, rank)
    bar.close()
    return last_saved or out / (out / "latest").read_text().strip()


def _global_denominator(valid: torch.Tensor, gamma: int, gamma_w: float, world: int) -> torch.Tensor:
    from dspark.training.loss import position_weights

    w = (position_weights(gamma, gamma_w, valid.device) * valid.float()).sum()
    if world > 1:
        dist.all_reduce(w)
    return w


def _log_entry(step, scheduler, terms, world, started) -> StepLog:
    values = torch.stack([terms.total.detach(), terms.ce, terms.tv, terms.conf]).float()
    acceptance = terms.slot_acceptance.float()
    if world > 1:
        dist.all_reduce(values)  # rank-local sums of normalised terms = global terms
        dist.all_reduce(acceptance)
        acceptance = acceptance / world
    survival = acceptance.cumprod(0)
    total, ce, tv, conf = values.tolist()  # host sync: once per log step
    return StepLog(
        step=step,
        lr=scheduler.get_last_lr()[0],
        loss=total,
        ce=ce,
        tv=tv,
        conf=conf,
        slot_acceptance=[round(x, 4) for x in acceptance.tolist()],
        prefix_survival=[round(x, 4) for x in survival.tolist()],
        tau_estimate=1.0 + float(survival.sum()),
        elapsed_s=time.perf_counter() - started,
    )


def _save(out: Path, step: int, model, optimizer, scheduler, rank: int) -> Path:
    folder = out / f"step_{step:08d}"
    if rank == 0:
        staging = out / f".tmp_step_{step:08d}"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
            staging / "training_state.pt",
        )
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        pointer = out / ".latest.tmp"
        pointer.write_text(folder.name + "\n")
        os.replace(pointer, out / "latest")  # the pointer moves only once the folder is whole
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return folder


def _resume(out: Path, config: TrainConfig, model, optimizer, scheduler) -> int:
    pointer = out / "latest"
    if not pointer.is_file():
        return 0
    saved = json.loads((out / "train_config.json").read_text())
    mine = json.loads(config.to_json())
    differ = [k for k in mine if k not in ("steps", "save_every", "log_every") and saved.get(k) != mine[k]]
    if differ:
        raise DsparkError(f"{out} holds a run with different settings ({', '.join(differ)}); use another --out")
    folder = out / pointer.read_text().strip()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(next(model.parameters()).device)))
    state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so a resumed log has no duplicates."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by a kill
    path.write_text("".join(k + "\n" for k in keep))
