"""vLLM (``--speculative-config '{"method": "dspark", ...}'``): the authors' layout as it is.

vLLM 0.33.0's ``qwen3_dspark.py`` loader maps every tensor this writes (``d2t`` becomes
``draft_id_to_target_id``, ``t2d`` is dropped, q/k/v and gate/up are stacked); a reduced
vocabulary needs ``lm_head`` rows with ``d2t``, which are written. vLLM reads no STS file, so
the calibration stays behind (its online STS fits its own).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark.drafters.dspark.interop.common import (
    ExportReport, dtype_name, engine_config, engine_tensors, load_drafter, own_copies, write_export,
)
from dspark.drafters.dspark.model import DSparkModel

ENGINE = "vLLM"


def export_vllm(src: str | Path | DSparkModel, out: str | Path, target, dtype: torch.dtype = torch.bfloat16) -> ExportReport:
    """Write the drafter in the layout vLLM's ``method: dspark`` loads; nothing is written on a refusal."""
    out, model = Path(out), load_drafter(src)
    tensors, notes = engine_tensors(model, target, ENGINE)
    notes += [f"{key} differs from the target's: vLLM keeps the drafter's own, SGLang always uses the target's "
              "(dspark convert export --engine sglang refuses it)" for key in own_copies(model, target)]
    if not model.config.enable_confidence_head:
        notes.append("no confidence head: vLLM's adaptive verification needs one")
    keys = write_export(out, engine_config(model.config, target, dtype), tensors, dtype)
    serve = (f"vllm serve {target.name} --speculative-config "
             f"'{{\"method\": \"dspark\", \"model\": \"{out}\", \"num_speculative_tokens\": {model.config.block_size}}}'",)
    return ExportReport(engine="vllm", out=out, dtype=dtype_name(dtype), keys=keys, notes=tuple(notes), serve=serve)
