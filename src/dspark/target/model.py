"""The target model: a thin adapter over any Hugging Face causal LM.

It owns nothing but the model and tokenizer; the KV cache belongs to the caller, so one
target can serve many requests. It exposes exactly what speculative decoding needs:
a forward over new tokens with a cache, the hidden states of chosen layers (drafters are
conditioned on them) and rollback of the cache to a length.

Layer ids follow the DeepSpec / vLLM / SGLang convention: id k is the *output of HF layer
k*, i.e. ``hidden_states[k + 1]``; the final, normed layer is never a feature layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dspark.errors import DsparkError
from dspark.target.attention import use_grouped_sdpa
from dspark.target.kernels import AUTO, set_linear_kernel


@dataclass(frozen=True)
class TargetOutput:
    """What one target forward returns."""

    logits: torch.Tensor
    """[B, n, V] next-token logits for each fed position."""
    features: torch.Tensor | None
    """[B, n, m*d] concatenated hidden states of the requested layers, or None."""
    last_hidden: torch.Tensor | None = None
    """[B, n, d] final (normed) hidden state, when asked for; training distills from it."""


class TargetModel:
    """Wraps a transformers causal LM and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "custom", linear_kernel: str = AUTO) -> None:
        """``linear_kernel``: ``auto`` runs each float32 CPU linear on ATen or oneDNN, whichever
        this host runs faster at the rows fed (:mod:`dspark.target.kernels`); ``aten`` or
        ``onednn`` forces one."""
        from dspark.target.loading import cache_root

        self.linear_kernel = set_linear_kernel(model, linear_kernel, cache_dir=cache_root())
        """What the linears actually run on ('aten<=3+onednn', say; oneDNN needs CPU float32)."""
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        config = model.config
        self.vocab_size: int = model.get_output_embeddings().weight.shape[0]
        self.hidden_size: int = config.hidden_size
        self.num_layers: int = config.num_hidden_layers
        self.sliding_window: int | None = (
            getattr(config, "sliding_window", None) if "sliding_attention" in (getattr(config, "layer_types", None) or ()) else None
        )
        """The window of the model's sliding-attention layers (Gemma 3's local layers), or None.
        Callers that pass their own mask give those layers a windowed one (target/ragged.py)."""
        self.device = next(model.parameters()).device
        self.grouped_sdpa = self.device.type == "cpu" and use_grouped_sdpa(model)
        """Whether attention hands grouped K/V heads to SDPA unrepeated (:mod:`dspark.target.attention`)."""
        self.eos_token_ids: frozenset[int] = frozenset(_eos_ids(model, tokenizer))

    @classmethod
    def load(cls, spec: str | None = None, device: str = "cpu", dtype=None, linear_kernel: str = AUTO) -> "TargetModel":
        """Load an HF id, a local folder, a .gguf file, or (None) the embedded default."""
        from dspark.target.loading import DEFAULT_MODEL, load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(spec, dtype=dtype, device=device)
        return cls(model, tokenizer, name=spec or DEFAULT_MODEL, linear_kernel=linear_kernel)

    # -- the KV cache -----------------------------------------------------------------
    def new_cache(self):
        return new_dynamic_cache(self.model.config)

    @staticmethod
    def cache_length(cache) -> int:
        return cache.get_seq_length()

    @staticmethod
    def rollback(cache, length: int) -> None:
        """Drop every cached position at or after ``length``."""
        crop_cache(cache, length)

    # -- forward ----------------------------------------------------------------------
    def warm_up(self) -> None:
        """One throwaway forward so thread pools and allocators don't bill the first timed run."""
        ids = torch.zeros(1, 8, dtype=torch.long, device=self.device)
        self.forward(ids, self.new_cache())

    def check_layer_ids(self, layer_ids: Sequence[int]) -> None:
        bad = [k for k in layer_ids if not 0 <= k < self.num_layers - 1]
        if bad:
            raise DsparkError(
                f"target layer ids {bad} are out of range: {self.name} has {self.num_layers} "
                f"layers, so ids must lie in 0..{self.num_layers - 2} (the last layer is normed)"
            )

    @torch.no_grad()  # not inference_mode: training feeds these tensors to autograd
    def forward(
        self,
        input_ids: torch.Tensor,
        cache=None,
        layer_ids: Sequence[int] = (),
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_last_hidden: bool = False,
        logits_to_keep: int = 0,
    ) -> TargetOutput:
        """Run ``input_ids`` # [B, n] after what ``cache`` holds; extend the cache in place.
        ``logits_to_keep``: only the last k positions' logits (0: all); a prefill needs one.

        Only the requested layers' hidden states are kept (forward hooks on those layers and on
        the final norm), not every layer's: a long prompt's prefill holds n × d per feature
        layer, not per model layer."""
        layers, norm = self._decoder_layers(), getattr(getattr(self.model, "model", None), "norm", None)
        hooked = layers is not None and (norm is not None or not return_last_hidden)
        kept: dict[object, torch.Tensor] = {}
        handles = []
        if hooked:
            def keep(key):
                return lambda module, args, output: kept.__setitem__(key, output[0] if isinstance(output, tuple) else output)

            handles = [layers[k].register_forward_hook(keep(k)) for k in dict.fromkeys(layer_ids)]
            if return_last_hidden:
                handles.append(norm.register_forward_hook(keep("norm")))
        try:
            out = self.model(
                input_ids=input_ids,
                cache=cache,
                use_cache=cache is not None,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=not hooked and (bool(layer_ids) or return_last_hidden),
                logits_to_keep=logits_to_keep,
            )
        finally:
            for handle in handles:
                handle.remove()
        hidden = (lambda k: kept[k]) if hooked else (lambda k: out.hidden_states[k + 1])
        features = torch.cat([hidden(k) for k in layer_ids], dim=-1) if layer_ids else None
        last = None
        if return_last_hidden:
            last = kept["norm"] if hooked else out.hidden_states[-1]
        return TargetOutput(logits=out.logits, features=features, last_hidden=last)

    @torch.no_grad()
    def top2_gap(self, token_ids: Sequence[int]) -> float:
        """Top-1 minus top-2 logit of the next token after ``token_ids`` (the whole sequence in
        one forward, no cache): how near a tie a greedy choice there was. Speculative and
        plain decoding round 1-token and k-token forwards differently, so where this is within
        float rounding their greedy outputs may part without either being wrong."""
        logits = self.forward(torch.tensor([list(token_ids)], device=self.device), logits_to_keep=1).logits[0, -1]
        top = logits.float().topk(2).values
        return float(top[0] - top[1])

    def _decoder_layers(self):
        """The model's decoder layers (``model.layers`` of an HF causal LM), or None."""
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) == self.num_layers else None

    # -- text -------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of ``prompt``; with ``chat`` it is wrapped as one user turn."""
        return self.encode_conversation([{"role": "user", "content": prompt}] if chat else prompt)

    def encode_conversation(self, messages) -> list[int]:
        """Token ids of a chat (list of {role, content}) ending with the assistant header."""
        if isinstance(messages, str):
            return self.tokenizer(messages, add_special_tokens=True)["input_ids"]
        if not getattr(self.tokenizer, "chat_template", None):
            text = "\n".join(m["content"] for m in messages)
            return self.tokenizer(text, add_special_tokens=True)["input_ids"]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return list(ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:  # tokenizer-free test targets: show the ids
            return " ".join(map(str, token_ids))
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def new_dynamic_cache(config):
    """An HF ``DynamicCache`` for ``config`` that :func:`crop_cache` can always roll back.

    Sliding-window layers (Gemma 3's local layers) keep only their last window - 1 positions,
    and a layer past its window refuses ``crop`` unless it records the past: it then keeps
    every new position until the next crop, which cuts it back to the window.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache.activate_past_recording()
    return cache


def crop_cache(cache, length: int) -> None:
    """Shrink an HF cache to ``length`` positions (transformers 5 crops by a negative count).

    Called with nothing to drop too: a sliding-window layer then trims back to its window.
    """
    extra = cache.get_seq_length() - length
    if extra < 0:
        raise ValueError(f"cannot roll back a cache of {cache.get_seq_length()} to {length}")
    if extra or length:  # an empty cache has nothing to trim (and its sliding layers no tensors yet)
        cache.crop(-extra)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
