"""The DSpark drafter on tiny random configs: masks, KV injection, cache, heads, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_dspark_model, tiny_target
from dspark.drafters.base import DraftInput
from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel
from dspark.drafters.dspark.model import block_attention_mask
from dspark.errors import DsparkError, IncompatibleDrafterError
from dspark.sampling import SamplingParams

GAMMA = 4


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab_size=32, hidden=32, layers=6, seed=0)


def make_model(target, seed=1, **overrides) -> DSparkModel:
    values = dict(num_hidden_layers=2, markov_rank=8, block_size=GAMMA, mask_token_id=31)
    model = random_dspark_model(target, seed, **{**values, **overrides})
    model.attach_target(target)
    return model


def features_of(target, ids):
    out = target.forward(torch.tensor([ids]), layer_ids=DSparkConfig.for_target(target).target_layer_ids)
    return out.features  # [1, S, m*d]


def test_block_mask_sees_context_before_anchor_and_whole_block():
    mask = block_attention_mask(torch.tensor([[2, 4]]), seq_len=5, gamma=2)[0, 0].int()
    expected = torch.tensor(
        [  # ctx 0..4       | block0 | block1
            [1, 1, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 1, 1],
            [1, 1, 1, 1, 0, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(mask, expected)


def test_block_ignores_context_at_or_after_anchor(target):
    model = make_model(target)
    ids = torch.randint(0, 30, (1, 12), generator=torch.Generator().manual_seed(0))
    feats = features_of(target, ids[0].tolist())
    anchors = torch.tensor([[6]])
    base = model(feats, ids, anchors).draft_logits
    later = feats.clone()
    later[:, 6:] += 5.0  # anchor position and everything after: invisible to the block
    assert torch.allclose(model(later, ids, anchors).draft_logits, base, atol=1e-5)
    earlier = feats.clone()
    earlier[:, 5] += 5.0  # the last context position before the anchor: visible
    assert not torch.allclose(model(earlier, ids, anchors).draft_logits, base, atol=1e-3)


def test_block_is_bidirectional(target):
    model = make_model(target, markov_rank=0, enable_confidence_head=False)
    ids = torch.randint(0, 30, (1, 10), generator=torch.Generator().manual_seed(1))
    from dspark.drafters.dspark.model import ContextKV

    cache = ContextKV(2)
    model.extend_context(cache, model.context_states(features_of(target, ids[0].tolist())[:, :6]), torch.arange(6)[None])
    block = model.block_input_ids(ids[0, 6]).unsqueeze(0)
    pos = torch.arange(6, 6 + GAMMA)[None]
    first = model.backbone(block, pos, cache).base_logits[0, 0]
    altered = block.clone()
    altered[0, -1] = 3  # change the last slot's input: slot 1 must see it
    assert not torch.allclose(model.backbone(altered, pos, cache).base_logits[0, 0], first, atol=1e-4)


def test_incremental_context_equals_recompute_and_training_path(target):
    model = make_model(target)
    ids = torch.randint(0, 30, (14,), generator=torch.Generator().manual_seed(2)).tolist()
    feats = features_of(target, ids)[0]  # [S, m*d]
    params = SamplingParams()
    anchor = 11  # tokens[: anchor + 1] are committed; the anchor is tokens[anchor]

    incremental = DSparkDrafter(model)
    incremental.reset()
    for lo, hi in [(0, 5), (5, 6), (6, 9), (9, anchor)]:  # rounds of uneven size
        block = incremental.propose(DraftInput(torch.tensor(ids[: hi + 1]), feats[lo:hi], params, None, GAMMA))
    scratch = DSparkDrafter(model)
    scratch.reset()
    fresh = scratch.propose(DraftInput(torch.tensor(ids[: anchor + 1]), feats[:anchor], params, None, GAMMA))
    assert torch.equal(block.tokens, fresh.tokens)
    assert torch.allclose(block.confidences, fresh.confidences, atol=1e-6)

    # The training path (many blocks, one mask) gives the same base logits for this anchor.
    from dspark.drafters.dspark.model import ContextKV

    cache = ContextKV(2)
    model.extend_context(cache, model.context_states(feats[:anchor][None]), torch.arange(anchor)[None])
    pos = torch.arange(anchor, anchor + GAMMA)[None]
    serve = model.backbone(model.block_input_ids(torch.tensor(ids[anchor])).unsqueeze(0), pos, cache)
    train_model = make_model(target, markov_rank=0, enable_confidence_head=False)
    train_model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("markov", "confidence"))})
    trained = train_model(feats[None], torch.tensor([ids]), torch.tensor([[anchor, 3]])).draft_logits[0, 0]
    assert torch.allclose(trained, serve.base_logits[0], atol=1e-4)


@pytest.mark.parametrize("vocab, w1", [(0, "target"), (20, "target"), (20, "draft")],
                         ids=["full-vocab", "draft-vocab", "draft-vocab-draft-w1"])
def test_batched_drafts_equal_the_teacher_forced_forward(target, vocab, w1):
    """The slow oracle of the one drafting path: every request's block, drafted together with
    others of other lengths (padded contexts, one backbone pass, the Markov loop over slots),
    is what the training forward gives when teacher-forced on the drafted tokens."""
    from dspark.drafters.dspark.drafter import BatchedDSparkDrafter
    from dspark.sampling import warp_probs

    model = make_model(target, markov_w1_vocab=w1, **({"draft_vocab_size": vocab} if vocab else {}))
    if vocab:
        model.set_draft_vocab(torch.arange(3, 3 + vocab))  # anchors 0..2 and 23..29 are outside it
    if w1 == "draft":
        with torch.no_grad():
            model.markov_head.markov_w1.weight.normal_()
    drafter = BatchedDSparkDrafter(model, "dspark", GAMMA)
    drafter.allocate(num_slots=3, capacity=8)  # smaller than the longest context: slots grow
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 30, (n,), generator=g).tolist() for n in (13, 5, 9)]
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5)]
    inputs = []
    for slot, (ids, p) in enumerate(zip(prompts, params)):
        drafter.open(slot)
        inputs.append(DraftInput(torch.tensor(ids), features_of(target, ids[:-1])[0], p,
                                 torch.Generator().manual_seed(slot), GAMMA))
    blocks = drafter.propose_batch([0, 1, 2], inputs).blocks
    for ids, p, block in zip(prompts, params, blocks):
        anchor = len(ids) - 1
        seq = ids + block.tokens[:-1].tolist()  # slot k's previous token is x_{k-1}
        context = features_of(target, ids[:-1])[0]  # [anchor, m*d]; later positions are never read
        feats = torch.cat([context, context.new_zeros(GAMMA, context.shape[1])])
        out = model(feats[None], torch.tensor([seq]), torch.tensor([[anchor]]))
        logits, conf = out.draft_logits[0, 0], out.confidence_logits[0, 0]  # [γ, N], [γ]
        torch.testing.assert_close(block.confidences, torch.sigmoid(conf), rtol=1e-4, atol=1e-5)
        top2 = logits.topk(2, dim=-1).values
        torch.testing.assert_close(block.margins, top2[:, 0] - top2[:, 1], rtol=1e-4, atol=1e-4)
        if p.greedy:
            assert torch.equal(block.tokens, model.to_target_ids(logits.argmax(-1)))
        else:
            torch.testing.assert_close(block.q, model.expand_q(warp_probs(logits, p)), rtol=1e-4, atol=1e-5)
            assert bool((block.q[torch.arange(GAMMA), block.tokens] > 0).all())


def test_markov_bias_depends_on_previous_token(target):
    model = make_model(target)
    hidden = torch.randn(1, GAMMA, 32)
    from dspark.drafters.dspark.model import BlockOutput

    out = BlockOutput(hidden, torch.zeros(1, GAMMA, 32))
    a = model.teacher_forced_logits(out, torch.tensor([[1, 2, 3, 4]]))
    b = model.teacher_forced_logits(out, torch.tensor([[1, 2, 9, 4]]))
    assert torch.allclose(a[0, [0, 1, 3]], b[0, [0, 1, 3]])  # only slot 3 (prev = x_2) moves
    assert not torch.allclose(a[0, 2].softmax(-1), b[0, 2].softmax(-1), atol=1e-3)
    assert torch.allclose(a[0, 2], model.markov_head.markov_w2(model.markov_head.markov_w1(torch.tensor(3))))


def test_draft_w1_has_a_row_per_draft_token_and_one_for_the_rest(target):
    from dspark.drafters.dspark.model import BlockOutput

    model = make_model(target, draft_vocab_size=6, markov_w1_vocab="draft")
    ids = torch.tensor([2, 5, 7, 11, 13, 17])
    model.set_draft_vocab(ids)
    assert model.markov_head.markov_w1.weight.shape == (7, 8)
    rows = model.markov_rows(torch.arange(32))
    assert rows[ids].tolist() == list(range(6))
    assert set(rows[~model.t2d].tolist()) == {6}
    out = BlockOutput(torch.randn(1, GAMMA, 32), torch.zeros(1, GAMMA, 6))
    a = model.teacher_forced_logits(out, torch.tensor([[1, 3, 7, 4]]))
    b = model.teacher_forced_logits(out, torch.tensor([[1, 30, 7, 20]]))  # other tokens outside: same row
    assert torch.equal(a, b)
    c = model.teacher_forced_logits(out, torch.tensor([[1, 3, 11, 4]]))  # another draft token
    assert not torch.allclose(a[0, 2], c[0, 2])
    assert torch.allclose(c[0, 2], model.markov_head.markov_w2(model.markov_head.markov_w1.weight[3]))
    model.set_draft_vocab(torch.tensor([0, 5, 7, 11, 13, 17]))  # the cached row table follows the draft vocabulary
    assert int(model.markov_rows(torch.tensor(0))) == 0 and int(model.markov_rows(torch.tensor(2))) == 6
    with pytest.raises(ValueError, match="reduced draft vocabulary"):
        DSparkConfig.for_target(target, markov_w1_vocab="draft")
    with pytest.raises(ValueError, match="markov_w1_vocab"):
        DSparkConfig.for_target(target, draft_vocab_size=6, markov_w1_vocab="tokens")


def test_rnn_head_carries_history(target):
    model = make_model(target, markov_head_type="rnn")
    with torch.no_grad():
        model.markov_head.joint_proj.weight.normal_(std=0.5)
    from dspark.drafters.dspark.model import BlockOutput

    out = BlockOutput(torch.randn(1, GAMMA, 32), torch.zeros(1, GAMMA, 32))
    a = model.teacher_forced_logits(out, torch.tensor([[1, 2, 3, 4]]))
    b = model.teacher_forced_logits(out, torch.tensor([[5, 2, 3, 4]]))
    # Changing x_0 changes slot 1 and, through the state, every later slot.
    assert all(not torch.allclose(a[0, k], b[0, k]) for k in range(GAMMA))


@pytest.mark.parametrize("family, architecture, w1", [("llama", "LlamaDSparkModel", "target"),
                                                     ("qwen3", "Qwen3DSparkModel", "target"),
                                                     ("llama", "LlamaDSparkModel", "draft")])
def test_save_load_round_trip_is_bit_exact(target, tmp_path, family, architecture, w1):
    vocab = {"draft_vocab_size": 20} if w1 == "draft" else {}
    model = make_model(target, layer_family=family, markov_w1_vocab=w1, **vocab)
    if vocab:
        model.set_draft_vocab(torch.arange(2, 22))
    model.save_pretrained(tmp_path / "d")
    loaded = DSparkModel.from_pretrained(tmp_path / "d")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.config == model.config
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    for field in ("block_size", "target_layer_ids", "mask_token_id", "markov_rank", "markov_head_type",
                  "enable_confidence_head", "confidence_head_with_markov"):
        assert field in cfg
    assert cfg["architectures"] == [architecture]
    assert cfg.get("markov_w1_vocab", "target") == w1  # absent for the authors' V-row layout
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "d" / "model.safetensors")))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "markov_head.markov_w1.weight",
            "markov_head.markov_w2.weight", "confidence_head.proj.weight", "confidence_head.proj.bias"} <= keys
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in keys)


def test_authors_checkpoint_with_embed_and_head_loads(target, tmp_path):
    model = make_model(target)
    model.save_pretrained(tmp_path / "d")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "d" / "model.safetensors"))
    state["embed_tokens.weight"] = torch.zeros(32, 32)
    state["lm_head.weight"] = torch.zeros(32, 32)
    save_file(state, str(tmp_path / "d" / "model.safetensors"))
    assert DSparkModel.from_pretrained(tmp_path / "d").config == model.config


def test_refuses_a_target_it_was_not_trained_for(target):
    model = make_model(target)
    other = tiny_target(vocab_size=40, hidden=32, layers=6)
    with pytest.raises(IncompatibleDrafterError, match="vocabulary 40 != 32"):
        model.attach_target(other)
    wider = tiny_target(vocab_size=32, hidden=48, layers=6)
    with pytest.raises(IncompatibleDrafterError, match="hidden size"):
        model.attach_target(wider)


def test_config_rejects_final_layer_and_bad_values(target):
    with pytest.raises(ValueError, match="final, normed layer"):
        DSparkConfig.for_target(target, target_layer_ids=(1, 5))
    with pytest.raises(ValueError, match="markov_head_type"):
        DSparkConfig.for_target(target, markov_head_type="lstm")
    with pytest.raises(DsparkError, match="not a DSpark drafter folder"):
        DSparkModel.from_pretrained("/no/such/folder")


def test_init_from_target_starts_as_the_targets_top_layers(target):
    model = make_model(target)
    model.init_from_target(target)
    layers = target.model.model.layers
    top = layers[len(layers) - len(model.layers) :]
    for mine, theirs in zip(model.layers, top):
        for name, value in theirs.state_dict().items():
            assert torch.equal(mine.state_dict()[name], value), name
    # H_ctx begins as the normalised input of the layer that reads the deepest feature layer.
    ids = [3, 7, 1, 9, 4]
    config = model.config
    deepest = max(config.target_layer_ids)
    hidden = target.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[deepest + 1]
    expected = layers[deepest + 1].input_layernorm(hidden)
    torch.testing.assert_close(model.context_states(features_of(target, ids)), expected)
    torch.testing.assert_close(model.norm.weight, target.model.model.norm.weight)


def test_drafter_backbone_is_qwen3_unless_asked(target):
    assert DSparkConfig.for_target(target).layer_family == "qwen3"  # every engine serves it, for any target
    assert DSparkConfig.for_target(target, layer_family="llama").layer_family == "llama"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_block_attention_equals_the_dense_mask_oracle(target, family):
    # The training forward's block-by-block attention against one dense (Nγ) × (S + Nγ)
    # mask through sdpa: same outputs and same gradients, with padded anchors (-1) and a
    # block at anchor 0 that sees no context at all.
    torch.manual_seed(3)
    config = DSparkConfig.for_target(target, num_hidden_layers=2, markov_rank=4, block_size=3, layer_family=family)
    model = DSparkModel(config)
    model.attach_target(target)
    seq = 17
    features = torch.randn(2, seq, len(config.target_layer_ids) * config.hidden_size)
    ids = torch.randint(0, config.vocab_size, (2, seq))
    anchors = torch.tensor([[0, 4, 9, 15], [2, 3, 11, -1]])
    fast = model(features, ids, anchors)
    fast_grad = torch.autograd.grad(fast.draft_logits.square().sum(), model.fc.weight)[0]
    slow = model(features, ids, anchors, dense_mask=True)
    slow_grad = torch.autograd.grad(slow.draft_logits.square().sum(), model.fc.weight)[0]
    assert torch.allclose(fast.draft_logits, slow.draft_logits, atol=1e-5)
    assert torch.allclose(fast.confidence_logits, slow.confidence_logits, atol=1e-5)
    assert torch.allclose(fast_grad, slow_grad, rtol=1e-4, atol=1e-5)


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_json_is_checked_against_the_weights_before_anything_is_built(target, tmp_path, monkeypatch):
    make_model(target).save_pretrained(tmp_path / "d")
    _edit_config(tmp_path / "d", num_hidden_layers=1000)
    built = []
    real_init = DSparkModel.__init__
    monkeypatch.setattr(DSparkModel, "__init__", lambda self, config: built.append(config) or real_init(self, config))
    # The layer count sizes the allocation: refused from the safetensors header, nothing built.
    with pytest.raises(DsparkError, match=r"says num_hidden_layers 1000, but .*model\.safetensors holds 2 \(layers\.0\.\.layers\.1\)"):
        DSparkModel.from_pretrained(tmp_path / "d")
    assert built == []
    monkeypatch.undo()
    _edit_config(tmp_path / "d", num_hidden_layers=2, intermediate_size=4096)
    with pytest.raises(DsparkError, match=r"size mismatch for layers\.0\.mlp\.down_proj\.weight \[32, \d+\] in the file, \[32, 4096\]"):
        DSparkModel.from_pretrained(tmp_path / "d")


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", 0, "num_attention_heads must be > 0, got 0"),
    ("num_key_value_heads", 0, "num_key_value_heads must be > 0, got 0"),
    ("hidden_size", "32", "hidden_size must be an integer, got '32'"),
    ("head_dim", 8.5, "head_dim must be an integer, got 8.5"),
    ("intermediate_size", -64, "intermediate_size must be > 0, got -64"),
    ("num_hidden_layers", 0, "num_hidden_layers must be > 0, got 0"),
    ("rms_norm_eps", "tiny", "rms_norm_eps must be a number"),
    ("enable_confidence_head", 1, "enable_confidence_head must be true or false"),
    ("target_layer_ids", [1, "2"], "target_layer_ids must be a list of integers"),
])
def test_bad_config_fields_are_one_line_naming_the_field_and_the_file(target, tmp_path, field, value, message):
    make_model(target).save_pretrained(tmp_path / "d")
    _edit_config(tmp_path / "d", **{field: value})
    with pytest.raises(DsparkError, match=rf"{tmp_path / 'd' / 'config.json'} is not a DSpark config: {message}"):
        DSparkModel.from_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match=message):  # the dataclass itself refuses it, whoever builds it
        DSparkConfig.for_target(target, **{field: tuple(value) if isinstance(value, list) else value})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor_and_the_folder(target, tmp_path, bad):
    from safetensors.torch import load_file, save_file

    make_model(target).save_pretrained(tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    state = load_file(str(weights))
    state["layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_file(state, str(weights))
    with pytest.raises(DsparkError, match=rf"{weights}: tensor layers\.1\.mlp\.up_proj\.weight holds NaN or inf"):
        DSparkModel.from_pretrained(tmp_path / "d")
