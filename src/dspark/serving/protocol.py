"""The OpenAI wire format the server speaks: request bodies, their checks, responses, errors.

Request bodies are pydantic models with ``extra="forbid"`` and strict types: a field the
server does not know, or a value of the wrong type, is a 400 that names it, never ignored or
coerced. Fields OpenAI defines but this server cannot honour are declared only so that their
default values pass and any other value is refused by name (``echo``, ``best_of``).
``presence_penalty`` and ``frequency_penalty`` (and vLLM's ``repetition_penalty``) are applied
per verified position, drafted tokens counted, so they stay lossless.
``logprobs`` (and chat's ``top_logprobs``) are the target's raw log-probabilities of the
committed tokens (vLLM's default ``raw_logprobs``: before temperature and top-k/p). :func:`prepare_chat` and :func:`prepare_completion` turn a body into a :class:`Job`
(a checked :class:`~dspark.engine.request.GenerationRequest` and how to answer), raising
:class:`ApiError` for everything a client got wrong, so nothing a client sends reaches the
engine unchecked.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from dspark.engine.request import GenerationRequest, GenerationResult, TokenLogprob
from dspark.engine.stats import GenerationStats
from dspark.sampling import SamplingParams
from dspark.serving.config import ServeSettings
from dspark.target.model import TargetModel

MAX_TEMPERATURE = 2.0
"""OpenAI's range for temperature is [0, 2]."""
MAX_SEED = (1 << 63) - 1
MAX_TOP_LOGPROBS = 20
"""OpenAI's range for chat's top_logprobs."""
MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's range for the completions endpoint's logprobs."""
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""Engine finish reasons -> OpenAI's (an EOS and a stop string both read "stop")."""

Number = Union[StrictInt, StrictFloat]


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_TYPE_NAMES = {"int", "float", "str", "bool", "list", "dict", "none", "TextPart", "StreamOptions", "ChatMessage"}
"""Tags pydantic puts in an error's loc for the branch of a union that failed."""


def validation_error(errors: list[dict]) -> ApiError:
    """A 400 naming the field pydantic (or FastAPI's JSON decoding) refused first.

    A union field reports one error per branch ("should be a valid integer", "should be a
    finite number"); they are joined, and the deepest one names the parameter (``stop.0``).
    """
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        return ApiError(400, f"the body is not valid JSON: {detail}", None, "invalid_json")
    group = [e for e in errors if _where(e)[:1] == _where(first)[:1]]
    param = ".".join(max((_where(e) for e in group), key=len)) or None
    if kind == "extra_forbidden":
        return ApiError(400, f"unsupported field {param!r}: this server does not implement it", param, "unsupported_field")
    messages = "; ".join(dict.fromkeys(str(e.get("msg", "invalid value")) for e in group))
    if param is None:
        messages += " (send one JSON object with Content-Type: application/json)"
    return ApiError(400, f"{param or 'body'}: {messages}", param, "invalid_value")


def _where(error: dict) -> list[str]:
    """An error's location without FastAPI's "body" and pydantic's union branch tags."""
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    return [p for p in loc if "[" not in p and p not in _TYPE_NAMES]


# -- request bodies -------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: Optional[StrictBool] = None
    """Send a last chunk with usage (and the ``dspark`` statistics)."""
    continuous_usage_stats: Optional[StrictBool] = None
    """vLLM's extension: usage so far on every chunk too (guidellm asks for it)."""


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]


class _Sampling(_Body):
    """The fields both endpoints share."""

    model: StrictStr
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None
    """vLLM's extension: keep the k most likely tokens; 0 or -1 disables it."""
    max_tokens: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[StrictInt] = None
    """Choices per request: independent samples (1..max_n; default 1)."""
    presence_penalty: Optional[Number] = None
    """-2..2: subtracted from the logit of every token the answer holds already."""
    frequency_penalty: Optional[Number] = None
    """-2..2: subtracted once per earlier occurrence in the answer."""
    repetition_penalty: Optional[Number] = None
    """vLLM's extension, > 0 (1: off): divides a positive logit (multiplies a negative one) of
    every token in the prompt or the answer."""
    user: Optional[StrictStr] = None
    """An end-user id: recorded by nothing, changes nothing."""
    ignore_eos: Optional[StrictBool] = None
    """vLLM's extension: keep generating past EOS, to max_tokens (load generators ask for it)."""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    """Return the log-probability of each output token."""
    top_logprobs: Optional[StrictInt] = None
    """With logprobs: also the 0..20 most likely tokens at each position."""


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr]]
    """A string, token ids, or a list of one string."""
    echo: Optional[StrictBool] = None
    """Only false (or absent)."""
    logprobs: Optional[StrictInt] = None
    """0..5: the log-probability of each output token and this many most likely tokens."""
    best_of: Optional[StrictInt] = None
    """Only 1 (or absent)."""


