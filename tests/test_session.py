"""The open batch the server drives (:class:`~dspark.engine.session.BatchSession`) and the
streaming text it sends (:class:`~dspark.serving.text.TextStream`).

Oracle: ``BatchEngine.generate`` (itself checked against the batch-1 engine in
test_batch_engine.py): requests added to a session at any step, next to others that are
cancelled, commit exactly what ``generate`` commits for them.
"""

from __future__ import annotations

import pytest
import torch

import dspark.engine.batched
from conftest import tiny_target
from dspark.engine import GenerationRequest
from dspark.engine.build import build_engine
from dspark.errors import NonFiniteLogits
from dspark.sampling import SamplingParams
from dspark.scheduling import FixedGamma
from dspark.serving.text import TextStream
from test_batch_engine import RICH_PROMPTS, dspark_drafter, rich_target


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs cost more than the matmuls


@pytest.fixture(scope="module")
def rich():
    return rich_target()


def engine(target, max_batch: int = 2):
    return build_engine(target, dspark_drafter(rich=True), FixedGamma(), max_batch)


def requests(n: int = 5) -> list[GenerationRequest]:
    return [GenerationRequest(RICH_PROMPTS[i % len(RICH_PROMPTS)], max_new_tokens=6 + i, seed=i) for i in range(n)]


def test_requests_join_late_and_cancelled_ones_free_their_slots(rich):
    want = engine(rich).generate(requests()).results
    session = engine(rich).session(num_slots=2, capacity=64)
    session.add("victim", GenerationRequest(RICH_PROMPTS[1], max_new_tokens=40, seed=99))
    session.add(0, requests()[0])
    got, tokens = {}, {}
    events = session.step()
    assert events.admitted == ["victim", 0] and session.running == 2 and events.record is not None
    assert set(events.rounds) == {"victim", 0}
    assert session.cancel("victim") and not session.cancel("victim")
    assert session.running == 1
    for i, r in enumerate(requests()[1:], 1):  # the rest join while request 0 runs
        session.add(i, r)
    session.add("queued-then-cancelled", requests()[0])
    assert session.cancel("queued-then-cancelled")
    while session.busy:
        events = session.step()
        assert not events.failed
        for handle, ids in events.tokens.items():
            tokens.setdefault(handle, []).extend(ids)
        got.update(events.finished)
        assert session.running <= 2
    assert [got[i].token_ids for i in range(5)] == [w.token_ids for w in want]
    # Streaming sees every committed id exactly once (request 0's prefill token came earlier).
    assert [tokens.get(i, []) for i in range(1, 5)] == [w.token_ids for w in want[1:]]
    assert "victim" not in got and "queued-then-cancelled" not in got


def test_session_refuses_what_cannot_run(rich):
    session = engine(rich).session(num_slots=1, capacity=16)
    with pytest.raises(ValueError, match="16 tokens a slot holds"):
        session.add(0, GenerationRequest([1, 2, 3], max_new_tokens=14))
    with pytest.raises(ValueError, match="num_slots"):
        engine(rich).session(num_slots=3, capacity=16)
    with pytest.raises(ValueError, match="token ids"):
        session.add(0, GenerationRequest([10**6], max_new_tokens=2))


def test_a_failing_prefill_fails_that_request_only(rich):
    e = engine(rich)
    prefill = e.prefill_slot

    def faulty(handle, request, slot, cache):
        if handle == "bad":
            raise RuntimeError("boom")
        return prefill(handle, request, slot, cache)

    e.prefill_slot = faulty
    session = e.session(num_slots=1, capacity=64)
    session.add("bad", requests()[0])
    session.add("good", requests()[1])
    events = session.step()
    assert list(events.failed) == ["bad"] and events.admitted == ["good"]  # its slot went to the next
    while session.busy:
        events.finished.update(session.step().finished)
    assert events.finished["good"].token_ids == engine(rich).generate([requests()[1]]).results[0].token_ids


