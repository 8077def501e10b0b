"""The speculators export, loaded and run by speculators' own code (vllm-project/speculators 0.9.0).

What is checked against speculators itself: ``SpeculatorModel.from_pretrained`` reads the
folder with nothing missing, unexpected or newly initialised (every tensor of its model is
the folder's or the verifier's), and its ``DSparkDraftModel`` forward gives our draft logits
(after the Markov bias) and confidence logits on the same target features and blocks.
file:line citations are of the speculators 0.9.0 wheel.

``import speculators`` reaches its training data loader, which imports ``datasets`` (with
pyarrow and pandas) for ``load_from_disk`` alone (``speculators/train/data.py:10``); no model
code calls it. Where ``datasets`` is not installed, a stand-in module serves that one import.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_dspark_model, tiny_gemma3, tiny_qwen3
from dspark.drafters.dspark import DSparkModel
from dspark.drafters.dspark.interop import export_speculators
from dspark.errors import DsparkError
from dspark.target import TargetModel

GAMMA = 4
DRAFT_VOCAB = 20
SEQ = 14
VOCABS = ("full", "reduced", "reduced-draft-w1")


@pytest.fixture(scope="module")
def spec():
    """speculators' classes, or a skip where it is not installed."""
    if importlib.util.find_spec("speculators") is None:
        pytest.skip("speculators is not installed (make setup installs speculators==0.9.0 with --no-deps)")
    stand_in = importlib.util.find_spec("datasets") is None
    if stand_in:
        sys.modules["datasets"] = types.ModuleType("datasets")
        sys.modules["datasets"].load_from_disk = None
    try:
        import speculators.utils.loading  # noqa: F401  (loguru: from_pretrained reads the verifier through it)
        from speculators.model import SpeculatorModel
        from speculators.models.dspark import DSparkDraftModel, DSparkSpeculatorConfig, core
    except ImportError as exc:
        pytest.skip(f"speculators cannot be imported ({exc}); make setup installs it with hs-connectors and loguru")
    finally:
        if stand_in:
            del sys.modules["datasets"]
    return types.SimpleNamespace(SpeculatorModel=SpeculatorModel, DSparkDraftModel=DSparkDraftModel,
                                 Config=DSparkSpeculatorConfig, core=core)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny Qwen3 target saved as a Hugging Face folder, which its name points to: speculators
    reloads the verifier's embedding, LM head and final norm from there (model.py:127-202)."""
    folder = tmp_path_factory.mktemp("target")
    model = tiny_qwen3(vocab_size=32, hidden=32, layers=6, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.save_pretrained(folder)
    return TargetModel(model, tokenizer=None, name=str(folder))


def make_model(target, vocab: str = "full", seed: int = 1, **overrides) -> DSparkModel:
    """A random DSpark drafter (Qwen3 backbone); a reduced one drafts over 20 scattered tokens."""
    values = dict(num_hidden_layers=2, markov_rank=8, block_size=GAMMA, mask_token_id=31)
    if vocab != "full":
        values.update(draft_vocab_size=DRAFT_VOCAB, markov_w1_vocab="draft" if vocab == "reduced-draft-w1" else "target")
    model = random_dspark_model(target, seed, **{**values, **overrides})
    if model.config.reduced_vocab:
        model.set_draft_vocab(torch.randperm(32, generator=torch.Generator().manual_seed(seed))[:DRAFT_VOCAB].sort().values)
    return model


def load_speculators(spec, folder: Path):
    """speculators' model over ``folder`` through its own ``from_pretrained``, on eager attention:
    its default flex attention builds block masks with torch.compile (dflash/core.py:35, :82-88)."""
    config = spec.Config.from_pretrained(folder)
    config.transformer_layer_config._attn_implementation = "eager"  # read at dflash/core.py:77 and model_definitions.py:135
    model = spec.SpeculatorModel.from_pretrained(folder, config=config)  # resolves the class by config (model.py:359-379)
    assert type(model) is spec.DSparkDraftModel
    return model.eval()


def verifier_tensors(target, model: DSparkModel) -> dict[str, torch.Tensor]:
    """What speculators takes from the verifier (model.py:165-202): the embedding, the final norm,
    and the LM head's rows of the draft tokens (as lm_head too, for a full vocabulary)."""
    head = target.model.get_output_embeddings().weight
    rows = head[model.draft_ids] if model.config.reduced_vocab else head
    return {"embed_tokens.weight": target.model.get_input_embeddings().weight, "verifier_lm_head.weight": rows,
            "verifier_norm.weight": target.model.model.norm.weight, "lm_head.weight": rows}


def speculators_forward(spec, model, target, ids: torch.Tensor, monkeypatch, shift: int = 0):
    """Draft logits # [1, n, γ, N] and confidence logits # [1, n, γ] of speculators' own forward
    (dspark/core.py:121-212) for the blocks at anchors 1..n, taken where it hands them to its loss (:198).

    Its features are the verifier's ``hidden_states[i]`` for i in ``aux_hidden_state_layer_ids``
    (their meaning, convert/dflash/converter.py:117-126); ``shift`` moves them, to show the test sees it.
    Anchors: select_anchors takes min(max_anchors, valid) of the valid positions, sorted
    (dflash/utils.py:44-65), so with every valid position asked for they are exactly 1..n.
    """
    seen = {}
    real = spec.core.compute_metrics

    def capture(logits, targets, confidence_logits, *args, **kwargs):
        seen.update(logits=logits, confidence=confidence_logits)
        return real(logits, targets, confidence_logits, *args, **kwargs)

    monkeypatch.setattr(spec.core, "compute_metrics", capture)
    with torch.no_grad():
        hidden = target.model(input_ids=ids, output_hidden_states=True).hidden_states
    features = torch.cat([hidden[i + shift] for i in model.config.aux_hidden_state_layer_ids], dim=-1)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, 0] = 0  # anchor 0 would have no context
    n = SEQ - GAMMA - 1
    _, kwargs = spec.DSparkDraftModel.get_trainer_kwargs(loss_fn="kl_div", loss_implementation="eager")  # fused needs Triton
    with torch.no_grad():
        model(hidden_states=features, input_ids=ids, loss_mask=loss_mask, verifier_last_hidden_states=hidden[-1],
              document_ids=torch.zeros_like(ids), **{**kwargs, "max_anchors": n})
    return seen["logits"].view(1, n, GAMMA, -1), seen["confidence"].view(1, n, GAMMA)


