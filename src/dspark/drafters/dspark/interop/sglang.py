"""SGLang (``--speculative-algorithm DSPARK``): the full-vocabulary form, plus its STS file.

SGLang 0.5.23 builds ``markov_w2`` as ``nn.Linear(r, vocab_size)`` (``sglang/srt/models/dspark.py``,
``VanillaMarkov.__init__``), drafts through the target's own full LM head and embedding, and
never reads ``draft_vocab_size``, ``d2t`` or ``t2d``. A reduced-vocabulary drafter is therefore
written in :func:`~.common.full_vocabulary_form`, the same drafter over V tokens; no embedding
or head is written (SGLang skips them), and a drafter whose own copies differ from the target's
is refused, since SGLang would silently use the target's. The calibration goes along as
``sts.json`` in the ``DSparkStsCalibration`` form ``--speculative-dspark-confidence-sts-path``
reads (``speculative/dspark_components/dspark_sts.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark.drafters.dspark.interop.common import (
    ExportReport, dtype_name, engine_config, engine_tensors, full_vocabulary_form, load_drafter, target_weights, write_export,
)
from dspark.drafters.dspark.model import CARRIED_KEYS, DSparkModel, same_tensor
from dspark.errors import DsparkError

ENGINE = "SGLang"
STS_NAME = "sts.json"
CALIBRATION_NAME = "calibration.json"


def sts_calibration(calibration: dict, gamma: int) -> dict:
    """dspark's ``calibration.json`` in SGLang's ``DSparkStsCalibration`` fields (one temperature per slot)."""
    temperatures = [float(t) for t in calibration.get("temperatures", [])]
    if len(temperatures) != gamma or not all(t > 0 for t in temperatures):
        raise DsparkError(f"{CALIBRATION_NAME} holds {len(temperatures)} temperatures; SGLang needs {gamma}, all > 0")
    return {"temperatures": temperatures, "dataset": ",".join(sorted(calibration.get("datasets", {}))),
            "num_samples": int(calibration.get("rounds", 0))}


def export_sglang(src: str | Path | DSparkModel, out: str | Path, target, dtype: torch.dtype = torch.bfloat16) -> ExportReport:
    """Write the drafter in the form SGLang's DSPARK loads, with ``sts.json`` when it is calibrated."""
    out, model = Path(out), load_drafter(src)
    _, notes = engine_tensors(model, target, ENGINE)  # the engines' refusals and notes
    own = [key for key in model.carried() if key not in _target_equal(model, target)]
    if own:
        raise DsparkError(f"cannot export for SGLang: it always drafts with the target's embedding and LM head, and this "
                          f"drafter carries its own {', '.join(own)}; its drafts would silently differ")
    full = full_vocabulary_form(model, target)
    tensors = {k: v for k, v in full.state_dict().items() if k not in CARRIED_KEYS}
    config = engine_config(full.config, target, dtype)
    if model.config.reduced_vocab:
        notes = [*notes, f"the {model.config.num_draft_tokens}-token draft vocabulary is written over all "
                         f"{model.config.vocab_size} tokens, as SGLang drafts (Markov rank "
                         f"{model.config.markov_rank} + 1 masks the rest; the same drafts)"]
    calibration = Path(src) / CALIBRATION_NAME if not isinstance(src, DSparkModel) else None
    sts = None
    if calibration is not None and calibration.is_file():
        sts = sts_calibration(json.loads(calibration.read_text()), model.config.block_size)
    keys = write_export(out, config, tensors, dtype)
    command = (f"python -m sglang.launch_server --model-path {target.name} --speculative-algorithm DSPARK "
               f"--speculative-draft-model-path {out}")
    if sts is not None:
        (out / STS_NAME).write_text(json.dumps(sts, indent=2) + "\n")
        command += f" --speculative-dspark-confidence-sts-path {out / STS_NAME}"
    elif model.config.enable_confidence_head:
        notes.append("no calibration.json beside the drafter: SGLang's confidences run at T = 1 (dspark calibrate fits them)")
    return ExportReport(engine="sglang", out=out, dtype=dtype_name(dtype), keys=keys, notes=tuple(notes), serve=(command,))


def _target_equal(model: DSparkModel, target) -> set[str]:
    """Carried keys equal to the target's (what SGLang uses anyway)."""
    reference = target_weights(model.config, target, getattr(model, "d2t", None))
    return {k for k, w in model.carried().items() if same_tensor(w, reference[k])}
