"""``dspark serve``: an OpenAI-compatible HTTP server over the batched engine.

The engine is built by the composition root (:func:`dspark.engine.build.build_engine`), as
for ``dspark batch``; the server itself is :mod:`dspark.serving`. fastapi, uvicorn and
prometheus_client come with the ``serve`` extra and are imported only here, inside the
command, so every other command works without them.

Before anything loads, the address is bound (a port in use, or an address that is not this
machine's, is one line at once, not after a minute of loading) and the API key is read: from
``--api-key-file`` or ``$DSPARK_API_KEY``, which no other user can read in ``ps``; ``--api-key``
still works. Serving beyond loopback without a key warns.

SIGTERM or Ctrl-C stops taking connections and lets the requests in flight finish for up to
``--drain-timeout`` seconds, then cancels what is left and exits; a body that stalls is
refused after ``body_timeout_s`` (:mod:`dspark.serving.app`), so no client keeps the
process alive.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Optional

import typer

from dspark.cli.edge import check_at_least
from dspark.errors import DsparkError
from dspark.serving.config import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES

SERVE_EXTRA = ("fastapi", "uvicorn", "prometheus_client")
API_KEY_ENV = "DSPARK_API_KEY"
MAX_HEADER_BYTES = 16 << 10
"""Largest request head (h11's default, set explicitly): a bigger one is a 400."""
KEEP_ALIVE_S = 5
"""An idle keep-alive connection is closed after this many seconds (uvicorn's default)."""


def serve_command(
    model: Optional[str] = typer.Option(None, help="HF id, folder or .gguf; default: SmolLM2-135M-Instruct."),
    drafter: Optional[str] = typer.Option(None, help="none | ngram | model:<path> | dspark[:<folder>] | dflash:<folder> | eagle3:<folder> | dspark[:<folder>]+ngram; default: the DSpark drafter shipped for the target with prompt lookup (dspark+ngram), else ngram."),
    policy: str = typer.Option("dspark", help="plain | fixed[:γ] | gamma1 | threshold:<t> | dspark (Algorithm 1 over this machine's cost table)."),
    max_batch: int = typer.Option(8, help="Most requests in flight at once (continuous batching)."),
    max_queue: int = typer.Option(256, help="Most requests waiting while every slot is busy (--max-batch + --max-queue in flight); more get 429."),
    max_model_len: Optional[int] = typer.Option(None, help="Prompt + max_tokens per request (default: min(the model's context, 2048)); every slot preallocates it."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (anything but loopback without an API key warns)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port)."),
    api_key_file: Optional[Path] = typer.Option(None, help="Require Authorization: Bearer <key> on /v1 routes, the key read from this file (or set $DSPARK_API_KEY)."),
    api_key: Optional[str] = typer.Option(None, help="The key on the command line: visible to every user in ps; prefer --api-key-file or $DSPARK_API_KEY."),
    max_body_bytes: int = typer.Option(DEFAULT_MAX_BODY_BYTES, help="Largest request body; larger ones get 413 before they are read."),
    drain_timeout: float = typer.Option(DEFAULT_DRAIN_TIMEOUT_S, help="On SIGTERM, seconds the requests in flight may take to finish before they are cancelled."),
    served_model_name: Optional[str] = typer.Option(None, help="The model id clients send (default: --model, or the default model's name)."),
    gamma: Optional[int] = typer.Option(None, help="Draft tokens per round (drafter default if unset)."),
    lookup_store: Optional[int] = typer.Option(None, help="Most token ids of earlier requests (prompts and answers) that prompt lookup (ngram, dspark+ngram) keeps to match across requests, shared by every client (default: 65536, at most about 60 MB); 0: each request's own ids only."),
    device: str = typer.Option("cpu", help="cpu | cuda[:i] | mps."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on the CPU; on CUDA bfloat16, or float16 where the GPU lacks bf16)."),
    profile_dir: Optional[Path] = typer.Option(None, help="Cost tables (default: $DSPARK_PROFILE_DIR or ~/.cache/dspark/profiles)."),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="Measure this machine's cost table when the dspark policy has none (about a minute)."),
    metrics_compat: str = typer.Option("", help="vllm: also expose vLLM's vllm:spec_decode_* counters (its names and labels) and its per-request metrics.speculative_decoding object, which benchmark clients read."),
    log_level: str = typer.Option("info", help="uvicorn's log level: critical | error | warning | info | debug."),
) -> None:
    """Serve OpenAI's /v1/chat/completions and /v1/completions with speculative decoding."""
    check_serve_extra()
    check_at_least(("--max-batch", max_batch, 1), ("--max-queue", max_queue, 1), ("--port", port, 0))
    if port > 65535:
        raise DsparkError(f"--port must be <= 65535, got {port}")
    check_at_least(("--max-model-len", max_model_len, 2), ("--gamma", gamma, 1), ("--max-body-bytes", max_body_bytes, 1),
                   ("--lookup-store", lookup_store, 0))
    if not drain_timeout >= 0:
        raise DsparkError(f"--drain-timeout must be >= 0, got {drain_timeout}")
    if metrics_compat not in ("", "vllm"):
        raise DsparkError(f"--metrics-compat must be vllm (or empty), got {metrics_compat!r}")
    key = read_api_key(api_key, api_key_file, os.environ)
    from dspark.target.loading import parse_device, parse_dtype, resolve

    device = parse_device(device)
    torch_dtype = parse_dtype(dtype, device)
    listener = bind(host, port)  # a taken port fails before anything loads
    if key is None and not is_loopback(host):
        typer.echo(f"warning: --host {host} is reachable from other machines and no API key is set: anyone who "
                   f"can reach it can use this server (pass --api-key-file or set ${API_KEY_ENV})", err=True)
    resolve(model)  # a bad --model fails before anything loads

    import uvicorn

    from dspark.drafters import resolve_drafter
    from dspark.engine.build import PLAIN, build_engine, drafter_calibration
    from dspark.serving.app import build_app
    from dspark.serving.config import DEFAULT_MAX_MODEL_LEN, ServeSettings
    from dspark.target import TargetModel

    target = TargetModel.load(model, device=device, dtype=torch_dtype)
    context = int(getattr(target.model.config, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN))
    if max_model_len is not None and max_model_len > context:
        raise DsparkError(f"--max-model-len {max_model_len} exceeds the model's context window of {context} tokens")
    spec = resolve_drafter(drafter, target.name)
    engine = build_engine(target, spec, policy, max_batch, gamma=gamma, profile_dir=profile_dir,
                          profile_if_missing=profile, lookup_store=lookup_store)
    settings = ServeSettings(
        model_name=served_model_name or target.name,
        max_model_len=max_model_len or min(context, DEFAULT_MAX_MODEL_LEN),
        max_queue=max_queue,
        api_key=key,
        drafter=engine.drafter.name,
        policy=engine.policy.name,
        max_body_bytes=max_body_bytes,
        drain_timeout_s=drain_timeout,
        metrics_compat=metrics_compat,
    )
    calibrate = None if policy == PLAIN else drafter_calibration(spec)
    app = build_app(engine, target, settings, calibrate)
    target.warm_up()
    typer.echo(
        f"dspark serve: {settings.model_name} · drafter {settings.drafter} · policy {settings.policy} · "
        f"max batch {max_batch} · {settings.max_model_len} tokens per request · "
        f"http://{host}:{listener.getsockname()[1]}/v1",
        err=True,
    )
    # uvicorn handles SIGTERM / SIGINT: it stops accepting, waits up to the drain timeout for
    # open requests (streams included) to finish, cancels the rest, then runs the app's
    # shutdown, which drains and stops the loop.
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    server = uvicorn.Server(config)
    server.run(sockets=[listener])
    if not server.started:
        raise DsparkError("the server did not start (see uvicorn's message above)")


