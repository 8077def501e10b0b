"""One request and its end: what to generate, what came out, and where generation stops.

:class:`GenerationRequest` is validated on construction; :class:`StopChecker` finds the end
(max_new_tokens, an EOS id or a stop string); :class:`RequestState` is a request in flight,
its committed ids and random stream. The batch-1 and the batched engine share all three.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from dspark.engine.stats import GenerationStats
from dspark.sampling import SamplingParams, apply_penalties
from dspark.target.model import TargetModel


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
    logprobs: int | None = None
    """None: none. k >= 0: each committed token's log-probability under the target's raw
    distribution (log-softmax of its logits, before temperature or top-k/p: vLLM's default
    ``raw_logprobs``) and the k most likely tokens there (at most :data:`MAX_LOGPROBS`)."""

    def __post_init__(self) -> None:
        if len(self.prompt_ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")


MAX_LOGPROBS = 20
"""Most alternatives per token (OpenAI's top_logprobs limit)."""


@dataclass(frozen=True)
class TokenLogprob:
    """A committed token's log-probability under the target's raw distribution, and the top
    alternatives there."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) of the most likely tokens, most likely first."""


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Row i of ``logits`` # [n, V] is the distribution token i was committed from."""
    logp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)  # [n, V]
    chosen = logp.gather(-1, torch.as_tensor(list(tokens), device=logp.device).view(-1, 1)).view(-1).tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]  # host sync, asked for
    else:
        alternatives = [()] * len(tokens)
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens, chosen, alternatives)]


@dataclass
class GenerationResult:
    """The committed continuation and how it was produced."""

    token_ids: list[int]
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str = "length"
    """"length", "eos" or "stop"."""
    logprobs: list[TokenLogprob] | None = None
    """One per token id, when the request asked for them."""


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


def check_request(target: TargetModel, request: GenerationRequest) -> None:
    """Raise ValueError when ``request`` cannot run on ``target`` (context window, token ids)."""
    limit = int(getattr(target.model.config, "max_position_embeddings", 1 << 30))
    prompt_len = len(request.prompt_ids)
    if prompt_len + request.max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({request.max_new_tokens}) "
            f"exceeds the model's context window of {limit} tokens"
        )
    if max(request.prompt_ids) >= target.vocab_size or min(request.prompt_ids) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {target.vocab_size})")


@dataclass
class RequestState:
    """A request in flight. Between rounds the committed ids (``buf[:length]``) end with the
    anchor, sampled by the target but not yet run through it."""

    request: GenerationRequest
    generator: torch.Generator
    """The request's own random stream: drafting and verification share it."""
    buf: torch.Tensor
    """[prompt + max_new_tokens + 1] the prompt and committed ids in the first ``length``."""
    length: int
    stops: StopChecker
    stats: GenerationStats
    start: float
    committed: list[int] = field(default_factory=list)
    """New ids committed so far (host copy, for stop checks)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per committed id when the request asks for log-probabilities."""
    output_counts: torch.Tensor | None = None
    """[V] occurrences of each token among the committed ids, for a penalised request."""
    prompt_mask: torch.Tensor | None = None
    """[V] bool: the prompt's tokens, for a penalised request."""
    finish: str | None = None

    @classmethod
    def open(cls, target: TargetModel, request: GenerationRequest) -> "RequestState":
        """Check ``request`` and hold its prompt; the clock starts now."""
        check_request(target, request)
        start, device = time.perf_counter(), target.device
        prompt_len = len(request.prompt_ids)
        buf = torch.empty(prompt_len + request.max_new_tokens + 1, dtype=torch.long, device=device)
        buf[:prompt_len] = torch.as_tensor(list(request.prompt_ids), device=device)
        generator = torch.Generator(device=device).manual_seed(request.seed)
        state = cls(request, generator, buf, prompt_len, StopChecker(target, request),
                    GenerationStats(prompt_tokens=prompt_len), start)
        if request.params.penalized:
            state.output_counts = torch.zeros(target.vocab_size, device=device)
            state.prompt_mask = torch.zeros(target.vocab_size, dtype=torch.bool, device=device)
            state.prompt_mask[state.prompt] = True
        return state

    def penalise(self, logits: torch.Tensor, draft_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The request's penalties applied to the logits # [n, V] of the next n positions, the
        draft tokens # [>= n - 1] before them counted (:func:`~dspark.sampling.apply_penalties`);
        the logits as they are for a request without penalties."""
        if self.output_counts is None:
            return logits
        return apply_penalties(logits, self.request.params, self.output_counts, self.prompt_mask, draft_tokens)

    @property
    def prompt(self) -> torch.Tensor:
        """[P] the prompt ids."""
        return self.buf[: len(self.request.prompt_ids)]

    @property
    def max_draft(self) -> int:
        """Most tokens worth drafting now: the remaining budget minus the bonus token."""
        return self.request.max_new_tokens - len(self.committed) - 1

    def commit(self, tokens: list[int], logits: torch.Tensor | None = None) -> list[int]:
        """Append ``tokens``, check the stops; returns the newly visible ids (up to the cut).
        ``logits`` # [len(tokens), V]: the target's raw logits each token was committed from
        (needed when the request asks for log-probabilities)."""
        if self.request.logprobs is not None:
            if logits is None:
                raise ValueError("this request asks for logprobs: commit() needs the target's logits")
            self.logprobs.extend(token_logprobs(logits, tokens, self.request.logprobs))
        before = len(self.committed)
        if self.output_counts is not None:
            self.output_counts.index_add_(0, torch.as_tensor(tokens, device=self.buf.device),
                                          torch.ones(len(tokens), device=self.buf.device))
        self.buf[self.length : self.length + len(tokens)] = torch.as_tensor(tokens, device=self.buf.device)
        self.length += len(tokens)
        self.committed.extend(tokens)
        self.finish = self.stops.check(self.committed)
        return self.committed[before : self.stops.cut]

    def result(self) -> GenerationResult:
        ids = self.committed[: self.stops.cut]
        self.stats.new_tokens = len(ids)
        self.stats.wall_s = time.perf_counter() - self.start
        logprobs = self.logprobs[: len(ids)] if self.request.logprobs is not None else None
        return GenerationResult(ids, self.stops.text(ids), self.stats, self.finish or "length", logprobs)
