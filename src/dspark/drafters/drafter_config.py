"""What the drafter configs (DSparkConfig, Eagle3Config) share: the target's shapes they copy,
the checks of those shapes, and the config.json round trip.

Both configs are frozen dataclasses with the target fields (``target_name``, ``vocab_size``,
``hidden_size``, ``num_target_layers``, ``target_layer_ids``), the layer fields of
:func:`~dspark.drafters.families.family_blocks`, ``block_size``, ``draft_vocab_size`` and
``extra`` (config.json fields they do not know, kept so a round trip loses nothing).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dspark.drafters.families import LAYER_FAMILIES, family_of

CONFIG_NAME = "config.json"


def spread_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layer ids spread from layer 1 to the second-to-last (DeepSpec's spacing)."""
    last = num_layers - 2  # output of the last layer is the normed final state: excluded
    count = max(1, min(count, last))
    if count == 1:
        return (last,)
    start = 1 if last >= count else 0
    step = (last - start) / (count - 1)
    return tuple(sorted({round(start + i * step) for i in range(count)}))


def target_shapes(target, default_family: str) -> dict[str, Any]:
    """The config fields copied from ``target``, with 5 feature layers spread over its depth.

    The layer family follows the target's ``model_type``
    (:func:`~dspark.drafters.families.family_of`, ``default_family`` for other targets).
    Gemma 3 targets mix sliding-window layers (local rope, θ = 10k) with full-attention layers
    (global rope, θ = 1M); a drafter's layers all attend to the whole context they see, so
    they take the full-attention layers' rope.
    """
    cfg = target.model.config
    n = cfg.num_hidden_layers
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return dict(
        target_name=target.name,
        vocab_size=target.vocab_size,
        hidden_size=cfg.hidden_size,
        num_target_layers=n,
        target_layer_ids=spread_layers(n, 5),
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
        max_position_embeddings=getattr(cfg, "max_position_embeddings", 8192),
        hidden_act=getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "silu",
        layer_family=family_of(getattr(cfg, "model_type", ""), default_family),
        query_pre_attn_scalar=int(getattr(cfg, "query_pre_attn_scalar", None) or 0),
        final_logit_softcapping=float(softcap) if softcap else None,
    )


def check_shapes(config) -> None:
    """Raise ValueError unless the fields both configs have are consistent (their ``__post_init__``)."""
    if config.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {config.block_size}")
    if not config.target_layer_ids:
        raise ValueError("target_layer_ids must name at least one target layer")
    ids = list(config.target_layer_ids)
    if ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= config.num_target_layers - 1:
        raise ValueError(
            f"target_layer_ids {ids} must be strictly increasing in 0..{config.num_target_layers - 2}"
            " (the final, normed layer is never a feature layer)"
        )
    if config.layer_family not in LAYER_FAMILIES:
        raise ValueError(f"layer_family must be one of {', '.join(LAYER_FAMILIES)}, got {config.layer_family!r}")
    if config.query_pre_attn_scalar < 0:
        raise ValueError("query_pre_attn_scalar must be >= 0 (0 = head_dim)")
    if config.final_logit_softcapping is not None and config.final_logit_softcapping <= 0:
        raise ValueError("final_logit_softcapping must be > 0 or None")
    if not 0 <= config.draft_vocab_size <= config.vocab_size:
        raise ValueError(f"draft_vocab_size must be in 0..{config.vocab_size}, got {config.draft_vocab_size}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def check_target(config, target, what: str) -> None:
    """Raise IncompatibleDrafterError unless ``target`` is the model ``config`` was built for."""
    from dspark.errors import IncompatibleDrafterError

    cfg = target.model.config
    problems = []
    if target.vocab_size != config.vocab_size:
        problems.append(f"vocabulary {target.vocab_size} != {config.vocab_size}")
    if cfg.hidden_size != config.hidden_size:
        problems.append(f"hidden size {cfg.hidden_size} != {config.hidden_size}")
    if cfg.num_hidden_layers != config.num_target_layers:
        problems.append(f"layer count {cfg.num_hidden_layers} != {config.num_target_layers}")
    if problems:
        raise IncompatibleDrafterError(
            f"this {what} was trained for {config.target_name!r} and does not fit target "
            f"{target.name!r}: " + "; ".join(problems)
        )


# -- config.json -------------------------------------------------------------------------------------
def values_from_json(cls, d: dict[str, Any], written: set[str], default_family: str) -> dict[str, Any]:
    """The dataclass ``cls``'s field values from a config.json dict ``d``.

    Fields named as the dataclass's are read as they are; ``target_name`` is
    ``dspark_target_name``, ``layer_family`` is ``model_type``. A draft vocabulary written as V
    (full-vocabulary checkpoints) becomes 0. What neither the dataclass nor ``written`` (the
    fields the config writes for others to read) names goes to ``extra``.
    """
    known = {f.name for f in dataclasses.fields(cls)} - {"extra", "target_name", "layer_family"}
    values = {k: d[k] for k in known if k in d}
    values["target_layer_ids"] = tuple(d["target_layer_ids"])
    values["target_name"] = d.get("dspark_target_name", d.get("_name_or_path", "unknown"))
    values["layer_family"] = d.get("model_type", default_family)
    if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
        values["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
    if values.get("draft_vocab_size") == values.get("vocab_size"):
        values["draft_vocab_size"] = 0  # written as V by full-vocabulary checkpoints
    values["extra"] = {k: v for k, v in d.items() if k not in known and k not in written}
    return values


def save_json(d: dict[str, Any], folder: str | Path) -> None:
    """Write ``folder/config.json`` (sorted keys, so equal configs give equal files)."""
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def load_json(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / CONFIG_NAME).read_text())
