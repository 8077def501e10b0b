"""Training: the loss against hand-computed values, exact resume after a kill, DDP == 1 process."""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_target
from dspark.training.batches import block_targets, make_batch, sample_anchors
from dspark.training.loss import LossWeights, dspark_loss, expected_tau, position_weights
from dspark.training.trainer import TrainConfig, train


@dataclass
class Seq:
    input_ids: list
    loss_mask: list
    id: str = ""


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
    terms = dspark_loss(torch.tensor(draft), torch.tensor(tgt), torch.tensor(labels),
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
    a = dspark_loss(logits, logits.flip(-1), torch.zeros(2, 3, dtype=torch.long), valid, None, LossWeights())
    b = dspark_loss(logits[:1, :2], logits.flip(-1)[:1, :2], torch.zeros(1, 2, dtype=torch.long),
                    torch.ones(1, 2, dtype=torch.bool), None, LossWeights())
    assert a.total.item() == pytest.approx(b.total.item(), rel=1e-6)


def test_position_weights_decay():
    assert position_weights(3, 7.0).tolist() == pytest.approx([1.0, math.exp(-1 / 7), math.exp(-2 / 7)])


def test_anchors_and_labels_stay_inside_the_response():
    mask = [0, 0, 0, 1, 1, 1, 1]
    anchors = sample_anchors(mask, 10, torch.Generator().manual_seed(0))
    assert sorted(a for a in anchors.tolist() if a >= 0) == [2, 3, 4, 5]  # next token is a response token
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
