"""The FastAPI application: OpenAI's routes over one :class:`~dspark.serving.loop.EngineLoop`.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent
events ending with ``data: [DONE]``, or whole), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus text) and FastAPI's ``/openapi.json`` and ``/docs``.

Every error a client can cause is an OpenAI error body with a 4xx status: FastAPI's own 422
for a body it cannot parse or validate becomes a 400 naming the field. A body over
``max_body_bytes`` is a 413 (refused on its Content-Length before a byte is read, else once
the bytes counted pass the cap), a body that stalls for ``body_timeout_s`` a 408: no client
holds a handler, or the shutdown, by sending its body slowly or not at all. A full server is
a 429 with ``Retry-After``; a draining server a 503; a request that fails inside the server a
500 (or, once its stream has started, an error event before ``[DONE]``). A client that
leaves, mid-stream or while it waits for a whole answer, has its request cancelled and its
slot freed before the next step.

Nothing slow runs on the event loop: bodies are tokenized in a worker thread and the engine
has its own (:mod:`dspark.serving.loop`), so ``/health`` answers while a large prompt is
encoded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.engine.batched import BatchEngine
from dspark.scheduling.policy import Calibrate
from dspark.serving.config import ServeSettings
from dspark.serving.loop import Delta, Done, EngineLoop, Event, QueueFull, ShuttingDown
from dspark.serving.metrics import ServeMetrics
from dspark.serving.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chunk,
    Job,
    error_body,
    FINISH_REASONS,
    final_chunks,
    logprobs_body,
    usage_so_far,
    prepare_chat,
    prepare_completion,
    response,
    validation_error,
)
from dspark.target.model import TargetModel

RETRY_AFTER_S = 1
"""What a refused client is told to wait (seconds) before trying again."""
DONE = "data: [DONE]\n\n"
DISCONNECT_POLL_S = 0.25
"""How often a request waiting for its answer checks that its client is still there."""


def build_app(engine: BatchEngine, target: TargetModel, settings: ServeSettings,
              calibrate: Calibrate | None = None) -> FastAPI:
    """The whole server over ``engine``: a session of ``max_batch`` slots of
    ``settings.max_model_len`` tokens, its loop, its metrics and the app."""
    session = engine.session(engine.max_batch, settings.max_model_len)
    settings = dataclasses.replace(settings, num_spec_tokens=engine.max_draft)
    metrics = ServeMetrics(settings.model_name, calibrate, vllm_compat=settings.metrics_compat == "vllm")
    metrics.describe(settings.drafter, settings.policy, engine.max_batch, settings.max_model_len)
    return create_app(EngineLoop(session, target.decode, metrics, settings.max_queue), target, settings)


def create_app(loop: EngineLoop, target: TargetModel, settings: ServeSettings) -> FastAPI:
    """The app over a loop that is not started yet: the app's lifespan starts it, and on
    shutdown (after uvicorn has let every open request finish) drains and stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        yield
        await asyncio.to_thread(loop.close, settings.drain_timeout_s)

    app = FastAPI(title="dspark", version="1", lifespan=lifespan,
                  description="OpenAI-compatible speculative decoding with DSpark drafters.")
    app.state.loop = loop
    # The last added runs first: the key is checked before a byte of the body is read.
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if settings.api_key is not None:
        app.add_middleware(BearerAuth, key=settings.api_key)
    _install_error_handlers(app)
    metrics, created = loop.metrics, int(time.time())

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine loop runs; 503 once it stopped or drains."""
        if loop.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text: speculative decoding, calibration, load and latency."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": created, "owned_by": "dspark",
            "max_model_len": settings.max_model_len,
        }]}

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI's chat completions; also ``top_k``, and a ``dspark`` object on each answer."""
        return await _answer(await run_in_threadpool(prepare_chat, body, target, settings), loop, request)

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """OpenAI's (legacy) completions over raw text or token ids, no chat template."""
        return await _answer(await run_in_threadpool(prepare_completion, body, target, settings), loop, request)

    return app


