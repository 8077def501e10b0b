"""What held-out τ, training tokens and CPU-hours a speedup needs on this machine.

From two measured files: ``round_cost.json`` (a forward over 1 + ℓ tokens and drafting ℓ slots,
in units of one plain 1-token step) and a scaling study's ``scaling.json`` (the log-linear fit
τ_0(tokens) = a + b·ln(tokens) of held-out whole-block τ at T = 0, γ = 7, and the run's
training rate in tokens/s).

A round that drafts ℓ tokens costs cost_ℓ = forward(1 + ℓ) + draft(ℓ) plain steps and commits
τ_ℓ tokens, so a speedup S needs τ_ℓ ≥ S·cost_ℓ. Since a block cut at ℓ < γ commits no more
than the whole block, τ_γ ≥ τ_ℓ, and τ_γ ≥ min_ℓ S·cost_ℓ is necessary: a lower bound on the
τ (hence on the training) a speedup needs, ignoring prefill, the engine's own overhead and
the scheduler's choices. The fit turns that τ into tokens and hours at the measured rate.

    .venv/bin/python benchmarks/studies/speedup_reach.py \\
        --round-cost benchmarks/results/round_cost.json \\
        --scaling benchmarks/results/scaling_from_scratch/scaling.json --run scale_dspark \\
        --out benchmarks/results/speedup_reach.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from scaling_study import tokens_for_tau


def round_costs(round_cost: dict) -> dict[int, float]:
    """ℓ -> plain steps one round drafting ℓ tokens and verifying 1 + ℓ costs."""
    forward = {int(k): v for k, v in round_cost["forward_vs_one_token"].items()}
    one_step_ms = round_cost["forward_ms"]["1"]
    drafting = {int(k): v / one_step_ms for k, v in round_cost["draft_ms"].items()}
    return {ell: forward[ell + 1] + drafting[ell] for ell in sorted(drafting) if ell + 1 in forward}


def required_tau(costs: dict[int, float], speedup: float) -> tuple[int, float]:
    """(ℓ, τ) of the cheapest round length for ``speedup``: τ_γ must reach at least this τ.
    A round drafting ℓ commits at most ℓ + 1 tokens, so lengths that cannot reach it are skipped."""
    feasible = {ell: speedup * cost for ell, cost in costs.items() if speedup * cost <= ell + 1}
    if not feasible:
        raise SystemExit(f"error: no round length reaches {speedup}x at these costs")
    ell = min(feasible, key=feasible.get)
    return ell, feasible[ell]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-cost", type=Path, default=Path("benchmarks/results/round_cost.json"))
    parser.add_argument("--scaling", type=Path, default=Path("benchmarks/results/scaling_from_scratch/scaling.json"))
    parser.add_argument("--run", default="scale_dspark", help="which run of the scaling study to extrapolate")
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.0, 1.3, 2.5])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speedup_reach.json"))
    args = parser.parse_args()
    for path in (args.round_cost, args.scaling):
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist")
    round_cost, scaling = json.loads(args.round_cost.read_text()), json.loads(args.scaling.read_text())
    if args.run not in scaling["runs"]:
        raise SystemExit(f"error: {args.scaling} has no run {args.run!r}; it has {', '.join(scaling['runs'])}")
    run = scaling["runs"][args.run]
    fit, rate = run["fit_tau_greedy"], run["training_rate"]["tokens_per_s"]
    latest = max(run["points"], key=lambda p: p["step"])
    costs = round_costs(round_cost)
    rows = []
    for speedup in args.speedups:
        ell, tau = required_tau(costs, speedup)
        tokens = tokens_for_tau(fit, tau)
        rows.append({
            "speedup": speedup, "round_drafts": ell, "round_cost_plain_steps": costs[ell],
            "tau_needed": tau, "training_tokens": tokens,
            "cpu_hours_at_measured_rate": None if tokens is None else tokens / rate / 3600,
        })
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "inputs": {"round_cost": str(args.round_cost), "scaling": str(args.scaling), "run": args.run},
        "round_cost_plain_steps": {str(k): v for k, v in costs.items()},
        "fit_tau_greedy": {"a": fit["a"], "b_per_ln_token": fit["b_per_ln_token"]},
        "training_tokens_per_s": rate,
        "latest_point": {"step": latest["step"], "tokens": latest["tokens"], "tau_greedy": latest["tau_greedy"]},
        "speedups": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| speedup | cheapest round | its cost (plain steps) | held-out τ (γ = 7) needed | training tokens | CPU-hours |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tokens = "–" if r["training_tokens"] is None else f"{r['training_tokens']:.2g}"
        hours = "–" if r["cpu_hours_at_measured_rate"] is None else f"{r['cpu_hours_at_measured_rate']:,.0f}"
        print(f"| {r['speedup']:.1f}x | draft {r['round_drafts']}, verify {r['round_drafts'] + 1} | "
              f"{r['round_cost_plain_steps']:.2f} | {r['tau_needed']:.2f} | {tokens} | {hours} |")
    print(f"(fit from {args.run}: τ {latest['tau_greedy']:.3f} at {latest['tokens']:,} tokens; {rate:.0f} tokens/s)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
