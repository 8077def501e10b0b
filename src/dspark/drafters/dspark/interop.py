"""Checkpoint interop: the authors' DeepSpec checkpoints in, vLLM / SGLang drafters out.

Layouts (as read from DeepSpec's ``qwen3/{config,modeling}.py`` and ``ckpt_manager.py``, vLLM's
``qwen3_dspark.py`` and ``config/speculative.py``, SGLang's ``models/dspark.py``):

- **DeepSpec** (``deepseek-ai/dspark_qwen3_*_block7``, ``dflash_*_block7``): an HF folder,
  ``config.json`` (the target's Qwen3 config plus ``block_size``, ``target_layer_ids``,
  ``mask_token_id``, ``markov_rank``, ``markov_head_type``, ``enable_confidence_head``,
  ``confidence_head_with_markov``, ``num_anchors``) and bf16 ``model.safetensors`` (or a
  sharded index) with top-level keys, ``embed_tokens`` and ``lm_head`` included (frozen
  copies of the target's). dspark's own key names are the authors', so importing is
  validating and copying: no tensor is renamed or converted.
- **vLLM / SGLang** (``Qwen3DSparkModel``): the same layout. Both engines serve a Qwen3-style
  backbone (per-head q/k RMSNorm) with the vanilla Markov head and ``markov_rank > 0``;
  ``lm_head`` plus ``d2t`` are required for a reduced draft vocabulary; ``embed_tokens`` and a
  full-vocabulary ``lm_head`` are optional (vLLM shares the target's when absent or equal,
  SGLang always uses the target's).

Both directions are pure functions of folders and loaded models; the CLI
(:mod:`dspark.cli.convert`) only loads the target and prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dspark.drafters.dspark.config import DSparkConfig
from dspark.drafters.dspark.model import CARRIED_KEYS, WEIGHTS_NAME, DSparkModel, same_tensor
from dspark.drafters.dspark.vocab import check_draft_ids, d2t_t2d, draft_ids_from_d2t
from dspark.errors import DsparkError

INDEX_NAME = "model.safetensors.index.json"
ENGINE_ARCHITECTURE = "Qwen3DSparkModel"
"""The one architecture string vLLM and SGLang route to their Qwen3 DSpark drafter (exactly)."""
VERIFIED_TARGETS = ("qwen3", "qwen3_moe")
"""Target families upstream has served DSpark drafters for (vLLM #46995, SGLang ``set_dflash_layers_to_capture``)."""
REQUIRED_FIELDS = ("target_layer_ids", "mask_token_id", "enable_confidence_head", "markov_rank")
"""config.json fields DeepSpec's ``Qwen3DSparkModel.__init__`` asserts (besides the two below)."""
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
"""The target's HF config fields a DeepSpec config.json always carries and dspark needs."""


@dataclass(frozen=True)
class ImportReport:
    """What ``import_deepspec`` wrote."""

    out: Path
    config: DSparkConfig
    carried: tuple[str, ...]
    """Embedding/LM head keys kept from the checkpoint."""
    source_dtype: str
    """dtype of the checkpoint's floating tensors (written unchanged)."""
    notes: tuple[str, ...] = ()
    """Things the user should know (one line each), such as a carried copy that differs from the target's."""

    @property
    def drafter_spec(self) -> str:
        """The ``--drafter`` that loads the result."""
        return f"{'dflash' if self.config.is_dflash else 'dspark'}:{self.out}"


@dataclass(frozen=True)
class ExportReport:
    """What ``export_for_engines`` wrote."""

    out: Path
    dtype: str
    keys: tuple[str, ...]
    notes: tuple[str, ...]
    """Things the user should know (one line each), such as a carried copy SGLang will ignore."""


# -- DeepSpec -> dspark -------------------------------------------------------------------
def import_deepspec(src: str | Path, out: str | Path, target=None) -> ImportReport:
    """Validate the DeepSpec DSpark/DFlash checkpoint in ``src`` and write it as a dspark drafter to ``out``.

    Refuses (``DsparkError``, one line) a config without the required fields, an architecture
    other than ``Qwen3DSparkModel``, unknown tensor names and wrong shapes, and with
    ``target`` a drafter that does not fit it; nothing is written then. The carried
    ``embed_tokens``/``lm_head`` are kept; tensors are written as they are (bf16 for the
    authors' releases).
    """
    src, out = Path(src), Path(out)
    raw = read_config(src)
    config = deepspec_config(raw, src, target)
    if target is not None:
        config.check_target(target)
    _check_out(out)
    tensors = read_tensors(src)
    check_tensors(tensors, expected_shapes(config), src)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out)
    _save(tensors, out)
    floating = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    notes = ()
    if target is not None:
        notes = tuple(f"{key} differs from the target's: the drafter uses its own copy"
                      for key, reference in _target_weights(config, target, tensors.get("d2t")).items()
                      if key in tensors and not same_tensor(tensors[key], reference))
    return ImportReport(
        out=out,
        config=config,
        carried=tuple(k for k in CARRIED_KEYS if k in tensors),
        source_dtype=",".join(sorted(floating)),
        notes=notes,
    )


