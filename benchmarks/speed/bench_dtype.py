"""Target dtype on this CPU: float32 against bfloat16, plain decoding and the shipped drafter.

For each dtype the target and the drafter are loaded in it; every prompt then runs plain
decoding and speculative decoding (batch-1 engine, whole blocks) back to back, the dtypes in
alternating order, so a speed ratio is only ever taken between runs measured side by side.
Reported per dtype: tokens/s of both, the speedup, τ, how many greedy outputs equal plain
decoding's *in the same dtype* (the lossless check) and how many equal float32 plain
decoding's (what the lower precision changes by itself). bf16 kernels for a 1-token step and
for a k-token verification round differently, so greedy speculative output in bf16 need not
equal bf16 plain output token for token even though the rejection rule is exact.

    .venv/bin/python benchmarks/speed/bench_dtype.py --per-set 2 --max-new-tokens 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=2, help="first prompts of each eval set's test split")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "dtype.json")
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from dspark.drafters import NoDrafter
    from dspark.engine import GenerationRequest
    from dspark.engine.build import build_single_engine
    from dspark.evaluation.datasets import load_dataset
    from dspark.evaluation.provenance import git_state, machine_info
    from dspark.target import TargetModel

    torch.set_num_threads(args.threads)
    prompts = [
        c.turns[0]
        for name in ("gsm8k", "humaneval", "mbpp", "mt-bench")
        for c in load_dataset(name, split="test", limit=args.per_set, max_turns=1).conversations
    ]
    engines = {}
    for name in args.dtypes:
        target = TargetModel.load(None, dtype=getattr(torch, name))
        target.warm_up()
        engines[name] = (target, build_single_engine(target, NoDrafter()), build_single_engine(target, None))
    rows = []
    for i, prompt in enumerate(tqdm(prompts, unit="prompt")):
        order = list(engines.items()) if i % 2 == 0 else list(engines.items())[::-1]
        for name, (target, plain, spec) in order:
            request = GenerationRequest(target.encode_prompt(prompt), max_new_tokens=args.max_new_tokens)
            a, b = plain.generate(request), spec.generate(request)
            rows.append({
                "dtype": name, "prompt": i, "new_tokens": len(a.token_ids),
                "plain_s": a.stats.wall_s, "spec_s": b.stats.wall_s, "tau": b.stats.tau,
                "identical_to_plain": a.token_ids == b.token_ids, "plain_ids": a.token_ids,
            })
    reference = {r["prompt"]: r["plain_ids"] for r in rows if r["dtype"] == "float32"}
    summary = {}
    for name in engines:
        mine = [r for r in rows if r["dtype"] == name]
        tokens = sum(r["new_tokens"] for r in mine)
        plain_s, spec_s = sum(r["plain_s"] for r in mine), sum(r["spec_s"] for r in mine)
        summary[name] = {
            "prompts": len(mine),
            "plain_tokens_per_s": tokens / plain_s,
            "spec_tokens_per_s": tokens / spec_s,
            "speedup": plain_s / spec_s,
            "tau": sum(r["tau"] for r in mine) / len(mine),
            "identical_to_plain_same_dtype": sum(r["identical_to_plain"] for r in mine),
            "plain_equal_to_float32_plain": sum(r["plain_ids"] == reference.get(r["prompt"]) for r in mine) if reference else None,
        }
    if "float32" in summary:
        base = summary["float32"]["plain_tokens_per_s"]
        for s in summary.values():
            s["spec_vs_float32_plain"] = s["spec_tokens_per_s"] / base
    result = {
        "command": f"python benchmarks/speed/bench_dtype.py --per-set {args.per_set} --max-new-tokens {args.max_new_tokens} "
                   f"--threads {args.threads} --dtypes {' '.join(args.dtypes)}",
        "machine": machine_info(next(iter(engines.values()))[0]), "git": git_state(),
        "summary": summary, "rows": [{k: v for k, v in r.items() if k != "plain_ids"} for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"target dtype · {len(prompts)} prompts × {args.max_new_tokens} tokens · {args.threads} thread(s)")
    for col in ("dtype", "plain tok/s", "spec tok/s", "speedup", "vs fp32 plain", "τ", "== plain (same dtype)", "plain == fp32 plain"):
        table.add_column(col, justify="right")
    for name, s in summary.items():
        table.add_row(name, f"{s['plain_tokens_per_s']:.1f}", f"{s['spec_tokens_per_s']:.1f}", f"{s['speedup']:.2f}x",
                      f"{s.get('spec_vs_float32_plain', float('nan')):.2f}x", f"{s['tau']:.2f}",
                      f"{s['identical_to_plain_same_dtype']}/{s['prompts']}", f"{s['plain_equal_to_float32_plain']}/{s['prompts']}")
    Console(stderr=True).print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
