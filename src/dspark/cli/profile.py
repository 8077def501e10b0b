"""``dspark profile``: measure and save the cost table SPS(R, W) the DSpark scheduler reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dspark.cli.edge import check_at_least, check_out_dir


def profile_command(
    model: Optional[str] = typer.Option(None, help="HF id, folder, .gguf or gemma3-270m; default: SmolLM2-135M-Instruct."),
    device: str = typer.Option("cpu", help="cpu | cuda[:i] | mps: the device the engine will run on."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on the CPU; on CUDA bfloat16, or float16 where the GPU lacks bf16)."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice); part of the table's key."),
    max_requests: int = typer.Option(16, help="Most concurrent requests the engine will serve."),
    max_draft: int = typer.Option(7, help="Most draft tokens per request and step (the drafter's γ)."),
    context: Optional[list[int]] = typer.Option(
        None, help="Committed tokens per request while measuring; repeat it for several (default: 256 and 1024). "
                   "The scheduler interpolates between them."),
    repeats: int = typer.Option(5, help="Timed sweeps over every step shape (the median per shape is kept)."),
    out_dir: Optional[Path] = typer.Option(None, help="Where tables live (default: $DSPARK_PROFILE_DIR or ~/.cache/dspark/profiles)."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON instead of text."),
) -> None:
    """Measure steps/s SPS(R, W) for R requests of W verification tokens each (R up to
    --max-requests, W up to 1 + --max-draft) and save it."""
    check_at_least(("--max-requests", max_requests, 1), ("--max-draft", max_draft, 0),
                   ("--context", min(context or [1]), 1), ("--repeats", repeats, 1), ("--threads", threads, 1))
    from dspark.scheduling.profiling import DEFAULT_CONTEXTS, profile_dir
    from dspark.target.loading import parse_device, parse_dtype

    context = sorted(set(context or DEFAULT_CONTEXTS))
    out_dir = check_out_dir(profile_dir(out_dir), "--out-dir")
    device = parse_device(device)
    _profile(model, device, parse_dtype(dtype, device), threads, max_requests, max_draft, context, repeats, out_dir,
             as_json)


def _profile(model, device, dtype, threads, max_requests, max_draft, context, repeats, out_dir, as_json) -> None:
    import torch
    from tqdm import tqdm

    from dspark.scheduling.profiling import default_requests, measure_cost_table
    from dspark.target import TargetModel

    if threads is not None:
        torch.set_num_threads(threads)
    target = TargetModel.load(model, device=device, dtype=dtype)
    grid = default_requests(max_requests)
    with tqdm(total=len(context) * (repeats + 1) * len(grid) * (1 + max_draft), unit="step", desc="profiling SPS(R, W)", dynamic_ncols=True) as bar:

        def progress(rows: int, width: int, sps: float) -> None:
            bar.set_postfix_str(f"R={rows} W={width} {sps:.1f} steps/s")
            bar.update()

        table = measure_cost_table(target, max_requests, max_draft, context, repeats, grid, progress=progress)
    path = table.save(out_dir)
    if as_json:
        typer.echo(json.dumps({"path": str(path), **table.to_json()}))
        return
    for at in (table, *table.longer):
        typer.echo(f"{at.key.describe()} · context {at.context} · median of {repeats} · ms per step")
        typer.echo(f"{'R':>4} " + " ".join(f"{'W=' + str(w):>8}" for w in range(1, at.max_width + 1)))
        for rows, sps in zip(at.requests, at.steps_per_s):
            typer.echo(f"{rows:>4} " + " ".join(f"{1000 / v:>8.1f}" for v in sps))
    typer.echo(f"wrote {path}", err=True)
