"""Checkpoint interop on tiny random configs: DeepSpec checkpoints in, vLLM / SGLang drafters out.

The DeepSpec checkpoints here are synthetic: a tiny Qwen3-family DSparkModel written in the
authors' layout (their config.json fields, bf16 tensors, embed_tokens/lm_head copies of the
target's). The oracle for an import is the same weights loaded natively; for an export,
the tensors and fields it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_dspark_model, tiny_target
from dspark.drafters import make_drafter
from dspark.drafters.base import DraftInput
from dspark.drafters.dspark import DSparkDrafter, DSparkModel
from dspark.drafters.dspark.interop import export_vllm, import_deepspec
from dspark.errors import DsparkError, IncompatibleDrafterError
from dspark.sampling import SamplingParams

GAMMA = 4
DRAFT_VOCAB = 20


@pytest.fixture(scope="module")
def target():
    """A tiny target whose weights are bf16 values, as a bf16 hub checkpoint's are."""
    t = tiny_target(vocab_size=32, hidden=32, layers=6, seed=0)
    with torch.no_grad():
        for p in t.model.parameters():
            p.copy_(p.bfloat16().float())
    return t


def make_model(target, seed=1, **overrides) -> DSparkModel:
    values = dict(num_hidden_layers=2, markov_rank=8, block_size=GAMMA, mask_token_id=31, layer_family="qwen3")
    model = random_dspark_model(target, seed, **{**values, **overrides})
    if model.config.reduced_vocab:
        model.set_draft_vocab(torch.arange(3, 3 + DRAFT_VOCAB))
    return model


def write_deepspec(model: DSparkModel, target, folder: Path, shards: int = 1, embed=None, head=None) -> dict:
    """``model`` as DeepSpec's trainer writes it: the target's config plus the DSpark fields,
    bf16 tensors with top-level keys, embed_tokens and lm_head (the target's, frozen) included."""
    folder.mkdir(parents=True)
    cfg = model.config.to_json_dict()
    for ours in ("dspark_target_name", "target_hidden_size", "sample_from_anchor", "rope_theta"):
        cfg.pop(ours)
    if not model.config.reduced_vocab:
        cfg.pop("draft_vocab_size")
    cfg.update(num_anchors=512, dtype="bfloat16", bos_token_id=1, eos_token_id=2, use_cache=True,
               initializer_range=0.02, attention_dropout=0.0, use_sliding_window=False)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    head_rows = target.model.get_output_embeddings().weight
    if model.config.reduced_vocab:
        head_rows = head_rows[model.draft_ids]
    state["embed_tokens.weight"] = (embed if embed is not None else target.model.get_input_embeddings().weight).bfloat16()
    state["lm_head.weight"] = (head if head is not None else head_rows).bfloat16()
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
    else:
        keys = sorted(state)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, str(folder / name))
            weight_map.update(dict.fromkeys(part, name))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return cfg


def features_of(target, ids, layer_ids):
    return target.forward(torch.tensor([ids]), layer_ids=layer_ids).features[0]  # [S, m*d]


def drafts(drafter: DSparkDrafter, target, ids, params: SamplingParams, seed: int = 7):
    drafter.check_target(target)
    drafter.reset()
    block = drafter.propose(DraftInput(torch.tensor(ids), features_of(target, ids[:-1], drafter.feature_layer_ids),
                                       params, torch.Generator().manual_seed(seed), GAMMA))
    return block


def same_block(a, b) -> bool:
    return (torch.equal(a.tokens, b.tokens) and (a.q is None) == (b.q is None) and (a.q is None or torch.equal(a.q, b.q))
            and torch.equal(a.confidences, b.confidences))


PROMPT = [3, 9, 4, 17, 8, 5, 12]
PARAMS = [SamplingParams(), SamplingParams(temperature=1.0)]


