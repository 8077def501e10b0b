"""``dspark serve`` end to end: a live server on a loopback port, called with the official
``openai`` client (streamed and whole) and with raw httpx for what a client library would
never send.

Oracle: the batched engine at ``max_batch = 1`` over the same target and an identical
drafter (rebuilt from the same seed), itself checked against the batch-1 engine and plain
decoding in test_batch_engine.py. Under greedy decoding every served answer must equal it
token for token, whatever else shares the batch.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_helpers import MAX_MODEL_LEN, MODEL, build, chat_target, load_tokenizer, metric, serve, wait_for


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs cost more than the matmuls


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def target(tokenizer):
    return chat_target(tokenizer)


@pytest.fixture(scope="module")
def server(target):
    with serve(target, build(target, "dspark", max_batch=8), max_queue=64) as live:
        yield live


@pytest.fixture(scope="module")
def fixed_server(target):
    """Whole blocks verified (no load-dependent ℓ): a seeded sampled answer is then the same
    whatever shares the batch, not only equally distributed."""
    with serve(target, build(target, "fixed", max_batch=8), max_queue=64) as live:
        yield live


PROMPTS = [f"Tell me about the number {i} and {'why ' * (i % 5)}it matters." for i in range(32)]


def reference(target, messages_list, max_tokens_list, policy="dspark", temperature=0.0, seeds=None):
    """Answers of the batched engine at max_batch = 1 (one request at a time); greedy unless
    a temperature is given."""
    from dspark.engine import GenerationRequest
    from dspark.sampling import SamplingParams

    engine = build(target, policy, max_batch=1)
    seeds = seeds or [0] * len(messages_list)
    requests = [
        GenerationRequest(target.encode_conversation(m), SamplingParams(temperature=temperature), max_new_tokens=n, seed=s)
        for m, n, s in zip(messages_list, max_tokens_list, seeds)
    ]
    return engine.generate(requests).results


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- the openai client --------------------------------------------------------------------------


def test_chat_whole_and_streamed_equal_the_batch1_engine(server, target):
    want = reference(target, [user(PROMPTS[3])], [24])[0]
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[3]), max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == want.text
    assert whole.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert whole.usage.completion_tokens == len(want.token_ids)
    assert whole.usage.prompt_tokens == len(target.encode_conversation(user(PROMPTS[3])))
    stats = whole.model_extra["dspark"]
    assert stats["rounds"] >= 1 and stats["tau"] >= 1.0 and 0 <= stats["accepted_tokens"] <= stats["drafted_tokens"]

    stream = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[3]), max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == len(want.token_ids)
    assert last.model_extra["dspark"]["rounds"] == stats["rounds"]


def test_completions_whole_and_streamed(server, target):
    prompt = "The quick brown fox"
    from dspark.engine import GenerationRequest

    ids = target.encode_conversation(prompt)
    want = build(target, "dspark", max_batch=1).generate([GenerationRequest(ids, max_new_tokens=16)]).results[0]
    client = server.client()
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert whole.choices[0].text == want.text and whole.object == "text_completion"
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == want.text
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert "dspark" in chunks[-1].model_extra  # without include_usage: on the finish chunk


def test_32_concurrent_clients_get_their_batch1_answers(server, target):
    lengths = [8 + (i * 7) % 17 for i in range(32)]
    want = reference(target, [user(p) for p in PROMPTS], lengths)
    client = server.client()

    def ask(i: int) -> str:
        if i % 2:
            stream = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[i]), max_tokens=lengths[i],
                                                    temperature=0, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[i]), max_tokens=lengths[i], temperature=0)
        return reply.choices[0].message.content

    steps_before = metric(server.url, "dspark:engine_steps_total") or 0.0
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    assert got == [w.text for w in want]
    assert any(len(w.token_ids) > 1 for w in want)
    # 32 answers of 8-24 tokens in fewer steps than one at a time would take: they shared steps.
    steps = metric(server.url, "dspark:engine_steps_total") - steps_before
    assert steps < sum(len(w.token_ids) for w in want) / 2


def test_16_concurrent_seeded_samples_equal_batch1_with_a_fixed_policy(fixed_server, target):
    lengths = [10 + i % 7 for i in range(16)]
    want = reference(target, [user(p) for p in PROMPTS[:16]], lengths, policy="fixed", temperature=0.9,
                     seeds=list(range(100, 116)))
    client = fixed_server.client()

    def ask(i: int) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[i]), max_tokens=lengths[i],
                                               temperature=0.9, seed=100 + i)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == [w.text for w in want]


def test_sampling_fields_are_honoured(fixed_server, target):
    client = fixed_server.client()
    messages = user(PROMPTS[5])

    def ask(**kw):
        return client.chat.completions.create(model=MODEL, messages=messages, **kw).choices[0]

    greedy = ask(max_tokens=30, temperature=0)
    assert ask(max_tokens=30, temperature=1.0, extra_body={"top_k": 1}).message.content == greedy.message.content
    a, b = (ask(max_tokens=30, temperature=1.0, seed=7).message.content for _ in range(2))
    assert a == b  # a request's own seed: the same answer whatever else runs
    assert {ask(max_tokens=30, temperature=1.0, seed=s).message.content for s in range(4)} != {a}
    assert ask(max_tokens=30, temperature=0.8, top_p=0.9, seed=3).message.content == \
        ask(max_tokens=30, temperature=0.8, top_p=0.9, seed=3).message.content
    short = ask(max_tokens=3, temperature=0)
    assert short.finish_reason in ("length", "stop")
    assert greedy.message.content.startswith(short.message.content)

    text = greedy.message.content
    windows = [text[i : i + 3] for i in range(len(text) // 2, len(text) - 2)]
    stop = next(w for w in windows if w.strip() and "\ufffd" not in w)  # a plain 3-character stop string
    cut = text[: text.find(stop)]
    stopped = ask(max_tokens=30, temperature=0, stop=[stop, "never-there"])
    assert (stopped.message.content, stopped.finish_reason) == (cut, "stop")
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                            stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == cut


def test_models_health_openapi(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])


def test_metrics_count_drafts_calibration_and_latency(server):
    client = server.client()
    for p in PROMPTS[:4]:
        client.chat.completions.create(model=MODEL, messages=user(p), max_tokens=20, temperature=0)
    url = server.url
    drafts = metric(url, "dspark:spec_decode_num_drafts_total")
    tokens = metric(url, "dspark:spec_decode_num_draft_tokens_total")
    accepted = metric(url, "dspark:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and tokens >= drafts and 0 <= accepted <= tokens
    per_pos = metric(url, "dspark:spec_decode_num_accepted_tokens_per_pos_total")
    assert per_pos == accepted  # every accepted token is counted at its position
    assert metric(url, "dspark:spec_decode_num_draft_tokens_per_pos_total", position="0") == drafts
    assert metric(url, "dspark:spec_decode_mean_accepted_length") >= 1.0
    assert metric(url, "dspark:spec_decode_mean_verify_length") > 0.0
    predicted = metric(url, "dspark:acceptance_predicted", position="0")
    realised = metric(url, "dspark:acceptance_realised", position="0")
    error = metric(url, "dspark:acceptance_calibration_error", position="0")
    assert 0.0 < predicted < 1.0 and 0.0 <= realised <= 1.0 and 0.0 <= error <= 1.0
    assert error >= abs(predicted - realised) - 1e-9  # ECE bounds the gap of the means
    assert metric(url, "dspark:time_to_first_token_seconds_count") >= 4
    assert metric(url, "dspark:time_per_output_token_seconds_count") >= 1
    assert metric(url, "dspark:num_requests_running") == 0 and metric(url, "dspark:num_requests_waiting") == 0
    assert metric(url, "dspark:generation_tokens_total") > 0
    assert metric(url, "dspark:generation_tokens_per_second") is not None
    assert metric(url, "dspark:server_info", model_name=MODEL, policy="dspark") == 1


# -- bad requests ---------------------------------------------------------------------------------

OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
OK_COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}

BAD = [  # (route, body or raw bytes, status, param)
    ("chat", b"{not json", 400, None),
    ("chat", b"", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("chat", {**OK_CHAT, "model": "gpt-4"}, 404, "model"),
    ("chat", {"messages": OK_CHAT["messages"]}, 400, "model"),
    ("chat", {**OK_CHAT, "messages": []}, 400, "messages"),
    ("chat", {**OK_CHAT, "messages": "hi"}, 400, "messages"),
    ("chat", {**OK_CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ("chat", {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, None),
    ("chat", {**OK_CHAT, "messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400, "messages.0.name"),
    ("chat", {**OK_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {**OK_CHAT, "max_tokens": -3}, 400, "max_tokens"),
    ("chat", {**OK_CHAT, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("chat", {**OK_CHAT, "max_tokens": 10**40}, 400, "max_tokens"),
    ("chat", {**OK_CHAT, "max_tokens": "4"}, 400, "max_tokens"),
    ("chat", {**OK_CHAT, "max_tokens": 4.0}, 400, "max_tokens"),
    ("chat", {**OK_CHAT, "max_tokens": True}, 400, "max_tokens"),
    ("chat", {**OK_CHAT, "max_tokens": 2, "max_completion_tokens": 2}, 400, "max_completion_tokens"),
    ("chat", {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat", {**OK_CHAT, "stop": [""]}, 400, "stop"),
    ("chat", {**OK_CHAT, "stop": "x" * 1000}, 400, "stop"),
    ("chat", {**OK_CHAT, "stop": [1]}, 400, "stop.0"),
    ("chat", {**OK_CHAT, "temperature": 2.5}, 400, "temperature"),
    ("chat", {**OK_CHAT, "temperature": -1}, 400, "temperature"),
    ("chat", {**OK_CHAT, "temperature": 10**400}, 400, "temperature"),
    ("chat", {**OK_CHAT, "temperature": "hot"}, 400, "temperature"),
    ("chat", {**OK_CHAT, "top_p": 0}, 400, "top_p"),
    ("chat", {**OK_CHAT, "top_k": -5}, 400, "top_k"),
    ("chat", {**OK_CHAT, "seed": -1}, 400, "seed"),
    ("chat", {**OK_CHAT, "seed": 2**70}, 400, "seed"),
    ("chat", {**OK_CHAT, "n": 9}, 400, "n"),
    ("chat", {**OK_CHAT, "n": 0}, 400, "n"),
    ("chat", {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat", {**OK_CHAT, "logprobs": "yes"}, 400, "logprobs"),
    ("chat", {**OK_CHAT, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("chat", {**OK_CHAT, "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("completion", {**OK_COMPLETION, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("chat", {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("chat", {**OK_CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat", {**OK_CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat", {**OK_CHAT, "stream": True, "stream_options": {"include_usage": True, "x": 1}}, 400, "stream_options.x"),
    ("chat", {**OK_CHAT, "stream": "yes"}, 400, "stream"),
    ("chat", {**OK_CHAT, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ("completion", {**OK_COMPLETION, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completion", {**OK_COMPLETION, "prompt": ""}, 400, "prompt"),
    ("completion", {**OK_COMPLETION, "prompt": []}, 400, "prompt"),
    ("completion", {**OK_COMPLETION, "prompt": [10**9]}, 400, "prompt"),
    ("completion", {**OK_COMPLETION, "prompt": [-1]}, 400, "prompt"),
    ("completion", {**OK_COMPLETION, "echo": True}, 400, "echo"),
    ("completion", {**OK_COMPLETION, "best_of": 3}, 400, "best_of"),
    ("completion", {**OK_COMPLETION, "logprobs": 6}, 400, "logprobs"),
    ("completion", {**OK_COMPLETION, "suffix": "x"}, 400, "suffix"),
    ("completion", {**OK_COMPLETION, "messages": OK_CHAT["messages"]}, 400, "messages"),
    ("completion", b'{"model": "tiny-chat", "prompt": "\\ud800", "max_tokens": 2}', 400, "prompt"),
    ("chat", b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', 400, "messages"),
]

ROUTES = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def post(url: str, route: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(url + ROUTES[route], content=content, headers={"Content-Type": "application/json"}, timeout=60, **kw)


def assert_openai_error(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("route, body, status, param", BAD)
def test_bad_requests_get_openai_errors(server, route, body, status, param):
    assert_openai_error(post(server.url, route, body), status, param)


def test_unknown_fields_are_named_and_routes_are_openai_shaped(server):
    error = assert_openai_error(post(server.url, "chat", {**OK_CHAT, "frobnicate": 1}), 400, "frobnicate")
    assert "frobnicate" in error["message"]
    assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert post(server.url, "chat", OK_CHAT).status_code == 200  # and the server still answers


FUZZ_MODEL_LEN = 64
"""A small context window keeps the fuzz's valid requests short (their default max_tokens
is the rest of it)."""


@pytest.mark.slow  # hypothesis draws 320 structured bodies: ~40 s on a busy 2-core machine
def test_fuzzed_requests_never_break_the_server(target):
    """≥ 300 random bodies (random JSON, random fields of random types, raw bytes): every
    answer is a 200 or an OpenAI-style 4xx, never a 500; then the server answers normally."""
    with serve(target, build(target, "dspark", max_batch=4), max_model_len=FUZZ_MODEL_LEN) as server:
        fuzz_server(server, target)


def fuzz_server(server, target) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    junk = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=4), scalars, max_size=2)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                          max_leaves=8)

    def mostly(valid):  # a valid value seven times in eight, else junk of any type
        return st.integers(0, 7).flatmap(lambda i: junk if i == 0 else valid)

    message = st.fixed_dictionaries(
        {"role": mostly(st.sampled_from(["user", "system", "assistant", "tool", ""])), "content": mostly(st.text(max_size=16))},
        optional={"name": junk},
    )
    fields = {
        "temperature": mostly(st.floats(-1, 3)),
        "top_p": mostly(st.floats(-0.5, 1.5)),
        "top_k": mostly(st.integers(-3, 100000)),
        "stop": mostly(st.lists(st.text(max_size=4), max_size=6) | st.text(max_size=3)),
        "seed": mostly(st.integers()),
        "stream": mostly(st.booleans()),
        "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": mostly(st.booleans())})),
    }
    unsupported = st.fixed_dictionaries({}, optional={"n": st.integers(0, 2) | junk, "logprobs": junk, "tools": junk,
                                                      "unknown": junk, "prompt": junk, "messages": junk})
    extras = st.integers(0, 3).flatmap(lambda i: unsupported if i == 0 else st.just({}))  # mostly supported fields only

    def body_for(route: str):
        text = ({"messages": mostly(st.lists(message, max_size=2))} if route == "chat" else
                {"prompt": mostly(st.text(max_size=16) | st.lists(st.integers(-3, 60000), max_size=4))})
        core = st.fixed_dictionaries({"model": mostly(st.just(MODEL)), "max_tokens": mostly(st.integers(-2, 4)), **text},
                                     optional=fields)
        return st.tuples(st.just(route), st.tuples(core, extras).map(lambda pair: {**pair[0], **pair[1]}))

    nearly_valid = st.sampled_from(["chat", "completion"]).flatmap(body_for)
    raw = st.binary(max_size=40)
    seen = []

    garbage = st.tuples(st.sampled_from(["chat", "completion"]), values | raw)

    @settings(max_examples=320, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(case=nearly_valid | garbage)
    def fuzz(case):
        route, payload = case
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        with httpx.Client(timeout=60) as http:
            response = http.post(server.url + ROUTES[route], content=content, headers={"Content-Type": "application/json"})
        seen.append(response.status_code)
        assert response.status_code in (200, 400, 404), (payload, response.text)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    fuzz()
    assert len(seen) >= 300 and 0 < seen.count(200) < len(seen) and seen.count(400) > 200, Counter(seen)
    assert httpx.get(server.url + "/health").status_code == 200
    want = reference(target, [user("Hello there.")], [12])[0]
    reply = server.client().chat.completions.create(model=MODEL, messages=user("Hello there."), max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == want.text
    assert metric(server.url, "dspark:num_requests_running") == 0


# -- overload, auth, faults, disconnects ------------------------------------------------------------


class GatedSession:
    """A session whose steps wait for ``gate``, so a test decides when the engine moves."""

    def __init__(self, inner, gate: threading.Event | None = None, delay: float = 0.0) -> None:
        self.inner, self.gate, self.delay = inner, gate, delay

    busy = property(lambda self: self.inner.busy)
    waiting = property(lambda self: self.inner.waiting)
    running = property(lambda self: self.inner.running)
    num_slots = property(lambda self: self.inner.num_slots)

    def add(self, handle, request):
        self.inner.add(handle, request)

    def cancel(self, handle):
        return self.inner.cancel(handle)

    def step(self):
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            threading.Event().wait(self.delay)
        return self.inner.step()


def gated_server(target, policy="plain", max_batch=1, max_queue=1, gate=None, delay=0.0):
    from dspark.serving.app import create_app
    from dspark.serving.config import ServeSettings
    from dspark.serving.loop import EngineLoop
    from dspark.serving.metrics import ServeMetrics
    from serve_helpers import LiveServer

    engine = build(target, policy, max_batch=max_batch)
    session = GatedSession(engine.session(max_batch, MAX_MODEL_LEN), gate, delay)
    loop = EngineLoop(session, target.decode, ServeMetrics(MODEL), max_queue)
    return LiveServer(create_app(loop, target, ServeSettings(MODEL, MAX_MODEL_LEN, max_queue=max_queue))), engine


def test_a_full_queue_answers_429_with_retry_after(target):
    gate = threading.Event()
    live, _ = gated_server(target, max_queue=1, gate=gate)  # one slot, one place in the queue
    with live:
        with ThreadPoolExecutor(2) as pool:
            first = [pool.submit(post, live.url, "chat", OK_CHAT) for _ in range(2)]
            wait_for(lambda: live.loop.in_flight == 2, what="the first two requests to arrive")
            refused = post(live.url, "chat", OK_CHAT)
            error = assert_openai_error(refused, 429)
            assert refused.headers["Retry-After"] == "1" and error["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                live.client().chat.completions.create(model=MODEL, messages=user("x"), max_tokens=2)
            gate.set()
            assert [f.result().status_code for f in first] == [200, 200]
        assert post(live.url, "chat", OK_CHAT).status_code == 200  # room again
        assert metric(live.url, "dspark:request_rejected_total") == 2


def test_max_queue_counts_only_requests_that_wait_for_a_slot(target):
    """--max-batch 4 --max-queue 1: five requests may be in flight, whatever the loop has
    admitted yet. Four that reach an idle server together all run (they used to be refused
    while still on their way to a free slot); the fifth waits; the sixth gets 429."""
    gate = threading.Event()  # the engine does not move: nobody is admitted until the gate opens
    live, _ = gated_server(target, max_batch=4, max_queue=1, gate=gate)
    with live:
        with ThreadPoolExecutor(5) as pool:
            four = [pool.submit(post, live.url, "chat", OK_CHAT) for _ in range(4)]
            wait_for(lambda: live.loop.in_flight == 4, what="four requests to arrive")
            assert live.loop.queued == 4  # none holds a slot yet, and none was refused
            fifth = pool.submit(post, live.url, "chat", OK_CHAT)
            wait_for(lambda: live.loop.in_flight == 5, what="the fifth request to queue")
            assert_openai_error(post(live.url, "chat", OK_CHAT), 429)
            gate.set()
            assert [f.result().status_code for f in four + [fifth]] == [200] * 5
        assert metric(live.url, "dspark:request_rejected_total") == 1
        assert live.loop.in_flight == 0 and live.loop.queued == 0


def test_a_tiny_temperature_or_top_p_answers_greedily_beside_a_greedy_request(server, target):
    """A temperature below the greedy threshold (1e-37, or a subnormal 1e-45 that overflows any
    logit) and a top_p that rounds to 0 are the greedy answer, and a greedy request sharing the
    step is unaffected. Their NaN distributions used to fail every request of the step with a
    500 ("probability tensor contains either inf, nan or element < 0")."""
    want = reference(target, [user(PROMPTS[6]), user(PROMPTS[7])], [16, 16])
    client = server.client()

    def ask(i: int, **sampling) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[6 + i % 2]), max_tokens=16,
                                               seed=i, **sampling)
        return reply.choices[0].message.content

    asks = [{"temperature": 0}, {"temperature": 1e-37}, {"temperature": 1e-45}, {"temperature": 1.0, "top_p": 1e-300},
            {"temperature": 0}]
    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda i: ask(i, **asks[i]), range(len(asks))))
    assert got == [want[i % 2].text for i in range(len(asks))]


def test_a_request_whose_logits_turn_nan_fails_alone(target, monkeypatch):
    """One request's target logits come out NaN in a step it shares with two greedy requests:
    it gets a 500 naming the fault, they get their batch-1 answers."""
    import dspark.engine.batched
    import torch

    real = dspark.engine.batched.verify

    def nan_for_top_k_3(tokens, q, logits, params, generator):
        if params.top_k == 3:  # only the victim sends top_k = 3 (greedy: it changes nothing else)
            logits = torch.full_like(logits, float("nan"))
        return real(tokens, q, logits, params, generator)

    monkeypatch.setattr(dspark.engine.batched, "verify", nan_for_top_k_3)
    want = reference(target, [user(PROMPTS[8])], [12])[0]
    gate = threading.Event()
    live, _ = gated_server(target, policy="dspark", max_batch=4, max_queue=4, gate=gate)
    with live:
        bodies = [{**OK_CHAT, "messages": user(PROMPTS[8]), "max_tokens": 12, "temperature": 0} for _ in range(3)]
        bodies[1] = {**bodies[1], "messages": user(PROMPTS[9]), "top_k": 3}
        with ThreadPoolExecutor(3) as pool:
            replies = [pool.submit(post, live.url, "chat", b) for b in bodies]
            wait_for(lambda: live.loop.in_flight == 3, what="the three requests to arrive")
            gate.set()  # all three join the first step together
            replies = [f.result() for f in replies]
        error = assert_openai_error(replies[1], 500)
        assert "NonFiniteLogits" in error["message"] and "NaN" in error["message"]
        texts = [r.json()["choices"][0]["message"]["content"] for r in (replies[0], replies[2])]
        assert texts == [want.text, want.text]
        assert post(live.url, "chat", {**bodies[1], "top_k": None}).status_code == 200  # the loop goes on
        assert metric(live.url, "dspark:request_failed_total") == 1


def test_a_large_body_gets_a_fast_413_while_health_answers(server):
    """A 10 MB chat body (over the 4 MiB default cap) is refused with an OpenAI 413 before it
    is parsed or tokenized, with or without a Content-Length; a 3 MB one under the cap is
    tokenized off the event loop. /health answers all the while: it used to stall for the
    seconds the body took to tokenize. (The bound is generous: a stall took 5 s.)"""
    huge = json.dumps({**OK_CHAT, "messages": user("word " * 2_000_000)}).encode()
    under = json.dumps({**OK_CHAT, "messages": user("word " * 600_000)}).encode()
    assert len(huge) > 10_000_000 and len(under) < 4 << 20
    slowest, done = [0.0], threading.Event()

    def watch_health() -> None:
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                start = time.perf_counter()
                assert http.get(server.url + "/health").status_code == 200
                slowest[0] = max(slowest[0], time.perf_counter() - start)
                time.sleep(0.01)

    def chunked(body: bytes):
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    with ThreadPoolExecutor(1) as pool:
        watcher = pool.submit(watch_health)
        try:
            declared = post(server.url, "chat", huge)
            streamed = httpx.post(server.url + ROUTES["chat"], content=chunked(huge), timeout=60,
                                  headers={"Content-Type": "application/json"})
            tokenized = post(server.url, "chat", under)
        finally:
            done.set()
            watcher.result()
    for refused in (declared, streamed):
        assert assert_openai_error(refused, 413)["code"] == "body_too_large"
    # A client that waits for 100 Continue is refused without sending its body.
    status, error = raw_exchange(server.port, b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n")
    assert status == 413 and error["code"] == "body_too_large"
    assert "Content-Length" not in streamed.request.headers
    assert assert_openai_error(tokenized, 400, "messages")["code"] == "context_length_exceeded"
    assert slowest[0] < 1.5, f"/health took {slowest[0]:.2f} s"


def test_a_body_that_stalls_gets_408_and_frees_its_handler(target):
    """Half a body, then nothing: after the body timeout the client gets a 408 (it used to hold
    its handler, and the server's shutdown, forever)."""
    with serve(target, build(target, "plain", max_batch=1), body_timeout_s=0.5) as live:
        status, error = raw_exchange(live.port, b"Content-Length: 100\r\n\r\n" + b'{"model": "' + b"x" * 39)
        assert status == 408 and error["code"] == "body_timeout"
        assert post(live.url, "chat", OK_CHAT).status_code == 200


def raw_exchange(port: int, rest: bytes) -> tuple[int, dict]:
    """POST a chat request head (then ``rest``: more headers, a blank line, maybe body bytes)
    on a raw socket; read until the server closes; return its status and error object."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + rest)
        reply = b""
        while piece := sock.recv(1 << 16):
            reply += piece
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_api_key_is_required_on_v1_routes(target):
    with serve(target, build(target, "plain", max_batch=2), api_key="s3cret") as live:
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").chat.completions.create(model=MODEL, messages=user("x"), max_tokens=2)
        assert_openai_error(httpx.get(live.url + "/v1/models"), 401)
        assert_openai_error(post(live.url, "chat", b"{not json"), 401)  # no key: not even parsed
        reply = live.client(api_key="s3cret").chat.completions.create(model=MODEL, messages=user("x"), max_tokens=2)
        assert reply.choices[0].message.content is not None
        assert httpx.get(live.url + "/health").status_code == 200  # health and metrics stay open
        assert httpx.get(live.url + "/metrics").status_code == 200


def test_a_failing_request_fails_alone_and_the_loop_goes_on(target):
    engine = build(target, "plain", max_batch=4)
    prefill, step = engine.prefill_slot, engine.verify_step

    def faulty_prefill(handle, request, slot, cache):
        if request.seed == 666:
            raise RuntimeError("boom in one request")
        return prefill(handle, request, slot, cache)

    countdown = [0]  # the step that many calls from now raises (0: none)

    def faulty_step(live, cache):
        countdown[0] -= 1
        if countdown[0] == 0:
            raise RuntimeError("boom in a step")
        return step(live, cache)

    engine.prefill_slot, engine.verify_step = faulty_prefill, faulty_step
    want = reference(target, [user(PROMPTS[1])], [10], policy="plain")[0]
    with serve(target, engine) as live:
        client = live.client()

        def good():
            return client.chat.completions.create(model=MODEL, messages=user(PROMPTS[1]), max_tokens=10, temperature=0)

        with ThreadPoolExecutor(4) as pool:
            oks = [pool.submit(good) for _ in range(3)]
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model=MODEL, messages=user("x"), max_tokens=10, seed=666)
            assert all(f.result().choices[0].message.content == want.text for f in oks)
        error = assert_openai_error(post(live.url, "chat", {**OK_CHAT, "seed": 666}), 500)
        assert "boom in one request" in error["message"] and error["type"] == "server_error"

        countdown[0] = 1  # the next step raises: its requests fail, the loop survives
        assert_openai_error(post(live.url, "chat", {**OK_CHAT, "max_tokens": 8}), 500)
        assert good().choices[0].message.content == want.text
        assert httpx.get(live.url + "/health").status_code == 200
        assert metric(live.url, "dspark:request_failed_total") == 3
        assert metric(live.url, "dspark:num_requests_running") == 0

        countdown[0] = 3  # mid-stream: an error event, then [DONE]
        with httpx.stream("POST", live.url + ROUTES["chat"], json={**OK_CHAT, "max_tokens": 20, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and "error" in json.loads(lines[-2][len("data: "):])


def test_a_client_that_leaves_mid_stream_frees_its_slot(target):
    """One slot: B waits behind A; A's client leaves after two chunks; A is cancelled, and B
    gets the slot and its whole answer."""
    live, _ = gated_server(target, policy="plain", max_batch=1, max_queue=4, delay=0.02)
    want = reference(target, [user(PROMPTS[2])], [12], policy="plain")[0]
    with live:
        long = {"model": MODEL, "messages": user(PROMPTS[0]), "max_tokens": 70, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", live.url + ROUTES["chat"], json=long) as a:
            assert a.status_code == 200
            lines = a.iter_lines()
            next(lines), next(lines)
            with ThreadPoolExecutor(1) as pool:
                b = pool.submit(lambda: live.client().chat.completions.create(
                    model=MODEL, messages=user(PROMPTS[2]), max_tokens=12, temperature=0))
                wait_for(lambda: metric(live.url, "dspark:num_requests_waiting") == 1, what="B to queue")
                a.close()  # the client leaves mid-stream
                assert b.result().choices[0].message.content == want.text
        wait_for(lambda: metric(live.url, "dspark:request_cancelled_total") == 1, what="A's cancellation")
        assert metric(live.url, "dspark:request_success_total") == 1  # B only: A never finished
        assert metric(live.url, "dspark:num_requests_running") == 0


def test_a_client_that_gives_up_on_a_whole_answer_is_cancelled_too(target):
    live, _ = gated_server(target, policy="plain", max_batch=1, max_queue=4, delay=0.02)
    with live:
        long = {"model": MODEL, "messages": user(PROMPTS[0]), "max_tokens": 70, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + ROUTES["chat"], json=long, timeout=0.5)  # gives up, closes the connection
        wait_for(lambda: metric(live.url, "dspark:request_cancelled_total") == 1, what="the cancellation")
        assert metric(live.url, "dspark:num_requests_running") == 0
        assert post(live.url, "chat", OK_CHAT).status_code == 200  # the only slot serves the next one
        assert metric(live.url, "dspark:request_success_total") == 1


# -- the command line ---------------------------------------------------------------------------------


def save_tiny_chat(target, folder):
    target.model.save_pretrained(folder)
    target.tokenizer.save_pretrained(folder)
    return folder


def start_serve(folder, *args: str):
    """``dspark serve`` over a saved tiny target in a subprocess on a free port; returns
    (process, url) once /health answers."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("DSPARK_API_KEY", None)
    command = [sys.executable, "-m", "dspark", "serve", "--model", str(folder), "--drafter", "none", "--policy", "plain",
               "--max-model-len", "256", "--port", str(port), "--served-model-name", MODEL, "--log-level", "warning",
               *args]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise AssertionError(f"dspark serve exited {process.returncode}: {process.communicate()}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the server did not come up")
        time.sleep(0.2)


@pytest.mark.slow  # a subprocess that imports torch and transformers: ~20 s on a busy 2-core machine
def test_serve_command_sigterm_finishes_the_requests_in_flight(target, tmp_path):
    """`dspark serve` in a subprocess over a saved tiny target; SIGTERM while one request
    streams and two wait for the only slot: all three finish, then it exits 0."""
    import signal

    process, url = start_serve(save_tiny_chat(target, tmp_path / "tiny-chat"), "--max-batch", "1")
    try:
        body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 240, "temperature": 0, "stream": True}
        first_chunk = threading.Event()

        def stream(i: int) -> list[str]:
            with httpx.stream("POST", url + ROUTES["completion"], json={**body, "seed": i}, timeout=120) as r:
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first_chunk.set()
                return lines

        with ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(stream, i) for i in range(3)]
            assert first_chunk.wait(60)
            # Signal only once the server holds all three (one streaming, two queued): a
            # request still in the kernel's accept backlog when uvicorn stops listening would
            # never be answered, which under load made this test time out.
            held_by = time.monotonic() + 60
            while metric(url, "dspark:num_requests_running") + metric(url, "dspark:num_requests_waiting") < 3:
                assert time.monotonic() < held_by, "the server never held all three requests"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            in_flight = sum(not f.done() for f in streams)
            results = [f.result() for f in streams]
        assert in_flight >= 2  # one slot: the signal came while one streamed and the others waited
        for lines in results:
            assert lines[-1] == "data: [DONE]"
            finish = json.loads(lines[-2][len("data: "):])
            assert finish["choices"][0]["finish_reason"] in ("length", "stop")
        # uvicorn drains, runs the app's shutdown (the loop drains too), then re-raises the
        # signal it caught, so the parent sees a process ended by SIGTERM (status 143 in a shell).
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow  # a subprocess that imports torch and transformers: ~20 s on a busy 2-core machine
def test_serve_command_sigterm_exits_within_the_drain_timeout_despite_a_half_sent_body(target, tmp_path):
    """A client sends half a body and stops; SIGTERM: the server stops waiting for it after
    --drain-timeout and exits (it used to wait forever). Also: the key comes from
    --api-key-file, and a loopback server without a key warns about nothing."""
    import signal
    import socket

    folder = save_tiny_chat(target, tmp_path / "tiny-chat")
    (tmp_path / "key").write_text("s3cret\n")
    process, url = start_serve(folder, "--drain-timeout", "2", "--api-key-file", str(tmp_path / "key"))
    try:
        assert_openai_error(httpx.get(url + "/v1/models"), 401)
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
            stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b" " * 500)
            time.sleep(0.5)  # the server holds the request, waiting for the rest of its body
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            status = process.wait(60)
            took = time.monotonic() - signalled
        assert status in (0, -signal.SIGTERM)
        assert took < 2 + 15, f"exit took {took:.1f} s after SIGTERM with --drain-timeout 2"
        assert "warning: --host" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_reads_its_key_from_a_file_or_the_environment(tmp_path):
    from dspark.cli.serve import read_api_key
    from dspark.errors import DsparkError

    key_file = tmp_path / "key"
    key_file.write_text("  from-file\n")
    env = {"DSPARK_API_KEY": "from-env"}
    assert read_api_key(None, key_file, env) == "from-file"  # the file first, then the flag, then the environment
    assert read_api_key("from-flag", None, env) == "from-flag"
    assert read_api_key(None, None, env) == "from-env"
    assert read_api_key(None, None, {}) is None
    for flag, path, environ, message in [("k", key_file, {}, "not both"), (None, tmp_path / "none", {}, "cannot be read"),
                                         (None, tmp_path, {}, "cannot be read"), ("  ", None, {}, "--api-key is empty"),
                                         (None, None, {"DSPARK_API_KEY": ""}, "set but empty")]:
        with pytest.raises(DsparkError, match=message):
            read_api_key(flag, path, environ)
    (tmp_path / "blank").write_text("\n")
    with pytest.raises(DsparkError, match="is empty"):
        read_api_key(None, tmp_path / "blank", {})


