"""What one server serves and how much it admits."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_MODEL_LEN = 2048
"""Tokens per slot (prompt + max_tokens) unless the model allows fewer: every slot's K/V is
preallocated, so this times ``max_batch`` bounds the server's memory."""


@dataclass(frozen=True)
class ServeSettings:
    """The served model's name and limits."""

    model_name: str
    """The id clients send as ``model`` and ``/v1/models`` lists."""
    max_model_len: int
    """Most prompt + generated tokens of one request: the context window clients see."""
    max_queue: int = 256
    """Most requests waiting for a slot; one more is refused with 429."""
    api_key: str | None = None
    """Bearer token every ``/v1`` route requires (None: open)."""
    max_stop: int = 4
    """Most stop strings per request (OpenAI's limit)."""
    max_stop_chars: int = 256
    """Longest stop string: streaming holds back this many characters."""
    drafter: str = ""
    """The drafter's name, for ``/v1/models`` and the metrics' info."""
    policy: str = ""
    """The verification policy's name, likewise."""

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must be non-empty")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when given")
        if self.max_stop < 0 or self.max_stop_chars < 1:
            raise ValueError("max_stop must be >= 0 and max_stop_chars >= 1")
