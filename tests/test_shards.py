"""Token-id shard stores: exact round trips, atomic writes, bound settings, resumable regeneration."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama
from dspark.errors import DsparkError
from dspark.training.data.fingerprints import fingerprint_for, legacy_target_fingerprint, target_fingerprint, tokenizer_fingerprint
from dspark.training.data.generate import sample_batch, stop_ids
from dspark.training.data.mix import EvalOverlapFilter
from dspark.training.data.prompts import (
    DOMAINS,
    PromptRecord,
    classify_domain,
    prompt_id,
    read_prompts,
    write_prompts,
)
from dspark.training.data.regen import RegenConfig, answer_batch, answer_record, regenerate
from dspark.training.data.sequences import is_heldout, load_sequences, split_heldout
from dspark.training.data.shards import ShardRecord, decode_shard, encode_shard
from dspark.training.data.store import ShardStore
from dspark.training.data.text import TextConfig, parse_sharegpt_conversations, tokenize_texts
from dspark.training.data.tokenize import TrainingSequence, end_of_turn_id, tokenize_conversation
from dspark.cli.data import data_app

SETTINGS = {"temperature": 0.0, "max_new_tokens": 8}


@pytest.fixture(scope="session")
def tokenizer():
    from dspark.target.loading import resolve
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(None)[0])


@pytest.fixture(scope="session")
def tiny_chat_target(tokenizer):
    from dspark.target import TargetModel

    return TargetModel(tiny_llama(vocab_size=len(tokenizer), hidden=16, scale=4.0), tokenizer, name="tiny")


@pytest.fixture
def eval_filter() -> EvalOverlapFilter:
    return EvalOverlapFilter(["Write a python function to find the volume of a triangular prism."])


def _records(n: int, seed: int = 0, high: int = 49152) -> list[ShardRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(1, 300)
        ids = [rng.randrange(high) for _ in range(length)]
        mask = [rng.randint(0, 1) for _ in range(length)]
        domain = DOMAINS[i % 3]
        out.append(ShardRecord(f"id{seed}-{i}", f"src{i % 2}", domain, ids, mask, "stop" if i % 4 else "length"))
    return out


def _prompts(n: int) -> list[PromptRecord]:
    words = ["alpha", "beta gamma", "delta epsilon zeta", "eta", "theta iota kappa lambda"]
    domains = ["code", "math", "chat"]
    return [PromptRecord.make("t", domains[i % 3], [f"Tell me about {words[i % 5]} {i}."]) for i in range(n)]


def _new_store(folder: Path, kind: str = "regenerated", settings=SETTINGS, target_fp="t0", tokenizer_fp="k0"):
    return ShardStore.open_or_create(folder, kind, settings, target_fp, tokenizer_fp)


# -- the store -------------------------------------------------------------------------
def test_shard_round_trip_is_exact_and_compact(tmp_path):
    records = _records(50)
    with _new_store(tmp_path / "s") as store:
        manifest = store.append(records)
        store.append(_records(3, seed=1))
    reopened = ShardStore.open(tmp_path / "s")
    assert list(reopened.iter_records()) == records + _records(3, seed=1)
    with np.load(tmp_path / "s" / "shard_00000.npz", allow_pickle=False) as z:
        assert z["tokens"].dtype == np.uint16 and z["offsets"].dtype == np.int64
        assert z["offsets"][-1] == sum(len(r.input_ids) for r in records)
        assert z["loss_mask"].size == -(-z["offsets"][-1] // 8)  # bit-packed
    on_disk = json.loads((tmp_path / "s" / "shard_00000.json").read_text())
    assert on_disk["ids"] == [r.id for r in records] == manifest.ids
    assert on_disk["settings"] == SETTINGS and on_disk["tokenizer_fingerprint"] == "k0"
    counts = manifest.counts
    assert counts.sequences == 50 and counts.tokens == sum(len(r.input_ids) for r in records)
    assert counts.loss_tokens == sum(r.num_loss_tokens for r in records)
    assert counts.loss_tokens_by_domain == {d: sum(r.num_loss_tokens for r in records if r.domain == d) for d in DOMAINS}
    assert counts.finish_reasons == {"stop": 37, "length": 13}
    summary = reopened.summary()
    assert summary.shards == 2 and summary.counts.sequences == 53
    assert reopened.done_ids() == {r.id for r in records + _records(3, seed=1)}

    wide = _records(4, seed=2, high=70000)
    assert any(t >= 65536 for r in wide for t in r.input_ids)
    assert decode_shard(encode_shard(wide)) == wide
    with np.load(__import__("io").BytesIO(encode_shard(wide))) as z:
        assert z["tokens"].dtype == np.uint32


def test_an_incomplete_shard_is_ignored_then_removed(tmp_path):
    folder = tmp_path / "s"
    with _new_store(folder) as store:
        store.append(_records(5))
        first = (folder / "shard_00000.npz").read_bytes()
    # a writer killed between the npz and its manifest, and one killed mid-write
    (folder / "shard_00001.npz").write_bytes(first)
    (folder / "shard_00002.npz.tmp").write_bytes(first[:100])
    reader = ShardStore.open(folder)
    assert [m.index for m in reader.manifests] == [0] and len(reader.done_ids()) == 5
    assert (folder / "shard_00001.npz").exists()  # readers never delete: a writer may be mid-shard
    with _new_store(folder) as store:
        assert not (folder / "shard_00001.npz").exists() and not list(folder.glob("*.tmp"))
        assert store.append(_records(2, seed=3)).index == 1
    assert len(ShardStore.open(folder).done_ids()) == 7
    (folder / "shard_00001.npz").write_bytes(first)  # a manifest beside the wrong npz
    with pytest.raises(DsparkError, match="does not match its manifest"):
        ShardStore.open(folder)


def test_a_resumed_run_with_other_settings_is_refused(tmp_path):
    folder = tmp_path / "s"
    with _new_store(folder) as store:
        store.append(_records(2))
    with _new_store(folder, settings=dict(SETTINGS)) as again:  # the same settings resume
        assert len(again.done_ids()) == 2
    with pytest.raises(DsparkError, match=r"settings\.temperature: store 0\.0, run 0\.8.*refused"):
        _new_store(folder, settings={**SETTINGS, "temperature": 0.8})
    with pytest.raises(DsparkError, match=r"settings\.top_p"):
        _new_store(folder, settings={**SETTINGS, "top_p": 0.9})
    with pytest.raises(DsparkError, match="target_fingerprint") as info:
        _new_store(folder, target_fp="t1", tokenizer_fp="k1")
    assert "tokenizer_fingerprint" in str(info.value)
    with pytest.raises(DsparkError, match="kind"):
        _new_store(folder, kind="text")
    with _new_store(folder):
        with pytest.raises(DsparkError, match="another process"):
            _new_store(folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DsparkError, match="not a shard store"):
        _new_store(tmp_path / "other")
    with pytest.raises(DsparkError, match="read-only"):
        ShardStore.open(folder).append(_records(1))


def test_fingerprints_change_with_the_weights_and_the_template(tokenizer):
    a, b = tiny_llama(vocab_size=64, seed=0), tiny_llama(vocab_size=64, seed=1)
    assert target_fingerprint(a) == target_fingerprint(tiny_llama(vocab_size=64, seed=0))
    assert target_fingerprint(a) != target_fingerprint(b)
    # Issue 29 item 9: the model, not its dtype: a bfloat16 copy (a GPU's) binds to the same target.
    half = tiny_llama(vocab_size=64, seed=0).to(torch.bfloat16)
    half.config.dtype = torch.bfloat16
    assert target_fingerprint(half) == target_fingerprint(a)
    assert legacy_target_fingerprint(half) != legacy_target_fingerprint(a)  # what the old fingerprint did
    # A store bound to the legacy fingerprint reopens with the same target in float32, not with another.
    assert fingerprint_for(a, legacy_target_fingerprint(a)) == legacy_target_fingerprint(a)
    assert fingerprint_for(a, None) == fingerprint_for(a, legacy_target_fingerprint(b)) == target_fingerprint(a)
    fp = tokenizer_fingerprint(tokenizer)
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = template + " "
        assert tokenizer_fingerprint(tokenizer) != fp
    finally:
        tokenizer.chat_template = template
    assert tokenizer_fingerprint(tokenizer) == fp


# -- regeneration ----------------------------------------------------------------------
def _regen_store(target, folder: Path, config: RegenConfig) -> ShardStore:
    return ShardStore.open_or_create(
        folder, "regenerated", config.store_settings(),
        target_fingerprint(target), tokenizer_fingerprint(target.tokenizer),
    )


@pytest.mark.parametrize("generator", ["engine", "generate"])
def test_regen_sequences_are_prompt_ids_plus_generated_ids(tiny_chat_target, tmp_path, monkeypatch, generator):
    """The oracle: each prompt answered alone by sample_batch, ids compared exactly.

    While regenerating, decoding yields a wrong text, so a decode and re-encode anywhere on
    the way into the store would show up as wrong ids.
    """
    target = tiny_chat_target
    prompts = _prompts(7)
    config = RegenConfig(max_new_tokens=6, generator=generator, batch_size=3, shard_size=4)
    monkeypatch.setattr(target.tokenizer, "decode", lambda *args, **kwargs: "wrong text")
    monkeypatch.setattr(target.tokenizer, "batch_decode", lambda ids, **kwargs: ["wrong text"] * len(ids))
    with _regen_store(target, tmp_path / "g", config) as store:
        summary = regenerate(target, prompts, store, config, progress=False)
    monkeypatch.undo()
    assert (summary.written, summary.shards, summary.already_done) == (7, 2, 0)
    records = {r.id: r for r in ShardStore.open(tmp_path / "g").iter_records()}
    stops = stop_ids(target)
    for p in prompts:
        prompt_ids = target.encode_conversation(p.messages[:1])
        alone = sample_batch(target, [prompt_ids], 6, 0.0, 1.0, seed=0, stops=stops)
        eot = [end_of_turn_id(target.tokenizer)] if alone.finish_reasons[0] == "stop" else []
        r = records[p.id]
        assert list(r.input_ids) == prompt_ids + alone.tokens[0] + eot
        assert list(r.loss_mask) == [0] * len(prompt_ids) + [1] * (len(alone.tokens[0]) + len(eot))
        assert (r.domain, r.source, r.finish_reason) == (p.domain, "t", alone.finish_reasons[0])


def test_engine_and_generate_sample_alike_per_prompt_seed(tiny_chat_target):
    """Under sampling the engine draws per request: a prompt's answer does not depend on its batch."""
    target = tiny_chat_target
    ids = [target.encode_conversation(p.messages[:1]) for p in _prompts(4)]
    names = [p.id for p in _prompts(4)]
    config = RegenConfig(max_new_tokens=5, temperature=0.8, batch_size=4)
    stops = stop_ids(target)
    together = answer_batch(target, ids, names, config, stops)
    alone = [answer_batch(target, [i], [n], config, stops).tokens[0] for i, n in zip(ids, names)]
    assert together.tokens == alone
    assert together.num_new_tokens == sum(map(len, alone)) + together.finish_reasons.count("stop")


