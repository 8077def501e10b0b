"""Held-out τ against training tokens and steps, for every checkpoint of one or more runs.

Each checkpoint ``step_*`` of each run is scored on one fixed held-out set (prompts held out
by id from the given stores, so never trained on, and never the evaluation sets): the T = 0
τ (1 + Σ_k fraction of blocks whose slots 1..k all match the target's argmax; exact on
greedily regenerated text, a proxy on text the target did not write) and the T = 1 soft
estimate (1 + Σ_k Π_{i≤k} a_i). Training tokens per checkpoint come from replaying the run's
deterministic batches over its own data. A log-linear fit τ_0(tokens) = a + b·ln(tokens) over
each run's points says what more data of the same kind would buy.

    .venv/bin/python benchmarks/studies/scaling_study.py --runs runs/v3_dspark \\
        --run-data runs/data/sharegpt-text-20 --heldout runs/data/sharegpt-text-20 \\
        --out benchmarks/results/scaling
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def tokens_seen(run: Path, data: list[Path], max_length: int) -> dict[int, dict]:
    """step -> sequence / response tokens and blocks seen up to that step, by batch replay."""
    from dspark.training.batches import global_batch_indices, make_batch
    from dspark.training.data.sequences import load_sequences, split_heldout

    config = json.loads((run / "train_config.json").read_text())
    sequences = split_heldout(load_sequences(data, max_length=max_length, progress=False)).train
    record = json.loads((run / "train_data.json").read_text())
    if record["sequences"] != len(sequences):
        raise SystemExit(f"error: {run} was trained on {record['sequences']} sequences, --run-data gives {len(sequences)}")
    steps = sorted(int(p.name.split("_")[1]) for p in run.glob("step_*"))
    out, tokens, loss_tokens, blocks = {}, 0, 0, 0
    for step in range(max(steps, default=0)):
        indices = global_batch_indices(step, config["batch_size"], len(sequences), config["seed"])
        batch = make_batch(sequences, indices, config["anchors_per_sequence"], step, config["seed"])
        tokens += int(batch.attention_mask.sum())
        loss_tokens += int(batch.loss_mask.sum())
        blocks += int((batch.anchors >= 0).sum())
        if step + 1 in steps:
            out[step + 1] = {"tokens": tokens, "response_tokens": loss_tokens, "blocks": blocks}
    return out


def fit_log_linear(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares y = a + b·ln(x); None for fewer than 2 points."""
    if len(xs) < 2:
        return None
    lx = [math.log(x) for x in xs]
    mx, my = sum(lx) / len(lx), sum(ys) / len(ys)
    sxx = sum((v - mx) ** 2 for v in lx)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ys)) / sxx if sxx > 0 else 0.0
    a = my - b * mx
    fit = {"a": a, "b_per_ln_token": b, "tau_gain_per_doubling": b * math.log(2)}
    return {**fit, "tokens_for_tau": {str(t): tokens_for_tau(fit, t) for t in (2.0, 2.5)}}


def tokens_for_tau(fit: dict, tau: float) -> float | None:
    """Training tokens at which the fit τ = a + b·ln(tokens) reaches ``tau`` (None: a flat fit)."""
    if fit["b_per_ln_token"] <= 0:
        return None
    return math.exp((tau - fit["a"]) / fit["b_per_ln_token"])


def training_rate(run: Path, seen: dict[int, dict]) -> dict | None:
    """Sequence tokens per second of wall time the run trained at (its own log's clock, at the
    latest checkpoint step it logged; held-out scoring at checkpoints included)."""
    log = run / "train_log.jsonl"
    if not log.is_file():
        return None
    elapsed = {e["step"]: e["elapsed_s"] for e in map(json.loads, log.read_text().splitlines()) if "elapsed_s" in e}
    steps = [s for s in seen if s in elapsed]
    if not steps:
        return None
    step = max(steps)
    return {"step": step, "elapsed_s": elapsed[step], "tokens_per_s": seen[step]["tokens"] / elapsed[step]}


