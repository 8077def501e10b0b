"""Block attention for training many DSpark blocks over one shared context.

In training, N blocks of γ slots share one context of S positions: block n sees context
positions before its anchor a_n and its own γ slots, never another block. Written as one
dense mask over [context; all blocks] that is an (Nγ) × (S + Nγ) score matrix, almost all of
it masked, and it grows with N². :class:`BlockLayout` marks the attention mask of such a call;
the registered attention function then scores the context part (Nγ × S, masked by anchor) and
each block's own γ × γ part, and runs one softmax over their concatenation. The result is the
dense masked attention exactly (tests compare it with :func:`block_attention_mask` + sdpa),
at a cost linear in N. Every other mask goes to transformers' own sdpa attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_NAME = "dspark_blocks"
"""The name this function is registered under in transformers' ``AttentionInterface``."""


@dataclass(frozen=True)
class BlockLayout:
    """Stands in for the attention mask of a training forward: which context each block sees."""

    anchors: torch.Tensor
    """[B, N] anchor positions (clamped to >= 0); block n sees context positions < anchors[b, n]."""
    context_len: int
    """S: context positions that precede the blocks in the keys and values."""
    gamma: int
    """γ: slots per block; the queries are the N·γ slots, block by block."""


def block_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention signature: query # [B, H, Nγ, D], key/value # [B, Hkv, S + Nγ, D].

    Returns (output # [B, Nγ, H, D], None) like transformers' sdpa attention.
    """
    if not isinstance(attention_mask, BlockLayout):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layout = attention_mask
    batch, heads, slots, dim = query.shape
    s, gamma = layout.context_len, layout.gamma
    num = slots // gamma
    if slots != num * gamma or key.shape[-2] != s + slots:
        raise ValueError(f"block attention needs {num}·{gamma} queries over {s} + {slots} keys, got {tuple(key.shape)}")
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = dim**-0.5 if scaling is None else scaling
    k_ctx, v_ctx = key[:, :, :s], value[:, :, :s]  # [B, H, S, D]
    k_blk = key[:, :, s:].reshape(batch, heads, num, gamma, dim)
    v_blk = value[:, :, s:].reshape(batch, heads, num, gamma, dim)
    q_blk = query.reshape(batch, heads, num, gamma, dim)
    ctx_scores = (query @ k_ctx.transpose(-1, -2)) * scale  # [B, H, Nγ, S]
    sees = torch.arange(s, device=query.device).view(1, 1, s) < layout.anchors.repeat_interleave(gamma, dim=1).unsqueeze(-1)
    ctx_scores = ctx_scores.masked_fill(~sees.unsqueeze(1), float("-inf"))
    own_scores = (q_blk @ k_blk.transpose(-1, -2)) * scale  # [B, H, N, γ, γ]
    scores = torch.cat([ctx_scores, own_scores.reshape(batch, heads, slots, gamma)], dim=-1)
    probs = scores.float().softmax(-1).to(query.dtype)  # every row sees its own block: never all -inf
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = probs[..., :s] @ v_ctx  # [B, H, Nγ, D]
    own = probs[..., s:].reshape(batch, heads, num, gamma, gamma) @ v_blk  # [B, H, N, γ, D]
    out = out + own.reshape(batch, heads, slots, dim)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`block_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, block_attention)
    return ATTENTION_NAME
