"""Drafter layer families on tiny random-init targets of each family: Llama, Qwen3, Gemma 3.

For each family: the TargetModel adapter against HF's own forward (features of chosen layers,
KV cache rollback), a DSpark drafter of that family with a reduced draft vocabulary (shapes,
warm start), greedy output equal to plain decoding, save/load bit-exact, and the exact
chi-square losslessness check of tests/test_lossless.py for Qwen3 and Gemma 3. Gemma's
scaled embedding and final-logit soft cap are checked where the drafter applies them.

The tiny Gemma 3 has a sliding window of 4 positions, shorter than every prompt here, so its
local layers really mask and its cache really trims.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import GEMMA3_SOFTCAP, random_dspark_model, tiny_target
from dspark.drafters.base import DraftInput, NoDrafter
from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel
from dspark.drafters.dspark.interop import export_vllm
from dspark.drafters.families import family_of
from dspark.engine import BatchEngine, GenerationRequest, SpeculativeEngine
from dspark.errors import DsparkError
from dspark.sampling import SamplingParams
from dspark.scheduling import FixedGamma
from stats_helpers import ALPHA, chisquare_gof
from test_lossless import N_RUNS, NEW_TOKENS, PROMPT, T1, exact_target_distribution, sample_engine

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("llama", "qwen3", "gemma3")
LAYER_CLASS = {"llama": "LlamaDecoderLayer", "qwen3": "Qwen3DecoderLayer", "gemma3": "Gemma3DecoderLayer"}
V, GAMMA = 32, 3
DRAFT_IDS = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21, 30, 31])  # the mask token 31 among them
GREEDY = SamplingParams(temperature=0.0)
IDS = [(7 * i + 3) % V for i in range(14)]  # a prompt longer than the Gemma window


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def target(family):
    return tiny_target(family, vocab_size=V, hidden=32, layers=6, seed=0, scale=4.0)


def make_model(target, seed=1, reduced=True, **overrides) -> DSparkModel:
    """A drafter with a backbone of the target's own family (qwen3 is only the default)."""
    values = dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  intermediate_size=64, markov_rank=4, block_size=GAMMA, mask_token_id=V - 1,
                  layer_family=family_of(target.model.config.model_type, "qwen3"))
    if reduced:
        values["draft_vocab_size"] = DRAFT_IDS.numel()
    model = random_dspark_model(target, seed, **{**values, **overrides})
    if reduced:
        model.set_draft_vocab(DRAFT_IDS)
    model.attach_target(target)
    return model


# -- the target adapter --------------------------------------------------------------------------
def test_adapter_features_are_hf_hidden_states(target):
    ids = torch.tensor([IDS])
    layers = (0, 2, 4)
    out = target.forward(ids, layer_ids=layers)
    with torch.inference_mode():
        ref = target.model(input_ids=ids, output_hidden_states=True)
    assert out.features.shape == (1, len(IDS), 3 * 32)
    assert torch.equal(out.features, torch.cat([ref.hidden_states[k + 1] for k in layers], dim=-1))
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)


def test_adapter_rollback_matches_an_uncached_forward(target):
    """Rounds of verify-then-roll-back past the sliding window give the uncached logits."""
    cache = target.new_cache()
    committed = IDS[:8]
    target.forward(torch.tensor([committed[:-1]]), cache)
    g = torch.Generator().manual_seed(0)
    for keep in (0, 2, 3, 1, 0, 3):  # accepted draft tokens per round
        block = torch.randint(0, V, (3,), generator=g).tolist()
        feed = [committed[-1]] + block
        got = target.forward(torch.tensor([feed]), cache, layer_ids=(1,))
        with torch.inference_mode():
            ref = target.model(input_ids=torch.tensor([committed[:-1] + feed]), output_hidden_states=True)
        assert torch.allclose(got.logits[0], ref.logits[0, -len(feed):], atol=1e-5)
        assert torch.allclose(got.features[0], ref.hidden_states[2][0, -len(feed):], atol=1e-5)
        committed = committed + block[:keep] + [int(torch.randint(0, V, (1,), generator=g))]
        target.rollback(cache, len(committed) - 1)
        assert target.cache_length(cache) == len(committed) - 1


