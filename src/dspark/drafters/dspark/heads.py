"""The sequential heads of DSpark: the Markov head, its RNN variant, and the confidence head.

Glossary: U_k are the backbone's base logits for slot k, h_k its (normed) hidden state,
x_{k-1} the previous token (the anchor for slot 1), B_k the transition bias added to U_k,
and c_k the confidence that slot k survives verification given that slots < k did.
"""

from __future__ import annotations

import torch
from torch import nn


class MarkovHead(nn.Module):
    """Low-rank first-order transition bias B(x_{k-1}, ·) = W1[x_{k-1}] · W2 (paper eq. 5).

    The heads take W1 *row indices* of the previous tokens: the target ids themselves for a
    V-row W1, or draft indices (N for any other token) for an (N + 1)-row one
    (:meth:`~dspark.drafters.dspark.model.DSparkModel.markov_rows` maps them).
    """

    def __init__(self, w1_rows: int, rank: int, draft_vocab_size: int) -> None:
        super().__init__()
        # W1 is indexed by the previous token's row; W2 scores the N draft tokens.
        self.markov_w1 = nn.Embedding(w1_rows, rank)  # W1: V×r (or (N+1)×r) lookup table
        self.markov_w2 = nn.Linear(rank, draft_vocab_size, bias=False)  # W2: r×N (stored [N, r])
        nn.init.normal_(self.markov_w1.weight, std=0.02)
        nn.init.zeros_(self.markov_w2.weight)  # start as the plain parallel drafter

    def embed(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """W1[x_{k-1}] # [...] -> [..., r]."""
        return self.markov_w1(prev_tokens)

    def init_state(self, batch_shape: tuple[int, ...], device) -> None:
        return None

    def step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: None
    ) -> tuple[torch.Tensor, None]:
        """Bias for one slot: prev # [...], hidden # [..., d] -> (B # [..., N], state)."""
        return self.markov_w2(self.embed(prev_tokens)), None

    def teacher_forced(self, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """All slots at once from the true previous tokens # [..., γ] -> [..., γ, N]."""
        return self.markov_w2(self.embed(prev_tokens))


class RNNHead(nn.Module):
    """Gated recurrent transition bias (paper eq. 6).

    z_k = [s_{k-1}; W1[x_{k-1}]; h_k]; one linear map gives gate g, candidate c and output o;
    s_k = σ(g) ⊙ s_{k-1} + (1 − σ(g)) ⊙ tanh(c) and B_k = W2ᵀ tanh(o). s_0 = 0.
    """

    def __init__(self, w1_rows: int, rank: int, hidden_size: int, draft_vocab_size: int) -> None:
        super().__init__()
        self.rank = rank
        self.markov_w1 = nn.Embedding(w1_rows, rank)
        self.markov_w2 = nn.Linear(rank, draft_vocab_size, bias=False)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)
        nn.init.normal_(self.markov_w1.weight, std=0.02)
        nn.init.zeros_(self.markov_w2.weight)

    def embed(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        return self.markov_w1(prev_tokens)

    def init_state(self, batch_shape: tuple[int, ...], device) -> torch.Tensor:
        return torch.zeros(*batch_shape, self.rank, device=device, dtype=self.markov_w1.weight.dtype)

    def step(
        self, prev_tokens: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([state, self.embed(prev_tokens), hidden], dim=-1)
        g, c, o = self.joint_proj(z).split(self.rank, dim=-1)
        gate = torch.sigmoid(g)
        state = gate * state + (1.0 - gate) * torch.tanh(c)
        return self.markov_w2(torch.tanh(o)), state

    def teacher_forced(self, prev_tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """prev # [..., γ], hidden # [..., γ, d] -> biases # [..., γ, N], run left to right."""
        state = self.init_state(prev_tokens.shape[:-1], prev_tokens.device)
        biases = []
        for k in range(prev_tokens.shape[-1]):
            bias, state = self.step(prev_tokens[..., k], hidden[..., k, :], state)
            biases.append(bias)
        return torch.stack(biases, dim=-2)


class ConfidenceHead(nn.Module):
    """c_k = σ(w · [h_k; W1[x_{k-1}]]) (paper eq. 7); returns the raw logit."""

    def __init__(self, hidden_size: int, markov_rank: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size + markov_rank, 1)  # bias kept, as in the release
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, 1.0)

    def forward(self, hidden: torch.Tensor, prev_embedding: torch.Tensor | None) -> torch.Tensor:
        """hidden # [..., d], prev_embedding # [..., r] or None -> logit # [...] (fp32)."""
        x = hidden if prev_embedding is None else torch.cat([hidden, prev_embedding], dim=-1)
        return self.proj(x).squeeze(-1).float()