def with_hours(fit: dict | None, rate: dict | None) -> dict | None:
    """The fit plus the hours of training at ``rate`` its tokens_for_tau would take."""
    if fit is None or rate is None:
        return fit
    hours = {k: (v / rate["tokens_per_s"] / 3600 if v is not None else None) for k, v in fit["tokens_for_tau"].items()}
    return {**fit, "hours_for_tau_at_this_rate": hours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, type=Path)
    parser.add_argument("--run-data", nargs="+", required=True, type=Path, help="the stores the runs trained on")
    parser.add_argument("--heldout", nargs="+", required=True, type=Path, help="stores whose held-out split scores")
    parser.add_argument("--heldout-all", action="store_true",
                        help="score on every sequence of --heldout (stores the runs never trained on)")
    parser.add_argument("--heldout-source", nargs="*", default=None,
                        help="keep only held-out sequences whose id is from these sources (e.g. magpie-code magpie-math)")
    parser.add_argument("--heldout-batches", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling"))
    args = parser.parse_args()

    import dataclasses

    import torch

    torch.set_num_threads(args.threads)
    from dspark.drafters.dspark import DSparkModel
    from dspark.evaluation.provenance import git_state, machine_info
    from dspark.target import TargetModel
    from dspark.training.data.sequences import load_sequences, split_heldout
    from dspark.training.data.store import ShardStore
    from dspark.training.features import OnlineFeatures
    from dspark.training.heldout import heldout_tau
    from dspark.training.step import StepContext
    from dspark.training.trainer import TrainConfig

    target = TargetModel.load(None)
    heldout = load_sequences(args.heldout, max_length=args.max_length, progress=False)
    if args.heldout_source:
        sources = {r.id: r.source for store in args.heldout for r in ShardStore.open(store).iter_records()}
        heldout = [s for s in heldout if sources.get(s.id) in set(args.heldout_source)]
    if not args.heldout_all:
        heldout = split_heldout(heldout).heldout
    if not heldout:
        raise SystemExit("error: no held-out sequences")
    result = {
        "command": "python benchmarks/studies/scaling_study.py --runs " + " ".join(map(str, args.runs))
        + " --run-data " + " ".join(map(str, args.run_data)) + " --heldout " + " ".join(map(str, args.heldout))
        + (" --heldout-all" if args.heldout_all else "")
        + (" --heldout-source " + " ".join(args.heldout_source) if args.heldout_source else "")
        + f" --heldout-batches {args.heldout_batches} --max-length {args.max_length} --threads {args.threads}",
        "machine": machine_info(target),
        "git": git_state(),
        "heldout_sequences": len(heldout),
        "runs": {},
    }
    for run in args.runs:
        saved = json.loads((run / "train_config.json").read_text())
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: tuple(v) if k == "target_layer_ids" else v for k, v in saved.items() if k in fields})
        config = dataclasses.replace(config, heldout_batches=args.heldout_batches)
        seen = tokens_seen(run, args.run_data, args.max_length)
        points = []
        for step in sorted(seen):
            model = DSparkModel.from_pretrained(run / f"step_{step:08d}")
            model.attach_target(target)
            context = StepContext(target, OnlineFeatures(target, model.config.target_layer_ids), model.config,
                                   config.loss_weights, model.draft_ids, target.device, 1)
            score = heldout_tau(model, context, heldout, config)
            points.append({"step": step, **seen[step], **dataclasses.asdict(score)})
            print(f"{run.name} step {step}: τ(T=0) {score.tau_greedy:.3f}  τ(T=1 est.) {score.tau_estimate:.3f}", flush=True)
        rate = training_rate(run, seen)
        result["runs"][run.name] = {
            "variant": config.variant,
            "points": points,
            "training_rate": rate,
            "fit_tau_greedy": with_hours(fit_log_linear([p["tokens"] for p in points], [p["tau_greedy"] for p in points]), rate),
            "fit_tau_soft": with_hours(fit_log_linear([p["tokens"] for p in points], [p["tau_estimate"] for p in points]), rate),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "scaling.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in result["runs"].items():
        pts = run["points"]
        for ax, x in zip(axes, ("tokens", "step")):
            ax.plot([p[x] for p in pts], [p["tau_greedy"] for p in pts], "o-", label=f"{name} τ at T=0")
            ax.plot([p[x] for p in pts], [p["tau_estimate"] for p in pts], "s--", label=f"{name} τ est. T=1")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training tokens seen (sequence tokens)")
    axes[1].set_xlabel("optimizer steps")
    for ax in axes:
        ax.set_ylabel(f"held-out τ ({result['heldout_sequences']} held-out sequences)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DSpark drafter for SmolLM2-135M-Instruct: held-out τ against training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