# -- drafter shapes --------------------------------------------------------------------------------
def test_backbone_is_qwen3_by_default_and_builds_each_familys_layers_on_request(target, family):
    assert DSparkConfig.for_target(target).layer_family == "qwen3"  # the family every engine serves
    model = make_model(target)
    assert model.config.layer_family == family
    assert {type(layer).__name__ for layer in model.layers} == {LAYER_CLASS[family]}
    assert type(model.norm).__name__ == LAYER_CLASS[family].replace("DecoderLayer", "RMSNorm")
    if family == "gemma3":
        assert model.hf_config.layer_types == ["full_attention"] * 2  # no window over the context
        assert model.config.rope_theta == target.model.config.rope_parameters["full_attention"]["rope_theta"]
        assert model.config.hidden_act == "gelu_pytorch_tanh"
        assert model.config.final_logit_softcapping == GEMMA3_SOFTCAP
    other = "llama" if family != "llama" else "gemma3"
    assert make_model(target, layer_family=other).config.layer_family == other  # overridable


def test_finish_layer_is_the_family_layers_own_forward_after_attention(target, family):
    """FamilyBlocks.finish_layer (EAGLE-3 runs the layer's attention on its own 2d-wide
    input) against the HF decoder layer's forward, gemma3's sandwich norms included."""
    from dspark.drafters.families import family_blocks

    config = DSparkConfig.for_target(target, num_hidden_layers=1)
    blocks = family_blocks(config, 1, "sdpa")
    torch.manual_seed(0)
    layer = blocks.layer(blocks.hf_config, 0).eval()
    with torch.no_grad():
        for weight in layer.parameters():
            weight.normal_(std=0.3)  # random norms too (Gemma's start at the identity)
    x = torch.randn(1, 5, config.hidden_size)
    rope = blocks.rotary(config=blocks.hf_config)(x, torch.arange(5).unsqueeze(0))
    with torch.no_grad():
        attn, _ = layer.self_attn(layer.input_layernorm(x), position_embeddings=rope, attention_mask=None)
        assert torch.allclose(blocks.finish_layer(layer, x, attn), layer(x, position_embeddings=rope), atol=1e-6)

def test_drafter_shapes_with_a_reduced_vocabulary(target):
    model = make_model(target)
    feats = target.forward(torch.tensor([IDS]), layer_ids=model.config.target_layer_ids).features
    anchors = torch.tensor([[3, 6, 9]])
    out = model(feats, torch.tensor([IDS]), anchors)
    assert out.draft_logits.shape == (1, 3, GAMMA, DRAFT_IDS.numel())
    assert out.confidence_logits.shape == (1, 3, GAMMA)
    drafter = DSparkDrafter(model)
    drafter.reset()
    block = drafter.propose(DraftInput(torch.tensor(IDS), feats[0, :-1], T1, torch.Generator().manual_seed(0), 8))
    assert block.tokens.shape == (GAMMA,) and block.q.shape == (GAMMA, V) and block.confidences.shape == (GAMMA,)
    assert set(block.tokens.tolist()) <= set(DRAFT_IDS.tolist())
    outside = torch.ones(V, dtype=torch.bool)
    outside[DRAFT_IDS] = False
    assert torch.all(block.q[:, outside] == 0) and torch.allclose(block.q.sum(-1), torch.ones(GAMMA))


def test_warm_start_copies_the_targets_top_layers(target, family):
    model = make_model(target)
    model.init_from_target(target)
    top = target.model.get_decoder().layers[-1].state_dict()
    for key, value in model.layers[-1].state_dict().items():
        if key in top and top[key].shape == value.shape:
            assert torch.equal(value, top[key]), key
    assert torch.equal(model.norm.weight, target.model.get_decoder().norm.weight)


def test_cross_family_warm_start_keeps_each_norms_scale(target, family):
    """A backbone of another norm convention starts with the same effective norm scales."""
    other = "llama" if family == "gemma3" else "gemma3"
    model = make_model(target, layer_family=other)
    model.init_from_target(target)
    x = torch.randn(2, 32)
    assert torch.allclose(model.norm(x), target.model.get_decoder().norm(x), atol=1e-5)
    mine, theirs = model.layers[0].self_attn.q_proj.weight, target.model.get_decoder().layers[-2].self_attn.q_proj.weight
    if mine.shape == theirs.shape:
        assert torch.equal(mine, theirs)


# -- greedy equality -------------------------------------------------------------------------------
def _greedy(engine, prompt, n=24):
    return engine.generate(GenerationRequest(prompt, GREEDY, max_new_tokens=n, seed=0))


