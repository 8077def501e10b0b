"""The target side: the HF adapter, model loading, per-slot K/V and the ragged forward.

- ``model``: :class:`TargetModel` (forward with a cache, feature layers, rollback, chat template);
- ``loading``: model specs (HF id, folder, ``.gguf``, the embedded default) to model + tokenizer;
- ``slot_cache``: per-request K/V slots and the masks of a batched step;
- ``ragged``: :func:`~dspark.target.ragged.verify_forward`, one target forward over ragged rows.
"""

from dspark.target.model import TargetModel, TargetOutput

__all__ = ["TargetModel", "TargetOutput"]
