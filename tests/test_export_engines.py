"""Exports for vLLM, SGLang and DeepSpec, checked against those engines' own loader rules.

Each engine's loader is transcribed here as data plus a few lines of name mapping, every rule
cited file:line in that engine's source: vLLM 0.33.0 and SGLang 0.5.23 (their wheels) and
DeepSpec at afdfa7c (deepseek-ai/DeepSpec). None of their code is imported or copied. An
export passes when, under those rules, every tensor it writes lands in a parameter of the
engine's module tree with that parameter's shape, every parameter gets a tensor (bar the ones
the engine takes from the target), and every config field the engine reads is present with
the right type. A round trip through dspark's own reader would prove nothing about theirs.

The full-vocabulary form that SGLang and DeepSpec get for a reduced-vocabulary drafter is
checked against the reduced drafter itself, the oracle: the same Markov-corrected logits on
the draft tokens, q = 0 on every other token, the same confidences and the same greedy drafts.

Glossary: V target vocabulary, N draft vocabulary, r Markov rank, d hidden size, h head dim,
H / K query / key-value heads, I MLP width, n feature layers, γ block size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from dspark.drafters.base import DraftInput
from dspark.drafters.dspark import DSparkDrafter, DSparkModel
from dspark.drafters.dspark.interop import EXPORTERS, OUTSIDE_LOGIT, export_sglang, full_vocabulary_form
from dspark.drafters.factory import SHIPPED_DRAFTER
from dspark.errors import DsparkError
from dspark.sampling import SamplingParams
from test_convert import DRAFT_VOCAB, GAMMA, PROMPT, make_model, target  # noqa: F401  (target: the module fixture, bf16-exact weights)

pytestmark = pytest.mark.usefixtures("one_thread")

ENGINES = ("vllm", "sglang", "deepspec")
VOCABS = pytest.mark.parametrize("vocab", [0, DRAFT_VOCAB], ids=["full-vocab", "draft-vocab"])
HEADS = {  # drafter variants that switch the engines' conditional rules on and off
    "confidence-with-markov": {},
    "confidence-without-markov": {"confidence_head_with_markov": False},
    "no-confidence": {"enable_confidence_head": False},
}
Shape = tuple[int, ...]
Tree = dict[str, "Shape | dict[Any, Shape]"]
"""An engine's parameters by name: a shape, or for a stacked parameter its shards' shapes by shard id."""




class Refused(Exception):
    """The engine's loader raises here."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _ids(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


Rule = Callable[[Any, dict], bool]

# -- config.json: the fields each engine reads, with the values it accepts -----------------------
QWEN3_FIELDS: dict[str, Rule] = {
    # The draft layers read these from the Qwen3 config (DeepSpec through transformers' Qwen3 modules).
    "vocab_size": lambda v, c: _int(v),
    "hidden_size": lambda v, c: _int(v),
    "num_hidden_layers": lambda v, c: _int(v),
    "num_attention_heads": lambda v, c: _int(v),
    "num_key_value_heads": lambda v, c: _int(v) and c["num_attention_heads"] % v == 0,
    "head_dim": lambda v, c: _int(v),
    "intermediate_size": lambda v, c: _int(v),
    "rms_norm_eps": lambda v, c: _float(v),
    "max_position_embeddings": lambda v, c: _int(v),
    "hidden_act": lambda v, c: v == "silu",
    "attention_bias": lambda v, c: v is False,  # dspark's backbone has none; True would expect biases
}
VLLM_FIELDS: dict[str, Rule] = {
    **QWEN3_FIELDS,  # vllm/model_executor/models/qwen3_dflash.py:310-360, :443-492; qwen2.py:105 (silu only)
    # Any other architecture under method "dspark" is rewritten to the DeepSeek-V4 draft.
    "architectures": lambda v, c: v == ["Qwen3DSparkModel"],  # vllm/config/speculative.py:1455-1468, :1543-1566
    "model_type": lambda v, c: v == "qwen3",  # the draft layer's config is a Qwen3Config: qwen3_dflash.py:303
    # Without rope_theta here vLLM silently uses 1e6: qwen3_dflash.py:311, :348; transformers_utils/config.py:603-606.
    "rope_parameters": lambda v, c: isinstance(v, dict) and _float(v.get("rope_theta")),
    "markov_rank": lambda v, c: _int(v),  # read unconditionally: qwen3_dspark.py:212
    "draft_vocab_size": lambda v, c: _int(v) and v <= c["vocab_size"],  # qwen3_dspark.py:206-207
    "enable_confidence_head": lambda v, c: isinstance(v, bool),  # qwen3_dspark.py:220
    # getattr(..., False): absent, a [1, d + r] head would not fit its [1, d] proj (qwen3_dspark.py:221-224).
    "confidence_head_with_markov": lambda v, c: isinstance(v, bool) or not c["enable_confidence_head"],
    # Feature layers, +1 into vLLM's capture semantics: eagle3_utils.py:138-140; fc width: qwen3_dflash.py:84-93.
    "target_layer_ids": lambda v, c: _ids(v),
    "target_hidden_size": lambda v, c: v == c["hidden_size"],  # qwen3_dflash.py:90-91
    "mask_token_id": lambda v, c: isinstance(v, int) and 0 <= v < c["vocab_size"],  # qwen3_dflash.py:454-455
    # All full_attention and no is_causal: non-causal draft layers (qwen3_dflash.py:62-73).
    "layer_types": lambda v, c: v == ["full_attention"] * c["num_hidden_layers"] and "is_causal" not in c,
    "sample_from_anchor": lambda v, c: v is True,  # the anchor-first layout: spec_decode/dspark/speculator.py:49-52
    "block_size": lambda v, c: _int(v),  # default num_speculative_tokens: vllm/config/speculative.py:1596-1599
}
VLLM_OVERRIDES = ("eagle_aux_hidden_state_layer_ids", "dflash_config", "dspark_target_layer_ids")
"""Keys that would take precedence over target_layer_ids (spec_decode/eagle/eagle3_utils.py:119-135)."""