# -- import ----------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab, shards", [(0, 1), (DRAFT_VOCAB, 1), (0, 3)], ids=["full-vocab", "draft-vocab", "sharded"])
def test_deepspec_checkpoint_imports_and_drafts_like_the_native_load(target, tmp_path, vocab, shards):
    model = make_model(target, **({"draft_vocab_size": vocab} if vocab else {}))
    write_deepspec(model, target, tmp_path / "deepspec", shards=shards)
    model.save_pretrained(tmp_path / "native", dtype=torch.bfloat16)
    report = import_deepspec(tmp_path / "deepspec", tmp_path / "imported", target=target)
    assert report.drafter_spec == f"dspark:{tmp_path / 'imported'}"
    assert report.carried == ("embed_tokens.weight", "lm_head.weight") and report.source_dtype == "bfloat16"
    assert report.notes == ()  # the carried copies are the target's
    imported = make_drafter(report.drafter_spec, gamma=GAMMA)
    native = make_drafter(f"dspark:{tmp_path / 'native'}", gamma=GAMMA)
    for params in PARAMS:
        a, b = drafts(imported, target, PROMPT, params), drafts(native, target, PROMPT, params)
        assert same_block(a, b), params
    # The carried copies equal the target's, so they are aliased (freed) and the target's used.
    assert imported.model.embed_tokens is None and imported.model.lm_head is None
    assert imported.model.input_embeddings() is target.model.get_input_embeddings()


def test_dflash_checkpoint_imports_as_dflash(target, tmp_path):
    model = make_model(target, markov_rank=0, enable_confidence_head=False)
    cfg = write_deepspec(model, target, tmp_path / "deepspec")
    assert "markov_head_type" not in cfg and "confidence_head_with_markov" not in cfg
    report = import_deepspec(tmp_path / "deepspec", tmp_path / "imported")
    assert report.drafter_spec == f"dflash:{tmp_path / 'imported'}"
    drafter = make_drafter(report.drafter_spec, gamma=GAMMA)
    assert drafter.name == "dflash" and drafter.config.is_dflash


@pytest.mark.parametrize("vocab", [0, DRAFT_VOCAB], ids=["full-vocab", "draft-vocab"])
def test_import_then_export_gives_back_the_authors_tensors_and_fields(target, tmp_path, vocab):
    model = make_model(target, **({"draft_vocab_size": vocab} if vocab else {}))
    source_cfg = write_deepspec(model, target, tmp_path / "deepspec")
    import_deepspec(tmp_path / "deepspec", tmp_path / "imported")
    report = export_vllm(tmp_path / "imported", tmp_path / "exported", target, dtype=torch.bfloat16)
    source = load_file(str(tmp_path / "deepspec" / "model.safetensors"))
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert set(exported) == set(source) == set(report.keys)
    for key, value in source.items():
        assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    cfg = json.loads((tmp_path / "exported" / "config.json").read_text())
    for field, value in source_cfg.items():
        assert cfg[field] == value, field
    assert not [n for n in report.notes if "differs" in n]
    assert any("the target is llama" in n for n in report.notes)  # the tiny target is no upstream-verified family


def test_export_reloads_bit_exactly(target, tmp_path):
    for vocab in (0, DRAFT_VOCAB):
        model = make_model(target, **({"draft_vocab_size": vocab} if vocab else {}))
        export_vllm(model, tmp_path / f"f32-{vocab}", target, dtype=torch.float32)
        export_vllm(model, tmp_path / f"bf16-{vocab}", target, dtype=torch.bfloat16)
        f32 = DSparkModel.from_pretrained(tmp_path / f"f32-{vocab}")
        bf16 = DSparkModel.from_pretrained(tmp_path / f"bf16-{vocab}", dtype=torch.bfloat16)
        assert f32.config == model.config == bf16.config
        mine = model.state_dict()
        for key, value in mine.items():
            assert torch.equal(f32.state_dict()[key], value), key
            cast = value.bfloat16() if value.is_floating_point() else value
            assert torch.equal(bf16.state_dict()[key], cast), key
        # A full vocabulary borrows the target's head; a reduced one ships its rows (vLLM needs lm_head + d2t).
        rows = target.model.get_output_embeddings().weight
        if vocab:
            assert set(f32.carried()) == {"lm_head.weight"}
            assert torch.equal(f32.carried()["lm_head.weight"], rows[model.draft_ids])
        else:
            assert f32.carried() == {} and set(f32.state_dict()) == set(mine)


