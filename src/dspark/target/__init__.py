"""The target side: the HF adapter, model loading, per-slot K/V and the ragged forward.

- ``model``: :class:`TargetModel` (forward with a cache, feature layers, rollback, chat template);
- ``loading``: model specs (HF id, folder, ``.gguf``, the embedded default) to model + tokenizer;
- ``slot_cache``: per-request K/V slots and the masks of a batched step;
- ``ragged``: :func:`~dspark.target.ragged.verify_forward`, one target forward over ragged rows.

``TargetModel`` and ``TargetOutput`` load on first use, so that ``dspark.target.loading`` (the
CLI's checks of ``--model``, ``--device`` and ``--dtype``) imports without torch.
"""

__all__ = ["TargetModel", "TargetOutput"]


def __getattr__(name: str):
    if name in __all__:
        from dspark.target import model

        return getattr(model, name)
    raise AttributeError(f"module 'dspark.target' has no attribute {name!r}")
