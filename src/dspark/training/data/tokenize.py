"""Chat-template tokenization: conversations become training sequences with loss masks.

A :class:`TrainingSequence` is the chat template over a whole conversation, with loss on the
assistant's tokens and their end-of-turn token. The helpers that read the template itself
(:func:`render_chat`, :func:`end_of_turn_id`) are shared with generation and Magpie.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from dspark.errors import DsparkError
from dspark.training.data.prompts import read_jsonl

SENTINEL = "<<dspark-sentinel-7f3a>>"
"""A string no template contains: rendered and cut out, it shows where a message's text goes."""


# -- the chat template -------------------------------------------------------------------
def render_chat(tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """The chat template over ``messages``, as text."""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_text(tokenizer, text: str) -> list[int]:
    # The template writes its own special tokens; apply_chat_template tokenizes the same way.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer, role: str = "assistant") -> int | None:
    """The special token that closes a ``role`` turn in the chat template (SmolLM2: ``<|im_end|>``)."""
    messages = [{"role": "user", "content": "x"}] if role == "assistant" else []
    text = render_chat(tokenizer, messages + [{"role": role, "content": SENTINEL}], add_generation_prompt=False)
    tail = text[text.index(SENTINEL) + len(SENTINEL) :]
    ids = encode_text(tokenizer, tail)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return ids[0] if ids and ids[0] in special else None


# -- tokenizing into training sequences --------------------------------------------------
@dataclass(frozen=True)
class TrainingSequence:
    """One conversation as the trainer sees it."""

    input_ids: list[int]
    """[n] the chat template over the whole conversation, truncated to max_length."""
    loss_mask: list[int]
    """[n] 1 on the assistant's tokens (its end-of-turn token included), 0 elsewhere."""
    id: str
    """The prompt id the conversation came from."""
    greedy_labels: bool = False
    """The target did not write this text (distillation on existing conversations): the CE
    label of a slot is the target's greedy token at that position, not the next text token."""
    domain: str = "chat"
    """code, math or chat: what the conversation is about (for data-mix reports)."""

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True)
class TokenizeConfig:
    """How responses become training sequences."""

    max_length: int = 2048
    """Sequences are truncated to this many tokens."""
    min_loss_tokens: int = 16
    """Sequences with fewer assistant tokens (after truncation) are dropped."""

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.min_loss_tokens < 0:
            raise ValueError(
                f"max_length must be >= 1 and min_loss_tokens >= 0, got {self.max_length}, {self.min_loss_tokens}"
            )


def tokenize_conversation(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    id: str = "",
    max_length: int | None = None,
    last_turn_complete: bool = True,
) -> TrainingSequence:
    """Template-render ``messages`` and mark the assistant tokens for the loss.

    Each assistant turn is located by rendering the conversation up to its header and up to
    its end and diffing token counts, which works for any template that renders a
    conversation prefix as a prefix of the whole (SmolLM2's has no ``{% generation %}``
    markers). Text the template adds after the end-of-turn token (SmolLM2's newline) is not
    the model's to predict and stays unmasked; so does the end-of-turn token of a last turn
    that was cut by max_new_tokens (``last_turn_complete=False``), as the target never said it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DsparkError("training sequences need a tokenizer with a chat template")
    messages = [dict(m) for m in messages]
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    input_ids = encode_text(tokenizer, text)
    loss_mask = [0] * len(input_ids)
    eot = end_of_turn_id(tokenizer)
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i in range(last_assistant + 1):
        if messages[i]["role"] != "assistant":
            continue
        head = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        body = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(body) and body.startswith(head)):
            raise DsparkError(
                "the chat template does not render a conversation's beginning as a prefix of the "
                "whole, so assistant tokens cannot be located"
            )
        head_ids, body_ids = encode_text(tokenizer, head), encode_text(tokenizer, body)
        if input_ids[: len(body_ids)] != body_ids or body_ids[: len(head_ids)] != head_ids:
            raise DsparkError("the tokenizer merges tokens across a turn boundary of the chat template")
        begin, end = len(head_ids), len(body_ids)
        eot_at = max((k for k in range(begin, end) if input_ids[k] == eot), default=None)
        if eot_at is not None:
            end = eot_at + 1 if (last_turn_complete or i != last_assistant) else eot_at
        loss_mask[begin:end] = [1] * (end - begin)
    if max_length is not None:
        input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    return TrainingSequence(input_ids=input_ids, loss_mask=loss_mask, id=id)


def load_training_sequences(
    path: str | Path, tokenizer, config: TokenizeConfig | None = None, progress: bool = True
) -> list[TrainingSequence]:
    """Training sequences of a responses file, dropping those with under ``min_loss_tokens``.

    A file still being written is fine: its broken last line is ignored.
    """
    from tqdm.auto import tqdm

    config = config or TokenizeConfig()
    sequences = []
    lines = list(read_jsonl(Path(path), tolerate_broken_tail=True))
    for line_no, obj in tqdm(lines, desc="tokenizing", unit="conv", disable=not progress):
        messages = obj.get("messages")
        if not isinstance(obj.get("id"), str) or not isinstance(messages, list) or not messages:
            raise ValueError(f"{path}:{line_no}: a response record needs an id and messages")
        sequence = tokenize_conversation(
            tokenizer,
            messages,
            id=obj["id"],
            max_length=config.max_length,
            last_turn_complete=obj.get("finish_reason") != "length",
        )
        if sequence.num_loss_tokens >= config.min_loss_tokens:
            sequences.append(sequence)
    return sequences
