"""The narrow interfaces between the engines and every drafter.

A drafter sees the committed tokens of one request (the last one is the *anchor*: committed
by the target but not yet run through it) and the target features of committed tokens it
has not seen yet. It returns a :class:`DraftBlock`: γ tokens, their draft distributions q
and, optionally, confidences c_k. It learns what survived verification from its next
input (the committed tokens and their features), so there is no acceptance callback.

:class:`Drafter` is what the batch-1 engine talks to; :class:`BatchDrafter` is what the
batched engine talks to: per-request state in *slots* (one per live request) and one
:class:`DraftBlock` per request in a single call, which a :class:`DraftGate` may cut short;
the call returns a :class:`DraftBatch`: the blocks, what stopped them and how long drafting took.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from dspark.sampling import SamplingParams


@dataclass(frozen=True)
class DraftInput:
    """Everything a drafter may look at to propose one block for one request."""

    tokens: torch.Tensor
    """[L] committed token ids; tokens[-1] is the anchor."""
    new_features: torch.Tensor | None
    """[n, m*d] target features of tokens[L-1-n : L-1], i.e. committed tokens the drafter has
    not seen yet (the anchor has none). None when the drafter asks for no layers."""
    params: SamplingParams
    """The request's sampling parameters; q must be warped with them."""
    generator: torch.Generator | None
    """The request's random stream for drafting."""
    max_tokens: int
    """Upper bound on γ for this round (the remaining token budget minus one)."""


@dataclass(frozen=True)
class DraftBlock:
    """A proposed block of γ tokens (γ may be 0)."""

    tokens: torch.Tensor
    """[γ] draft tokens x_1..x_γ."""
    q: torch.Tensor | None = None
    """[γ, V] warped draft distributions; None means a point mass on each token."""
    confidences: torch.Tensor | None = None
    """[γ] c_k: estimated probability that x_k survives given x_<k survived."""
    margins: torch.Tensor | None = None
    """[γ] top-1 minus top-2 logit of each slot's draft distribution, for drafters that have
    logits (an alternative confidence signal, compared with c_k in calibration reports)."""
    source: str = ""
    """Which part of a hybrid drafter proposed the block ('ngram', 'dspark'); '' for a drafter
    with one source. Reports count rounds, drafted and accepted tokens per source."""

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1:
            raise ValueError(f"DraftBlock.tokens must be [γ], got {tuple(self.tokens.shape)}")
        gamma = self.tokens.shape[0]
        if self.q is not None and (self.q.dim() != 2 or self.q.shape[0] != gamma):
            raise ValueError(f"DraftBlock.q must be [γ={gamma}, V], got {tuple(self.q.shape)}")
        if self.confidences is not None and self.confidences.shape != (gamma,):
            raise ValueError(f"DraftBlock.confidences must be [{gamma}]")
        if self.margins is not None and self.margins.shape != (gamma,):
            raise ValueError(f"DraftBlock.margins must be [{gamma}]")

    @property
    def gamma(self) -> int:
        return int(self.tokens.shape[0])

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "DraftBlock":
        return DraftBlock(tokens=torch.zeros(0, dtype=torch.long, device=device))


@runtime_checkable
class Drafter(Protocol):
    """What the engine needs from a drafter (DSpark, DFlash, EAGLE-3, n-gram, a small LM)."""

    name: str
    """Short name used in stats and tables."""
    feature_layer_ids: tuple[int, ...]
    """Target layers (output of HF layer k) whose hidden states the drafter is fed."""
    gamma: int
    """Most tokens it drafts per round (0: it never drafts)."""

    def check_target(self, target) -> None:
        """Raise IncompatibleDrafterError when the drafter cannot serve ``target``."""

    def reset(self) -> None:
        """Forget per-request state before a new request."""

    def propose(self, draft_input: DraftInput) -> DraftBlock:
        """Propose up to ``draft_input.max_tokens`` tokens."""


class NoDrafter:
    """Plain decoding inside the same engine: every round verifies the anchor only.

    It is the reference every speedup is measured against.
    """

    name = "none"
    feature_layer_ids: tuple[int, ...] = ()
    gamma = 0

    def check_target(self, target) -> None:
        return None

    def reset(self) -> None:
        return None

    def propose(self, draft_input: DraftInput) -> DraftBlock:
        return DraftBlock.empty(draft_input.tokens.device)


Stop = TypeVar("Stop", covariant=True)
"""What a gate returns when it stops drafting (the engine's gate returns the step's schedule);
the drafter hands it back untouched in :attr:`DraftBatch.stop`."""


class DraftGate(Protocol[Stop]):
    """Asked before slot k+1 (1-based) is drafted, with ``rows`` the indices (into the call's
    inputs) of the requests being drafted, ``gammas`` their most tokens and ``confidences``
    # [len(rows), k+1] their raw c_1..c_{k+1}. None: draft slot k+1. Anything else stops
    drafting (every block keeps its first k tokens) and comes back as :attr:`DraftBatch.stop`.
    A drafter without confidences never asks."""

    def __call__(self, k: int, rows: Sequence[int], gammas: Sequence[int], confidences: torch.Tensor) -> Stop | None: ...


@dataclass(frozen=True)
class DraftBatch(Generic[Stop]):
    """What one :meth:`BatchDrafter.propose_batch` call drafted, and what it cost."""

    blocks: list[DraftBlock]
    """One block per input, in the inputs' order."""
    stop: Stop | None = None
    """What the gate returned when it stopped drafting; None when the blocks are whole."""
    fixed_s: float | None = None
    """Seconds of work before the first slot (context fold, backbone); None when the drafter
    had nothing to draft."""
    slots_s: float | None = None
    """Seconds spent in the slot loop after that, where it is separate from ``fixed_s``
    (None: all of drafting is in ``fixed_s``)."""
    free: list[DraftBlock] | None = None
    """What the drafter would have proposed for the same inputs at no cost (a hybrid's lookup
    blocks, as :meth:`BatchDrafter.propose_free` gives them): the engine's backoff asks whether
    drafting beat these. None: nothing, so drafting must beat a plain step."""

    @staticmethod
    def empty(num: int, device: torch.device | str = "cpu") -> "DraftBatch":
        """No drafting at all: ``num`` empty blocks."""
        return DraftBatch([DraftBlock.empty(device) for _ in range(num)])


@runtime_checkable
class BatchDrafter(Protocol):
    """What the batched engine needs from a drafter."""

    name: str
    feature_layer_ids: tuple[int, ...]
    gamma: int
    """Most tokens proposed per request and round; the engine sizes its caches with it."""

    def check_target(self, target) -> None:
        """Raise IncompatibleDrafterError when the drafter cannot serve ``target``."""

    def allocate(self, num_slots: int, capacity: int) -> None:
        """Prepare ``num_slots`` slots of up to ``capacity`` positions; drops all state."""

    def open(self, slot: int) -> None:
        """A new request takes ``slot``: forget what the slot held."""

    def propose_batch(
        self, slots: Sequence[int], inputs: Sequence[DraftInput], gate: DraftGate[Stop] | None = None
    ) -> DraftBatch[Stop]:
        """One block per request; ``inputs[i]`` belongs to the request in ``slots[i]``. A
        drafter may ignore ``gate`` (and then drafts whole blocks)."""

    def propose_free(self, slots: Sequence[int], inputs: Sequence[DraftInput]) -> DraftBatch:
        """Blocks that cost next to nothing to draft (a hybrid's prompt lookup), for a step in
        which the engine's backoff keeps the costly drafting out; empty blocks where there are
        none. ``inputs`` carry no features (they stay unseen: the next ``propose_batch`` folds them)."""
