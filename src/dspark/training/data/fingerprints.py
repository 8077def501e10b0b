"""What a store is bound to: fingerprints of the target and the tokenizer, and the tokenizer alone.

A store records both fingerprints in ``store.json``; reopening it with another target or
tokenizer is refused (:mod:`dspark.training.data.store`).
"""

from __future__ import annotations

import hashlib
import json


def load_tokenizer(spec: str | None = None):
    """The tokenizer of a model spec (as :meth:`TargetModel.load` takes it) without its weights."""
    from transformers import AutoTokenizer

    from dspark.errors import ModelLoadError
    from dspark.target.loading import resolve

    where, kwargs = resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer of {spec!r} from {where}: {exc}") from exc


DTYPE_KEYS = ("torch_dtype", "dtype")
"""Config keys that say what dtype a model was loaded in, not what model it is."""


def target_fingerprint(target) -> str:
    """sha1 of the target's config (sorted json, paths and its load dtype left out) and of a
    few embedding rows rounded to bfloat16: the model, not its dtype, so data made in float32 on
    a CPU and in bfloat16 on a GPU from the same checkpoint bind to the same target.

    The rows make two checkpoints of one architecture differ; reading 5 rows keeps it cheap.
    Stores written before this (bound to :func:`legacy_target_fingerprint`) still open with
    the same target in float32 (:func:`fingerprint_for`).
    """
    return _fingerprint(target, drop=DTYPE_KEYS, rows_dtype="bfloat16")


def legacy_target_fingerprint(target) -> str:
    """The fingerprint of stores written before session 13: config with its dtype, float32 rows."""
    return _fingerprint(target, drop=(), rows_dtype="float32")


def fingerprint_for(target, recorded: str | None) -> str:
    """The fingerprint to bind data of ``target`` to, given what a store or file already
    ``recorded``: the legacy one where that is what it holds (and this target has it), else
    :func:`target_fingerprint`."""
    if recorded is not None and recorded != target_fingerprint(target) and recorded == legacy_target_fingerprint(target):
        return recorded
    return target_fingerprint(target)


def _fingerprint(target, drop: tuple[str, ...], rows_dtype: str) -> str:
    import torch

    model = getattr(target, "model", target)
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version" and k not in drop}
    weight = model.get_input_embeddings().weight  # [V, d]
    rows = sorted({0, 1, 2, weight.shape[0] // 2, weight.shape[0] - 1})
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    with torch.no_grad():
        sample = weight[rows].detach().to("cpu").to(getattr(torch, rows_dtype)).float().contiguous().numpy()  # [5, d]
    digest.update(sample.tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha1 of the sorted vocabulary (added tokens included) and the chat template."""
    digest = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    digest.update(b"\x00" + str(getattr(tokenizer, "chat_template", None) or "").encode("utf-8"))
    return digest.hexdigest()
