"""Training cost of `dspark train` runs: wall time, steps, tokens and blocks seen.

Reads each run's train_config.json and train_log.jsonl, replays the deterministic batches
(they are functions of seed and step) over the same data to count what was seen, and writes
one JSON. Wall time is the sum of the logged elapsed time of every (re)started segment.

    .venv/bin/python benchmarks/studies/training_cost.py --data runs/data/responses.jsonl \
        --runs runs/v2_dspark runs/v2_dflash --out benchmarks/results/training_cost.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def wall_time(log: list[dict]) -> float:
    """Sum of segments: elapsed_s restarts from ~0 whenever a run is resumed."""
    total, previous = 0.0, 0.0
    for row in log:
        if row["elapsed_s"] < previous:  # a new process (resume)
            total += previous
        previous = row["elapsed_s"]
    return total + previous


def seen(sequences, config: dict, steps: int) -> dict:
    from dspark.training.batches import global_batch_indices, make_batch

    tokens = loss_tokens = blocks = 0
    for step in range(steps):
        indices = global_batch_indices(step, config["batch_size"], len(sequences), config["seed"])
        batch = make_batch(sequences, indices, config["anchors_per_sequence"], step, config["seed"])
        tokens += int(batch.attention_mask.sum())
        loss_tokens += int(batch.loss_mask.sum())
        blocks += int((batch.anchors >= 0).sum())
    return {"sequence_tokens": tokens, "response_tokens": loss_tokens, "blocks": blocks,
            "draft_slots": blocks * config["block_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--runs", nargs="+", required=True, type=Path)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training_cost.json"))
    args = parser.parse_args()

    from dspark.target import TargetModel
    from dspark.training.data.tokenize import TokenizeConfig, load_training_sequences

    tokenizer = TargetModel.load(None).tokenizer
    sequences = load_training_sequences(args.data, tokenizer, TokenizeConfig(max_length=args.max_length), progress=False)
    result = {
        "data": {"file": str(args.data), "sequences": len(sequences),
                 "tokens": sum(len(s.input_ids) for s in sequences),
                 "response_tokens": sum(s.num_loss_tokens for s in sequences)},
        "runs": {},
    }
    for run in args.runs:
        config = json.loads((run / "train_config.json").read_text())
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
        steps = int((run / "latest").read_text().strip().split("_")[-1]) if (run / "latest").exists() else log[-1]["step"]
        last = max((row for row in log if row["step"] <= steps), key=lambda row: row["step"])
        result["runs"][str(run)] = {
            "variant": config["variant"], "steps": steps, "config": config,
            "wall_time_s": round(wall_time([row for row in log if row["step"] <= steps]), 1),
            "seen": seen(sequences, config, steps),
            "last_logged": {k: last[k] for k in ("step", "loss", "tau_estimate", "slot_acceptance")},
        }
        print(run, json.dumps(result["runs"][str(run)]["seen"]), result["runs"][str(run)]["wall_time_s"], "s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
