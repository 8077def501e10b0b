"""What one server serves and how much it admits."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_MODEL_LEN = 2048
"""Tokens per slot (prompt + max_tokens) unless the model allows fewer: every slot's K/V is
preallocated, so this times ``max_batch`` bounds the server's memory."""
DEFAULT_MAX_BODY_BYTES = 4 << 20
"""Largest request body (4 MiB): a 128k-token prompt is about 0.5 MB of text, and a body
this size parses in milliseconds and tokenizes in seconds, off the event loop."""
DEFAULT_BODY_TIMEOUT_S = 30.0
"""Longest wait for the next piece of a request body (nginx's ``client_body_timeout``
counts the same way)."""
DEFAULT_DRAIN_TIMEOUT_S = 30.0
"""On SIGTERM, how long open requests may run before they are cancelled."""


METRICS_COMPAT = ("", "vllm")


@dataclass(frozen=True)
class ServeSettings:
    """The served model's name and limits."""

    model_name: str
    """The id clients send as ``model`` and ``/v1/models`` lists."""
    max_model_len: int
    """Most prompt + generated tokens of one request: the context window clients see."""
    max_queue: int = 256
    """Most requests waiting for a slot while every slot runs one: max_batch + max_queue
    requests may be in flight, one more is refused with 429."""
    api_key: str | None = None
    """Bearer token every ``/v1`` route requires (None: open)."""
    max_stop: int = 4
    """Most stop strings per request (OpenAI's limit)."""
    max_stop_chars: int = 256
    """Longest stop string: streaming holds back this many characters."""
    max_n: int = 8
    """Most choices per request (``n``): each takes a slot, or a place in the queue."""
    drafter: str = ""
    """The drafter's name, for ``/v1/models`` and the metrics' info."""
    policy: str = ""
    """The verification policy's name, likewise."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body; a larger one is refused with 413 before it is parsed."""
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    """Most seconds between two pieces of a request body; a body that stalls longer is a 408."""
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    """On shutdown, how long requests in flight may take to finish before they are cancelled."""
    metrics_compat: str = ""
    """'vllm': also vLLM's ``vllm:spec_decode_*`` counters under its exact names and labels,
    and its per-request ``metrics.speculative_decoding`` object on answers ('' : neither)."""
    num_spec_tokens: int = 0
    """The drafter's γ (vLLM's ``num_speculative_tokens``), for the per-request object."""

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must be non-empty")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when given")
        if self.metrics_compat not in METRICS_COMPAT:
            raise ValueError(f"metrics_compat must be one of {METRICS_COMPAT}, got {self.metrics_compat!r}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_stop < 0 or self.max_stop_chars < 1:
            raise ValueError("max_stop must be >= 0 and max_stop_chars >= 1")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if not self.body_timeout_s > 0 or not self.drain_timeout_s >= 0:
            raise ValueError("body_timeout_s must be > 0 and drain_timeout_s >= 0")
