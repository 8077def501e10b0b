"""The EAGLE-3 baseline: the training-time-test loss against explicit loops, chain drafting
against the unrolled training forward (its slow oracle), greedy equality through both engines,
checkpoints, a short training run whose checkpoint the factory loads, and the gemma3 family on
a tiny Gemma 3 target (sandwich norms, sqrt(d)-scaled embedding, soft-capped logits).

The exact-enumeration chi-square losslessness checks of an EAGLE-3 drafter live with the
others in test_lossless.py (drafters "eagle3" and "eagle3-reduced-vocab").
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import GEMMA3_SOFTCAP, tiny_target
from dspark.drafters.base import DraftInput, Drafter, NoDrafter
from dspark.drafters.eagle3 import Eagle3Config, Eagle3Drafter, Eagle3Model
from dspark.engine import BatchEngine, GenerationRequest, SpeculativeEngine
from dspark.errors import DsparkError
from dspark.sampling import SamplingParams
from dspark.training.batches import make_batch
from dspark.training.data.tokenize import TrainingSequence
from dspark.training.features import OnlineFeatures
from dspark.training.loss import EAGLE3_WEIGHTS, LossWeights, dspark_loss
from dspark.training.step import StepContext
from dspark.training.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

V, GAMMA = 24, 3
DRAFT_IDS = torch.tensor([0, 1, 2, 3, 5, 8, 9, 11, 13, 17, 19, 23])
T1 = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def target():
    return tiny_target(vocab_size=V, hidden=32, layers=6, scale=4.0)


@pytest.fixture(scope="module")
def gemma():
    return tiny_target("gemma3", vocab_size=V, hidden=32, layers=6, scale=4.0)


def random_eagle3(target, draft_ids: torch.Tensor | None = DRAFT_IDS, seed: int = 5, std: float = 0.3,
                  layer_family: str | None = "llama") -> Eagle3Model:
    """A random Eagle3Model with weights large enough that every input (token, features,
    own hidden state, earlier pairs) moves the logits; ``layer_family`` None is the target's."""
    torch.manual_seed(seed)
    extra = {"layer_family": layer_family} if layer_family else {}
    if draft_ids is not None:
        extra["draft_vocab_size"] = draft_ids.numel()
    model = Eagle3Model(Eagle3Config.for_target(target, block_size=GAMMA, **extra))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=std)
    if draft_ids is not None:
        model.set_draft_vocab(draft_ids)
    model.attach_target(target)
    return model.eval()


def features_of(target, model, ids: list[int]) -> torch.Tensor:
    """[len(ids), m*d] target features of every position of ``ids``."""
    with torch.inference_mode():
        return target.forward(torch.tensor([ids]), layer_ids=model.config.target_layer_ids).features[0]


def test_the_drafter_follows_the_protocol(target):
    drafter = Eagle3Drafter(random_eagle3(target))
    assert isinstance(drafter, Drafter)
    assert drafter.name == "eagle3" and drafter.gamma == GAMMA
    assert drafter.feature_layer_ids == drafter.config.target_layer_ids
    assert drafter.model.midlayer.self_attn.q_proj.in_features == 2 * drafter.config.hidden_size