def test_exported_config_has_what_vllm_and_sglang_read(target, tmp_path):
    model = make_model(target, draft_vocab_size=DRAFT_VOCAB)
    export_vllm(model, tmp_path / "out", target)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["model_type"] == "qwen3"
    assert cfg["markov_rank"] == 8 and cfg["markov_head_type"] == "vanilla"
    assert cfg["enable_confidence_head"] is True and cfg["confidence_head_with_markov"] is True
    assert cfg["block_size"] == GAMMA and cfg["mask_token_id"] == 31
    assert cfg["target_layer_ids"] == list(model.config.target_layer_ids)
    assert cfg["draft_vocab_size"] == DRAFT_VOCAB and cfg["num_target_layers"] == 6 and cfg["target_hidden_size"] == 32
    assert cfg["tie_word_embeddings"] is False and cfg["layer_types"] == ["full_attention"] * 2
    assert cfg["dtype"] == "bfloat16" and cfg["sample_from_anchor"] is True
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert tensors["lm_head.weight"].shape == (DRAFT_VOCAB, 32) and tensors["d2t"].dtype == torch.int64
    assert tensors["fc.weight"].dtype == torch.bfloat16 and "embed_tokens.weight" not in tensors


def test_export_expands_a_draft_w1_to_the_v_rows_the_engines_index(target, tmp_path):
    model = make_model(target, draft_vocab_size=DRAFT_VOCAB, markov_w1_vocab="draft")
    with torch.no_grad():
        model.markov_head.markov_w1.weight.normal_()
    export_vllm(model, tmp_path / "out", target, dtype=torch.float32)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "markov_w1_vocab" not in cfg
    w1 = load_file(str(tmp_path / "out" / "model.safetensors"))["markov_head.markov_w1.weight"]
    assert w1.shape == (32, 8)
    vocab = torch.arange(32)
    assert torch.equal(w1, model.markov_head.markov_w1.weight[model.markov_rows(vocab)])
    assert torch.equal(w1[model.draft_ids], model.markov_head.markov_w1.weight[:DRAFT_VOCAB])
    from dspark.drafters.dspark.model import BlockOutput

    exported = DSparkModel.from_pretrained(tmp_path / "out")  # the V-row layout: the same drafter
    assert exported.config.markov_w1_vocab == "target" and exported.markov_head.markov_w1.weight.shape == (32, 8)
    out = BlockOutput(torch.randn(2, GAMMA, 32), torch.randn(2, GAMMA, DRAFT_VOCAB))
    prev = torch.randint(0, 32, (2, GAMMA), generator=torch.Generator().manual_seed(0))
    assert torch.equal(exported.teacher_forced_logits(out, prev), model.teacher_forced_logits(out, prev))


# -- carried embedding / LM head -------------------------------------------------------------
def test_a_carried_embedding_and_head_that_differ_are_used(target, tmp_path):
    model = make_model(target)
    g = torch.Generator().manual_seed(11)
    embed, head = torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)
    write_deepspec(model, target, tmp_path / "deepspec", embed=embed, head=head)
    report = import_deepspec(tmp_path / "deepspec", tmp_path / "imported", target=target)
    assert report.notes == ("embed_tokens.weight differs from the target's: the drafter uses its own copy",
                            "lm_head.weight differs from the target's: the drafter uses its own copy")
    model.save_pretrained(tmp_path / "native")
    own = make_drafter(f"dspark:{tmp_path / 'imported'}", gamma=GAMMA)
    borrowed = make_drafter(f"dspark:{tmp_path / 'native'}", gamma=GAMMA)
    a = drafts(own, target, PROMPT, SamplingParams(temperature=1.0))
    b = drafts(borrowed, target, PROMPT, SamplingParams(temperature=1.0))
    assert not torch.equal(a.q, b.q)
    m = own.model
    assert m.embed_tokens is not None and m.input_embeddings() is m.embed_tokens
    assert torch.equal(m.embed_tokens.weight, embed.bfloat16().float())
    assert torch.equal(m.draft_head_weight, head.bfloat16().float())
    assert not m.embed_tokens.weight.requires_grad and not m.lm_head.weight.requires_grad
    assert all(not name.startswith(("embed_tokens", "lm_head")) for name, p in m.named_parameters() if p.requires_grad)
    # The carried copies are the checkpoint's: an export writes them back and notes SGLang ignores them.
    report = export_vllm(m, tmp_path / "exported", target)
    differs = [n for n in report.notes if "differs from the target's" in n]
    assert len(differs) == 2 and all("SGLang always uses the target's" in n for n in differs)
    assert torch.equal(load_file(str(tmp_path / "exported" / "model.safetensors"))["embed_tokens.weight"], embed.bfloat16())