def test_answer_record_appends_end_of_turn_only_after_a_stop():
    p = PromptRecord.make("t", "math", ["2 + 2?"])
    stopped = answer_record(p, [5, 6, 7], [8, 9], "stop", eot=2)
    assert list(stopped.input_ids) == [5, 6, 7, 8, 9, 2] and list(stopped.loss_mask) == [0, 0, 0, 1, 1, 1]
    cut = answer_record(p, [5, 6, 7], [8, 9], "length", eot=2)
    assert list(cut.input_ids) == [5, 6, 7, 8, 9] and list(cut.loss_mask) == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="finish_reason"):
        answer_record(p, [5], [8], "eos", eot=2)


@pytest.mark.parametrize("generator, kill_after", [("generate", 6), ("engine", 4)])
def test_a_killed_regen_resumes_and_generates_nothing_twice(tiny_chat_target, tmp_path, monkeypatch, generator, kill_after):
    """A kill during the call after the first shard: generate calls answer 2, the engine's a shard of 4."""
    target = tiny_chat_target
    prompts = _prompts(10)
    config = RegenConfig(max_new_tokens=4, temperature=0.8, generator=generator, batch_size=2, shard_size=4)
    real = answer_batch
    answered: list[list[int]] = []
    kill = [kill_after]

    def counting(target, batch, *args, **kwargs):
        if kill[0] is not None and len(answered) >= kill[0]:
            raise KeyboardInterrupt
        answered.extend(list(ids) for ids in batch)
        return real(target, batch, *args, **kwargs)

    monkeypatch.setattr("dspark.training.data.regen.answer_batch", counting)
    with pytest.raises(KeyboardInterrupt):
        with _regen_store(target, tmp_path / "s", config) as store:
            regenerate(target, prompts, store, config, progress=False)
    assert len(ShardStore.open(tmp_path / "s").manifests) == 1
    first_run = list(answered)
    kill[0] = None
    with _regen_store(target, tmp_path / "s", config) as store:
        summary = regenerate(target, prompts, store, config, progress=False)
    assert (summary.already_done, summary.written) == (4, 6)
    done_first = {tuple(ids) for ids in first_run[:4]}  # the shard that was completed
    resumed = answered[len(first_run):]
    assert len(resumed) == 6 and not done_first & {tuple(ids) for ids in resumed}
    ids = [r.id for r in ShardStore.open(tmp_path / "s").iter_records()]
    assert sorted(ids) == sorted(p.id for p in prompts)
    before = len(answered)
    with _regen_store(target, tmp_path / "s", config) as store:
        again = regenerate(target, prompts + _prompts(10), store, config, progress=False)
    assert (again.already_done, again.written, again.new_tokens, len(answered)) == (10, 0, 0, before)


