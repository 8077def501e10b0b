"""CPU float32 linear kernels: ATen's default GEMM against oneDNN (``dspark.target.kernels``).

Three measurements, each taken back to back in one process with the kernels alternating:

1. ``gemm``: the target's projection shapes at M = 1..8 rows, over 30 distinct weight
   matrices per shape so that, as in a real forward, the weights come from memory, not cache;
2. ``step``: one target forward of k = 1, 2, 3, 4, 8 tokens after a 200-token context
   (k = 1 is a plain decoding step, k = 1 + γ a verification round), and its cost relative to
   the same kernel's k = 1 step;
3. ``decode``: greedy plain and speculative decoding (batch-1 engine, the shipped drafter,
   whole blocks) on a few eval prompts, with the outputs compared token for token.

    .venv/bin/python benchmarks/speed/bench_cpu_linear.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"mlp_up": (576, 1536), "mlp_down": (1536, 576), "attn_q": (576, 576), "lm_head": (576, 49152)}


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def gemm(kernels, rows, repeats: int) -> dict:
    import torch

    from dspark.target.kernels import linear

    out = {}
    for name, (fan_in, fan_out) in SHAPES.items():
        count = 2 if name == "lm_head" else 30  # 2 heads are already 226 MB: out of cache
        weights = [torch.randn(fan_out, fan_in) * 0.02 for _ in range(count)]
        for m in rows:
            x = torch.randn(m, fan_in)
            for kernel in kernels:
                fn = (lambda: [torch.nn.functional.linear(x, w) for w in weights]) if kernel == "aten" else (
                    lambda: [linear(x, w) for w in weights])
                with torch.no_grad():
                    ms = timed(fn, repeats)
                out.setdefault(name, {}).setdefault(kernel, {})[m] = ms / count
    return out


def step(targets: dict, ks, repeats: int) -> dict:
    import torch

    context = torch.randint(0, 1000, (1, 200), generator=torch.Generator().manual_seed(0))
    times = {kernel: {k: [] for k in ks} for kernel in targets}
    for _ in range(repeats):
        for kernel, target in targets.items():
            for k in ks:
                cache = target.new_cache()
                target.forward(context, cache)
                feed = torch.randint(0, 1000, (1, k))
                target.forward(feed, cache)
                target.rollback(cache, 200)
                start = time.perf_counter()
                target.forward(feed, cache)
                times[kernel][k].append((time.perf_counter() - start) * 1e3)
    out = {}
    for kernel, per_k in times.items():
        ms = {k: statistics.median(v) for k, v in per_k.items()}
        out[kernel] = {"ms": ms, "over_one_token": {k: v / ms[1] for k, v in ms.items()}}
    return out


def decode(targets: dict, drafters: dict, prompts, max_new_tokens: int) -> dict:
    from dspark.drafters import NoDrafter
    from dspark.engine import GenerationRequest
    from dspark.engine.build import build_single_engine

    engines = {k: (build_single_engine(t, NoDrafter()), build_single_engine(t, drafters[k])) for k, t in targets.items()}
    rows = []
    for i, prompt in enumerate(prompts):
        order = list(engines) if i % 2 == 0 else list(engines)[::-1]
        for kernel in order:
            target = targets[kernel]
            plain, spec = engines[kernel]
            request = GenerationRequest(target.encode_prompt(prompt), max_new_tokens=max_new_tokens)
            a, b = plain.generate(request), spec.generate(request)
            rows.append({"kernel": kernel, "prompt": i, "new_tokens": len(a.token_ids), "plain_s": a.stats.wall_s,
                         "spec_s": b.stats.wall_s, "tau": b.stats.tau, "identical_to_plain": a.token_ids == b.token_ids,
                         "draft_s": b.stats.draft_s, "rounds": b.stats.rounds, "plain_ids": a.token_ids})
    summary = {}
    for kernel in engines:
        mine = [r for r in rows if r["kernel"] == kernel]
        tokens = sum(r["new_tokens"] for r in mine)
        plain_s, spec_s = sum(r["plain_s"] for r in mine), sum(r["spec_s"] for r in mine)
        plain_step = plain_s / tokens
        summary[kernel] = {
            "plain_tokens_per_s": tokens / plain_s, "spec_tokens_per_s": tokens / spec_s, "speedup": plain_s / spec_s,
            "tau": sum(r["tau"] for r in mine) / len(mine),
            "draft_over_plain_step": sum(r["draft_s"] for r in mine) / sum(r["rounds"] for r in mine) / plain_step,
            "identical_to_plain": sum(r["identical_to_plain"] for r in mine), "prompts": len(mine),
        }
    if "aten" in summary and "onednn" in summary:
        ref = {r["prompt"]: r["plain_ids"] for r in rows if r["kernel"] == "aten"}
        summary["onednn"]["plain_equal_to_aten_plain"] = sum(
            r["plain_ids"] == ref[r["prompt"]] for r in rows if r["kernel"] == "onednn")
        summary["onednn"]["plain_vs_aten_plain"] = summary["onednn"]["plain_tokens_per_s"] / summary["aten"]["plain_tokens_per_s"]
        summary["onednn"]["spec_vs_aten_plain"] = summary["onednn"]["spec_tokens_per_s"] / summary["aten"]["plain_tokens_per_s"]
    return {"summary": summary, "rows": [{k: v for k, v in r.items() if k != "plain_ids"} for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-set", type=int, default=1, help="decode: first prompts of each eval set's test split")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=15, help="gemm and step repeats")
    parser.add_argument("--skip", nargs="*", default=[], choices=["gemm", "step", "decode"])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "cpu_linear.json")
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from dspark.engine.build import load_drafter
    from dspark.evaluation.datasets import load_dataset
    from dspark.evaluation.provenance import git_state, machine_info
    from dspark.target import TargetModel
    from dspark.target.kernels import LINEAR_KERNELS, set_linear_kernel

    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    targets = {k: TargetModel.load(None, linear_kernel=k) for k in LINEAR_KERNELS}
    result = {"command": "python benchmarks/speed/bench_cpu_linear.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "skip")),
        "machine": machine_info(targets["aten"]), "git": git_state()}
    if "gemm" not in args.skip:
        result["gemm_ms_per_matrix"] = gemm(LINEAR_KERNELS, (1, 2, 3, 4, 8), args.repeats)
        table = Table(title="one linear, ms per weight matrix (weights from memory)")
        for col in ("shape", "kernel", "M=1", "M=2", "M=3", "M=4", "M=8"):
            table.add_column(col, justify="right")
        for shape, per in result["gemm_ms_per_matrix"].items():
            for kernel, ms in per.items():
                table.add_row(shape, kernel, *(f"{v:.3f}" for v in ms.values()))
        console.print(table)
    if "step" not in args.skip:
        with torch.no_grad():
            for t in targets.values():
                t.warm_up()
            result["step"] = step(targets, (1, 2, 3, 4, 8), args.repeats)
        table = Table(title="target forward of k tokens after 200 (median ms; cost / own 1-token step)")
        for col in ("kernel", *(f"k={k}" for k in (1, 2, 3, 4, 8))):
            table.add_column(col, justify="right")
        for kernel, s in result["step"].items():
            table.add_row(kernel, *(f"{s['ms'][k]:.1f} ({s['over_one_token'][k]:.2f})" for k in (1, 2, 3, 4, 8)))
        console.print(table)
    if "decode" not in args.skip:
        prompts = [c.turns[0] for name in ("gsm8k", "humaneval", "mbpp", "mt-bench")
                   for c in load_dataset(name, split="test", limit=args.per_set, max_turns=1).conversations]
        drafters = {}
        for kernel, target in targets.items():
            drafters[kernel] = load_drafter(None, target)
            set_linear_kernel(drafters[kernel].model, kernel)
        result["decode"] = decode(targets, drafters, prompts, args.max_new_tokens)
        table = Table(title=f"greedy decoding · {len(prompts)} prompts × {args.max_new_tokens} tokens · shipped drafter, γ = 7")
        for col in ("kernel", "plain tok/s", "spec tok/s", "speedup", "τ", "draft/plain step", "== plain"):
            table.add_column(col, justify="right")
        for kernel, s in result["decode"]["summary"].items():
            table.add_row(kernel, f"{s['plain_tokens_per_s']:.1f}", f"{s['spec_tokens_per_s']:.1f}", f"{s['speedup']:.2f}x",
                          f"{s['tau']:.2f}", f"{s['draft_over_plain_step']:.2f}", f"{s['identical_to_plain']}/{s['prompts']}")
        console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