def test_a_carried_copy_equal_to_the_targets_is_aliased_and_saved_back(target, tmp_path):
    model = make_model(target)
    embed = target.model.get_input_embeddings().weight.detach().clone()
    model.carry(embed_tokens=embed)
    model.attach_target(target)
    assert model.embed_tokens is None and model.input_embeddings() is target.model.get_input_embeddings()
    assert model.carried()["embed_tokens.weight"].data_ptr() == target.model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path / "d")
    assert torch.equal(load_file(str(tmp_path / "d" / "model.safetensors"))["embed_tokens.weight"], embed)
    # Attached to a target it differs from, the copy is used again.
    other = tiny_target(vocab_size=32, hidden=32, layers=6, seed=5)
    model.attach_target(other)
    assert model.embed_tokens is not None and torch.equal(model.embed_tokens.weight, embed)


def test_carry_refuses_a_wrong_shape(target):
    model = make_model(target, draft_vocab_size=DRAFT_VOCAB)
    with pytest.raises(DsparkError, match=r"lm_head.weight must be \[20, 32\]"):
        model.carry(lm_head=torch.zeros(32, 32))


# -- refusals ----------------------------------------------------------------------------------
def _deepspec(target, tmp_path, **overrides) -> Path:
    write_deepspec(make_model(target, **overrides), target, tmp_path / "deepspec")
    return tmp_path / "deepspec"


def _edit_config(folder: Path, drop=(), **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key in drop:
        cfg.pop(key)
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field", ["target_layer_ids", "mask_token_id", "enable_confidence_head", "markov_rank",
                                   "markov_head_type", "confidence_head_with_markov", "num_target_layers"])
