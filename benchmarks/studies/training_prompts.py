"""Write first user turns of the drafter's own training conversations as an eval-style jsonl.

Prompts the drafter was trained on are where it is accurate (τ well above what it reaches on
the math and code eval sets), so they show what the scheduler does when speculation pays.
They measure nothing about generalisation; use them only for that demonstration.

    .venv/bin/python benchmarks/studies/training_prompts.py runs/data/prompts.jsonl runs/data/responses.jsonl \
        --out runs/data/train_prompts.jsonl
    .venv/bin/python benchmarks/speed/bench_concurrency.py --datasets runs/data/train_prompts.jsonl \
        --out benchmarks/results/concurrency_train_prompts.json

Only single-turn prompts with an answer in ``responses`` are kept, round-robin over their
sources (sharegpt, magpie-code, magpie-math), so every concurrency level sees all three.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", type=Path, help="`dspark data prompts` output")
    parser.add_argument("responses", type=Path, help="`dspark data generate` output")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--min-chars", type=int, default=20, help="skip shorter prompts ('test', 'continue')")
    args = parser.parse_args()

    answered = {json.loads(line)["id"] for line in args.responses.open(encoding="utf-8") if line.strip()}
    by_source: dict[str, list[str]] = defaultdict(list)
    for line in args.prompts.open(encoding="utf-8"):
        if not line.strip():
            continue
        row = json.loads(line)
        messages = row["messages"]
        if row["id"] in answered and len(messages) == 1 and len(messages[0]["content"]) >= args.min_chars:
            by_source[row["source"]].append(messages[0]["content"])
    mixed = []
    for i in range(max(map(len, by_source.values()), default=0)):
        mixed += [by_source[s][i] for s in sorted(by_source) if i < len(by_source[s])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for text in mixed[: args.count]:
            f.write(json.dumps({"turns": [text]}) + "\n")
    print(f"wrote {min(args.count, len(mixed))} prompts to {args.out}")


if __name__ == "__main__":
    main()
