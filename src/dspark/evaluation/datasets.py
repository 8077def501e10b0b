"""The evaluation prompt sets: a registry of the built-in ones and any ``{"turns": [...]}`` jsonl.

Built-in sets ship in ``dspark/assets/eval`` (sources and licences in ATTRIBUTION.md there).
Every set splits deterministically: the first 80% of its lines are the *test* split that
``dspark eval`` reads, the last 20% the *calibration* split that ``dspark calibrate`` reads, so
calibration never sees a test prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dspark.errors import DsparkError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "eval"
SPLITS = ("test", "calibration", "all")
CALIBRATION_FRACTION = 0.2
"""Share of each set, taken from its end, reserved for confidence calibration."""


@dataclass(frozen=True)
class DatasetInfo:
    """One built-in set."""

    file: str
    """File name inside the asset folder."""
    domain: str
    """math, code or chat (the paper's grouping)."""
    source: str
    licence: str


BUILTIN: dict[str, DatasetInfo] = {
    "gsm8k": DatasetInfo("gsm8k.jsonl", "math", "GSM8K test split (Cobbe et al., 2021)", "MIT"),
    "humaneval": DatasetInfo("humaneval.jsonl", "code", "HumanEval (Chen et al., 2021)", "MIT"),
    "mbpp": DatasetInfo("mbpp.jsonl", "code", "MBPP sanitized test split (Austin et al., 2021)", "CC-BY-4.0"),
    "mt-bench": DatasetInfo("mt-bench.jsonl", "chat", "MT-Bench questions (Zheng et al., 2023)", "Apache-2.0"),
}


@dataclass(frozen=True)
class Conversation:
    """The user turns of one prompt; turn t > 1 is asked after the target's answer to turn t − 1."""

    index: int
    """0-based position among the file's conversations."""
    turns: tuple[str, ...]


@dataclass(frozen=True)
class EvalDataset:
    """Conversations of one set, already split and limited."""

    name: str
    domain: str
    """math, code, chat, or "custom" for a file given by path."""
    path: str
    """The file, as results record it: a built-in set as `dspark/assets/eval/<file>` (no machine path)."""
    split: str
    conversations: tuple[Conversation, ...]

    @property
    def num_turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def builtin_names() -> list[str]:
    return list(BUILTIN)


def read_conversations(path: Path) -> list[tuple[str, ...]]:
    """Every line's turns; blank lines are skipped, anything else malformed is an error."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DsparkError(f"{path} is not valid UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            turns = json.loads(line)["turns"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DsparkError(f'{path}:{lineno} is not {{"turns": [...]}}: {exc}') from None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DsparkError(f"{path}:{lineno}: turns must be a non-empty list of non-empty strings")
        rows.append(tuple(turns))
    if not rows:
        raise DsparkError(f"{path} holds no conversations")
    return rows


def split_range(n: int, split: str) -> range:
    """Indices of ``split`` among n conversations: test = first 80%, calibration = last 20%."""
    if split not in SPLITS:
        raise DsparkError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    n_cal = math.ceil(n * CALIBRATION_FRACTION) if n > 1 else 0
    if split == "test":
        return range(0, n - n_cal)
    if split == "calibration":
        return range(n - n_cal, n)
    return range(n)


def load_dataset(spec: str, split: str = "test", limit: int | None = None, max_turns: int | None = None) -> EvalDataset:
    """A built-in name or a path to a jsonl; the first ``limit`` conversations of ``split``,
    each cut to its first ``max_turns`` turns (None = all)."""
    if limit is not None and limit < 1:
        raise DsparkError(f"limit must be >= 1, got {limit}")
    if max_turns is not None and max_turns < 1:
        raise DsparkError(f"max_turns must be >= 1, got {max_turns}")
    if spec in BUILTIN:
        info = BUILTIN[spec]
        name, domain, path = spec, info.domain, ASSET_DIR / info.file
        shown = f"dspark/assets/eval/{info.file}"  # results and calibration files name no machine path
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DsparkError(
                f"unknown dataset {spec!r}: neither a built-in ({', '.join(BUILTIN)}) nor an existing .jsonl file"
            )
        name, domain, shown = path.stem, "custom", str(path)
    rows = read_conversations(path)
    indices = split_range(len(rows), split)
    if not indices:
        raise DsparkError(f"{name} has no conversations in its {split} split ({len(rows)} in all)")
    chosen = list(indices)[:limit] if limit is not None else list(indices)
    conversations = tuple(Conversation(i, rows[i][:max_turns]) for i in chosen)
    return EvalDataset(name=name, domain=domain, path=shown, split=split, conversations=conversations)
