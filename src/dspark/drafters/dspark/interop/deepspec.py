"""DeepSpec, the authors' code (deepseek-ai/DeepSpec): their checkpoints in, and dspark drafters out.

DeepSpec's layout (``deepspec/modeling/dspark/qwen3/{config,modeling}.py``,
``deepspec/trainer/ckpt_manager.py``; ``deepseek-ai/dspark_qwen3_*_block7``, ``dflash_*_block7``):
an HF folder, ``config.json`` (the target's Qwen3 config plus ``block_size``,
``target_layer_ids``, ``mask_token_id``, ``markov_rank``, ``markov_head_type``,
``enable_confidence_head``, ``confidence_head_with_markov``, ``num_anchors``) and bf16
``model.safetensors`` (or a sharded index) with top-level keys, ``embed_tokens`` and a
full-vocabulary ``lm_head`` included (frozen copies of the target's). dspark's key names are
the authors', so importing is validating and copying: no tensor is renamed or converted.

Exporting writes the same: the asserted ``num_anchors``, the target's embedding and full LM
head (so ``from_pretrained`` initialises nothing), and a reduced vocabulary in its
full-vocabulary form (:func:`~.common.full_vocabulary_form`), since DeepSpec's head and W2
have V rows and it reads no ``d2t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dspark.drafters.dspark.config import DSparkConfig
from dspark.drafters.dspark.interop.common import (
    ENGINE_ARCHITECTURE, ExportReport, check_exportable, check_out, check_tensors, dtype_name, engine_config,
    expected_shapes, full_vocabulary_form, load_drafter, read_config, read_tensors, save, target_weights, write_export,
)
from dspark.drafters.dspark.model import CARRIED_KEYS, DSparkModel, same_tensor
from dspark.errors import DsparkError

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
    check_out(out)
    tensors = read_tensors(src)
    check_tensors(tensors, expected_shapes(config), src)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out)
    save(tensors, out)
    floating = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    notes = ()
    if target is not None:
        notes = tuple(f"{key} differs from the target's: the drafter uses its own copy"
                      for key, reference in target_weights(config, target, tensors.get("d2t")).items()
                      if key in tensors and not same_tensor(tensors[key], reference))
    return ImportReport(
        out=out,
        config=config,
        carried=tuple(k for k in CARRIED_KEYS if k in tensors),
        source_dtype=",".join(sorted(floating)),
        notes=notes,
    )


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
    sizes = (d["hidden_size"], d["num_attention_heads"])
    if d.get("head_dim") is None:
        d.pop("head_dim", None)
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):  # else DrafterConfig names the bad field
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




# -- dspark -> DeepSpec ----------------------------------------------------------------------
NUM_ANCHORS = 512
"""``num_anchors`` of every released DeepSpec config (training only; ``Qwen3DSparkModel.__init__`` asserts it)."""


def export_deepspec(src: str | Path | DSparkModel, out: str | Path, target, dtype: torch.dtype = torch.bfloat16) -> ExportReport:
    """Write the drafter as a DeepSpec checkpoint that ``Qwen3DSparkModel.from_pretrained`` loads whole."""
    out, model = Path(out), load_drafter(src)
    check_exportable(model.config, "DeepSpec")
    model.config.check_target(target)
    full = full_vocabulary_form(model, target)
    # the target's embedding and full head, unless the drafter carries an embedding of its own
    tensors = {**full.state_dict(), **target_weights(full.config, target, None), **full.carried()}
    config = {**engine_config(full.config, target, dtype), "num_anchors": NUM_ANCHORS}
    notes = []
    if model.config.reduced_vocab:
        notes.append(f"the {model.config.num_draft_tokens}-token draft vocabulary is written over all "
                     f"{model.config.vocab_size} tokens (Markov rank {model.config.markov_rank} + 1 masks the rest)")
    keys = write_export(out, config, tensors, dtype)
    return ExportReport(engine="deepspec", out=out, dtype=dtype_name(dtype), keys=keys, notes=tuple(notes),
                        serve=(f"Qwen3DSparkModel.from_pretrained('{out}')  # deepspec.modeling.dspark.qwen3",))
