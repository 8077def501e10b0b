"""The speculative decoding loop for one request: prefill -> draft -> verify -> commit.

Invariant between rounds: ``tokens`` holds every committed id, the last one being the
*anchor* (sampled by the target, not yet run through it), and the target KV cache holds
exactly ``len(tokens) - 1`` positions. A round feeds [anchor, x_1..x_γ] to the target, keeps
the K/V of the anchor and the accepted tokens, and commits accepted + (recovered | bonus).
With :class:`~dspark.drafters.base.NoDrafter` every round has γ = 0 and the loop is plain
autoregressive decoding, which is the reference all speedups are measured against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from dspark.drafters.base import DraftInput, Drafter
from dspark.sampling import SamplingParams, sample_from_logits
from dspark.stats import GenerationStats
from dspark.target import TargetModel
from dspark.verify import verify


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and how to continue it."""

    prompt_ids: Sequence[int]
    """Token ids of the prompt (chat template already applied)."""
    params: SamplingParams = SamplingParams()
    """Temperature, top-k and top-p."""
    max_new_tokens: int = 256
    """Stop after this many new tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings; the text is cut before the first one that appears."""
    seed: int = 0
    """Seed of this request's torch.Generator (drafting and verification share it)."""
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks that need a fixed length)."""

    def __post_init__(self) -> None:
        if len(self.prompt_ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class GenerationResult:
    """The committed continuation and how it was produced."""

    token_ids: list[int]
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str = "length"
    """"length", "eos" or "stop"."""


class SpeculativeEngine:
    """Batch-1 speculative decoding of a :class:`TargetModel` with any :class:`Drafter`."""

    def __init__(self, target: TargetModel, drafter: Drafter) -> None:
        drafter.check_target(target)
        target.check_layer_ids(drafter.feature_layer_ids)
        self.target = target
        self.drafter = drafter

    def context_limit(self) -> int:
        return int(getattr(self.target.model.config, "max_position_embeddings", 1 << 30))

    def generate(
        self,
        request: GenerationRequest,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Generate one continuation; ``on_tokens`` receives each round's committed ids."""
        target, drafter, params = self.target, self.drafter, request.params
        prompt_len = len(request.prompt_ids)
        if prompt_len + request.max_new_tokens > self.context_limit():
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({request.max_new_tokens}) "
                f"exceeds the model's context window of {self.context_limit()} tokens"
            )
        if max(request.prompt_ids) >= target.vocab_size or min(request.prompt_ids) < 0:
            raise ValueError(f"prompt token ids must lie in [0, {target.vocab_size})")
        device, layers = target.device, drafter.feature_layer_ids
        generator = torch.Generator(device=device).manual_seed(request.seed)
        stats = GenerationStats(prompt_tokens=prompt_len)
        stops = StopChecker(target, request)
        drafter.reset()
        start = time.perf_counter()

        # Prefill: the whole prompt in one forward; its last logits give the first anchor.
        cache = target.new_cache()
        buf = torch.empty(prompt_len + request.max_new_tokens + 1, dtype=torch.long, device=device)
        buf[:prompt_len] = torch.as_tensor(list(request.prompt_ids), device=device)
        out = target.forward(buf[:prompt_len].unsqueeze(0), cache, layers)
        first, _ = sample_from_logits(out.logits[0, -1], params, generator)
        buf[prompt_len] = first
        length = prompt_len + 1
        new_features = out.features[0] if out.features is not None else None
        stats.prefill_s = time.perf_counter() - start
        committed = [int(first)]  # host sync: the first token must be checked for EOS/stop
        finish = stops.check(committed)
        if on_tokens is not None:
            on_tokens(committed[: stops.cut])

        while finish is None:
            remaining = request.max_new_tokens - len(committed)
            t0 = time.perf_counter()
            block = drafter.propose(
                DraftInput(buf[:length], new_features, params, generator, max_tokens=remaining - 1)
            )
            t1 = time.perf_counter()
            feed = torch.cat([buf[length - 1 : length], block.tokens]).unsqueeze(0)  # [1, 1+γ]
            out = target.forward(feed, cache, layers)
            result = verify(block.tokens, block.q, out.logits[0], params, generator)
            n = result.num_accepted
            target.rollback(cache, length + n)  # keep the anchor and the accepted tokens
            t2 = time.perf_counter()
            stats.record_round(block.gamma, n, t1 - t0, t2 - t1, block.confidences, block.margins)
            drafter.accepted(n)
            new_features = out.features[0, : n + 1] if out.features is not None else None
            buf[length : length + len(result.tokens)] = torch.as_tensor(result.tokens, device=device)
            length += len(result.tokens)
            before = len(committed)
            committed.extend(result.tokens)
            finish = stops.check(committed)
            if on_tokens is not None:
                on_tokens(committed[before : stops.cut])

        token_ids = committed[: stops.cut]
        stats.new_tokens = len(token_ids)
        stats.wall_s = time.perf_counter() - start
        return GenerationResult(token_ids, stops.text(token_ids), stats, finish)


class StopChecker:
    """Finds where a request's generation ends: max_new_tokens, an EOS id, or a stop string
    (shared by the batch-1 and the batched engine)."""

    def __init__(self, target: TargetModel, request: GenerationRequest) -> None:
        self.target = target
        self.limit = request.max_new_tokens
        self.stop = request.stop
        self.eos = frozenset() if request.ignore_eos else target.eos_token_ids
        self.cut = self.limit
        self._checked = 0

    def check(self, committed: list[int]) -> str | None:
        for i in range(self._checked, min(len(committed), self.limit)):
            if committed[i] in self.eos:
                self.cut = i + 1  # the EOS id is kept, as transformers' generate() does
                return "eos"
        self._checked = len(committed)
        if self.stop:
            text = self.target.decode(committed[: self.limit])
            if any(s in text for s in self.stop):
                self.cut = self._shortest_prefix_with_stop(committed)
                return "stop"
        if len(committed) >= self.limit:
            self.cut = self.limit
            return "length"
        return None

    def _shortest_prefix_with_stop(self, committed: list[int]) -> int:
        for k in range(1, len(committed) + 1):
            text = self.target.decode(committed[:k])
            if any(s in text for s in self.stop):
                return k
        return len(committed)

    def text(self, token_ids: list[int]) -> str:
        text = self.target.decode(token_ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text = text[:at]
        return text
