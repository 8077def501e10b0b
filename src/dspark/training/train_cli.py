"""``dspark train``: train a DSpark or DFlash drafter on regenerated responses.

Runs on one process, or on N under ``torchrun --nproc_per_node N -m dspark train ...``
(gloo on CPU, NCCL on CUDA). Only typer is imported at module top.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer


def train_command(
    data: Path = typer.Option(..., help="responses.jsonl written by `dspark data generate`."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, latest pointer, train_log.jsonl."),
    variant: str = typer.Option("dspark", help="dspark (Markov + confidence heads) or dflash (heads off, CE only)."),
    model: Optional[str] = typer.Option(None, help="Target: HF id, folder or .gguf; default SmolLM2-135M-Instruct."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Sequences per step, summed over processes."),
    anchors: int = typer.Option(16, help="Blocks sampled per sequence."),
    num_layers: int = typer.Option(2, help="Draft transformer layers."),
    block_size: int = typer.Option(7, help="γ: draft tokens per block (anchor = slot 1)."),
    markov_rank: int = typer.Option(32, help="Markov head rank r (dspark)."),
    markov_head_type: str = typer.Option("vanilla", help="vanilla or rnn (dspark)."),
    layer_ids: Optional[List[int]] = typer.Option(None, "--layer-id", help="Target feature layer (repeatable); default 5 spread."),
    init_from_target: bool = typer.Option(True, "--init-from-target/--random-init", help="Warm-start the draft layers from the target's top layers."),
    lr: float = typer.Option(6e-4, help="Peak learning rate (AdamW, warmup + cosine)."),
    gamma_w: float = typer.Option(7.0, help="Position decay γ_w of w_k = exp(-(k-1)/γ_w)."),
    max_length: int = typer.Option(1024, help="Truncate training sequences to this many tokens."),
    feature_cache: Optional[Path] = typer.Option(None, help="Optional fp16 memmap of target features (small CPU runs)."),
    save_every: int = typer.Option(200, help="Checkpoint every N steps (and at the end)."),
    log_every: int = typer.Option(10, help="Log every N steps."),
    seed: int = typer.Option(0, help="Seeds init, data order and anchors."),
    export: Optional[Path] = typer.Option(None, help="Also write the final drafter here as fp16 safetensors."),
) -> None:
    """Train a drafter; rerun the same command to resume from the last checkpoint."""
    import torch

    from dspark.errors import DsparkError
    from dspark.target import TargetModel
    from dspark.training.data import TokenizeConfig, load_training_sequences
    from dspark.training.trainer import TrainConfig, train

    if not data.is_file():
        raise DsparkError(f"training data not found: {data}")
    config = TrainConfig(
        out_dir=str(out), variant=variant, num_layers=num_layers, block_size=block_size,
        markov_rank=markov_rank, markov_head_type=markov_head_type,
        target_layer_ids=tuple(layer_ids or ()), init_from_target=init_from_target, steps=steps, batch_size=batch_size,
        anchors_per_sequence=anchors, lr=lr, gamma_w=gamma_w, save_every=save_every,
        log_every=log_every, seed=seed,
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        target = TargetModel.load(model, device=device)
        sequences = load_training_sequences(data, target.tokenizer, TokenizeConfig(max_length=max_length))
        tokens = sum(len(s.input_ids) for s in sequences)
        typer.echo(f"dspark: {len(sequences)} sequences, {tokens} tokens", err=True)
        features = None
        if feature_cache is not None:
            from dspark.training.features import CachedFeatures

            layer_ids_used = config.drafter_config(target).target_layer_ids
            features = CachedFeatures.build(feature_cache, sequences, target, layer_ids_used)
        last = train(config, target, sequences, features=features)
        if export is not None and (world == 1 or torch.distributed.get_rank() == 0):
            from dspark.drafters.dspark import DSparkModel

            DSparkModel.from_pretrained(last).save_pretrained(export, dtype=torch.float16)
            typer.echo(f"dspark: exported {last} to {export} (fp16)", err=True)
        typer.echo(str(last))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
