"""logprobs over HTTP, through the official openai client: chat's logprobs / top_logprobs and
the completions endpoint's logprobs, whole and streamed, equal to plain decoding's (the target's
raw log-softmax at each committed token, computed here by a full forward per token)."""

from __future__ import annotations

import pytest
import torch

from serve_helpers import MODEL, build, chat_target, load_tokenizer, serve

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Tell me about the number 7 and why why it matters."


@pytest.fixture(scope="module")
def target():
    return chat_target(load_tokenizer())


@pytest.fixture(scope="module")
def server(target):
    with serve(target, build(target, "dspark", max_batch=4), max_queue=16) as live:
        yield live


def plain_logprobs(target, prompt_ids, token_ids, top):
    """(log p(token), [(id, log p)] top) per token, from the whole sequence each time."""
    ids, out = list(prompt_ids), []
    with torch.inference_mode():
        for token in token_ids:
            logp = torch.log_softmax(target.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            values, idx = logp.topk(top) if top else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            out.append((float(logp[token]), list(zip(idx.tolist(), values.tolist()))))
            ids.append(token)
    return out


def engine_answer(target, prompt_ids, max_tokens, temperature, seed, top):
    """The same request through the same kind of engine, one at a time: its token ids."""
    from dspark.engine import GenerationRequest
    from dspark.sampling import SamplingParams

    request = GenerationRequest(prompt_ids, SamplingParams(temperature=temperature), max_new_tokens=max_tokens,
                                seed=seed or 0, logprobs=top)
    return build(target, "dspark", max_batch=1).generate([request]).results[0]


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 5)], ids=["T0", "T1-seeded"])
def test_chat_logprobs_whole_and_streamed_equal_plain_decodings(server, target, temperature, seed):
    client = server.client()
    messages = [{"role": "user", "content": PROMPT}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=12, temperature=temperature, seed=seed,
                  logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    prompt_ids = target.encode_conversation(messages)
    answer = engine_answer(target, prompt_ids, 12, temperature, seed, 3)
    assert [target.decode([i]) for i in answer.token_ids] == [e.token for e in content]
    plain = plain_logprobs(target, prompt_ids, answer.token_ids, 3)
    assert "".join(e.token for e in content) == whole.choices[0].message.content
    for entry, (logprob, top) in zip(content, plain, strict=True):
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [target.decode([i]) for i, _ in top]
        assert entry.bytes == list(entry.token.encode("utf-8"))
    streamed = [e for c in client.chat.completions.create(**kwargs, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_completion_logprobs_whole_and_streamed(server, target):
    client = server.client()
    whole = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0, logprobs=2)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    prompt_ids = target.encode_conversation("The quick brown fox")
    ids = engine_answer(target, prompt_ids, 10, 0.0, None, 2).token_ids
    assert [target.decode([i]) for i in ids] == lp.tokens
    plain = plain_logprobs(target, prompt_ids, ids, 2)
    assert lp.token_logprobs == pytest.approx([v for v, _ in plain], abs=1e-4)
    assert [len(d) for d in lp.top_logprobs] == [2] * len(ids)
    chunks = list(client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0,
                                            logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens


def test_no_logprobs_unless_asked_and_bad_values_refused(server):
    import openai

    client = server.client()
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert plain.choices[0].logprobs is None
    for kwargs, param in ((dict(logprobs=True, top_logprobs=21), "top_logprobs"), (dict(top_logprobs=2), "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, **kwargs)
        assert err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=3, logprobs=6)
    assert err.value.body["param"] == "logprobs"


# -- n > 1 ------------------------------------------------------------------------------------------


def test_n_choices_whole_and_streamed(server, target):
    client = server.client()
    messages = [{"role": "user", "content": PROMPT}]
    single = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    three = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {single.choices[0].message.content}  # greedy: all equal
    assert three.usage.completion_tokens == 3 * single.usage.completion_tokens
    assert three.usage.prompt_tokens == single.usage.prompt_tokens

    sampled = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0, seed=9, n=3)
    texts = [c.message.content for c in sampled.choices]
    # Choice i is seeded seed + i: choice 0 is the n = 1 answer, and each is that seed's own answer.
    for i, text in enumerate(texts):
        alone = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0, seed=9 + i)
        assert alone.choices[0].message.content == text
    assert len(set(texts)) > 1

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0,
                                                 seed=9, n=3, stream=True, stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == sampled.usage.completion_tokens


def test_completions_take_n_and_refuse_too_many(server):
    import openai

    client = server.client()
    two = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == two.choices[1].text
    for n in (0, 9):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=3, n=n)
        assert err.value.body["param"] == "n"


# -- penalties --------------------------------------------------------------------------------------


def test_penalties_reach_the_engine(server, target):
    from dspark.engine import GenerationRequest
    from dspark.sampling import SamplingParams

    client = server.client()
    messages = [{"role": "user", "content": PROMPT}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            presence_penalty=-2, frequency_penalty=-2,  # repeat: the answer changes
                                            extra_body={"repetition_penalty": 1.3})
    params = SamplingParams(presence_penalty=-2, frequency_penalty=-2, repetition_penalty=1.3)
    want = build(target, "dspark", max_batch=1).generate(
        [GenerationRequest(target.encode_conversation(messages), params, max_new_tokens=12)]).results[0]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == want.text != plain.choices[0].message.content


# -- vLLM's metric names and per-request object -----------------------------------------------------


def test_vllm_compat_counters_and_per_request_metrics(target):
    from serve_helpers import metric

    with serve(target, build(target, "dspark", max_batch=2), metrics_compat="vllm") as live:
        client = live.client()
        messages = [{"role": "user", "content": PROMPT}]
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
        spec = whole.model_extra["metrics"]["speculative_decoding"]
        stats = whole.model_extra["dspark"]
        assert spec["num_draft_tokens"] == stats["drafted_tokens"] and spec["num_accepted_draft_tokens"] == stats["accepted_tokens"]
        assert len(spec["acceptance_histogram"]) == spec["num_spec_tokens"] + 1 and spec["num_spec_tokens"] >= 1
        assert spec["num_spec_steps"] == sum(spec["acceptance_histogram"])
        assert spec["mean_acceptance_length"] == pytest.approx(1 + spec["num_accepted_draft_tokens"] / spec["num_spec_steps"])
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].model_extra["metrics"]["speculative_decoding"] == spec  # on the final usage chunk
        three = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, n=3)
        assert "metrics" not in three.model_extra  # as vLLM: not for n > 1
        url = live.url
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            ours = metric(url, f"dspark:spec_decode_{name}_total")
            assert metric(url, f"vllm:spec_decode_{name}_total", model_name=MODEL, engine="0") == ours
        assert metric(url, "vllm:spec_decode_num_accepted_tokens_per_pos_total") == metric(url, "vllm:spec_decode_num_accepted_tokens_total")
    with serve(target, build(target, "dspark", max_batch=2)) as live:  # off by default
        answer = live.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert "metrics" not in answer.model_extra
        from serve_helpers import metric as sample
        assert sample(live.url, "vllm:spec_decode_num_drafts_total") is None


# -- vLLM's extensions the load generators send ------------------------------------------------------


def test_ignore_eos_and_continuous_usage_stats(server):
    client = server.client()
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=9, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    counts = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert counts == sorted(counts) and counts[-1] == 9  # grows chunk by chunk, to the whole budget
    assert all(c.usage is not None for c in chunks[1:])  # every chunk after the role chunk carries it
