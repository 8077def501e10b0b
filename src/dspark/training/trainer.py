"""Train a DSpark, DFlash or EAGLE-3 drafter against a frozen target, on 1 or N processes.

One code path for 1 and N processes: under ``torchrun`` each rank takes its rows of the same
global batch (see :mod:`dspark.training.batches`) and DDP averages gradients; the loss is
normalised by the *global* weight sum so N ranks reproduce one process exactly.

Checkpoints, resume and the best drafter so far: :mod:`dspark.training.checkpoints`; since
data order and anchors are functions of (seed, step), a resumed run loses and repeats
nothing. The loss of one step: :mod:`dspark.training.step`; held-out scoring, which picks
``out/best/``: :mod:`dspark.training.heldout`. A resumed run first scores the checkpoints a
kill left unscored, and one process at a time trains in ``out`` (its lock).

The three variants share everything but the model and the loss weights: the same data,
anchors, target features and p_t (:class:`~dspark.training.step.StepContext` calls
``model(features, input_ids, anchors)``, which for EAGLE-3 is the γ-step training-time test).

A reduced draft vocabulary (``draft_vocab_size``) is the most frequent training-target
tokens, with the stop tokens forced in; its LM head is the target head's rows, so the run
adds no weights for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dspark.drafters.dspark.model import DSparkModel
from dspark.drafters.eagle3.model import Eagle3Model
from dspark.drafters.vocab import top_tokens
from dspark.errors import DsparkError
from dspark.training import checkpoints
from dspark.training.batches import global_batch_indices, make_batch
from dspark.training.data.store import write_atomic
from dspark.training.heldout import heldout_tau
from dspark.training.step import StepContext
from dspark.training.config import TrainConfig


@dataclass(frozen=True)
class StepLog:
    """What one logged step reports."""

    step: int
    lr: float
    loss: float
    ce: float
    tv: float
    conf: float
    soft: float
    """EAGLE-3's soft cross-entropy to p_t (0 for dspark and dflash)."""
    slot_acceptance: list[float]
    prefix_survival: list[float]
    tau_estimate: float
    elapsed_s: float


def model_class(variant: str) -> type:
    """The trainable model of a variant: Eagle3Model for eagle3, else DSparkModel."""
    return Eagle3Model if variant == "eagle3" else DSparkModel


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
    heldout: Sequence = (),
) -> Path:
    """Train (or resume) and return the folder of the last checkpoint.

    ``features`` maps a Batch to BatchFeatures (default: the online target forward).
    ``stop_after`` ends this call after that many steps (tests use it to simulate a kill).
    ``heldout`` sequences (split by prompt, never the eval sets) score every checkpoint.
    """
    if not sequences:
        raise DsparkError("no training sequences")
    epochs = config.steps * config.batch_size / len(sequences)
    if epochs > config.max_epochs:
        raise DsparkError(
            f"{config.steps} steps × {config.batch_size} sequences is {epochs:.1f} epochs over "
            f"{len(sequences)} sequences, more than max_epochs = {config.max_epochs:g}; add data or take fewer steps"
        )
    rank, world = _world()
    if config.batch_size % world:
        raise DsparkError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
    with checkpoints.run_lock(config.out_dir, rank):
        return _train(config, target, sequences, features, stop_after, progress, heldout, rank, world)