def test_import_refuses_a_missing_required_field(target, tmp_path, field):
    src = _deepspec(target, tmp_path)
    _edit_config(src, drop=[field])
    with pytest.raises(DsparkError, match=f"lacks the required field {field}"):
        import_deepspec(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["Gemma4DSparkModel"]}, "Gemma4 DSpark checkpoints .* not supported yet"),
    ({"architectures": ["LlamaForCausalLM"]}, "expected \\['Qwen3DSparkModel'\\]"),
    ({"markov_head_type": "gated"}, "markov_head_type 'gated' is not supported yet"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope scaling"),
    ({"target_layer_ids": [1, 5]}, "final, normed layer"),
    ({"mask_token_id": 32}, "outside the vocabulary"),
    ({"sample_from_anchor": False}, "1\\+N block layout"),
    ({"speculators_model_type": "dspark"}, "speculators checkpoint"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads"),  # issue 26: was a ZeroDivisionError
    ({"hidden_size": "32", "head_dim": None}, "hidden_size"),  # was an internal TypeError
])
def test_import_refuses_what_it_cannot_serve_faithfully(target, tmp_path, changes, message):
    src = _deepspec(target, tmp_path)
    _edit_config(src, **changes)
    with pytest.raises(DsparkError, match=message):
        import_deepspec(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_unknown_tensors_and_wrong_shapes(target, tmp_path):
    src = _deepspec(target, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    save_file({**state, "mask_embedding": torch.zeros(32)}, str(src / "model.safetensors"))
    with pytest.raises(DsparkError, match="unknown tensor mask_embedding"):
        import_deepspec(src, tmp_path / "out")
    save_file({**state, "fc.weight": torch.zeros(32, 31)}, str(src / "model.safetensors"))
    with pytest.raises(DsparkError, match=r"fc.weight is \[32, 31\], expected \[32, "):
        import_deepspec(src, tmp_path / "out")
    save_file({k: v for k, v in state.items() if k != "norm.weight"}, str(src / "model.safetensors"))
    with pytest.raises(DsparkError, match="missing tensor norm.weight"):
        import_deepspec(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_an_inconsistent_draft_vocabulary(target, tmp_path):
    src = _deepspec(target, tmp_path, draft_vocab_size=DRAFT_VOCAB)
    state = load_file(str(src / "model.safetensors"))
    t2d = state["t2d"].clone()
    t2d[0] = True  # token 0 is not a draft token
    save_file({**state, "t2d": t2d}, str(src / "model.safetensors"))
    with pytest.raises(DsparkError, match="t2d does not match d2t"):
        import_deepspec(src, tmp_path / "out")
    save_file({**state, "d2t": torch.zeros(DRAFT_VOCAB, dtype=torch.long) - 1}, str(src / "model.safetensors"))
    with pytest.raises(DsparkError, match="d2t is not a valid draft vocabulary"):
        import_deepspec(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_target_it_does_not_fit(target, tmp_path):
    src = _deepspec(target, tmp_path)
    with pytest.raises(IncompatibleDrafterError, match="hidden size"):
        import_deepspec(src, tmp_path / "out", target=tiny_target(vocab_size=32, hidden=48, layers=6))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"layer_family": "llama"}, "serves Qwen3-style DSpark drafters .* backbone is llama"),
    ({"layer_family": "gemma3"}, "serves Qwen3-style DSpark drafters .* backbone is gemma3"),
    ({"markov_head_type": "rnn"}, "rnn Markov head has no vLLM or llama.cpp destination"),
    ({"markov_rank": 0, "enable_confidence_head": False}, "requires markov_rank > 0"),
])
def test_export_refuses_what_the_engines_cannot_serve(target, tmp_path, overrides, message):
    with pytest.raises(DsparkError, match=message):
        export_vllm(make_model(target, **overrides), tmp_path / "out", target)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_folder_in_use(target, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(DsparkError, match="not an empty folder"):
        export_vllm(make_model(target), tmp_path / "out", target)
    assert (tmp_path / "out" / "config.json").read_text() == "{}"


# -- the command line ----------------------------------------------------------------------------
def test_convert_import_command(target, tmp_path):
    from typer.testing import CliRunner

    from dspark.cli.main import app

    src = _deepspec(target, tmp_path)
    result = CliRunner().invoke(app, ["convert", "import", str(src), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["drafter"] == f"dspark:{tmp_path / 'out'}" and summary["carried"] == ["embed_tokens.weight", "lm_head.weight"]
    assert DSparkModel.from_pretrained(tmp_path / "out").config.block_size == GAMMA


def test_convert_export_command(target, tmp_path):
    from typer.testing import CliRunner

    from dspark.cli.main import app

    target.model.save_pretrained(tmp_path / "target")
    make_model(target).save_pretrained(tmp_path / "drafter")
    args = ["convert", "export", str(tmp_path / "drafter"), str(tmp_path / "out"), "--model", str(tmp_path / "target")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f'"model": "{tmp_path / "out"}", "num_speculative_tokens": {GAMMA}' in result.stdout
    sglang = CliRunner().invoke(app, [*args[:3], str(tmp_path / "out-sglang"), *args[4:], "--engine", "sglang"])
    assert sglang.exit_code == 0, sglang.output
    assert f"--speculative-algorithm DSPARK --speculative-draft-model-path {tmp_path / 'out-sglang'}" in sglang.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = DSparkModel.from_pretrained(tmp_path / "out")
    assert reloaded.config.layer_family == "qwen3" and reloaded.carried() == {}