def test_serve_warns_once_when_it_listens_beyond_loopback_without_a_key(monkeypatch, tmp_path):
    """The address is bound and checked before anything loads; here the model is refused
    right after, so the warning (or its absence) is all that happened."""
    from typer.testing import CliRunner

    import dspark.target.loading
    from dspark.cli.main import app
    from dspark.errors import DsparkError

    def stop(model):
        raise DsparkError("stopped before loading")

    monkeypatch.setattr(dspark.target.loading, "resolve", stop)
    monkeypatch.delenv("DSPARK_API_KEY", raising=False)
    runner = CliRunner()
    (tmp_path / "key").write_text("k\n")
    for args, warns in [(["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--api-key-file", str(tmp_path / "key")], False),
                        (["--host", "127.0.0.1"], False), (["--host", "localhost"], False)]:
        result = runner.invoke(app, ["serve", "--port", "0", *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and lines[-1] == "error: stopped before loading", result.stderr
        if warns:
            assert len(lines) == 2 and lines[0].startswith("warning: --host 0.0.0.0 is reachable from other machines")
        else:
            assert len(lines) == 1, result.stderr


def test_serve_command_refuses_bad_options_and_a_missing_extra(monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from dspark.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch must be >= 1" in result.stderr
    result = runner.invoke(app, ["serve", "--max-model-len", "1"])
    assert result.exit_code == 2 and "--max-model-len must be >= 2" in result.stderr
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2 and "pip install 'dspark[serve]'" in result.stderr
    assert "serve" in runner.invoke(app, ["--help"]).output
