"""DSparkModel: the parallel backbone with KV injection, plus the sequential and confidence heads.

Context path (paper eqs. 2-3): H_ctx = RMSNorm(fc([H^(l_1); ...; H^(l_m)])) from the target's
hidden states; every draft layer i attends over keys [K_i(H_ctx); K_i(H_block)] and values
[V_i(H_ctx); V_i(H_block)]. Block path: slot 1 holds the anchor token, slots 2..γ the mask
token; all γ slots predict (slot k predicts the k-th token after the anchor). A block sees
every context position before its anchor and its whole own block, in both directions.

The backbone layers are transformers' own decoder blocks; the target's embedding and LM
head are borrowed (frozen) through :meth:`attach_target` and are never saved. A checkpoint
that carries its own copies (the authors' DeepSpec checkpoints store ``embed_tokens`` and
``lm_head``, frozen copies of the target's) keeps them: at :meth:`attach_target` a copy equal
to the target's is aliased to it (the copy is freed, as vLLM's ``_should_share`` does), one
that differs is used, frozen, so drafts follow the checkpoint's own weights. With a reduced
draft vocabulary (``draft_vocab_size`` N < V, see :mod:`dspark.drafters.vocab`) the
LM head is the target head's rows of the N draft tokens and logits are over draft indices;
:meth:`DSparkModel.to_target_ids` and :meth:`DSparkModel.expand_q` map drafts back to the
target vocabulary, where q is zero outside the subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dspark.drafters.dspark.attention import BlockLayout
from dspark.drafters.dspark.attention import register as register_block_attention
from dspark.drafters.dspark.config import DSparkConfig
from dspark.drafters.dspark.heads import ConfidenceHead, MarkovHead, RNNHead
from dspark.drafters.drafter_config import check_finite, check_layer_count, check_shapes, checkpoint_shapes
from dspark.drafters.families import (
    QK_NORM_FAMILIES, convert_norm, embed_as_target, family_blocks, soft_cap, unit_offset_norms,
)
from dspark.drafters.vocab import DraftVocabulary
from dspark.errors import DsparkError
from dspark.target.kernels import linear

WEIGHTS_NAME = "model.safetensors"
CARRIED_KEYS = ("embed_tokens.weight", "lm_head.weight")
"""Keys of the frozen embedding/LM head copies a checkpoint may carry (the authors' always do)."""


class ContextKV:
    """Per-layer keys/values of the injected target context, for one batch of requests.

    It stands in for a transformers cache: ``update`` returns [context; block] K/V without
    storing the block's, so block K/V are dropped after every proposal by construction and
    drafting cost does not grow with rounds.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else int(self.keys[0].shape[-2])

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Add context K/V # [B, kv_heads, n, head_dim] for ``layer``."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = key, value
        else:
            self.keys[layer] = torch.cat([self.keys[layer], key], dim=-2)
            self.values[layer] = torch.cat([self.values[layer], value], dim=-2)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by the HF attention: return [ctx; block] keys and values."""
        if self.keys[layer_idx] is None:
            return key_states, value_states
        return (
            torch.cat([self.keys[layer_idx], key_states], dim=-2),
            torch.cat([self.values[layer_idx], value_states], dim=-2),
        )


@dataclass(frozen=True)
class BlockOutput:
    """Backbone outputs for blocks of γ slots."""

    hidden: torch.Tensor
    """[..., γ, d] normed hidden states h_k."""
    base_logits: torch.Tensor | None
    """[..., γ, N] U_k = lm_head(h_k) over the draft vocabulary, or None when the caller
    computes them per slot."""


@dataclass(frozen=True)
class TrainOutput:
    """Teacher-forced outputs for [B, N] blocks."""

    draft_logits: torch.Tensor
    """[B, N, γ, N_draft] U_k + B_k(x*_{k-1}) over the draft vocabulary."""
    confidence_logits: torch.Tensor | None
    """[B, N, γ] raw confidence logits, or None without the head."""


def block_attention_mask(anchors: torch.Tensor, seq_len: int, gamma: int) -> torch.Tensor:
    """Bool mask # [B, 1, N*γ, S + N*γ] for blocks at ``anchors`` # [B, N] over S context positions.

    A block sees context strictly before its anchor (the anchor's own target state does not
    exist yet at inference) and every slot of its own block, in both directions.
    """
    batch, num = anchors.shape
    device = anchors.device
    ctx = torch.arange(seq_len, device=device).view(1, 1, 1, seq_len) < anchors.view(batch, num, 1, 1)
    ctx = ctx.expand(batch, num, gamma, seq_len).reshape(batch, num * gamma, seq_len)
    block_of = torch.arange(num * gamma, device=device) // gamma
    own = (block_of.view(-1, 1) == block_of.view(1, -1)).expand(batch, -1, -1)
    return torch.cat([ctx, own], dim=-1).unsqueeze(1)


class DSparkModel(DraftVocabulary, nn.Module):
    """The drafter's trainable parts; see the module docstring for the data flow."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.config = config
        # transformers' sdpa for every mask, except the training forward's BlockLayout (attention.py).
        blocks = family_blocks(config, config.num_hidden_layers, register_block_attention())
        hf_config, Layer, Norm = blocks.hf_config, blocks.layer, blocks.norm
        self.hf_config = hf_config
        self._apply_rope = blocks.apply_rope
        d, m = config.hidden_size, len(config.target_layer_ids)
        self.fc = nn.Linear(m * d, d, bias=False)
        self.hidden_norm = Norm(d, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(Layer(hf_config, i) for i in range(config.num_hidden_layers))
        for layer in self.layers:
            layer.self_attn.is_causal = False  # the block attends bidirectionally
        self.norm = Norm(d, eps=config.rms_norm_eps)
        self.rotary_emb = blocks.rotary(config=hf_config)
        r, n_draft = config.markov_rank, config.num_draft_tokens
        self.markov_head: MarkovHead | RNNHead | None = None
        if r > 0:
            self.markov_head = (
                MarkovHead(config.markov_w1_rows, r, n_draft)
                if config.markov_head_type == "vanilla"
                else RNNHead(config.markov_w1_rows, r, d, n_draft)
            )
        self.register_draft_vocab()  # d2t/t2d with a reduced vocabulary
        self.confidence_head: ConfidenceHead | None = None
        if config.enable_confidence_head:
            with_markov = config.confidence_head_with_markov and r > 0
            self.confidence_head = ConfidenceHead(d, r if with_markov else 0)
        self._init_weights(hf_config.initializer_range)
        # The checkpoint's own frozen copies, or None: borrowed from the target (see carry()).
        self.embed_tokens: nn.Embedding | None = None
        self.lm_head: nn.Linear | None = None
        self._aliases: dict[str, torch.Tensor] = {}  # carried copies found equal to the target's
        self._shared: tuple[nn.Module, nn.Module] | None = None

    def _init_weights(self, std: float) -> None:
        for module in [self.fc, *self.layers]:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=std)

    # -- the borrowed (or carried) target parts ----------------------------------------------
    @torch.no_grad()
    def carry(self, embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None) -> None:
        """Keep the checkpoint's own embedding # [V, d] and LM head # [N, d] (frozen, never trained).

        They are used instead of the target's unless :meth:`attach_target` finds them equal.
        The tensors are taken as they are (no copy).
        """
        d, rows = self.config.hidden_size, {"embed_tokens": self.config.vocab_size, "lm_head": self.config.num_draft_tokens}
        for name, weight in (("embed_tokens", embed_tokens), ("lm_head", lm_head)):
            if weight is None:
                continue
            if tuple(weight.shape) != (rows[name], d):
                raise DsparkError(f"{name}.weight must be [{rows[name]}, {d}] for this config, got {list(weight.shape)}")
            setattr(self, name, _frozen(name, weight))
            self._aliases.pop(name, None)
        self._head_rows = None

    def carried(self) -> dict[str, torch.Tensor]:
        """The embedding/LM head copies this checkpoint carries, by state-dict key (aliased ones too)."""
        own = {name: getattr(self, name).weight for name in ("embed_tokens", "lm_head") if getattr(self, name) is not None}
        return {f"{name}.weight": w for name, w in {**self._aliases, **own}.items()}

    def attach_target(self, target) -> None:
        """Borrow the target's frozen embedding and LM head (kept out of state_dict).

        A carried copy equal to the target's (``torch.equal`` in the target's dtype; for a
        reduced vocabulary, the head's draft rows) is aliased: the copy is freed and the
        target's module used. A copy that differs is used instead of the target's.
        """
        self.config.check_target(target)
        embed = target.model.get_input_embeddings()
        head = target.model.get_output_embeddings()
        carried = {k.removesuffix(".weight"): w for k, w in self.carried().items()}
        self._aliases = {}
        for name in carried:
            reference = embed.weight if name == "embed_tokens" else self._target_rows(head)
            if same_tensor(carried[name], reference):
                self._aliases[name] = reference.detach()
                setattr(self, name, None)
            elif getattr(self, name) is None:  # aliased to an earlier target this one differs from
                setattr(self, name, _frozen(name, carried[name].clone()))
        self._head_rows = None
        self._shared = (embed, head)  # a plain tuple: not registered, not saved, not trained

    def _target_rows(self, head: nn.Module) -> torch.Tensor:
        """The target head's rows of the draft tokens # [N, d] (its whole weight for N = V)."""
        if not self.config.reduced_vocab:
            return head.weight
        return head.weight.detach()[self.draft_ids.to(head.weight.device)]

    @torch.no_grad()
    def init_from_target(self, target) -> None:
        """Start the backbone from the target's own top layers (a warm start for training).

        Draft layer i copies target layer L - n + i wherever names and shapes agree (all of a
        same-family layer; a qwen3 backbone on a Llama target keeps its fresh q/k norms). Between
        a Gemma and a non-Gemma family only the projections are copied: the norms' names mean
        other places in the block (Llama's ``post_attention_layernorm`` is Gemma's
        ``pre_feedforward_layernorm``) and Gemma's scale by (1 + w). fc starts by selecting the
        deepest feature layer and hidden_norm takes the scale of the norm of the target layer
        that reads it, so H_ctx begins as that layer's normalised input; the final norm is the
        target's (scales converted between the two RMSNorm conventions).
        """
        model = target.model
        decoder = model.get_decoder()
        target_layers = decoder.layers
        mine, model_type = self.config.layer_family, getattr(model.config, "model_type", "")
        only_projections = unit_offset_norms(mine) != unit_offset_norms(model_type)
        n, total = len(self.layers), len(target_layers)
        for i, layer in enumerate(self.layers):
            source = target_layers[total - n + i].state_dict()
            own = layer.state_dict()
            layer.load_state_dict({
                k: source[k] if k in source and source[k].shape == v.shape and (not only_projections or "_proj." in k) else v
                for k, v in own.items()
            })
        d = self.config.hidden_size
        deepest = max(range(len(self.config.target_layer_ids)), key=lambda j: self.config.target_layer_ids[j])
        self.fc.weight.zero_()
        self.fc.weight[:, deepest * d : (deepest + 1) * d] = torch.eye(d)
        reader = target_layers[self.config.target_layer_ids[deepest] + 1]
        for norm, source in ((self.hidden_norm, reader.input_layernorm), (self.norm, decoder.norm)):
            norm.weight.copy_(convert_norm(source.weight, unit_offset_norms(model_type), unit_offset_norms(mine)))

    def input_embeddings(self) -> nn.Module:
        """The embedding in use: the carried copy that differs from the target's, else the target's."""
        if self._shared is None:
            raise DsparkError("attach_target() must be called before drafting or training")
        return self.embed_tokens if self.embed_tokens is not None else self._shared[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the target computes them # [...] -> [..., d].

        The target's own module is called, so a scaled embedding stays scaled (Gemma multiplies
        by sqrt(d) inside ``Gemma3TextScaledWordEmbedding``); a carried copy, a plain table,
        gets the target module's ``embed_scale`` too.
        """
        self.input_embeddings()  # raises until attach_target()
        return embed_as_target(self._shared[0], ids, self.embed_tokens)

    # -- context path -----------------------------------------------------------------------
    def context_states(self, features: torch.Tensor) -> torch.Tensor:
        """H_ctx = RMSNorm(fc(features)) # [B, n, m*d] -> [B, n, d]."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def extend_context(self, cache: ContextKV, h_ctx: torch.Tensor, positions: torch.Tensor) -> None:
        """Project H_ctx # [B, n, d] at absolute ``positions`` # [B, n] into every layer's K/V."""
        cos, sin = self.rotary_emb(h_ctx, positions)
        batch, n, _ = h_ctx.shape
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            shape = (batch, n, -1, attn.head_dim)
            key = attn.k_proj(h_ctx).view(shape)
            if self.config.layer_family in QK_NORM_FAMILIES:  # per-head q/k norms, as the layer's own forward
                key = attn.k_norm(key)
            key = key.transpose(1, 2)
            key, _ = self._apply_rope(key, key, cos, sin)
            value = attn.v_proj(h_ctx).view(shape).transpose(1, 2)
            cache.append(i, key, value)

    # -- block path ---------------------------------------------------------------------------
    def block_input_ids(self, anchors: torch.Tensor) -> torch.Tensor:
        """[anchor, mask × (γ-1)] for anchor tokens # [...] -> [..., γ]."""
        gamma = self.config.block_size
        ids = anchors.unsqueeze(-1).repeat_interleave(gamma, dim=-1)
        ids[..., 1:] = self.config.mask_token_id
        return ids

    def backbone(
        self,
        block_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: ContextKV,
        attention_mask: torch.Tensor | None = None,
        logits: bool = True,
    ) -> BlockOutput:
        """Run block tokens # [B, T] at ``positions`` # [B, T] over the context in ``cache``.

        ``attention_mask`` # [B, 1, T, n_ctx + T] (bool, True = attend) is needed only when
        several blocks share one context (training); None means every block query sees the
        whole cached context and all T block positions. ``logits=False`` skips the LM head
        (see :meth:`slot_logits`).
        """
        x = self.embed(block_ids).to(self.fc.weight.dtype)
        position_embeddings = self.rotary_emb(x, positions)
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask, position_embeddings=position_embeddings, cache=cache)
        hidden = self.norm(x)
        return BlockOutput(hidden=hidden, base_logits=self.slot_logits(hidden) if logits else None)

    def slot_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """U_k = lm_head(h_k) over the draft vocabulary, hidden # [..., d] -> [..., N].

        Where the target soft-caps its final logits (``final_logit_softcapping``), U_k is capped
        the same way, cap · tanh(U / cap), before the Markov bias is added: the head then
        produces logits on the target's scale in training and in drafting alike.
        """
        weight = self.draft_head_weight
        return soft_cap(linear(hidden.to(weight.dtype), weight), self.config.final_logit_softcapping)

    @property
    def draft_head_weight(self) -> torch.Tensor:
        """[N, d] the frozen target head's rows of the draft tokens (all rows for N = V), or
        the carried head where it differs from the target's."""
        if self._shared is None:
            raise DsparkError("attach_target() must be called before drafting or training")
        if self.lm_head is not None:
            return self.lm_head.weight
        return self.draft_rows(self._shared[1].weight)

    # -- heads -----------------------------------------------------------------------------------
    def teacher_forced_logits(self, out: BlockOutput, prev_tokens: torch.Tensor) -> torch.Tensor:
        """U_k + B_k(x*_{k-1}) with the true previous tokens # [..., γ] -> [..., γ, N]."""
        if self.markov_head is None:
            return out.base_logits
        return out.base_logits + self.markov_head.teacher_forced(self.markov_rows(prev_tokens), out.hidden)

    def markov_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """W1 rows of target tokens # [...]: the ids themselves, or for markov_w1_vocab "draft"
        their draft indices with N for every token outside the draft vocabulary."""
        if self.config.markov_w1_vocab == "target":
            return tokens
        return self.draft_index_or_oov(tokens)

    def confidence_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        """Raw logits of c_k # [..., γ] from h_k and W1[x_{k-1}], or None without the head."""
        if self.confidence_head is None:
            return None
        prev = None
        if self.confidence_head.proj.in_features > self.config.hidden_size:
            prev = self.markov_head.embed(self.markov_rows(prev_tokens))
        return self.confidence_head(hidden, prev)

    # -- training forward ----------------------------------------------------------------------
    def forward(
        self, features: torch.Tensor, input_ids: torch.Tensor, anchors: torch.Tensor, dense_mask: bool = False
    ) -> "TrainOutput":
        """Draft many blocks per sequence at once, teacher-forced (training).

        features # [B, S, m*d] target features of every position, input_ids # [B, S],
        anchors # [B, N] anchor positions (-1 = padding). Block n of sequence b sees context
        positions < anchors[b, n] and its own γ slots; slot k sits at position anchor + k - 1.
        The attention runs block by block (:mod:`~dspark.drafters.dspark.attention`);
        ``dense_mask`` runs the slow oracle, one dense (Nγ) × (S + Nγ) mask, instead.
        """
        batch, seq = input_ids.shape
        gamma = self.config.block_size
        a = anchors.clamp_min(0)  # [B, N]
        num = a.shape[1]
        cache = ContextKV(len(self.layers))
        ctx_positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        self.extend_context(cache, self.context_states(features), ctx_positions)
        slot_pos = a.unsqueeze(-1) + torch.arange(gamma, device=a.device)  # [B, N, γ]
        block_ids = self.block_input_ids(input_ids.gather(1, a)).view(batch, num * gamma)
        mask = block_attention_mask(a, seq, gamma) if dense_mask else BlockLayout(a, seq, gamma)
        out = self.backbone(block_ids, slot_pos.view(batch, -1), cache, mask)
        hidden = out.hidden.view(batch, num, gamma, -1)
        base = out.base_logits.view(batch, num, gamma, -1)
        # x*_{k-1}: the anchor for slot 1, then the true tokens (teacher forcing).
        prev = input_ids.gather(1, slot_pos.clamp_max(seq - 1).view(batch, -1)).view(batch, num, gamma)
        logits = self.teacher_forced_logits(BlockOutput(hidden, base), prev)
        return TrainOutput(draft_logits=logits, confidence_logits=self.confidence_logits(hidden, prev))

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None, with_lm_head: bool = False) -> None:
        """config.json + model.safetensors with the authors' key names; no embed/LM head
        unless the checkpoint carried them (:meth:`carry`; aliased copies are written too).

        A reduced vocabulary saves ``d2t``/``t2d``; ``with_lm_head`` also stores the [N, d]
        head rows, which vLLM requires for a reduced draft vocabulary (the target must be attached).
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.check_draft_vocab()
        self.config.save(folder)
        tensors = {**self.state_dict(), **self.carried()}
        if with_lm_head:
            tensors["lm_head.weight"] = self.draft_head_weight
        state = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in tensors.items()
        }
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "DSparkModel":
        """Load a drafter folder. config.json is validated and compared with the tensor names and
        shapes in the header of model.safetensors before anything is built (a wrong layer count
        or width costs no memory), and NaN or inf weights are refused, naming the tensor."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise DsparkError(f"{folder} is not a DSpark drafter folder (no config.json)")
        try:
            config = DSparkConfig.load(folder)
        except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise DsparkError(f"{folder}/config.json is not a DSpark config: {exc}") from exc
        weights = folder / WEIGHTS_NAME
        found = checkpoint_shapes(weights)
        check_layer_count(weights, found, "layers.", config.num_hidden_layers)
        with torch.device("meta"):  # shapes only: allocates nothing
            skeleton = cls(config)
        d = config.hidden_size
        carried = {"embed_tokens.weight": [config.vocab_size, d], "lm_head.weight": [config.num_draft_tokens, d]}
        check_shapes(weights, found, {k: list(v.shape) for k, v in skeleton.state_dict().items()}, carried)
        model = cls(config)
        state = load_file(str(weights), device=str(device))
        check_finite(weights, state)
        model.carry(*(state.pop(key, None) for key in CARRIED_KEYS))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in CARRIED_KEYS]  # carried above, as they are
        if missing or unexpected:
            raise DsparkError(
                f"checkpoint {folder} does not match its config: missing {missing}, unexpected {unexpected}"
            )
        model.check_draft_vocab()
        return model.to(device=device, dtype=dtype).eval()


def _frozen(name: str, weight: torch.Tensor) -> nn.Module:
    """A frozen nn.Embedding (``embed_tokens``) or bias-free nn.Linear (``lm_head``) over ``weight``."""
    if name == "embed_tokens":
        return nn.Embedding.from_pretrained(weight, freeze=True)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = nn.Parameter(weight, requires_grad=False)
    return head


def same_tensor(carried: torch.Tensor, reference: torch.Tensor) -> bool:
    """``torch.equal`` of a carried copy and the target's tensor, in the target's dtype and device."""
    if carried.shape != reference.shape:
        return False
    return torch.equal(carried.detach().to(device=reference.device, dtype=reference.dtype), reference.detach())