def test_a_failing_step_fails_its_requests_and_frees_their_slots(rich):
    e = engine(rich)
    step = e.verify_step
    calls = []

    def faulty(live, cache):
        calls.append(len(live))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return step(live, cache)

    e.verify_step = faulty
    session = e.session(num_slots=2, capacity=64)
    for i, r in enumerate(requests(3)):
        session.add(i, r)
    session.step()
    events = session.step()
    assert set(events.failed) == {0, 1} and session.running == 0 and events.admitted == []
    while session.busy:
        events.finished.update(session.step().finished)
    assert events.finished[2].token_ids == engine(rich).generate([requests(3)[2]]).results[0].token_ids


def test_a_request_whose_own_verification_fails_fails_alone(rich, monkeypatch):
    """One request's target logits come out NaN (a broken model) in the middle of a shared
    step: it fails with that one-line error and frees its slot, and the requests beside it
    (greedy and sampled) and the one that takes its slot commit exactly what they would
    without it."""
    real = dspark.engine.batched.verify

    def nan_for_the_victim(tokens, q, logits, params, generator):
        if params.top_k == 3:  # only the victim asks for top_k = 3 (greedy: it changes nothing else)
            logits = torch.full_like(logits, float("nan"))
        return real(tokens, q, logits, params, generator)

    others = requests(3) + [GenerationRequest(RICH_PROMPTS[3], SamplingParams(temperature=1.0), max_new_tokens=9, seed=5)]
    want = engine(rich).generate(others).results  # FixedGamma: a seeded sample does not depend on the batch
    monkeypatch.setattr(dspark.engine.batched, "verify", nan_for_the_victim)
    session = engine(rich, max_batch=3).session(num_slots=3, capacity=64)
    session.add("victim", GenerationRequest(RICH_PROMPTS[2], SamplingParams(top_k=3), max_new_tokens=20, seed=9))
    for i, r in enumerate(others):
        session.add(i, r)
    failed, finished, first = {}, {}, session.step()
    assert first.admitted == ["victim", 0, 1] and list(first.failed) == ["victim"]
    assert session.running == 2 and set(first.rounds) == {0, 1}  # the victim's slot is free already
    failed.update(first.failed)
    while session.busy:
        events = session.step()
        failed.update(events.failed)
        finished.update(events.finished)
    assert list(failed) == ["victim"] and isinstance(failed["victim"], NonFiniteLogits)
    assert "the target's logits hold NaN or inf" in str(failed["victim"])
    assert [finished[i].token_ids for i in range(len(others))] == [w.token_ids for w in want]


def test_generate_still_raises_what_a_prefill_or_a_step_raises():
    target = tiny_target(vocab_size=8)
    e = build_engine(target, None, "plain", 2)

    def boom(*args):
        raise RuntimeError("boom")

    e.prefill_slot = boom
    with pytest.raises(RuntimeError, match="boom"):
        e.generate([GenerationRequest([1], max_new_tokens=2)])
    e = build_engine(target, None, "plain", 2)
    e.verify_step = boom
    with pytest.raises(RuntimeError, match="boom"):
        e.generate([GenerationRequest([1], max_new_tokens=2)])


# -- streaming text -----------------------------------------------------------------------------


class ByteTokenizer:
    """Token i is byte i: multi-byte characters span tokens, as with byte-level BPE."""

    @staticmethod
    def decode(ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_text_stream_never_sends_a_partial_character(chunk):
    text = "héllo 😀 wörld — ok"
    ids = ByteTokenizer.encode(text)
    stream = TextStream(ByteTokenizer.decode)
    deltas = [stream.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.finish(text) == text
    assert "".join(deltas) == text  # complete characters all came out before the end


def test_text_stream_holds_back_what_a_stop_string_may_cut():
    final = "one two "  # the engine's answer, cut before the stop string "STOP"
    ids = ByteTokenizer.encode("one two STOP and more")
    stream = TextStream(ByteTokenizer.decode, stop=("STOP", "x"))
    sent = ""
    for i in range(len("one two ST")):  # up to where the engine would have stopped
        sent += stream.push(ids[i : i + 1])
        assert final.startswith(sent)
    assert sent == "one two"[: len(sent)] and len(sent) >= len("one two ST") - 3
    assert sent + stream.finish(final) == final