@pytest.mark.parametrize("warm", [False, True], ids=["random", "warm-start"])
def test_greedy_output_equals_plain_decoding(target, warm):
    model = make_model(target)
    if warm:
        model.init_from_target(target)  # drafts the target often gets right: long accepted runs
    plain = _greedy(SpeculativeEngine(target, NoDrafter()), IDS)
    spec = _greedy(SpeculativeEngine(target, DSparkDrafter(model)), IDS)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.rounds < len(plain.token_ids)  # it speculated
    reference = target.model.generate(torch.tensor([IDS]), max_new_tokens=24, do_sample=False)
    assert plain.token_ids == reference[0, len(IDS):].tolist()


def test_batched_greedy_output_equals_plain_decoding(target):
    prompts = [IDS, IDS[3:], IDS[:9] + IDS[:9]]
    requests = [GenerationRequest(p, GREEDY, max_new_tokens=16, seed=i) for i, p in enumerate(prompts)]
    got = BatchEngine(target, DSparkDrafter(make_model(target)), FixedGamma(), max_batch=3).generate(requests).results
    plain = SpeculativeEngine(target, NoDrafter())
    for request, result in zip(requests, got):
        assert result.token_ids == _greedy(plain, request.prompt_ids, 16).token_ids


# -- losslessness (exact enumeration + chi-square, as tests/test_lossless.py) ----------------------
@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_sampled_output_is_target_distributed(name):
    """Passes a correct sampler with probability 1 - ALPHA (1e-3) per family over the seeds."""
    lossless_target = tiny_target(name, vocab_size=6, hidden=16, layers=3, seed=0, scale=8.0)
    torch.manual_seed(11)
    config = DSparkConfig.for_target(lossless_target, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=8, intermediate_size=32, markov_rank=4, block_size=3,
                                     draft_vocab_size=4)
    model = DSparkModel(config).eval()
    model.set_draft_vocab(torch.tensor([0, 1, 3, 4]))
    with torch.no_grad():
        model.markov_head.markov_w2.weight.normal_(std=2.0)
    sampled = sample_engine(lossless_target, DSparkDrafter(model), T1)
    fit = chisquare_gof(sampled.counts, exact_target_distribution(lossless_target, PROMPT, T1, NEW_TOKENS))
    assert fit.cells >= 20, fit
    assert sampled.proposed >= N_RUNS and 0 < sampled.accepted < sampled.proposed, sampled
    assert not fit.rejected, (fit, ALPHA)


# -- checkpoints -----------------------------------------------------------------------------------
def test_save_load_is_bit_exact(target, family, tmp_path):
    model = make_model(target)
    model.save_pretrained(tmp_path / "d")
    loaded = DSparkModel.from_pretrained(tmp_path / "d")
    assert loaded.config == model.config and loaded.config.layer_family == family
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    loaded.attach_target(target)
    feats = target.forward(torch.tensor([IDS]), layer_ids=model.config.target_layer_ids).features
    blocks = []
    for m in (model, loaded):
        drafter = DSparkDrafter(m)
        drafter.reset()
        blocks.append(drafter.propose(DraftInput(torch.tensor(IDS), feats[0, :-1], T1, torch.Generator().manual_seed(3), 8)))
    assert torch.equal(blocks[0].tokens, blocks[1].tokens) and torch.equal(blocks[0].q, blocks[1].q)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["model_type"] == family
    if family == "gemma3":
        assert cfg["architectures"] == ["Gemma3DSparkModel"]
        assert cfg["final_logit_softcapping"] == GEMMA3_SOFTCAP and cfg["hidden_activation"] == "gelu_pytorch_tanh"


# -- Gemma: scaled embedding, soft cap --------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma():
    return tiny_target("gemma3", vocab_size=V, hidden=32, layers=6, seed=0, scale=4.0)


def _layer_inputs(model):
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen, hook


def test_gemma_drafter_embeds_tokens_scaled_by_sqrt_hidden(gemma):
    """Anchor and mask slots enter the backbone as sqrt(d) · E[x], as in the target, in
    drafting and in training, with the target's table or a carried copy of it."""
    model = make_model(gemma)
    table = gemma.model.get_input_embeddings().weight
    feats = gemma.forward(torch.tensor([IDS]), layer_ids=model.config.target_layer_ids).features
    seen, hook = _layer_inputs(model)
    drafter = DSparkDrafter(model)
    drafter.reset()
    drafter.propose(DraftInput(torch.tensor(IDS), feats[0, :-1], GREEDY, None, 8))
    model(feats, torch.tensor([IDS]), torch.tensor([[5]]))
    carried = table.clone() * 0.5  # a carried copy that differs, so it is used instead of the target's
    model.carry(embed_tokens=carried)
    model.attach_target(gemma)
    model(feats, torch.tensor([IDS]), torch.tensor([[5]]))
    hook.remove()
    scale = math.sqrt(32)
    drafted = torch.tensor([IDS[-1]] + [V - 1] * (GAMMA - 1))
    assert torch.allclose(seen[0][0], table[drafted] * scale, atol=1e-6)
    trained = torch.tensor([IDS[5]] + [V - 1] * (GAMMA - 1))
    assert torch.allclose(seen[1][0], table[trained] * scale, atol=1e-6)
    assert torch.allclose(seen[2][0], carried[trained] * scale, atol=1e-6)


