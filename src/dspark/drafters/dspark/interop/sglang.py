"""SGLang (``--speculative-algorithm DSPARK``): the full-vocabulary form, plus its STS file.

SGLang 0.5.23 builds ``markov_w2`` as ``nn.Linear(r, vocab_size)`` (``sglang/srt/models/dspark.py``,
``VanillaMarkov.__init__``), drafts through the target's own full LM head and embedding, and
never reads ``draft_vocab_size``, ``d2t`` or ``t2d``. A reduced-vocabulary drafter is therefore
written in :func:`~.common.full_vocabulary_form`, the same drafter over V tokens; no embedding
or head is written (SGLang skips them), and a drafter whose own copies differ from the target's
is refused, since SGLang would silently use the target's. The calibration goes along as
``sts.json`` in the ``DSparkStsCalibration`` form ``--speculative-dspark-confidence-sts-path``
reads (``speculative/dspark_components/dspark_sts.py``). SGLang builds the confidence head,
and so reads ``sts.json``, only in its ragged verify modes (``SGLANG_RAGGED_VERIFY_MODE``
cap-accept or compact); its default, static, verifies whole blocks
(``models/dspark.py`` ``build_confidence_head``, ``dspark_planner.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dspark.drafters.dspark.interop.common import (
    ExportReport, dtype_name, engine_config, engine_tensors, full_vocabulary_form, load_drafter, own_copies, write_export,
)
from dspark.drafters.dspark.model import CARRIED_KEYS, DSparkModel
from dspark.errors import DsparkError

ENGINE = "SGLang"
STS_NAME = "sts.json"
CALIBRATION_NAME = "calibration.json"
METHOD = "sequential_temperature_scaling"
"""The method ``dspark calibrate`` records (``scheduling.calibration.METHOD``; drafters do not import scheduling)."""


def sts_calibration(calibration: dict, gamma: int) -> dict:
    """dspark's ``calibration.json`` in SGLang's ``DSparkStsCalibration`` fields: one temperature
    per slot (SGLang refuses a table whose length is not its γ), and the ECE per slot before and
    after calibration where dspark measured it for every slot.

    Both apply the temperature the same way: SGLang's σ(raw / T_k) is dspark's σ(logit(c_k) / T_k).
    """
    if calibration.get("method", METHOD) != METHOD:
        raise DsparkError(f"{CALIBRATION_NAME} was fitted by {calibration.get('method')!r}; SGLang reads {METHOD} temperatures")
    temperatures = [float(t) for t in calibration.get("temperatures", [])]
    if len(temperatures) != gamma or not all(math.isfinite(t) and t > 0 for t in temperatures):
        raise DsparkError(f"{CALIBRATION_NAME} holds {len(temperatures)} temperatures; SGLang needs {gamma}, all finite and > 0")
    sts: dict = {"temperatures": temperatures, "dataset": ",".join(sorted(calibration.get("datasets", {}))),
                 "num_samples": int(calibration.get("rounds", 0))}
    per_slot = calibration.get("per_slot") or []
    for field in ("ece_before", "ece_after"):
        values = [slot.get(field) if isinstance(slot, dict) else None for slot in per_slot]
        if len(values) == gamma and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            sts[field] = [float(v) for v in values]
    return sts


def export_sglang(src: str | Path | DSparkModel, out: str | Path, target, dtype: torch.dtype = torch.bfloat16) -> ExportReport:
    """Write the drafter in the form SGLang's DSPARK loads, with ``sts.json`` when it is calibrated."""
    out, model = Path(out), load_drafter(src)
    _, notes = engine_tensors(model, target, ENGINE)  # the engines' refusals and notes
    own = own_copies(model, target)
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
    if model.config.enable_confidence_head:
        notes.append("SGLang uses the confidence head (and sts.json) only with SGLANG_RAGGED_VERIFY_MODE=cap-accept or "
                     "compact; its default, static, verifies every block whole")
    else:
        notes.append("no confidence head: serve with SGLANG_RAGGED_VERIFY_MODE=static (SGLang's default); "
                     "its cap-accept and compact modes refuse a drafter without one")
    return ExportReport(engine="sglang", out=out, dtype=dtype_name(dtype), keys=keys, notes=tuple(notes), serve=(command,))
