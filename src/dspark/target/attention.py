"""The target's attention on the CPU: transformers' sdpa, with grouped K/V heads handed to SDPA
as they are where transformers would repeat them.

Why: a verification step runs several queries per row under the engine's own mask (each row
sees only its own history). For that case transformers' sdpa attention copies K and V into
every query head (``repeat_kv``, ``TRANSFORMERS_SDPA_FORCE_GQA`` unset), because CUDA's fast
SDPA kernels refuse grouped heads with a mask. PyTorch's CPU kernels take them
(``enable_gqa``). Measured on SmolLM2-135M (3 K/V heads for 9 query heads), context 300, one
thread, session 16's AMD host: the two copies per layer cost 3 ms of a 4-token step (54 ms
instead of 57; 52 / 60 instead of 55 / 62 at 2 / 8 tokens), nothing at 1 token (transformers
folds the heads into the queries there).

Every other case (no mask, one query, no grouped heads, a GPU) is transformers' own function.
The result is the same attention; ``tests/test_target_attention.py`` compares both on a
grouped-head target.
"""

from __future__ import annotations

import torch

ATTENTION_NAME = "dspark_sdpa"
"""The name this function is registered under in transformers' ``AttentionInterface``."""


def sdpa_grouped(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers attention signature: query # [B, H, T, D], key/value # [B, Hkv, S, D],
    ``attention_mask`` # [B, 1, T, S] (bool or additive) -> (output # [B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if (attention_mask is None or query.shape[2] == 1 or groups <= 1 or query.device.type != "cpu"
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask[:, :, :, : key.shape[2]], dropout_p=dropout, scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: torch.nn.Module) -> bool:
    """Switch ``model`` (a transformers model on sdpa) to :func:`sdpa_grouped`; returns whether
    it did (False: another attention was chosen, or the model cannot switch)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION_NAME, sdpa_grouped)
    # The masks transformers builds for it are sdpa's: one that lets a cached forward see its
    # whole past, or None where SDPA's own causal flag is exact.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, ImportError):
        return False
    return config._attn_implementation == ATTENTION_NAME