def test_regen_settings_bind_the_sampling_not_the_batching():
    greedy = RegenConfig(temperature=0.0, top_p=0.5, batch_size=4)
    assert greedy.store_settings() == RegenConfig(temperature=0.0, top_p=0.95, batch_size=32).store_settings()
    assert greedy.store_settings()["top_p"] == 1.0
    assert RegenConfig(temperature=0.8).store_settings() != RegenConfig(temperature=0.8, top_p=0.9).store_settings()
    assert RegenConfig(generator="generate").store_settings() != RegenConfig().store_settings()
    for kwargs, message in [(dict(shard_size=0), "shard_size"), (dict(temperature=-1.0), "temperature"),
                            (dict(generator="vllm"), "generator"),
                            (dict(top_p=0.0), "top_p"), (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ValueError, match=message):
            RegenConfig(**kwargs)


# -- text stores and loading -----------------------------------------------------------
SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "human", "value": "How do I sort a list in Python?"}, {"from": "gpt", "value": "Use sorted(xs) " * 8},
        {"from": "human", "value": "And in reverse?"}, {"from": "gpt", "value": "sorted(xs, reverse=True) " * 6},
        {"from": "human", "value": "Unanswered follow-up"}]},
    {"id": "b", "conversations": [
        {"from": "gpt", "value": "a continuation without its question"},
        {"from": "human", "value": "What is 12 * 7? Calculate it."}, {"from": "gpt", "value": "It is 84. " * 10}]},
    {"id": "c", "conversations": [
        {"from": "human", "value": "Write a python function to find the volume of a triangular prism."},
        {"from": "gpt", "value": "def volume(b, h, l): return b * h * l / 2"}]},
    {"id": "d", "conversations": [
        {"from": "human", "value": "How do I sort a list in Python?"}, {"from": "gpt", "value": "A repeat of a."}]},
    {"id": "e", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"id": "f", "conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]},
]