# -- speculators loads the export and computes what we do ----------------------------------------
@pytest.mark.parametrize("vocab", VOCABS)
def test_speculators_loads_the_export_whole_and_drafts_as_we_do(spec, target, tmp_path, monkeypatch, vocab):
    model = make_model(target, vocab)
    export_speculators(model, tmp_path / "out", target, dtype=torch.float32)

    # Nothing missing, unexpected or mismatched for transformers' loader under speculators' rules
    # (dflash/core.py:43-57, :153-164; with output_loading_info it stops before the verifier's tensors).
    _, info = spec.DSparkDraftModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    # Nothing newly initialised: every tensor of the loaded model is the folder's or the verifier's.
    theirs = load_speculators(spec, tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = {**verifier_tensors(target, model), **written}
    assert set(theirs.state_dict()) == set(expected)
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert "embed_tokens.weight" not in written and ("lm_head.weight" in written) == model.config.reduced_vocab

    c = theirs.config
    assert c.aux_hidden_state_layer_ids == [k + 1 for k in model.config.target_layer_ids]
    assert c.sample_from_anchor and c.speculators_config.proposal_methods[0].speculative_tokens == GAMMA
    assert c.speculators_config.verifier.name_or_path == str(Path(target.name).resolve())
    assert c.speculators_config.verifier.architectures == ["Qwen3ForCausalLM"]

    ids = torch.randint(0, 32, (1, SEQ), generator=torch.Generator().manual_seed(3))
    logits, confidence = speculators_forward(spec, theirs, target, ids, monkeypatch)
    model.attach_target(target)
    anchors = torch.arange(1, SEQ - GAMMA).unsqueeze(0)
    with torch.no_grad():
        ours = model(target.forward(ids, layer_ids=model.config.target_layer_ids).features, ids, anchors)
    torch.testing.assert_close(logits, ours.draft_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(confidence, ours.confidence_logits, rtol=0, atol=1e-5)
    # The comparison sees the layer ids: speculators reading the layers one lower drafts otherwise.
    shifted, _ = speculators_forward(spec, theirs, target, ids, monkeypatch, shift=-1)
    assert (shifted - ours.draft_logits).abs().max() > 1e-2


def test_a_bfloat16_export_loads_in_bfloat16(spec, target, tmp_path):
    model = make_model(target, "reduced")
    report = export_speculators(model, tmp_path / "out", target)
    assert report.dtype == "bfloat16"
    theirs = spec.DSparkDraftModel.from_pretrained(tmp_path / "out", dtype="auto")  # reads our "dtype" field
    state = theirs.state_dict()
    assert state["fc.weight"].dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value.bfloat16() if value.is_floating_point() else value), key


def test_a_reduced_vocabularys_own_head_rows_are_kept(spec, target, tmp_path):
    # speculators loads lm_head from the verifier only where the checkpoint has none (model.py:182).
    model = make_model(target, "reduced")
    own = torch.randn(DRAFT_VOCAB, 32, generator=torch.Generator().manual_seed(5))
    model.carry(lm_head=own)
    report = export_speculators(model, tmp_path / "out", target, dtype=torch.float32)
    assert "lm_head.weight differs from the target's rows: speculators uses the drafter's own" in report.notes
    assert torch.equal(load_speculators(spec, tmp_path / "out").lm_head.weight, own)


# -- refusals: one line, nothing written ---------------------------------------------------------
def _refused(model, target, out: Path, match: str) -> None:
    with pytest.raises(DsparkError, match=match) as caught:
        export_speculators(model, out, target)
    assert "\n" not in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize("overrides, message", [
    ({"layer_family": "llama"}, "cannot export for speculators: .* backbone is llama"),
    ({"markov_rank": 0, "enable_confidence_head": False}, "requires markov_rank > 0"),
])
def test_what_speculators_cannot_serve_is_refused(target, tmp_path, overrides, message):
    _refused(make_model(target, **overrides), target, tmp_path / "out", message)


def test_a_copy_speculators_would_replace_by_the_verifiers_is_refused(target, tmp_path):
    g = torch.Generator().manual_seed(4)
    model = make_model(target)
    model.carry(embed_tokens=torch.randn(32, 32, generator=g))
    _refused(model, target, tmp_path / "embed", "always loads embed_tokens.weight from the verifier")
    model = make_model(target)  # a full vocabulary's head is the verifier's too (dflash/core.py:171-176)
    model.carry(lm_head=torch.randn(32, 32, generator=g))
    _refused(model, target, tmp_path / "head", "always loads lm_head.weight from the verifier")


def test_a_target_speculators_cannot_find_or_embed_like_is_refused(target, tmp_path):
    nameless = TargetModel(target.model, tokenizer=None, name="tiny")
    _refused(make_model(target), nameless, tmp_path / "nameless", "target 'tiny' is not a folder, .gguf or Hugging Face id")
    gemma = TargetModel(tiny_gemma3(vocab_size=32, hidden=32, layers=6, softcap=None), tokenizer=None, name="tiny-gemma3")
    _refused(make_model(gemma, hidden_act="silu"), gemma, tmp_path / "gemma", "scales its embedding by 5.65685")


# -- the command line ----------------------------------------------------------------------------
def test_convert_export_command_writes_what_speculators_reads(spec, target, tmp_path):
    from typer.testing import CliRunner

    from dspark.cli.main import app

    make_model(target, "reduced").save_pretrained(tmp_path / "drafter")
    args = ["convert", "export", str(tmp_path / "drafter"), str(tmp_path / "out"), "--engine", "speculators",
            "--model", target.name]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"DSparkDraftModel.from_pretrained('{tmp_path / 'out'}')" in result.stdout
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["speculators_model_type"] == "dspark" and cfg["draft_vocab_size"] == DRAFT_VOCAB
    assert spec.Config.from_pretrained(tmp_path / "out").transformer_layer_config.num_hidden_layers == 2
    make_model(target, layer_family="llama").save_pretrained(tmp_path / "llama")
    refused = CliRunner().invoke(app, [*args[:2], str(tmp_path / "llama"), str(tmp_path / "out2"), *args[4:]])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert refused.output.startswith("error: cannot export for speculators: it serves Qwen3-style DSpark drafters")
    assert not (tmp_path / "out2").exists()
