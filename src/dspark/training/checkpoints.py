"""Checkpoints of a training run: save, resume, refuse a mismatched resume, keep the best.

``out/step_XXXXXXXX/`` holds the drafter (config.json + model.safetensors, loadable as a
drafter) and ``training_state.pt`` (optimizer, scheduler, step, RNG: tensors and plain values
only, read back with ``weights_only=True``); the file ``out/latest`` names the newest complete
one. A resume is refused when the settings (``train_config.json``) or the data
(``train_data.json``: counts and a digest of the sequences) differ; how ``out`` is spelled
does not matter. Both files are written atomically, and a file that does not parse is
refused naming it. ``out/best/`` keeps the best drafter by held-out τ (with ``best.json``);
every score is in ``heldout_log.jsonl``, and a checkpoint a kill left unscored (saved, not
yet scored) is scored when the run resumes (:func:`unscored_checkpoints`), so ``best/`` never
misses one. One process at a time trains in ``out``: :func:`run_lock`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from dspark.drafters.dspark.model import DSparkModel
from dspark.errors import DsparkError
from dspark.training.config import TrainConfig
from dspark.training.data.store import lock_folder, write_atomic
from dspark.training.heldout import HeldoutScore

HELDOUT_LOG = "heldout_log.jsonl"
_HELD: set[Path] = set()
"""Run folders this process holds locked (:func:`run_lock` is re-entrant: the CLI holds the
lock before it loads the target, and :func:`~dspark.training.trainer.train` takes it again)."""


@contextmanager
def run_lock(out: str | Path, rank: int = 0) -> Iterator[None]:
    """Hold ``out`` for this training run: a second process training in it is refused at once.

    The lock is the shard stores' (:func:`~dspark.training.data.store.lock_folder`): ``flock``
    on ``out/.lock``, released when the run ends or its process dies. Only rank 0 of a
    distributed run takes it (the ranks share one folder). Creates ``out``.
    """
    out = Path(out)
    key = out.expanduser().resolve()
    if rank != 0 or key in _HELD:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = lock_folder(out, f"{out} is in use by another `dspark train` (it holds {out}/.lock); wait for it to "
                          "finish or use another --out")
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented json at ``path``, atomically: a kill leaves the old file or the new one, never a cut one."""
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def read_json(path: Path, remedy: str) -> Any:
    """The json at ``path``; a file that does not parse is one DsparkError naming it, then ``remedy``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DsparkError(f"{path} is not readable json ({exc}); {remedy}") from None


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
    saved = read_json(out / "train_config.json", f"{out} has a checkpoint, but its settings cannot be compared: "
                                                 "use another --out")
    if not isinstance(saved, dict):
        raise DsparkError(f"{out / 'train_config.json'} holds no settings (a json {type(saved).__name__}); use another --out")
    mine = json.loads(config.to_json())
    differ = [k for k in mine if k not in RESUMABLE_CHANGES and k in saved and saved[k] != mine[k]]
    if differ:
        shown = "; ".join(f"{k} {saved[k]!r} there, {mine[k]!r} now" for k in differ)
        raise DsparkError(f"{out} holds a run with different settings ({shown}); use another --out")
    if data_record is not None and (out / "train_data.json").is_file():
        remedy = "delete it to resume without comparing the data, or use another --out"
        if read_json(out / "train_data.json", remedy) != data_record:
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
    load_weights(model, folder)
    state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def load_weights(model, folder: Path) -> None:
    """Load the drafter weights of checkpoint ``folder`` into ``model``, on the model's device."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(next(model.parameters()).device)))


def read_log(path: Path) -> list[dict]:
    """The entries of a jsonl log with a ``step`` each; a line cut by a kill (or without a step) is skipped."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so a resumed log has no duplicates (rewritten atomically)."""
    if path.is_file():
        _write_log(path, [e for e in read_log(path) if e["step"] <= step])


def _write_log(path: Path, entries: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(e) + "\n" for e in entries).encode("utf-8"))


def unscored_checkpoints(out: Path, step: int) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint up to ``step`` that heldout_log.jsonl has no score for, oldest first.

    A kill between :func:`save_checkpoint` and the held-out score leaves one; unscored, it could
    never become ``best/``.
    """
    scored = {e["step"] for e in read_log(out / HELDOUT_LOG)}
    found = []
    for folder in out.glob("step_[0-9]*"):
        number = folder.name.removeprefix("step_")
        complete = (folder / "model.safetensors").is_file()  # save_checkpoint renames whole folders into place
        if number.isdigit() and int(number) <= step and int(number) not in scored and complete:
            found.append((int(number), folder))
    return sorted(found)


def keep_if_best(out: Path, step: int, score: HeldoutScore, model: DSparkModel) -> None:
    """Copy the drafter to best/ when its score is the best so far, then record the score in
    heldout_log.jsonl (by step).

    The log is written last: a kill before it leaves the checkpoint unscored, and the resumed
    run scores it again (:func:`unscored_checkpoints`). ``best/`` is replaced in three renames
    (old aside, new in, old removed); the next call finishes any a kill interrupted.
    """
    entry = {"step": step, **dataclasses.asdict(score)}
    _settle_best(out)
    best_file = out / "best" / "best.json"
    best = None
    if best_file.is_file():
        best = read_json(best_file, f"remove {out / 'best'} and resume to choose it again")
        if not isinstance(best, dict) or not isinstance(best.get("tau_estimate"), (int, float)):
            raise DsparkError(f"{best_file} has no tau_estimate; remove {out / 'best'} and resume to choose it again")
    if best is None or score.tau_estimate > best["tau_estimate"]:
        staging, old = out / ".tmp_best", out / ".old_best"
        model.save_pretrained(staging)
        write_json(staging / "best.json", entry)  # written last: a staging folder with best.json is whole
        if (out / "best").exists():
            (out / "best").rename(old)
        staging.rename(out / "best")
        shutil.rmtree(old, ignore_errors=True)
    log = out / HELDOUT_LOG
    _write_log(log, sorted([e for e in read_log(log) if e["step"] != step] + [entry], key=lambda e: e["step"]))


def _settle_best(out: Path) -> None:
    """Finish a replacement of ``best/`` that a kill interrupted.

    A whole staging copy (best.json is written last) was made only because it beat ``best/``,
    so it takes ``best/``'s place; without one, a ``best/`` set aside comes back. Leftovers go.
    """
    best, staging, old = out / "best", out / ".tmp_best", out / ".old_best"
    if (staging / "best.json").is_file():
        if best.exists():
            shutil.rmtree(old, ignore_errors=True)
            best.rename(old)
        staging.rename(best)
    elif not best.exists() and (old / "best.json").is_file():
        old.rename(best)
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)


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
