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
from typing import Callable

import torch

from dspark.drafters.base import DraftInput, Drafter
from dspark.engine.request import GenerationRequest, GenerationResult, StopChecker
from dspark.engine.stats import GenerationStats
from dspark.sampling import sample_from_logits
from dspark.target.model import TargetModel
from dspark.verify import verify


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
