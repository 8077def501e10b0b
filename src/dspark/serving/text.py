"""Committed ids in, safe text deltas out, for streaming.

Two things may still change text that has been decoded: a stop string that is forming (the
engine cuts the answer before it, so its first characters must not have been sent), and a
token that ends inside a multi-byte UTF-8 character (the tokenizer decodes the partial bytes
to U+FFFD until the next token completes them). :class:`TextStream` therefore holds back the
last ``len(longest stop) - 1`` characters and any trailing U+FFFD; what it has sent is always
a prefix of the final text, which :meth:`TextStream.finish` completes.

The engine finishes a request in the very commit where a stop string first appears in its
decoded text, so while a request runs its text holds no whole stop string, and only its last
``len(stop) - 1`` characters can be the start of one. The commit that finishes a request is
not pushed (its tokens may run past the stop string): :meth:`TextStream.finish` takes the
engine's final answer instead.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one request's committed ids, released as it becomes final."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        """Characters of the decoded text already released."""

    def push(self, token_ids: Sequence[int]) -> str:
        """Add committed ids; return the text that became safe to send (maybe empty)."""
        self.ids.extend(token_ids)
        text = self.decode(self.ids)  # the whole text: decoding a suffix alone can differ
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == REPLACEMENT:  # a partial UTF-8 sequence
            safe -= 1
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent : safe], safe
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` (the engine's answer, cut before any stop string)."""
        tail = final_text[self.sent :]
        self.sent = len(final_text)
        return tail