# -- the loss ------------------------------------------------------------------------------------


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_soft_cross_entropy_equals_hand_computed_values():
    draft = [[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [1.0, -1.0, 0.0]]]
    target = [[[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]]
    valid = torch.tensor([[True, True, False]])
    weights = LossWeights(ce=0.0, tv=0.0, conf=0.0, soft=1.0, gamma_w=2.0)
    terms = dspark_loss(torch.tensor(draft), torch.tensor(target).softmax(-1), torch.zeros(1, 3, dtype=torch.long),
                        valid, None, weights)
    w = [1.0, math.exp(-1 / 2.0)]  # slot 3 is invalid
    soft = []
    for k in range(2):
        pd, pt = _softmax(draft[0][k]), _softmax(target[0][k])
        soft.append(-sum(t * math.log(d) for t, d in zip(pt, pd)))
    expected = (w[0] * soft[0] + w[1] * soft[1]) / sum(w)
    assert terms.soft.item() == pytest.approx(expected, rel=1e-6)
    assert terms.total.item() == pytest.approx(expected, rel=1e-6)  # no other term is weighted
    assert EAGLE3_WEIGHTS.soft == 1.0 and EAGLE3_WEIGHTS.ce == EAGLE3_WEIGHTS.tv == EAGLE3_WEIGHTS.conf == 0.0


def naive_chain_logits(model, feats: torch.Tensor, ids: list[int], anchor: int, gamma: int) -> list[torch.Tensor]:
    """Steps 1..γ at ``anchor`` with no cache and no mask: each step reruns the layer causally
    over [pairs 0..a; the chain so far], the chain entries holding the teacher-forced token and
    the previous step's own output. # -> γ × [N]"""
    n = anchor + 1
    emb = model.embed(torch.tensor(ids[:n]))  # [n, d]
    state = model.fuse(torch.cat([torch.zeros(1, feats.shape[-1]), feats[:anchor]]))  # pair j reads f_{j-1}
    out = []
    for k in range(gamma):
        length = emb.shape[0]
        h = model.step(emb[None], state[None], torch.arange(length)[None], cache=None, mask=None)[0, -1]
        out.append(model.logits(h))
        if anchor + k + 1 < len(ids):
            emb = torch.cat([emb, model.embed(torch.tensor([ids[anchor + k + 1]]))])
            state = torch.cat([state, h[None]])
    return out


def test_training_time_test_loss_equals_explicit_loops(target):
    # The γ-step unrolled loss through StepContext (the training path) against a per-anchor,
    # per-step loop: the naive chain above, p_t from the HF model's own logits, and the
    # weighted mean written out in Python floats.
    model = random_eagle3(target)
    g = torch.Generator().manual_seed(3)
    seqs = [TrainingSequence(torch.randint(0, V, (n,), generator=g).tolist(), [0] * 4 + [1] * (n - 4), str(i))
            for i, n in enumerate((14, 11))]
    batch = make_batch(seqs, [0, 1], anchors_per_sequence=4, step=0, seed=0)
    gamma_w = 4.0
    context = StepContext(target, OnlineFeatures(target, model.config.target_layer_ids), model.config,
                          EAGLE3_WEIGHTS, model.draft_ids, torch.device("cpu"), world=1)
    terms = context.loss(model, batch, all_reduce=False)

    num = den = 0.0
    with torch.no_grad():
        for b, seq in enumerate(seqs):
            ids, mask = seq.input_ids, seq.loss_mask
            feats = features_of(target, model, ids)
            p_all = target.model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)  # [S, V]
            for a in batch.anchors[b].tolist():
                if a < 0:
                    continue
                chain = naive_chain_logits(model, feats, ids, a, GAMMA)
                for k in range(GAMMA):
                    label = a + k + 1
                    if label >= len(ids) or not mask[label]:
                        continue
                    p_t = p_all[a + k][DRAFT_IDS].tolist()
                    log_pd = chain[k].log_softmax(-1).tolist()
                    w = math.exp(-k / gamma_w)
                    num += w * -sum(p * lq for p, lq in zip(p_t, log_pd))
                    den += w
    assert den > 0 and (batch.anchors >= 0).sum() >= 6
    assert terms.total.item() == pytest.approx(num / den, rel=1e-5)
    assert terms.soft.item() == pytest.approx(num / den, rel=1e-5)


# -- chain drafting = the unrolled training forward ----------------------------------------------------


@pytest.mark.parametrize("layer_family", ["llama", "qwen3"])
def test_chain_drafting_equals_the_unrolled_training_forward(target, layer_family):
    # Two rounds through the drafter's own KV cache (the second after a partial acceptance,
    # so the chain's K/V must be cropped and the real pairs folded), each compared with the
    # training forward on the committed + drafted tokens at that round's anchor. The qwen3
    # block (per-head q/k norms) runs the same path.
    model = random_eagle3(target, layer_family=layer_family)
    drafter = Eagle3Drafter(model)
    drafter.reset()
    committed = [4, 7, 1, 9, 2, 2, 13]
    seen = 0  # committed positions whose features the drafter has been given
    g = torch.Generator().manual_seed(0)
    for accept in (1, None):
        feats = features_of(target, model, committed)
        inp = DraftInput(torch.tensor(committed), feats[seen : len(committed) - 1], T1, g, max_tokens=GAMMA)
        block = drafter.propose(inp)
        seen = len(committed) - 1
        assert block.gamma == GAMMA and torch.allclose(block.q.sum(-1), torch.ones(GAMMA))
        full = committed + block.tokens.tolist()
        with torch.no_grad():
            out = model(features_of(target, model, full)[None], torch.tensor([full]), torch.tensor([[len(committed) - 1]]))
        oracle = model.expand_q(out.draft_logits[0, 0].softmax(-1))  # [γ, V]
        assert torch.allclose(block.q, oracle, atol=1e-5), (block.q - oracle).abs().max()
        assert bool((block.q[:, ~model.t2d] == 0).all())
        if accept is not None:  # x_1 accepted, a recovered token after it
            committed = committed + block.tokens[:accept].tolist() + [int(block.tokens[accept] + 1) % V]


