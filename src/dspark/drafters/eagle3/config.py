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

from dspark.drafters import drafter_config
from dspark.drafters.families import family_json_fields

ARCHITECTURES = {"llama": "LlamaForCausalLMEagle3", "qwen3": "Qwen3ForCausalLMEagle3", "gemma3": "Gemma3ForCausalLMEagle3"}
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
    """transformers family of the one decoder layer: the target's own where dspark has it
    (llama for SmolLM2, gemma3 for Gemma 3), else llama, the family EAGLE-3 releases use."""
    query_pre_attn_scalar: int = 0
    """gemma3 only: attention scores are scaled by query_pre_attn_scalar ** -0.5 (0 = head_dim)."""
    final_logit_softcapping: float | None = None
    """The target's cap on its final logits (Gemma: cap · tanh(z / cap)), applied to the
    drafter's logits the same way; None where the target has none."""
    draft_vocab_size: int = 0
    """N: tokens the drafter predicts over (rows of the target head named by d2t/t2d);
    0 means the whole target vocabulary."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Unrecognised config.json fields, kept so a round trip loses nothing."""

    def __post_init__(self) -> None:
        drafter_config.check_shapes(self)

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
        """Copy the target's shapes as DSparkConfig.for_target does (the same 5 spread feature
        layers, the target's family, Gemma's global rope, scalar and soft cap); llama for
        targets dspark has no family for."""
        values = drafter_config.target_shapes(target, default_family="llama")
        values.update(overrides)
        values["target_layer_ids"] = tuple(values["target_layer_ids"])
        return cls(**values)

    def check_target(self, target) -> None:
        """Raise IncompatibleDrafterError unless ``target`` is the model this was built for."""
        drafter_config.check_target(self, target, "EAGLE-3 drafter")

    # -- config.json ----------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            architectures=[ARCHITECTURES[self.layer_family]],
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
        d.update(family_json_fields(self))
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "Eagle3Config":
        if d.get("dspark_drafter") != DRAFTER_KIND:
            raise ValueError("config.json does not describe an EAGLE-3 drafter (dspark_drafter != 'eagle3')")
        return cls(**drafter_config.values_from_json(cls, d, _WRITTEN, default_family="llama"))

    def save(self, folder: str | Path) -> None:
        drafter_config.save_json(self.to_json_dict(), folder)

    @classmethod
    def load(cls, folder: str | Path) -> "Eagle3Config":
        return cls.from_json_dict(drafter_config.load_json(folder))


_WRITTEN = {
    "architectures", "model_type", "dspark_drafter", "dspark_target_name", "target_hidden_size",
    "eagle_config", "num_hidden_layers", "attention_bias", "tie_word_embeddings", "hidden_activation",
}


def is_eagle3_folder(folder: str | Path) -> bool:
    """True when ``folder/config.json`` names an EAGLE-3 drafter."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()).get("dspark_drafter") == DRAFTER_KIND
    except (OSError, ValueError, AttributeError):
        return False
