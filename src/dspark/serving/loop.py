"""The engine loop: one thread drives a :class:`~dspark.engine.session.BatchSession` forever.

Continuous batching: a request submitted now joins a free slot at the next step and leaves
the moment it finishes. Each keeps its own seeded generator, so its greedy answer is the
batch-1 engine's whatever shares the batch (and, under a policy that verifies whole blocks,
its sampled answer too). The engine is not thread safe, so only this thread touches
it (torch releases the GIL inside its kernels, so the HTTP side stays responsive). The HTTP
side talks to it through a thread-safe inbox (submit, cancel); the loop answers through each
request's ``sink``, a callable the caller makes thread safe (the app wraps
``loop.call_soon_threadsafe``).

Faults stay local: a request whose prefill, verification, commit or sink raises fails alone
(a :class:`Failed` event, its slot freed; the others in its step commit as usual); a shared
part of a step that raises (drafting, the target forward) fails the requests in that step,
and the loop goes on with those still waiting. Nothing a request does ends it.

Admission: up to ``num_slots + max_queue`` requests may be in flight (running or waiting).
Counting only the waiting ones would refuse requests that arrive together at an idle server,
before the loop has moved them into their free slots.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Protocol, Union

from dspark.engine.request import GenerationRequest, GenerationResult, TokenLogprob
from dspark.engine.session import StepEvents
from dspark.serving.metrics import ServeMetrics
from dspark.serving.text import TextStream

log = logging.getLogger("dspark.serve")

IDLE_WAIT_S = 0.5
"""How long an idle loop sleeps on its inbox before looking at its flags again."""


@dataclass(frozen=True)
class Delta:
    """New committed tokens and the text that became safe to send (maybe empty)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    """The tokens' log-probabilities, when the request asks for them."""


@dataclass(frozen=True)
class Done:
    """The request finished: the rest of its text and the whole result."""

    text: str
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    """The request failed inside the server; nothing more comes."""

    message: str


Event = Union[Delta, Done, Failed]
Sink = Callable[[Event], None]


class QueueFull(Exception):
    """Every slot runs a request and ``max_queue`` more wait already."""


class ShuttingDown(Exception):
    """The loop is draining and takes no new requests."""


class Session(Protocol):
    """What the loop needs of a :class:`~dspark.engine.session.BatchSession`."""

    busy: bool
    waiting: int
    running: int
    num_slots: int

    def add(self, handle: Hashable, request: GenerationRequest) -> None: ...
    def cancel(self, handle: Hashable) -> bool: ...
    def step(self) -> StepEvents: ...


@dataclass
class _Ticket:
    """A submitted request, as the loop thread tracks it."""

    request: GenerationRequest
    sink: Sink
    text: TextStream
    submitted: float
    admitted: bool = False
    first_token: float | None = None


@dataclass(frozen=True)
class _Add:
    handle: int
    ticket: _Ticket


@dataclass(frozen=True)
class _Cancel:
    handle: int


