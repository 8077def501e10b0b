"""``dspark batch PROMPTS.jsonl``: generate for a file of prompts with the batched engine.

Each input line is a JSON object with ``prompt`` (a user message; raw text with
``--no-chat``), ``messages`` (a chat: a list of {role, content}) or ``turns`` (the first one
is used), and optionally ``id``, ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``,
``seed`` and ``stop``, which override the command's defaults for that line. Results are
written one JSON line per prompt the moment it finishes (a killed run keeps what finished),
then a summary with throughput beside them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from dspark.errors import DsparkError

FIELDS = {"id", "prompt", "messages", "turns", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop"}


def batch_command(
    prompts: Path = typer.Argument(..., help="A jsonl file: one {\"prompt\": ...} (or messages / turns) per line."),
    out: Path = typer.Option(Path("dspark-batch.jsonl"), help="Results, one JSON line per prompt; the summary goes beside it (.summary.json)."),
    model: Optional[str] = typer.Option(None, help="HF id, folder, .gguf or gemma3-270m; default: SmolLM2-135M-Instruct."),
    drafter: Optional[str] = typer.Option(None, help="none | ngram | model:<path> | dspark[:<folder>] | dflash:<folder> | eagle3:<folder> | dspark[:<folder>]+ngram; default: the DSpark drafter shipped for the target with prompt lookup (dspark+ngram), else ngram."),
    policy: str = typer.Option("dspark", help="plain | fixed[:γ] | gamma1 | threshold:<t> | dspark (Algorithm 1 over this machine's cost table)."),
    max_batch: int = typer.Option(8, help="Most requests in flight at once (continuous batching)."),
    gamma: Optional[int] = typer.Option(None, help="Draft tokens per round (drafter default if unset)."),
    max_new_tokens: int = typer.Option(256, help="Default most new tokens per prompt."),
    temperature: float = typer.Option(0.0, help="Default temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, help="Default nucleus filter in (0, 1]."),
    top_k: int = typer.Option(0, help="Default top-k filter; 0 disables it."),
    seed: int = typer.Option(0, help="Line i gets seed + i unless it gives its own."),
    chat: bool = typer.Option(True, help="Apply the chat template to each prompt."),
    device: str = typer.Option("cpu", help="cpu | cuda[:i] | mps."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on the CPU; on CUDA bfloat16, or float16 where the GPU lacks bf16)."),
    profile_dir: Optional[Path] = typer.Option(None, help="Cost tables (default: $DSPARK_PROFILE_DIR or ~/.cache/dspark/profiles)."),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="Measure this machine's cost table when the dspark policy has none (about a minute)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
) -> None:
    """Generate for every prompt of a jsonl file with continuous batching and the scheduler."""
    from dspark.target.loading import parse_device, parse_dtype

    if max_batch < 1:
        raise DsparkError(f"--max-batch must be >= 1, got {max_batch}")
    if out.exists() and not overwrite:
        raise DsparkError(f"{out} exists; pass --overwrite to replace it")
    summary_path = out.with_suffix(".summary.json")
    device = parse_device(device)
    torch_dtype = parse_dtype(dtype, device)
    lines = read_prompts(prompts)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8"):  # writable now, not after the work
        pass

    from tqdm.auto import tqdm

    from dspark.engine import GenerationRequest
    from dspark.engine.build import build_engine
    from dspark.sampling import SamplingParams
    from dspark.target import TargetModel

    target = TargetModel.load(model, device=device, dtype=torch_dtype)
    requests, ids = [], []
    for i, line in enumerate(lines):
        params = SamplingParams(
            temperature=float(line.get("temperature", temperature)),
            top_k=int(line.get("top_k", top_k)),
            top_p=float(line.get("top_p", top_p)),
        )
        requests.append(GenerationRequest(
            prompt_ids=encode(target, line, chat),
            params=params,
            max_new_tokens=int(line.get("max_new_tokens", max_new_tokens)),
            stop=tuple(line.get("stop") or ()),
            seed=int(line.get("seed", seed + i)),
        ))
        ids.append(line.get("id", i))
    engine = build_engine(
        target, drafter, policy, max_batch, gamma=gamma, profile_dir=profile_dir, profile_if_missing=profile,
    )
    target.warm_up()
    with open(out, "w", encoding="utf-8") as sink, tqdm(total=len(requests), unit="prompt", desc="dspark batch") as bar:
        def write(i: int, result) -> None:
            stats = result.stats
            sink.write(json.dumps({
                "id": ids[i], "text": result.text, "token_ids": result.token_ids,
                "finish_reason": result.finish_reason, "new_tokens": stats.new_tokens, "tau": stats.tau,
                "rounds": stats.rounds, "tokens_per_second": stats.tokens_per_second,
            }) + "\n")
            sink.flush()
            bar.update(1)

        started = time.time()
        batch = engine.generate(requests, on_result=write)
    summary = {
        "prompts": str(prompts), "results": str(out), "model": target.name, "drafter": engine.drafter.name,
        "policy": engine.policy.name, "max_batch": max_batch, "started": started, **batch.stats.to_dict(),
        "mean_request_tau": sum(r.stats.tau for r in batch.results) / len(batch.results),
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(
        f"[{engine.drafter.name} / {engine.policy.name}] {len(requests)} prompts · {batch.stats.new_tokens} tokens "
        f"in {batch.stats.wall_s:.1f} s · {batch.stats.tokens_per_second:.1f} tok/s · τ {batch.stats.tau:.2f} "
        f"· ℓ {batch.stats.verify_length:.2f} · results {out} · summary {summary_path}",
        err=True,
    )


def read_prompts(path: Path) -> list[dict]:
    """The prompt lines of ``path``, checked (one line naming the first bad one)."""
    if not path.is_file():
        raise DsparkError(f"prompts file not found: {path}")
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DsparkError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(line, dict):
            raise DsparkError(f"{path}:{number}: expected a JSON object")
        unknown = set(line) - FIELDS
        if unknown:
            raise DsparkError(f"{path}:{number}: unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
        if sum(k in line for k in ("prompt", "messages", "turns")) != 1:
            raise DsparkError(f"{path}:{number}: give exactly one of prompt, messages or turns")
        turns = line.get("turns")
        text = line["prompt"] if "prompt" in line else (turns[0] if isinstance(turns, list) and turns else None)
        if "messages" not in line and (not isinstance(text, str) or not text.strip()):
            raise DsparkError(f"{path}:{number}: the prompt is empty or not a string")
        lines.append(line)
    if not lines:
        raise DsparkError(f"{path} holds no prompts")
    return lines


def encode(target, line: dict, chat: bool) -> List[int]:
    if "messages" in line:
        messages = line["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise DsparkError("messages must be a list of {role, content} objects")
        return target.encode_conversation(messages)
    text = line["prompt"] if "prompt" in line else line["turns"][0]
    return target.encode_prompt(text, chat=chat)
