"""speculators (vllm-project/speculators 0.9.0, ``DSparkDraftModel.from_pretrained``): its config, our tensors.

Filled in by the speculators exporter work (issue 24); until then it refuses in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark.drafters.dspark.interop.common import ExportReport
from dspark.drafters.dspark.model import DSparkModel
from dspark.errors import DsparkError


def export_speculators(src: str | Path | DSparkModel, out: str | Path, target, dtype: torch.dtype = torch.bfloat16) -> ExportReport:
    raise DsparkError("the speculators export is not written yet")
