"""Drafting cost of one γ-token round at batch 1, as a fraction of one plain decoding step.

Every drafter and plain decoding run the same prompts in one process, interleaved prompt by
prompt, at T = 0 with a fixed γ (the batch-1 engine drafts all γ slots every round). The
drafting time of a round is what ``Drafter.propose`` took (folding the new tokens' features
into the context K/V, the backbone, the LM head rows and the sequential head); a plain step is
the target forward of one token in plain decoding. A reduced draft vocabulary that is not
trained yet can be measured with ``random:<N>``: a random-init drafter of the shipped
drafter's shapes over the N most frequent tokens, which costs exactly what a trained one does.

    .venv/bin/python benchmarks/speed/bench_drafting_cost.py \
        --drafter dspark --drafter random:8192 --out benchmarks/results/drafting_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "A farmer has 17 sheep and buys 5 more each week. How many sheep does he have after 6 weeks?",
    "Explain the difference between a list and a tuple in Python.",
    "What are three tips for staying focused while studying?",
]


def build(spec: str, gamma: int):
    """``spec`` itself (the composition root loads it), or for ``random:<N>`` the random-init drafter."""
    if not spec.startswith("random:"):
        return spec
    import torch

    from dspark.drafters import SHIPPED_DRAFTER
    from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel

    size = int(spec.partition(":")[2])
    config = DSparkConfig.load(SHIPPED_DRAFTER).replace(draft_vocab_size=size)
    torch.manual_seed(0)
    model = DSparkModel(config)
    model.set_draft_vocab(torch.arange(size))  # which rows does not change the cost
    return DSparkDrafter(model.eval(), name=f"random-{size}", gamma=gamma)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", action="append", required=True, help="drafter spec (repeatable) or random:<N>")
    parser.add_argument("--gamma", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the prompts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/drafting_cost.json"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from dspark.drafters.base import NoDrafter
    from dspark.engine import GenerationRequest
    from dspark.engine.build import build_single_engine
    from dspark.evaluation.provenance import git_state, machine_info
    from dspark.sampling import SamplingParams
    from dspark.target import TargetModel

    target = TargetModel.load(None)
    engines = {"plain": build_single_engine(target, NoDrafter())}
    for spec in args.drafter:
        engines[spec] = build_single_engine(target, build(spec, args.gamma), gamma=args.gamma)
    rounds: dict[str, list[float]] = {name: [] for name in engines}  # per-round seconds
    verify: dict[str, list[float]] = {name: [] for name in engines}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for prompt in PROMPTS:
            ids = target.encode_prompt(prompt)
            for name, engine in engines.items():
                request = GenerationRequest(ids, SamplingParams(), max_new_tokens=args.max_new_tokens, seed=0)
                for record in engine.generate(request).stats.round_records:
                    rounds[name].append(record.draft_s)
                    verify[name].append(record.verify_s)
    plain_step = statistics.median(verify["plain"])
    result = {
        "command": "python benchmarks/speed/bench_drafting_cost.py " + " ".join(f"--drafter {d}" for d in args.drafter)
        + f" --gamma {args.gamma} --max-new-tokens {args.max_new_tokens} --repeats {args.repeats} --threads {args.threads}",
        "machine": machine_info(target),
        "git": git_state(),
        "gamma": args.gamma,
        "prompts": len(PROMPTS),
        "plain_step_ms": 1e3 * plain_step,
        "wall_s": time.perf_counter() - started,
        "drafters": {},
    }
    for spec in args.drafter:
        draft = statistics.median(rounds[spec])
        result["drafters"][spec] = {
            "rounds": len(rounds[spec]),
            "draft_round_ms": 1e3 * draft,
            "draft_over_plain_step": draft / plain_step,
            "verify_round_ms": 1e3 * statistics.median(verify[spec]),
            "verify_over_plain_step": statistics.median(verify[spec]) / plain_step,
            "draft_vocab_size": getattr(getattr(engines[spec].drafter, "config", None), "num_draft_tokens", None),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"plain step {result['plain_step_ms']:.1f} ms")
    print(f"{'drafter':<28} {'N':>6} {'draft ms':>9} {'/ plain step':>12} {'verify/plain':>12}")
    for spec, row in result["drafters"].items():
        print(f"{spec:<28} {row['draft_vocab_size'] or '-':>6} {row['draft_round_ms']:>9.1f} "
              f"{row['draft_over_plain_step']:>12.2f} {row['verify_over_plain_step']:>12.2f}")


if __name__ == "__main__":
    main()
