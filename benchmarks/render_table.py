"""Print a markdown table of a bench_generate.py JSON, for quoting in the README.

    .venv/bin/python benchmarks/render_table.py benchmarks/results/generate_t0.json
"""

from __future__ import annotations

import json
import sys


def render(path: str) -> str:
    report = json.loads(open(path).read())
    s = report["settings"]
    lines = [
        f"`{report['command']}`",
        "",
        f"{report['model']} · T={s['temperature']:g} · {s['limit']} prompts per set · "
        f"{s['max_new_tokens']} new tokens · {report['machine']['torch_num_threads']} threads · {report['date']}",
        "",
        "| dataset | drafter | tokens | tok/s | mean τ | speedup vs plain | identical to plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in report["aggregates"]:
        same = "n/a (T>0)" if s["temperature"] > 0 else f"{a['prompts'] - a['mismatches']}/{a['prompts']}"
        lines.append(
            f"| {a['dataset']} | {a['drafter']} | {a['new_tokens']} | {a['tokens_per_s']:.1f} | "
            f"{a['mean_tau']:.2f} | {a['speedup']:.2f}x | {same} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(render(p))
        print()
