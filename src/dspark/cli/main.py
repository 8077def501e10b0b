"""The ``dspark`` command line. Each subcommand is a typed function; help comes from it.

Heavy imports (torch, transformers) happen inside the commands so ``dspark --help`` is fast.
Every command runs inside the one error boundary of :mod:`dspark.cli.edge`: a failure is one
line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from dspark.cli.batch import batch_command
from dspark.cli.convert import convert_app
from dspark.cli.data import data_app
from dspark.cli.edge import EXIT_ERROR, EXIT_INTERRUPTED, BoundaryGroup, error_line, traceback_wanted
from dspark.cli.eval import calibrate_command, eval_command
from dspark.cli.profile import profile_command
from dspark.cli.serve import serve_command
from dspark.cli.train import train_command
from dspark.errors import DsparkError

app = typer.Typer(
    cls=BoundaryGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="dspark: lossless speculative decoding with DSpark drafters.",
)

app.add_typer(data_app, name="data")
app.add_typer(convert_app, name="convert")
app.command("train")(train_command)
app.command("profile")(profile_command)
app.command("eval")(eval_command)
app.command("calibrate")(calibrate_command)
app.command("batch")(batch_command)
app.command("serve")(serve_command)


def version() -> str:
    """The installed distribution's version, else the package's own ``__version__``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("dspark")
    except PackageNotFoundError:
        from dspark import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dspark {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                      help="Print the version and exit."),
) -> None:
    """dspark: lossless speculative decoding with DSpark drafters."""


MAX_NEW_TOKENS_CAP = 1 << 20
"""Refuse larger requests before loading anything; the context window is checked later."""


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user message (or raw text with --no-chat)."),
    model: Optional[str] = typer.Option(None, help="HF id, folder, .gguf or gemma3-270m; default: SmolLM2-135M-Instruct."),
    drafter: Optional[str] = typer.Option(None, help="none | ngram | model:<path> | dspark[:<folder>] | dflash:<folder> | eagle3:<folder> | dspark[:<folder>]+ngram; default: the DSpark drafter shipped for the target with prompt lookup (dspark+ngram), else ngram."),
    gamma: Optional[int] = typer.Option(None, help="Draft tokens per round (drafter default if unset)."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus filter in (0, 1]."),
    top_k: int = typer.Option(0, help="Top-k filter; 0 disables it."),
    max_new_tokens: int = typer.Option(256, help="Most new tokens to generate."),
    seed: int = typer.Option(0, help="Seed of the request's random stream."),
    stop: Optional[List[str]] = typer.Option(None, help="Stop string (repeatable)."),
    chat: bool = typer.Option(True, help="Apply the chat template to the prompt."),
    compare: bool = typer.Option(False, help="Also run plain decoding and report the speedup."),
    policy: str = typer.Option("auto", help="auto (dspark for a drafter with confidences: DSpark's head, n-gram's online estimate, dspark+ngram; else fixed) | plain | fixed[:γ] | gamma1 | threshold:<t> | dspark (Algorithm 1 over this machine's cost table)."),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="Measure this machine's cost table when the dspark policy has none (seconds at batch 1)."),
    device: str = typer.Option("cpu", help="cpu | cuda[:i] | mps; the target and the drafter go there."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on the CPU; on CUDA bfloat16, or float16 where the GPU lacks bf16)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Generate a continuation with speculative decoding and print a one-line summary."""
    if not prompt.strip():
        raise DsparkError("the prompt is empty")
    for what, text in [("the prompt", prompt)] + [("--stop", s) for s in stop or ()]:
        _check_utf8(what, text)
    if max_new_tokens < 1 or max_new_tokens > MAX_NEW_TOKENS_CAP:
        raise DsparkError(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS_CAP}, got {max_new_tokens}")
    if gamma is not None and gamma < 1:
        raise DsparkError(f"--gamma must be >= 1, got {gamma}")
    from dspark.engine.build import check_policy
    from dspark.target.loading import parse_device, parse_dtype, resolve

    check_policy(policy)
    device = parse_device(device)
    torch_dtype = parse_dtype(dtype, device)
    resolve(model)  # a bad --model fails before anything loads
    from dspark.sampling import SamplingParams

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    _generate(prompt, model, drafter, gamma, params, max_new_tokens, seed, tuple(stop or ()), chat, compare,
              policy, profile, device, torch_dtype, as_json)


def _check_utf8(what: str, text: str) -> None:
    """Refuse text that is not valid UTF-8: argv bytes Python could not decode arrive as surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DsparkError(f"{what} is not valid UTF-8 (undecodable byte at character {exc.start})") from None


