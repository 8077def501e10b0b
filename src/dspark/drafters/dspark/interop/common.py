"""What every checkpoint layout shares: reading folders, checking tensors against a config,
the tensors and config.json of the engines' Qwen3 DSpark layout, and writing them.

The per-engine modules (:mod:`.vllm`, :mod:`.sglang`, :mod:`.speculators`, :mod:`.deepspec`,
:mod:`.llamacpp`) build on these; none of them imports another engine's module.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dspark.drafters.dspark.config import DSparkConfig
from dspark.drafters.dspark.model import CARRIED_KEYS, WEIGHTS_NAME, DSparkModel, same_tensor
from dspark.drafters.vocab import check_draft_ids, d2t_t2d, draft_ids_from_d2t
from dspark.errors import DsparkError

INDEX_NAME = "model.safetensors.index.json"
ENGINE_ARCHITECTURE = "Qwen3DSparkModel"
"""The one architecture string vLLM, SGLang, llama.cpp and DeepSpec route to their Qwen3 DSpark drafter (exactly)."""
VERIFIED_TARGETS = ("qwen3", "qwen3_moe")
"""Target families upstream has served DSpark drafters for (vLLM #46995, SGLang ``set_dflash_layers_to_capture``)."""


@dataclass(frozen=True)
class ExportReport:
    """What an exporter wrote."""

    engine: str
    out: Path
    dtype: str
    keys: tuple[str, ...]
    notes: tuple[str, ...]
    """Things the user should know (one line each), such as a carried copy SGLang will ignore."""
    serve: tuple[str, ...] = ()
    """The commands that load or serve the result in that engine (printed by ``dspark convert export``)."""


def read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise DsparkError(f"{src} is not a checkpoint folder (no config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DsparkError(f"{path} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DsparkError(f"{path} is not a JSON object")
    return raw


def expected_shapes(config: DSparkConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, with its shape; the carried
    ``embed_tokens`` [V, d] and ``lm_head`` [N, d] included (they are optional)."""
    with torch.device("meta"):
        model = DSparkModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["embed_tokens.weight"] = (config.vocab_size, config.hidden_size)
    shapes["lm_head.weight"] = (config.num_draft_tokens, config.hidden_size)
    return shapes


def read_tensors(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``src``: ``model.safetensors`` or the shards its index names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = src / INDEX_NAME
    if (src / WEIGHTS_NAME).is_file():
        files = [src / WEIGHTS_NAME]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DsparkError(f"{index} is not a safetensors index: {exc}") from None
        files = [src / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise DsparkError(f"{index} names shard {f.name}, which is not in {src}")
    else:
        raise DsparkError(f"{src} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (OSError, SafetensorError) as exc:
            raise DsparkError(f"could not read {f}: {exc}") from None
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise DsparkError(f"{f.name} repeats tensors of another shard: {', '.join(twice[:3])}")
        tensors.update(part)
    return tensors


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], src: Path) -> None:
    """Refuse unknown names, missing tensors (embed/LM head may be absent) and wrong shapes."""
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise DsparkError(f"{src}: unknown tensor{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:3])}{more} "
                          "(not part of a DSpark drafter of this config)")
    missing = sorted(set(expected) - set(tensors) - set(CARRIED_KEYS))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DsparkError(f"{src}: missing tensor{'s' if len(missing) > 1 else ''} {', '.join(missing[:3])}{more}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != expected[key]:
            raise DsparkError(f"{src}: {key} is {list(tensor.shape)}, expected {list(expected[key])} from config.json")
    if "d2t" in tensors:
        vocab = expected["t2d"][0]
        try:
            ids = draft_ids_from_d2t(tensors["d2t"].long())
            check_draft_ids(ids, vocab)
        except ValueError as exc:
            raise DsparkError(f"{src}: d2t is not a valid draft vocabulary: {exc}") from None
        if not torch.equal(d2t_t2d(ids, vocab)[1], tensors["t2d"].bool()):
            raise DsparkError(f"{src}: t2d does not match d2t")


def target_weights(config: DSparkConfig, target, d2t: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The target's embedding # [V, d] and LM head rows of the draft tokens # [N, d], by carried key."""
    embed = target.model.get_input_embeddings().weight.detach()
    head = target.model.get_output_embeddings().weight.detach()
    if config.reduced_vocab:
        head = head[draft_ids_from_d2t(d2t).to(head.device)]
    return {"embed_tokens.weight": embed, "lm_head.weight": head}


# -- dspark -> the engines ----------------------------------------------------------------
def check_exportable(config: DSparkConfig, engine: str = "vLLM, SGLang and llama.cpp") -> None:
    """Refuse, in one line, a drafter the engines' Qwen3 DSpark class cannot serve (needs only the config)."""
    if config.layer_family != "qwen3":
        why = {"llama": "no q/k norm", "gemma3": "sandwich norms"}
        raise DsparkError(
            f"cannot export for {engine}: it serves Qwen3-style DSpark drafters ({ENGINE_ARCHITECTURE}) only, and this "
            f"drafter's backbone is {config.layer_family} ({why.get(config.layer_family, 'not Qwen3')}); "
            "train one with --layer-family qwen3 (the default)"
        )
    if config.final_logit_softcapping is not None:
        raise DsparkError(f"cannot export for {engine}: its Qwen3 DSpark drafter does not soft-cap draft logits; this drafter caps them "
                          f"at {config.final_logit_softcapping} as its target does, so it cannot be exported")
    if config.markov_rank == 0:
        raise DsparkError(f"cannot export for {engine}: its DSpark drafter requires markov_rank > 0; "
                          "a DFlash drafter (markov_rank 0) cannot be exported as DSpark")
    if config.markov_head_type != "vanilla":
        raise DsparkError(f"cannot export for {engine}: the {config.markov_head_type} Markov head has no vLLM or "
                          "llama.cpp destination (they serve the vanilla head only), so dspark exports vanilla heads only")
    if config.hidden_act != "silu":
        raise DsparkError(f"cannot export for {engine}: its Qwen3 DSpark MLP is silu only; this drafter uses {config.hidden_act}")


def own_copies(model: DSparkModel, target) -> list[str]:
    """The carried keys whose tensors differ from the target's (embedding; head rows of the draft tokens):
    what engines that always borrow the target's would silently replace."""
    reference = target_weights(model.config, target, getattr(model, "d2t", None))
    return sorted(k for k, w in model.carried().items() if not same_tensor(w, reference[k]))


def load_drafter(src_or_model: str | Path | DSparkModel) -> DSparkModel:
    return src_or_model if isinstance(src_or_model, DSparkModel) else DSparkModel.from_pretrained(src_or_model)


def engine_tensors(model: DSparkModel, target, engine: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of the engines' layout (DeepSpec's key names) and notes on the target.

    Carried ``embed_tokens``/``lm_head`` are kept as they are; a reduced vocabulary gets the
    target head's rows of its draft tokens as ``lm_head`` (vLLM and llama.cpp require it with
    ``d2t``); a draft-vocabulary W1 is expanded to the V rows the engines index by target id.
    """
    config = model.config
    check_exportable(config, engine)
    config.check_target(target)
    model.check_draft_vocab()
    carried = model.carried()
    tensors = {**model.state_dict(), **carried}
    if config.markov_w1_vocab == "draft":
        w1 = "markov_head.markov_w1.weight"
        tensors[w1] = tensors[w1][model.markov_rows(torch.arange(config.vocab_size, device=tensors[w1].device))]
    reference = target_weights(config, target, getattr(model, "d2t", None))
    if config.reduced_vocab and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = reference["lm_head.weight"]
    notes = []
    family = getattr(target.model.config, "model_type", "?")
    if family not in VERIFIED_TARGETS:
        notes.append(f"the target is {family}: the GPU engines serve DSpark for targets that expose their "
                     f"hidden states to drafters ({', '.join(VERIFIED_TARGETS)} verified upstream); check yours")
    return tensors, notes


OUTSIDE_LOGIT = -1.0e4
"""The Markov bias :func:`full_vocabulary_form` gives every token outside a reduced draft
vocabulary: exp(-1e4) is 0 in fp32, and -1e4 is exact enough in bf16 (a step of 64 there)."""


@torch.no_grad()
def full_vocabulary_form(model: DSparkModel, target) -> DSparkModel:
    """The same drafter over the whole target vocabulary, for engines that draft through the
    target's full LM head and never read ``d2t`` (SGLang, DeepSpec).

    Writing W2 out to V rows with zeros outside the draft vocabulary gives a different drafter:
    the full head puts mass on tokens the reduced drafter never proposes. Instead the Markov
    head gains one rank: column r of W1 is 1 for every token and row t of W2 holds
    :data:`OUTSIDE_LOGIT` for every t outside the draft vocabulary (0 inside). The draft
    tokens' logits are unchanged, every other token's falls by 1e4 (q = 0 there, as before),
    and the confidence head reads a zero weight on the new column, so c_k is unchanged.
    A full-vocabulary drafter is returned as it is.
    """
    config = model.config
    if not config.reduced_vocab:
        return model
    check_exportable(config, "a full-vocabulary engine")
    if "lm_head.weight" in own_copies(model, target):
        raise DsparkError("this drafter carries its own LM head rows, which an engine drafting through the "
                          "target's full head cannot use; it cannot be written over the full vocabulary")
    r, V = config.markov_rank, config.vocab_size
    full = DSparkModel(dataclasses.replace(config, draft_vocab_size=0, markov_rank=r + 1, markov_w1_vocab="target"))
    state = {k: v for k, v in model.state_dict().items() if k not in ("d2t", "t2d", *CARRIED_KEYS)}
    head = model.markov_head
    w1 = head.markov_w1.weight[model.markov_rows(torch.arange(V, device=head.markov_w1.weight.device))]
    state["markov_head.markov_w1.weight"] = torch.cat([w1, torch.ones(V, 1, dtype=w1.dtype, device=w1.device)], 1)
    w2 = torch.zeros(V, r + 1, dtype=w1.dtype, device=w1.device)
    w2[:, r] = OUTSIDE_LOGIT
    draft_ids = model.draft_ids.to(w2.device)
    w2[draft_ids, :r] = head.markov_w2.weight
    w2[draft_ids, r] = 0.0
    state["markov_head.markov_w2.weight"] = w2
    if model.confidence_head is not None and model.confidence_head.proj.in_features > config.hidden_size:
        proj = state["confidence_head.proj.weight"]
        state["confidence_head.proj.weight"] = torch.cat([proj, proj.new_zeros(proj.shape[0], 1)], 1)
    full.load_state_dict(state, strict=True)
    embed = model.carried().get("embed_tokens.weight")
    full.carry(embed_tokens=embed)
    return full.to(dtype=head.markov_w1.weight.dtype).eval()


def engine_config(config: DSparkConfig, target, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the engines' layout: the authors' (DeepSpec) fields, with every field vLLM and SGLang read."""
    d = config.to_json_dict()
    d.pop("markov_w1_vocab", None)  # written expanded to the V-row layout the engines read
    target_cfg = target.model.config
    d.update(
        architectures=[ENGINE_ARCHITECTURE],
        model_type="qwen3",
        tie_word_embeddings=False,
        num_target_layers=target_cfg.num_hidden_layers,
        target_hidden_size=target_cfg.hidden_size,
        # vLLM caps the draft's rotary cache and max_model_len at the draft's own value.
        max_position_embeddings=max(config.max_position_embeddings,
                                    getattr(target_cfg, "max_position_embeddings", 0) or 0),
        dtype=dtype_name(dtype),
    )
    d.pop("torch_dtype", None)
    return d


def write_export(out: Path, config_json: dict[str, Any], tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[str, ...]:
    """Write ``config.json`` and ``model.safetensors`` (floating tensors in ``dtype``) to the new folder ``out``."""
    check_out(out)
    state, seen = {}, set()
    for key, value in tensors.items():
        value = (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()
        if value.untyped_storage().data_ptr() in seen:  # a tied target's embedding is its head: safetensors
            value = value.clone()                        # writes each tensor's own bytes
        seen.add(value.untyped_storage().data_ptr())
        state[key] = value
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    save(state, out)
    return tuple(sorted(state))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DsparkError(f"{out} already exists and is not an empty folder; choose a new output folder")


def save(tensors: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
