"""Rendering: rich tables on the terminal, results.json, PNG plots (Agg) and report.md.

Everything here reads the plain dicts that ``provenance.results_dict`` and
``rollouts.calibration_report`` build, so a stored results.json can be rendered again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from dspark.evaluation.runner import REFERENCE


# -- JSON -------------------------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """NaN and ±inf become null: results.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:{spec}}{suffix}"


def short_labels(specs: Sequence[str]) -> dict[str, str]:
    """``dspark:/long/path/smollm2-dspark`` -> ``dspark:smollm2-dspark`` where that stays unique."""
    from dspark.drafters.factory import HYBRID, resolve_drafter

    labels = {}
    for spec in specs:
        d = resolve_drafter(spec)
        long = d.arg and ("/" in d.arg or "\\" in d.arg)
        labels[spec] = f"{d.kind}:{Path(d.arg).name}{HYBRID if d.hybrid else ''}" if long else spec
    if len(set(labels.values())) < len(labels):
        return {spec: spec for spec in specs}
    return labels


def _labels(results: dict) -> dict[str, str]:
    return short_labels(list(dict.fromkeys(a["drafter"] for a in results["aggregates"])))


def _pct(x: float | None) -> str:
    return _fmt(None if x is None else 100 * x, ".1f", "%")


def _curve(values: Sequence[float | None]) -> str:
    return " ".join(_fmt(v, ".2f").lstrip("0") if v is not None and v < 1 else _fmt(v, ".2f") for v in values)


# -- eval: terminal and markdown tables -------------------------------------------------------
EVAL_COLUMNS = ["dataset", "drafter", "tok/s", "speedup", "τ", "verify rate", "cond. acceptance k=1..γ",
                "prefill/draft/verify/other %", "ideal", "efficiency", "== plain"]


def eval_rows(results: dict) -> list[list[str]]:
    rows, labels = [], _labels(results)
    for a in results["aggregates"]:
        parts = [a["prefill_s"], a["draft_s"], a["verify_s"], a["overhead_s"]]
        wall = sum(p or 0.0 for p in parts)
        split = "/".join(_fmt(100 * (p or 0.0) / wall, ".0f") for p in parts) if wall > 0 else "–"
        same = a["generations"] - a["mismatches"]
        greedy = results["settings"]["temperature"] == 0
        rows.append([
            a["dataset"], labels[a["drafter"]], _fmt(a["tokens_per_s"], ".1f"), _fmt(a["speedup"], ".2f", "x"),
            _fmt(a["tau"]), _fmt(a["verify_rate"], ".2f"), _curve(a["conditional_acceptance"]) or "–", split,
            _fmt(a["ideal_speedup"], ".2f", "x"), _fmt(a["efficiency"], ".2f"),
            (f"{same}/{a['generations']}" + (f" ({a['near_tie_mismatches']} near-tie)" if a.get("near_tie_mismatches") else "")
             if greedy else "n/a"),
        ])
    return rows


def print_eval_table(results: dict, console=None) -> None:
    from rich.table import Table

    s = results["settings"]
    table = Table(title=f"{results['model']} · T={s['temperature']:g} · ≤{s['max_new_tokens']} new tokens · "
                        f"{results['machine']['device']} · {results['machine']['torch_num_threads']} threads")
    for i, name in enumerate(EVAL_COLUMNS):
        table.add_column(name, justify="left" if i < 2 else "right")
    previous = None
    for row in eval_rows(results):
        if previous is not None and row[0] != previous:
            table.add_section()
        previous = row[0]
        if row[-1] not in ("n/a",) and row[-1].split("/")[0] != row[-1].split("/")[1]:
            row[-1] = f"[red]{row[-1]}[/red]"
        table.add_row(*row)
    console = console or _console()
    console.print(table)
    load = max((results["machine"].get("load_avg") or [0])[0], (results["machine"].get("load_avg_end") or [0])[0])
    cpus = results["machine"].get("cpu_count") or 1
    if load > 0.5 * cpus:
        console.print(f"[yellow]warning:[/yellow] 1-minute load average reached {load:.1f} on {cpus} CPUs; "
                      "other processes may have skewed these timings")


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # rich would squeeze the table into 80 columns in a log file
        console = Console(width=160)
    return console


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- eval: plots ------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _per_dataset(results: dict) -> tuple[list[str], list[str], dict]:
    rows = {(a["dataset"], a["drafter"]): a for a in results["aggregates"]}
    datasets = list(dict.fromkeys(a["dataset"] for a in results["aggregates"]))
    drafters = list(dict.fromkeys(a["drafter"] for a in results["aggregates"]))
    return datasets, drafters, rows