def _target_weights(config: DSparkConfig, target, d2t: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The target's embedding # [V, d] and LM head rows of the draft tokens # [N, d], by carried key."""
    embed = target.model.get_input_embeddings().weight.detach()
    head = target.model.get_output_embeddings().weight.detach()
    if config.reduced_vocab:
        head = head[draft_ids_from_d2t(d2t).to(head.device)]
    return {"embed_tokens.weight": embed, "lm_head.weight": head}


def read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise DsparkError(f"{src} is not a checkpoint folder (no config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DsparkError(f"{path} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DsparkError(f"{path} is not a JSON object")
    return raw


def deepspec_config(raw: dict[str, Any], src: Path, target=None) -> DSparkConfig:
    """The DSparkConfig of a DeepSpec config.json, checked as DeepSpec checks it on load."""
    where = src / "config.json"
    if "speculators_model_type" in raw:
        raise DsparkError(f"{where} is a speculators checkpoint ({raw['speculators_model_type']}), not DeepSpec's layout; "
                          "dspark imports DeepSpec checkpoints")
    architectures = raw.get("architectures") or []
    if "Gemma4DSparkModel" in architectures:
        raise DsparkError(f"{where}: Gemma4 DSpark checkpoints (Gemma4DSparkModel) are not supported yet; "
                          "dspark imports Qwen3DSparkModel checkpoints")
    if architectures != [ENGINE_ARCHITECTURE]:
        raise DsparkError(f"{where}: architectures is {architectures}, expected [{ENGINE_ARCHITECTURE!r}] "
                          "(a DeepSpec Qwen3 DSpark/DFlash checkpoint)")
    required = list(REQUIRED_FIELDS)
    if isinstance(raw.get("markov_rank"), int) and raw["markov_rank"] > 0:
        required.append("markov_head_type")
    if raw.get("enable_confidence_head") is True:
        required.append("confidence_head_with_markov")
    required += [f for f in SHAPE_FIELDS if f not in required]
    if target is None:
        required.append("num_target_layers")
    missing = [f for f in required if f not in raw]
    if missing:
        hint = " (or give the target, which supplies num_target_layers)" if missing == ["num_target_layers"] else ""
        raise DsparkError(f"{where} lacks the required field{'s' if len(missing) > 1 else ''} {', '.join(missing)}{hint}")
    d = dict(raw)
    if "num_target_layers" not in d:
        d["num_target_layers"] = target.model.config.num_hidden_layers
    _check_supported(d, where)
    if d.get("head_dim") is None:
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    if d.get("num_key_value_heads") is None:
        d["num_key_value_heads"] = d["num_attention_heads"]
    if "dspark_target_name" not in d and "_name_or_path" not in d and target is not None:
        d["dspark_target_name"] = target.name
    try:
        return DSparkConfig.from_json_dict(d)
    except (TypeError, ValueError) as exc:
        raise DsparkError(f"{where}: {exc}") from None


def _check_supported(d: dict[str, Any], where: Path) -> None:
    """Refuse what the dspark backbone would silently compute differently."""
    if d.get("model_type", "qwen3") != "qwen3":
        raise DsparkError(f"{where}: model_type {d['model_type']!r} is not a Qwen3 DSpark backbone")
    if d.get("markov_rank", 0) > 0 and d.get("markov_head_type") != "vanilla":
        raise DsparkError(f"{where}: markov_head_type {d.get('markov_head_type')!r} is not supported yet "
                          "(dspark imports the vanilla Markov head of the released checkpoints)")
    if d.get("sample_from_anchor") is False or d.get("dspark_bonus_anchor") is True:
        raise DsparkError(f"{where}: the 1+N block layout (anchor as bonus token) is not supported; "
                          "dspark drafts with the anchor as the first slot, as DeepSpec does")
    if d.get("attention_bias"):
        raise DsparkError(f"{where}: attention_bias true is not supported (the dspark backbone has no attention biases)")
    layer_types = d.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise DsparkError(f"{where}: layer_types {sorted(set(layer_types))} are not supported (full_attention only)")
    if d.get("use_sliding_window"):
        raise DsparkError(f"{where}: use_sliding_window is not supported (full attention only)")
    rope = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or d.get("rope_scaling"):
        raise DsparkError(f"{where}: rope scaling ({d.get('rope_scaling') or rope_type}) is not supported (default RoPE only)")
    if d.get("hidden_act", "silu") != "silu":
        raise DsparkError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (silu only)")


def expected_shapes(config: DSparkConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, with its shape; the carried
    ``embed_tokens`` [V, d] and ``lm_head`` [N, d] included (they are optional)."""
    with torch.device("meta"):
        model = DSparkModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["embed_tokens.weight"] = (config.vocab_size, config.hidden_size)
    shapes["lm_head.weight"] = (config.num_draft_tokens, config.hidden_size)
    return shapes


def read_tensors(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``src``: ``model.safetensors`` or the shards its index names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = src / INDEX_NAME
    if (src / WEIGHTS_NAME).is_file():
        files = [src / WEIGHTS_NAME]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DsparkError(f"{index} is not a safetensors index: {exc}") from None
        files = [src / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise DsparkError(f"{index} names shard {f.name}, which is not in {src}")
    else:
        raise DsparkError(f"{src} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (OSError, SafetensorError) as exc:
            raise DsparkError(f"could not read {f}: {exc}") from None
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise DsparkError(f"{f.name} repeats tensors of another shard: {', '.join(twice[:3])}")
        tensors.update(part)
    return tensors


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], src: Path) -> None:
    """Refuse unknown names, missing tensors (embed/LM head may be absent) and wrong shapes."""
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise DsparkError(f"{src}: unknown tensor{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:3])}{more} "
                          "(not part of a DSpark drafter of this config)")
    missing = sorted(set(expected) - set(tensors) - set(CARRIED_KEYS))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DsparkError(f"{src}: missing tensor{'s' if len(missing) > 1 else ''} {', '.join(missing[:3])}{more}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != expected[key]:
            raise DsparkError(f"{src}: {key} is {list(tensor.shape)}, expected {list(expected[key])} from config.json")
    if "d2t" in tensors:
        vocab = expected["t2d"][0]
        try:
            ids = draft_ids_from_d2t(tensors["d2t"].long())
            check_draft_ids(ids, vocab)
        except ValueError as exc:
            raise DsparkError(f"{src}: d2t is not a valid draft vocabulary: {exc}") from None
        if not torch.equal(d2t_t2d(ids, vocab)[1], tensors["t2d"].bool()):
            raise DsparkError(f"{src}: t2d does not match d2t")


# -- dspark -> vLLM / SGLang ----------------------------------------------------------------
def check_exportable(config: DSparkConfig) -> None:
    """Refuse, in one line, a drafter vLLM or SGLang cannot serve (needs only the config)."""
    if config.layer_family != "qwen3":
        why = {"llama": "no q/k norm", "gemma3": "sandwich norms"}
        raise DsparkError(
            f"vLLM and SGLang serve Qwen3-style DSpark drafters ({ENGINE_ARCHITECTURE}) only; this drafter's "
            f"backbone is {config.layer_family} ({why.get(config.layer_family, 'not Qwen3')}), "
            "so it cannot be exported for them"
        )
    if config.final_logit_softcapping is not None:
        raise DsparkError("vLLM's and SGLang's DSpark drafters do not soft-cap draft logits; this drafter caps them "
                          f"at {config.final_logit_softcapping} as its target does, so it cannot be exported for them")
    if config.markov_rank == 0:
        raise DsparkError("vLLM's and SGLang's DSpark drafters require markov_rank > 0; "
                          "a DFlash drafter (markov_rank 0) cannot be exported for them")
    if config.markov_head_type != "vanilla":
        raise DsparkError(f"the {config.markov_head_type} Markov head has no vLLM destination "
                          "(vLLM serves the vanilla head only); it cannot be exported for vLLM and SGLang")
    if config.hidden_act != "silu":
        raise DsparkError(f"SGLang's DSpark MLP is silu only; this drafter uses {config.hidden_act}")


def export_for_engines(src_or_model: str | Path | DSparkModel, out: str | Path, target,
                       dtype: torch.dtype = torch.bfloat16) -> ExportReport:
    """Write the drafter in the layout vLLM (``method: dspark``) and SGLang (``DSPARK``) load.

    ``target`` is the loaded target (:class:`~dspark.target.TargetModel`): the drafter is
    checked against it, and a reduced draft vocabulary takes its LM head rows from it
    (vLLM requires ``lm_head`` with ``d2t`` then). Floating tensors are written in ``dtype``.
    Carried ``embed_tokens``/``lm_head`` are written back as they are; a drafter that borrows
    them writes none (both engines use the target's). Nothing is written on a refusal.
    """
    out = Path(out)
    model = src_or_model if isinstance(src_or_model, DSparkModel) else DSparkModel.from_pretrained(src_or_model)
    config = model.config
    check_exportable(config)
    config.check_target(target)
    model.check_draft_vocab()
    _check_out(out)
    carried = model.carried()
    tensors = {**model.state_dict(), **carried}
    if config.markov_w1_vocab == "draft":  # the engines index W1 by target id: expand it to V rows
        w1 = "markov_head.markov_w1.weight"
        tensors[w1] = tensors[w1][model.markov_rows(torch.arange(config.vocab_size, device=tensors[w1].device))]
    reference = _target_weights(config, target, getattr(model, "d2t", None))
    if config.reduced_vocab and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = reference["lm_head.weight"]
    notes = []
    for key, weight in carried.items():
        if not same_tensor(weight, reference[key]):
            notes.append(f"{key} differs from the target's: vLLM keeps the drafter's own, "
                         "SGLang always uses the target's (its drafts will differ)")
    family = getattr(target.model.config, "model_type", "?")
    if family not in VERIFIED_TARGETS:
        notes.append(f"the target is {family}: vLLM and SGLang serve DSpark for targets that expose their "
                     f"hidden states to drafters ({', '.join(VERIFIED_TARGETS)} verified upstream); check yours")
    if not config.enable_confidence_head:
        notes.append("no confidence head: vLLM's adaptive verification and SGLang's non-static "
                     "SGLANG_RAGGED_VERIFY_MODE need one")
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(engine_config(config, target, dtype), indent=2, sort_keys=True) + "\n")
    _save(state, out)
    return ExportReport(out=out, dtype=_dtype_name(dtype), keys=tuple(sorted(state)), notes=tuple(notes))


def engine_config(config: DSparkConfig, target, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for vLLM / SGLang: the authors' layout, with every field those engines read."""
    d = config.to_json_dict()
    d.pop("markov_w1_vocab", None)  # written expanded to the V-row layout the engines read
    target_cfg = target.model.config
    d.update(
        architectures=[ENGINE_ARCHITECTURE],
        model_type="qwen3",
        tie_word_embeddings=False,
        num_target_layers=target_cfg.num_hidden_layers,
        target_hidden_size=target_cfg.hidden_size,
        # vLLM caps the draft's rotary cache and max_model_len at the draft's own value.
        max_position_embeddings=max(config.max_position_embeddings,
                                    getattr(target_cfg, "max_position_embeddings", 0) or 0),
        dtype=_dtype_name(dtype),
    )
    d.pop("torch_dtype", None)
    return d


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DsparkError(f"{out} already exists and is not an empty folder; choose a new output folder")


def _save(tensors: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
