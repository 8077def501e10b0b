"""Checkpoints of a training run: save, resume, refuse a mismatched resume, keep the best.

``out/step_XXXXXXXX/`` holds the drafter (config.json + model.safetensors, loadable as a
drafter) and ``training_state.pt`` (optimizer, scheduler, step, RNG: tensors and plain values
only, read back with ``weights_only=True``); the file ``out/latest`` names the newest complete
one. A resume is refused when the settings (``train_config.json``) or the data
(``train_data.json``: counts and a digest of the sequences) differ; how ``out`` is spelled
does not matter. ``out/best/`` keeps the best drafter by held-out τ (with ``best.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from dspark.drafters.dspark.model import DSparkModel
from dspark.errors import DsparkError
from dspark.training.config import TrainConfig
from dspark.training.heldout import HeldoutScore


def data_record(sequences: Sequence, heldout: Sequence) -> dict:
    """Counts and a digest of the training and held-out sequences (ids and lengths, in order)."""
    import hashlib

    def digest(rows: Sequence) -> str:
        h = hashlib.sha1()
        for s in rows:
            h.update(f"{s.id}:{len(s.input_ids)}:{sum(s.loss_mask)}|".encode())
        return h.hexdigest()

    return {
        "sequences": len(sequences),
        "tokens": sum(len(s.input_ids) for s in sequences),
        "loss_tokens": sum(sum(s.loss_mask) for s in sequences),
        "digest": digest(sequences),
        "heldout_sequences": len(heldout),
        "heldout_digest": digest(heldout),
    }


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, rank: int) -> Path:
    """Write ``out/step_XXXXXXXX/`` whole (staged, then renamed) and only then move ``latest``."""
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


def resume(out: Path, model, optimizer, scheduler) -> int:
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


def trim_log(path: Path, step: int) -> None:
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


def keep_if_best(out: Path, step: int, score: HeldoutScore, model: DSparkModel) -> None:
    """Append the score to heldout_log.jsonl and copy the drafter to best/ when it is the best."""
    entry = {"step": step, **dataclasses.asdict(score)}
    trim_log(out / "heldout_log.jsonl", step - 1)
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


@torch.no_grad()
def warm_start(model, folder: str | Path) -> None:
    """Copy a trained drafter's weights into ``model`` where names and shapes fit.

    The Markov head's rows follow the tokens, whatever the two vocabularies: W2 gets the rows
    of ``model``'s draft tokens (zero for a token the source could not draft), and W1 the
    row of each previous token, between the V-row and the (N + 1)-row layouts (a new
    out-of-vocabulary row is the mean of the rows of the tokens it stands for). d2t/t2d are
    never copied (the run chose its own vocabulary).
    """
    source = type(model).from_pretrained(folder)  # a drafter of the same kind (DSpark/DFlash or EAGLE-3)
    if source.config.vocab_size != model.config.vocab_size:
        raise DsparkError(f"cannot warm-start from {folder}: it was built for another vocabulary")
    theirs = source.state_dict()
    own = model.state_dict()
    w1, w2 = "markov_head.markov_w1.weight", "markov_head.markov_w2.weight"
    if w2 in theirs and w2 in own and theirs[w2].shape[1] == own[w2].shape[1]:
        theirs[w2] = _draft_rows_by_token(source, theirs[w2], model)
        theirs[w1] = _w1_rows_by_token(source, theirs[w1], model)
    merged = {
        k: theirs[k].to(v.dtype) if k in theirs and theirs[k].shape == v.shape and k not in ("d2t", "t2d") else v
        for k, v in own.items()
    }
    model.load_state_dict(merged)


def _ids(model) -> torch.Tensor:
    """Target id of each draft index of ``model`` # [N] (every id for the full vocabulary)."""
    return model.draft_ids.cpu() if model.draft_ids is not None else torch.arange(model.config.vocab_size)


def _draft_rows_by_token(source, rows: torch.Tensor, model) -> torch.Tensor:
    """W2 rows # [N_src, r] of ``source``'s draft tokens -> of ``model``'s # [N, r], zero where missing."""
    by_token = torch.zeros(model.config.vocab_size, rows.shape[1])  # [V, r]
    by_token[_ids(source)] = rows.float()
    return by_token[_ids(model)]


def _w1_rows_by_token(source, rows: torch.Tensor, model) -> torch.Tensor:
    """W1 of ``source`` # [V or N_src + 1, r] -> in ``model``'s layout, row for row by previous token."""
    vocab = torch.arange(model.config.vocab_size)
    by_token = rows.float()[source.markov_rows(vocab)]  # [V, r]
    if model.config.markov_w1_vocab == "target":
        return by_token
    ids = _ids(model)
    outside = ~model.t2d.cpu()
    return torch.cat([by_token[ids], by_token[outside].mean(0, keepdim=True)])
