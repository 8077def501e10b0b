"""DrafterConfig: what the drafter configs (DSparkConfig, Eagle3Config) share.

The fields copied from the target (:func:`target_shapes`) and their checks, the layer fields
that :func:`~dspark.drafters.families.family_blocks` reads, the draft vocabulary size, and
the config.json round trip (each subclass writes its own layout; :func:`values_from_json`
reads what the layouts have in common), and the checks a checkpoint passes before any model
is built from it: :func:`checkpoint_shapes` reads the tensor shapes of model.safetensors
from its header (no tensor is loaded), :func:`check_shapes` compares them with the shapes the
config implies, and :func:`check_finite` refuses NaN or inf weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from dspark.drafters.families import LAYER_FAMILIES, family_json_fields, family_of
from dspark.errors import DsparkError

CONFIG_NAME = "config.json"
COMMON_WRITTEN = {"model_type", "dspark_target_name", "target_hidden_size", "attention_bias", "tie_word_embeddings",
                  "hidden_activation"}
"""Fields of :meth:`DrafterConfig.common_json` that name no dataclass field (read back as nothing or
under another name)."""


def spread_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layer ids spread from layer 1 to the second-to-last (DeepSpec's spacing)."""
    last = num_layers - 2  # output of the last layer is the normed final state: excluded
    count = max(1, min(count, last))
    if count == 1:
        return (last,)
    start = 1 if last >= count else 0
    step = (last - start) / (count - 1)
    return tuple(sorted({round(start + i * step) for i in range(count)}))


def target_shapes(target, default_family: str) -> dict[str, Any]:
    """The config fields copied from ``target``, with 5 feature layers spread over its depth.

    The layer family follows the target's ``model_type``
    (:func:`~dspark.drafters.families.family_of`, ``default_family`` for other targets).
    Gemma 3 targets mix sliding-window layers (local rope, θ = 10k) with full-attention layers
    (global rope, θ = 1M); a drafter's layers all attend to the whole context they see, so
    they take the full-attention layers' rope.
    """
    cfg = target.model.config
    n = cfg.num_hidden_layers
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return dict(
        target_name=target.name,
        vocab_size=target.vocab_size,
        hidden_size=cfg.hidden_size,
        num_target_layers=n,
        target_layer_ids=spread_layers(n, 5),
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
        max_position_embeddings=getattr(cfg, "max_position_embeddings", 8192),
        hidden_act=getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "silu",
        layer_family=family_of(getattr(cfg, "model_type", ""), default_family),
        query_pre_attn_scalar=int(getattr(cfg, "query_pre_attn_scalar", None) or 0),
        final_logit_softcapping=float(softcap) if softcap else None,
    )


Config = TypeVar("Config", bound="DrafterConfig")
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_target_layers", "block_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
                   "rms_norm_eps", "rope_theta")
"""Fields that must be > 0 (sizes, counts, and the two scalars a layer divides by or raises to a power)."""
_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "tuple[int, ...]": "a list of integers"}


