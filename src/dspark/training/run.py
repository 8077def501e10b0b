"""One training run, as ``dspark train`` runs it once its settings passed their checks.

:func:`train_and_export` holds the lock of the run folder, starts the process group under
``torchrun`` (:func:`start_distributed`), loads the target and the data (split into train /
held-out by prompt id), trains, and writes the best (else the last) drafter as fp16 where
asked. The command line (:mod:`dspark.cli.train`) checks the flags, the data and a resume
before the target loads, then calls it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from dspark.training.config import TrainConfig


def train_and_export(config: TrainConfig, data: Sequence[Path], model: str | None, heldout_fraction: float,
                     data_fraction: float, feature_cache: Path | None = None, export: Path | None = None,
                     device_choice: str = "auto", dtype_name: str = "auto") -> Path:
    """Load the target and the data, train, export; returns the folder of the last checkpoint.

    Runs on one process, or on ``WORLD_SIZE`` under torchrun. The lock of ``config.out_dir``
    (one run per folder) is held through training and the export.
    """
    import torch

    from dspark.target import TargetModel
    from dspark.target.loading import parse_dtype
    from dspark.training.checkpoints import check_resume, data_record, run_lock
    from dspark.training.data.sequences import load_training_data
    from dspark.training.trainer import model_class, train

    out = Path(config.out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with run_lock(out, rank=int(os.environ.get("RANK", "0"))):
        device = start_distributed(world, os.environ, device_choice)
        try:
            target = TargetModel.load(model, device=device, dtype=parse_dtype(dtype_name, device))
            split = load_training_data(data, target.tokenizer, config.max_length, heldout_fraction, data_fraction)
            check_resume(out, config, data_record(split.train, split.heldout))  # other data: refused before the report
            tokens = sum(len(s.input_ids) for s in split.train)
            print(f"dspark: {len(split.train)} training sequences ({tokens} tokens), {len(split.heldout)} held out",
                  file=sys.stderr)
            features = None
            if feature_cache is not None:
                from dspark.training.features import CachedFeatures

                layer_ids_used = config.drafter_config(target).target_layer_ids
                if world > 1:  # rank 0 writes it; the others open it after the barrier
                    features = CachedFeatures.shared(feature_cache, split.train, target, layer_ids_used,
                                                     torch.distributed.get_rank(), torch.distributed.barrier)
                else:
                    features = CachedFeatures.build(feature_cache, split.train, target, layer_ids_used)
            last = train(config, target, split.train, features=features, heldout=split.heldout)
            if export is not None and (world == 1 or torch.distributed.get_rank() == 0):
                chosen = out / "best" if (out / "best" / "model.safetensors").is_file() else last
                model_class(config.variant).from_pretrained(chosen).save_pretrained(export, dtype=torch.float16)
                print(f"dspark: exported {chosen} to {export} (fp16)", file=sys.stderr)
            return last
        finally:
            if world > 1:
                torch.distributed.destroy_process_group()


def start_distributed(world: int, environ, choice: str = "auto") -> str:
    """This rank's device, and (world > 1) the process group: under torchrun rank r runs on
    cuda:LOCAL_RANK, set as its current device *before* NCCL starts and passed as its
    ``device_id``, so no rank opens a context on GPU 0 and barriers know their device;
    gloo on the CPU. ``choice``: auto (CUDA where it is), cpu, or cuda (refused without it)."""
    import torch

    from dspark.errors import DsparkError

    local_rank = int(environ.get("LOCAL_RANK", "0"))
    if choice == "cuda" and not torch.cuda.is_available():
        raise DsparkError("--device cuda: CUDA is not available here; use --device cpu")
    device = f"cuda:{local_rank}" if choice != "cpu" and torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
    return device
