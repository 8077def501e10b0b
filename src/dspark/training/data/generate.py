"""Running the target over prompts: batched sampling, and a responses file the target writes.

:func:`sample_batch` continues token-id prompts with the target's ``generate`` (left-padded,
one batch, a forked RNG); :func:`generate_responses` lets the target answer every prompt of a
pool into a responses jsonl, the same records with its assistant turns and a
``finish_reason``, appended one line per finished record, so a killed run resumes by id.
A resumed file must come from the same settings and target: ``<out>.settings.json`` records
them (:func:`check_resumable` refuses others, before a model loads).
Torch and transformers are imported only by the functions that run the target.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from dspark.errors import DsparkError
from dspark.training.data.prompts import PromptRecord
from dspark.training.data.tokenize import end_of_turn_id


# -- running the target ------------------------------------------------------------------
@dataclass(frozen=True)
class SampledBatch:
    """What one batched ``generate`` call produced."""

    tokens: list[list[int]]
    """New tokens of each row, cut before its stop token."""
    finish_reasons: list[str]
    """``stop`` (a stop token came) or ``length`` (max_new_tokens ran out)."""
    num_new_tokens: int
    """Tokens generated over all rows, stop tokens included: the throughput count."""


def stop_ids(target) -> frozenset[int]:
    """Tokens that end a generated turn: the target's eos ids and the template's end of turn."""
    eot = end_of_turn_id(target.tokenizer) if getattr(target.tokenizer, "chat_template", None) else None
    return frozenset(target.eos_token_ids | ({eot} if eot is not None else set()))


def sample_batch(
    target,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stops: Iterable[int],
) -> SampledBatch:
    """Continue every prompt (token ids) with the target's ``generate``; left-padded, one batch.

    ``temperature == 0`` is greedy. Sampling draws from a forked RNG seeded with ``seed``, so
    the global torch RNG is untouched and a batch is reproducible.
    """
    import torch
    from transformers import GenerationConfig

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample_batch needs at least one prompt and no empty ones")
    stops = sorted(set(stops))
    if not stops:
        raise ValueError("sample_batch needs at least one stop token id")
    pad_id = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else stops[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, n]
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, n]
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=temperature > 0, eos_token_id=stops, pad_token_id=pad_id
    )
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    device = target.device
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        out = target.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=GenerationConfig(**kwargs),
        )  # [B, n + new]
    rows = out[:, width:].tolist()  # the one host sync of the batch, after generation
    stop_set = set(stops)
    tokens, reasons, count = [], [], 0
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stop_set), None)
        if end is None:
            tokens.append(row)
            reasons.append("length")
            count += len(row)
        else:
            tokens.append(row[:end])
            reasons.append("stop")
            count += end + 1
    return SampledBatch(tokens=tokens, finish_reasons=reasons, num_new_tokens=count)


def check_sampling(batch_size: int, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse sampling settings that ``sample_batch`` cannot honour (Magpie and responses share them)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 <= temperature <= 100.0:  # also refuses NaN
        raise ValueError(f"temperature must be in [0, 100], got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed hashed from ``parts``: the same parts give the same seed in every run."""
    digest = hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# -- regenerating the responses ----------------------------------------------------------
@dataclass(frozen=True)
class GenerateConfig:
    """How the target answers the prompts. Defaults are SmolLM2's recommended sampling."""

    batch_size: int = 16
    """Prompts per generate call; prompts are sorted by length so batches pad little."""
    max_new_tokens: int = 256
    """Longest answer per turn; a cut answer gets finish_reason ``length``."""
    temperature: float = 0.2
    """Sampling temperature; 0 is greedy."""
    top_p: float = 0.9
    """Nucleus filter of the sampling."""
    seed: int = 0
    """Seeds every batch (mixed with the batch's ids, so a resumed run stays reproducible)."""
    max_prompt_tokens: int = 2048
    """Prompts longer than this are skipped (and counted), never truncated."""

    def __post_init__(self) -> None:
        check_sampling(self.batch_size, self.max_new_tokens, self.temperature, self.top_p)
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