def test_the_drafter_refuses_features_it_cannot_place(target):
    drafter = Eagle3Drafter(random_eagle3(target))
    feats = features_of(target, drafter.model, [1, 2, 3, 4])
    with pytest.raises(DsparkError, match="features of every committed token"):
        drafter.propose(DraftInput(torch.tensor([1, 2, 3, 4]), feats[:2], T1, None, max_tokens=3))


# -- greedy equality through both engines ----------------------------------------------------------------


def plain(target, prompt, n):
    return SpeculativeEngine(target, NoDrafter()).generate(GenerationRequest(prompt, SamplingParams(), max_new_tokens=n)).token_ids


@pytest.mark.parametrize("draft_ids", [None, DRAFT_IDS], ids=["full-vocab", "reduced-vocab"])
def test_greedy_output_equals_plain_decoding(target, draft_ids):
    prompts = [[3], [0, 1, 2, 3, 4, 5], [7, 7, 7, 7], [20, 2, 11, 5, 9]]
    want = [plain(target, p, 20) for p in prompts]
    engine = SpeculativeEngine(target, Eagle3Drafter(random_eagle3(target, draft_ids, std=0.05)))
    got = [engine.generate(GenerationRequest(p, SamplingParams(), max_new_tokens=20)) for p in prompts]
    assert [r.token_ids for r in got] == want
    assert sum(sum(r.stats.proposed) for r in got) > 0
    from dspark.scheduling import FixedGamma

    batched = BatchEngine(target, Eagle3Drafter(random_eagle3(target, draft_ids, std=0.05)), FixedGamma(), max_batch=3)
    results = batched.generate([GenerationRequest(p, SamplingParams(), max_new_tokens=20) for p in prompts]).results
    assert [r.token_ids for r in results] == want


def test_batched_drafter_equals_batch1_under_sampling(target):
    # Verifying whole blocks, a request consumes its random stream exactly as in batch 1, so
    # the batched drafter (slots, padded folds, one layer call per chain step) must give every
    # request the tokens the batch-1 drafter gives it, whatever else is in the batch.
    from dspark.drafters.eagle3.drafter import BatchedEagle3Drafter
    from dspark.drafters.factory import as_batch_drafter
    from dspark.scheduling import FixedGamma

    from dspark.drafters.online_confidence import MarginConfidence

    batched = as_batch_drafter(Eagle3Drafter(random_eagle3(target)))  # its own batched path, with margin confidences
    assert isinstance(batched, MarginConfidence) and isinstance(batched.inner, BatchedEagle3Drafter)
    nucleus = SamplingParams(temperature=0.7, top_k=8, top_p=0.9)
    prompts = [[3], [0, 1, 2, 3, 4, 5], [7, 7, 7, 7], [20, 2, 11, 5, 9], [1, 2], [6, 5, 4, 3, 2, 1, 0, 9, 8]]
    requests = [GenerationRequest(p, params, max_new_tokens=6 + 3 * i, seed=i)
                for i, p in enumerate(prompts) for params in (T1, nucleus, SamplingParams())]
    want = [SpeculativeEngine(target, Eagle3Drafter(random_eagle3(target))).generate(r).token_ids for r in requests]
    batched = BatchEngine(target, Eagle3Drafter(random_eagle3(target)), FixedGamma(), max_batch=5)
    results = batched.generate(requests).results
    assert [r.token_ids for r in results] == want
    assert sum(sum(r.stats.proposed) for r in results) > 0 and sum(sum(r.stats.accepted) for r in results) > 0


# -- checkpoints -------------------------------------------------------------------------------------------


