"""Checkpoint interop: the authors' DeepSpec checkpoints in; drafters out for every engine that serves DSpark.

One module per engine, each writing what that engine's own loader accepts and refusing in
one line what it cannot serve; :mod:`.common` holds what they share. ``EXPORTERS`` maps the
``--engine`` names of ``dspark convert export`` to them.

| engine | module | what it writes |
|---|---|---|
| vllm | :mod:`.vllm` | the authors' layout; a reduced vocabulary as ``lm_head`` rows + ``d2t``/``t2d`` |
| sglang | :mod:`.sglang` | the full-vocabulary form (:func:`~.common.full_vocabulary_form`) + ``sts.json`` |
| llama.cpp | :mod:`.llamacpp` | the vLLM layout, converted to GGUF by llama.cpp's own ``convert_hf_to_gguf.py`` |
| speculators | :mod:`.speculators` | speculators' config fields over the same tensors |
| deepspec | :mod:`.deepspec` | the full-vocabulary form + ``num_anchors`` + the target's embedding and head |

All are pure functions of folders and loaded models; the CLI (:mod:`dspark.cli.convert`) only
loads the target and prints.
"""

from __future__ import annotations

from dspark.drafters.dspark.interop.common import (
    ENGINE_ARCHITECTURE, OUTSIDE_LOGIT, ExportReport, check_exportable, engine_config, expected_shapes,
    full_vocabulary_form, read_config, read_tensors,
)
from dspark.drafters.dspark.interop.deepspec import ImportReport, deepspec_config, export_deepspec, import_deepspec
from dspark.drafters.dspark.interop.llamacpp import export_llamacpp
from dspark.drafters.dspark.interop.sglang import export_sglang
from dspark.drafters.dspark.interop.speculators import export_speculators
from dspark.drafters.dspark.interop.vllm import export_vllm

EXPORTERS = {
    "vllm": export_vllm,
    "sglang": export_sglang,
    "llama.cpp": export_llamacpp,
    "speculators": export_speculators,
    "deepspec": export_deepspec,
}
"""``--engine`` name -> exporter(src, out, target, dtype) -> ExportReport."""

__all__ = [
    "ENGINE_ARCHITECTURE", "EXPORTERS", "OUTSIDE_LOGIT", "ExportReport", "ImportReport", "check_exportable",
    "deepspec_config", "engine_config", "expected_shapes", "export_deepspec", "export_llamacpp", "export_sglang",
    "export_speculators", "export_vllm", "full_vocabulary_form", "import_deepspec", "read_config", "read_tensors",
]