@dataclass(frozen=True)
class GenerateSummary:
    """What one (possibly resumed) generation run did."""

    prompts: int
    """Prompts given."""
    already_done: int
    """Found in the output file from an earlier run and skipped."""
    generated: int
    """Answered and written by this run."""
    skipped_too_long: int
    """Prompts over ``max_prompt_tokens``."""
    new_tokens: int
    """Tokens the target generated in this run."""
    seconds: float
    """Wall time of the generation loop."""
    finish_reasons: dict[str, int]
    """Counts of ``stop`` / ``length`` among this run's records."""

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "tokens_per_second": self.tokens_per_second}


SETTINGS_SUFFIX = ".settings.json"
"""``responses.jsonl`` is bound to its settings and target by ``responses.jsonl.settings.json``."""
RESUME_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "max_prompt_tokens")
"""GenerateConfig fields that change the answers' distribution (batch_size only regroups the seeds)."""


def settings_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + SETTINGS_SUFFIX)


def check_resumable(out_path: str | Path, config: GenerateConfig, target_fingerprint: str | None = None) -> None:
    """Refuse to append to ``out_path`` when it was written with other settings (or another target).

    A responses file from before settings were recorded has no record: it is adopted as is.
    """
    path = settings_path(out_path)
    if not path.is_file():
        return
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
        saved = have["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DsparkError(f"{path} is not a dspark settings record ({exc}); remove it or pick another --out") from None
    want = {k: getattr(config, k) for k in RESUME_KEYS}
    differ = [f"{k} {saved.get(k)!r} there, {v!r} now" for k, v in want.items() if saved.get(k) != v]
    if differ:
        raise DsparkError(
            f"{out_path} was generated with other settings ({'; '.join(differ)}); resume with the same ones or pick another --out"
        )
    if target_fingerprint is not None and have.get("target_fingerprint") not in (None, target_fingerprint):
        raise DsparkError(f"{out_path} was generated by another target; pick another --out")


def _recorded_fingerprint(out_path: Path) -> str | None:
    """The target fingerprint an earlier run recorded for ``out_path``, if any."""
    try:
        return json.loads(settings_path(out_path).read_text(encoding="utf-8")).get("target_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _record_settings(out_path: Path, config: GenerateConfig, target_fingerprint: str) -> None:
    body = {"settings": {k: getattr(config, k) for k in RESUME_KEYS}, "target_fingerprint": target_fingerprint}
    path = settings_path(out_path)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staging, path)


def load_done_ids(path: str | Path, repair: bool = False) -> set[str]:
    """Ids of the records already in a responses file; a missing file has none.

    Only the last line may be broken (a run killed mid-write): it is ignored, and with
    ``repair`` cut off, so that the next append starts on a fresh line. A broken line
    anywhere else is corruption and raises.
    """
    path = Path(path)
    if not path.exists():
        return set()
    done: set[str] = set()
    good_end = 0  # byte offset just past the last intact line
    tail_parsed = False
    with path.open("rb") as f:
        line_no = 0
        for line in f:
            line_no += 1
            complete = line.endswith(b"\n")
            try:
                obj = json.loads(line)
                ok = isinstance(obj, dict) and isinstance(obj.get("id"), str)
            except (json.JSONDecodeError, UnicodeDecodeError):
                ok = False
            if ok:
                done.add(obj["id"])
                good_end += len(line)
                tail_parsed = not complete
            elif complete and line.strip():
                raise DsparkError(f"{path}:{line_no}: corrupt line in the responses file; fix or remove it")
            elif complete:
                good_end += len(line)  # a blank line
    if repair:
        size = path.stat().st_size
        if tail_parsed:
            with path.open("ab") as f:
                f.write(b"\n")
        elif good_end < size:
            with path.open("r+b") as f:
                f.truncate(good_end)
    return done


def generate_responses(
    target,
    prompts: Sequence[PromptRecord],
    out_path: str | Path,
    config: GenerateConfig | None = None,
    progress: bool = True,
) -> GenerateSummary:
    """Let the target answer every prompt not yet in ``out_path``; append each record as it finishes.

    Records are ``{"id", "source", "domain", "messages", "finish_reason"}`` with the user and
    assistant turns interleaved. Resuming is keyed by id: a restarted run reads the output,
    skips the ids in it and answers the rest; it must have the same settings and target. Multi-turn prompts are answered turn by turn;
    a turn cut by ``max_new_tokens`` ends its conversation there (so ``length`` always refers
    to the last assistant turn).
    """
    from tqdm.auto import tqdm

    from dspark.training.data.fingerprints import fingerprint_for

    config = config or GenerateConfig()
    out_path = Path(out_path)
    fingerprint = fingerprint_for(target, _recorded_fingerprint(out_path))
    check_resumable(out_path, config, fingerprint)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _record_settings(out_path, config, fingerprint)
    done = load_done_ids(out_path, repair=True)
    pending = [r for r in prompts if r.id not in done]
    stops = stop_ids(target)
    encoded, skipped = [], 0
    for record in tqdm(pending, desc="tokenizing", unit="prompt", leave=False, disable=not progress):
        ids = target.encode_conversation(record.messages[:1])
        if len(ids) > config.max_prompt_tokens:
            skipped += 1
        else:
            encoded.append((record, ids))
    encoded.sort(key=lambda item: len(item[1]))  # stable: ties keep the prompt file's order
    reasons: Counter[str] = Counter()
    new_tokens = 0
    start = time.perf_counter()
    with out_path.open("a", encoding="utf-8") as out, tqdm(
        total=len(encoded), desc="generating", unit="prompt", disable=not progress
    ) as bar:
        for begin in range(0, len(encoded), config.batch_size):
            batch = encoded[begin : begin + config.batch_size]
            records, tokens = _answer_batch(target, batch, config, stops)
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                reasons[record["finish_reason"]] += 1
            out.flush()
            os.fsync(out.fileno())  # a kill or crash loses at most the batch in flight
            new_tokens += tokens
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
    return GenerateSummary(
        prompts=len(prompts),
        already_done=len(prompts) - len(pending),
        generated=len(encoded),
        skipped_too_long=skipped,
        new_tokens=new_tokens,
        seconds=time.perf_counter() - start,
        finish_reasons=dict(reasons),
    )


def _answer_batch(target, batch, config: GenerateConfig, stops) -> tuple[list[dict[str, Any]], int]:
    """Answer a batch of (record, first-turn ids) turn by turn; returns (records, new tokens)."""
    messages: list[list[dict[str, str]]] = [[] for _ in batch]
    finish: list[str | None] = [None] * len(batch)
    new_tokens = 0
    for turn in range(max(len(record.turns) for record, _ in batch)):
        rows, inputs = [], []
        for i, (record, first_ids) in enumerate(batch):
            if turn >= len(record.turns) or finish[i] == "length":
                continue
            conversation = messages[i] + [{"role": "user", "content": record.turns[turn]}]
            ids = first_ids if turn == 0 else target.encode_conversation(conversation)
            if len(ids) > config.max_prompt_tokens:
                continue  # the conversation outgrew the limit; it ends at the last answer
            messages[i] = conversation
            rows.append(i)
            inputs.append(ids)
        if not rows:
            break
        seed = derived_seed(config.seed, *(batch[i][0].id for i in rows), turn)
        sampled = sample_batch(target, inputs, config.max_new_tokens, config.temperature, config.top_p, seed, stops)
        new_tokens += sampled.num_new_tokens
        for i, ids, reason in zip(rows, sampled.tokens, sampled.finish_reasons):
            text = target.tokenizer.decode(ids, skip_special_tokens=True)
            messages[i].append({"role": "assistant", "content": text})
            finish[i] = reason
    records = [
        {
            "id": record.id,
            "source": record.source,
            "domain": record.domain,
            "messages": messages[i],
            "finish_reason": finish[i],
        }
        for i, (record, _) in enumerate(batch)
    ]
    return records, new_tokens
