"""Print a markdown table of a bench_concurrency.py JSON, for quoting in the README.

    .venv/bin/python benchmarks/render/render_concurrency.py benchmarks/results/concurrency.json

One row per concurrency level: aggregate / per-user tokens/s of every policy (the fastest
repeat), the DSpark policy's mean verification length ℓ and τ, and the spread of plain
decoding over the repeats (max / min − 1), the measured noise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[2]) + "/"


def render(path: str) -> str:
    report = json.loads(open(path, encoding="utf-8").read())
    s = report["settings"]
    policies = s["policies"]
    rows = report["rows"]
    levels = sorted({r["concurrency"] for r in rows})
    cell = {(r["concurrency"], r["policy"]): r for r in rows}
    lines = [
        f"`{report['command'].replace(REPO_ROOT, '')}` → `{path}`",
        "",
        f"{report['model']} · drafter {s['drafter_name']} · T = {s['temperature']:g} · ≤ {s['max_new_tokens']} new "
        f"tokens · {s['waves']} × c requests per level · best of {s.get('repeats', 1)} · "
        f"{report['machine']['torch_num_threads']} threads · {report['date']}",
        "",
        "| c | " + " | ".join(f"{p} agg / user tok/s" for p in policies) + " | dspark ℓ / τ | plain spread |",
        "|---|" + "---|" * (len(policies) + 2),
    ]
    for c in levels:
        out = [str(c)]
        for p in policies:
            r = cell.get((c, p))
            if r is None or r["skipped"]:
                out.append("skipped")
            else:
                out.append(f"{r['aggregate_tokens_per_s']:.1f} / {r['per_user_tokens_per_s']:.1f}")
        d = cell.get((c, "dspark"))
        out.append(f"{d['verify_length']:.2f} / {d['tau']:.2f}" if d and not d["skipped"] else "–")
        runs = (cell.get((c, "plain")) or {}).get("runs_tokens_per_s") or []
        out.append(f"{max(runs) / min(runs) - 1:.1%}" if len(runs) > 1 else "–")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(render(p))
        print()
