"""DSparkConfig: the drafter's frozen configuration and its config.json form.

Field names follow the authors' released DeepSpec checkpoints (``block_size``,
``target_layer_ids``, ``mask_token_id``, ``markov_rank``, ``markov_head_type``,
``enable_confidence_head``, ``confidence_head_with_markov``) so those checkpoints load and
our exports load in vLLM / SGLang without renaming. With ``markov_rank = 0`` and the
confidence head off, the drafter is exactly the DFlash baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dspark.drafters.drafter_config import DrafterConfig, values_from_json

ARCHITECTURES = {"qwen3": "Qwen3DSparkModel", "llama": "LlamaDSparkModel", "gemma3": "Gemma3DSparkModel"}
MARKOV_HEAD_TYPES = ("vanilla", "rnn")
MARKOV_W1_VOCABS = ("target", "draft")


@dataclass(frozen=True)
class DSparkConfig(DrafterConfig):
    """Shape and behaviour of a DSpark (or DFlash) drafter for one target model.

    The target's fields and the layer fields are :class:`DrafterConfig`'s. ``block_size`` γ:
    the anchor is slot 1 of a block, so a full verify covers γ + 1 tokens.
    """

    layer_family: str = "qwen3"
    """transformers block family of the backbone: qwen3 for every target unless asked
    otherwise (the one family vLLM, SGLang and llama.cpp serve; a Qwen3 backbone drafts for a
    Llama or Gemma target as well), or the target's own (llama, gemma3)."""
    mask_token_id: int = 0
    """Vocabulary row fed to slots 2..γ (a spare token of the target vocabulary)."""
    num_hidden_layers: int = 2
    """Draft transformer layers in the parallel backbone."""
    markov_rank: int = 256
    """r of the low-rank Markov head W1 (V×r) · W2 (r×V); 0 turns the head off (DFlash)."""
    markov_head_type: str = "vanilla"
    """"vanilla" (first-order Markov bias, eq. 5) or "rnn" (gated recurrent head, eq. 6)."""
    enable_confidence_head: bool = True
    """Predict c_k, the probability that slot k survives given the earlier slots did."""
    confidence_head_with_markov: bool = True
    """Feed W1[x_{k-1}] to the confidence head besides h_k (eq. 7)."""
    markov_w1_vocab: str = "target"
    """Rows of W1: "target" (one per target token, V × r, the authors' layout) or "draft" (one
    per draft token plus one shared row for every token outside the draft vocabulary,
    (N + 1) × r; needs a reduced vocabulary). "draft" keeps a large-vocabulary target's
    drafter small (Gemma 3: V = 262,144); the export to vLLM/SGLang expands it to V rows."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be > 0, got {self.num_hidden_layers}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the vocabulary")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}")
        if self.markov_rank < 0:
            raise ValueError(f"markov_rank must be >= 0, got {self.markov_rank}")
        if self.markov_w1_vocab not in MARKOV_W1_VOCABS:
            raise ValueError(f"markov_w1_vocab must be one of {MARKOV_W1_VOCABS}, got {self.markov_w1_vocab!r}")
        if self.markov_w1_vocab == "draft" and not self.reduced_vocab:
            raise ValueError('markov_w1_vocab "draft" needs a reduced draft vocabulary (draft_vocab_size < vocab_size)')

    @property
    def markov_w1_rows(self) -> int:
        """Rows of W1: V, or N + 1 for markov_w1_vocab "draft" (the last row for out-of-vocabulary tokens)."""
        return self.num_draft_tokens + 1 if self.markov_w1_vocab == "draft" else self.vocab_size

    @property
    def is_dflash(self) -> bool:
        """True when the sequential and confidence heads are off: the DFlash baseline."""
        return self.markov_rank == 0 and not self.enable_confidence_head

    # -- construction from a target -----------------------------------------------------
    @classmethod
    def for_target(cls, target, **overrides: Any) -> "DSparkConfig":
        """Copy the target's shapes (:func:`~dspark.drafters.drafter_config.target_shapes`: 5
        feature layers spread over its depth, Gemma's global rope), a qwen3 backbone unless
        ``layer_family`` is given, and pick a spare mask token."""
        defaults = {"layer_family": cls.default_family(), "mask_token_id": pick_mask_token(target)}
        return super().for_target(target, **{**defaults, **overrides})

    # -- config.json ----------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        """The config.json of the authors' layout (an HF Qwen3 config plus DSpark fields)."""
        d = self.common_json()
        d.update(
            architectures=[ARCHITECTURES[self.layer_family]],
            mask_token_id=self.mask_token_id,
            num_hidden_layers=self.num_hidden_layers,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
            layer_types=["full_attention"] * self.num_hidden_layers,
            sample_from_anchor=True,
            markov_rank=self.markov_rank,
            enable_confidence_head=self.enable_confidence_head,
        )
        if self.markov_rank > 0:
            d["markov_head_type"] = self.markov_head_type
            if self.markov_w1_vocab != "target":  # absent means the authors' V-row layout
                d["markov_w1_vocab"] = self.markov_w1_vocab
        if self.enable_confidence_head:
            d["confidence_head_with_markov"] = self.confidence_head_with_markov
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "DSparkConfig":
        values = values_from_json(cls, d, _WRITTEN)
        values.setdefault("markov_head_type", "vanilla")
        values.setdefault("confidence_head_with_markov", False)
        return cls(**values)


_WRITTEN = {"architectures", "rope_parameters", "layer_types", "sample_from_anchor"}


def pick_mask_token(target) -> int:
    """A spare vocabulary row for the mask slots.

    Prefer a padded row past the tokenizer's real ids (as Qwen3 drafters do); otherwise a
    special token that chat never produces. SmolLM2 has no padded rows, so its
    ``<empty_output>`` (id 16, a StarCoder-era special token) is used.
    """
    tok = target.tokenizer
    if tok is not None and len(tok) < target.vocab_size:
        return len(tok)
    if tok is not None:
        used = set(target.eos_token_ids) | {tok.bos_token_id, tok.pad_token_id, tok.unk_token_id}
        for name in ("<empty_output>", "<jupyter_script>", "<gh_stars>", "<|reserved_special_token_0|>"):
            tid = tok.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid not in used and tid != tok.unk_token_id:
                return tid
    return target.vocab_size - 1
