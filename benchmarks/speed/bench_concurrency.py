"""Throughput against concurrency for verification policies in the batched engine (paper §5.3-5.4).

At each concurrency level c the engine serves ``c × --waves`` requests with at most c in
flight (continuous batching: a finished request's slot is refilled at once). Prompts are the
first turns of the four built-in eval sets' test splits, interleaved (gsm8k, humaneval, mbpp,
mt-bench, gsm8k, ...), the same for every policy. Policies:

- ``plain``: no drafter, one token per request and step (the reference);
- ``gamma1``: verify one draft token (the analogue of the paper's MTP-1);
- ``fixed:7``: verify the whole block of 7;
- ``dspark``: the hardware-aware prefix scheduler over the profiled SPS(R, W) (Algorithm 1,
  by levels on this padded engine), drafting lazily with backoff; its cost table is loaded,
  or measured and saved on first use (``--no-profile`` refuses).

Each level first runs every policy briefly (warm-up), then ``--repeats`` rounds of all
policies back to back in rotating order; a row reports its policy's fastest round (as timeit
does: interference only ever slows a run) and records every round's throughput, so the
spread between rounds is the measured noise. Measured per (level, policy): aggregate tokens/s (all new tokens over wall time, prefills
included), mean per-user tokens/s (each request's tokens over its own time in the engine),
mean verification length ℓ per request and step (and the budget 1 + ℓ), τ (tokens committed
per request and step), and at T = 0 whether every output equals plain decoding's.
Writes JSON and a PNG: aggregate throughput against per-user speed (Fig. 7) and throughput
and verification budget against concurrency (Fig. 8).

    .venv/bin/python benchmarks/speed/bench_concurrency.py                       # 1 2 4 8 16, 128 tokens
    .venv/bin/python benchmarks/speed/bench_concurrency.py --concurrency 1 2 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dspark.evaluation.datasets import load_dataset
from dspark.evaluation.provenance import git_state, machine_info, write_report

REPO_ROOT = Path(__file__).resolve().parents[2]

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "concurrency.json"
DEFAULT_POLICIES = ["plain", "gamma1", "fixed:7", "dspark"]
DEFAULT_DATASETS = ["gsm8k", "humaneval", "mbpp", "mt-bench"]
REFERENCE = "plain"


@dataclass(frozen=True)
class Row:
    """One concurrency level and one policy."""

    concurrency: int
    policy: str
    run_order: int
    """Position of this policy among the level's back-to-back runs (0 = first)."""
    requests: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    aggregate_tokens_per_s: float = 0.0
    per_user_tokens_per_s: float = 0.0
    """Mean over requests of new tokens / (finish - admission)."""
    verify_length: float = 0.0
    """Mean ℓ per request and step."""
    verify_budget: float = 0.0
    """Mean 1 + ℓ per request and step (B / R)."""
    mean_batch_budget: float = 0.0
    """Mean B = Σ_r (1 + ℓ_r) per step."""
    mean_requests: float = 0.0
    """Mean R per step."""
    tau: float = 0.0
    steps: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    schedule_s: float = 0.0
    verify_s: float = 0.0
    identical_to_plain: int | None = None
    """Requests whose output equals plain decoding's (None above T = 0)."""
    skipped: str | None = None
    """Why the policy could not run (e.g. a drafter without confidences), else None."""
    runs_tokens_per_s: list[float] | None = None
    """Aggregate tokens/s of every repeat; the row's other numbers are the fastest repeat's."""
    full_tokens_per_s: float = 0.0
    """Tokens committed per second of step time (drafting, scheduling, verification; prefills
    excluded) over the steps that ran all c requests: the engine at concurrency c, without the
    tail where the last requests run alone (speculative decoding finishes requests unevenly, so
    its tail is longer than plain decoding's and its aggregate is pulled down more)."""
    full_share: float = 0.0
    """Share of the run's steps that ran all c requests."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="levels to run")
    parser.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, help="plain | gamma1 | fixed[:γ] | threshold:<t> | dspark")
    parser.add_argument("--drafter", default=None, help="drafter spec for make_drafter; default: the shipped DSpark drafter")
    parser.add_argument("--gamma", type=int, default=None, help="drafter block size (drafter default if unset)")
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, help="built-in eval sets or .jsonl paths")
    parser.add_argument("--waves", type=int, default=2, help="requests per level = concurrency × waves")
    parser.add_argument("--repeats", type=int, default=2, help="runs per level and policy, in rotating order; the fastest is reported, all are recorded")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="request i gets seed + i")
    parser.add_argument("--model", default=None, help="target spec; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (part of the cost table's key)")
    parser.add_argument("--profile-dir", type=Path, default=None, help="cost tables (default: ~/.cache/dspark/profiles)")
    parser.add_argument("--no-profile", action="store_true", help="fail instead of profiling when no cost table fits")
    parser.add_argument("--profile-context", type=int, default=256, help="context per request when profiling")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file; the PNG goes beside it")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency levels must be >= 1")
    if args.waves < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        parser.error("--waves, --repeats and --max-new-tokens must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if len(set(args.policies)) != len(args.policies):
        parser.error(f"--policies has duplicates: {args.policies}")
    if REFERENCE not in args.policies:
        args.policies = [REFERENCE, *args.policies]
    return args


def interleaved_prompts(args) -> list[tuple[str, int, str]]:
    """(dataset, line, first turn), round-robin over the datasets, enough for the largest level."""
    needed = max(args.concurrency) * args.waves
    per_set = -(-needed // len(args.datasets))
    sets = [load_dataset(spec, split="test", limit=per_set, max_turns=1) for spec in args.datasets]
    prompts = []
    for i in range(needed):
        d = sets[i % len(sets)]
        conversation = d.conversations[(i // len(sets)) % len(d.conversations)]
        prompts.append((d.name, conversation.index, conversation.turns[0]))
    return prompts


def run(args) -> dict:
    import torch
    from rich.console import Console
    from tqdm import tqdm

    from dspark.drafters import as_batch_drafter, resolve_drafter
    from dspark.drafters.factory import has_confidences
    from dspark.engine import GenerationRequest
    from dspark.engine.build import build_engine, cost_table_for, drafter_calibration, load_drafter
    from dspark.errors import DsparkError
    from dspark.sampling import SamplingParams
    from dspark.target import TargetModel

    console = Console(stderr=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    prompts = interleaved_prompts(args)
    load_avg_start = os.getloadavg()
    try:
        with console.status("loading the target model"):
            target = TargetModel.load(args.model, device=args.device)
        spec = resolve_drafter(args.drafter, target.name)  # read once: the drafter, its calibration and the record agree
        drafter = as_batch_drafter(load_drafter(spec, target, gamma=args.gamma))
    except DsparkError as exc:
        raise SystemExit(f"error: {exc}") from None
    calibrate = drafter_calibration(spec)
    target.warm_up()

    cost = None
    skip: dict[str, str] = {}
    if not has_confidences(drafter):
        for name in args.policies:
            if name == "dspark" or name.startswith("threshold"):
                skip[name] = f"drafter {spec.text} gives no confidences"
                console.print(f"[yellow]{name}: skipped, {skip[name]}[/yellow]")
    if "dspark" in args.policies and "dspark" not in skip:
        most = max(args.concurrency)
        try:
            with console.status(f"cost table for R <= {most}, W <= {1 + drafter.gamma} (profiling if missing)"):
                cost = cost_table_for(
                    target, most, drafter.gamma, args.profile_dir, profile_if_missing=not args.no_profile,
                    context=args.profile_context,
                )
        except DsparkError as exc:
            raise SystemExit(f"error: {exc}") from None

    params = SamplingParams(temperature=args.temperature)
    rows: list[Row] = []
    def engine_for(name: str, c: int):
        # A fresh drafter and policy per run: a scheduler, lookup's counts and its store of
        # earlier requests learn within one run only (a repeat must not find its own answers).
        return build_engine(target, spec, name, max_batch=c, gamma=args.gamma, calibrate=calibrate, cost=cost)

    runnable = [name for name in args.policies if name not in skip]
    with tqdm(total=len(args.concurrency) * len(runnable) * args.repeats, unit="run", dynamic_ncols=True) as progress:
        for level_index, c in enumerate(args.concurrency):
            requests = [
                GenerationRequest(
                    target.encode_prompt(text), params, max_new_tokens=args.max_new_tokens,
                    seed=args.seed + i, ignore_eos=args.ignore_eos,
                )
                for i, (_, _, text) in enumerate(prompts[: c * args.waves])
            ]
            failed: dict[str, str] = dict(skip)
            progress.set_description(f"c={c} warm-up")
            for name in runnable:  # allocators and kernels meet this batch size before timing
                try:
                    engine_for(name, c).generate([replace(r, max_new_tokens=4) for r in requests[:c]])
                except DsparkError as exc:
                    failed[name] = str(exc)
                    progress.write(f"c={c} {name}: skipped: {exc}")
            runs: dict[str, list[tuple[int, object]]] = {name: [] for name in args.policies}
            for repeat in range(args.repeats):
                shift = (level_index + repeat) % len(args.policies)
                order = [n for n in args.policies[shift:] + args.policies[:shift] if n not in failed]
                for position, name in enumerate(order):
                    progress.set_description(f"c={c} {name} #{repeat + 1}")
                    batch = engine_for(name, c).generate(requests)
                    runs[name].append((position, batch))
                    progress.set_postfix_str(f"{batch.stats.tokens_per_second:.1f} tok/s")
                    progress.update()
            best = {n: max(r, key=lambda pb: pb[1].stats.tokens_per_second) for n, r in runs.items() if r}
            plain = best[REFERENCE][1] if REFERENCE in best else "plain decoding failed"
            for name in args.policies:
                if name in failed:
                    rows.append(summarize(c, name, 0, failed[name], plain, params.greedy))
                    continue
                position, batch = best[name]
                row = summarize(c, name, position, batch, plain, params.greedy)
                rows.append(replace(row, runs_tokens_per_s=[b.stats.tokens_per_second for _, b in runs[name]]))

    return {
        "benchmark": "concurrency",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "benchmarks/speed/bench_concurrency.py", *sys.argv[1:]]),
        "machine": {**machine_info(target), "load_avg_start": load_avg_start, "load_avg_end": os.getloadavg()},
        "git": git_state(),
        "model": target.name,
        "settings": {
            "concurrency": args.concurrency,
            "policies": args.policies,
            "drafter": spec.text,
            "drafter_name": drafter.name,
            "drafter_gamma": drafter.gamma,
            "calibrated": calibrate is not None,
            "waves": args.waves,
            "repeats": args.repeats,
            "max_new_tokens": args.max_new_tokens,
            "ignore_eos": args.ignore_eos,
            "temperature": args.temperature,
            "seed": args.seed,
            "prompts": [{"dataset": d, "line": line} for d, line, _ in prompts],
            "order": "per level: a short warm-up run of every policy, then --repeats rounds of all policies back to "
                     "back, the order rotating by one each level and round; each row is its policy's fastest round",
        },
        "cost_table": cost.to_json() if cost is not None else None,
        "rows": [asdict(r) for r in rows],
    }


def summarize(c: int, name: str, position: int, batch, plain, greedy: bool) -> Row:
    if isinstance(batch, str):
        return Row(concurrency=c, policy=name, run_order=position, skipped=batch)
    stats = batch.stats.to_dict()
    per_user = [r.stats.new_tokens / r.stats.wall_s for r in batch.results if r.stats.wall_s > 0]
    full = [st for st in batch.stats.steps if st.requests == c]
    full_s = sum(st.draft_s + st.schedule_s + st.verify_s for st in full)
    same = None
    if greedy and not isinstance(plain, str):
        same = sum(a.token_ids == b.token_ids for a, b in zip(batch.results, plain.results))
    return Row(
        concurrency=c, policy=name, run_order=position, requests=len(batch.results),
        new_tokens=stats["new_tokens"], wall_s=stats["wall_s"],
        aggregate_tokens_per_s=stats["tokens_per_second"],
        per_user_tokens_per_s=sum(per_user) / len(per_user) if per_user else 0.0,
        verify_length=stats["verify_length"], verify_budget=1.0 + stats["verify_length"],
        mean_batch_budget=stats["mean_budget"], mean_requests=stats["mean_requests"], tau=stats["tau"],
        steps=stats["steps"], prefill_s=stats["prefill_s"], draft_s=stats["draft_s"],
        schedule_s=stats["schedule_s"], verify_s=stats["verify_s"], identical_to_plain=same,
        full_tokens_per_s=sum(st.committed for st in full) / full_s if full_s > 0 else 0.0,
        full_share=len(full) / len(batch.stats.steps) if batch.stats.steps else 0.0,
    )


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["skipped"] is None]
    policies = [p for p in report["settings"]["policies"] if any(r["policy"] == p for r in rows)]
    fig, (ax7, ax8a, ax8b) = plt.subplots(1, 3, figsize=(16, 4.8))
    for policy in policies:
        rs = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rs]
        ax7.plot([r["per_user_tokens_per_s"] for r in rs], [r["aggregate_tokens_per_s"] for r in rs], "o-", label=policy)
        for r in rs:
            ax7.annotate(f"c={r['concurrency']}", (r["per_user_tokens_per_s"], r["aggregate_tokens_per_s"]),
                         textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax8a.plot(cs, [r["aggregate_tokens_per_s"] for r in rs], "o-", label=policy)
        ax8b.plot(cs, [r["verify_budget"] for r in rs], "o-", label=policy)
    ax7.set(xlabel="per-user tokens/s", ylabel="aggregate tokens/s", title="Throughput vs per-user speed (cf. Fig. 7)")
    ax8a.set(xlabel="concurrency", ylabel="aggregate tokens/s", title="Throughput vs concurrency (cf. Fig. 8a)", xscale="log")
    ax8b.set(xlabel="concurrency", ylabel="verified tokens per request and step (1 + ℓ)",
             title="Verification budget vs concurrency (cf. Fig. 8c)", xscale="log")
    for ax in (ax8a, ax8b):
        levels = report["settings"]["concurrency"]
        ax.set_xticks(levels, [str(c) for c in levels])
    for ax in (ax7, ax8a, ax8b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(
        f"{report['model']} · drafter {s['drafter_name']} (γ={s['drafter_gamma']}) · T={s['temperature']:g} · "
        f"{s['max_new_tokens']} new tokens · {report['machine']['device']}, {report['machine']['torch_num_threads']} threads",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    table = Table(title=f"{report['model']} · drafter {s['drafter_name']} · T={s['temperature']:g} · {s['max_new_tokens']} new tokens")
    for name in ["c", "policy", "agg tok/s", "runs", "all-c tok/s", "user tok/s", "ℓ/req/step", "τ", "steps", "== plain"]:
        table.add_column(name, justify="left" if name == "policy" else "right")
    previous = None
    for r in report["rows"]:
        if previous is not None and r["concurrency"] != previous:
            table.add_section()
        previous = r["concurrency"]
        if r["skipped"]:
            table.add_row(str(r["concurrency"]), r["policy"], "[yellow]skipped[/yellow]", *[""] * 7)
            continue
        same = "" if r["identical_to_plain"] is None else f"{r['identical_to_plain']}/{r['requests']}"
        if r["identical_to_plain"] is not None and r["identical_to_plain"] != r["requests"]:
            same = f"[red]{same}[/red]"
        table.add_row(
            str(r["concurrency"]), r["policy"], f"{r['aggregate_tokens_per_s']:.1f}",
            " ".join(f"{v:.0f}" for v in r.get("runs_tokens_per_s") or []),
            f"{r.get('full_tokens_per_s', 0.0):.1f} ({r.get('full_share', 0.0):.0%})", f"{r['per_user_tokens_per_s']:.1f}",
            f"{r['verify_length']:.2f}", f"{r['tau']:.2f}", str(r["steps"]), same,
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_report(args.out, run(args), plot=plot, table=print_table)


if __name__ == "__main__":
    main()
