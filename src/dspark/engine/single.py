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
from dspark.engine.request import GenerationRequest, GenerationResult, RequestState
from dspark.sampling import check_logits, sample_from_logits
from dspark.target.model import TargetModel
from dspark.timing import device_clock
from dspark.verify import verify


class SpeculativeEngine:
    """Batch-1 speculative decoding of a :class:`TargetModel` with any :class:`Drafter`."""

    def __init__(self, target: TargetModel, drafter: Drafter) -> None:
        drafter.check_target(target)
        target.check_layer_ids(drafter.feature_layer_ids)
        self.target = target
        self.drafter = drafter
        self.clock = device_clock(target.device)

    def generate(
        self,
        request: GenerationRequest,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Generate one continuation; ``on_tokens`` receives each round's committed ids."""
        target, drafter, params = self.target, self.drafter, request.params
        state = RequestState.open(target, request)
        layers, stats, generator = drafter.feature_layer_ids, state.stats, state.generator
        drafter.reset()

        # Prefill: the whole prompt in one forward; its last logits give the first anchor.
        cache = target.new_cache()
        out = target.forward(state.prompt.unsqueeze(0), cache, layers, logits_to_keep=1)
        check_logits(out.logits[0, -1], "the target's logits")  # host sync, once per request
        first, _ = sample_from_logits(state.penalise(out.logits[0, -1:])[0], params, generator)
        new_features = out.features[0] if out.features is not None else None
        shown = state.commit([int(first)], out.logits[0, -1:])  # host sync: the first token must be checked for EOS/stop
        stats.prefill_s = time.perf_counter() - state.start
        if on_tokens is not None:
            on_tokens(shown)

        while state.finish is None:
            length = state.length
            t0 = self.clock()
            block = drafter.propose(DraftInput(state.buf[:length], new_features, params, generator, state.max_draft))
            t1 = self.clock()
            feed = torch.cat([state.buf[length - 1 : length], block.tokens]).unsqueeze(0)  # [1, 1+γ]
            out = target.forward(feed, cache, layers)
            result = verify(block.tokens, block.q, state.penalise(out.logits[0], block.tokens), params, generator)
            n = result.num_accepted
            target.rollback(cache, length + n)  # keep the anchor and the accepted tokens
            t2 = self.clock()
            stats.record_round(block.gamma, n, t1 - t0, t2 - t1, block.confidences, block.margins, block.source)
            new_features = out.features[0, : n + 1] if out.features is not None else None
            shown = state.commit(result.tokens, out.logits[0, : n + 1])
            if on_tokens is not None:
                on_tokens(shown)
        return state.result()