def test_gemma_draft_logits_are_soft_capped_like_the_targets(gemma):
    """U_k = cap · tanh(lm_head(h_k) / cap), in drafting (q at T = 1) and in training."""
    model = make_model(gemma, reduced=False, markov_rank=0, enable_confidence_head=False)
    with torch.no_grad():
        model.norm.weight.fill_(20.0)  # large h_k, so the cap binds
    head = gemma.model.get_output_embeddings().weight  # [V, d]
    hidden = []
    hook = model.norm.register_forward_hook(lambda module, args, out: hidden.append(out.detach().clone()))
    feats = gemma.forward(torch.tensor([IDS]), layer_ids=model.config.target_layer_ids).features
    drafter = DSparkDrafter(model)
    drafter.reset()
    block = drafter.propose(DraftInput(torch.tensor(IDS), feats[0, :-1], T1, torch.Generator().manual_seed(0), 8))
    train = model(feats, torch.tensor([IDS]), torch.tensor([[5]])).draft_logits[0, 0]  # [γ, V]
    hook.remove()
    cap = GEMMA3_SOFTCAP
    raw = hidden[0][0] @ head.T  # [γ, V]
    assert raw.abs().max() > 2 * cap  # uncapped logits would differ a lot
    assert torch.allclose(block.q, torch.softmax(cap * torch.tanh(raw / cap), -1), atol=1e-5)
    raw_train = hidden[1][0] @ head.T
    assert torch.allclose(train, cap * torch.tanh(raw_train / cap), atol=1e-5)
    # The target caps the same way: its logits are the capped lm_head of its final state.
    out = gemma.forward(torch.tensor([IDS]), return_last_hidden=True)
    assert torch.allclose(out.logits, cap * torch.tanh(out.last_hidden @ head.T / cap), atol=1e-5)


# -- export and training -----------------------------------------------------------------------------
def test_export_refuses_a_gemma3_drafter_in_one_line(gemma, tmp_path):
    model = make_model(gemma)
    with pytest.raises(DsparkError, match="serves Qwen3-style DSpark drafters .* backbone is gemma3"):
        export_vllm(model, tmp_path / "out", gemma)
    assert not (tmp_path / "out").exists()
    from typer.testing import CliRunner

    from dspark.cli.main import app

    model.save_pretrained(tmp_path / "drafter")
    result = CliRunner().invoke(app, ["convert", "export", str(tmp_path / "drafter"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "backbone is gemma3" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    # A qwen3 backbone over a soft-capping target: the engines would not cap its logits.
    with pytest.raises(DsparkError, match="does not soft-cap draft logits"):
        export_vllm(make_model(gemma, layer_family="qwen3"), tmp_path / "out", gemma)
    assert not (tmp_path / "out").exists()


def test_train_layer_family_is_recorded_and_a_resume_with_another_is_refused(gemma, tmp_path):
    from test_training import small_config, synthetic_sequences
    from dspark.training.trainer import train

    seqs = synthetic_sequences(n=6, vocab=V - 1)
    folder = train(small_config(tmp_path / "run", steps=2, save_every=2, layer_family="llama"), gemma, seqs, progress=False)
    assert DSparkModel.from_pretrained(folder).config.layer_family == "llama"
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["layer_family"] == "llama"
    with pytest.raises(DsparkError, match="layer_family 'llama' there, 'gemma3' now"):
        train(small_config(tmp_path / "run", steps=4, save_every=2, layer_family="gemma3"), gemma, seqs, progress=False)
    folder = train(small_config(tmp_path / "default", steps=2, save_every=2), gemma, seqs, progress=False)
    assert DSparkModel.from_pretrained(folder).config.layer_family == "qwen3"  # the default for every target


def test_train_command_refuses_an_unknown_layer_family_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from dspark.cli.main import app

    args = ["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "run"), "--layer-family", "mistral"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --layer-family must be one of qwen3, llama, gemma3, got 'mistral'"
