"""The evaluation harness: metrics by hand, the dataset registry, the interleaved runner on a
tiny random target with an exact-acceptance mock drafter, the reports, and both CLI commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama
from dspark.cli.main import app
from dspark.drafters.base import DraftBlock, DraftInput, NoDrafter
from dspark.drafters.ngram import NgramConfig, NgramDrafter
from dspark.engine import SpeculativeEngine
from dspark.errors import DsparkError
from dspark.evaluation import aggregate, metrics, provenance, report, runner
from dspark.evaluation.datasets import (
    ASSET_DIR,
    BUILTIN,
    Conversation,
    EvalDataset,
    load_dataset,
    split_range,
)
from dspark.scheduling.calibration import Calibration
from dspark.target import TargetModel

V = 32
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs cost more than the matmuls


# -- metrics ------------------------------------------------------------------------------------
# (verified γ, accepted n) per round, worked out by hand:
#   k=1: verified in 5 rounds, all reached it, 4 survived    -> cumulative 4/5, conditional 4/5
#   k=2: verified in 5, reached (n ≥ 1) in 4, 3 survived    -> cumulative 3/5, conditional 3/4
#   k=3: verified in 4 (γ ≥ 3), reached (n ≥ 2) in 2, 1 survived -> 1/4, 1/2
#   k=4: verified in 4, reached (n ≥ 3) in 1, 1 survived     -> 1/4, 1/1
PROPOSED = [4, 4, 4, 4, 2]
ACCEPTED = [4, 2, 0, 1, 2]


def test_conditional_and_cumulative_acceptance_by_hand():
    assert metrics.conditional_acceptance(PROPOSED, ACCEPTED) == pytest.approx([4 / 5, 3 / 4, 1 / 2, 1.0])
    assert metrics.cumulative_acceptance(PROPOSED, ACCEPTED) == pytest.approx([4 / 5, 3 / 5, 1 / 4, 1 / 4])
    assert metrics.tau(PROPOSED, ACCEPTED) == pytest.approx((9 + 5) / 5)
    assert metrics.verify_rate(PROPOSED, ACCEPTED) == pytest.approx(14 / 23)


def test_conditional_acceptance_is_nan_where_no_round_reached_the_slot():
    assert metrics.conditional_acceptance([3, 3], [0, 0])[0] == 0.0
    assert all(math.isnan(x) for x in metrics.conditional_acceptance([3, 3], [0, 0])[1:])
    assert metrics.cumulative_acceptance([0, 0], [0, 0]) == [] and metrics.tau([0, 0], [0, 0]) == 1.0
    assert math.isnan(metrics.tau([], []))


def test_metrics_refuse_inconsistent_rounds():
    with pytest.raises(ValueError, match="accepted 3 of 2"):
        metrics.tau([2], [3])
    with pytest.raises(ValueError, match="differ in length"):
        metrics.verify_rate([2, 2], [1])


def test_ideal_speedup_and_efficiency():
    # τ = 3, a plain step costs 10 ms, a round 4 ms drafting + 11 ms verifying: ideal 2x
    assert metrics.ideal_speedup(3.0, 0.010, 0.004, 0.011) == pytest.approx(2.0)
    assert metrics.efficiency(1.5, 2.0) == pytest.approx(0.75)
    assert metrics.ideal_speedup(1.0, 0.01, 0.0, 0.01) == pytest.approx(1.0)  # plain decoding itself
    split = metrics.TimeSplit.of(10.0, 1.0, 2.0, 5.0)
    assert split.overhead_s == pytest.approx(2.0) and split.fractions()["verify"] == pytest.approx(0.5)


# -- datasets -----------------------------------------------------------------------------------
def test_builtin_sets_ship_with_attribution_and_split_disjointly():
    attribution = (ASSET_DIR / "ATTRIBUTION.md").read_text()
    sizes = {"gsm8k": 1319, "humaneval": 164, "mbpp": 257, "mt-bench": 80}
    for name, info in BUILTIN.items():
        assert info.file in attribution and info.licence in attribution
        test, cal = load_dataset(name, "test"), load_dataset(name, "calibration")
        everything = load_dataset(name, "all")
        assert len(everything.conversations) == sizes[name]
        test_ids = {c.index for c in test.conversations}
        cal_ids = {c.index for c in cal.conversations}
        assert not test_ids & cal_ids and len(test_ids | cal_ids) == sizes[name]
        assert min(cal_ids) > max(test_ids)  # calibration is the tail
    assert all(len(c.turns) == 2 for c in load_dataset("mt-bench", limit=3).conversations)
    assert len(load_dataset("gsm8k", limit=5).conversations) == 5
    assert 'assets/**/*' in (REPO / "pyproject.toml").read_text()  # the sets ship in the wheel


def test_builtin_sets_are_the_shared_copies():
    shared = REPO.parent / "shared" / "data" / "eval"
    if not shared.is_dir():
        pytest.skip("no shared/data/eval beside this checkout")
    for info in BUILTIN.values():
        assert (ASSET_DIR / info.file).read_bytes() == (shared / info.file).read_bytes()


def test_max_turns_keeps_only_the_first_turns():
    full = load_dataset("mt-bench", limit=3)
    first = load_dataset("mt-bench", limit=3, max_turns=1)
    assert full.num_turns == 6 and first.num_turns == 3
    assert [c.turns for c in first.conversations] == [c.turns[:1] for c in full.conversations]
    with pytest.raises(DsparkError, match="max_turns"):
        load_dataset("mt-bench", max_turns=0)


def test_custom_jsonl_and_bad_input(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"turns": [f"q{i}"]}) for i in range(10)) + "\n\n")
    data = load_dataset(str(path), "calibration")
    assert data.name == "mine" and data.domain == "custom"
    assert [c.index for c in data.conversations] == [8, 9]
    assert split_range(1, "test") == range(1) and split_range(1, "calibration") == range(0)
    with pytest.raises(DsparkError, match="unknown dataset"):
        load_dataset("no-such-set")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"prompt": "no turns"}\n')
    with pytest.raises(DsparkError, match="bad.jsonl:2"):
        load_dataset(str(bad))
    one = tmp_path / "one.jsonl"
    one.write_text('{"turns": ["a"]}\n')
    with pytest.raises(DsparkError, match="no conversations in its calibration split"):
        load_dataset(str(one), "calibration")


# -- the runner on a tiny target ----------------------------------------------------------------
class CharTokenizer:
    """Character-level stand-in for a tokenizer: ids 1..V-2, no chat template, no EOS."""

    chat_template = None
    eos_token_id = bos_token_id = pad_token_id = unk_token_id = None

    def __len__(self) -> int:
        return V - 1  # the last row is spare: DSparkConfig picks it as the mask token

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + ord(ch) % (V - 2) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def char_target() -> TargetModel:
    return TargetModel(tiny_llama(vocab_size=V, hidden=32, layers=6, seed=0, scale=4.0), CharTokenizer(), name="tiny")


class TwoRightOneWrong:
    """Proposes the target's two greedy next tokens, then a token it will reject, with fixed c_k.

    At T = 0 every full round accepts exactly 2: conditional acceptance is [1, 1, 0].
    """

    name = "two-right"
    feature_layer_ids: tuple[int, ...] = ()
    gamma = 3
    CONFIDENCES = (0.9, 0.8, 0.3)

    def __init__(self, target: TargetModel) -> None:
        self.target = target

    def check_target(self, target) -> None:
        return None

    def reset(self) -> None:
        return None

    def accepted(self, num_accepted: int) -> None:
        return None

    def propose(self, draft_input: DraftInput) -> DraftBlock:
        gamma = min(self.gamma, draft_input.max_tokens)
        ids = draft_input.tokens.tolist()
        drafted = []
        for k in range(gamma):
            with torch.no_grad():
                best = int(self.target.model(torch.tensor([ids])).logits[0, -1].argmax())
            token = best if k < 2 else (best + 1) % V
            drafted.append(token)
            ids.append(token)
        return DraftBlock(torch.tensor(drafted, dtype=torch.long),
                          confidences=torch.tensor(self.CONFIDENCES[:gamma]))


@pytest.fixture(scope="module")
def target():
    return char_target()


@pytest.fixture(scope="module")
def datasets():
    return [
        EvalDataset("chat", "custom", "-", "test",
                    (Conversation(0, ("hello there", "and again")), Conversation(1, ("one more",)))),
        EvalDataset("code", "custom", "-", "test", (Conversation(5, ("def f(x):",)),)),
    ]


@pytest.fixture(scope="module")
def run(target, datasets):
    engines = {
        "none": SpeculativeEngine(target, NoDrafter()),
        # Own ids only: the resume check below reruns these engines, and a store kept from this
        # run would change what lookup proposes (a resumed eval starts its store empty).
        "ngram": SpeculativeEngine(target, NgramDrafter(NgramConfig(gamma=3, store_tokens=0))),
        "two-right": SpeculativeEngine(target, TwoRightOneWrong(target)),
    }
    seen: list[list[dict]] = []

    def encode(messages):
        seen.append(messages)
        return target.encode_conversation(messages)

    settings = runner.EvalSettings(max_new_tokens=16, temperature=0.0)
    records = runner.run_generations(datasets, engines, settings, encode)
    return engines, records, seen


def test_every_drafter_runs_every_turn_in_rotating_order(run):
    engines, records, _ = run
    turns = [(r.dataset, r.prompt_index, r.turn) for r in records[:: len(engines)]]
    assert turns == [("chat", 0, 1), ("chat", 0, 2), ("chat", 1, 1), ("code", 5, 1)]
    firsts = []
    for i in range(0, len(records), len(engines)):
        group = records[i : i + len(engines)]
        assert sorted(r.run_order for r in group) == [0, 1, 2]
        firsts.append(next(r.drafter for r in group if r.run_order == 0))
    assert firsts == ["none", "ngram", "two-right", "none"]


def test_greedy_drafters_reproduce_plain_decoding(run):
    _, records, _ = run
    assert all(r.identical_to_plain for r in records)
    assert all(r.new_tokens == 16 for r in records)  # no EOS in the char tokenizer


def test_second_turn_follows_the_targets_own_first_answer(run, target):
    engines, records, seen = run
    plain_first = next(r for r in records if r.drafter == "none" and r.turn == 1 and r.prompt_index == 0)
    plain_ids = SpeculativeEngine(target, NoDrafter()).generate(
        runner_request(target.encode_conversation([{"role": "user", "content": "hello there"}]))).token_ids
    assert seen[1] == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": target.decode(plain_ids)},
        {"role": "user", "content": "and again"},
    ]
    assert plain_first.new_tokens == len(plain_ids)


def test_a_killed_eval_resumes_from_its_journal_without_rerunning(run, datasets, tmp_path):
    engines, records, _ = run
    path = tmp_path / "journal.jsonl"
    fingerprint = {"settings": {"max_new_tokens": 16}, "drafters": list(engines)}
    settings = runner.EvalSettings(max_new_tokens=16, temperature=0.0)
    first = runner.Journal(path, fingerprint)
    # the first conversation finishes, the second is cut mid-line by a kill
    first_conv = [r for r in records if (r.dataset, r.prompt_index) == ("chat", 0)]
    first.add("chat", 0, first_conv)
    with path.open("a") as f:
        f.write('{"dataset": "chat", "index": 1, "rec')

    calls = []

    class Counting:
        def __init__(self, engine):
            self.engine = engine

        def generate(self, request):
            calls.append(request)
            return self.engine.generate(request)

    resumed = runner.Journal(path, fingerprint)
    assert list(resumed.done) == [("chat", 0)]
    again = runner.run_generations(datasets, {s: Counting(e) for s, e in engines.items()}, settings,
                                   lambda m: engines["none"].target.encode_conversation(m), journal=resumed)
    assert len(calls) == 2 * len(engines)  # chat #1 and code #5 only
    assert [r.to_json() | {"wall_s": 0, "prefill_s": 0, "draft_s": 0, "verify_s": 0} for r in again] == \
        [r.to_json() | {"wall_s": 0, "prefill_s": 0, "draft_s": 0, "verify_s": 0} for r in records]
    assert len(runner.Journal(path, fingerprint).done) == 3
    with pytest.raises(ValueError, match="other settings"):
        runner.Journal(path, {**fingerprint, "settings": {"max_new_tokens": 32}})


@pytest.mark.parametrize("line, problem", [
    ('{"dataset": "chat", "index": 0}', "KeyError: 'records'"),
    ('{"dataset": "chat", "index": 0, "records": [{"drafter": "none"}]}', "TypeError"),
    ('[1, 2]', "TypeError"),
])
def test_a_journal_line_this_journal_did_not_write_is_one_line_naming_it(tmp_path, line, problem):
    path = tmp_path / "journal.jsonl"
    fingerprint = {"settings": {"max_new_tokens": 16}}
    runner.Journal(path, fingerprint)
    with path.open("a") as f:
        f.write(line + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2 is not a journal entry \({problem}"):
        runner.Journal(path, fingerprint)
    path.write_text("")  # an empty journal is a new one
    assert runner.Journal(path, fingerprint).done == {}
    path.write_text('{"fingerprint": {"sett\n')  # a header cut short (the journal is written atomically now)
    with pytest.raises(ValueError, match=rf"{path}:1 is not a journal header"):
        runner.Journal(path, fingerprint)


def runner_request(prompt_ids):
    from dspark.engine import GenerationRequest

    return GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=16)


def test_exact_acceptance_flows_into_the_aggregates(run):
    engines, records, _ = run
    rows = {(a.dataset, a.drafter): a for a in aggregate.aggregate(records, list(engines))}
    assert {d for d, _ in rows} == {"chat", "code", "all"}
    mock = rows[("all", "two-right")]
    mine = [r for r in records if r.drafter == "two-right"]
    # full rounds accept exactly 2; a round the budget cut to γ ≤ 2 accepts all of it
    assert all(a == (2 if p == 3 else p) for r in mine for p, a in zip(r.proposed, r.accepted))
    assert mock.conditional_acceptance == [1.0, 1.0, 0.0] == mock.cumulative_acceptance
    proposed = [p for r in mine for p in r.proposed]
    accepted = [a for r in mine for a in r.accepted]
    assert mock.tau == pytest.approx(metrics.tau(proposed, accepted)) and mock.tau > 2.5
    assert mock.rounds == len(proposed) and mock.new_tokens == 4 * 16
    assert mock.wall_s == pytest.approx(sum(r.wall_s for r in mine))
    assert mock.prefill_s + mock.draft_s + mock.verify_s + mock.overhead_s == pytest.approx(mock.wall_s)
    plain = rows[("all", "none")]
    assert plain.tau == 1.0 and plain.speedup == pytest.approx(1.0) and plain.efficiency == pytest.approx(1.0)
    assert mock.speedup == pytest.approx(mock.tokens_per_s / plain.tokens_per_s)
    assert mock.t_target_1_s == pytest.approx((plain.draft_s + plain.verify_s) / plain.rounds)
    # the held-out confidence check: c = (.9, .8, .3) -> a_k = (.9, .72, .216) against survival (1, 1, 0)
    check = mock.confidence
    assert check["calibrated"] is None
    assert rows[("all", "ngram")].confidence["raw"][0]["count"] > 0  # lookup's online confidences are checked too
    assert [m["mean_pred"] for m in check["raw"]] == pytest.approx([0.9, 0.72, 0.216], abs=1e-6)
    assert [m["survival"] for m in check["raw"]] == [1.0, 1.0, 0.0]
    assert check["raw"][0]["ece"] == pytest.approx(0.1, abs=1e-6)
    calibrated = aggregate.aggregate(records, list(engines), {"two-right": Calibration((1.0, 1.0, 1.0))})
    assert next(a for a in calibrated if a.drafter == "two-right").confidence["calibrated"] is not None


def test_reports_are_written_and_strict_json(run, datasets, tmp_path, target):
    engines, records, _ = run
    results = provenance.results_dict(
        model="tiny", datasets=datasets, drafters={s: e.drafter.name for s, e in engines.items()},
        settings=runner.EvalSettings(max_new_tokens=16), gamma=None, records=records,
        aggregates=aggregate.aggregate(records, list(engines)), machine=provenance.machine_info(target),
    )
    written = report.write_eval_report(results, tmp_path)
    loaded = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert len(loaded["records"]) == len(records) and "confidences" not in loaded["records"][0]
    assert loaded["aggregates"][0]["conditional_acceptance"] == []  # plain decoding drafts nothing
    for name in ("tau", "conditional_acceptance", "time_split"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    for png in ("tau.png", "conditional_acceptance.png", "time_split.png"):
        assert f"]({png})" in md
    assert "| all | two-right |" in md and "Confidence head on the test split" in md
    from rich.console import Console

    console = Console(record=True, width=220)
    report.print_eval_table(report.json_safe(results), console)
    text = console.export_text()
    assert "two-right" in text and "1.00 1.00 .00" in text


# -- the command line ---------------------------------------------------------------------------
cli = CliRunner()


@pytest.fixture()
def tiny_world(tmp_path, monkeypatch):
    """A tiny char-level target behind TargetModel.load, a random DSpark drafter and a prompt file."""
    from dspark.drafters.dspark import DSparkConfig, DSparkModel

    target = char_target()
    monkeypatch.setattr(TargetModel, "load", classmethod(lambda cls, spec=None, device="cpu", dtype=None: target))
    torch.manual_seed(1)
    model = DSparkModel(DSparkConfig.for_target(target, num_hidden_layers=1, markov_rank=8, block_size=4))
    model.save_pretrained(tmp_path / "drafter")
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"turns": ["tell me", "and more"]}] + [{"turns": [f"prompt number {i}"]} for i in range(1, 10)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, prompts, tmp_path / "drafter"


def test_eval_and_calibrate_commands_end_to_end(tiny_world):
    tmp, prompts, drafter = tiny_world
    common = ["--dataset", str(prompts), "--max-new-tokens", "12"]
    result = cli.invoke(app, ["eval", *common, "--drafter", "ngram", "--drafter", f"dspark:{drafter}",
                              "--limit", "2", "--out", str(tmp / "eval")])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads((tmp / "eval" / "results.json").read_text())
    assert list(data["settings"]["drafters"]) == ["none", "ngram", f"dspark:{drafter}"]
    assert {r["prompt_index"] for r in data["records"]} == {0, 1}  # the test split's head
    assert len(data["records"]) == 3 * 3  # conversation 0 has two turns
    assert all(r["identical_to_plain"] for r in data["records"])
    assert (tmp / "eval" / "conditional_acceptance.png").is_file() and (tmp / "eval" / "report.md").is_file()

    result = cli.invoke(app, ["calibrate", *common, "--drafter", f"dspark:{drafter}", "--max-new-tokens", "40",
                              "--bins", "5", "--min-events", "1", "--out", str(tmp / "cal")])
    assert result.exit_code == 0, result.output + result.stderr
    body = json.loads((tmp / "cal" / "calibration_report.json").read_text())
    assert body["datasets"]["prompts"]["conversations"] == [8, 9]  # the calibration split: disjoint from eval's
    assert body["rounds"] > 0 and len(body["before"]) == len(body["temperatures"]) == 4
    full = body["sweep"]["all"]["raw"][0]  # threshold 0 keeps every slot: fixed-length verification
    assert full["threshold"] == 0.0 and full["verified_per_step"] == body["sweep"]["all"]["calibrated"][0]["verified_per_step"]
    assert len(body["reliability"]["after"]) == 4 and sum(body["reliability"]["before"][0]["counts"]) == body["rounds"]
    calibration = Calibration.load(drafter)
    assert calibration is not None and list(calibration.temperatures) == body["temperatures"]
    assert (tmp / "cal" / "reliability.png").is_file() and (tmp / "cal" / "threshold_sweep.png").is_file()
    assert "Sequential Temperature Scaling" in result.stdout

    # the same command again resumes: nothing reruns, the same records come back
    result = cli.invoke(app, ["eval", *common, "--drafter", "ngram", "--drafter", f"dspark:{drafter}",
                              "--limit", "2", "--out", str(tmp / "eval")])
    assert result.exit_code == 0 and "2 conversation(s) already done" in result.stderr, result.output + result.stderr
    again = json.loads((tmp / "eval" / "results.json").read_text())
    assert again["records"] == data["records"]
    result = cli.invoke(app, ["eval", *common[:-1], "16", "--drafter", "ngram", "--limit", "2", "--out", str(tmp / "eval")])
    assert result.exit_code == 2 and "belongs to an eval run with other settings" in result.stderr, result.stderr

    result = cli.invoke(app, ["eval", *common, "--drafter", f"dspark:{drafter}", "--limit", "1", "--no-plots",
                              "--out", str(tmp / "eval2")])
    assert result.exit_code == 0, result.output + result.stderr
    rows = json.loads((tmp / "eval2" / "results.json").read_text())["aggregates"]
    assert next(a for a in rows if a["drafter"] != "none")["confidence"]["calibrated"] is not None
    assert not (tmp / "eval2" / "tau.png").exists()


def test_eval_under_a_policy_runs_what_generate_runs(tiny_world, monkeypatch):
    """--policy auto: DSpark's scheduler for every drafter with confidences (n-gram's online ones
    included), plain decoding for the reference; greedy outputs still equal plain decoding's."""
    tmp, prompts, drafter = tiny_world
    monkeypatch.setenv("DSPARK_PROFILE_DIR", str(tmp / "profiles"))
    result = cli.invoke(app, ["eval", "--dataset", str(prompts), "--max-new-tokens", "12", "--limit", "2",
                              "--drafter", "ngram", "--drafter", f"dspark:{drafter}", "--policy", "auto",
                              "--no-plots", "--out", str(tmp / "eval")])
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads((tmp / "eval" / "results.json").read_text())
    assert data["settings"]["policies"] == {"none": "plain", "ngram": "dspark", f"dspark:{drafter}": "dspark"}
    assert all(r["identical_to_plain"] for r in data["records"])
    assert "`ngram` dspark" in (tmp / "eval" / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--limit", "0"], "--limit must be >= 1"),
        (["eval", "--split", "calibration"], "--split must be test or all"),
        (["eval", "--dataset", "no-such-set"], "unknown dataset"),
        (["eval", "--gamma", "0"], "--gamma must be >= 1"),
        (["calibrate", "--drafter", "ngram"], "needs a DSpark drafter"),
        (["calibrate", "--bins", "1"], "--bins must be >= 2"),
        (["calibrate", "--min-events", "-1"], "--min-events must be >= 0"),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output + result.stderr


def test_a_greedy_mismatch_reports_how_near_a_tie_it_was():
    """Issue 29 item 11: a mismatch is not claimed identical, and says its top-2 gap."""
    from dspark.evaluation import aggregate as agg
    from dspark.evaluation.runner import GenerationRecord

    def record(drafter, identical, gap=None):
        return GenerationRecord("d", 0, 1, drafter, 0, 5, 8, "length", 1.0, 0.1, 0.1, 0.5, [1, 1], [1, 0],
                                identical, None if identical else 3, gap)

    rows = agg.aggregate([record("none", True), record("x", False, 2e-4), record("x", False, 0.5), record("x", True)],
                         ["none", "x"])
    x = next(r for r in rows if r.drafter == "x")
    assert (x.mismatches, x.near_tie_mismatches) == (2, 1)
