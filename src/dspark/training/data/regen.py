"""Filling a ``regenerated`` store: the target answers the prompts, straight from token ids.

Answers come from the batched engine decoding plainly, or from ``transformers.generate``
(:func:`~dspark.training.data.generate.sample_batch`); resuming is keyed by prompt id, and a
shard is written every ``shard_size`` records, so a kill loses at most one shard's work.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from dspark.errors import DsparkError
from dspark.training.data.generate import SampledBatch, derived_seed, sample_batch, stop_ids
from dspark.training.data.prompts import PromptRecord
from dspark.training.data.shards import ShardRecord
from dspark.training.data.store import FillSummary, ShardStore
from dspark.training.data.tokenize import end_of_turn_id

GENERATORS = {"engine": "dspark.BatchEngine plain", "generate": "transformers.generate"}
"""The ways :func:`regenerate` can decode, and how a store's settings name them."""


@dataclass(frozen=True)
class RegenConfig:
    """How the target answers the prompts of a ``regenerated`` store."""

    max_new_tokens: int = 256
    """Longest answer; a cut answer has finish reason ``length`` and no end-of-turn token."""
    temperature: float = 0.0
    """0 is greedy."""
    top_p: float = 0.95
    """Nucleus filter of the sampling (ignored, and recorded as 1.0, when greedy)."""
    seed: int = 0
    """Mixed with each prompt id into that request's seed (engine: a resumed run draws what an
    unbroken one would), or with a batch's ids into the batch's seed (generate)."""
    max_prompt_tokens: int = 1024
    """Longer prompts are skipped (and counted), never truncated."""
    generator: str = "engine"
    """``engine``: :class:`~dspark.engine.batched.BatchEngine` decoding plainly with continuous
    batching and a generator per request (measured faster on CPU, see
    benchmarks/results/generation_backends.json); ``generate``: :func:`sample_batch` over
    static batches. Greedy answers agree; sampled ones differ, so it binds the store."""
    batch_size: int = 32
    """Concurrency of the engine, or prompts per generate call (not a setting of the store)."""
    shard_size: int = 64
    """Records per shard: a kill loses at most this much work."""
    sort_window: int = 4
    """Prompts are sorted by length within windows of this many shards, in pool order, so
    batches pad little while every stretch of the store keeps the pool's domain mix."""

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_prompt_tokens", "batch_size", "shard_size", "sort_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.temperature <= 100.0:  # also refuses NaN
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")

    def store_settings(self) -> dict[str, Any]:
        """What the store is bound to: whatever changes the answers."""
        greedy = self.temperature == 0
        return {
            "generator": GENERATORS[self.generator],
            "turns": 1,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": 1.0 if greedy else self.top_p,
            "seed": self.seed,
            "max_prompt_tokens": self.max_prompt_tokens,
        }


def answer_record(
    prompt: PromptRecord, prompt_ids: Sequence[int], generated: Sequence[int], finish_reason: str, eot: int
) -> ShardRecord:
    """The sequence prompt ids + generated ids (+ ``eot`` when the answer stopped), loss on the answer.

    ``generated`` excludes the stop token (as :func:`sample_batch` returns it); the answer's end
    of turn is written as the template's end-of-turn id, which the model must learn to say.
    """
    if finish_reason not in ("stop", "length"):
        raise ValueError(f"finish_reason must be 'stop' or 'length', got {finish_reason!r}")
    answer = list(generated) + ([eot] if finish_reason == "stop" else [])
    return ShardRecord(
        id=prompt.id,
        source=prompt.source,
        domain=prompt.domain,
        input_ids=list(prompt_ids) + answer,
        loss_mask=[0] * len(prompt_ids) + [1] * len(answer),
        finish_reason=finish_reason,
    )


