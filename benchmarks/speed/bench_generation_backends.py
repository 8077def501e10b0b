"""Which generator should fill the data stores: transformers' static batches or the project's engine?

Both decode the same prompts greedily (plain decoding, no drafter) for ``--max-new-tokens``:

- ``generate``: :func:`dspark.training.data.generate.sample_batch`, i.e. ``model.generate`` over static
  left-padded batches of 16 and 32 (a finished row keeps its place until the batch ends);
- ``engine``: :class:`dspark.engine.batched.BatchEngine` with the ``none`` drafter and the
  ``plain`` policy at concurrency 16 and 32 (continuous batching: a finished request leaves
  at once and the next prompt takes its slot).

Prompts are the first ``--num-prompts`` of the pool, first user turn, sorted by length as
``dspark data regen`` batches them. Each configuration runs once briefly (warm-up), then
``--repeats`` rounds in rotating order; a row reports its fastest round and records all.
Throughput counts every generated token up to and including the stop token.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed/bench_generation_backends.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "generation_backends.json"
DEFAULT_PROMPTS = REPO_ROOT / "data" / "prompts" / "pool.jsonl"


@dataclass(frozen=True)
class Row:
    """One backend at one batch size / concurrency."""

    backend: str
    """``generate`` (static batches) or ``engine`` (continuous batching)."""
    batch: int
    """Static batch size, or the engine's concurrency."""
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    """Of the fastest round."""
    runs_tokens_per_s: list[float]
    """Every round, in the order run."""
    identical_to_reference: int
    """Prompts whose tokens equal the reference's (``generate`` at the largest batch); greedy,
    so only numerics (a near-tie flipped by another batch shape) can make them differ."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="prompts jsonl (dspark data pool)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32], help="batch sizes and concurrencies")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if min(args.num_prompts, args.max_new_tokens, args.repeats, args.threads, *args.batches) < 1:
        parser.error("--num-prompts, --batches, --max-new-tokens, --repeats and --threads must be >= 1")
    return args


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    from dspark.engine import GenerationRequest
    from dspark.engine.build import PLAIN, build_engine
    from dspark.evaluation.provenance import git_state, machine_info
    from dspark.sampling import SamplingParams
    from dspark.target import TargetModel
    from dspark.training.data.generate import sample_batch, stop_ids
    from dspark.training.data.prompts import read_prompts

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    target = TargetModel.load(args.model)
    records = read_prompts(args.prompts)[: args.num_prompts]
    prompts = sorted((target.encode_conversation(r.messages[:1]) for r in records), key=len)
    stops = stop_ids(target)
    if stop_ids(target) != target.eos_token_ids:
        raise SystemExit("error: the engine stops at eos ids only; this target's end of turn differs")

    def with_generate(batch: int, max_new: int, prompts=prompts) -> tuple[list[list[int]], float]:
        start, outputs = time.perf_counter(), []
        for b in range(0, len(prompts), batch):
            sampled = sample_batch(target, prompts[b : b + batch], max_new, 0.0, 1.0, 0, stops)
            for tokens, reason in zip(sampled.tokens, sampled.finish_reasons):
                outputs.append(tokens + ([min(stops)] if reason == "stop" else []))
        return outputs, time.perf_counter() - start

    def with_engine(batch: int, max_new: int, prompts=prompts) -> tuple[list[list[int]], float]:
        engine = build_engine(target, None, PLAIN, batch)
        requests = [GenerationRequest(p, SamplingParams(), max_new_tokens=max_new, seed=i) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        result = engine.generate(requests)
        return [list(r.token_ids) for r in result.results], time.perf_counter() - start

    configs = [(name, fn, b) for b in args.batches for name, fn in (("generate", with_generate), ("engine", with_engine))]
    for _, fn, b in configs:  # thread pools and allocators meet each backend before timing
        fn(b, 4, prompts[:b:4])
    runs: dict[tuple[str, int], list[tuple[float, int, list[list[int]]]]] = {(n, b): [] for n, _, b in configs}
    with tqdm(total=len(configs) * args.repeats, unit="run") as bar:
        for repeat in range(args.repeats):
            shift = repeat % len(configs)
            for name, fn, b in configs[shift:] + configs[:shift]:
                outputs, wall = fn(b, args.max_new_tokens)
                tokens = sum(map(len, outputs))
                runs[(name, b)].append((wall, tokens, outputs))
                bar.set_postfix_str(f"{name} {b}: {tokens / wall:.1f} tok/s")
                bar.update()
    reference_key = ("generate", max(args.batches))
    reference = min(runs[reference_key], key=lambda r: r[0])[2]
    rows = []
    for (name, b), rounds in runs.items():
        wall, tokens, outputs = min(rounds, key=lambda r: r[0])
        rows.append(Row(
            backend=name, batch=b, new_tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall,
            runs_tokens_per_s=[t / w for w, t, _ in rounds],
            identical_to_reference=sum(a == c for a, c in zip(outputs, reference)),
        ))
    best = {name: max(r.tokens_per_s for r in rows if r.backend == name) for name in ("generate", "engine")}
    faster = max(best, key=best.get)
    margin = best[faster] / best[min(best, key=best.get)] - 1
    return {
        "benchmark": "generation_backends",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?"), ".venv/bin/python",
                               "benchmarks/speed/bench_generation_backends.py", *sys.argv[1:]]),
        "machine": {**machine_info(target), "load_avg_start": list(load_start), "load_avg_end": list(os.getloadavg())},
        "git": git_state(),
        "model": target.name,
        "note": args.note,
        "settings": {
            "prompts": str(args.prompts.relative_to(REPO_ROOT) if args.prompts.is_relative_to(REPO_ROOT) else args.prompts),
            "num_prompts": len(prompts),
            "prompt_tokens": [len(p) for p in prompts],
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0.0,
            "repeats": args.repeats,
            "threads": args.threads,
            "reference": f"{reference_key[0]} {reference_key[1]}",
        },
        "rows": [asdict(r) for r in rows],
        "best_tokens_per_s": best,
        "faster": faster,
        "margin": margin,
        "decision": (f"{faster} is {100 * margin:.0f} % faster; dspark data regen uses "
                     + ("the engine" if faster == "engine" and margin > 0.15 else "sample_batch (model.generate)")
                     + " (the switch needs > 15 %)"),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for r in report["rows"]:
        print(f"{r['backend']:<9} {r['batch']:>3}  {r['tokens_per_s']:7.1f} tok/s  ({r['new_tokens']} tokens in "
              f"{r['wall_s']:.1f} s; rounds {', '.join(f'{x:.1f}' for x in r['runs_tokens_per_s'])}; "
              f"{r['identical_to_reference']}/{report['settings']['num_prompts']} identical to {report['settings']['reference']})")
    print(report["decision"])
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