ERROR_RESPONSES = {
    code: {"description": what, "content": {"application/json": {"example": error_body("...", kind)}}}
    for code, what, kind in [
        (400, "a field is malformed, unsupported or out of range", "invalid_request_error"),
        (401, "the API key is missing or wrong", "invalid_request_error"),
        (404, "unknown model", "invalid_request_error"),
        (408, "the body stalled for longer than the body timeout", "invalid_request_error"),
        (413, "the body is larger than the server's cap (dspark serve --max-body-bytes)", "invalid_request_error"),
        (429, "every slot is busy and the queue is full; see Retry-After", "server_overloaded"),
        (500, "the request failed inside the server", "server_error"),
        (503, "the server is shutting down", "server_overloaded"),
    ]
}


async def _answer(job: Job, loop: EngineLoop, request: Request) -> Response:
    """Submit the job's ``n`` requests (one per choice) and answer once all are done, or
    stream their chunks as they come; a choice that fails fails the answer, and every other
    choice is cancelled with it."""
    aio = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    handles: list[int] = []
    try:
        for index, generation in enumerate(job.requests()):
            def sink(event: Event, index=index) -> None:  # called on the loop thread
                aio.call_soon_threadsafe(events.put_nowait, (index, event))

            handles.append(loop.submit(generation, sink))
    except QueueFull as exc:
        for handle in handles:
            loop.cancel(handle)
        loop.metrics.on_rejected()
        raise ApiError(429, f"the server is full: {exc}; retry later", None, "queue_full", "server_overloaded",
                       {"Retry-After": str(RETRY_AFTER_S)}) from None
    except ShuttingDown as exc:
        for handle in handles:
            loop.cancel(handle)
        raise ApiError(503, str(exc), None, "shutting_down", "server_overloaded",
                       {"Retry-After": str(RETRY_AFTER_S)}) from None
    finished, waiter = False, _Waiter(events, request)
    try:
        first = await waiter.next()
        if first is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        if not isinstance(first[1], (Delta, Done)):  # Failed before any token: a plain 500
            return JSONResponse(error_body(first[1].message, "server_error"), status_code=500)
        if job.stream:
            finished = True  # the stream owns the requests from here
            return StreamingResponse(_stream(job, handles, first, events, loop), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results: dict[int, object] = {}
        item = first
        while True:
            index, event = item
            if isinstance(event, Done):
                results[index] = event.result
                if len(results) == job.n:
                    finished = True
                    return JSONResponse(response(job, [results[i] for i in range(job.n)]))
            elif not isinstance(event, Delta):
                return JSONResponse(error_body(event.message, "server_error"), status_code=500)
            item = await waiter.next()
            if item is None:
                return Response(status_code=499)
    finally:
        if not finished:  # the client left, a choice failed, or the handler was cancelled
            for handle in handles:
                loop.cancel(handle)


class _Waiter:
    """A request's events, and whether its client is still there. Until a response starts
    nothing else notices a client that leaves, so this looks every DISCONNECT_POLL_S."""

    def __init__(self, events: asyncio.Queue, request: Request) -> None:
        self.events, self.request, self.looked = events, request, time.monotonic()

    async def next(self) -> Event | None:
        """The next event, or None once the client has disconnected."""
        while True:
            if time.monotonic() - self.looked >= DISCONNECT_POLL_S:
                self.looked = time.monotonic()
                if await self.request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue


async def _stream(job: Job, handles: list[int], first: tuple[int, Event], events: asyncio.Queue, loop: EngineLoop):
    """The chunks of one streamed answer, every choice's tagged by its index; if the client
    leaves or a choice fails, every request still running is cancelled."""
    results: dict[int, object] = {}
    try:
        if job.kind == "chat":
            for index in range(job.n):
                yield _sse(chunk(job, role=True, index=index))
        item, offsets, streamed = first, [0] * job.n, 0  # offsets: characters of each answer's tokens so far

        def sent(body: dict) -> str:
            return _sse({**body, "usage": usage_so_far(job, streamed)} if job.continuous_usage else body)

        while True:
            index, event = item
            if isinstance(event, Delta):
                streamed += len(event.token_ids)
                logprobs = logprobs_body(job, event.logprobs, offsets[index]) if event.logprobs else None
                if logprobs is not None and job.kind == "completion":
                    offsets[index] += sum(map(len, logprobs["tokens"]))
                if event.text or logprobs is not None:
                    yield sent(chunk(job, event.text, logprobs=logprobs, index=index))
            elif isinstance(event, Done):
                if event.text:
                    yield sent(chunk(job, event.text, index=index))
                finish = chunk(job, finish=FINISH_REASONS[event.result.finish_reason], index=index)
                results[index] = event.result
                if len(results) < job.n:
                    yield sent(finish)
                else:
                    for last in final_chunks(job, finish, [results[i] for i in range(job.n)]):
                        yield sent(last) if "usage" not in last else _sse(last)
                    yield DONE
                    return
            else:
                yield _sse(error_body(event.message, "server_error"))
                yield DONE
                return
            item = await events.get()
    finally:
        if len(results) < job.n:  # the client left or a choice failed: the others stop too
            for handle in handles:
                loop.cancel(handle)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class BodyGuard:
    """ASGI middleware: reads each HTTP request's body itself, then hands the app the whole
    of it. A body over ``max_bytes`` is a 413 and is never kept or parsed: it is read and
    thrown away up to ``LINGER_BYTES``, or refused at once when its Content-Length is beyond
    that or its client waits for ``100 Continue`` before it sends; a body that stalls for
    ``timeout_s`` between two pieces is a 408. The app never waits on a client's upload, so
    neither a handler nor the shutdown's drain can be held by one."""

    def __init__(self, app, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        too_large = declared is not None and declared > self.max_bytes
        at_once = too_large and (declared > LINGER_BYTES or _header(scope, b"expect") == b"100-continue")
        chunks, size = [], 0
        while not at_once:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                await _refuse(408, f"the body stalled: no byte of it came for {self.timeout_s:g} s", "body_timeout",
                              scope, receive, send)
                return
            if message["type"] != "http.request":  # the client left
                if not too_large:  # the app sees it as it would have
                    await self.app(scope, _replay([message], receive), send)
                return
            size += len(message.get("body", b""))
            too_large = too_large or size > self.max_bytes
            if not too_large:
                chunks.append(message.get("body", b""))
            if not message.get("more_body", False) or size > LINGER_BYTES:
                break
        if too_large:
            what = f"{declared} bytes" if declared is not None else f"more than {self.max_bytes} bytes"
            await _refuse(413, f"the body has {what}; this server takes at most {self.max_bytes} "
                               f"(dspark serve --max-body-bytes)", "body_too_large", scope, receive, send)
            return
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)


LINGER_BYTES = 64 << 20
"""A body over the cap is read and thrown away up to this many bytes before the 413 goes out:
an HTTP/1.1 client sends its whole body before it reads, and a server that closes on unread
bytes resets the connection, so that client would see a reset instead of the 413 (nginx's
lingering close). Beyond this the connection is closed at once."""


async def _refuse(status: int, message: str, code: str, scope, receive, send) -> None:
    reply = JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=status,
                         headers={"Connection": "close"})
    await reply(scope, receive, send)


def _header(scope, name: bytes) -> bytes | None:
    """The first value of the request header ``name`` (lower case), lower-cased."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.lower()
    return None


def _content_length(scope) -> int | None:
    """The request's Content-Length, or None without a usable one (the bytes are counted then)."""
    try:
        return int(_header(scope, b"content-length"))
    except (TypeError, ValueError):
        return None


def _replay(messages: list[dict], receive):
    """A ``receive`` that returns ``messages`` first, then what the connection sends (a disconnect)."""

    async def replayed() -> dict:
        return messages.pop(0) if messages else await receive()

    return replayed


class BearerAuth:
    """ASGI middleware: every ``/v1`` route needs ``Authorization: Bearer <key>`` (401 without)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self._authorised(scope):
            body = error_body("invalid or missing API key: send Authorization: Bearer <key>",
                              "invalid_request_error", None, "invalid_api_key")
            reply = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await reply(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorised(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)
        return False


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(list(exc.errors()))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)
