"""Drafters: everything that proposes draft blocks for the engines to verify.

- ``base``: the protocols and data types (:class:`Drafter`, :class:`BatchDrafter`,
  :class:`DraftInput`, :class:`DraftBlock`, ``DraftGate``) and :class:`NoDrafter`;
- ``factory``: :func:`resolve_drafter` (a command-line spec, read once), :func:`make_drafter`
  (specs to drafters), :func:`as_batch_drafter`;
- ``looped``: any batch-1 drafter as a batch drafter;
- ``ngram``, ``draft_model``, ``dspark/``: the drafters themselves.
"""

from dspark.drafters.base import BatchDrafter, DraftBlock, DraftGate, DraftInput, Drafter, NoDrafter
from dspark.drafters.factory import (
    DRAFTER_HELP,
    SHIPPED_DRAFTER,
    SHIPPED_DRAFTERS,
    DrafterSpec,
    as_batch_drafter,
    default_drafter_spec,
    make_drafter,
    resolve_drafter,
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
    "DrafterSpec",
    "as_batch_drafter",
    "default_drafter_spec",
    "make_drafter",
    "resolve_drafter",
]
