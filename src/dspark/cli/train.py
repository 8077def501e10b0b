"""``dspark train``: train a DSpark, DFlash or EAGLE-3 drafter on regenerated responses.

Runs on one process, or on N under ``torchrun --nproc_per_node N -m dspark train ...``
(gloo on CPU, NCCL on CUDA). Only typer is imported at module top. Settings, ``--data`` and
every shard store are checked here before the target loads; then
:func:`dspark.training.run.train_and_export` holds the lock of ``--out`` (one ``dspark train``
per folder) until its export is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def train_command(
    data: List[Path] = typer.Option(..., help="Training data (repeatable): a shard store folder (`dspark data regen` / `dspark data text`) or a responses.jsonl."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, latest pointer, train_log.jsonl, best/."),
    variant: str = typer.Option("dspark", help="dspark (Markov + confidence heads), dflash (heads off, CE only) or eagle3 (one layer, chain drafting, γ-step training-time test)."),
    model: Optional[str] = typer.Option(None, help="Target: HF id, folder, .gguf or gemma3-270m; default SmolLM2-135M-Instruct."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Sequences per step, summed over processes."),
    anchors: int = typer.Option(64, help="Blocks per sequence; they share one context pass."),
    draft_vocab: int = typer.Option(8192, help="Draft vocabulary: the N most frequent training targets (0 = the whole vocabulary)."),
    num_layers: Optional[int] = typer.Option(None, help="Draft transformer layers; default 2 (dspark, dflash) or 1 (eagle3, which has one)."),
    layer_family: Optional[str] = typer.Option(None, help="Block family of the draft layers: qwen3, llama or gemma3. Default: qwen3 for dspark and dflash (the one vLLM, SGLang and llama.cpp serve, for any target), the target's own for eagle3."),
    block_size: int = typer.Option(7, help="γ: draft tokens per block (anchor = slot 1); eagle3: the training-time-test horizon."),
    markov_rank: int = typer.Option(32, help="Markov head rank r (dspark)."),
    markov_head_type: str = typer.Option("vanilla", help="vanilla or rnn (dspark)."),
    markov_w1: str = typer.Option("target", help="Rows of the Markov head's W1 (dspark): target (one per target token, the authors' layout) or draft (one per draft token plus one shared row; small for large vocabularies)."),
    layer_ids: Optional[List[int]] = typer.Option(None, "--layer-id", help="Target feature layer (repeatable); default 5 spread."),
    init_from_target: bool = typer.Option(True, "--init-from-target/--random-init", help="Warm-start the draft layers from the target's top layers."),
    init_from: Optional[Path] = typer.Option(None, help="Warm-start from a trained drafter folder (after --init-from-target)."),
    lr: float = typer.Option(6e-4, help="Peak learning rate (AdamW, warmup + cosine)."),
    gamma_w: float = typer.Option(4.0, help="Position decay γ_w of w_k = exp(-(k-1)/γ_w); 4 as in DeepSpec's configs."),
    max_length: int = typer.Option(1024, help="Truncate training sequences to this many tokens."),
    max_epochs: float = typer.Option(3.0, help="Refuse more passes over the data than this."),
    heldout_fraction: float = typer.Option(0.02, help="Prompts held out (by id hash) to score checkpoints; best/ keeps the best."),
    data_fraction: float = typer.Option(1.0, help="Train on this fraction of the prompts (by id hash; scaling studies)."),
    feature_cache: Optional[Path] = typer.Option(None, help="Optional fp16 memmap of target features (small CPU runs)."),
    save_every: int = typer.Option(200, help="Checkpoint (and score on the held-out split) every N steps and at the end."),
    log_every: int = typer.Option(10, help="Log every N steps."),
    seed: int = typer.Option(0, help="Seeds init, data order and anchors."),
    export: Optional[Path] = typer.Option(None, help="Also write the best (else the last) drafter here as fp16 safetensors."),
    device: str = typer.Option("auto", help="auto (cuda:LOCAL_RANK where CUDA is, else cpu) | cpu | cuda: where the target and the drafter train."),
    dtype: str = typer.Option("auto", help="The frozen target's dtype: auto (float32 on the CPU; bfloat16 on CUDA, or float16 without bf16) | float32 | bfloat16 | float16. The drafter trains in float32 (under autocast on CUDA)."),
) -> None:
    """Train a drafter; rerun the same command to resume from the last checkpoint."""
    from dspark.drafters.dspark.config import MARKOV_W1_VOCABS
    from dspark.drafters.families import LAYER_FAMILIES
    from dspark.cli.edge import check_out_dir
    from dspark.errors import DsparkError

    if layer_family is not None and layer_family not in LAYER_FAMILIES:
        raise DsparkError(f"--layer-family must be one of {', '.join(LAYER_FAMILIES)}, got {layer_family!r}")
    if markov_w1 not in MARKOV_W1_VOCABS:
        raise DsparkError(f"--markov-w1 must be {' or '.join(MARKOV_W1_VOCABS)}, got {markov_w1!r}")
    if markov_w1 == "draft" and (variant != "dspark" or draft_vocab == 0):
        raise DsparkError("--markov-w1 draft needs --variant dspark and a reduced draft vocabulary (--draft-vocab > 0)")
    named: dict[Path, Path] = {}
    for path in data:
        if not path.exists():
            raise DsparkError(f"training data not found: {path}")
        first = named.setdefault(path.resolve(), path)
        if first is not path:  # the same data twice would train on it twice and fool the epoch cap
            also = "" if str(first) == str(path) else f" (also as --data {first})"
            raise DsparkError(f"--data {path} is given twice{also}; each is read once")
    if not 0.0 <= heldout_fraction < 1.0 or not 0.0 < data_fraction <= 1.0:
        raise DsparkError("--heldout-fraction must be in [0, 1) and --data-fraction in (0, 1]")
    if init_from is not None and not (init_from / "config.json").is_file():
        raise DsparkError(f"--init-from {init_from} is not a drafter folder (no config.json)")
    if device not in ("auto", "cpu", "cuda"):
        raise DsparkError(f"--device must be auto, cpu or cuda (each rank takes cuda:LOCAL_RANK), got {device!r}")
    from dspark.target.loading import DTYPE_NAMES

    if dtype not in DTYPE_NAMES:
        raise DsparkError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    check_out_dir(out)
    if export is not None:
        check_out_dir(export, "--export")

    from dspark.training.checkpoints import check_resume
    from dspark.training.config import TrainConfig
    from dspark.training.data.sequences import open_stores
    from dspark.training.run import train_and_export

    config = TrainConfig(
        out_dir=str(out), variant=variant, num_layers=num_layers or (1 if variant == "eagle3" else 2), layer_family=layer_family or "", block_size=block_size,
        markov_rank=markov_rank, markov_head_type=markov_head_type, markov_w1_vocab=markov_w1,
        target_layer_ids=tuple(layer_ids or ()), init_from_target=init_from_target, steps=steps, batch_size=batch_size,
        anchors_per_sequence=anchors, draft_vocab_size=draft_vocab, lr=lr, gamma_w=gamma_w, max_epochs=max_epochs,
        init_from=str(init_from or ""), save_every=save_every, log_every=log_every, seed=seed, max_length=max_length,
    )
    check_resume(out, config)  # other settings are refused before the target loads; the data once it is read
    stores = [p for p in data if p.is_dir()]
    if stores:
        open_stores(stores)  # every shard checked against its manifest before the target loads
    last = train_and_export(config, data, model, heldout_fraction, data_fraction, feature_cache, export, device, dtype)
    typer.echo(str(last))