def test_save_and_load_are_bit_exact(target, tmp_path):
    model = random_eagle3(target)
    model.save_pretrained(tmp_path / "e3")
    loaded = Eagle3Model.from_pretrained(tmp_path / "e3")
    assert loaded.config == model.config
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and {"d2t", "t2d", "fc.weight", "midlayer.hidden_norm.weight"} <= set(mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "e3" / "model.safetensors")).keys()
    assert not any("embed" in k or "lm_head" in k for k in keys)  # borrowed from the target, never saved
    config = json.loads((tmp_path / "e3" / "config.json").read_text())
    assert config["dspark_drafter"] == "eagle3" and config["draft_vocab_size"] == DRAFT_IDS.numel()
    # The same drafts from both, token for token and q for q.
    loaded.attach_target(target)
    feats = features_of(target, model, [1, 2, 3, 4, 5])
    blocks = []
    for m in (model, loaded):
        drafter = Eagle3Drafter(m)
        inp = DraftInput(torch.tensor([1, 2, 3, 4, 5]), feats[:4], T1, torch.Generator().manual_seed(1), max_tokens=GAMMA)
        blocks.append(drafter.propose(inp))
    assert torch.equal(blocks[0].tokens, blocks[1].tokens) and torch.equal(blocks[0].q, blocks[1].q)


def test_the_factory_tells_the_kinds_apart(target, tmp_path):
    from dspark.drafters import make_drafter

    random_eagle3(target).save_pretrained(tmp_path / "e3")
    assert isinstance(make_drafter(f"eagle3:{tmp_path / 'e3'}"), Eagle3Drafter)
    with pytest.raises(DsparkError, match="holds an EAGLE-3 drafter; use eagle3:"):
        make_drafter(f"dspark:{tmp_path / 'e3'}")
    with pytest.raises(DsparkError, match="eagle3 needs a checkpoint folder"):
        make_drafter("eagle3")
    from conftest import random_dspark_model

    random_dspark_model(target).save_pretrained(tmp_path / "ds")
    with pytest.raises(DsparkError, match="holds no EAGLE-3 drafter"):
        make_drafter(f"eagle3:{tmp_path / 'ds'}")


# -- training ------------------------------------------------------------------------------------------------


def test_eagle3_has_one_layer_and_the_variant_list_names_it(tmp_path):
    with pytest.raises(ValueError, match="num_layers must be 1"):
        TrainConfig(out_dir=str(tmp_path), variant="eagle3", num_layers=2)
    with pytest.raises(ValueError, match="variant must be dspark, dflash or eagle3"):
        TrainConfig(out_dir=str(tmp_path), variant="eagle4")


def test_training_lowers_the_loss_and_writes_a_drafter_the_factory_loads(tmp_path):
    from dspark.drafters import make_drafter

    # A peaked target (p_t's entropy, the floor of the soft CE, is low) and a repetitive
    # corpus, so that a few steps have something to learn.
    target = tiny_target(vocab_size=V, hidden=32, layers=6, scale=16.0)
    pattern = [3, 5, 8, 1, 13, 2, 21, 0]
    seqs = [TrainingSequence([9, 4, 6] + (pattern * 5)[i : i + 24], [0, 0, 0] + [1] * 24, str(i)) for i in range(8)]
    config = TrainConfig(out_dir=str(tmp_path / "run"), variant="eagle3", num_layers=1, steps=24, batch_size=4,
                         anchors_per_sequence=6, block_size=GAMMA, draft_vocab_size=12, lr=1e-2, save_every=12,
                         log_every=1, max_epochs=20, init_from_target=True)
    last = train(config, target, seqs, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    first, final = sum(e["loss"] for e in log[:4]) / 4, sum(e["loss"] for e in log[-4:]) / 4
    assert final < 0.75 * first, (first, final)
    assert log[-1]["tau_estimate"] > log[0]["tau_estimate"] + 0.3
    assert all(e["soft"] == pytest.approx(e["loss"]) for e in log)  # the only weighted term
    drafter = make_drafter(f"eagle3:{last}")
    assert isinstance(drafter, Eagle3Drafter) and drafter.model.config.num_draft_tokens == 12
    engine = SpeculativeEngine(target, drafter)
    result = engine.generate(GenerationRequest([9, 4, 6, 3, 5], SamplingParams(), max_new_tokens=12))
    assert result.token_ids == plain(target, [9, 4, 6, 3, 5], 12)


def test_warm_start_copies_an_eagle3_drafter_and_refuses_a_dspark_one(target, tmp_path):
    from conftest import random_dspark_model
    from dspark.training.checkpoints import warm_start

    source = random_eagle3(target)
    source.save_pretrained(tmp_path / "e3")
    fresh = Eagle3Model(source.config)
    fresh.set_draft_vocab(torch.tensor([0, 2, 4, 6, 7, 10, 12, 14, 15, 16, 18, 20]))
    warm_start(fresh, tmp_path / "e3")
    theirs = source.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in fresh.state_dict().items() if k not in ("d2t", "t2d"))
    assert not torch.equal(fresh.d2t, source.d2t)  # the run keeps the vocabulary it chose
    random_dspark_model(target).save_pretrained(tmp_path / "ds")
    with pytest.raises(DsparkError, match="not an EAGLE-3 drafter"):
        warm_start(fresh, tmp_path / "ds")