def plot_tau(results: dict, path: Path) -> Path:
    """Grouped bars: τ per dataset per drafter (plain decoding's τ = 1 is left out)."""
    plt = _pyplot()
    datasets, drafters, rows = _per_dataset(results)
    drafters = [d for d in drafters if d != REFERENCE] or drafters
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(datasets) * max(1, len(drafters)) / 2 + 2), 3.6))
    width = 0.8 / len(drafters)
    for j, spec in enumerate(drafters):
        xs = [i + (j - (len(drafters) - 1) / 2) * width for i in range(len(datasets))]
        ys = [rows[(d, spec)]["tau"] or 0.0 for d in datasets]
        bars = ax.bar(xs, ys, width, label=_labels(results)[spec])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("τ (accepted + bonus per round)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    ax.set_title("Accepted length τ")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_conditional_acceptance(results: dict, path: Path) -> Path:
    """One panel per dataset: conditional acceptance per draft position, a line per drafter (Figure 2)."""
    plt = _pyplot()
    datasets, drafters, rows = _per_dataset(results)
    drafters = [d for d in drafters if d != REFERENCE]
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.2 * len(datasets) + 0.8, 3.2), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for spec in drafters:
            ys = rows[(d, spec)]["conditional_acceptance"]
            if ys:
                ax.plot(range(1, len(ys) + 1), [math.nan if y is None else y for y in ys], marker="o",
                        label=_labels(results)[spec])
        ax.set_title(d)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("draft position k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("conditional acceptance")
    if drafters:
        axes[0][-1].legend(fontsize=8)
    fig.suptitle("Position-wise conditional acceptance (all earlier slots accepted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_time_split(results: dict, path: Path) -> Path:
    """Stacked seconds per generated token (prefill, draft, verify, other), speedup on top."""
    plt = _pyplot()
    aggs = [a for a in results["aggregates"]]
    names = _labels(results)
    labels = [f"{a['dataset']}\n{names[a['drafter']]}" for a in aggs]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(aggs) + 1.5), 3.8))
    bottom = [0.0] * len(aggs)
    for key, name in [("prefill_s", "prefill"), ("draft_s", "draft"), ("verify_s", "verify"), ("overhead_s", "other")]:
        ys = [1000 * (a[key] or 0.0) / max(a["new_tokens"], 1) for a in aggs]
        ax.bar(range(len(aggs)), ys, 0.7, bottom=bottom, label=name)
        bottom = [b + y for b, y in zip(bottom, ys)]
    for i, a in enumerate(aggs):
        ax.text(i, bottom[i], _fmt(a["speedup"], ".2f", "x"), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(aggs)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("ms per generated token")
    ax.legend(fontsize=8)
    ax.set_title("Where the time goes (label: speedup over plain decoding)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_eval_report(results: dict, out: Path, plots: bool = True) -> dict[str, Path]:
    """results.json, the PNGs and report.md in ``out``; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"results": write_json(out / "results.json", results)}
    if plots:
        written["tau"] = plot_tau(results, out / "tau.png")
        written["conditional_acceptance"] = plot_conditional_acceptance(results, out / "conditional_acceptance.png")
        written["time_split"] = plot_time_split(results, out / "time_split.png")
    (out / "report.md").write_text(eval_markdown(results, plots), encoding="utf-8")
    written["report"] = out / "report.md"
    return written


def eval_markdown(results: dict, plots: bool = True) -> str:
    s, m = results["settings"], results["machine"]
    sets = ", ".join(f"{k} ({v['turns']} turns, {v['split']} split)" for k, v in s["datasets"].items())
    lines = [
        "# dspark eval", "",
        f"- model: `{results['model']}`; drafters: {', '.join(f'`{k}`' for k in s['drafters'])} "
        f"(plain decoding `{REFERENCE}` is the reference)",
        f"- datasets: {sets}",
        f"- temperature {s['temperature']:g}, ≤ {s['max_new_tokens']} new tokens per turn, seed {s['seed']}, "
        f"γ {s['gamma'] if s['gamma'] is not None else 'drafter default'}"
        + (f"; prompt lookup also matches the last {s['lookup_store']} ids of earlier turns" if s.get("lookup_store") else ""),
        "- verification: " + (", ".join(f"`{k}` {v}" for k, v in s["policies"].items())
                              if any((s.get("policies") or {}).values())
                              else "every round verifies the whole drafted block"),
        f"- machine: {m['device']}, {m['dtype']}, {m['torch_num_threads']} threads, torch {m['torch']}, "
        f"load average {_fmt((m.get('load_avg') or [math.nan])[0])} → {_fmt((m.get('load_avg_end') or [math.nan])[0])}",
        f"- date {results['date']}" + (f", commit {results['git']['commit'][:10]}"
                                        f"{' (src dirty)' if results['git']['src_dirty'] else ''}" if results.get("git") else ""),
        "",
        markdown_table(EVAL_COLUMNS, eval_rows(results)),
        "",
        "Definitions: τ = committed tokens per round (accepted + bonus); verify rate = Σ(accepted + 1) / "
        "Σ(verified + 1); conditional acceptance at k = Pr[slot k accepted | slots 1..k−1 accepted]; "
        "speedup = tokens/s over plain decoding's on the same turns, run back to back in rotating order, "
        "wall time around the whole generate() call; ideal = τ·T_target(1)/(T_draft + T_verify) with "
        "per-round costs from this run; efficiency = speedup / ideal (what prefill and Python overhead cost; "
        "prefill is shared by both runs, so it pulls a speedup below 1 up and can push efficiency above 1); "
        "== plain counts greedy outputs identical to plain decoding's, and how many of the others part at a near-tie "
        "(the target's top-2 logits within 1e-3 there: 1-token and k-token forwards round apart; a larger gap is a bug).",
        "",
    ]
    if plots:
        lines += ["![τ per dataset and drafter](tau.png)", "",
                  "![conditional acceptance per position](conditional_acceptance.png)", "",
                  "![time split](time_split.png)", ""]
    checks = [a for a in results["aggregates"] if a.get("confidence")]
    if checks:
        lines += ["## Confidence head on the test split", "",
                  "ECE of a_k = ∏c_i against prefix survival per slot, raw → calibrated (calibration.json), "
                  "and the ROC-AUC of raw a_k (confidences: DSpark's head, n-gram's online estimate; "
                  "rounds that verified slot k only).", ""]
        header = ["dataset", "drafter"] + [f"k={r['slot']}" for r in checks[0]["confidence"]["raw"]]
        rows = []
        for a in checks:
            raw, cal = a["confidence"]["raw"], a["confidence"]["calibrated"]
            cells = [_fmt(r["ece"], ".3f") + (f" → {_fmt(c['ece'], '.3f')}" if cal else "") + f", AUC {_fmt(r['auc'], '.2f')}"
                     for r, c in zip(raw, cal or raw)]
            rows.append([a["dataset"], _labels(results)[a["drafter"]], *cells])
        lines += [markdown_table(header[: len(rows[0])], rows), ""]
    mixed = [a for a in results["aggregates"] if a.get("sources")]
    if mixed:
        lines += ["## Sources of a hybrid's rounds", "",
                  "Per source: rounds it drafted, drafted tokens verified and accepted.", ""]
        rows = []
        for a in mixed:
            total = sum(v["rounds"] for v in a["sources"].values())
            for source, v in sorted(a["sources"].items()):
                rows.append([a["dataset"], _labels(results)[a["drafter"]], source, str(v["rounds"]),
                             _pct(v["rounds"] / total) if total else "–", str(v["verified"]), str(v["accepted"]),
                             _fmt(v["accepted"] / v["verified"], ".2f") if v["verified"] else "–"])
        lines += [markdown_table(["dataset", "drafter", "source", "rounds", "share", "verified", "accepted",
                                  "accepted / verified"], rows), ""]
    return "\n".join(lines)


# -- calibrate ----------------------------------------------------------------------------------
CALIBRATION_COLUMNS = ["slot k", "rounds", "survival", "T_k", "mean a_k before → after",
                       "ECE before → after", "ROC-AUC before → after", "Brier before → after"]


def calibration_rows(report: dict) -> list[list[str]]:
    rows = []
    for before, after, t in zip(report["before"], report["after"], report["temperatures"]):
        rows.append([
            str(before["slot"]), str(before["count"]), _fmt(before["survival"], ".3f"), _fmt(t, ".3f"),
            f"{_fmt(before['mean_pred'], '.3f')} → {_fmt(after['mean_pred'], '.3f')}",
            f"{_fmt(before['ece'], '.4f')} → {_fmt(after['ece'], '.4f')}",
            f"{_fmt(before['auc'], '.3f')} → {_fmt(after['auc'], '.3f')}",
            f"{_fmt(before['brier'], '.4f')} → {_fmt(after['brier'], '.4f')}",
        ])
    return rows


def print_calibration_table(report: dict, console=None) -> None:
    from rich.table import Table

    table = Table(title=f"Sequential Temperature Scaling · {report['drafter']} · {report['rounds']} rounds")
    for i, name in enumerate(CALIBRATION_COLUMNS):
        table.add_column(name, justify="right")
    for row in calibration_rows(report):
        table.add_row(*row)
    sweep = Table(title="Static-threshold sweep on calibrated a_k: accepted / rejected tokens per step, acceptance rate")
    sweep.add_column("threshold", justify="right")
    for name in report["sweep"]:
        sweep.add_column(name, justify="right")
    columns = [report["sweep"][name]["calibrated"] for name in report["sweep"]]
    for i, p in enumerate(columns[0]):
        sweep.add_row(_fmt(p["threshold"]), *(
            f"{_fmt(c[i]['accepted_per_step'])} / {_fmt(c[i]['rejected_per_step'])} · "
            f"{_fmt(100 * c[i]['acceptance_rate'], '.1f', '%')}" for c in columns))
    console = console or _console()
    console.print(table)
    console.print(sweep)


def plot_reliability(report: dict, path: Path) -> Path:
    """Reliability diagram per slot (Figure 6): observed survival vs predicted a_k, before and after."""
    plt = _pyplot()
    curves = report["reliability"]
    slots = len(curves["before"])
    cols = min(slots, 4)
    rows = math.ceil(slots / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= slots:
            ax.axis("off")
            continue
        before, after = curves["before"][k], curves["after"][k]
        edges = before["edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        hist = ax.twinx()
        hist.bar(centers, before["counts"], width=1 / len(centers), color="grey", alpha=0.15, label="rounds (before)")
        hist.set_yticks([])
        ax.set_zorder(hist.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="perfect calibration")
        for curve, marker, label in ((before, "o", "before calibration"), (after, "s", "after calibration")):
            xs = [math.nan if x is None else x for x in curve["mean_pred"]]
            ys = [math.nan if y is None else y for y in curve["observed"]]
            ax.plot(xs, ys, marker=marker, ms=3, label=label)
        b, a = report["before"][k], report["after"][k]
        ax.text(0.03, 0.97, f"ECE {_pct(b['ece'])} → {_pct(a['ece'])}\n"
                            f"AUC {_fmt(a['auc'], '.3f')}", transform=ax.transAxes, va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        ax.set_title(f"position {k + 1} (T = {report['temperatures'][k]:.2f})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        if k % cols == 0:
            ax.set_ylabel("observed prefix survival")
        if k // cols == rows - 1:
            ax.set_xlabel("predicted a_k = ∏ c_i")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_threshold_sweep(report: dict, path: Path) -> Path:
    """Per dataset: accepted and rejected tokens per step (bars), acceptance rate (line) per threshold (Figure 5)."""
    plt = _pyplot()
    names = list(report["sweep"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = report["sweep"][name]["calibrated"]
        xs = [p["threshold"] for p in points]
        acc = [p["accepted_per_step"] for p in points]
        rej = [p["rejected_per_step"] for p in points]
        width = 0.8 * (xs[1] - xs[0]) if len(xs) > 1 else 0.05
        ax.bar(xs, acc, width, label="accepted tokens (incl. bonus)")
        ax.bar(xs, rej, width, bottom=acc, hatch="//", alpha=0.6, label="rejected tokens")
        ax.set_xlabel("threshold on calibrated a_k")
        rate = ax.twinx()
        rate.plot(xs, [100 * p["acceptance_rate"] for p in points], color="black", marker="o", ms=3,
                  label="acceptance rate")
        rate.set_ylim(0, 105)
        ax.set_title(f"{name} ({report['sweep'][name]['rounds']} rounds)", fontsize=10)
    axes[0][0].set_ylabel("avg. tokens per step")
    rate.set_ylabel("acceptance rate (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    more = rate.get_legend_handles_labels()
    fig.legend(handles + more[0], labels + more[1], fontsize=8, loc="lower center", ncol=3)
    fig.suptitle("Static confidence-threshold sweep", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
