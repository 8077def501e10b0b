"""``dspark serve``: an OpenAI-compatible HTTP server over the batched engine.

The engine is built by the composition root (:func:`dspark.engine.build.build_engine`), as
for ``dspark batch``; the server itself is :mod:`dspark.serving`. fastapi, uvicorn and
prometheus_client come with the ``serve`` extra and are imported only here, inside the
command, so every other command works without them. SIGTERM or Ctrl-C stops taking
connections, lets the requests in flight finish, then exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dspark.errors import DsparkError

SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client")


def serve_command(
    model: Optional[str] = typer.Option(None, help="HF id, folder or .gguf; default: SmolLM2-135M-Instruct."),
    drafter: Optional[str] = typer.Option(None, help="none | ngram | model:<path> | dspark[:<folder>] | dflash:<folder> | eagle3:<folder>; default: the DSpark drafter shipped for the target (SmolLM2-135M), else ngram."),
    policy: str = typer.Option("dspark", help="plain | fixed[:γ] | gamma1 | threshold:<t> | dspark (Algorithm 1 over this machine's cost table)."),
    max_batch: int = typer.Option(8, help="Most requests in flight at once (continuous batching)."),
    max_queue: int = typer.Option(256, help="Most requests waiting for a slot; more are refused with 429."),
    max_model_len: Optional[int] = typer.Option(None, help="Prompt + max_tokens per request (default: min(the model's context, 2048)); every slot preallocates it."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, envvar="DSPARK_API_KEY", help="Require Authorization: Bearer <key> on /v1 routes."),
    served_model_name: Optional[str] = typer.Option(None, help="The model id clients send (default: --model, or the default model's name)."),
    gamma: Optional[int] = typer.Option(None, help="Draft tokens per round (drafter default if unset)."),
    device: str = typer.Option("cpu", help="cpu | cuda[:i] | mps."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU, bfloat16 on GPU)."),
    profile_dir: Optional[Path] = typer.Option(None, help="Cost tables (default: $DSPARK_PROFILE_DIR or ~/.cache/dspark/profiles)."),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="Measure this machine's cost table when the dspark policy has none (about a minute)."),
    log_level: str = typer.Option("info", help="uvicorn's log level: critical | error | warning | info | debug."),
) -> None:
    """Serve OpenAI's /v1/chat/completions and /v1/completions with speculative decoding."""
    check_serve_extra()
    for name, value, least in [("--max-batch", max_batch, 1), ("--max-queue", max_queue, 1), ("--port", port, 0)]:
        if value < least:
            raise DsparkError(f"{name} must be >= {least}, got {value}")
    if port > 65535:
        raise DsparkError(f"--port must be <= 65535, got {port}")
    if max_model_len is not None and max_model_len < 2:
        raise DsparkError(f"--max-model-len must be >= 2, got {max_model_len}")
    if gamma is not None and gamma < 1:
        raise DsparkError(f"--gamma must be >= 1, got {gamma}")
    if api_key is not None and not api_key.strip():
        raise DsparkError("--api-key is empty")
    from dspark.target.loading import parse_device, parse_dtype, resolve

    device = parse_device(device)
    torch_dtype = parse_dtype(dtype, device)
    resolve(model)  # a bad --model fails before anything loads

    import uvicorn

    from dspark.drafters import resolve_drafter_spec
    from dspark.engine.build import PLAIN, build_engine, drafter_calibration
    from dspark.serving.app import build_app
    from dspark.serving.config import DEFAULT_MAX_MODEL_LEN, ServeSettings
    from dspark.target import TargetModel

    target = TargetModel.load(model, device=device, dtype=torch_dtype)
    context = int(getattr(target.model.config, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN))
    if max_model_len is not None and max_model_len > context:
        raise DsparkError(f"--max-model-len {max_model_len} exceeds the model's context window of {context} tokens")
    spec = resolve_drafter_spec(drafter, target.name)
    engine = build_engine(target, spec, policy, max_batch, gamma=gamma, profile_dir=profile_dir,
                          profile_if_missing=profile)
    settings = ServeSettings(
        model_name=served_model_name or target.name,
        max_model_len=max_model_len or min(context, DEFAULT_MAX_MODEL_LEN),
        max_queue=max_queue,
        api_key=api_key,
        drafter=engine.drafter.name,
        policy=engine.policy.name,
    )
    calibrate = None if policy == PLAIN else drafter_calibration(spec)
    app = build_app(engine, target, settings, calibrate)
    target.warm_up()
    typer.echo(
        f"dspark serve: {settings.model_name} · drafter {settings.drafter} · policy {settings.policy} · "
        f"max batch {max_batch} · {settings.max_model_len} tokens per request · http://{host}:{port}/v1",
        err=True,
    )
    # uvicorn handles SIGTERM / SIGINT: it stops accepting, waits for open requests (streams
    # included) to finish, then runs the app's shutdown, which drains and stops the loop.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)


def check_serve_extra() -> None:
    """One line naming the extra when its packages are missing."""
    import importlib.util

    missing = [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise DsparkError(f"dspark serve needs {', '.join(missing)}: pip install 'dspark[serve]'")