# -- checks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """A checked request and how to answer it."""

    request: GenerationRequest
    kind: Literal["chat", "completion"]
    stream: bool
    include_usage: bool
    model: str
    continuous_usage: bool = False
    """Usage so far on every streamed chunk (vLLM's ``continuous_usage_stats``)."""
    n: int = 1
    """Choices: independent samples of the prompt, choice i seeded by :meth:`requests`."""
    vllm_metrics: int | None = None
    """vLLM's ``num_spec_tokens`` when answers carry its ``metrics.speculative_decoding``."""
    decode: Callable[[list[int]], str] | None = field(default=None, repr=False, compare=False)
    """The target's detokenizer, for the tokens of log-probabilities."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def requests(self) -> list[GenerationRequest]:
        """One request per choice: choice i samples with seed + i (mod 2^63), so choice 0 is
        the answer the same request with n = 1 gets, and a seeded request is reproducible."""
        return [dataclasses.replace(self.request, seed=(self.request.seed + i) % (MAX_SEED + 1)) for i in range(self.n)]


def prepare_chat(body: ChatCompletionRequest, target: TargetModel, settings: ServeSettings) -> Job:
    """Check a chat body against the served model; encode its messages with the chat template."""
    _check_common(body, settings)
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must lie in 0..{MAX_TOP_LOGPROBS}, got {body.top_logprobs}", "top_logprobs")
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs = true", "top_logprobs")
    if not body.messages:
        raise ApiError(400, "messages must hold at least one message", "messages")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)} for m in body.messages]
    prompt_ids = _encode(target, messages, "messages")
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return _job(body, prompt_ids, limit, param, "chat", target, settings, logprobs)


def prepare_completion(body: CompletionRequest, target: TargetModel, settings: ServeSettings) -> Job:
    """Check a completion body; its prompt is raw text (no chat template) or token ids."""
    _check_common(body, settings)
    _refuse(body.echo, (None, False), "echo", "echo is not supported")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs must lie in 0..{MAX_COMPLETION_LOGPROBS}, got {body.logprobs}", "logprobs")
    _refuse(body.best_of, (None, 1), "best_of", "only best_of = 1 is supported")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, "batches of prompts are not supported: send one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt must be non-empty", "prompt")
        prompt_ids = _encode(target, prompt, "prompt")
    else:
        prompt_ids = list(prompt)
        if any(t < 0 or t >= target.vocab_size for t in prompt_ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {target.vocab_size})", "prompt")
    if not prompt_ids:
        raise ApiError(400, "prompt must hold at least one token", "prompt")
    return _job(body, prompt_ids, body.max_tokens, "max_tokens", "completion", target, settings, body.logprobs)


def _check_common(body: _Sampling, settings: ServeSettings) -> None:
    if body.model != settings.model_name:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                       "model", "model_not_found")
    if body.n is not None and not 1 <= body.n <= settings.max_n:
        raise ApiError(400, f"n must lie in 1..{settings.max_n}, got {body.n}", "n")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream = true", "stream_options")


def _refuse(value: Any, allowed: tuple, param: str, message: str) -> None:
    """Refuse ``value`` unless it is one of the defaults (strict types keep True apart from 1)."""
    if value not in allowed:
        raise ApiError(400, f"{param}: {message}", param, "unsupported_value")


def _number(value: int | float | None, default: float, param: str) -> float:
    """``value`` as a float; an integer too large for one is refused, not an OverflowError."""
    if value is None:
        return default
    try:
        return float(value)
    except OverflowError:
        raise ApiError(400, f"{param} is out of range", param) from None


def _encode(target: TargetModel, prompt: str | list[dict], param: str) -> list[int]:
    """Token ids of raw text or of messages through the chat template. Whatever the
    tokenizer refuses (a role order the template forbids, a lone surrogate) is the client's
    to fix: a 400, not a 500."""
    try:
        return list(target.encode_conversation(prompt))
    except Exception as exc:
        raise ApiError(400, f"{param} cannot be tokenized: {type(exc).__name__}: {exc}", param) from None


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _job(body: _Sampling, prompt_ids: list[int], limit: int | None, limit_param: str, kind, target, settings,
         logprobs: int | None = None) -> Job:
    room = settings.max_model_len - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) leaves no room in the context window of "
                            f"{settings.max_model_len} tokens", "messages" if kind == "chat" else "prompt",
                       "context_length_exceeded")
    if limit is not None and limit < 1:
        raise ApiError(400, f"{limit_param} must be >= 1, got {limit}", limit_param)
    if limit is not None and limit > room:
        raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) + {limit_param} ({limit}) exceeds the context "
                            f"window of {settings.max_model_len} tokens", limit_param, "context_length_exceeded")
    return Job(
        request=GenerationRequest(
            prompt_ids=prompt_ids,
            params=_sampling_params(body, target.vocab_size),
            max_new_tokens=limit if limit is not None else room,
            stop=_stops(body.stop, settings),
            seed=_seed(body.seed),
            ignore_eos=bool(body.ignore_eos),
            logprobs=logprobs,
        ),
        kind=kind,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        continuous_usage=bool(body.stream_options and body.stream_options.continuous_usage_stats),
        model=settings.model_name,
        n=body.n or 1,
        vllm_metrics=settings.num_spec_tokens if settings.metrics_compat == "vllm" else None,
        decode=target.decode,
    )


def _sampling_params(body: _Sampling, vocab_size: int) -> SamplingParams:
    temperature = _number(body.temperature, 1.0, "temperature")  # OpenAI's default is 1
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise ApiError(400, f"temperature must lie in [0, {MAX_TEMPERATURE:g}], got {temperature:g}", "temperature")
    top_p = _number(body.top_p, 1.0, "top_p")
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must lie in (0, 1], got {top_p:g}", "top_p")
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    if top_k < 0:
        raise ApiError(400, f"top_k must be >= 0 (or -1: off), got {top_k}", "top_k")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        penalties[name] = _number(getattr(body, name), 0.0, name)
        if not -2.0 <= penalties[name] <= 2.0:
            raise ApiError(400, f"{name} must lie in [-2, 2], got {penalties[name]:g}", name)
    penalties["repetition_penalty"] = _number(body.repetition_penalty, 1.0, "repetition_penalty")
    if not 0.0 < penalties["repetition_penalty"] <= 10.0:
        raise ApiError(400, f"repetition_penalty must lie in (0, 10], got {penalties['repetition_penalty']:g}",
                       "repetition_penalty")
    return SamplingParams(temperature=temperature, top_k=0 if top_k >= vocab_size else top_k, top_p=top_p, **penalties)


def _stops(stop: str | list[str] | None, settings: ServeSettings) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if len(stops) > settings.max_stop:
        raise ApiError(400, f"stop holds {len(stops)} strings; at most {settings.max_stop} are allowed", "stop")
    for s in stops:
        if not s:
            raise ApiError(400, "stop strings must be non-empty", "stop")
        if len(s) > settings.max_stop_chars:
            raise ApiError(400, f"stop strings must be at most {settings.max_stop_chars} characters", "stop")
    return tuple(dict.fromkeys(stops))


def _seed(seed: int | None) -> int:
    """The request's own seed; without one a fresh random seed (OpenAI's default is not
    reproducible either)."""
    if seed is None:
        return secrets.randbits(63)
    if not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"seed must lie in [0, 2^63 - 1], got {seed}", "seed")
    return seed


# -- responses ------------------------------------------------------------------------------
def usage_so_far(job: Job, completion_tokens: int) -> dict:
    """vLLM's continuous usage: the prompt once, every choice's tokens streamed so far."""
    prompt = len(job.request.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def usage(results: list[GenerationResult]) -> dict:
    """Token counts of an answer: the prompt once, every choice's completion."""
    prompt, completion = results[0].stats.prompt_tokens, sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def dspark_stats(results: list[GenerationResult]) -> dict:
    """The speculative-decoding side of one answer (its choices together): τ, rounds, drafted
    and accepted tokens."""
    rounds = sum(r.stats.rounds for r in results)
    drafted = sum(sum(r.stats.proposed) for r in results)
    accepted = sum(sum(r.stats.accepted) for r in results)
    return {
        "tau": (accepted + rounds) / rounds if rounds else 0.0,
        "rounds": rounds,
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
    }


