"""Log-probabilities of committed tokens (GenerationRequest.logprobs): the target's raw
distribution at each committed position, taken from the logits verification already has. They
must equal plain decoding's, token for token, whatever drafted and verified them."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters.base import NoDrafter
from dspark.engine.batched import BatchEngine
from dspark.engine.request import GenerationRequest, token_logprobs
from dspark.engine.single import SpeculativeEngine
from dspark.sampling import SamplingParams
from dspark.scheduling import FixedGamma
from test_batch_engine import COST, DRAFTERS, RICH_PROMPTS, dspark_drafter
from dspark.scheduling import DSparkScheduler
from conftest import tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rich():
    from test_batch_engine import rich_target

    return rich_target()


def requests(params, top=3):
    return [GenerationRequest(p, params, max_new_tokens=9, seed=40 + i, logprobs=top) for i, p in enumerate(RICH_PROMPTS)]


def oracle(target, request):
    """Plain decoding, no cache: the full sequence through the model at every step."""
    ids, out = list(request.prompt_ids), []
    result = SpeculativeEngine(target, NoDrafter()).generate(request)
    with torch.inference_mode():
        for token in result.token_ids:
            logits = target.model(input_ids=torch.tensor([ids])).logits[0, -1:]
            out += token_logprobs(logits, [token], request.logprobs)
            ids.append(token)
    return result.token_ids, out


@pytest.mark.parametrize("drafter_name", ["none", "ngram", "dspark", "dspark+ngram"])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0)], ids=["T0", "T1"])
def test_logprobs_equal_plain_decodings_whatever_drafted_them(rich, drafter_name, params):
    policy = DSparkScheduler(COST) if drafter_name != "none" else FixedGamma()
    batch = BatchEngine(rich, DRAFTERS[drafter_name](), policy, max_batch=4).generate(requests(params))
    verified = sum(sum(r.stats.proposed) for r in batch.results)
    assert drafter_name == "none" or verified > 0  # drafted tokens were verified, and their logprobs kept
    for request, result in zip(requests(params), batch.results):
        plain_ids, plain = oracle(rich, request)
        if params.greedy:
            assert result.token_ids == plain_ids
        else:  # sampled: same seed, but drafting draws from the stream; compare on its own tokens
            plain = []
            ids = list(request.prompt_ids)
            with torch.inference_mode():
                for token in result.token_ids:
                    plain += token_logprobs(rich.model(input_ids=torch.tensor([ids])).logits[0, -1:], [token], 3)
                    ids.append(token)
        assert [lp.token for lp in result.logprobs] == result.token_ids
        for got, want in zip(result.logprobs, plain, strict=True):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t for t, _ in got.top] == [t for t, _ in want.top]
            assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-4)


def test_streamed_logprobs_are_the_returned_ones(rich):
    engine = BatchEngine(rich, dspark_drafter(rich=True), DSparkScheduler(COST), max_batch=4)
    session = engine.session(4, 64)
    reqs = requests(SamplingParams(), top=0)
    for i, r in enumerate(reqs):
        session.add(i, r)
    streamed, results = {}, {}
    while session.busy:
        events = session.step()
        for h, lps in events.logprobs.items():
            streamed.setdefault(h, []).extend(lps)
        results.update(events.finished)
    for h, result in results.items():
        assert streamed[h] == result.logprobs and all(lp.top == () for lp in result.logprobs)


def test_no_logprobs_unless_asked_and_bad_counts_refused():
    target = tiny_target(vocab_size=16)
    result = SpeculativeEngine(target, NoDrafter()).generate(GenerationRequest([1, 2], max_new_tokens=3))
    assert result.logprobs is None
    for bad in (-1, 21, 2.5):
        with pytest.raises(ValueError, match="logprobs must be"):
            GenerationRequest([1], logprobs=bad)
