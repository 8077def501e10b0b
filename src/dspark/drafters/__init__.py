"""Drafters: everything that proposes draft blocks for the engine to verify.

``make_drafter`` turns a command-line spec into a drafter:

- ``none``: plain decoding (the reference);
- ``ngram``: prompt lookup;
- ``model:<id|folder|file.gguf>``: an independent draft model sharing the tokenizer.
"""

from __future__ import annotations

from dspark.drafters.base import DraftBlock, DraftInput, Drafter, NoDrafter
from dspark.errors import DsparkError

__all__ = ["DraftBlock", "DraftInput", "Drafter", "NoDrafter", "make_drafter", "DRAFTER_HELP"]

DRAFTER_HELP = "none | ngram | model:<HF id, folder or .gguf>"


def make_drafter(spec: str, gamma: int | None = None, device: str = "cpu") -> Drafter:
    """Build the drafter named by ``spec`` (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "none" and not arg:
        return NoDrafter()
    if kind == "ngram" and not arg:
        from dspark.drafters.ngram import NgramConfig, NgramDrafter

        return NgramDrafter(NgramConfig(gamma=gamma or 7))
    if kind == "model" and arg:
        from dspark.drafters.draft_model import DraftModelDrafter

        return DraftModelDrafter.load(arg, gamma=gamma or 5, device=device)
    raise DsparkError(f"unknown drafter {spec!r}; choose one of: {DRAFTER_HELP}")
