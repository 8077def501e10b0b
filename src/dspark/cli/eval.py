"""``dspark eval`` and ``dspark calibrate``. Only typer is imported at module top.

The work is in :mod:`dspark.evaluation` (the engines: :mod:`~dspark.evaluation.engines`; the
eval loop: :mod:`~dspark.evaluation.runner`; the calibration rollouts and fit:
:mod:`~dspark.evaluation.rollouts`). Failures raise :class:`~dspark.errors.DsparkError`; the
CLI's boundary (:mod:`dspark.cli.edge`) prints them as one line. Outputs are checked before
any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dspark.cli.edge import check_at_least, check_out_dir
from dspark.errors import DsparkError

BUILTIN_HELP = "gsm8k, humaneval, mbpp, mt-bench"


def eval_command(
    dataset: Optional[List[str]] = typer.Option(
        None, "--dataset", help=f"Built-in set ({BUILTIN_HELP}) or a .jsonl of {{\"turns\": [...]}} (repeatable); default: all built-ins."),
    drafter: Optional[List[str]] = typer.Option(
        None, "--drafter", help="Drafter to compare (repeatable): none | ngram | model:<path> | dspark[:<folder>] | dflash:<folder> | eagle3:<folder>; "
        "default: the DSpark drafter shipped for the target with prompt lookup (dspark+ngram), else ngram. Plain decoding (none) always runs as the reference."),
    model: Optional[str] = typer.Option(None, help="Target: HF id, folder, .gguf or gemma3-270m; default SmolLM2-135M-Instruct."),
    limit: int = typer.Option(10, help="Conversations per dataset: the first N of the split."),
    max_new_tokens: int = typer.Option(256, help="Most new tokens per turn."),
    temperature: float = typer.Option(0.0, help="0 = greedy (every drafter must match plain decoding); the paper uses 1.0."),
    seed: int = typer.Option(0, help="Seed of every request's random stream."),
    gamma: Optional[int] = typer.Option(None, help="Draft tokens per round (drafter default if unset)."),
    lookup_store: Optional[int] = typer.Option(None, help="Most token ids of earlier turns (prompts and answers) that prompt lookup (ngram, dspark+ngram) keeps to match across turns, as a server keeps earlier requests' (default: 65536); 0: each turn's own ids only. A resumed run starts it empty."),
    policy: Optional[str] = typer.Option(None, help="Unset: every round verifies the whole block (τ comparable across drafters). auto | fixed[:γ] | dspark | ...: the batched engine at one request under that policy, as `dspark generate` runs (auto: dspark for drafters with confidences: DSpark's head, n-gram's online estimate, the hybrid; else fixed)."),
    split: str = typer.Option("test", help="test (first 80% of each set) or all; the last 20% belongs to `dspark calibrate`."),
    turns: Optional[int] = typer.Option(None, help="Only the first N turns of each conversation (mt-bench has 2); default all."),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Always generate --max-new-tokens tokens."),
    device: str = typer.Option("cpu", help="cpu | cuda[:i] | mps; the target and every drafter go there."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on the CPU; on CUDA bfloat16, or float16 where the GPU lacks bf16)."),
    out: Path = typer.Option(Path("dspark-eval"), help="Folder for results.json, the PNG plots and report.md; "
                             "its journal.jsonl keeps finished conversations, and a rerun with the same settings resumes."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the PNG plots."),
) -> None:
    """Compare drafters against plain decoding: τ, acceptance per position, speedup, time split."""
    check_at_least(("--limit", limit, 1), ("--gamma", gamma, 1), ("--turns", turns, 1), ("--max-new-tokens", max_new_tokens, 1),
                   ("--lookup-store", lookup_store, 0))
    if split not in ("test", "all"):
        raise DsparkError(f"--split must be test or all, got {split!r} (the calibration split belongs to `dspark calibrate`)")
    if policy is not None:
        from dspark.engine.build import check_policy

        check_policy(policy)
    check_out_dir(out)
    _eval(dataset, drafter, model, limit, max_new_tokens, temperature, seed, gamma, split, turns, ignore_eos, device,
          dtype, out, plots, policy, lookup_store)


def _eval(dataset_specs, drafter_specs, model, limit, max_new_tokens, temperature, seed, gamma, split, turns,
          ignore_eos, device, dtype, out, plots, policy=None, lookup_store=None):
    import os
    from dataclasses import asdict

    from tqdm import tqdm

    from dspark.evaluation import aggregate, provenance, report, runner
    from dspark.evaluation.datasets import builtin_names, load_dataset
    from dspark.evaluation.engines import drafter_specs as resolve_specs
    from dspark.evaluation.engines import load_engines

    settings = runner.EvalSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos)
    datasets = [load_dataset(s, split=split, limit=limit, max_turns=turns) for s in (dataset_specs or builtin_names())]
    device, dtype = _device_dtype(device, dtype)
    specs = resolve_specs(drafter_specs, model)
    if split == "all":
        typer.echo("warning: --split all includes the calibration prompts; the confidence check is not held out",
                   err=True)
    from dspark.drafters.ngram import NgramConfig

    lookup_store = NgramConfig().store_tokens if lookup_store is None else lookup_store
    loaded = load_engines(model, specs, gamma, device, dtype, policy, lookup_store)
    target, engines, calibrations = loaded.target, loaded.engines, loaded.calibrations
    encode = target.encode_conversation
    machine = provenance.machine_info(target)
    # Not an eval prompt: prompt lookup's store would hold its ids before its turn.
    runner.warm_up_engines(engines, encode([{"role": "user", "content": runner.WARM_UP_PROMPT}]))
    policies = {s: getattr(e, "policy", None) and e.policy.name for s, e in engines.items()}
    journal = runner.Journal(out / "journal.jsonl", {
        "settings": asdict(settings), "gamma": gamma, "lookup_store": lookup_store, "model": target.name, "policies": policies,
        "drafters": {s: e.drafter.name for s, e in engines.items()},
        "datasets": {d.name: [d.path, [c.index for c in d.conversations], d.num_turns] for d in datasets}})
    if journal.done:
        typer.echo(f"resuming from {journal.path}: {len(journal.done)} conversation(s) already done", err=True)
    total = sum(d.num_turns for d in datasets) * len(engines)
    # tqdm rather than rich's bar: it also shows progress (rate, ETA) when stderr is a log file.
    with tqdm(total=total, unit="gen", dynamic_ncols=True) as progress:
        records = runner.run_generations(datasets, engines, settings, encode, progress, journal, gap=target.top2_gap)
    aggregates = aggregate.aggregate(records, list(engines), calibrations)
    results = provenance.results_dict(
        model=target.name, datasets=datasets, drafters={s: e.drafter.name for s, e in engines.items()},
        settings=settings, gamma=gamma, policies=policies, lookup_store=lookup_store,
        records=records, aggregates=aggregates, machine=machine,
        load_avg_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    written = report.write_eval_report(results, out, plots=plots)
    report.print_eval_table(report.json_safe(results))
    mismatches = [r for r in records if r.identical_to_plain is False]
    for r in mismatches:
        typer.echo(f"mismatch: {r.dataset} #{r.prompt_index} turn {r.turn} {r.drafter}: differs from plain "
                   f"decoding at new token {r.first_mismatch}", err=True)
    typer.echo(f"wrote {', '.join(str(p) for p in written.values())}", err=True)


def calibrate_command(
    drafter: Optional[str] = typer.Option(None, help="dspark[:<folder>]: a drafter with a confidence head; default: the shipped one."),
    dataset: Optional[List[str]] = typer.Option(
        None, "--dataset", help=f"Built-in set ({BUILTIN_HELP}) or a .jsonl (repeatable); its calibration split "
        "(last 20%) is used; default: all built-ins."),
    model: Optional[str] = typer.Option(None, help="Target: HF id, folder, .gguf or gemma3-270m; default SmolLM2-135M-Instruct."),
    limit: int = typer.Option(10, help="Conversations per dataset: the first N of the calibration split."),
    max_new_tokens: int = typer.Option(256, help="Most new tokens per turn."),
    temperature: float = typer.Option(0.0, help="Sampling temperature of the rollouts: calibrate at the one you serve with."),
    seed: int = typer.Option(0, help="Seed of every request's random stream."),
    gamma: Optional[int] = typer.Option(None, help="Draft tokens per round (drafter default if unset)."),
    bins: int = typer.Option(15, help="Equal-width bins of the ECE and the reliability diagram."),
    min_events: int = typer.Option(10, help="Fit a slot only with at least this many survivals and rejections; else T = 1."),
    device: str = typer.Option("cpu", help="cpu | cuda[:i] | mps."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on the CPU; on CUDA bfloat16, or float16 where the GPU lacks bf16)."),
    save: bool = typer.Option(True, "--save/--no-save", help="Write calibration.json beside the drafter's weights."),
    overwrite_shipped: bool = typer.Option(
        False, "--overwrite-shipped", help="Allow --save to replace the calibration.json of the drafter shipped in the package."),
    out: Path = typer.Option(Path("dspark-calibrate"), help="Folder for calibration_report.json and the PNG plots."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write the reliability diagram and threshold sweep."),
) -> None:
    """Fit Sequential Temperature Scaling of the confidence head on real speculative rollouts."""
    check_at_least(("--limit", limit, 1), ("--bins", bins, 2), ("--gamma", gamma, 1), ("--min-events", min_events, 0),
                   ("--max-new-tokens", max_new_tokens, 1))
    from dspark.drafters import SHIPPED_DRAFTERS, resolve_drafter

    resolved = resolve_drafter(drafter or "dspark", model)  # bare dspark: the one shipped for --model
    spec, folder = resolved.text, resolved.calibration_folder
    if folder is None:
        raise DsparkError(f"calibrate needs a DSpark drafter (dspark[:<folder>]), got {spec!r}")
    check_out_dir(out)
    if save:
        if folder.resolve().is_relative_to(SHIPPED_DRAFTERS.resolve()) and not overwrite_shipped:
            raise DsparkError(
                f"--save would overwrite the shipped drafter's calibration.json in {folder}; pass "
                "--overwrite-shipped to mean it, --no-save to only report, or calibrate a copy (dspark:<folder>)"
            )
        check_out_dir(folder, "--save: the drafter folder")
    _calibrate(spec, folder, dataset, model, limit, max_new_tokens, temperature, seed, gamma, bins, min_events, device,
               dtype, save, out, plots)


def _calibrate(spec, folder, dataset_specs, model, limit, max_new_tokens, temperature, seed, gamma, bins, min_events,
               device, dtype, save, out, plots):
    from tqdm import tqdm

    from dspark.evaluation import report, rollouts, runner
    from dspark.evaluation.datasets import builtin_names, load_dataset
    from dspark.evaluation.engines import load_engines
    from dspark.scheduling.calibration import DEFAULT_GRID

    settings = runner.EvalSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    datasets = [load_dataset(s, split="calibration", limit=limit) for s in (dataset_specs or builtin_names())]
    device, dtype = _device_dtype(device, dtype)
    loaded = load_engines(model, [spec], gamma, device, dtype)
    target, engine = loaded.target, loaded.engines[spec]
    with tqdm(total=sum(d.num_turns for d in datasets), unit="turn", dynamic_ncols=True) as progress:
        rounds = rollouts.collect_rounds(datasets, engine, settings, target.encode_conversation, progress)
    if not any(rounds.values()):
        raise DsparkError("the rollouts produced no drafting rounds; raise --max-new-tokens or --limit")
    fit = rollouts.fit_calibration(rounds, bins, min_events)
    body = report.json_safe(rollouts.calibration_report(fit, spec, target.name, settings, gamma, min_events, datasets))
    out.mkdir(parents=True, exist_ok=True)
    written = [report.write_json(out / "calibration_report.json", body)]
    if plots:
        written.append(report.plot_reliability(body, out / "reliability.png"))
        written.append(report.plot_threshold_sweep(body, out / "threshold_sweep.png"))
    report.print_calibration_table(body)
    if body["unfitted_slots"]:
        typer.echo(f"warning: slot(s) {body['unfitted_slots']} saw fewer than {min_events} survivals or "
                   "rejections and keep T = 1; raise --limit or --max-new-tokens to fit them", err=True)
    stuck = rollouts.grid_edge_slots(body["temperatures"])
    if stuck:
        edges = (min(DEFAULT_GRID), max(DEFAULT_GRID))
        typer.echo(f"warning: T_k hit the edge of the grid [{edges[0]:.3g}, {edges[1]:.3g}] at slot(s) {stuck}: "
                   "no interior optimum (temperature scaling cannot move c_k across 0.5)", err=True)
    if save:
        written.append(fit.calibration.save(folder, **rollouts.saved_summary(body)))
    typer.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


# -- helpers --------------------------------------------------------------------------------------
def _device_dtype(device: str, dtype: str):
    """``--device`` and ``--dtype`` checked at the edge: (device, torch.dtype)."""
    from dspark.target.loading import parse_device, parse_dtype

    device = parse_device(device)
    return device, parse_dtype(dtype, device)