def test_sharegpt_conversations_alternate_and_start_with_the_user():
    convs = parse_sharegpt_conversations(json.dumps(SHAREGPT), max_turns=4)
    assert [len(c.messages) for c in convs] == [4, 2, 2, 2, 2]
    assert [c.domain for c in convs] == ["code", "math", "code", "code", "chat"]
    assert convs[1].messages[0] == {"role": "user", "content": "What is 12 * 7? Calculate it."}
    assert convs[0].id == convs[3].id == prompt_id("sharegpt", ["How do I sort a list in Python?"])
    assert [len(c.messages) for c in parse_sharegpt_conversations(json.dumps(SHAREGPT), max_turns=1)][0] == 2


def test_text_store_gets_greedy_labels_and_loads_with_regen(tiny_chat_target, tokenizer, tmp_path, eval_filter):
    convs = parse_sharegpt_conversations(json.dumps(SHAREGPT))
    config = TextConfig(max_turns=4, max_tokens=512, shard_size=2)
    fp = tokenizer_fingerprint(tokenizer)
    with ShardStore.open_or_create(tmp_path / "text", "text", config.store_settings("sharegpt"), None, fp) as store:
        summary = tokenize_texts(tokenizer, convs, store, config, eval_filter, progress=False)
    assert (summary.written, summary.skipped, summary.refused_eval, summary.shards) == (3, 1, 1, 2)
    with ShardStore.open_or_create(tmp_path / "text", "text", config.store_settings("sharegpt"), None, fp) as store:
        again = tokenize_texts(tokenizer, convs, store, config, eval_filter, progress=False)
    assert (again.written, again.already_done) == (0, 3)

    regen_config = RegenConfig(max_new_tokens=20, batch_size=4)
    with _regen_store(tiny_chat_target, tmp_path / "regen", regen_config) as store:
        regenerate(tiny_chat_target, _prompts(3), store, regen_config, progress=False)
    seqs = load_sequences([tmp_path / "text", tmp_path / "regen"], max_length=60, progress=False)
    text_seqs = [s for s in seqs if s.greedy_labels]
    assert [s.id for s in text_seqs] == [convs[0].id, convs[1].id]  # "Hi/Hello!" has < 16 loss tokens
    assert [s.domain for s in text_seqs] == ["code", "math"]
    expected = tokenize_conversation(tokenizer, convs[0].messages, id=convs[0].id, max_length=60)
    assert text_seqs[0].input_ids == expected.input_ids and text_seqs[0].loss_mask == expected.loss_mask
    regen_seqs = [s for s in seqs if not s.greedy_labels]
    assert len(regen_seqs) == 3 and all(len(s.input_ids) <= 60 and s.num_loss_tokens >= 16 for s in regen_seqs)
    assert {s.domain for s in regen_seqs} == {"code", "math", "chat"}

    with ShardStore.open_or_create(tmp_path / "other", "text", {}, None, "another-tokenizer") as store:
        store.append(_records(1))
    with pytest.raises(DsparkError, match="different tokenizers"):
        load_sequences([tmp_path / "text", tmp_path / "other"], max_length=60, progress=False)