def _generate(prompt, model, drafter_spec, gamma, params, max_new_tokens, seed, stop, chat, compare, policy,
              profile, device, dtype, as_json):
    from dspark.drafters import make_drafter, resolve_drafter
    from dspark.engine import GenerationRequest
    from dspark.engine.build import PLAIN, build_engine, drafter_calibration, hybrid_calibration
    from dspark.target import TargetModel

    # The drafter before the target: a bad spec or broken drafter files fail in a second.
    spec = resolve_drafter(drafter_spec, model)
    drafter = make_drafter(spec, gamma=gamma, device=device, dtype=dtype, calibrate=hybrid_calibration(spec))
    target = TargetModel.load(model, device=device, dtype=dtype)
    # One request is the batched engine at R = 1: the same scheduler as `dspark batch` and `serve`.
    engine = build_engine(target, drafter, policy, 1, calibrate=drafter_calibration(spec), profile_if_missing=profile)
    request = GenerationRequest(
        prompt_ids=target.encode_prompt(prompt, chat=chat),
        params=params,
        max_new_tokens=max_new_tokens,
        stop=stop,
        seed=seed,
    )
    target.warm_up()
    streamer = None if as_json else _Streamer(target, stop)
    run = engine.generate([request], on_tokens=(lambda _, ids: streamer(ids)) if streamer else None)
    result = run.results[0]
    if streamer is not None:
        streamer.finish(result.text)
    plain = None
    if compare:
        plain = build_engine(target, None, PLAIN, 1).generate([request]).results[0]
    stats = result.stats
    summary = {
        "model": target.name,
        "drafter": drafter.name,
        "policy": engine.policy.name,
        "verify_length": run.stats.verify_length,
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "tau": stats.tau,
        "rounds": stats.rounds,
        "tokens_per_second": stats.tokens_per_second,
        "stats": stats.to_dict(),
    }
    if plain is not None:
        summary["plain_tokens_per_second"] = plain.stats.tokens_per_second
        summary["speedup"] = stats.tokens_per_second / plain.stats.tokens_per_second
        summary["identical_to_plain"] = plain.token_ids == result.token_ids
        if not summary["identical_to_plain"]:  # say where, and how near a tie it was there
            at = next((i for i, (a, b) in enumerate(zip(result.token_ids, plain.token_ids)) if a != b),
                      min(len(result.token_ids), len(plain.token_ids)))
            summary["first_difference"] = at
            summary["top2_logit_gap"] = target.top2_gap(list(request.prompt_ids) + plain.token_ids[:at])
    if as_json:
        typer.echo(json.dumps(summary))
        return
    line = (
        f"[{drafter.name} / {engine.policy.name}] τ={stats.tau:.2f} · ℓ={run.stats.verify_length:.2f}"
        f" · {stats.new_tokens} tokens in {stats.rounds} rounds"
        f" · {stats.tokens_per_second:.1f} tok/s"
    )
    if plain is not None:
        line += (
            f" · plain {plain.stats.tokens_per_second:.1f} tok/s · speedup {summary['speedup']:.2f}x"
            f" · identical to plain: {'yes' if summary['identical_to_plain'] else 'no'}"
        )
        if not summary["identical_to_plain"]:
            line += (f" (differs at token {summary['first_difference']}, where the target's top-2 logits are "
                     f"{summary['top2_logit_gap']:.2g} apart: {NEAR_TIE_NOTE})")
    typer.echo(line, err=True)


NEAR_TIE_NOTE = ("a gap within float rounding is a near-tie that 1-token and k-token forwards round apart, "
                 "not an error; a larger one is a bug to report")


class _Streamer:
    """Prints committed text as it arrives, holding back what a stop string might still cut."""

    def __init__(self, target, stop: tuple[str, ...]) -> None:
        self.target = target
        self.ids: list[int] = []
        self.printed = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def __call__(self, token_ids: list[int]) -> None:
        self.ids.extend(token_ids)
        text = self.target.decode(self.ids)
        safe = len(text) - self.hold
        while safe > self.printed and text[safe - 1] == "\ufffd":  # partial UTF-8 sequence
            safe -= 1
        if safe > self.printed:
            sys.stdout.write(text[self.printed : safe])
            sys.stdout.flush()
            self.printed = safe

    def finish(self, final_text: str) -> None:
        sys.stdout.write(final_text[self.printed :] + "\n")
        sys.stdout.flush()


def main() -> None:
    """Entry point. Commands fail inside the boundary (:class:`~dspark.cli.edge.BoundaryGroup`); this
    catches what escapes outside any command (an interrupt while importing, a failing callback)."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if traceback_wanted():
            raise
        typer.echo(error_line(exc), err=True)
        raise SystemExit(EXIT_ERROR) from None


if __name__ == "__main__":
    main()
