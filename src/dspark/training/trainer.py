"""Train a DSpark (or DFlash) drafter against a frozen target, on 1 or N processes.

One code path for 1 and N processes: under ``torchrun`` each rank takes its rows of the same
global batch (see :mod:`dspark.training.batches`) and DDP averages gradients; the loss is
normalised by the *global* weight sum so N ranks reproduce one process exactly.

Checkpoints: ``out/step_XXXXXXXX/`` holds the drafter (config.json + model.safetensors,
loadable as a drafter) and ``training_state.pt`` (optimizer, scheduler, step, RNG: tensors and
plain values only, read back with ``weights_only=True``); the file ``out/latest`` names the
newest complete one. Restarting with the same ``out`` resumes from it: since data order and
anchors are functions of (seed, step), nothing is lost or repeated. A resume is refused when
the settings (``train_config.json``) or the data (``train_data.json``: counts and a digest of
the sequences) differ; how ``out`` is spelled does not matter.
Given held-out sequences, every checkpoint is scored by its held-out τ estimate and the best
drafter so far is kept in ``out/best/`` (drafter only, with ``best.json``).

A reduced draft vocabulary (``draft_vocab_size``) is the most frequent training-target
tokens, with the stop tokens forced in; its LM head is the target head's rows, so the run
adds no weights for it.
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
from dspark.drafters.dspark.vocab import target_to_draft_index, top_tokens
from dspark.training.batches import Batch, block_targets, global_batch_indices, make_batch, target_positions
from dspark.training.loss import DFLASH_WEIGHTS, LossTerms, LossWeights, dspark_loss, slot_targets


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
    anchors_per_sequence: int = 64
    """N: blocks sampled per sequence; all share one context pass, so dense anchors are cheap."""
    draft_vocab_size: int = 0
    """Tokens the drafter predicts over (the most frequent training targets); 0 = all."""
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    loss_ce: float = 0.1
    loss_tv: float = 0.9
    loss_conf: float = 1.0
    gamma_w: float = 4.0
    """Position decay γ_w of w_k = exp(-(k-1)/γ_w); 4 as in every DeepSpec config."""
    max_epochs: float = 3.0
    """Refuse runs that would pass over the data more often than this (they memorise)."""
    init_from: str = ""
    """A drafter folder to warm-start from (weights whose names and shapes fit); "" = none."""
    heldout_batches: int = 4
    """Held-out batches scored at each checkpoint (the best τ estimate is kept in best/)."""
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    max_length: int = 1024
    """Training sequences were cut to this many tokens (the loader's; recorded so a resume checks it)."""

    def __post_init__(self) -> None:
        if self.variant not in ("dspark", "dflash"):
            raise ValueError(f"variant must be dspark or dflash, got {self.variant!r}")
        for name in ("steps", "batch_size", "anchors_per_sequence", "num_layers", "block_size", "save_every", "log_every",
                     "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.draft_vocab_size < 0 or self.max_epochs <= 0 or self.heldout_batches < 0:
            raise ValueError("draft_vocab_size and heldout_batches must be >= 0, max_epochs > 0")

    @property
    def loss_weights(self) -> LossWeights:
        if self.variant == "dflash":
            return dataclasses.replace(DFLASH_WEIGHTS, gamma_w=self.gamma_w)
        return LossWeights(ce=self.loss_ce, tv=self.loss_tv, conf=self.loss_conf, gamma_w=self.gamma_w)

    def drafter_config(self, target) -> DSparkConfig:
        overrides = dict(num_hidden_layers=self.num_layers, block_size=self.block_size)
        if self.draft_vocab_size and self.draft_vocab_size < target.vocab_size:
            overrides["draft_vocab_size"] = self.draft_vocab_size
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
    heldout: Sequence = (),
) -> Path:
    """Train (or resume) and return the folder of the last checkpoint.

    ``features`` maps a Batch to BatchFeatures (default: the online target forward).
    ``stop_after`` ends this call after that many steps (tests use it to simulate a kill).
    ``heldout`` sequences (split by prompt, never the eval sets) score every checkpoint.
    """
    from dspark.training.features import OnlineFeatures

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
    out = Path(config.out_dir)
    device = target.device
    drafter_config = config.drafter_config(target)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = DSparkModel(drafter_config).to(device)
    model.attach_target(target)
    if drafter_config.reduced_vocab:
        model.set_draft_vocab(choose_draft_vocab(sequences, target, drafter_config.num_draft_tokens))
    if config.init_from_target:
        model.init_from_target(target)
    if config.init_from:
        warm_start(model, config.init_from)
    features = features or OnlineFeatures(target, drafter_config.target_layer_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    data_record = _data_record(sequences, heldout)
    check_resume(out, config, data_record)  # before any state loads
    start_step = _resume(out, model, optimizer, scheduler)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(config.to_json())
        (out / "train_data.json").write_text(json.dumps(data_record, indent=2) + "\n")
        _trim_log(out / "train_log.jsonl", start_step)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_context = _StepContext(target, features, drafter_config, config.loss_weights, model.draft_ids, device, world)
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
            last_saved = _save(out, done, model, optimizer, scheduler, rank)
            if heldout and config.heldout_batches:
                score = heldout_tau(model, step_context, heldout, config)
                if rank == 0:
                    _keep_if_best(out, done, score, model)
                    bar.write(f"step {done}: held-out τ estimate {score.tau_estimate:.3f}")
    bar.close()
    return last_saved or out / (out / "latest").read_text().strip()


def _data_record(sequences: Sequence, heldout: Sequence) -> dict:
    """Counts and a digest of the training and held-out sequences (ids and lengths, in order)."""
    import hashlib

    def digest(rows: Sequence) -> str:
        h = hashlib.sha1()
        for s in rows:
            h.update(f"{getattr(s, 'id', '')}:{len(s.input_ids)}:{sum(s.loss_mask)}|".encode())
        return h.hexdigest()

    return {
        "sequences": len(sequences),
        "tokens": sum(len(s.input_ids) for s in sequences),
        "loss_tokens": sum(sum(s.loss_mask) for s in sequences),
        "digest": digest(sequences),
        "heldout_sequences": len(heldout),
        "heldout_digest": digest(heldout),
    }


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


class _StepContext:
    """The target side of a training step: features, p_t per slot, labels, the loss."""

    def __init__(self, target, features, drafter_config: DSparkConfig, weights: LossWeights, draft_ids, device, world) -> None:
        self.target, self.features, self.config = target, features, drafter_config
        self.weights, self.device, self.world = weights, device, world
        self.draft_ids = None if draft_ids is None else draft_ids.to(device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

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
        denominator = _global_denominator(valid, gamma, self.weights.gamma_w, world)
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


@torch.no_grad()
def heldout_tau(model: DSparkModel, context: _StepContext, heldout: Sequence, config: TrainConfig) -> HeldoutScore:
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


def _keep_if_best(out: Path, step: int, score: HeldoutScore, model: DSparkModel) -> None:
    """Append the score to heldout_log.jsonl and copy the drafter to best/ when it is the best."""
    entry = {"step": step, **dataclasses.asdict(score)}
    _trim_log(out / "heldout_log.jsonl", step - 1)
    with open(out / "heldout_log.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    best_file = out / "best" / "best.json"
    if best_file.is_file() and json.loads(best_file.read_text())["tau_estimate"] >= score.tau_estimate:
        return
    staging = out / ".tmp_best"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    (staging / "best.json").write_text(json.dumps(entry, indent=2) + "\n")
    shutil.rmtree(out / "best", ignore_errors=True)
    staging.rename(out / "best")


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


@torch.no_grad()
def warm_start(model: DSparkModel, folder: str | Path) -> None:
    """Copy a trained drafter's weights into ``model`` where names and shapes fit.

    The Markov head's W2 rows follow the tokens: a full-vocabulary source gives the rows of
    ``model``'s draft tokens. d2t/t2d are never copied (the run chose its own vocabulary).
    """
    source = DSparkModel.from_pretrained(folder)
    if source.config.vocab_size != model.config.vocab_size:
        raise DsparkError(f"cannot warm-start from {folder}: it was built for another vocabulary")
    theirs = source.state_dict()
    own = model.state_dict()
    key = "markov_head.markov_w2.weight"
    if key in theirs and key in own and theirs[key].shape != own[key].shape:
        rows = torch.zeros(model.config.vocab_size, theirs[key].shape[1])  # [V, r] by target id
        src_ids = source.draft_ids if source.draft_ids is not None else torch.arange(source.config.vocab_size)
        rows[src_ids] = theirs[key].float()
        mine = model.draft_ids if model.draft_ids is not None else torch.arange(model.config.vocab_size)
        theirs[key] = rows[mine.cpu()]
    merged = {
        k: theirs[k].to(v.dtype) if k in theirs and theirs[k].shape == v.shape and k not in ("d2t", "t2d") else v
        for k, v in own.items()
    }
    model.load_state_dict(merged)


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


RESUMABLE_CHANGES = ("out_dir", "steps", "save_every", "log_every", "heldout_batches", "max_epochs")
"""TrainConfig fields a resumed run may change: where it is (however spelled), how long it runs, how often it reports."""


def check_resume(out: str | Path, config: TrainConfig, data_record: dict | None = None) -> None:
    """Refuse to resume the run in ``out`` with other settings, or (given ``data_record``) other data.

    Fields an older run did not record are not compared; the CLI calls this before loading the target.
    """
    out = Path(out)
    if not (out / "latest").is_file():
        return
    try:
        saved = json.loads((out / "train_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DsparkError(f"{out} has a checkpoint but no readable train_config.json ({exc}); use another --out") from None
    mine = json.loads(config.to_json())
    differ = [k for k in mine if k not in RESUMABLE_CHANGES and k in saved and saved[k] != mine[k]]
    if differ:
        shown = "; ".join(f"{k} {saved[k]!r} there, {mine[k]!r} now" for k in differ)
        raise DsparkError(f"{out} holds a run with different settings ({shown}); use another --out")
    if data_record is not None and (out / "train_data.json").is_file():
        if json.loads((out / "train_data.json").read_text()) != data_record:
            raise DsparkError(
                f"{out} was trained on other data (the sequences differ); to train further on more "
                "data, start a new --out with --init-from that run's best/"
            )


def _resume(out: Path, model, optimizer, scheduler) -> int:
    """Load the newest checkpoint of ``out`` (``check_resume`` has passed); 0 when there is none."""
    pointer = out / "latest"
    if not pointer.is_file():
        return 0
    folder = out / pointer.read_text().strip()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(next(model.parameters()).device)))
    state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
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