def test_heldout_split_is_deterministic_and_by_id():
    seqs = [TrainingSequence([1, 2], [0, 1], id=f"p{i // 2}") for i in range(4000)]  # two per id
    split = split_heldout(seqs)
    shuffled = list(seqs)
    random.Random(0).shuffle(shuffled)
    again = split_heldout(shuffled)
    assert {s.id for s in split.heldout} == {s.id for s in again.heldout}
    assert not {s.id for s in split.heldout} & {s.id for s in split.train}  # an id never straddles
    assert len(split.heldout) + len(split.train) == 4000 and len(split.heldout) % 2 == 0
    assert 12 <= len({s.id for s in split.heldout}) <= 70  # 2 % of 2000 ids: 40 ± 6.3 (±4.5 σ)
    assert {s.id for s in split_heldout(seqs, salt="other").heldout} != {s.id for s in split.heldout}
    assert split_heldout(seqs, fraction=0.0).heldout == [] and split_heldout(seqs, fraction=1.0).train == []
    assert all(is_heldout(s.id) for s in split.heldout) and not any(is_heldout(s.id) for s in split.train)


def test_classify_domain_keyword_rule():
    assert classify_domain("Why does my Python script raise a KeyError?") == "code"
    assert classify_domain("```\nx = 1\n```") == "code"
    assert classify_domain("Solve for x: 3x + 5 = 20") == "math"
    assert classify_domain("How many apples are left if I eat 3 of 10?") == "math"
    assert classify_domain("How many moons does Jupiter have?") == "chat"  # no number: not math
    assert classify_domain("Write a poem about the sea.") == "chat"