def logprobs_body(job: Job, logprobs: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """OpenAI's ``logprobs`` of a choice: chat's ``{"content": [...]}`` or the completions
    endpoint's ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``
    (``offset``: characters of the answer before these tokens)."""
    if logprobs is None or job.request.logprobs is None:
        return None
    text = [job.decode([lp.token]) for lp in logprobs]
    if job.kind == "chat":
        def entry(token: int, value: float, shown: str | None = None) -> dict:
            shown = job.decode([token]) if shown is None else shown
            return {"token": shown, "logprob": value, "bytes": list(shown.encode("utf-8"))}

        return {"content": [{**entry(lp.token, lp.logprob, t), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                            for lp, t in zip(logprobs, text)]}
    offsets, at = [], offset
    for t in text:
        offsets.append(at)
        at += len(t)
    return {"tokens": text, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{job.decode([i]): v for i, v in lp.top} for lp in logprobs], "text_offset": offsets}


def response(job: Job, results: list[GenerationResult]) -> dict:
    """The whole answer of a non-streamed request: one choice per result."""
    choices = []
    for index, result in enumerate(results):
        reason, logprobs = FINISH_REASONS[result.finish_reason], logprobs_body(job, result.logprobs)
        if job.kind == "chat":
            choices.append({"index": index, "message": {"role": "assistant", "content": result.text},
                            "finish_reason": reason, "logprobs": logprobs})
        else:
            choices.append({"index": index, "text": result.text, "finish_reason": reason, "logprobs": logprobs})
    return {**_head(job, chunk=False), "choices": choices, "usage": usage(results), "dspark": dspark_stats(results),
            **vllm_metrics(job, results)}


def chunk(job: Job, text: str | None = None, finish: str | None = None, role: bool = False,
          logprobs: dict | None = None, index: int = 0) -> dict:
    """One streamed chunk of choice ``index``: a text delta (with its tokens'
    ``logprobs_body``), the assistant role (chat's first chunk) or the finish."""
    if job.kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if role else ({"content": text} if text or logprobs else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    return {**_head(job, chunk=True), "choices": [choice]}


def final_chunks(job: Job, last: dict, results: list[GenerationResult]) -> list[dict]:
    """What ends a stream once every choice is done: ``last``, the last choice's finish chunk,
    and with ``include_usage`` the usage chunk (no choices). The last of them carries the
    ``dspark`` statistics."""
    if not job.include_usage:
        return [{**last, "dspark": dspark_stats(results)}]
    return [last, {**_head(job, chunk=True), "choices": [], "usage": usage(results), "dspark": dspark_stats(results),
                   **vllm_metrics(job, results)}]


def vllm_metrics(job: Job, results: list[GenerationResult]) -> dict:
    """vLLM's per-request ``metrics.speculative_decoding`` (vllm/v1/metrics/stats.py:397-422,
    0.33.0: ``RequestSpecDecodeMetrics.to_dict``) when the server runs ``--metrics-compat
    vllm``; like vLLM, only for one choice. A verify step is a round that verified drafted tokens."""
    if job.vllm_metrics is None or len(results) != 1:
        return {}
    stats, gamma = results[0].stats, job.vllm_metrics
    histogram = [0] * (gamma + 1)
    for proposed, accepted in zip(stats.proposed, stats.accepted):
        if proposed:
            histogram[min(accepted, gamma)] += 1
    steps, accepted = sum(histogram), sum(j * c for j, c in enumerate(histogram))
    drafted = sum(stats.proposed)
    return {"metrics": {"speculative_decoding": {
        "mean_acceptance_length": 1.0 + accepted / steps if steps else 1.0,
        "draft_acceptance_rate": accepted / drafted if drafted else 0.0,
        "acceptance_histogram": histogram, "num_spec_steps": steps, "num_accepted_draft_tokens": accepted,
        "num_draft_tokens": drafted, "num_spec_tokens": gamma,
    }}}


def _head(job: Job, chunk: bool) -> dict:
    prefix, obj = ("chatcmpl", "chat.completion") if job.kind == "chat" else ("cmpl", "text_completion")
    return {"id": f"{prefix}-{job.id}", "object": obj + (".chunk" if chunk and job.kind == "chat" else ""),
            "created": job.created, "model": job.model}
