"""Where a result came from: the machine, the checkout, and the whole results.json of an eval."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Mapping, Sequence

from dspark.evaluation.aggregate import Aggregate
from dspark.evaluation.datasets import EvalDataset
from dspark.evaluation.runner import REFERENCE, EvalSettings, GenerationRecord


def machine_info(target) -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(target.device),
        "dtype": str(next(target.model.parameters()).dtype),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def git_state() -> dict | None:
    """HEAD and whether src/ has uncommitted changes, when dspark runs from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here.parent, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head.stdout.strip(), "src_dirty": bool(dirty.stdout.strip())}


def results_dict(
    *,
    model: str,
    datasets: Sequence[EvalDataset],
    drafters: Mapping[str, str],
    settings: EvalSettings,
    gamma: int | None,
    records: Sequence[GenerationRecord],
    policies: Mapping[str, str | None] | None = None,
    aggregates: Sequence[Aggregate],
    machine: dict,
    load_avg_end: list[float] | None = None,
    lookup_store: int | None = None,
) -> dict:
    """Everything results.json holds (report.py renders it); ``lookup_store``: the ids of
    earlier turns prompt lookup kept (None: no drafter looks up)."""
    return {
        "kind": "dspark-eval",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "model": model,
        "machine": {**machine, "load_avg_end": load_avg_end},
        "git": git_state(),
        "settings": {
            **asdict(settings),
            "gamma": gamma,
            "lookup_store": lookup_store,
            "drafters": dict(drafters),
            "policies": dict(policies or {}),
            "reference": REFERENCE,
            "datasets": {d.name: {"path": d.path, "domain": d.domain, "split": d.split,
                                  "conversations": len(d.conversations), "turns": d.num_turns} for d in datasets},
            "order": "per turn, all drafters back to back; the order rotates by one every turn",
        },
        "aggregates": [asdict(a) for a in aggregates],
        "records": [r.to_json() for r in records],
    }


def write_report(out: Path, report: dict, plot: Callable[[dict, Path], None] | None = None,
                 table: Callable[[dict], None] | None = None) -> None:
    """Write a benchmark's JSON to ``out``, its plot beside it (same name, .png) and its table."""
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written = [str(out)]
    if plot is not None:
        plot(report, out.with_suffix(".png"))
        written.append(str(out.with_suffix(".png")))
    if table is not None:
        table(report)
    print(f"wrote {' and '.join(written)}", file=sys.stderr)
