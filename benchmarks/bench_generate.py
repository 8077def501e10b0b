"""Tokens/s of plain decoding against speculative drafters on the default model at T = 0.

For every prompt each drafter runs the same request back to back (the order rotates from
prompt to prompt), so slow drift of the machine hits all drafters alike. Plain decoding is
drafter ``none`` in the same engine; it is always run, because it is both the speed
baseline and the greedy oracle: at T = 0 every drafter must reproduce its token ids exactly.
A mismatch is recorded and reported, never raised.

Aggregates pool a dataset: tokens/s is total new tokens over total wall time (prefill
included), speedup is the ratio of those pooled rates to ``none``'s, and τ (accepted +
bonus tokens per verification round) is the mean over prompts.

    .venv/bin/python benchmarks/bench_generate.py            # humaneval + mt-bench, 5 prompts
    .venv/bin/python benchmarks/bench_generate.py --limit 20 --drafters none ngram model:...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dspark.evaluation.runner import machine_info

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "eval"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "generate_t0.json"
REFERENCE = "none"


@dataclass(frozen=True)
class Dataset:
    """Prompts of one eval set (the first turn of each line)."""

    name: str
    """Short name used in tables: the file stem."""
    path: str
    """Where the prompts were read from."""
    prompts: tuple[str, ...]
    """First turns, in file order, at most ``--limit`` of them."""


@dataclass(frozen=True)
class Record:
    """One generation: one prompt, one drafter."""

    dataset: str
    prompt_index: int
    """Line number (0-based) in the dataset file."""
    drafter: str
    """The spec as given on the command line."""
    run_order: int
    """Position of this drafter in this prompt's back-to-back runs (0 = first)."""
    prompt_tokens: int
    new_tokens: int
    finish_reason: str
    wall_s: float
    tokens_per_s: float
    tau: float
    rounds: int
    prefill_s: float
    draft_s: float
    verify_s: float
    identical_to_plain: bool | None
    """None above T=0, where outputs legitimately differ."""
    first_mismatch: int | None
    """Index of the first new token that differs from plain decoding (None if identical)."""