def read_api_key(api_key: str | None, api_key_file: Path | None, environ) -> str | None:
    """The bearer key: ``--api-key-file``, else ``--api-key``, else ``$DSPARK_API_KEY``, else
    None (an open server). Giving both flags, an unreadable or empty file, or an empty key is
    refused in one line."""
    if api_key is not None and api_key_file is not None:
        raise DsparkError("give --api-key-file or --api-key, not both")
    if api_key_file is not None:
        try:
            key = api_key_file.expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DsparkError(f"--api-key-file {api_key_file} cannot be read: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if not key:
            raise DsparkError(f"--api-key-file {api_key_file} is empty")
        return key
    if api_key is not None:
        if not api_key.strip():
            raise DsparkError("--api-key is empty")
        return api_key
    if environ.get(API_KEY_ENV) is not None:
        if not environ[API_KEY_ENV].strip():
            raise DsparkError(f"${API_KEY_ENV} is set but empty")
        return environ[API_KEY_ENV]
    return None


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` as uvicorn binds one (SO_REUSEADDR; IPv6 for an address
    with a colon); it listens once the server starts. A taken port, a name that does not
    resolve or an address that is not this machine's is refused in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DsparkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serve_extra() -> None:
    """One line naming the extra when its packages are missing."""
    import importlib.util

    missing = [name for name in SERVE_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise DsparkError(f"dspark serve needs {', '.join(missing)}: pip install 'dspark[serve]'")
