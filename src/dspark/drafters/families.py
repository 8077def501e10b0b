"""Layer families: the transformers blocks a drafter is built from, and what each family's
target does that a drafter must do the same way. Shared by the DSpark and EAGLE-3 drafters.

A drafter's layers are transformers' own decoder layers of one family (llama, qwen3 or
gemma3; :func:`family_blocks`), picked from the target's ``model_type`` by
:func:`family_of`. Two of the family's conventions live outside its layers, and a drafter that
embeds tokens and computes logits itself must follow them: Gemma scales token embeddings by
sqrt(d) (:func:`embed_as_target`) and soft-caps its final logits (:func:`soft_cap`). Gemma's
RMSNorm scales by (1 + w) where Llama's and Qwen3's scale by w (:func:`unit_offset_norms`,
:func:`convert_norm`), which warm starts across families must convert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

LAYER_FAMILIES = ("qwen3", "llama", "gemma3")
"""transformers block families a drafter can be built from (see :func:`family_blocks`)."""
QK_NORM_FAMILIES = ("qwen3", "gemma3")
"""Families whose attention normalises each head's queries and keys before rope."""
FAMILY_OF_MODEL_TYPE = {"llama": "llama", "qwen3": "qwen3", "gemma3": "gemma3", "gemma3_text": "gemma3"}
"""The drafter family that follows a target's HF ``model_type``."""


def family_of(model_type: str, default: str) -> str:
    """The drafter family of a target's ``model_type``; ``default`` for a type dspark has none for."""
    return FAMILY_OF_MODEL_TYPE.get(model_type, default)


@dataclass(frozen=True)
class FamilyBlocks:
    """transformers' classes of one family, and the HF config its layers read."""

    family: str
    hf_config: Any
    """The family's HF config (a ``PretrainedConfig``) built from the drafter's config."""
    layer: type[nn.Module]
    """Its decoder layer class, constructed as ``layer(hf_config, layer_idx)``."""
    norm: type[nn.Module]
    """Its RMSNorm class, ``norm(dim, eps=...)``."""
    rotary: type[nn.Module]
    """Its rotary embedding, ``rotary(config=hf_config)``; called as ``(x, position_ids) -> (cos, sin)``."""
    apply_rope: Callable
    """Its ``apply_rotary_pos_emb(q, k, cos, sin)``."""

    def finish_layer(self, layer: nn.Module, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The rest of the family's decoder-layer forward after self-attention # [..., d] -> [..., d].

        For a caller that runs the layer's attention on its own inputs (EAGLE-3's 2d-wide
        q/k/v): the residual add and the MLP, with gemma3's sandwich norms (after attention,
        before and after the MLP) where the family has them.
        """
        if self.family == "gemma3":
            h = residual + layer.post_attention_layernorm(attn_out)
            return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        h = residual + attn_out
        return h + layer.mlp(layer.post_attention_layernorm(h))


def family_blocks(config, num_layers: int, attn_implementation: str) -> FamilyBlocks:
    """transformers classes for ``config.layer_family`` and the HF config they read.

    ``config`` is a drafter config (its target shapes, ``rope_theta``, ``hidden_act``,
    ``query_pre_attn_scalar``); ``num_layers`` the drafter's decoder layers, all of them
    ``full_attention``: a drafter's queries should see all of the context it attends to, which
    a sliding window would only hide, and its rope is the global one of the target's
    full-attention layers (the drafter configs' ``for_target``). gemma3 layers bring their own
    sandwich norms, q/k norms and (1 + w) RMSNorm. The final-logit soft cap is the drafter's
    own business (:func:`soft_cap`), so the HF config leaves it out.
    """
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        attention_bias=False,
    )
    rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.layer_family == "gemma3":
        from transformers import Gemma3TextConfig
        from transformers.models.gemma3.modeling_gemma3 import (
            Gemma3DecoderLayer as Layer,
            Gemma3RMSNorm as Norm,
            Gemma3RotaryEmbedding,
            apply_rotary_pos_emb,
        )

        class Rotary(Gemma3RotaryEmbedding):
            """Gemma 3's rope at the one layer type the drafter has (its forward takes the type)."""

            def forward(self, x, position_ids):
                return super().forward(x, position_ids, "full_attention")

        hf_config = Gemma3TextConfig(
            **common,
            hidden_activation=config.hidden_act,
            query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
            layer_types=["full_attention"] * num_layers,
            rope_parameters={"full_attention": rope},
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
    else:
        if config.layer_family == "qwen3":
            from transformers import Qwen3Config as Cfg
            from transformers.models.qwen3.modeling_qwen3 import (
                Qwen3DecoderLayer as Layer,
                Qwen3RMSNorm as Norm,
                Qwen3RotaryEmbedding as Rotary,
                apply_rotary_pos_emb,
            )
        else:
            from transformers import LlamaConfig as Cfg
            from transformers.models.llama.modeling_llama import (
                LlamaDecoderLayer as Layer,
                LlamaRMSNorm as Norm,
                LlamaRotaryEmbedding as Rotary,
                apply_rotary_pos_emb,
            )
        hf_config = Cfg(**common, hidden_act=config.hidden_act, rope_parameters=rope)
    hf_config._attn_implementation = attn_implementation
    return FamilyBlocks(config.layer_family, hf_config, Layer, Norm, Rotary, apply_rotary_pos_emb)


def family_json_fields(config) -> dict[str, Any]:
    """The config.json fields a drafter config writes only for some families or targets."""
    d: dict[str, Any] = {}
    if config.layer_family == "gemma3":  # the name transformers' Gemma3TextConfig reads
        d["hidden_activation"] = config.hidden_act
    if config.query_pre_attn_scalar:
        d["query_pre_attn_scalar"] = config.query_pre_attn_scalar
    if config.final_logit_softcapping is not None:
        d["final_logit_softcapping"] = config.final_logit_softcapping
    return d


# -- what the target does outside its layers ----------------------------------------------------
def embed_as_target(target_embedding: nn.Module, ids: torch.Tensor, table: nn.Module | None = None) -> torch.Tensor:
    """Token embeddings as the target computes them # [...] -> [..., d].

    The target's own module is called, so a scaled embedding stays scaled (Gemma multiplies by
    sqrt(d) inside ``Gemma3TextScaledWordEmbedding``); ``table``, a drafter's own plain copy
    used instead of the target's, gets the target module's ``embed_scale`` too.
    """
    if table is None:
        return target_embedding(ids)
    x = table(ids)
    scale = getattr(target_embedding, "embed_scale", None)
    if scale is not None:
        x = x * torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return x


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(logits / cap), the target's final-logit soft cap (Gemma); ``logits`` as they are for None."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def unit_offset_norms(model_type: str) -> bool:
    """True for families whose RMSNorm scales by (1 + w), so w = 0 is the identity (every
    Gemma generation); Llama and Qwen3 scale by w."""
    return model_type.startswith("gemma")


def convert_norm(weight: torch.Tensor, from_offset: bool, to_offset: bool) -> torch.Tensor:
    """The RMSNorm weight that applies the same scale in the other convention."""
    return weight + (int(from_offset) - int(to_offset))