@dataclass(frozen=True)
class Aggregate:
    """One dataset (or all of them) and one drafter, pooled over prompts."""

    dataset: str
    drafter: str
    prompts: int
    new_tokens: int
    wall_s: float
    tokens_per_s: float
    """Total new tokens / total wall seconds."""
    mean_tau: float
    speedup: float
    """tokens_per_s / tokens_per_s of ``none`` on the same prompts."""
    draft_s: float
    verify_s: float
    prefill_s: float
    mismatches: int
    """Prompts whose output differs from plain decoding's."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--datasets", nargs="+", default=["humaneval", "mt-bench"],
        help="names looked up as <data-dir>/<name>.jsonl, or paths to .jsonl files",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where dataset names are looked up")
    parser.add_argument("--limit", type=int, default=5, help="prompts per dataset (the first N lines)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per generation")
    parser.add_argument(
        "--drafters", nargs="+", default=[REFERENCE, "ngram"],
        help="drafter specs for make_drafter (none | ngram | model:<id>); 'none' is added if missing",
    )
    parser.add_argument("--gamma", type=int, default=None, help="draft tokens per round (drafter default if unset)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of every request's torch.Generator")
    parser.add_argument(
        "--temperature", type=float, default=0.0,
        help="sampling temperature; above 0 outputs differ from plain decoding by design, so "
        "equality is only checked at 0",
    )
    parser.add_argument("--model", default=None, help="target model spec; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default: results/generate_t<T>.json)")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.gamma is not None and args.gamma < 1:
        parser.error(f"--gamma must be >= 1, got {args.gamma}")
    if len(set(args.drafters)) != len(args.drafters):
        parser.error(f"--drafters has duplicates: {args.drafters}")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.out is None:
        args.out = DEFAULT_OUT if args.temperature == 0 else DEFAULT_OUT.with_name(f"generate_t{args.temperature:g}.json")
    if REFERENCE not in args.drafters:
        args.drafters = [REFERENCE, *args.drafters]
    return args


def resolve_dataset(spec: str, data_dir: Path) -> Path:
    """A path to an existing .jsonl, or ``<data_dir>/<spec>.jsonl``."""
    as_path = Path(spec)
    if as_path.suffix == ".jsonl" or os.sep in spec:
        if not as_path.is_file():
            raise SystemExit(f"error: dataset file {as_path} does not exist")
        return as_path
    if not data_dir.is_dir():
        raise SystemExit(
            f"error: data dir {data_dir} does not exist; pass --data-dir or give datasets as .jsonl paths"
        )
    path = data_dir / f"{spec}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in data_dir.glob("*.jsonl"))
        raise SystemExit(f"error: no dataset {spec!r} in {data_dir}; known: {', '.join(known) or 'none'}")
    return path


def load_dataset(path: Path, limit: int) -> Dataset:
    prompts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(prompts) == limit:
                break
            if not line.strip():
                continue
            try:
                turns = json.loads(line)["turns"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SystemExit(f"error: {path}:{lineno} is not {{\"turns\": [...]}}: {exc}") from None
            if not turns or not isinstance(turns[0], str):
                raise SystemExit(f"error: {path}:{lineno} has no first turn")
            prompts.append(turns[0])
    if not prompts:
        raise SystemExit(f"error: {path} holds no prompts")
    return Dataset(path.stem, str(path), tuple(prompts))


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run(args: argparse.Namespace) -> dict:
    import torch
    from rich.console import Console
    from tqdm import tqdm

    from dspark.cli import warm_up
    from dspark.drafters import make_drafter
    from dspark.engine import GenerationRequest, SpeculativeEngine
    from dspark.errors import DsparkError
    from dspark.sampling import SamplingParams
    from dspark.target import TargetModel

    console = Console(stderr=True)
    datasets = [load_dataset(resolve_dataset(s, args.data_dir), args.limit) for s in args.datasets]
    load_avg_start = os.getloadavg()
    try:
        drafters = {spec: make_drafter(spec, gamma=args.gamma) for spec in args.drafters}
        with console.status("loading the target model"):
            target = TargetModel.load(args.model)
        engines = {spec: SpeculativeEngine(target, d) for spec, d in drafters.items()}
    except DsparkError as exc:
        raise SystemExit(f"error: {exc}") from None
    warm_up(target)

    params = SamplingParams(temperature=args.temperature)
    greedy = params.greedy
    records: list[Record] = []
    total = sum(len(d.prompts) for d in datasets) * len(args.drafters)
    # tqdm rather than rich's bar: it also shows progress when stderr is a log file.
    with tqdm(total=total, unit="gen", dynamic_ncols=True) as progress:
        for dataset in datasets:
            for i, prompt in enumerate(dataset.prompts):
                request = GenerationRequest(
                    prompt_ids=target.encode_prompt(prompt),
                    params=params,
                    max_new_tokens=args.max_new_tokens,
                    seed=args.seed,
                    ignore_eos=args.ignore_eos,
                )
                shift = i % len(args.drafters)
                order = args.drafters[shift:] + args.drafters[:shift]
                results = {}
                for position, spec in enumerate(order):
                    progress.set_description(f"{dataset.name} #{i} {spec}")
                    results[spec] = (position, engines[spec].generate(request))
                    progress.set_postfix_str(f"{spec} {results[spec][1].stats.tokens_per_second:.1f} tok/s")
                    progress.update()
                plain_ids = results[REFERENCE][1].token_ids
                for spec in args.drafters:
                    position, result = results[spec]
                    stats = result.stats
                    mismatch = first_mismatch(result.token_ids, plain_ids) if greedy else None
                    if mismatch is not None:
                        progress.write(
                            f"mismatch: {dataset.name} #{i} {spec}: differs from plain decoding "
                            f"at new token {mismatch}"
                        )
                    records.append(Record(
                        dataset=dataset.name, prompt_index=i, drafter=spec, run_order=position,
                        prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens,
                        finish_reason=result.finish_reason, wall_s=stats.wall_s,
                        tokens_per_s=stats.tokens_per_second, tau=stats.tau, rounds=stats.rounds,
                        prefill_s=stats.prefill_s, draft_s=stats.draft_s, verify_s=stats.verify_s,
                        identical_to_plain=(mismatch is None) if greedy else None, first_mismatch=mismatch,
                    ))

    groups = [(d.name, [r for r in records if r.dataset == d.name]) for d in datasets]
    if len(datasets) > 1:
        groups.append(("all", records))
    aggregates = [a for name, rs in groups for a in aggregate(name, rs, args.drafters)]
    return {
        "benchmark": f"generate_t{args.temperature:g}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {**machine_info(target), "load_avg_start": load_avg_start, "load_avg_end": os.getloadavg()},
        "git": git_state(),
        "model": target.name,
        "settings": {
            "datasets": {d.name: d.path for d in datasets},
            "limit": args.limit,
            "max_new_tokens": args.max_new_tokens,
            "drafters": args.drafters,
            "drafter_names": {spec: e.drafter.name for spec, e in engines.items()},
            "gamma": args.gamma,
            "temperature": args.temperature,
            "ignore_eos": args.ignore_eos,
            "seed": args.seed,
            "order": "per prompt, all drafters back to back; the order rotates by one each prompt",
        },
        "records": [asdict(r) for r in records],
        "aggregates": [asdict(a) for a in aggregates],
    }


def aggregate(dataset: str, records: list[Record], drafters: list[str]) -> list[Aggregate]:
    rows = []
    for spec in drafters:
        rs = [r for r in records if r.drafter == spec]
        tokens, wall = sum(r.new_tokens for r in rs), sum(r.wall_s for r in rs)
        rows.append(Aggregate(
            dataset=dataset, drafter=spec, prompts=len(rs), new_tokens=tokens, wall_s=wall,
            tokens_per_s=tokens / wall if wall > 0 else 0.0,
            mean_tau=sum(r.tau for r in rs) / len(rs) if rs else 0.0,
            speedup=0.0,
            draft_s=sum(r.draft_s for r in rs), verify_s=sum(r.verify_s for r in rs),
            prefill_s=sum(r.prefill_s for r in rs),
            mismatches=sum(r.identical_to_plain is False for r in rs),
        ))
    base = next(a.tokens_per_s for a in rows if a.drafter == REFERENCE)
    return [replace(a, speedup=a.tokens_per_s / base if base > 0 else 0.0) for a in rows]


def git_state() -> dict | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head, "src_dirty": bool(dirty)}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    settings = report["settings"]
    table = Table(
        title=f"{report['model']} · T={settings['temperature']:g} · {settings['limit']} prompts/dataset · "
        f"{settings['max_new_tokens']} new tokens · {report['machine']['torch_num_threads']} threads",
    )
    for name, justify in [
        ("dataset", "left"), ("drafter", "left"), ("tokens", "right"), ("wall s", "right"),
        ("tok/s", "right"), ("mean τ", "right"), ("speedup", "right"),
        ("draft s", "right"), ("verify s", "right"), ("== plain", "right"),
    ]:
        table.add_column(name, justify=justify)
    previous = None
    for a in report["aggregates"]:
        if previous is not None and a["dataset"] != previous:
            table.add_section()
        previous = a["dataset"]
        same = a["prompts"] - a["mismatches"]
        table.add_row(
            a["dataset"], a["drafter"], str(a["new_tokens"]), f"{a['wall_s']:.1f}",
            f"{a['tokens_per_s']:.1f}", f"{a['mean_tau']:.2f}", f"{a['speedup']:.2f}x",
            f"{a['draft_s']:.2f}", f"{a['verify_s']:.1f}",
            f"{same}/{a['prompts']}" if not a["mismatches"] else f"[red]{same}/{a['prompts']}[/red]",
        )
    console = Console()
    if not console.is_terminal:  # rich would squeeze the table into 80 columns in a log file
        console = Console(width=120)
    console.print(table)
    load = max(report["machine"]["load_avg_start"][0], report["machine"]["load_avg_end"][0])
    if load > 0.5 * (report["machine"]["cpu_count"] or 1):
        console.print(
            f"[yellow]warning:[/yellow] 1-minute load average reached {load:.1f} on "
            f"{report['machine']['cpu_count']} CPUs; other processes may have skewed these timings"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_table(report)
    mismatches = [r for r in report["records"] if r["identical_to_plain"] is False]
    if mismatches:
        print(f"{len(mismatches)} generation(s) differ from plain decoding:", file=sys.stderr)
        for r in mismatches:
            print(f"  {r['dataset']} #{r['prompt_index']} {r['drafter']}: first differs at token {r['first_mismatch']}",
                  file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
