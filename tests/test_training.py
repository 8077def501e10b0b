"""Training: the loss against hand-computed values, exact resume after a kill, DDP == 1 process."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_target
from dspark.training.batches import block_targets, make_batch, sample_anchors
from dspark.training.data.tokenize import TrainingSequence
from dspark.training.loss import LossWeights, dspark_loss, expected_tau, position_weights
from dspark.training.trainer import TrainConfig, train


def Seq(input_ids: list, loss_mask: list, id: str = "") -> TrainingSequence:
    return TrainingSequence(input_ids, loss_mask, id)


def synthetic_sequences(n=12, vocab=31, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 30 + 3 * i
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append(Seq(ids, [0] * 8 + [1] * (length - 8), id=str(i)))
    return out


def small_config(out_dir, **kw):
    values = dict(out_dir=str(out_dir), steps=6, batch_size=4, anchors_per_sequence=3, block_size=3,
                  markov_rank=4, save_every=3, log_every=1, lr=3e-3)
    values.update(kw)
    return TrainConfig(**values)


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_loss_terms_equal_hand_computed_values():
    draft = [[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]]
    tgt = [[[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]]]
    labels = [[0, 1]]
    conf = [[0.3, -0.2]]
    weights = LossWeights(ce=0.1, tv=0.9, conf=1.0, gamma_w=2.0)
    terms = dspark_loss(torch.tensor(draft), torch.tensor(tgt).softmax(-1), torch.tensor(labels),
                        torch.ones(1, 2, dtype=torch.bool), torch.tensor(conf), weights)
    w = [1.0, math.exp(-1 / 2.0)]
    ce, tv, bce, acc = [], [], [], []
    for k in range(2):
        pd, pt = _softmax(draft[0][k]), _softmax(tgt[0][k])
        ce.append(-math.log(pd[labels[0][k]]))
        l1 = sum(abs(a - b) for a, b in zip(pd, pt))
        tv.append(l1)
        c_star = 1 - 0.5 * l1
        acc.append(c_star)
        c = 1 / (1 + math.exp(-conf[0][k]))
        bce.append(-(c_star * math.log(c) + (1 - c_star) * math.log(1 - c)))
    mean = lambda xs: sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    assert terms.ce.item() == pytest.approx(mean(ce), rel=1e-5)
    assert terms.tv.item() == pytest.approx(mean(tv), rel=1e-5)
    assert terms.conf.item() == pytest.approx(mean(bce), rel=1e-5)
    assert terms.total.item() == pytest.approx(0.1 * mean(ce) + 0.9 * mean(tv) + mean(bce), rel=1e-5)
    assert terms.slot_acceptance.tolist() == pytest.approx(acc, rel=1e-5)
    assert terms.tau_estimate() == pytest.approx(1 + acc[0] + acc[0] * acc[1], rel=1e-5)
    assert expected_tau(acc) == pytest.approx(terms.tau_estimate(), rel=1e-6)


def test_invalid_slots_do_not_count():
    logits = torch.randn(2, 3, 5)
    valid = torch.tensor([[True, True, False], [False, False, False]])
    p_t = logits.flip(-1).softmax(-1)
    a = dspark_loss(logits, p_t, torch.zeros(2, 3, dtype=torch.long), valid, None, LossWeights())
    b = dspark_loss(logits[:1, :2], p_t[:1, :2], torch.zeros(1, 2, dtype=torch.long),
                    torch.ones(1, 2, dtype=torch.bool), None, LossWeights())
    assert a.total.item() == pytest.approx(b.total.item(), rel=1e-6)


def test_position_weights_decay():
    assert position_weights(3, 7.0).tolist() == pytest.approx([1.0, math.exp(-1 / 7), math.exp(-2 / 7)])


def test_anchors_and_labels_stay_inside_the_response():
    mask = [0, 0, 0, 1, 1, 1, 1]
    anchors = sample_anchors(mask, 10, torch.Generator().manual_seed(0))
    # a and a + 1 are response tokens: never the last prompt token, which inference never anchors
    assert sorted(a for a in anchors.tolist() if a >= 0) == [3, 4, 5]
    seq = Seq(list(range(10, 17)), mask)
    batch = make_batch([seq], [0], 4, step=0, seed=0)
    labels, valid, target_pos = block_targets(batch, gamma=3)
    for n, a in enumerate(batch.anchors[0].tolist()):
        for k in range(3):
            if valid[0, n, k]:
                assert labels[0, n, k].item() == seq.input_ids[a + k + 1]
                assert target_pos[0, n, k].item() == a + k
                assert mask[a + k + 1] == 1


def _read_log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_resume_after_kill_continues_exactly(tmp_path):
    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    seqs = synthetic_sequences()
    full = train(small_config(tmp_path / "full"), target, seqs, progress=False)
    # "Kill" after step 4: the last checkpoint is step 3, so step 4 is redone on restart.
    train(small_config(tmp_path / "cut"), target, seqs, stop_after=4, progress=False)
    assert (tmp_path / "cut" / "latest").read_text().strip() == "step_00000003"
    resumed = train(small_config(tmp_path / "cut"), target, seqs, progress=False)
    full_log, cut_log = _read_log(tmp_path / "full"), _read_log(tmp_path / "cut")
    assert [e["step"] for e in cut_log] == list(range(1, 7))  # nothing lost, nothing repeated
    for a, b in zip(full_log, cut_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6), key


def test_resume_refuses_different_settings(tmp_path):
    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    train(small_config(tmp_path / "run", steps=3), target, synthetic_sequences(), progress=False)
    from dspark.errors import DsparkError

    with pytest.raises(DsparkError, match="different settings"):
        train(small_config(tmp_path / "run", steps=3, lr=1e-2), target, synthetic_sequences(), progress=False)


def test_resume_follows_the_folder_not_its_spelling_and_checks_max_length(tmp_path, monkeypatch):
    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    train(small_config(tmp_path / "run", steps=6), target, synthetic_sequences(), stop_after=3, progress=False)
    from dspark.errors import DsparkError

    with pytest.raises(DsparkError, match="max_length 1024 there, 512 now"):
        train(small_config(tmp_path / "run", steps=6, max_length=512), target, synthetic_sequences(), progress=False)
    with pytest.raises(DsparkError, match="other data"):
        train(small_config(tmp_path / "run", steps=6), target, synthetic_sequences()[:-1], progress=False)
    monkeypatch.chdir(tmp_path)
    last = train(small_config("./run/", steps=6), target, synthetic_sequences(), progress=False)
    assert last.name == "step_00000006"
    assert [e["step"] for e in _read_log(tmp_path / "run")] == list(range(1, 7))
    state = torch.load(last / "training_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 6


def test_dflash_variant_has_no_heads(tmp_path):
    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    folder = train(small_config(tmp_path / "df", variant="dflash", steps=2), target, synthetic_sequences(), progress=False)
    from dspark.drafters.dspark import DSparkModel

    model = DSparkModel.from_pretrained(folder)
    assert model.config.is_dflash and model.markov_head is None and model.confidence_head is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target = tiny_target(vocab_size=32, hidden=32, layers=6)
        train(small_config(out_dir, steps=4, save_every=4), target, synthetic_sequences(), progress=False)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    single = train(small_config(tmp_path / "one", steps=4, save_every=4), target, synthetic_sequences(), progress=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    from safetensors.torch import load_file

    one = load_file(str(single / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "step_00000004" / "model.safetensors"))
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key
    log_one, log_two = _read_log(tmp_path / "one"), _read_log(tmp_path / "two")
    for a, b in zip(log_one, log_two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


# -- reduced draft vocabulary, greedy labels, held-out selection, warm start -------------------


def test_reduced_vocab_l1_counts_the_target_mass_outside_the_subset():
    # ‖p_d − p_t‖₁ over the full vocabulary, with p_d zero outside D, equals the reduced form.
    torch.manual_seed(0)
    draft_ids = torch.tensor([0, 2, 3])
    full_logits = torch.randn(2, 3, 5)
    p_t = torch.randn(2, 3, 5).softmax(-1)
    masked = torch.full_like(full_logits, float("-inf"))
    masked[..., draft_ids] = full_logits[..., draft_ids]
    labels = torch.tensor([[0, 2, 3], [2, 2, 0]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    whole = dspark_loss(masked, p_t, labels, valid, None, LossWeights())
    reduced = dspark_loss(
        full_logits[..., draft_ids], p_t[..., draft_ids], torch.tensor([[0, 1, 2], [1, 1, 0]]), valid, None,
        LossWeights(), target_outside=1 - p_t[..., draft_ids].sum(-1),
    )
    assert reduced.tv.item() == pytest.approx(whole.tv.item(), rel=1e-5)
    assert reduced.ce.item() == pytest.approx(whole.ce.item(), rel=1e-5)
    assert reduced.slot_acceptance.tolist() == pytest.approx(whole.slot_acceptance.tolist(), rel=1e-5)


def test_a_label_outside_the_draft_vocabulary_has_no_ce():
    logits = torch.randn(1, 2, 3)
    p_t = torch.randn(1, 2, 3).softmax(-1)
    valid = torch.ones(1, 2, dtype=torch.bool)
    with_out = dspark_loss(logits, p_t, torch.tensor([[1, -1]]), valid, None, LossWeights())
    log_pd = logits.log_softmax(-1)
    w = position_weights(2, LossWeights().gamma_w)
    assert with_out.ce.item() == pytest.approx((-log_pd[0, 0, 1] * w[0]).item() / w.sum().item(), rel=1e-5)


def test_slot_targets_read_p_t_once_per_position():
    from dspark.training.loss import slot_targets

    logits = torch.randn(2, 6, 5)
    pos = torch.tensor([[[0, 1], [3, 4]], [[2, 3], [4, 5]]])
    ids = torch.tensor([1, 3])
    out = slot_targets(logits, pos, ids)
    p = logits.softmax(-1)
    for b in range(2):
        for n in range(2):
            for k in range(2):
                assert torch.allclose(out.probs[b, n, k], p[b, pos[b, n, k]][ids])
                assert out.outside[b, n, k].item() == pytest.approx(1 - p[b, pos[b, n, k]][ids].sum().item(), abs=1e-6)
    assert torch.equal(out.greedy, logits.argmax(-1))


def test_greedy_label_rows_take_the_targets_greedy_token():
    seqs = [Seq(list(range(10, 20)), [0, 0] + [1] * 8), Seq(list(range(10, 20)), [0, 0] + [1] * 8)]
    seqs[1] = type("Text", (), {"input_ids": seqs[1].input_ids, "loss_mask": seqs[1].loss_mask, "greedy_labels": True})()
    batch = make_batch(seqs, [0, 1], 3, step=0, seed=0)
    greedy = torch.arange(100, 110).expand(2, 10)
    labels, valid, target_pos = block_targets(batch, 2, greedy)
    assert torch.equal(labels[0], batch.input_ids[0][target_pos[0] + 1])  # text the target wrote
    assert torch.equal(labels[1], greedy[1][target_pos[1]])  # the target's greedy token at a + k - 1
    with pytest.raises(ValueError, match="greedy"):
        block_targets(batch, 2)


def test_training_with_a_reduced_vocabulary_saves_d2t_and_drafts_inside_it(tmp_path):
    from dspark.drafters.dspark import DSparkDrafter, DSparkModel

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    seqs = synthetic_sequences(vocab=20)  # tokens 20..31 never occur in the targets
    folder = train(small_config(tmp_path / "rv", draft_vocab_size=12), target, seqs, progress=False)
    model = DSparkModel.from_pretrained(folder)
    assert model.config.num_draft_tokens == 12 and model.markov_head.markov_w2.weight.shape[0] == 12
    ids = model.draft_ids
    assert bool((ids < 20).all()) and torch.equal(model.t2d.nonzero().squeeze(-1), ids)
    assert torch.equal(ids, ids.sort().values) and bool((model.d2t >= 0).all())
    from safetensors.torch import load_file

    keys = load_file(str(folder / "model.safetensors")).keys()
    assert {"d2t", "t2d"} <= set(keys) and "lm_head.weight" not in keys
    config = json.loads((folder / "config.json").read_text())
    assert config["draft_vocab_size"] == 12 and config["vocab_size"] == 32
    drafter = DSparkDrafter(model)
    drafter.check_target(target)
    from dspark.engine import GenerationRequest, SpeculativeEngine
    from dspark.sampling import SamplingParams

    engine = SpeculativeEngine(target, drafter)
    result = engine.generate(GenerationRequest([1, 2, 3], SamplingParams(temperature=1.0), max_new_tokens=12, seed=0))
    assert len(result.token_ids) == 12


def test_heldout_score_keeps_the_best_drafter(tmp_path):
    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    seqs = synthetic_sequences()
    heldout = synthetic_sequences(n=4, seed=5)
    train(small_config(tmp_path / "h"), target, seqs, progress=False, heldout=heldout)
    log = [json.loads(line) for line in (tmp_path / "h" / "heldout_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [3, 6]
    best = json.loads((tmp_path / "h" / "best" / "best.json").read_text())
    assert best["tau_estimate"] == max(e["tau_estimate"] for e in log)
    assert (tmp_path / "h" / "best" / "model.safetensors").is_file()


def test_too_many_epochs_are_refused(tmp_path):
    from dspark.errors import DsparkError

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    with pytest.raises(DsparkError, match="epochs"):
        train(small_config(tmp_path / "e", steps=20), target, synthetic_sequences(), progress=False)


def test_warm_start_moves_markov_rows_with_their_tokens(tmp_path):
    from dspark.drafters.dspark import DSparkConfig, DSparkModel
    from dspark.training.checkpoints import warm_start

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    full = DSparkModel(DSparkConfig.for_target(target, num_hidden_layers=1, markov_rank=4, block_size=3))
    with torch.no_grad():
        full.markov_head.markov_w2.weight.normal_()
    full.save_pretrained(tmp_path / "full")
    small = DSparkModel(DSparkConfig.for_target(target, num_hidden_layers=1, markov_rank=4, block_size=3, draft_vocab_size=5))
    ids = torch.tensor([1, 4, 9, 20, 31])
    small.set_draft_vocab(ids)
    warm_start(small, tmp_path / "full")
    assert torch.equal(small.markov_head.markov_w2.weight, full.markov_head.markov_w2.weight[ids])
    assert torch.equal(small.layers[0].mlp.up_proj.weight, full.layers[0].mlp.up_proj.weight)
    assert torch.equal(small.draft_ids, ids)


def test_warm_start_maps_w1_rows_between_the_target_and_draft_layouts(tmp_path):
    from dspark.drafters.dspark import DSparkConfig, DSparkModel
    from dspark.training.checkpoints import warm_start

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    shape = dict(num_hidden_layers=1, markov_rank=4, block_size=3)
    full = DSparkModel(DSparkConfig.for_target(target, **shape))
    with torch.no_grad():
        full.markov_head.markov_w1.weight.normal_()
    full.save_pretrained(tmp_path / "full")
    ids = torch.tensor([1, 4, 9, 20, 31])
    small = DSparkModel(DSparkConfig.for_target(target, **shape, draft_vocab_size=5, markov_w1_vocab="draft"))
    small.set_draft_vocab(ids)
    warm_start(small, tmp_path / "full")
    w1 = full.markov_head.markov_w1.weight
    outside = ~small.t2d
    assert torch.equal(small.markov_head.markov_w1.weight[:5], w1[ids])
    assert torch.allclose(small.markov_head.markov_w1.weight[5], w1[outside].mean(0))
    # Back to the V-row layout, over another draft vocabulary of the same size: every token's row follows it.
    small.save_pretrained(tmp_path / "small")
    other = DSparkModel(DSparkConfig.for_target(target, **shape, draft_vocab_size=5))
    other.set_draft_vocab(torch.tensor([0, 1, 4, 9, 20]))
    warm_start(other, tmp_path / "small")
    back = other.markov_head.markov_w1.weight
    assert torch.equal(back[ids], small.markov_head.markov_w1.weight[:5])
    assert bool((back[outside] == small.markov_head.markov_w1.weight[5]).all())
    w2 = small.markov_head.markov_w2.weight
    assert torch.equal(other.markov_head.markov_w2.weight[1:], w2[:4])  # 1, 4, 9, 20 moved one row down
    assert bool((other.markov_head.markov_w2.weight[0] == 0).all())  # token 0: the source never drafted it


def test_greedy_survival_is_the_prefix_of_argmax_matches():
    # Block 0 matches at slots 1 and 2, then misses; block 1 misses at once; slot 3 of block 1 is invalid.
    logits = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]], [[0, 0, 5.0], [0, 5.0, 0], [0, 0, 5.0]]])
    greedy = torch.tensor([[0, 1, 2], [0, 1, -1]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    p_t = torch.full((2, 3, 3), 1 / 3)
    terms = dspark_loss(logits, p_t, greedy.clamp_min(0), valid, None, LossWeights(), greedy_index=greedy)
    assert terms.greedy_survival.tolist() == pytest.approx([0.5, 0.5, 0.0])


class Killed(Exception):
    """Stands in for a kill at a chosen point of a run."""


def test_a_checkpoint_killed_before_its_heldout_score_is_scored_on_resume(tmp_path, monkeypatch):
    import dspark.training.trainer as trainer

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    seqs, heldout = synthetic_sequences(), synthetic_sequences(n=4, seed=5)
    real = trainer.heldout_tau
    calls = []

    def killed_at_step_6(model, *args):
        calls.append(1)
        if len(calls) == 2:  # step 6 is saved, then the process dies before its score
            raise Killed
        return real(model, *args)

    monkeypatch.setattr(trainer, "heldout_tau", killed_at_step_6)
    with pytest.raises(Killed):
        train(small_config(tmp_path / "h"), target, seqs, progress=False, heldout=heldout)
    monkeypatch.undo()
    assert (tmp_path / "h" / "latest").read_text().strip() == "step_00000006"
    train(small_config(tmp_path / "h", steps=9), target, seqs, progress=False, heldout=heldout)
    log = [json.loads(line) for line in (tmp_path / "h" / "heldout_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [3, 6, 9]  # step 6 scored when the run resumed
    best = json.loads((tmp_path / "h" / "best" / "best.json").read_text())
    winner = max(log, key=lambda e: e["tau_estimate"])
    assert best["step"] == winner["step"] and best["tau_estimate"] == winner["tau_estimate"]
    from safetensors.torch import load_file

    kept = load_file(str(tmp_path / "h" / "best" / "model.safetensors"))
    saved = load_file(str(tmp_path / "h" / f"step_{winner['step']:08d}" / "model.safetensors"))
    assert all(torch.equal(kept[k], saved[k]) for k in saved)


def test_the_scores_of_a_resumed_run_equal_an_uninterrupted_one(tmp_path, monkeypatch):
    import dspark.training.trainer as trainer

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    seqs, heldout = synthetic_sequences(), synthetic_sequences(n=4, seed=5)
    train(small_config(tmp_path / "full"), target, seqs, progress=False, heldout=heldout)
    real, calls = trainer.heldout_tau, []

    def killed_at_step_3(model, *args):
        calls.append(1)
        if len(calls) == 1:
            raise Killed
        return real(model, *args)

    monkeypatch.setattr(trainer, "heldout_tau", killed_at_step_3)
    with pytest.raises(Killed):
        train(small_config(tmp_path / "cut"), target, seqs, progress=False, heldout=heldout)
    train(small_config(tmp_path / "cut"), target, seqs, progress=False, heldout=heldout)
    read = lambda run: (tmp_path / run / "heldout_log.jsonl").read_text()
    assert read("cut") == read("full")  # the catch-up score is the one the run would have written
    for a, b in zip(_read_log(tmp_path / "full"), _read_log(tmp_path / "cut")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]


def test_a_kill_while_best_is_replaced_loses_nothing(tmp_path):
    from dspark.drafters.dspark import DSparkConfig, DSparkModel
    from dspark.training.checkpoints import keep_if_best
    from dspark.training.heldout import HeldoutScore

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    model = DSparkModel(DSparkConfig.for_target(target, num_hidden_layers=1, markov_rank=4, block_size=3))
    score = lambda tau: HeldoutScore(tau, [0.5], tau, [0.5])
    out = tmp_path / "run"
    out.mkdir()
    keep_if_best(out, 3, score(1.5), model)
    # killed after the old best/ was set aside, before the new one took its place
    model.save_pretrained(out / ".tmp_best")
    (out / ".tmp_best" / "best.json").write_text(json.dumps({"step": 6, "tau_estimate": 1.7}))
    (out / "best").rename(out / ".old_best")
    keep_if_best(out, 9, score(1.6), model)
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 6
    assert not (out / ".tmp_best").exists() and not (out / ".old_best").exists()


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    from dspark.errors import DsparkError
    from dspark.training.data.store import lock_folder

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    (tmp_path / "run").mkdir()
    fd = lock_folder(tmp_path / "run", "held by the test")  # another `dspark train`, still running
    try:
        with pytest.raises(DsparkError, match=rf"{tmp_path / 'run'} is in use by another `dspark train`"):
            train(small_config(tmp_path / "run", steps=3), target, synthetic_sequences(), progress=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written
    finally:
        os.close(fd)
    train(small_config(tmp_path / "run", steps=3), target, synthetic_sequences(), progress=False)  # free again
    os.close(lock_folder(tmp_path / "run", "the finished run still holds it"))


@pytest.mark.parametrize("name", ["train_config.json", "train_data.json"])
def test_an_unreadable_run_record_names_its_file(tmp_path, name):
    from dspark.errors import DsparkError

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    train(small_config(tmp_path / "run", steps=6), target, synthetic_sequences(), stop_after=3, progress=False)
    (tmp_path / "run" / name).write_text("")
    with pytest.raises(DsparkError, match=rf"{tmp_path / 'run' / name} is not readable json \(Expecting value"):
        train(small_config(tmp_path / "run", steps=6), target, synthetic_sequences(), progress=False)


def test_a_kill_while_the_run_records_are_written_leaves_them_whole(tmp_path, monkeypatch):
    import io

    target = tiny_target(vocab_size=32, hidden=32, layers=6)
    train(small_config(tmp_path / "run", steps=6), target, synthetic_sequences(), stop_after=3, progress=False)
    real_open = io.open

    def killed_mid_write(file, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(str(file)) in ("train_config.json", "train_data.json"):
            real_open(file, mode, *args, **kwargs).close()  # the file is truncated, then the process dies
            raise Killed
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", killed_mid_write)
    with contextlib.suppress(Killed):
        train(small_config(tmp_path / "run", steps=6), target, synthetic_sequences(), stop_after=1, progress=False)
    monkeypatch.undo()
    for name in ("train_config.json", "train_data.json"):
        assert json.loads((tmp_path / "run" / name).read_text())
    last = train(small_config(tmp_path / "run", steps=6), target, synthetic_sequences(), progress=False)
    assert last.name == "step_00000006"


def test_each_torchrun_rank_takes_its_own_gpu_before_nccl_starts(monkeypatch):
    """Issue 29 item 1, on a faked two-rank CUDA launch: rank 1 runs on cuda:1, made current
    before the process group starts, and NCCL is given that device."""
    import torch
    import torch.distributed as dist

    from dspark.training.run import start_distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw.get("device_id"))))
    assert start_distributed(2, {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}) == "cuda:1"
    assert calls == [("set_device", 1), ("nccl", torch.device("cuda:1"))]
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert start_distributed(2, {"LOCAL_RANK": "1"}) == "cpu" and calls == [("gloo", None)]
    calls.clear()
    assert start_distributed(1, {}) == "cpu" and calls == []  # one process: no group


def test_under_torchrun_only_rank_0_writes_the_feature_cache(tmp_path):
    """Issue 29 item 3: rank 0 writes the cache before the barrier, the others only open it
    after; a rank that finds nothing there (rank 0 wrote nothing) says so instead of writing."""
    import numpy as np

    from conftest import tiny_target
    from dspark.errors import DsparkError
    from dspark.training.data.tokenize import TrainingSequence
    from dspark.training.features import CachedFeatures

    target = tiny_target(vocab_size=40, hidden=16)
    sequences = [TrainingSequence([1, 2, 3, 4, 5], [0, 0, 1, 1, 1], "a"), TrainingSequence([6, 7, 8], [0, 1, 1], "b")]
    folder, seen = tmp_path / "cache", []
    with pytest.raises(DsparkError, match="rank 0 wrote no feature cache"):
        CachedFeatures.shared(folder, sequences, target, (0, 1), rank=1, barrier=lambda: None)
    assert not folder.exists()  # rank 1 wrote nothing

    def barrier():  # what every rank sees at the barrier: rank 0's finished cache
        seen.append((folder / "meta.json").is_file())

    first = CachedFeatures.shared(folder, sequences, target, (0, 1), rank=0, barrier=barrier)
    written = (folder / "features.f16").stat().st_mtime_ns
    other = CachedFeatures.shared(folder, sequences, target, (0, 1), rank=1, barrier=barrier)
    assert seen == [True, True] and (folder / "features.f16").stat().st_mtime_ns == written
    assert np.array_equal(np.asarray(first.data), np.asarray(other.data)) and first.key == other.key
    with pytest.raises(DsparkError, match="other data"):
        CachedFeatures.shared(folder, sequences[:1], target, (0, 1), rank=1, barrier=lambda: None)


def test_train_takes_device_and_dtype(monkeypatch):
    """Issue 29 item 10: `dspark train --device/--dtype`; cpu wins over a visible GPU, cuda
    without one is one line."""
    import torch

    from dspark.errors import DsparkError
    from dspark.training.run import start_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert start_distributed(1, {"LOCAL_RANK": "0"}, "cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DsparkError, match="--device cuda"):
        start_distributed(1, {}, "cuda")