# -- the gemma3 family on a Gemma 3 target -------------------------------------------------------------


def test_the_family_follows_the_target(target, gemma):
    assert Eagle3Config.for_target(target).layer_family == "llama"
    assert Eagle3Config.for_target(tiny_target("qwen3", vocab_size=V, hidden=32, layers=6)).layer_family == "qwen3"
    config = Eagle3Config.for_target(gemma)
    assert config.layer_family == "gemma3" and config.final_logit_softcapping == GEMMA3_SOFTCAP
    assert config.query_pre_attn_scalar == 16 and config.hidden_act == "gelu_pytorch_tanh"
    assert config.rope_theta == gemma.model.config.rope_parameters["full_attention"]["rope_theta"]
    model = Eagle3Model(config)
    assert type(model.midlayer).__name__ == "Gemma3DecoderLayer" and model.hf_config.layer_types == ["full_attention"]
    assert Eagle3Config.for_target(gemma, layer_family="llama").layer_family == "llama"  # overridable


def test_gemma3_chain_drafting_equals_the_unrolled_training_forward(gemma):
    model = random_eagle3(gemma, layer_family=None)
    drafter = Eagle3Drafter(model)
    drafter.reset()
    committed = [4, 7, 1, 9, 2, 2, 13, 5, 20, 3]  # longer than the target's sliding window
    g = torch.Generator().manual_seed(0)
    block = drafter.propose(DraftInput(torch.tensor(committed), features_of(gemma, model, committed)[:-1], T1, g,
                                       max_tokens=GAMMA))
    full = committed + block.tokens.tolist()
    with torch.no_grad():
        out = model(features_of(gemma, model, full)[None], torch.tensor([full]), torch.tensor([[len(committed) - 1]]))
    assert torch.allclose(block.q, model.expand_q(out.draft_logits[0, 0].softmax(-1)), atol=1e-5)


@pytest.mark.parametrize("draft_ids", [None, DRAFT_IDS], ids=["full-vocab", "reduced-vocab"])
def test_gemma3_greedy_output_equals_plain_decoding(gemma, draft_ids):
    from dspark.scheduling import FixedGamma

    prompts = [[3], [0, 1, 2, 3, 4, 5], [7, 7, 7, 7], [20, 2, 11, 5, 9, 1, 1, 8]]
    want = [plain(gemma, p, 20) for p in prompts]
    drafter = Eagle3Drafter(random_eagle3(gemma, draft_ids, std=0.05, layer_family=None))
    assert drafter.config.layer_family == "gemma3"
    got = [SpeculativeEngine(gemma, drafter).generate(GenerationRequest(p, SamplingParams(), max_new_tokens=20))
           for p in prompts]
    assert [r.token_ids for r in got] == want
    assert sum(sum(r.stats.proposed) for r in got) > 0
    batched = BatchEngine(gemma, Eagle3Drafter(random_eagle3(gemma, draft_ids, std=0.05, layer_family=None)),
                          FixedGamma(), max_batch=3)
    results = batched.generate([GenerationRequest(p, SamplingParams(), max_new_tokens=20) for p in prompts]).results
    assert [r.token_ids for r in results] == want


def test_gemma3_drafter_embeds_tokens_scaled_by_sqrt_hidden(gemma):
    """Tokens enter the layer as sqrt(d) · E[x], as in the target, in drafting and in training."""
    model = random_eagle3(gemma, layer_family=None)
    seen = []
    hook = model.midlayer.input_layernorm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    ids = [4, 7, 1, 9, 2]
    feats = features_of(gemma, model, ids)
    drafter = Eagle3Drafter(model)
    drafter.reset()
    drafter.propose(DraftInput(torch.tensor(ids), feats[:-1], SamplingParams(), None, max_tokens=1))
    with torch.no_grad():
        model(feats[None], torch.tensor([ids]), torch.tensor([[2]]))
    hook.remove()
    table = gemma.model.get_input_embeddings().weight
    scaled = table[torch.tensor(ids)] * math.sqrt(32)
    assert not torch.allclose(scaled, table[torch.tensor(ids)], atol=1e-3)  # the scale matters
    assert torch.allclose(seen[0][0], scaled, atol=1e-6)  # the fold over the prompt's pairs
    assert torch.allclose(seen[1][0], scaled, atol=1e-6)  # training's step 1 over every pair


