"""llama.cpp (``--spec-type draft-dspark``): the engines' layout, turned into a GGUF by llama.cpp's own converter.

llama.cpp's ``convert_hf_to_gguf.py --target-model-dir`` registers ``Qwen3DSparkModel``
(``conversion/qwen.py``, ``DSparkModel``): it writes the draft's GGUF keys, drops ``t2d``, turns
``d2t`` offsets into absolute ids and takes the tokenizer from the target's folder. dspark
writes the folder that converter reads (the vLLM layout: reduced vocabularies with ``lm_head``
rows and ``d2t``) and runs the converter, or prints the exact command when no converter is
given. Writing the GGUF with the ``gguf`` package instead would mean transcribing every
``dflash.*`` key and tensor name of that converter by hand, and following them as llama.cpp
changes; running llama.cpp's own code writes no format code here at all.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import torch

from dspark.drafters.dspark.interop.common import (
    ExportReport, check_out, dtype_name, engine_config, engine_tensors, load_drafter, write_export,
)
from dspark.drafters.dspark.model import DSparkModel
from dspark.errors import DsparkError

ENGINE = "llama.cpp"
HF_FOLDER = "hf"
OUTTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def target_folder(spec: str | None) -> Path:
    """The target's Hugging Face folder (config.json and tokenizer): the converter reads its vocabulary there."""
    from dspark.target.loading import resolve

    where, kwargs = resolve(spec)
    if Path(where).is_dir():
        return Path(where)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(where, local_files_only=kwargs.get("local_files_only", False)))


def converter_command(converter: Path, hf: Path, target_dir: Path, gguf: Path, dtype: torch.dtype) -> list[str]:
    return [sys.executable, str(converter), str(hf), "--target-model-dir", str(target_dir),
            "--outfile", str(gguf), "--outtype", OUTTYPES[dtype]]


def export_llamacpp(src: str | Path | DSparkModel, out: str | Path, target, dtype: torch.dtype = torch.float32,
                    converter: Path | None = None, target_dir: Path | None = None) -> ExportReport:
    """Write ``OUT/hf`` (the folder llama.cpp's converter reads) and, given ``converter``, ``OUT/draft-<type>.gguf``."""
    out, model = Path(out), load_drafter(src)
    if converter is not None and not Path(converter).is_file():
        raise DsparkError(f"--llama-cpp-converter {converter} is not a file (llama.cpp's convert_hf_to_gguf.py)")
    tensors, notes = engine_tensors(model, target, ENGINE)
    check_out(out)
    hf, gguf = out / HF_FOLDER, out / f"draft-{OUTTYPES[dtype]}.gguf"
    target_dir = target_dir or target_folder(target.name)
    keys = write_export(hf, engine_config(model.config, target, dtype), tensors, dtype)
    command = converter_command(Path(converter or "llama.cpp/convert_hf_to_gguf.py"), hf, target_dir, gguf, dtype)
    if converter is not None:
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0 or not gguf.is_file():
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise DsparkError(f"llama.cpp's converter failed (exit {run.returncode}): {last}")
    else:
        notes.append(f"convert with llama.cpp's own converter: {shlex.join(command)}")
    serve = (f"llama-server -m <target.gguf> -md {gguf} --spec-type draft-dspark --spec-draft-n-max {model.config.block_size}",)
    return ExportReport(engine="llama.cpp", out=out, dtype=dtype_name(dtype), keys=keys, notes=tuple(notes), serve=serve)
