"""Eagle3Config: the EAGLE-3 baseline drafter's frozen configuration and its config.json form.

The layout follows released EAGLE-3 checkpoints where it can (``draft_vocab_size``,
``target_hidden_size``, ``eagle_config.eagle_aux_hidden_state_layer_ids``, the ``midlayer.*``
tensor names); ``dspark_drafter: "eagle3"`` tells a dspark loader what the folder holds.
Feature layer ids use dspark's "output of HF layer k" convention (hidden_states[k + 1]), the
same as DSpark's, so both drafters can be trained on the same target layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dspark.drafters.drafter_config import DrafterConfig, load_json, values_from_json

ARCHITECTURES = {"llama": "LlamaForCausalLMEagle3", "qwen3": "Qwen3ForCausalLMEagle3", "gemma3": "Gemma3ForCausalLMEagle3"}
DRAFTER_KIND = "eagle3"
"""The ``dspark_drafter`` field of an EAGLE-3 config.json."""


@dataclass(frozen=True)
class Eagle3Config(DrafterConfig):
    """Shape and behaviour of an EAGLE-3 drafter for one target model.

    The target's fields and the layer fields are :class:`DrafterConfig`'s: ``target_layer_ids``
    are the fused feature layers (low, mid, high in EAGLE-3; DSpark's layers by default here),
    ``block_size`` γ the chain-drafted tokens per round and the training-time-test horizon.
    """

    KIND: ClassVar[str] = "EAGLE-3 drafter"

    layer_family: str = "llama"
    """transformers family of the one decoder layer: the target's own where dspark has it
    (llama for SmolLM2, gemma3 for Gemma 3), else llama, the family EAGLE-3 releases use."""

    # -- config.json ----------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        d = self.common_json()
        d.update(
            architectures=[ARCHITECTURES[self.layer_family]],
            dspark_drafter=DRAFTER_KIND,
            eagle_config={"eagle_aux_hidden_state_layer_ids": list(self.target_layer_ids)},
            num_hidden_layers=1,
        )
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "Eagle3Config":
        if d.get("dspark_drafter") != DRAFTER_KIND:
            raise ValueError("config.json does not describe an EAGLE-3 drafter (dspark_drafter != 'eagle3')")
        if d.get("num_hidden_layers", 1) != 1:
            raise ValueError(f"num_hidden_layers must be 1 (an EAGLE-3 drafter has one decoder layer), "
                             f"got {d['num_hidden_layers']!r}")
        return cls(**values_from_json(cls, d, _WRITTEN))


_WRITTEN = {"architectures", "dspark_drafter", "eagle_config", "num_hidden_layers"}


def is_eagle3_folder(folder: str | Path) -> bool:
    """True when ``folder/config.json`` names an EAGLE-3 drafter."""
    try:
        return load_json(folder).get("dspark_drafter") == DRAFTER_KIND
    except (OSError, ValueError, AttributeError):
        return False
