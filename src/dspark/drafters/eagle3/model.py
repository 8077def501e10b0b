"""Eagle3Model: the EAGLE-3 baseline drafter, one decoder layer over fused target features.

Glossary (EAGLE-3, Li et al.; as the DSpark paper retrains it): f_j # [m*d] is the concat of
the target's hidden states at position j from the m feature layers (EAGLE-3: low, mid and
high; here the same layers DSpark uses), g_j = fc(f_j) # [d] their fusion. The drafter works
on *pairs*: pair j is the token x_j with g_{j-1}, the fused state of the position before it
(which predicted x_j; pair 0 has none and reads zeros). Its one decoder layer reads the pair
as the 2d-wide concatenation [input_layernorm(embed(x_j)); hidden_norm(g_{j-1})]: the q/k/v
projections are 2d → heads (EAGLE-3's design, not a fusing linear in front of the layer),
the residual stream starts at g_{j-1}, and o_proj, post_attention_layernorm and the MLP are
the family's own. The layer's output h_j (pre-norm, d wide) gives logits
lm_head(norm(h_j)) for x_{j+1} over the draft vocabulary.

Chain drafting with anchor a (the last committed token, at position a): step 1 is pair a
itself (the target's own g_{a-1}); step k > 1 sits at position a + k - 1 and feeds the
drafter's own previous output h^{(k-1)} in place of the target's fused state, with the
(k-1)-th drafted token. Every step attends to the pairs at positions <= a (computed from
target features once, cached) and to the earlier steps of its own chain.

Training-time test (:meth:`Eagle3Model.forward`) unrolls exactly that: step 1 over every
position of the sequence (causal), then steps 2..γ for each sampled anchor with teacher-
forced tokens, attending to the step-1 keys at positions <= a and to their own chain's keys.
So the drafter trains on the inputs it sees when drafting, its own hidden states included.

The embedding and LM head are the frozen target's, borrowed at :meth:`attach_target` and
never saved. With a reduced draft vocabulary (N < V, the ``d2t``/``t2d`` convention of
:mod:`dspark.drafters.vocab`) the head is the target head's rows of the draft tokens
and q is expanded to the target vocabulary with zeros outside, so verification stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dspark.drafters.drafter_config import check_finite, check_shapes, checkpoint_shapes
from dspark.drafters.eagle3.config import Eagle3Config
from dspark.drafters.families import convert_norm, embed_as_target, family_blocks, soft_cap, unit_offset_norms
from dspark.drafters.vocab import DraftVocabulary
from dspark.errors import DsparkError
from dspark.target.kernels import linear

WEIGHTS_NAME = "model.safetensors"


class StepKV:
    """The drafter layer's keys/values, appended call by call (a transformers cache stand-in
    for the training-time test, whose steps all attend to the pairs and the chain so far).

    ``update`` stores the new K/V and returns everything stored.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [B, kv_heads, n, head_dim]
        self.values: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values


@dataclass(frozen=True)
class TrainOutput:
    """Unrolled training-time-test outputs for [B, N] anchors (the fields StepContext reads)."""

    draft_logits: torch.Tensor
    """[B, N, γ, N_draft] step k's logits for the token a + k."""
    confidence_logits: None = None
    """EAGLE-3 has no confidence head."""