def answer_batch(
    target, prompts: Sequence[Sequence[int]], ids: Sequence[str], config: RegenConfig, stops: frozenset[int]
) -> SampledBatch:
    """Continue every prompt (token ids) with the configured generator; same result type either way.

    Tokens exclude the stop token, as :func:`sample_batch` returns them.
    """
    if config.generator == "generate":
        seed = derived_seed(config.seed, *ids)
        return sample_batch(target, prompts, config.max_new_tokens, config.temperature, config.top_p, seed, stops)
    from dspark.engine import GenerationRequest
    from dspark.engine.build import PLAIN, build_engine
    from dspark.sampling import SamplingParams

    if stops != target.eos_token_ids:
        raise DsparkError(
            f"the engine stops at the eos ids {sorted(target.eos_token_ids)} only, but this target's turns "
            f"also end at {sorted(stops - target.eos_token_ids)}; use --generator generate"
        )
    params = SamplingParams(temperature=config.temperature, top_p=config.top_p if config.temperature > 0 else 1.0)
    requests = [
        GenerationRequest(list(p), params, max_new_tokens=config.max_new_tokens, seed=derived_seed(config.seed, i))
        for p, i in zip(prompts, ids)
    ]
    engine = build_engine(target, None, PLAIN, config.batch_size)
    tokens, reasons = [], []
    for r in engine.generate(requests).results:
        stopped = r.finish_reason == "eos"  # the engine keeps the eos id; sample_batch cuts it
        tokens.append(list(r.token_ids[:-1] if stopped else r.token_ids))
        reasons.append("stop" if stopped else "length")
    return SampledBatch(tokens, reasons, sum(len(t) for t in tokens) + reasons.count("stop"))


def regenerate(
    target, prompts: Sequence[PromptRecord], store: ShardStore, config: RegenConfig, progress: bool = True
) -> FillSummary:
    """Let the target answer (first user turn) every prompt whose id is not in ``store`` yet.

    Answers come from :func:`answer_batch`; a shard is written every ``shard_size`` records
    and at the end, so a kill loses at most one shard's work and a rerun generates nothing
    twice.
    """
    from tqdm.auto import tqdm

    if store.kind != "regenerated":
        raise DsparkError(f"store {store.folder} holds {store.kind} data, not regenerated answers")
    done = store.done_ids()
    unique = list({p.id: p for p in prompts}.values())
    pending = [p for p in unique if p.id not in done]
    stops = stop_ids(target)
    eot = end_of_turn_id(target.tokenizer) if getattr(target.tokenizer, "chat_template", None) else None
    if eot is None:
        eot = min(stops)
    window = config.shard_size * config.sort_window
    # A static batch is one generate call; the engine refills its slots, so it takes a shard's
    # worth of requests per call and only drains at the shard's end.
    step = config.batch_size if config.generator == "generate" else max(config.batch_size, config.shard_size)
    buffer: list[ShardRecord] = []
    reasons: Counter[str] = Counter()
    skipped = new_tokens = shards = written = 0
    start = time.perf_counter()
    with tqdm(total=len(pending), desc=f"regen {store.folder.name}", unit="prompt", disable=not progress) as bar:
        for begin in range(0, len(pending), window):
            encoded = []
            for p in pending[begin : begin + window]:
                ids = target.encode_conversation(p.messages[:1])
                if len(ids) > config.max_prompt_tokens:
                    skipped += 1
                    bar.update(1)
                else:
                    encoded.append((p, ids))
            encoded.sort(key=lambda item: len(item[1]))  # stable: ties keep the pool's order
            for b in range(0, len(encoded), step):
                batch = encoded[b : b + step]
                sampled = answer_batch(target, [ids for _, ids in batch], [p.id for p, _ in batch], config, stops)
                for (p, ids), tokens, reason in zip(batch, sampled.tokens, sampled.finish_reasons):
                    buffer.append(answer_record(p, ids, tokens, reason, eot))
                    reasons[reason] += 1
                new_tokens += sampled.num_new_tokens
                while len(buffer) >= config.shard_size:
                    store.append(buffer[: config.shard_size])
                    written += config.shard_size
                    shards += 1
                    buffer = buffer[config.shard_size :]
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.0f}", shards=shards)
        if buffer:
            store.append(buffer)
            written += len(buffer)
            shards += 1
    return FillSummary(
        prompts=len(prompts), already_done=len(unique) - len(pending), written=written, skipped=skipped,
        new_tokens=new_tokens, shards=shards, seconds=time.perf_counter() - start, finish_reasons=dict(reasons),
    )
