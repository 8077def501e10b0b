"""speculators (vllm-project/speculators 0.9.0, ``DSparkDraftModel.from_pretrained``): its config, our tensors.

speculators keeps the DeepSpec tensor names (``layers.*``, ``fc``, ``hidden_norm``, ``norm``,
``markov_head.*``, ``confidence_head.proj.*``) but reads its own config.json: a
``DSparkSpeculatorConfig`` (``speculators/models/dspark/config.py``) over the DFlash fields
(``speculators/models/dflash/config.py``), found by ``speculators_model_type``. Without that
field ``SpeculatorModel.from_pretrained`` tries to convert the folder as an external
checkpoint and refuses ours (``speculators/model.py:327``), so the vLLM layout cannot be reused.

What speculators takes from the verifier instead of the checkpoint (``speculators/model.py:127-202``,
called by ``from_pretrained`` at ``:397``): the embedding always (``dflash/core.py:171-176``),
the LM head for a full vocabulary, and the final norm (``verifier_norm``, used in training
only). So ``embed_tokens`` is never written, ``lm_head`` only with a reduced vocabulary
(its rows of the draft tokens, with ``d2t``/``t2d``, as speculators saves them:
``dflash/core.py:153-164``), and a drafter whose own copy of a reloaded tensor differs from the
target's is refused: speculators would silently use the target's. The verifier is named by
the target's folder or hub id, where speculators reads those tensors (``utils/loading.py``).
speculators has no STS calibration, so a ``calibration.json`` stays behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dspark.drafters.dspark.interop.common import (
    ExportReport, dtype_name, engine_tensors, load_drafter, own_copies, write_export,
)
from dspark.drafters.dspark.model import DSparkModel
from dspark.errors import DsparkError

ENGINE = "speculators"
FORMAT_VERSION = "0.9.0"
"""The speculators release whose loader this layout was checked against (tests/test_export_speculators.py)."""


def export_speculators(src: str | Path | DSparkModel, out: str | Path, target, dtype: torch.dtype = torch.bfloat16) -> ExportReport:
    """Write the drafter as speculators' ``DSparkDraftModel.from_pretrained`` loads it, every
    parameter from the folder or the verifier; nothing is written on a refusal."""
    out, model = Path(out), load_drafter(src)
    config = model.config
    tensors, notes = engine_tensors(model, target, ENGINE)
    _check_embedding(target)
    # speculators loads these from the verifier whatever the folder holds (dflash/core.py:171-176).
    reloaded = ("embed_tokens.weight",) if config.reduced_vocab else ("embed_tokens.weight", "lm_head.weight")
    own = own_copies(model, target)
    if any(k in reloaded for k in own):
        raise DsparkError(f"cannot export for speculators: it always loads {', '.join(k for k in own if k in reloaded)} "
                          "from the verifier, and this drafter carries its own; its drafts would silently differ")
    if own:  # a reduced vocabulary's own head rows: speculators keeps the checkpoint's (model.py:182)
        notes.append("lm_head.weight differs from the target's rows: speculators uses the drafter's own")
    verifier = verifier_name(target)
    for key in reloaded:
        tensors.pop(key, None)
    keys = write_export(out, speculators_config(model, target, verifier, dtype), tensors, dtype)
    if Path(verifier).is_dir():
        notes.append(f"speculators reloads the embedding{'' if config.reduced_vocab else ' and LM head'} from the "
                     f"verifier folder {verifier} on every load; it must stay there")
    serve = (f"python -c \"from speculators.models.dspark import DSparkDraftModel; "
             f"DSparkDraftModel.from_pretrained('{out}')\"",)
    return ExportReport(engine="speculators", out=out, dtype=dtype_name(dtype), keys=keys, notes=tuple(notes), serve=serve)


def speculators_config(model: DSparkModel, target, verifier: str, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a speculators DSpark checkpoint (file:line below are speculators 0.9.0's)."""
    config = model.config
    # The draft decoder's own HF config: DFlashDraftModel builds its Qwen3 layers, rotary and
    # norms from it (dflash/core.py:92-134) and reads the verifier vocabulary V from its
    # vocab_size (model.py:46, the rows of embed_tokens and markov_w1). vLLM's speculators path
    # serves it as the draft's HF config, whose max_position_embeddings caps the draft's
    # context as engine_config's does.
    layers = model.hf_config.to_diff_dict()
    layers.pop("transformers_version", None)
    layers["max_position_embeddings"] = max(config.max_position_embeddings,
                                            getattr(target.model.config, "max_position_embeddings", 0) or 0)
    target_cfg = target.model.config
    return {
        "speculators_model_type": "dspark",  # dspark/config.py:22: picks DSparkSpeculatorConfig (config.py:214, :242)
        "speculators_version": FORMAT_VERSION,  # config.py:277
        "architectures": ["DSparkSpeculator"],  # dspark/config.py:23
        "transformer_layer_config": layers,  # dflash/config.py:34, parsed as a Qwen3Config (:89-100)
        "draft_vocab_size": config.num_draft_tokens,  # dflash/config.py:39; N != V turns on d2t/t2d (model.py:48)
        "block_size": config.block_size,  # dflash/config.py:44: γ slots per block, the anchor in slot 0
        "target_hidden_size": target_cfg.hidden_size,  # dflash/config.py:51
        # hidden_states indices of the verifier (dflash/core.py:167; the fc input, :122): speculators'
        # converter maps a DeepSpec/z-lab layer id k, "output of layer k", to k + 1 (convert/dflash/converter.py:117-126).
        "aux_hidden_state_layer_ids": [k + 1 for k in config.target_layer_ids],
        "mask_token_id": config.mask_token_id,  # dflash/config.py:61; fills slots 1.. (dflash/core.py:408-414)
        "sliding_window_non_causal": False,  # dflash/config.py:66; every draft layer is full attention
        # dspark/config.py:28: slot k predicts anchor + k + 1 and its Markov bias reads the token
        # at anchor + k (dspark/core.py:157-161), DeepSpec's layout and ours.
        "sample_from_anchor": True,
        "markov_rank": config.markov_rank,  # dspark/config.py:41; W1 [V, r], W2 [N, r] (dspark/model_definitions.py:35-37)
        "markov_head_type": config.markov_head_type,  # dspark/config.py:48
        "enable_confidence_head": config.enable_confidence_head,  # dspark/config.py:57
        # dspark/config.py:61 (default True): the head reads [h_k; W1[x_{k-1}]] (dspark/core.py:187-191).
        "confidence_head_with_markov": config.confidence_head_with_markov and config.markov_rank > 0,
        "speculators_config": {  # config.py:116-161
            "algorithm": "dspark",
            # proposals/greedy.py:38-61 (its defaults written out); with sample_from_anchor all γ slots are proposed (dflash/core.py:256-259).
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": config.block_size,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            # config.py:40-113: where from_pretrained reloads embed_tokens, lm_head and the final norm.
            "verifier": {"name_or_path": verifier,
                         "architectures": list(getattr(target_cfg, "architectures", None) or [type(target.model).__name__])},
        },
        "dtype": dtype_name(dtype),
    }


def verifier_name(target) -> str:
    """Where speculators finds the target's tensors: its hub id, or its folder as an absolute path
    (a .gguf target: the safetensors folder dspark dequantized it to)."""
    from dspark.target.loading import resolve

    try:
        where, _ = resolve(target.name)
    except DsparkError:
        raise DsparkError(f"cannot export for speculators: it reloads the embedding from the verifier its config names, "
                          f"and target {target.name!r} is not a folder, .gguf or Hugging Face id") from None
    path = Path(where)
    return str(path.resolve()) if path.is_dir() else where


def _check_embedding(target) -> None:
    """Refuse a target whose embedding is scaled: speculators' drafter would embed without the scale."""
    scale = getattr(target.model.get_input_embeddings(), "embed_scale", None)  # Gemma: sqrt(d)
    if scale is not None and float(scale) != 1.0:
        raise DsparkError(f"cannot export for speculators: its drafter embeds tokens with the verifier's plain table "
                          f"(speculators/model.py:58), and this target scales its embedding by {float(scale):g}")