class Eagle3Model(DraftVocabulary, nn.Module):
    """The drafter's trainable parts; see the module docstring for the data flow."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.config = config
        # sdpa: every call passes its mask (None only where every query sees every key).
        self._blocks = family_blocks(config, 1, "sdpa")
        hf_config, Layer, Norm = self._blocks.hf_config, self._blocks.layer, self._blocks.norm
        self.hf_config = hf_config
        d, m = config.hidden_size, len(config.target_layer_ids)
        self.fc = nn.Linear(m * d, d, bias=False)
        self.midlayer = Layer(hf_config, 0)
        attn = self.midlayer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):  # EAGLE-3: attention reads [embed; features], 2d wide
            setattr(attn, name, nn.Linear(2 * d, getattr(attn, name).out_features, bias=False))
        self.midlayer.hidden_norm = Norm(d, eps=config.rms_norm_eps)
        self.norm = Norm(d, eps=config.rms_norm_eps)
        self.rotary_emb = self._blocks.rotary(config=hf_config)
        self.register_draft_vocab()  # d2t/t2d with a reduced vocabulary
        for sub in self.modules():
            if isinstance(sub, nn.Linear):
                nn.init.normal_(sub.weight, std=hf_config.initializer_range)
        self._shared: tuple[nn.Module, nn.Module] | None = None  # the target's (embedding, head)

    # -- the borrowed target parts ----------------------------------------------------------
    def attach_target(self, target) -> None:
        """Borrow the target's frozen embedding and LM head (not registered, never saved)."""
        self.config.check_target(target)
        self._shared = (target.model.get_input_embeddings(), target.model.get_output_embeddings())
        self._head_rows = None

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        if self._shared is None:
            raise DsparkError("attach_target() must be called before drafting or training")
        return self._shared

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the target computes them (Gemma's scaled by sqrt(d)) # [...] -> [..., d],
        in the drafter's dtype."""
        return embed_as_target(self._parts()[0], ids).to(self.fc.weight.dtype)

    @property
    def head_weight(self) -> torch.Tensor:
        """[N, d] the frozen target head's rows of the draft tokens (all rows for N = V)."""
        return self.draft_rows(self._parts()[1].weight)

    # -- the layer ----------------------------------------------------------------------------
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """g = fc(f), target features # [..., m*d] -> [..., d]."""
        return self.fc(features.to(self.fc.weight.dtype))

    def step(self, emb: torch.Tensor, state: torch.Tensor, positions: torch.Tensor, cache,
             mask: torch.Tensor | None) -> torch.Tensor:
        """One pass of the decoder layer over T new entries # -> [B, T, d] (pre-norm h).

        ``cache`` is what the layer's attention updates: a :class:`StepKV` in training, the
        drafter's :class:`~dspark.target.slot_cache.SlotWriteView` when drafting.

        emb # [B, T, d] token embeddings, state # [B, T, d] g_{j-1} (fused target features)
        or the drafter's own previous h, positions # [B, T]; ``mask`` # [B, 1, T, n_cached + T]
        (bool, True = attend), None only when every query may see every key.
        """
        layer = self.midlayer
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(state)], dim=-1)  # [B, T, 2d]
        attn, _ = layer.self_attn(x, position_embeddings=self.rotary_emb(state, positions), attention_mask=mask, cache=cache)
        return self._blocks.finish_layer(layer, state, attn)  # residual from g_{j-1}, then the MLP

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head(norm(h)) over the draft vocabulary, hidden # [..., d] -> [..., N]; soft-capped
        where the target caps its logits, so they are on the target's scale."""
        weight = self.head_weight
        return soft_cap(linear(self.norm(hidden).to(weight.dtype), weight), self.config.final_logit_softcapping)

    # -- training-time test ---------------------------------------------------------------------
    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, anchors: torch.Tensor) -> TrainOutput:
        """Unroll γ steps for every anchor, teacher-forced (training).

        features # [B, S, m*d] target features of every position, input_ids # [B, S], anchors
        # [B, N] (-1 = padding). Step 1 runs over all S pairs; step k > 1 of anchor a sits at
        position a + k - 1, reads token x_{a+k-1} and step k-1's h, and sees the pairs <= a and
        its own chain. Slot k predicts x_{a+k}, as a DSpark block's slot k does.
        """
        batch, seq = input_ids.shape
        if features.shape[:2] != (batch, seq):
            raise ValueError(f"features {tuple(features.shape)} do not match input_ids {(batch, seq)}")
        device, gamma = input_ids.device, self.config.block_size
        a = anchors.clamp_min(0)  # [B, N]
        num = a.shape[1]
        # Pair j reads f_{j-1}: shift right by one, zeros for pair 0 (as drafting does).
        state = self.fuse(torch.cat([features.new_zeros(batch, 1, features.shape[-1]), features[:, :-1]], dim=1))
        cache = StepKV()
        positions = torch.arange(seq, device=device).expand(batch, seq)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril().expand(batch, 1, seq, seq)
        h1 = self.step(self.embed(input_ids), state, positions, cache, causal)  # [B, S, d]
        h = h1.gather(1, a.unsqueeze(-1).expand(-1, -1, h1.shape[-1]))  # [B, N, d] step 1 at the anchors
        sees_pairs = torch.arange(seq, device=device).view(1, 1, seq) <= a.unsqueeze(-1)  # [B, N, S]
        own_chain = torch.eye(num, dtype=torch.bool, device=device).expand(batch, num, num)
        hidden = [h]
        for k in range(1, gamma):
            tokens = input_ids.gather(1, (a + k).clamp_max(seq - 1))  # [B, N] teacher forcing
            mask = torch.cat([sees_pairs] + [own_chain] * k, dim=-1).unsqueeze(1)  # [B, 1, N, S + kN]
            h = self.step(self.embed(tokens), h, a + k, cache, mask)
            hidden.append(h)
        return TrainOutput(draft_logits=self.logits(torch.stack(hidden, dim=2)))  # [B, N, γ, N_draft]

    @torch.no_grad()
    def init_from_target(self, target) -> None:
        """Start from the target's last layer (a warm start for training, like DSpark's).

        The layer copies every weight whose name and shape agree; of q/k/v, the target's
        weights go to the feature half of the 2d input (the embedding half keeps its random
        init); hidden_norm takes that layer's input norm; fc starts by selecting the deepest
        feature layer; the final norm is the target's. Between a Gemma and a non-Gemma family
        only the projections are copied and the two norms' scales are converted, as
        :meth:`DSparkModel.init_from_target <dspark.drafters.dspark.model.DSparkModel.init_from_target>` does.
        """
        decoder = target.model.get_decoder()
        source = decoder.layers[-1].state_dict()
        own = self.midlayer.state_dict()
        d = self.config.hidden_size
        theirs_offset = unit_offset_norms(getattr(target.model.config, "model_type", ""))
        mine_offset = unit_offset_norms(self.config.layer_family)
        merged = {}
        for key, value in own.items():
            theirs = source.get(key)
            if theirs is not None and theirs_offset != mine_offset and "_proj." not in key:
                merged[key] = value  # a norm: other places in the block, another convention
            elif theirs is not None and theirs.shape == value.shape:
                merged[key] = theirs
            elif theirs is not None and key.split(".")[-2] in ("q_proj", "k_proj", "v_proj"):
                merged[key] = torch.cat([value[:, :d], theirs.to(value.dtype)], dim=1)
            else:
                merged[key] = value
        merged["hidden_norm.weight"] = convert_norm(source["input_layernorm.weight"], theirs_offset, mine_offset)
        self.midlayer.load_state_dict(merged)
        ids = self.config.target_layer_ids
        deepest = max(range(len(ids)), key=lambda j: ids[j])
        self.fc.weight.zero_()
        self.fc.weight[:, deepest * d : (deepest + 1) * d] = torch.eye(d)
        self.norm.weight.copy_(convert_norm(decoder.norm.weight, theirs_offset, mine_offset))

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """config.json + model.safetensors (``midlayer.*``, ``fc``, ``norm``, ``d2t``/``t2d``); no
        embedding or LM head, which are the target's."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.check_draft_vocab()
        self.config.save(folder)
        state = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in self.state_dict().items()
        }
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "Eagle3Model":
        """Load a drafter folder, checked as :meth:`DSparkModel.from_pretrained
        <dspark.drafters.dspark.model.DSparkModel.from_pretrained>` checks one: config.json's
        fields, then its shapes against the header of model.safetensors before anything is
        built, then the weights for NaN or inf."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = Eagle3Config.load(folder)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise DsparkError(f"{folder}/config.json is not an EAGLE-3 drafter config: {exc}") from exc
        weights = folder / WEIGHTS_NAME
        found = checkpoint_shapes(weights)
        with torch.device("meta"):  # shapes only: allocates nothing
            skeleton = cls(config)
        check_shapes(weights, found, {k: list(v.shape) for k, v in skeleton.state_dict().items()})
        model = cls(config)
        state = load_file(str(weights), device=str(device))
        check_finite(weights, state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DsparkError(f"checkpoint {folder} does not match its config: missing {missing}, unexpected {unexpected}")
        model.check_draft_vocab()
        return model.to(device=device, dtype=dtype).eval()
