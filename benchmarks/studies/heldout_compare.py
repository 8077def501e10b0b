"""Held-out τ of several drafters on one training run's held-out batches (the score that picks ``best/``).

A run scores its own checkpoints on fixed held-out batches (split by prompt id, never the eval
sets); this scores any other DSpark drafter on exactly those batches, so a new drafter and the
one it replaces compare on equal ground. The data must be the run's: the held-out digest of
``train_data.json`` is checked.

    .venv/bin/python benchmarks/studies/heldout_compare.py --run runs/v6_qwen3 \\
        --data data/smollm2-135m-instruct/regen-greedy --data data/smollm2-135m-instruct/regen-t0.8 \\
        --drafter src/dspark/assets/drafters/smollm2-135m-instruct-dspark --drafter runs/v6_qwen3/best \\
        --out benchmarks/results/heldout_v5_vs_v6.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a dspark train --out folder")
    parser.add_argument("--data", type=Path, action="append", required=True, help="the run's --data, in its order")
    parser.add_argument("--drafter", type=Path, action="append", required=True, help="a DSpark drafter folder (repeatable)")
    parser.add_argument("--heldout-batches", type=int, default=None, help="default: the run's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    from dspark.drafters.dspark import DSparkModel
    from dspark.target import TargetModel
    from dspark.training.checkpoints import data_record
    from dspark.training.config import TrainConfig
    from dspark.training.data.sequences import load_training_data
    from dspark.training.features import OnlineFeatures
    from dspark.training.heldout import heldout_tau
    from dspark.training.step import StepContext

    torch.set_num_threads(args.threads)
    config = TrainConfig(**json.loads((args.run / "train_config.json").read_text()))
    if args.heldout_batches is not None:
        config = dataclasses.replace(config, heldout_batches=args.heldout_batches)
    recorded = json.loads((args.run / "train_data.json").read_text())
    target = TargetModel.load(None)
    split = load_training_data(args.data, target.tokenizer, config.max_length, 0.02, 1.0)
    digest = data_record(split.train, split.heldout)["heldout_digest"]
    if digest != recorded["heldout_digest"]:
        raise SystemExit(f"error: these --data give another held-out split than {args.run}'s (digest {digest})")
    scores = {}
    for folder in args.drafter:
        model = DSparkModel.from_pretrained(folder)
        model.attach_target(target)
        context = StepContext(target, OnlineFeatures(target, model.config.target_layer_ids), model.config,
                              config.loss_weights, model.draft_ids, target.device, 1)
        started = time.perf_counter()
        score = heldout_tau(model, context, split.heldout, config)
        scores[str(folder)] = {**dataclasses.asdict(score), "layer_family": model.config.layer_family,
                               "seconds": round(time.perf_counter() - started, 1)}
        print(f"{folder}: held-out τ estimate {score.tau_estimate:.4f}, T = 0 τ {score.tau_greedy:.4f}", flush=True)
    result = {
        "command": shlex.join([".venv/bin/python", "benchmarks/studies/heldout_compare.py", *sys.argv[1:]]),
        "what": "held-out τ estimates (T = 1 soft acceptance, T = 0 greedy survival) on one run's fixed held-out batches",
        "run": str(args.run), "heldout_sequences": len(split.heldout), "heldout_batches": config.heldout_batches,
        "batch_size": config.batch_size, "anchors_per_sequence": config.anchors_per_sequence, "scores": scores,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