SGLANG_FIELDS: dict[str, Rule] = {
    **QWEN3_FIELDS,  # sglang/srt/models/dflash.py:204-270 (attention), :472-508 (silu MLP), :607-608, :691-693
    "architectures": lambda v, c: v[0] == "Qwen3DSparkModel",  # the registry's entry: sglang/srt/models/dspark.py:977, :995
    "markov_rank": lambda v, c: _int(v),  # "DSpark requires markov_rank > 0": dspark.py:386-391
    "markov_head_type": lambda v, c: v in ("vanilla", "gated", "rnn"),  # dspark_config.py:22, :264-274
    "block_size": lambda v, c: _int(v),  # γ: dflash_utils.py:609-617, dspark_config.py:295
    "num_target_layers": lambda v, c: _int(v),  # dflash_utils.py:598-606, dflash.py:751
    "target_layer_ids": lambda v, c: _ids(v) and all(0 <= i < c["num_target_layers"] for i in v),  # dflash_utils.py:579-584
    # An integer (not a bool), >= 0 and below the target vocabulary: dflash_utils.py:688-702, dspark_config.py:124.
    "mask_token_id": lambda v, c: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < c["vocab_size"],
    "enable_confidence_head": lambda v, c: isinstance(v, bool),  # warned about when absent: dspark.py:490-494
    "confidence_head_with_markov": lambda v, c: isinstance(v, bool) or not c["enable_confidence_head"],  # dspark.py:497
    "layer_types": lambda v, c: v == ["full_attention"] * c["num_hidden_layers"],  # ENCODER_ONLY: dflash.py:166-181
    "sample_from_anchor": lambda v, c: v is True,  # dspark_config.py:29-31
}
SGLANG_OVERRIDES = ("dspark_block_size", "dspark_markov_rank", "dspark_noise_token_id", "dspark_target_layer_ids",
                    "dspark_config", "dflash_config")
"""Keys that would take precedence over the top-level fields (dspark_config.py:206-295, dflash_utils.py:590-690)."""

DEEPSPEC_FIELDS: dict[str, Rule] = {
    **QWEN3_FIELDS,  # deepspec/modeling/dspark/qwen3/modeling.py:48-80, :158-162 (transformers' Qwen3MLP)
    "architectures": lambda v, c: v == ["Qwen3DSparkModel"],  # what its trainer writes: deepspec/modeling/dspark/qwen3/config.py:38
    "model_type": lambda v, c: v == "qwen3",  # from_pretrained reads it as Qwen3PreTrainedModel's Qwen3Config: modeling.py:201
    # Qwen3DSparkModel.__init__ asserts these (modeling.py:207-215) ...
    "target_layer_ids": lambda v, c: _ids(v) and max(v) < c["num_target_layers"] - 1,  # no final layer: eval/base_evaluator.py:100-110
    "mask_token_id": lambda v, c: isinstance(v, int) and 0 <= v < c["vocab_size"],
    "num_anchors": lambda v, c: _int(v),
    "enable_confidence_head": lambda v, c: isinstance(v, bool),
    "markov_rank": lambda v, c: isinstance(v, int) and v >= 0,
    # ... and these when the head they configure is on (modeling.py:216-224).
    "markov_head_type": lambda v, c: v in ("vanilla", "gated", "rnn") or c["markov_rank"] == 0,  # markov_head.py:293-311
    "confidence_head_with_markov": lambda v, c: isinstance(v, bool) or not c["enable_confidence_head"],
    "block_size": lambda v, c: _int(v),  # int(config.block_size): modeling.py:247
    "layer_types": lambda v, c: v == ["full_attention"] * c["num_hidden_layers"],  # modeling.py:81-85
    "num_target_layers": lambda v, c: _int(v),  # what its trainer writes: config.py:39
    "tie_word_embeddings": lambda v, c: v is False,  # config.py:42; its embed_tokens and lm_head are two tensors
}
CONDITIONAL = {"markov_head_type", "confidence_head_with_markov"}
"""Fields an engine reads only when the head they configure is on (checked by their rules, may be absent)."""