def test_gemma3_draft_logits_are_soft_capped_like_the_targets(gemma):
    """logits = cap · tanh(lm_head(norm(h)) / cap), in drafting (q at T = 1) and in training."""
    model = random_eagle3(gemma, draft_ids=None, layer_family=None)
    with torch.no_grad():
        model.norm.weight.fill_(20.0)  # large normed states, so the cap binds
    normed = []
    hook = model.norm.register_forward_hook(lambda m, args, out: normed.append(out.detach().clone()))
    ids = [4, 7, 1, 9, 2]
    feats = features_of(gemma, model, ids)
    drafter = Eagle3Drafter(model)
    drafter.reset()
    block = drafter.propose(DraftInput(torch.tensor(ids), feats[:-1], T1, torch.Generator().manual_seed(0), max_tokens=1))
    with torch.no_grad():
        train = model(feats[None], torch.tensor([ids]), torch.tensor([[2]])).draft_logits[0, 0]  # [γ, V]
    hook.remove()
    head, cap = gemma.model.get_output_embeddings().weight, GEMMA3_SOFTCAP
    raw = normed[0] @ head.T  # [V]
    assert raw.abs().max() > 2 * cap  # uncapped logits would differ a lot
    assert torch.allclose(block.q[0], torch.softmax(cap * torch.tanh(raw / cap), -1), atol=1e-5)
    assert torch.allclose(train, cap * torch.tanh(normed[-1][0, 0] @ head.T / cap), atol=1e-5)


def test_gemma3_save_and_load_are_bit_exact(gemma, tmp_path):
    model = random_eagle3(gemma, layer_family=None)
    model.save_pretrained(tmp_path / "e3")
    config = json.loads((tmp_path / "e3" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLMEagle3"] and config["model_type"] == "gemma3"
    assert config["final_logit_softcapping"] == GEMMA3_SOFTCAP and config["hidden_activation"] == "gelu_pytorch_tanh"
    loaded = Eagle3Model.from_pretrained(tmp_path / "e3")
    assert loaded.config == model.config and loaded.config.extra == {}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_cross_family_warm_start_keeps_each_norms_scale(gemma):
    """A llama layer on a Gemma target copies the projections only; its norms (scale w) take
    the Gemma norms' scale (1 + w)."""
    model = Eagle3Model(Eagle3Config.for_target(gemma, layer_family="llama"))
    model.init_from_target(gemma)
    last, decoder = gemma.model.get_decoder().layers[-1], gemma.model.get_decoder()
    assert torch.equal(model.midlayer.mlp.down_proj.weight, last.mlp.down_proj.weight)
    assert torch.equal(model.midlayer.self_attn.o_proj.weight, last.self_attn.o_proj.weight)
    assert torch.equal(model.midlayer.hidden_norm.weight, 1 + last.input_layernorm.weight)
    assert torch.equal(model.norm.weight, 1 + decoder.norm.weight)
    # Llama's post_attention_layernorm sits where Gemma's pre_feedforward one does: left alone.
    assert torch.equal(model.midlayer.post_attention_layernorm.weight, torch.ones(32))


def test_config_and_weights_are_checked_before_anything_is_built(target, tmp_path):
    random_eagle3(target).save_pretrained(tmp_path / "e3")
    path = tmp_path / "e3" / "config.json"
    good = json.loads(path.read_text())
    for changes, message in (({"num_hidden_layers": 3}, "num_hidden_layers must be 1"),
                             ({"num_attention_heads": 0}, "num_attention_heads must be > 0"),
                             ({"hidden_size": "32"}, "hidden_size must be an integer"),
                             ({"intermediate_size": 4096}, r"size mismatch for midlayer\.mlp\.down_proj\.weight")):
        path.write_text(json.dumps({**good, **changes}))
        with pytest.raises(DsparkError, match=message):
            Eagle3Model.from_pretrained(tmp_path / "e3")


def test_non_finite_weights_are_refused_naming_the_tensor(target, tmp_path):
    from safetensors.torch import load_file, save_file

    random_eagle3(target).save_pretrained(tmp_path / "e3")
    weights = tmp_path / "e3" / "model.safetensors"
    state = load_file(str(weights))
    state["fc.weight"][0, 0] = float("inf")
    save_file(state, str(weights))
    with pytest.raises(DsparkError, match=rf"{weights}: tensor fc\.weight holds NaN or inf"):
        Eagle3Model.from_pretrained(tmp_path / "e3")
