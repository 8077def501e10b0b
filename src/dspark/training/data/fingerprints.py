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


def target_fingerprint(target) -> str:
    """sha1 of the target's config (sorted json, paths left out) and of a few embedding rows.

    The rows make two checkpoints of one architecture differ; reading 5 rows keeps it cheap.
    """
    import torch

    model = getattr(target, "model", target)
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    weight = model.get_input_embeddings().weight  # [V, d]
    rows = sorted({0, 1, 2, weight.shape[0] // 2, weight.shape[0] - 1})
    digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    with torch.no_grad():
        sample = weight[rows].detach().to("cpu", torch.float32).contiguous().numpy()  # [5, d]
    digest.update(sample.tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha1 of the sorted vocabulary (added tokens included) and the chat template."""
    digest = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    digest.update(b"\x00" + str(getattr(tokenizer, "chat_template", None) or "").encode("utf-8"))
    return digest.hexdigest()
