"""What a batch-1 round costs on this machine: a target forward over n tokens, and drafting.

Why: speculation at one request pays only when τ · t(1) > t_draft(γ) + t(1 + ℓ), so the shape
of t(n) decides how many drafted tokens are worth verifying. The target forward (HF cache,
feature layers on, the engines' linear kernel) runs after a context of ``--context`` tokens
for every n in ``--widths``, in rotating order, ``--repeats`` times, and is rolled back each
time; the shipped drafter's ``propose`` is timed at each γ the same way. Medians are
reported, with every forward's time relative to the 1-token step measured in the same loop.

    .venv/bin/python benchmarks/speed/bench_round_cost.py --out benchmarks/results/round_cost.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=300, help="tokens already in the cache")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--drafter", default=None, help="drafter spec; default: the shipped DSpark drafter")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "round_cost.json")
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from dspark.drafters import DraftInput
    from dspark.engine.build import load_drafter
    from dspark.evaluation.provenance import git_state, machine_info, write_report
    from dspark.sampling import SamplingParams
    from dspark.target import TargetModel

    target = TargetModel.load(None)
    target.warm_up()
    drafter = load_drafter(args.drafter, target)
    layers = drafter.feature_layer_ids
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(100, 20000, (1, args.context), generator=generator)
    cache = target.new_cache()
    out = target.forward(context, cache, layers)
    features = out.features[0]
    gammas = list(range(1, drafter.gamma + 1))

    def forward_ms(width: int) -> float:
        feed = torch.randint(100, 20000, (1, width), generator=generator)
        start = time.perf_counter()
        target.forward(feed, cache, layers)
        elapsed = time.perf_counter() - start
        target.rollback(cache, args.context)
        return elapsed * 1e3

    tokens = torch.cat([context[0], torch.tensor([42])])  # the context, then an anchor
    drafter.reset()
    drafter.propose(DraftInput(tokens, features, SamplingParams(), generator, drafter.gamma))  # folds the context once

    def draft_ms(gamma: int) -> float:
        """One round's drafting of ``gamma`` slots over the folded context (no new features)."""
        start = time.perf_counter()
        drafter.propose(DraftInput(tokens, None, SamplingParams(), generator, gamma))
        return (time.perf_counter() - start) * 1e3

    forward = {w: [] for w in args.widths}
    draft = {g: [] for g in gammas}
    for rep in range(args.repeats):
        for w in args.widths[rep % len(args.widths):] + args.widths[: rep % len(args.widths)]:
            forward[w].append(forward_ms(w))
        for g in gammas:
            draft[g].append(draft_ms(g))
    step = statistics.median(forward[1]) if 1 in forward else None
    report = {
        "benchmark": "round_cost",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([*(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" for _ in [0] if "OMP_NUM_THREADS" in os.environ),
                             ".venv/bin/python", shlex.join([os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]])]),
        "machine": machine_info(target),
        "git": git_state(),
        "settings": {"context": args.context, "repeats": args.repeats, "drafter": drafter.name,
                     "note": "drafting: one round over an already folded context (a real round also folds 1 + n new features)"},
        "forward_ms": {str(w): statistics.median(v) for w, v in forward.items()},
        "forward_vs_one_token": {str(w): statistics.median(v) / step for w, v in forward.items()} if step else None,
        "draft_ms": {str(g): statistics.median(v) for g, v in draft.items()},
        "samples_ms": {"forward": {str(k): v for k, v in forward.items()}, "draft": {str(k): v for k, v in draft.items()}},
    }

    def table(r: dict) -> None:
        t = Table(title=f"one batch-1 round · {r['machine']['torch_num_threads']} threads · context {args.context}")
        t.add_column("tokens in the forward")
        t.add_column("ms", justify="right")
        t.add_column("× 1-token step", justify="right")
        for w, ms in r["forward_ms"].items():
            t.add_row(w, f"{ms:.1f}", f"{r['forward_vs_one_token'][w]:.3f}" if r["forward_vs_one_token"] else "–")
        Console().print(t)
        print("drafting ms by γ: " + ", ".join(f"{g}: {ms:.1f}" for g, ms in r["draft_ms"].items()))

    write_report(args.out, report, table=table)


if __name__ == "__main__":
    main()
