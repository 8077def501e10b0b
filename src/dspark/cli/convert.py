"""``dspark convert``: the authors' DeepSpec checkpoints in; drafters out for vLLM, SGLang, llama.cpp, speculators and DeepSpec.

The work is in :mod:`dspark.drafters.dspark.interop`; these commands check their arguments,
load the target where one is needed and print the result. Refusals are one line
(:class:`~dspark.errors.DsparkError` through the boundary of :mod:`dspark.cli.edge`) and write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dspark.cli.edge import BoundaryGroup, check_out_dir
from dspark.errors import DsparkError

convert_app = typer.Typer(
    cls=BoundaryGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Import the authors' DeepSpec checkpoints; export drafters for vLLM, SGLang, llama.cpp, speculators and DeepSpec.",
)

EXPORT_DTYPES = ("bfloat16", "float16", "float32")
ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang", "llama.cpp": "llama.cpp", "speculators": "speculators", "deepspec": "DeepSpec"}
ENGINES = tuple(ENGINE_NAMES)  # the keys of interop.EXPORTERS (checked by a test), named here so --help imports no torch


def _new_folder(out: Path) -> Path:
    out = check_out_dir(out, flag="OUT")
    if out.exists() and any(out.iterdir()):
        raise DsparkError(f"OUT {out} is not empty; choose a new output folder")
    return out


def _load_target(spec: Optional[str], dtype):
    """The target's weights and config (no tokenizer: nothing here encodes text)."""
    from dspark.target import TargetModel
    from dspark.target.loading import DEFAULT_MODEL, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(spec, dtype=dtype, with_tokenizer=False)
    return TargetModel(model, None, name=spec or DEFAULT_MODEL)


@convert_app.command("import")
def import_command(
    src: Path = typer.Argument(..., help="A DeepSpec DSpark/DFlash checkpoint folder (config.json + safetensors)."),
    out: Path = typer.Argument(..., help="New folder for the dspark drafter."),
    model: Optional[str] = typer.Option(None, help="Target (HF id, folder or .gguf) the drafter must fit; default: no check."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Import a DeepSpec checkpoint (e.g. deepseek-ai/dspark_qwen3_8b_block7) as a dspark drafter."""
    out = _new_folder(out)
    if not (src / "config.json").is_file():
        raise DsparkError(f"SRC {src} is not a checkpoint folder (no config.json)")
    from dspark.drafters.dspark.interop import deepspec_config, import_deepspec, read_config

    raw = read_config(src)
    if model is None or "num_target_layers" in raw:  # else the target supplies it
        deepspec_config(raw, src)  # a bad config is refused before any model loads
    target = None
    if model is not None:
        import torch

        target = _load_target(model, torch.bfloat16)  # only shapes and weights are compared
    report = import_deepspec(src, out, target=target)
    summary = {
        "out": str(report.out),
        "drafter": report.drafter_spec,
        "variant": "dflash" if report.config.is_dflash else "dspark",
        "carried": list(report.carried),
        "dtype": report.source_dtype,
        "checked_against": target.name if target is not None else None,
        "notes": list(report.notes),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    carried = ", ".join(report.carried) or "none"
    typer.echo(f"imported {src} -> {out} ({summary['variant']}, {report.source_dtype}, carried: {carried}); "
               f"use --drafter {report.drafter_spec}")
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)


@convert_app.command("export")
def export_command(
    src: Path = typer.Argument(..., help="A dspark drafter folder (Qwen3-family DSpark)."),
    out: Path = typer.Argument(..., help="New folder for the exported drafter."),
    engine: str = typer.Option("vllm", help=f"Where it will run: {' | '.join(ENGINES)}."),
    model: Optional[str] = typer.Option(None, help="The target it serves (HF id, folder or .gguf); default: SmolLM2-135M-Instruct."),
    dtype: Optional[str] = typer.Option(None, help="bfloat16 | float16 | float32: dtype of the written tensors (default float32 for llama.cpp, else bfloat16)."),
    llama_cpp_converter: Optional[Path] = typer.Option(None, help="llama.cpp's convert_hf_to_gguf.py: run it to write the GGUF (--engine llama.cpp); without it the exact command is printed."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Write a drafter in the layout an engine's own loader reads (vLLM, SGLang, llama.cpp, speculators, DeepSpec)."""
    if engine not in ENGINES:
        raise DsparkError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    dtype = dtype or ("float32" if engine == "llama.cpp" else "bfloat16")
    if dtype not in EXPORT_DTYPES:
        raise DsparkError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if llama_cpp_converter is not None and engine != "llama.cpp":
        raise DsparkError("--llama-cpp-converter goes with --engine llama.cpp")
    out = _new_folder(out)
    if not (src / "config.json").is_file():
        raise DsparkError(f"SRC {src} is not a dspark drafter folder (no config.json)")
    import torch

    from dspark.drafters.dspark import DSparkConfig
    from dspark.drafters.dspark.interop import EXPORTERS, check_exportable

    try:
        config = DSparkConfig.load(src)
    except (KeyError, TypeError, ValueError) as exc:
        raise DsparkError(f"{src}/config.json is not a DSpark config: {exc}") from None
    check_exportable(config, ENGINE_NAMES[engine])  # a family the engines cannot serve is refused before any model loads
    torch_dtype = getattr(torch, dtype)
    target = _load_target(model, torch_dtype)  # a reduced vocabulary's head rows are written in this dtype
    extra = {"converter": llama_cpp_converter} if engine == "llama.cpp" else {}
    report = EXPORTERS[engine](src, out, target, dtype=torch_dtype, **extra)
    if as_json:
        typer.echo(json.dumps({"engine": engine, "out": str(report.out), "dtype": report.dtype, "keys": list(report.keys),
                               "notes": list(report.notes), "serve": list(report.serve), "target": target.name}))
        return
    typer.echo(f"exported {src} -> {out} for {ENGINE_NAMES[engine]} ({report.dtype}, {len(report.keys)} tensors), target {target.name}")
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    for line in report.serve:
        typer.echo(f"{ENGINE_NAMES[engine]}: {line}")