def check_field_types(config) -> None:
    """Raise ValueError naming the first field of the dataclass ``config`` whose value is not of
    its annotated type (int, float, str, bool, tuple[int, ...], each optionally ``| None``).

    A config.json is user input: a string, a float or a bool where an int belongs would
    otherwise fail deep inside torch or transformers, far from the field that caused it.
    ``bool`` is not an int here, and a float must be finite; an int is a fine float.
    """
    for f in dataclasses.fields(config):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))  # "int" either way
        value = getattr(config, f.name)
        if kind.endswith(" | None"):
            if value is None:
                continue
            kind = kind.removesuffix(" | None")
        if kind not in _TYPE_NAMES:
            continue  # extra: whatever config.json held
        if kind == "tuple[int, ...]":
            ok = isinstance(value, tuple) and all(_is_int(v) for v in value)
        elif kind == "int":
            ok = _is_int(value)
        elif kind == "float":
            ok = _is_int(value) or (isinstance(value, float) and math.isfinite(value))
        else:
            ok = isinstance(value, bool if kind == "bool" else str)
        if not ok:
            raise ValueError(f"{f.name} must be {_TYPE_NAMES[kind]}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DrafterConfig:
    """The fields every drafter config has; subclasses add theirs and their config.json layout."""

    KIND: ClassVar[str] = "drafter"
    """What the drafter is called in errors."""

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
    """Feature layers, "output of HF layer k" semantics (hidden_states[k + 1])."""
    # -- the drafter --------------------------------------------------------------------
    block_size: int = 7
    """γ: tokens drafted per round."""
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    hidden_act: str = "silu"
    layer_family: str = "qwen3"
    """transformers block family of the draft layers (see the subclass)."""
    query_pre_attn_scalar: int = 0
    """gemma3 only: attention scores are scaled by query_pre_attn_scalar ** -0.5 (0 = head_dim)."""
    final_logit_softcapping: float | None = None
    """The target's cap on its final logits (Gemma: cap · tanh(z / cap)), applied to the draft
    LM head's logits the same way; None where the target has none. A property of the target,
    so it holds whatever the drafter's family."""
    draft_vocab_size: int = 0
    """N: tokens the drafter predicts over (a row subset of the target head, named by the
    ``d2t``/``t2d`` tensors of the checkpoint); 0 means the whole target vocabulary."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Unrecognised config.json fields, kept so a round trip loses nothing."""

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in POSITIVE_FIELDS:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.target_layer_ids:
            raise ValueError("target_layer_ids must name at least one target layer")
        ids = list(self.target_layer_ids)
        if ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.num_target_layers - 1:
            raise ValueError(
                f"target_layer_ids {ids} must be strictly increasing in 0..{self.num_target_layers - 2}"
                " (the final, normed layer is never a feature layer)"
            )
        if self.layer_family not in LAYER_FAMILIES:
            raise ValueError(f"layer_family must be one of {', '.join(LAYER_FAMILIES)}, got {self.layer_family!r}")
        if self.query_pre_attn_scalar < 0:
            raise ValueError("query_pre_attn_scalar must be >= 0 (0 = head_dim)")
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            raise ValueError("final_logit_softcapping must be > 0 or None")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be in 0..{self.vocab_size}, got {self.draft_vocab_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def num_draft_tokens(self) -> int:
        """N, the size of the draft vocabulary (V when it is the whole target vocabulary)."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def reduced_vocab(self) -> bool:
        """True when the drafter predicts over a strict subset of the target vocabulary."""
        return self.num_draft_tokens < self.vocab_size

    def replace(self: Config, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def default_family(cls) -> str:
        """The family of a drafter for a target dspark has no family for: the field's default."""
        return cls.__dataclass_fields__["layer_family"].default

    @classmethod
    def for_target(cls: type[Config], target, **overrides: Any) -> Config:
        """Copy the target's shapes (:func:`target_shapes`), then ``overrides``."""
        values = target_shapes(target, cls.default_family())
        values.update(overrides)
        values["target_layer_ids"] = tuple(values["target_layer_ids"])
        return cls(**values)

    def check_target(self, target) -> None:
        """Raise IncompatibleDrafterError unless ``target`` is the model this was built for."""
        from dspark.errors import IncompatibleDrafterError

        cfg = target.model.config
        problems = []
        if target.vocab_size != self.vocab_size:
            problems.append(f"vocabulary {target.vocab_size} != {self.vocab_size}")
        if cfg.hidden_size != self.hidden_size:
            problems.append(f"hidden size {cfg.hidden_size} != {self.hidden_size}")
        if cfg.num_hidden_layers != self.num_target_layers:
            problems.append(f"layer count {cfg.num_hidden_layers} != {self.num_target_layers}")
        if problems:
            raise IncompatibleDrafterError(
                f"this {self.KIND} was trained for {self.target_name!r} and does not fit target "
                f"{target.name!r}: " + "; ".join(problems)
            )

    # -- config.json ----------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def common_json(self) -> dict[str, Any]:
        """The config.json fields of both layouts (HF-config names), over the unknown ones kept
        in ``extra``; a subclass's ``to_json_dict`` adds its own."""
        d: dict[str, Any] = dict(self.extra)
        d.update(
            model_type=self.layer_family,
            dspark_target_name=self.target_name,
            vocab_size=self.vocab_size,
            draft_vocab_size=self.num_draft_tokens,
            hidden_size=self.hidden_size,
            target_hidden_size=self.hidden_size,
            num_target_layers=self.num_target_layers,
            target_layer_ids=list(self.target_layer_ids),
            block_size=self.block_size,
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
    def from_json_dict(cls: type[Config], d: dict[str, Any]) -> Config:
        raise NotImplementedError

    def save(self, folder: str | Path) -> None:
        """Write ``folder/config.json`` (sorted keys, so equal configs give equal files)."""
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls: type[Config], folder: str | Path) -> Config:
        return cls.from_json_dict(load_json(folder))


# -- config.json -------------------------------------------------------------------------------------
def values_from_json(cls, d: dict[str, Any], written: set[str]) -> dict[str, Any]:
    """The dataclass ``cls``'s field values from a config.json dict ``d``.

    Fields named as the dataclass's are read as they are; ``target_name`` is
    ``dspark_target_name``, ``layer_family`` is ``model_type`` (the class's default without
    one). A draft vocabulary written as V (full-vocabulary checkpoints) becomes 0. What
    neither the dataclass nor ``written`` (the fields the subclass writes for others to read,
    besides :data:`COMMON_WRITTEN`) names goes to ``extra``.
    """
    known = {f.name for f in dataclasses.fields(cls)} - {"extra", "target_name", "layer_family"}
    values = {k: d[k] for k in known if k in d}
    if not isinstance(d["target_layer_ids"], list):
        raise ValueError(f"target_layer_ids must be a list of integers, got {d['target_layer_ids']!r}")
    values["target_layer_ids"] = tuple(d["target_layer_ids"])
    values["target_name"] = d.get("dspark_target_name", d.get("_name_or_path", "unknown"))
    values["layer_family"] = d.get("model_type", cls.default_family())
    if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
        values["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
    if values.get("draft_vocab_size") == values.get("vocab_size"):
        values["draft_vocab_size"] = 0  # written as V by full-vocabulary checkpoints
    values["extra"] = {k: v for k, v in d.items() if k not in known and k not in written | COMMON_WRITTEN}
    return values


def load_json(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; ValueError when it is not a JSON object."""
    d = json.loads((Path(folder) / CONFIG_NAME).read_text())
    if not isinstance(d, dict):
        raise ValueError(f"config.json holds a {type(d).__name__}, not a JSON object")
    return d


# -- model.safetensors against config.json ------------------------------------------------------------
def checkpoint_shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor in the safetensors file ``path``, read from its header only.

    ``safe_open`` checks that the header covers the file (a truncated file raises
    ``SafetensorError``) and maps nothing into memory until a tensor is asked for.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}


def check_layer_count(path: Path, found: dict[str, list[int]], prefix: str, expected: int) -> None:
    """Refuse ``path`` unless its tensors under ``prefix`` (``layers.``) number exactly layers 0..expected-1.

    Run before a model is built: the layer count of config.json sizes the allocation, so a
    wrong one must not cost its memory first.
    """
    held = sorted({int(k[len(prefix):].split(".")[0]) for k in found
                   if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()})
    if held != list(range(expected)):
        have = f"{len(held)} ({prefix}{held[0]}..{prefix}{held[-1]})" if held else f"no {prefix}* tensors"
        raise DsparkError(f"{path.parent}/{CONFIG_NAME} says num_hidden_layers {expected}, but {path} holds "
                          f"{have}; the config does not belong to these weights")


def check_shapes(path: Path, found: dict[str, list[int]], expected: dict[str, list[int]],
                 optional: dict[str, list[int]] | None = None) -> None:
    """Refuse ``path`` unless its tensors are ``expected`` (name -> shape) plus any of ``optional``, shape for shape."""
    optional = optional or {}
    wanted = {**expected, **optional}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in wanted]
    wrong = [f"{k} {found[k]} in the file, {wanted[k]} by {CONFIG_NAME}" for k in found
             if k in wanted and found[k] != wanted[k]]
    if missing or unexpected or wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        parts = [f"size mismatch for {'; '.join(wrong[:3])}{more}"] if wrong else []
        parts += [f"missing {missing[:5]}"] if missing else []
        parts += [f"unexpected {unexpected[:5]}"] if unexpected else []
        raise DsparkError(f"checkpoint {path.parent} does not match its config: " + "; ".join(parts))


def check_finite(path: Path, state: dict[str, Any]) -> None:
    """Refuse NaN or inf in any floating tensor of ``state`` (loaded from ``path``), naming the tensor.

    A non-finite weight gives NaN logits and NaN confidences: the run would crash at T > 0, or
    (with the default policy) silently stop speculating. It is the checkpoint that is broken.
    """
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):  # host sync: once per tensor, at load
            raise DsparkError(f"{path}: tensor {name} holds NaN or inf values; this drafter is broken "
                              f"(retrain it, or export it again from a healthy checkpoint)")
