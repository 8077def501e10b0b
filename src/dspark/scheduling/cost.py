"""Cost models: what one engine step costs, as steps per second SPS.

The engine pads a step's rows to the longest one, so what a step really costs is a function
of its shape, R rows × W = 1 + max_r ℓ_r tokens, not of B = Σ_r (1 + ℓ_r) alone. A
:class:`CostModel` answers SPS for (R, W, B); the profiled table
(:class:`~dspark.scheduling.profiling.CostTable`) reads (R, W), :class:`FlatCost` reads B (the
paper's flattened-token model). Algorithm 1 is the same under either: every admission changes
(W, B), and Θ is evaluated there.
"""

from __future__ import annotations

from typing import Protocol

import torch


class CostModel(Protocol):
    """What DSpark needs from a cost table (see :mod:`dspark.scheduling.profiling`)."""

    padded: bool
    """True when a step costs by its padded shape (R, W); False when by its B tokens."""

    def covers(self, requests: int, width: int) -> bool:
        """Whether steps of ``requests`` rows of up to ``width`` tokens each can be costed."""

    def describe_coverage(self) -> str:
        """What the table covers, for error messages."""

    def steps_per_second(self, requests: int, widths: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        """SPS of steps of ``requests`` rows, padded widths # [N] and budgets # [N] -> # [N] float."""

    def at(self, context: int | None) -> "CostModel":
        """The costs of steps whose requests hold about ``context`` committed positions
        (None: as measured first)."""


class FlatCost:
    """SPS as a function of the total tokens B only: the paper's model, exact for an engine
    that flattens the step's tokens instead of padding them. ``sps[b - 1]`` is SPS(B = b)."""

    padded = False

    def __init__(self, sps) -> None:
        self.sps = tuple(float(v) for v in sps)
        if not self.sps or any(not (v > 0.0) for v in self.sps):
            raise ValueError("SPS values must be positive, one per B = 1, 2, ...")

    def covers(self, requests: int, width: int) -> bool:
        return requests * width <= len(self.sps)

    def describe_coverage(self) -> str:
        return f"B <= {len(self.sps)}"

    def steps_per_second(self, requests: int, widths: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
        table = torch.tensor(self.sps, dtype=torch.float32, device=budgets.device)
        return table[budgets.long() - 1]

    def at(self, context: int | None) -> "FlatCost":
        return self  # the paper's model has no context axis
