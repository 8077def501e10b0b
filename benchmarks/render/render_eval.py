"""Markdown tables for the README from `dspark eval` results.json files.

    .venv/bin/python benchmarks/render/render_eval.py benchmarks/results/eval_t0/results.json

Prints, per file, τ per dataset and drafter, the speedup per dataset with drafting time as a
share of a plain step (plain decoding's mean round), then the overall row of every drafter
with conditional acceptance per position and the time split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def short(spec: str) -> str:
    from dspark.drafters.factory import HYBRID, resolve_drafter

    d = resolve_drafter(spec)
    lookup = HYBRID if d.hybrid else ""
    return f"{d.kind} ({Path(d.arg).name}{lookup})" if d.arg else d.kind + lookup


def fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(path: Path) -> str:
    results = json.loads(path.read_text())
    settings, machine = results["settings"], results["machine"]
    rows = results["aggregates"]
    datasets = [d for d in dict.fromkeys(r["dataset"] for r in rows) if d != "all"]
    drafters = [d for d in dict.fromkeys(r["drafter"] for r in rows) if d != "none"]
    by = {(r["dataset"], r["drafter"]): r for r in rows}
    out = [f"`{results['command']}` → `{path}`", ""]
    out.append(f"T = {settings['temperature']}, ≤ {settings['max_new_tokens']} new tokens, "
               f"{machine.get('torch_num_threads')} threads, {results['date']}")
    out.append("")
    out.append("| drafter | " + " | ".join(f"τ {d}" for d in datasets) + " | τ all | tok/s | speedup | efficiency |")
    out.append("|---|" + "---|" * (len(datasets) + 4))
    plain = by[("all", "none")]
    out.append("| plain decoding | " + " | ".join("1.00" for _ in datasets) + f" | 1.00 | {plain['tokens_per_s']:.1f} | 1.00x | – |")
    for spec in drafters:
        cells = [fmt(by[(d, spec)]["tau"]) for d in datasets]
        a = by[("all", spec)]
        out.append(f"| {short(spec)} | " + " | ".join(cells)
                   + f" | {fmt(a['tau'])} | {a['tokens_per_s']:.1f} | {a['speedup']:.2f}x | {fmt(a['efficiency'])} |")
    out.append("")
    out.append("| drafter | " + " | ".join(f"speedup {d}" for d in datasets) + " | speedup all | drafting / plain step |")
    out.append("|---|" + "---|" * (len(datasets) + 2))
    for spec in drafters:
        a = by[("all", spec)]
        step = plain.get("t_verify_s")  # plain decoding's round is one 1-token step
        share = f"{a['t_draft_s'] / step:.2f}" if step else "–"
        out.append(f"| {short(spec)} | " + " | ".join(f"{by[(d, spec)]['speedup']:.2f}x" for d in datasets)
                   + f" | {a['speedup']:.2f}x | {share} |")
    out.append("")
    out.append("| drafter (all sets) | conditional acceptance k = 1..γ | verify rate | draft / verify ms per round | identical to plain |")
    out.append("|---|---|---|---|---|")
    for spec in drafters:
        a = by[("all", spec)]
        cond = " ".join(fmt(c) if c == c else "–" for c in a["conditional_acceptance"])
        same = f"{a['generations'] - a['mismatches']}/{a['generations']}" if settings["temperature"] == 0 else "n/a (T > 0)"
        out.append(f"| {short(spec)} | {cond} | {fmt(a['verify_rate'])} | "
                   f"{1000 * a['t_draft_s']:.1f} / {1000 * a['t_verify_s']:.1f} | {same} |")
    return "\n".join(out)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(render(Path(arg)))
        print()