def _train(config: TrainConfig, target, sequences: Sequence, features, stop_after: int | None, progress: bool,
           heldout: Sequence, rank: int, world: int) -> Path:
    """:func:`train` once the run folder is held."""
    from dspark.training.features import OnlineFeatures

    out = Path(config.out_dir)
    device = target.device
    drafter_config = config.drafter_config(target)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = model_class(config.variant)(drafter_config).to(device)
    model.attach_target(target)
    if drafter_config.reduced_vocab:
        model.set_draft_vocab(choose_draft_vocab(sequences, target, drafter_config.num_draft_tokens))
    if config.init_from_target:
        model.init_from_target(target)
    if config.init_from:
        checkpoints.warm_start(model, config.init_from)
    features = features or OnlineFeatures(target, drafter_config.target_layer_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    data_record = checkpoints.data_record(sequences, heldout)
    checkpoints.check_resume(out, config, data_record)  # before any state loads
    start_step = checkpoints.resume(out, model, optimizer, scheduler)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "train_config.json", config.to_json().encode("utf-8"))
        checkpoints.write_json(out / "train_data.json", data_record)
        checkpoints.trim_log(out / "train_log.jsonl", start_step)
        checkpoints.trim_log(out / checkpoints.HELDOUT_LOG, start_step)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_context = StepContext(target, features, drafter_config, config.loss_weights, model.draft_ids, device, world)
    if heldout and config.heldout_batches:
        _score_unscored(out, start_step, model, step_context, heldout, config, rank)
    end = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
    bar = tqdm(range(start_step, end), initial=start_step, total=config.steps, disable=not progress or rank != 0, desc=f"train {config.variant}")
    started = time.perf_counter()
    last_saved = None
    for step in bar:
        indices = global_batch_indices(step, config.batch_size, len(sequences), config.seed)[rank::world]
        batch = make_batch(sequences, indices, config.anchors_per_sequence, step, config.seed)
        terms = step_context.loss(ddp, batch)
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
            last_saved = checkpoints.save_checkpoint(out, done, model, optimizer, scheduler, rank)
            if heldout and config.heldout_batches:
                score = heldout_tau(model, step_context, heldout, config)
                if rank == 0:
                    checkpoints.keep_if_best(out, done, score, model)
                    bar.write(f"step {done}: held-out τ estimate {score.tau_estimate:.3f}")
    bar.close()
    return last_saved or out / (out / "latest").read_text().strip()


def _score_unscored(out: Path, start_step: int, model, step_context: StepContext, heldout: Sequence,
                    config: TrainConfig, rank: int) -> None:
    """Score every checkpoint a kill left unscored (saved, then killed before its held-out score),
    so ``best/`` considers it, then put the resumed weights back. The RNG is left as it was."""
    pending = checkpoints.unscored_checkpoints(out, start_step)
    if not pending:
        return
    rng = torch.get_rng_state()
    for step, folder in pending:
        if step != start_step:  # the resumed model already holds the latest checkpoint
            checkpoints.load_weights(model, folder)
        score = heldout_tau(model, step_context, heldout, config)
        if rank == 0:
            checkpoints.keep_if_best(out, step, score, model)
    if any(step != start_step for step, _ in pending):
        checkpoints.load_weights(model, out / f"step_{start_step:08d}")
    torch.set_rng_state(rng)


def choose_draft_vocab(sequences: Sequence, target, size: int) -> torch.Tensor:
    """The ``size`` most frequent loss-masked tokens of ``sequences``, stop tokens forced in # -> [N]."""
    counts = torch.zeros(target.vocab_size, dtype=torch.long)
    for seq in sequences:
        ids = torch.as_tensor(seq.input_ids, dtype=torch.long)
        mask = torch.as_tensor(seq.loss_mask, dtype=torch.bool)
        counts += torch.bincount(ids[mask], minlength=target.vocab_size)
    always = set(target.eos_token_ids)
    if getattr(target.tokenizer, "chat_template", None):
        from dspark.training.data.generate import stop_ids

        always |= stop_ids(target)
    return top_tokens(counts, size, always=always)


def _log_entry(step, scheduler, terms, world, started) -> StepLog:
    soft = terms.soft if terms.soft is not None else torch.zeros_like(terms.ce)
    values = torch.stack([terms.total.detach(), terms.ce, terms.tv, terms.conf, soft]).float()
    acceptance = terms.slot_acceptance.float()
    if world > 1:
        dist.all_reduce(values)  # rank-local sums of normalised terms = global terms
        dist.all_reduce(acceptance)
        acceptance = acceptance / world
    survival = acceptance.cumprod(0)
    total, ce, tv, conf, soft = values.tolist()  # host sync: once per log step
    return StepLog(
        step=step,
        lr=scheduler.get_last_lr()[0],
        loss=total,
        ce=ce,
        tv=tv,
        conf=conf,
        soft=soft,
        slot_acceptance=[round(x, 4) for x in acceptance.tolist()],
        prefix_survival=[round(x, 4) for x in survival.tolist()],
        tau_estimate=1.0 + float(survival.sum()),
        elapsed_s=time.perf_counter() - started,
    )


