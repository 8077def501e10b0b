"""Drafters: everything that proposes draft blocks for the engines to verify.

- ``base``: the protocols and data types (:class:`Drafter`, :class:`BatchDrafter`,
  :class:`DraftInput`, :class:`DraftBlock`, ``DraftGate``) and :class:`NoDrafter`;
- ``factory``: :func:`make_drafter` (command-line names to drafters), :func:`as_batch_drafter`;
- ``looped``: any batch-1 drafter as a batch drafter;
- ``ngram``, ``draft_model``, ``dspark/``: the drafters themselves.
"""

from dspark.drafters.base import BatchDrafter, DraftBlock, DraftGate, DraftInput, Drafter, NoDrafter
from dspark.drafters.factory import (
    DRAFTER_HELP,
    SHIPPED_DRAFTER,
    SHIPPED_DRAFTERS,
    as_batch_drafter,
    default_drafter_spec,
    make_drafter,
    resolve_drafter_spec,
)

__all__ = [
    "BatchDrafter",
    "DraftBlock",
    "DraftGate",
    "DraftInput",
    "Drafter",
    "NoDrafter",
    "DRAFTER_HELP",
    "SHIPPED_DRAFTER",
    "SHIPPED_DRAFTERS",
    "as_batch_drafter",
    "default_drafter_spec",
    "make_drafter",
    "resolve_drafter_spec",
]