class EngineLoop:
    """The background thread around one session (see the module docstring)."""

    def __init__(self, session: Session, decode: Callable[[list[int]], str], metrics: ServeMetrics,
                 max_queue: int) -> None:
        self.session, self.decode, self.metrics, self.max_queue = session, decode, metrics, max_queue
        self.capacity = session.num_slots + max_queue  # most requests in flight: one per slot, max_queue waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets: dict[int, _Ticket] = {}  # the loop thread's only
        self._handles = itertools.count()
        self._lock = threading.Lock()
        self._queued = 0  # submitted but not yet in a slot (or gone); guarded by _lock
        self._in_flight = 0  # submitted and not yet finished, failed or cancelled; guarded by _lock
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dspark-engine-loop", daemon=True)

    # -- the HTTP side (any thread) ---------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing.is_set()

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Requests running or waiting."""
        return self._in_flight

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        """Queue ``request``; its events go to ``sink`` from the loop thread. Returns its
        handle; raises QueueFull or ShuttingDown instead of queueing."""
        if self._closing.is_set():
            raise ShuttingDown("the server is shutting down")
        with self._lock:
            if self._in_flight >= self.capacity:
                raise QueueFull(f"{self._in_flight} requests are in flight already ({self.session.num_slots} "
                                f"running, --max-batch, and {self.max_queue} waiting, --max-queue)")
            self._queued += 1
            self._in_flight += 1
            handle = next(self._handles)
        ticket = _Ticket(request, sink, TextStream(self.decode, request.stop), time.perf_counter())
        self._inbox.put(_Add(handle, ticket))
        return handle

    def cancel(self, handle: int) -> None:
        """Drop a request (its client left); its slot is free before the next step."""
        self._inbox.put(_Cancel(handle))

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, finish those in flight, then stop the thread."""
        self._closing.set()
        self._inbox.put(None)  # wakes an idle loop
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._turn():
                    return
            except Exception as exc:  # a bug in the loop's own code: fail what runs, go on
                log.exception("engine loop failed")
                self._fail_running(exc)

    def _turn(self) -> bool:
        """Take the inbox, then one step if any request waits or runs; False: time to stop."""
        self._take_commands(block=not self.session.busy)
        self.metrics.on_load(self.session.running, self.queued)  # a cancel may have freed a slot
        if not self.session.busy:
            return not (self._closing.is_set() and self._inbox.empty())
        self._deliver(self.session.step())
        return True

    def _take_commands(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                self._apply(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _apply(self, command) -> None:
        if isinstance(command, _Add):
            self._tickets[command.handle] = command.ticket
            try:
                self.session.add(command.handle, command.ticket.request)
            except Exception as exc:  # the HTTP side checked it; a request the engine refuses fails alone
                self._fail(command.handle, exc)
        elif isinstance(command, _Cancel) and command.handle in self._tickets:
            self._forget(command.handle)
            self.session.cancel(command.handle)
            self.metrics.on_cancelled()

    def _deliver(self, events: StepEvents) -> None:
        now = time.perf_counter()
        for handle in events.admitted:
            ticket = self._tickets[handle]
            ticket.admitted = True
            self._unqueue()
            self.metrics.on_admit(len(ticket.request.prompt_ids))
        for handle, exc in events.failed.items():
            log.error("request %s failed: %s: %s", handle, type(exc).__name__, exc, exc_info=exc)
            self._fail(handle, exc)
        for handle, ids in events.tokens.items():
            # The commit that ends a request may run past a stop string: its text comes whole
            # with Done, from the engine's answer, never through the stream's hold-back.
            ending = handle in events.finished
            self._guarded(handle, lambda t: self._send_tokens(t, ids, now, stream_text=not ending,
                                                              logprobs=events.logprobs.get(handle)))
        for handle, result in events.finished.items():
            self._guarded(handle, lambda t: self._send_done(handle, t, result, now))
        self.metrics.on_step(events.record, list(events.rounds.values()), sum(map(len, events.tokens.values())),
                             self.session.running, self.queued)

    def _send_tokens(self, ticket: _Ticket, ids: list[int], now: float, stream_text: bool,
                     logprobs: list[TokenLogprob] | None = None) -> None:
        if ticket.first_token is None:
            ticket.first_token = now
        ticket.sink(Delta(ticket.text.push(ids) if stream_text else "", ids, logprobs))

    def _send_done(self, handle: int, ticket: _Ticket, result: GenerationResult, now: float) -> None:
        self._forget(handle)
        ttft = ticket.first_token - ticket.submitted if ticket.first_token is not None else None
        self.metrics.on_finish(result, ttft, now - ticket.submitted)
        ticket.sink(Done(ticket.text.finish(result.text), result))

    def _guarded(self, handle: int, send: Callable[[_Ticket], None]) -> None:
        """Run ``send`` for one request; if it raises, that request alone fails."""
        ticket = self._tickets.get(handle)
        if ticket is None:
            return
        try:
            send(ticket)
        except Exception as exc:
            log.exception("request %s failed", handle)
            self._fail(handle, exc)

    def _fail(self, handle: int, exc: Exception) -> None:
        """Fail one request: free its slot (if it holds one), tell its client."""
        ticket = self._forget(handle)
        self.session.cancel(handle)
        if ticket is None:
            return
        self.metrics.on_failed()
        try:
            ticket.sink(Failed(f"internal error: {type(exc).__name__}: {exc}"))
        except Exception:  # the client's side is gone too
            log.exception("could not report the failure of request %s", handle)

    def _fail_running(self, exc: Exception) -> None:
        for handle in [h for h, t in self._tickets.items() if t.admitted]:
            self._fail(handle, exc)

    def _unqueue(self) -> None:
        with self._lock:
            self._queued -= 1

    def _forget(self, handle: int) -> _Ticket | None:
        """Drop a request's ticket (it finished, failed or was cancelled) and its place in the counts."""
        ticket = self._tickets.pop(handle, None)
        if ticket is not None:
            with self._lock:
                self._in_flight -= 1
                if not ticket.admitted:
                    self._queued -= 1
        return ticket
