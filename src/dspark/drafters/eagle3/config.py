"""Eagle3Config: the EAGLE-3 baseline drafter's frozen configuration and its config.json form.

The layout follows released EAGLE-3 checkpoints where it can (``draft_vocab_size``,
``target_hidden_size``, ``eagle_config.eagle_aux_hidden_state_layer_ids``, the ``midlayer.*``
tensor names); ``dspark_drafter: "eagle3"`` tells a dspark loader what the folder holds.
Feature layer ids use dspark's "output of HF layer k" convention (hidden_states[k + 1]), the
same as DSpark's, so both drafters can be trained on the same target layers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark.drafters.dspark.config import spread_layers

LAYER_FAMILIES = ("llama", "qwen3")
DRAFTER_KIND = "eagle3"
"""The ``dspark_drafter`` field of an EAGLE-3 config.json."""


@dataclass(frozen=True)
class Eagle3Config:
    """Shape and behaviour of an EAGLE-3 drafter for one target model."""

    # -- the target it was trained for ------------------------------------------------
    target_name: str
    """Name or path of the target model, recorded for humans."""
    vocab_size: int
    """Target vocabulary size (rows of its embedding and LM head)."""
    hidden_size: int
    """Target (and drafter) width d; the embedding and LM head are the target's."""
    num_target_layers: int
    """Target depth; feature layer ids must be below num_target_layers - 1."""
    target_layer_ids: tuple[int, ...]
    """Fused feature layers (low, mid, high in EAGLE-3; DSpark's layers by default here)."""
    # -- the drafter --------------------------------------------------------------------
    block_size: int = 7
    """γ: chain-drafted tokens per round, and the training-time-test horizon."""
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    hidden_act: str = "silu"
    layer_family: str = "llama"
    """transformers family of the one decoder layer: the target's (llama for SmolLM2) or qwen3."""
    draft_vocab_size: int = 0
    """N: tokens the drafter predicts over (rows of the target head named by d2t/t2d);
    0 means the whole target vocabulary."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Unrecognised config.json fields, kept so a round trip loses nothing."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        ids = list(self.target_layer_ids)
        if not ids:
            raise ValueError("target_layer_ids must name at least one target layer")
        if ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.num_target_layers - 1:
            raise ValueError(
                f"target_layer_ids {ids} must be strictly increasing in 0..{self.num_target_layers - 2}"
            )
        if self.layer_family not in LAYER_FAMILIES:
            raise ValueError(f"layer_family must be one of {LAYER_FAMILIES}, got {self.layer_family!r}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 0..{self.vocab_size}, got {self.draft_vocab_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def num_draft_tokens(self) -> int:
        """N, the size of the draft vocabulary (V when it is the whole target vocabulary)."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def reduced_vocab(self) -> bool:
        return self.num_draft_tokens < self.vocab_size

    def replace(self, **changes: Any) -> "Eagle3Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_target(cls, target, **overrides: Any) -> "Eagle3Config":
        """Copy the target's shapes; the same 5 spread feature layers as DSpark's default."""
        cfg = target.model.config
        n = cfg.num_hidden_layers
        rope = getattr(cfg, "rope_parameters", None) or {}
        values: dict[str, Any] = dict(
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
            hidden_act=getattr(cfg, "hidden_act", "silu"),
            layer_family="qwen3" if getattr(cfg, "model_type", "") == "qwen3" else "llama",
        )
        values.update(overrides)
        values["target_layer_ids"] = tuple(values["target_layer_ids"])
        return cls(**values)

    def check_target(self, target) -> None:
        """Raise IncompatibleDrafterError unless ``target`` is the model this was built for."""
        from dspark.errors import IncompatibleDrafterError

        cfg = target.model.config
        problems = []
        if target.vocab_size != self.vocab_size:
            problems.append(f"vocabulary {target.vocab_size} != {self.vocab_size}")
        if cfg.hidden_size != self.hidden_size:
            problems.append(f"hidden size {cfg.hidden_size} != {self.hidden_size}")
        if cfg.num_hidden_layers != self.num_target_layers:
            problems.append(f"layer count {cfg.num_hidden_layers} != {self.num_target_layers}")
        if problems:
            raise IncompatibleDrafterError(
                f"this EAGLE-3 drafter was trained for {self.target_name!r} and does not fit target "
                f"{target.name!r}: " + "; ".join(problems)
            )

    # -- config.json ----------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            architectures=["LlamaForCausalLMEagle3" if self.layer_family == "llama" else "Qwen3ForCausalLMEagle3"],
            model_type=self.layer_family,
            dspark_drafter=DRAFTER_KIND,
            dspark_target_name=self.target_name,
            vocab_size=self.vocab_size,
            draft_vocab_size=self.num_draft_tokens,
            hidden_size=self.hidden_size,
            target_hidden_size=self.hidden_size,
            num_target_layers=self.num_target_layers,
            target_layer_ids=list(self.target_layer_ids),
            eagle_config={"eagle_aux_hidden_state_layer_ids": list(self.target_layer_ids)},
            block_size=self.block_size,
            num_hidden_layers=1,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            attention_bias=False,
            tie_word_embeddings=False,
        )
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "Eagle3Config":
        if d.get("dspark_drafter") != DRAFTER_KIND:
            raise ValueError("config.json does not describe an EAGLE-3 drafter (dspark_drafter != 'eagle3')")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "target_name", "layer_family"}
        values = {k: d[k] for k in known if k in d}
        values["target_layer_ids"] = tuple(d["target_layer_ids"])
        values["target_name"] = d.get("dspark_target_name", "unknown")
        values["layer_family"] = d.get("model_type", "llama")
        if values.get("draft_vocab_size") == values.get("vocab_size"):
            values["draft_vocab_size"] = 0
        values["extra"] = {k: v for k, v in d.items() if k not in known and k not in _WRITTEN}
        return cls(**values)

    def save(self, folder: str | Path) -> None:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "Eagle3Config":
        return cls.from_json_dict(json.loads((Path(folder) / "config.json").read_text()))


_WRITTEN = {
    "architectures", "model_type", "dspark_drafter", "dspark_target_name", "target_hidden_size",
    "eagle_config", "num_hidden_layers", "attention_bias", "tie_word_embeddings",
}


def is_eagle3_folder(folder: str | Path) -> bool:
    """True when ``folder/config.json`` names an EAGLE-3 drafter."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()).get("dspark_drafter") == DRAFTER_KIND
    except (OSError, ValueError, AttributeError):
        return False
