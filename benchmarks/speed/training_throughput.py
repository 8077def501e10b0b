"""Training throughput of `dspark train`, before and after, back to back on the same data.

Each configuration is a `dspark train` command run for a few steps on the same responses
file, from a checkout of its own commit (a `git worktree` of ``--before`` for the old code,
this checkout for the new), one after the other at the same thread count. Blocks per second
and target tokens per second come from the run's own log (its elapsed time between the first
and the last logged step, so start-up and the first step are excluded) and from replaying the
deterministic batches, which are functions of (seed, step).

    .venv/bin/python benchmarks/speed/training_throughput.py --data runs/data/throughput.jsonl \
        --before 3e23ed5 --threads 2 --out benchmarks/results/training_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONFIGS = {
    # What the shipped drafter was trained with (minus its feature cache): 16 anchors, full vocabulary.
    "before": ["--anchors", "16"],
    # This checkout's defaults: dense anchors, an 8,192-token draft vocabulary, block attention.
    "after": ["--anchors", "64", "--draft-vocab", "8192"],
    "after-256-anchors": ["--anchors", "256", "--draft-vocab", "8192"],
}


def run(checkout: Path, name: str, extra: list[str], args, workdir: Path) -> dict:
    out = workdir / name
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(checkout / "src"))
    command = [
        sys.executable, "-m", "dspark", "train", "--data", str(args.data), "--out", str(out),
        "--steps", str(args.steps), "--batch-size", "4", "--max-length", str(args.max_length),
        "--log-every", "1", "--save-every", str(args.steps), *extra,
    ]
    if name != "before":
        command += ["--max-epochs", "1000", "--heldout-fraction", "0"]
    subprocess.run(command, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    config = json.loads((out / "train_config.json").read_text())
    first, last = log[0], log[-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    seen = replay(config, first["step"], last["step"], args)
    return {
        "command": " ".join(command[1:]).replace(str(args.data), args.data.name),
        "steps_timed": last["step"] - first["step"],
        "seconds": seconds,
        "blocks_per_s": seen["blocks"] / seconds,
        "target_tokens_per_s": seen["tokens"] / seconds,
        **seen,
    }


def replay(config: dict, first: int, last: int, args) -> dict:
    """Blocks and sequence tokens of steps first+1 .. last (the timed ones)."""
    from dspark.target import TargetModel
    from dspark.training.batches import global_batch_indices, make_batch
    from dspark.training.data.tokenize import TokenizeConfig, load_training_sequences

    tokenizer = TargetModel.load(None).tokenizer
    sequences = load_training_sequences(args.data, tokenizer, TokenizeConfig(max_length=args.max_length), progress=False)
    blocks = tokens = 0
    for step in range(first, last):
        indices = global_batch_indices(step, config["batch_size"], len(sequences), config["seed"])
        batch = make_batch(sequences, indices, config["anchors_per_sequence"], step, config["seed"])
        blocks += int((batch.anchors >= 0).sum())
        tokens += int(batch.attention_mask.sum())
    return {"blocks": blocks, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="a responses.jsonl both versions read")
    parser.add_argument("--before", default="3e23ed5", help="commit of the old trainer")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training_throughput.json"))
    args = parser.parse_args()
    args.data = args.data.resolve()

    from dspark.evaluation.provenance import git_state

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        old = workdir / "before-checkout"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for name in args.configs:
                checkout = old if name == "before" else REPO
                results[name] = run(checkout, name, CONFIGS[name], args, workdir)
                print(f"{name:<20} {results[name]['blocks_per_s']:7.1f} blocks/s "
                      f"{results[name]['target_tokens_per_s']:7.1f} target tokens/s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
            shutil.rmtree(old, ignore_errors=True)
    report = {
        "threads": args.threads,
        "before_commit": args.before,
        "git": git_state(),
        "data": args.data.name,
        "configs": results,
    }
    if "before" in results:
        for name, row in results.items():
            row["blocks_per_s_over_before"] = row["blocks_per_s"] / results["before"]["blocks_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