def check_config(cfg: dict, fields: dict[str, Rule], overrides: tuple[str, ...] = ()) -> None:
    for name, ok in fields.items():
        if name not in cfg:
            off = (name == "markov_head_type" and cfg.get("markov_rank") == 0) or (
                name == "confidence_head_with_markov" and not cfg.get("enable_confidence_head"))
            assert name in CONDITIONAL and off, f"config.json lacks {name}"
            continue
        assert ok(cfg[name], cfg), f"config.json has {name} = {cfg[name]!r}, which the engine does not accept"
    shadowing = [k for k in overrides if k in cfg]
    assert not shadowing, f"config.json holds {shadowing}, which the engine reads before the top-level fields"


# -- module trees: each engine's parameters and their shapes, from config.json -------------------
def _dims(c: dict) -> tuple[int, ...]:
    d, h, H, K = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    return d, h, H, K, c["intermediate_size"], c["vocab_size"], c["markov_rank"]


def _confidence_inputs(c: dict, with_markov_default: bool) -> int:
    with_markov = c.get("confidence_head_with_markov", with_markov_default)
    return c["hidden_size"] + (c["markov_rank"] if with_markov else 0)


def _layers(c: dict, prefix: str, stacked: bool) -> Tree:
    d, h, H, K, I, _, _ = _dims(c)
    tree: Tree = {}
    for i in range(c["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        # Stacked: one parameter whose shards are each checked against the tensor loaded into them
        # (vllm/model_executor/layers/linear.py:1336, :879; sglang/srt/layers/linear.py:1547, :894).
        if stacked:
            tree[p + "self_attn.qkv_proj.weight"] = {"q": (H * h, d), "k": (K * h, d), "v": (K * h, d)}
            tree[p + "mlp.gate_up_proj.weight"] = {0: (I, d), 1: (I, d)}
        else:
            tree.update({p + "self_attn.q_proj.weight": (H * h, d), p + "self_attn.k_proj.weight": (K * h, d),
                         p + "self_attn.v_proj.weight": (K * h, d), p + "mlp.gate_proj.weight": (I, d),
                         p + "mlp.up_proj.weight": (I, d)})
        tree.update({p + "self_attn.o_proj.weight": (d, H * h), p + "self_attn.q_norm.weight": (h,),
                     p + "self_attn.k_norm.weight": (h,), p + "mlp.down_proj.weight": (d, I),
                     p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    return tree


def vllm_tree(c: dict, target_vocab: int) -> Tree:
    """``Qwen3DSparkForCausalLM``'s parameters (vllm/model_executor/models/qwen3_dspark.py:233-268)."""
    d, h, H, K, I, V, r = _dims(c)
    N = c.get("draft_vocab_size") or V  # qwen3_dspark.py:206-207, :240-241
    aux = [i + 1 for i in c["target_layer_ids"]]  # spec_decode/eagle/eagle3_utils.py:138-140
    tree: Tree = {
        **_layers(c, "model.", stacked=True),  # qwen3_dflash.py:205 (qkv), :214, :265-266, :352, :359-360
        "model.embed_tokens.weight": (V, d),  # qwen3_dflash.py:443
        "model.mask_embedding": (d,),  # qwen3_dflash.py:457
        "model.fc.weight": (d, (c.get("target_hidden_size") or d) * len(aux)),  # qwen3_dflash.py:477-486, :84-93
        "model.hidden_norm.weight": (d,),  # qwen3_dflash.py:488
        "model.norm.weight": (d,),  # qwen3_dflash.py:492
        "model.markov_head.markov_w1.weight": (V, r),  # nn.Embedding(vocab_size, r): qwen3_dspark.py:71
        # ParallelLMHead(draft_vocab_size, r) takes [N, r] (vocab_parallel_embedding.py:515; padding is its own).
        "model.markov_head.markov_w2.weight": (N, r),  # qwen3_dspark.py:72-79
        "lm_head.weight": (N, d),  # qwen3_dspark.py:250-254
    }
    if c.get("enable_confidence_head", False):  # fp32 proj with a bias: qwen3_dspark.py:220-230, :176-183
        tree["model.confidence_head.proj.weight"] = (1, _confidence_inputs(c, with_markov_default=False))
        tree["model.confidence_head.proj.bias"] = (1,)
    if N < target_vocab:
        tree["draft_id_to_target_id"] = (N,)  # qwen3_dspark.py:262-267
    return tree


def sglang_tree(c: dict, ragged: bool) -> Tree:
    """``Qwen3DSparkModel``'s parameters (sglang/srt/models/dflash.py:687-804, models/dspark.py:519-548).

    No embedding or LM head: it is attached the target's (dspark.py:539, :550-555). The
    confidence head exists only in a ragged verify mode (dspark.py:487-489).
    """
    d, h, H, K, I, V, r = _dims(c)
    tree: Tree = {
        **_layers(c, "", stacked=True),  # dflash.py:238-250 (qkv via :335-344), :479-491, :611-619
        "norm.weight": (d,),  # dflash.py:745
        "fc.weight": (d, len(c["target_layer_ids"]) * d),  # draft hidden, not the target's: dflash.py:759-775
        "hidden_norm.weight": (d,),  # dflash.py:775
        "markov_head.markov_w1.weight": (V, r),  # VanillaMarkov over the whole vocabulary: dspark.py:198
        "markov_head.markov_w2.weight": (V, r),  # nn.Linear(r, vocab_size): dspark.py:199
    }
    if ragged:  # with_markov defaults to markov_rank > 0: dspark.py:497; bias=True, fp32: dspark.py:426-437
        tree["confidence_head.proj.weight"] = (1, _confidence_inputs(c, with_markov_default=r > 0))
        tree["confidence_head.proj.bias"] = (1,)
    return tree


def deepspec_tree(c: dict) -> Tree:
    """``Qwen3DSparkModel``'s state dict (deepspec/modeling/dspark/qwen3/modeling.py:201-268), top-level keys."""
    d, h, H, K, I, V, r = _dims(c)
    tree: Tree = {
        **_layers(c, "", stacked=False),  # modeling.py:59-80, :158-162; transformers Qwen3MLP (gate/up [I, d], down [d, I])
        "embed_tokens.weight": (V, d),  # modeling.py:227-231
        "norm.weight": (d,),  # modeling.py:238
        "fc.weight": (d, len(c["target_layer_ids"]) * d),  # modeling.py:240-244
        "hidden_norm.weight": (d,),  # modeling.py:245
        "lm_head.weight": (V, d),  # modeling.py:246
    }
    if r > 0:  # VanillaMarkov: deepspec/modeling/dspark/markov_head.py:17-18, built by :287-298
        tree.update({"markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (V, r)})
    if c["enable_confidence_head"]:  # AcceptRatePredictor = nn.Linear(input_dim, 1): modeling/dspark/common.py:43-46
        tree["confidence_head.proj.weight"] = (1, _confidence_inputs(c, with_markov_default=False))  # modeling.py:255-267
        tree["confidence_head.proj.bias"] = (1,)
    return tree


# -- loaders: where each engine puts each checkpoint tensor ---------------------------------------
def vllm_load(names: list[str], c: dict, target_vocab: int) -> tuple[dict[str, tuple[str, Any]], set[str]]:
    """(tensor name -> (parameter, shard)), and the parameters that need no tensor: taken from
    the target, a placeholder never loaded, or a head removed for want of weights.

    Transcribes ``Qwen3DSparkForCausalLM.load_weights`` (qwen3_dspark.py:312-372), the stacking
    of ``DFlashQwen3Model`` (qwen3_dflash.py:403-409) and ``AutoWeightsLoader`` (models/utils.py).
    """
    renamed: dict[str, str] = {}
    for name in names:
        if "t2d" in name:  # training only: qwen3_dspark.py:320-321
            continue
        if "d2t" in name:  # qwen3_dspark.py:322-324
            renamed[name.replace("d2t", "draft_id_to_target_id")] = name
        else:
            renamed[name if "lm_head" in name else "model." + name] = name  # qwen3_dspark.py:325-326
    has = {s: any(s in n for n in renamed) for s in ("embed_tokens", "lm_head", "draft_id_to_target_id", "confidence_head")}
    N = c.get("draft_vocab_size") or c["vocab_size"]
    if N < target_vocab and not has["lm_head"]:  # qwen3_dspark.py:348-352
        raise Refused("a reduced-vocabulary checkpoint must include lm_head")
    if N < target_vocab and not has["draft_id_to_target_id"]:  # qwen3_dspark.py:353-357
        raise Refused("a reduced-vocabulary checkpoint must include d2t")
    dropped = ["mask_embedding", *(s for s in ("embed_tokens", "lm_head", "draft_id_to_target_id") if not has[s])]  # :359-365
    confidence = c.get("enable_confidence_head", False) and has["confidence_head"]
    if not confidence:  # the head is set to None: qwen3_dspark.py:366-368
        dropped.append("confidence_head")
    dropped += ["rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached"]  # models/utils.py:233-239
    stacked = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
               ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}  # qwen3_dflash.py:403-409
    placed: dict[str, tuple[str, Any]] = {}
    for new, name in renamed.items():
        if any(s in new for s in dropped):  # WeightsMapper: a substring mapped to None drops the weight (models/utils.py:118-121)
            continue
        shard = None
        for sub, (to, sid) in stacked.items():  # every match applies, no break (models/utils.py:126-129)
            if sub in new:
                new, shard = new.replace(sub, to, 1), sid
        placed[name] = (new, shard)
    exempt = {"model.mask_embedding"}  # an unused placeholder, never loaded: qwen3_dspark.py:338, :359
    if not has["embed_tokens"] and c["vocab_size"] <= target_vocab:  # shared: spec_decode/dspark/utils.py:133-134
        exempt.add("model.embed_tokens.weight")
    if not has["lm_head"] and N == target_vocab:  # shared only at the target's vocabulary: dspark/utils.py:136-149
        exempt.add("lm_head.weight")
    if not confidence:
        exempt |= {"model.confidence_head.proj.weight", "model.confidence_head.proj.bias"}
    return placed, exempt


def sglang_load(names: list[str], tree: Tree, ragged: bool) -> tuple[dict[str, tuple[str, Any]], set[str]]:
    """(tensor name -> (parameter, shard)), and the names SGLang passes over without a word.

    Transcribes ``DSparkDraftMixin.load_weights`` (sglang/srt/models/dspark.py:627-696) over
    ``DFlashDraftModel.load_weights`` (sglang/srt/models/dflash.py:886-1000), whose
    ``resolve_param_name`` takes a name as it is or with ``model.`` stripped or added.
    """
    def resolve(name: str) -> str | None:  # dflash.py:905-919
        for candidate in (name, name.removeprefix("model."), f"model.{name}"):
            if candidate in tree:
                return candidate
        return None

    stacked = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
               ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]  # dflash.py:887-893
    placed: dict[str, tuple[str, Any]] = {}
    passed_over: set[str] = set()
    for name in names:
        bare = name.removeprefix("model.")  # dspark.py:633
        if bare.startswith(("lm_head.", "rotary_emb.", "embed_tokens.")):  # dspark.py:510, :634-641 (not Nemotron 3.5)
            passed_over.add(name)
        elif name.startswith("confidence_head."):  # dspark.py:642-645, :676-681
            if not ragged:  # no head in static mode: the weights are dropped
                passed_over.add(name)
            elif name not in tree:
                raise Refused(f"DSpark unexpected confidence weight {name!r}")
            else:
                placed[name] = (name, None)
        elif name.startswith("markov_head."):  # dspark.py:646-661
            if name not in tree:
                raise Refused(f"DSpark unexpected markov weight {name!r}")
            placed[name] = (name, None)
        else:
            for param, weight, shard in stacked:  # dflash.py:930-941: an unresolved rename tries the next
                resolved = resolve(name.replace(weight, param)) if f".{weight}." in name else None
                if resolved is not None:
                    placed[name] = (resolved, shard)
                    break
            else:
                resolved = resolve(name)
                if resolved is None:  # "Ignore unexpected weights": dflash.py:943-946
                    passed_over.add(name)
                else:
                    placed[name] = (resolved, None)
    missing = {p for p in tree if p.startswith("confidence_head.")} - {p for p, _ in placed.values()}
    if ragged and missing:  # dspark.py:687-696
        raise Refused(f"DSpark confidence head is enabled but the checkpoint is missing {sorted(missing)}")
    return placed, passed_over


def check_placement(tensors: dict[str, torch.Tensor], placed: dict[str, tuple[str, Any]], tree: Tree,
                    exempt: set[str], engine: str) -> None:
    """Every tensor lands in a parameter of ``tree`` with its shape; every parameter outside
    ``exempt`` gets a tensor (all shards of a stacked one)."""
    filled: dict[str, set] = {}
    for name, (param, shard) in placed.items():
        assert param in tree, f"{engine} has no parameter {param} for {name}"
        want = tree[param]
        if isinstance(want, dict):
            assert shard in want, f"{engine}: {name} is loaded as shard {shard!r} of {param}, which has {list(want)}"
            want = want[shard]
        else:
            assert shard is None, f"{engine}: {param} is not a stacked parameter"
        assert tuple(tensors[name].shape) == want, f"{engine}: {name} is {list(tensors[name].shape)}, {param} takes {list(want)}"
        filled.setdefault(param, set()).add(shard)
    for param, want in tree.items():
        if param in exempt:
            continue
        assert param in filled, f"{engine} would leave {param} without a tensor"
        if isinstance(want, dict):
            assert filled[param] == set(want), f"{engine}: {param} gets shards {filled[param]}, needs {set(want)}"


def export(engine: str, model: DSparkModel, target, out: Path, dtype=torch.bfloat16) -> tuple[dict, dict]:
    EXPORTERS[engine](model, out, target, dtype=dtype)
    return json.loads((out / "config.json").read_text()), load_file(str(out / "model.safetensors"))


# -- 1. the loaders accept every export -----------------------------------------------------------
@VOCABS
@pytest.mark.parametrize("heads", list(HEADS))
def test_vllm_loads_the_export(target, tmp_path, vocab, heads):
    model = make_model(target, **({"draft_vocab_size": vocab} if vocab else {}), **HEADS[heads])
    cfg, tensors = export("vllm", model, target, tmp_path / "out")
    check_config(cfg, VLLM_FIELDS, VLLM_OVERRIDES)
    placed, exempt = vllm_load(list(tensors), cfg, target.vocab_size)
    tree = vllm_tree(cfg, target.vocab_size)
    check_placement(tensors, placed, tree, exempt, "vLLM")
    if vocab:  # draft ids map to target ids as i + d2t[i] (qwen3_dspark.py:278-282): offsets, as ours
        assert torch.equal(torch.arange(vocab) + tensors["d2t"], model.draft_ids)
        assert tensors["d2t"].dtype == torch.int64 and "t2d" in tensors  # t2d rides along, dropped by vLLM
    assert ("lm_head.weight" in tensors) == bool(vocab)  # a full vocabulary borrows the target's head


def test_vllm_rules_refuse_what_vllm_refuses(target, tmp_path):
    """The transcribed loader can fail: a reduced vocabulary without its head rows or d2t."""
    cfg, tensors = export("vllm", make_model(target, draft_vocab_size=DRAFT_VOCAB), target, tmp_path / "out")
    with pytest.raises(Refused, match="lm_head"):
        vllm_load([k for k in tensors if k != "lm_head.weight"], cfg, target.vocab_size)
    with pytest.raises(Refused, match="d2t"):
        vllm_load([k for k in tensors if k != "d2t"], cfg, target.vocab_size)
    placed, exempt = vllm_load(list(tensors), {**cfg, "confidence_head_with_markov": False}, target.vocab_size)
    with pytest.raises(AssertionError, match="confidence_head.proj.weight is"):
        check_placement(tensors, placed, vllm_tree({**cfg, "confidence_head_with_markov": False}, target.vocab_size),
                        exempt, "vLLM")


@VOCABS
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("ragged", [False, True], ids=["static", "ragged"])
def test_sglang_loads_the_export(target, tmp_path, vocab, heads, ragged):
    model = make_model(target, **({"draft_vocab_size": vocab} if vocab else {}), **HEADS[heads])
    cfg, tensors = export("sglang", model, target, tmp_path / "out")
    check_config(cfg, SGLANG_FIELDS, SGLANG_OVERRIDES)
    tree = sglang_tree(cfg, ragged)
    if ragged and not model.config.enable_confidence_head:
        # A ragged mode builds the head whatever the config says, then misses its weights: dspark.py:487-497, :687-696.
        with pytest.raises(Refused, match="confidence head is enabled but the checkpoint is missing"):
            sglang_load(list(tensors), tree, ragged)
        return
    placed, passed_over = sglang_load(list(tensors), tree, ragged)
    written_for_nothing = passed_over - {k for k in passed_over if k.startswith("confidence_head.") and not ragged}
    assert not written_for_nothing, f"SGLang would not read {sorted(written_for_nothing)}"
    check_placement(tensors, placed, tree, set(), "SGLang")
    # SGLang's W2 covers V tokens and it reads no d2t; the full-vocabulary form gives it V rows.
    r = model.config.markov_rank + (1 if vocab else 0)
    assert cfg["markov_rank"] == r and tensors["markov_head.markov_w2.weight"].shape == (target.vocab_size, r)
    assert not {"d2t", "t2d", "embed_tokens.weight", "lm_head.weight"} & set(tensors)


@VOCABS
@pytest.mark.parametrize("heads", list(HEADS))
def test_deepspec_loads_the_export(target, tmp_path, vocab, heads):
    model = make_model(target, **({"draft_vocab_size": vocab} if vocab else {}), **HEADS[heads])
    cfg, tensors = export("deepspec", model, target, tmp_path / "out")
    check_config(cfg, DEEPSPEC_FIELDS)
    # from_pretrained loads by key, no renames: the keys and shapes must be the module tree's
    # exactly, so nothing is newly initialised and nothing is unexpected.
    tree = deepspec_tree(cfg)
    assert set(tensors) == set(tree), f"missing {sorted(set(tree) - set(tensors))}, unexpected {sorted(set(tensors) - set(tree))}"
    for key, shape in tree.items():
        assert tuple(tensors[key].shape) == shape, key
    # Its embedding and head are the target's own (frozen copies), over the whole vocabulary.
    assert torch.equal(tensors["embed_tokens.weight"].float(), target.model.get_input_embeddings().weight)
    assert torch.equal(tensors["lm_head.weight"].float(), target.model.get_output_embeddings().weight)
    assert tensors["fc.weight"].dtype == torch.bfloat16


def test_config_rules_can_fail(target, tmp_path):
    cfg, _ = export("deepspec", make_model(target), target, tmp_path / "out")
    with pytest.raises(AssertionError, match="lacks num_anchors"):
        check_config({k: v for k, v in cfg.items() if k != "num_anchors"}, DEEPSPEC_FIELDS)
    with pytest.raises(AssertionError, match="architectures"):
        check_config({**cfg, "architectures": ["DSparkDraftModel"]}, VLLM_FIELDS)
    with pytest.raises(AssertionError, match="dflash_config"):
        check_config({**cfg, "dflash_config": {}}, SGLANG_FIELDS, SGLANG_OVERRIDES)


# -- 2. the full-vocabulary form drafts as the reduced drafter -------------------------------------
IDS = PROMPT + [11, 6, 19, 3, 8, 22, 9, 4]
ANCHORS = [[1, 4, 7, 10]]


def _teacher_forced(model: DSparkModel, target):
    """Markov-corrected logits # [1, A, γ, N] and confidence logits # [1, A, γ] of every slot of
    blocks at ANCHORS, the true tokens as x_{k-1}."""
    model.attach_target(target)
    ids = torch.tensor([IDS])
    features = target.forward(ids, layer_ids=model.config.target_layer_ids).features  # [1, S, m*d]
    with torch.no_grad():
        out = model(features, ids, torch.tensor(ANCHORS))
    return out.draft_logits, out.confidence_logits


def _draft(model: DSparkModel, target, params: SamplingParams):
    drafter = DSparkDrafter(model, gamma=GAMMA)
    drafter.check_target(target)
    drafter.reset()
    ids = torch.tensor(PROMPT)
    features = target.forward(ids[None, :-1], layer_ids=model.config.target_layer_ids).features[0]
    return drafter.propose(DraftInput(ids, features, params, torch.Generator().manual_seed(3), GAMMA))


@pytest.mark.parametrize("engine", ["sglang", "deepspec"])
@pytest.mark.parametrize("w1_vocab", ["target", "draft"])
def test_full_vocabulary_export_drafts_as_the_reduced_drafter(target, tmp_path, engine, w1_vocab):
    reduced = make_model(target, draft_vocab_size=DRAFT_VOCAB, markov_w1_vocab=w1_vocab)
    with torch.no_grad():
        reduced.markov_head.markov_w1.weight.normal_()  # every W1 row matters, the OOV row of "draft" too
    export(engine, reduced, target, tmp_path / "out", dtype=torch.float32)
    full = DSparkModel.from_pretrained(tmp_path / "out")  # a valid full-vocabulary dspark drafter
    assert not full.config.reduced_vocab and full.config.markov_rank == reduced.config.markov_rank + 1

    want_logits, want_conf = _teacher_forced(reduced, target)  # [1, A, γ, N]
    got_logits, got_conf = _teacher_forced(full, target)  # [1, A, γ, V]
    inside, outside = reduced.draft_ids, ~reduced.t2d
    torch.testing.assert_close(got_logits[..., inside], want_logits, rtol=0, atol=1e-5)
    assert got_logits[..., outside].max() < OUTSIDE_LOGIT / 2
    q_full, q_reduced = got_logits.softmax(-1), want_logits.softmax(-1)
    assert (q_full[..., outside] == 0).all()  # exp(-1e4) underflows to 0 in fp32
    torch.testing.assert_close(q_full[..., inside], q_reduced, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_conf, want_conf, rtol=0, atol=1e-6)

    greedy = SamplingParams()
    a, b = _draft(reduced, target, greedy), _draft(full, target, greedy)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(b.confidences, a.confidences, rtol=0, atol=1e-6)
    # Sampled, the two draw over N and over V: the random streams part after slot 1, whose q is shared.
    hot = SamplingParams(temperature=1.0)
    a, b = _draft(reduced, target, hot), _draft(full, target, hot)
    torch.testing.assert_close(b.q[0], a.q[0], rtol=0, atol=1e-6)
    assert (b.q[:, outside] == 0).all()


def test_full_vocabulary_form_in_bf16_keeps_outside_tokens_out(target, tmp_path):
    reduced = make_model(target, draft_vocab_size=DRAFT_VOCAB)
    _, tensors = export("sglang", reduced, target, tmp_path / "out", dtype=torch.bfloat16)
    r, outside = reduced.config.markov_rank, ~reduced.t2d
    w1, w2 = tensors["markov_head.markov_w1.weight"], tensors["markov_head.markov_w2.weight"]
    assert w1.dtype == torch.bfloat16 and (w1[:, r] == 1).all()
    assert (w2[outside, r] < -9000).all() and (w2[~outside, r] == 0).all()  # -1e4 is -9984 in bf16
    assert (tensors["confidence_head.proj.weight"][:, -1] == 0).all()
    full = DSparkModel.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    logits, _ = _teacher_forced(full, target)
    assert logits[..., outside].max() < -9000
    assert (logits.float().softmax(-1)[..., outside] < 1e-30).all()


def test_full_vocabulary_form_leaves_a_full_vocabulary_drafter_as_it_is(target):
    model = make_model(target)
    assert full_vocabulary_form(model, target) is model


# -- 3. SGLang's STS file ----------------------------------------------------------------------------
STS_FIELDS: dict[str, Callable[[Any], bool]] = {  # DSparkStsCalibration: sglang/srt/speculative/dspark_components/dspark_sts.py:9-14
    "temperatures": lambda v: isinstance(v, list) and len(v) > 0 and all(_float(t) for t in v),  # required, > 0: :17-24
    "dataset": lambda v: isinstance(v, str),
    "num_samples": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "ece_before": lambda v: isinstance(v, list) and all(isinstance(x, float) for x in v),
    "ece_after": lambda v: isinstance(v, list) and all(isinstance(x, float) for x in v),
}
"""msgspec decodes the file strictly by these types (dspark_sts.py:30-31); the planner then
refuses a table whose length is not γ (dspark_planner.py:94-113)."""


def _calibrated_drafter(target, folder: Path) -> dict:
    """A drafter folder with a calibration.json in the shipped drafter's format, cut to γ slots."""
    make_model(target).save_pretrained(folder)
    shipped = json.loads((SHIPPED_DRAFTER / "calibration.json").read_text())
    body = {**shipped, "temperatures": shipped["temperatures"][:GAMMA], "per_slot": shipped["per_slot"][:GAMMA]}
    (folder / "calibration.json").write_text(json.dumps(body))
    return body


def test_sglang_sts_json_has_the_fields_sglang_declares(target, tmp_path):
    body = _calibrated_drafter(target, tmp_path / "drafter")
    report = export_sglang(tmp_path / "drafter", tmp_path / "out", target)
    sts = json.loads((tmp_path / "out" / "sts.json").read_text())
    assert set(sts) <= set(STS_FIELDS), f"fields SGLang does not declare: {set(sts) - set(STS_FIELDS)}"
    for field, ok in STS_FIELDS.items():
        assert field not in sts or ok(sts[field]), field
    assert len(sts["temperatures"]) == GAMMA and sts["temperatures"] == body["temperatures"]
    assert sts["ece_before"] == [s["ece_before"] for s in body["per_slot"]]
    assert sts["num_samples"] == body["rounds"] and sts["dataset"] == ",".join(sorted(body["datasets"]))
    assert f"--speculative-dspark-confidence-sts-path {tmp_path / 'out' / 'sts.json'}" in report.serve[0]
    assert any("SGLANG_RAGGED_VERIFY_MODE" in n for n in report.notes)


def test_sglang_sts_json_decodes_as_dspark_sts_calibration(target, tmp_path):
    """The struct SGLang decodes with, mirrored field for field, decoding strictly (unknown fields refused)."""
    msgspec = pytest.importorskip("msgspec")

    class DSparkStsCalibration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):  # dspark_sts.py:9-14
        temperatures: list[float]
        dataset: str = ""
        num_samples: int = 0
        ece_before: list[float] = []
        ece_after: list[float] = []

    _calibrated_drafter(target, tmp_path / "drafter")
    export_sglang(tmp_path / "drafter", tmp_path / "out", target)
    sts = msgspec.json.decode((tmp_path / "out" / "sts.json").read_bytes(), type=DSparkStsCalibration)
    assert len(sts.temperatures) == GAMMA and all(t > 0 for t in sts.temperatures)
    with pytest.raises(msgspec.ValidationError):  # the mirror is strict enough to fail
        msgspec.json.decode(b'{"temperatures": [1.0], "num_samples": "2000"}', type=DSparkStsCalibration)


def test_sglang_export_without_calibration_notes_it(target, tmp_path):
    make_model(target).save_pretrained(tmp_path / "drafter")
    report = export_sglang(tmp_path / "drafter", tmp_path / "out", target)
    assert not (tmp_path / "out" / "sts.json").exists()
    assert any("no calibration.json" in n for n in report.notes)
    assert "--speculative-dspark-confidence-sts-path" not in report.serve[0]


@pytest.mark.parametrize("change, message", [
    ({"temperatures": [1.0] * (GAMMA + 1)}, f"holds {GAMMA + 1} temperatures; SGLang needs {GAMMA}"),
    ({"temperatures": [1.0, 0.0, 1.0, 1.0]}, "all finite and > 0"),
    ({"method": "isotonic"}, "fitted by 'isotonic'"),
])
def test_sglang_export_refuses_a_calibration_sglang_would_refuse(target, tmp_path, change, message):
    body = _calibrated_drafter(target, tmp_path / "drafter")
    (tmp_path / "drafter" / "calibration.json").write_text(json.dumps({**body, **change}))
    with pytest.raises(DsparkError, match=message):
        export_sglang(tmp_path / "drafter", tmp_path / "out", target)
    assert not (tmp_path / "out").exists()


# -- 4. refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", [*ENGINES, "llama.cpp"])
def test_every_engine_refuses_a_llama_backbone(target, tmp_path, engine):
    with pytest.raises(DsparkError, match="backbone is llama"):
        EXPORTERS[engine](make_model(target, layer_family="llama"), tmp_path / "out", target)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("carried", ["embed_tokens", "lm_head"])
@VOCABS
def test_sglang_refuses_a_drafter_with_its_own_embedding_or_head(target, tmp_path, carried, vocab):
    model = make_model(target, **({"draft_vocab_size": vocab} if vocab else {}))
    rows = model.config.num_draft_tokens if carried == "lm_head" else target.vocab_size
    model.carry(**{carried: torch.randn(rows, 32, generator=torch.Generator().manual_seed(5))})
    with pytest.raises(DsparkError, match=f"cannot export for SGLang: .* carries its own {carried}.weight"):
        export_sglang(model, tmp_path / "out", target)
    assert not (tmp_path / "out").exists()
    EXPORTERS["vllm"](model, tmp_path / "vllm", target)  # vLLM keeps a drafter's own copy (eagle/utils.py:17-33)


def test_the_sts_method_name_is_calibrations():
    """sglang.py names the STS method itself (drafters do not import scheduling); it must be calibrate's."""
    from dspark.drafters.dspark.interop import sglang
    from dspark.scheduling.calibration import METHOD

    assert sglang.METHOD == METHOD