# -- the command line ------------------------------------------------------------------
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(vocab_size=len(tokenizer), hidden=16, scale=4.0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_regen_resumes_and_refuses_other_settings(tmp_path, tiny_model_dir):
    prompts = tmp_path / "pool.jsonl"
    write_prompts(prompts, _prompts(5))
    store = tmp_path / "store"
    base = ["regen", "--prompts", str(prompts), "--store", str(store), "--model", str(tiny_model_dir),
            "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "2", "--shard-size", "2", "--json"]
    first = runner.invoke(data_app, base + ["--limit", "3"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert (report["written"], report["shards"], report["store"]["counts"]["sequences"]) == (3, 2, 3)
    second = runner.invoke(data_app, base)
    assert second.exit_code == 0, second.output
    report = json.loads(second.stdout.strip().splitlines()[-1])
    assert (report["already_done"], report["written"], report["store"]["shards"]) == (3, 2, 3)
    other = runner.invoke(data_app, base + ["--temperature", "0.8"])
    assert other.exit_code == 2 and "settings.temperature" in other.stderr and other.stderr.count("\n") == 1
    summary = runner.invoke(data_app, ["summary", str(store)])
    assert summary.exit_code == 0 and "5 sequences" in summary.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["regen", "--prompts", "/no/such.jsonl", "--store", "s"], "not found"),
        (["regen", "--prompts", "p.jsonl", "--store", "s", "--shard-size", "0"], "shard_size"),
        (["regen", "--prompts", "p.jsonl", "--store", "s", "--temperature", "-1"], "temperature"),
        (["regen", "--prompts", "p.jsonl", "--store", "s", "--limit", "0"], "--limit"),
        (["text", "--store", "s"], "--sharegpt"),
        (["text", "--sharegpt", "--store", "s", "--max-turns", "0"], "max_turns"),
        (["pool", "--out", "x.jsonl"], "no prompt source"),
        (["pool", "--out", "x.jsonl", "--sharegpt-math", "-1"], "--sharegpt-math must be >= 0"),
        (["pool", "--out", "x.jsonl", "--prompts", "/no/such.jsonl"], "not found"),
        (["summary", "/no/such/store"], "not a shard store"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args, message):
    result = runner.invoke(data_app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_cli_pool_mixes_prompt_files(tmp_path):
    magpie = tmp_path / "magpie-math.jsonl"
    write_prompts(magpie, [PromptRecord.make("magpie-math", "math", [f"What is {i} + {i}?"]) for i in range(4)])
    out = tmp_path / "pool.jsonl"
    result = runner.invoke(data_app, ["pool", "--out", str(out), "--prompts", str(magpie), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["by_domain"] == {"math": 4}
    assert {r.source for r in read_prompts(out)} == {"magpie-math"}


# -- integrity ---------------------------------------------------------------------------
def _two_shards(folder: Path) -> None:
    with _new_store(folder) as store:
        store.append(_records(20))
        store.append(_records(20, seed=1))


def test_a_flipped_byte_is_refused_naming_the_shard(tmp_path):
    _two_shards(tmp_path / "s")
    npz = tmp_path / "s" / "shard_00001.npz"
    payload = bytearray(npz.read_bytes())
    payload[100] ^= 0x01  # inside the compressed token ids: the zip's directory still reads
    npz.write_bytes(bytes(payload))
    with pytest.raises(DsparkError, match=rf"{npz} does not match its manifest \(sha1\)"):
        load_sequences([tmp_path / "s"], max_length=512, min_loss_tokens=0, progress=False)
    payload[100] ^= 0x01
    payload[-10] ^= 0xFF  # the zip's central directory: not an npz at all
    npz.write_bytes(bytes(payload))
    with pytest.raises(DsparkError, match=rf"{npz} is not a readable shard"):
        ShardStore.open(tmp_path / "s")


def test_a_shard_replaced_by_another_is_refused(tmp_path):
    _two_shards(tmp_path / "s")
    folder = tmp_path / "s"
    for suffix in (".npz", ".json"):
        (folder / f"shard_00001{suffix}").write_bytes((folder / f"shard_00000{suffix}").read_bytes())
    with pytest.raises(DsparkError, match=r"shard_00001\.json describes shard_00000\.npz, not shard_00001\.npz"):
        ShardStore.open(folder)
    manifest = json.loads((folder / "shard_00001.json").read_text())
    (folder / "shard_00001.json").write_text(json.dumps({**manifest, "index": 1}))  # renumbered by hand
    with pytest.raises(DsparkError, match=r"shard_00001\.npz is a copy of shard_00000\.npz"):
        ShardStore.open(folder)


def test_a_manifest_that_lost_an_id_is_refused_before_a_resume_writes_it_twice(tmp_path):
    _two_shards(tmp_path / "s")
    path = tmp_path / "s" / "shard_00000.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "ids": manifest["ids"][:-1]}))
    message = r"shard_00000\.npz holds other records than its manifest lists \(1 id\(s\) of the npz not in the manifest"
    with pytest.raises(DsparkError, match=message):
        _new_store(tmp_path / "s")  # the resume would otherwise regenerate that prompt into a new shard
    manifest["ids"][0], manifest["ids"][1] = manifest["ids"][1], manifest["ids"][0]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DsparkError, match="the order differs"):
        ShardStore.open(tmp_path / "s")


def test_the_same_store_twice_is_refused(tmp_path, monkeypatch):
    import shutil

    _two_shards(tmp_path / "s")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DsparkError, match=r"store \./s/ is given twice \(also as s\)"):
        load_sequences(["s", "./s/"], max_length=512, progress=False)
    shutil.copytree(tmp_path / "s", tmp_path / "copy")
    with pytest.raises(DsparkError, match=r"copy/shard_00000\.npz is the same shard as .*s/shard_00000\.npz"):
        load_sequences(["s", "copy"], max_length=512, progress=False)
    assert len(load_sequences(["s"], max_length=512, min_loss_tokens=0, progress=False)) == 40


def test_the_committed_stores_still_open_with_the_default_target(default_target):
    """Stores written before the dtype-free fingerprint keep theirs: the same target in float32
    still matches it, so `dspark data regen` resumes them."""
    from pathlib import Path

    from dspark.training.data.store import recorded_target_fingerprint

    for store in sorted(Path(__file__).resolve().parent.parent.glob("data/smollm2-135m-instruct/*/store.json")):
        recorded = recorded_target_fingerprint(store.parent)
        assert fingerprint_for(default_target, recorded) == recorded, store
