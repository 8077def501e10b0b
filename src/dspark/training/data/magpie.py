"""Magpie: the target writes the user prompts (Xu et al. 2024).

The target sees only the chat template up to the user header, after a system prompt that
hints at a domain, so what it writes until the end-of-turn token is a user message in its
own distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

from dspark.errors import DsparkError
from dspark.training.data.generate import check_sampling, derived_seed, sample_batch, stop_ids
from dspark.training.data.mix import normalize_text
from dspark.training.data.prompts import DOMAINS, PromptRecord
from dspark.training.data.tokenize import SENTINEL, encode_text, end_of_turn_id, render_chat

MAGPIE_SYSTEM_PROMPTS: dict[str, str] = {
    "code": "You are an expert Python programmer. Users ask you programming questions.",
    "math": (
        "You are a patient math tutor. Users ask you grade-school math word problems, "
        "and you solve them step by step."
    ),
    "chat": "You are a helpful AI assistant. Users ask you all kinds of everyday questions.",
}
"""Domain hints for Magpie synthesis: the target writes the kind of user these describe."""


@dataclass(frozen=True)
class MagpieConfig:
    """How Magpie synthesis samples user prompts from the target."""

    batch_size: int = 32
    """Prompts sampled per generate call (they share one prefix, so nothing is padded)."""
    max_new_tokens: int = 192
    """Longest prompt; a prompt that runs past it is dropped as a runaway."""
    temperature: float = 1.0
    """Sampling temperature; Magpie wants diverse prompts."""
    top_p: float = 0.95
    """Nucleus filter of the sampling."""
    min_chars: int = 16
    """Shorter prompts are dropped."""
    attempts_per_prompt: float = 4.0
    """Give up after n * this many samples: a small target repeats itself."""
    seed: int = 0
    """Seeds every batch (mixed with the domain and the batch index)."""

    def __post_init__(self) -> None:
        check_sampling(self.batch_size, self.max_new_tokens, self.temperature, self.top_p)
        if self.min_chars < 0 or self.attempts_per_prompt < 1:
            raise ValueError(
                f"min_chars must be >= 0 and attempts_per_prompt >= 1, got {self.min_chars}, "
                f"{self.attempts_per_prompt}"
            )


def user_header_prefix(tokenizer, system_prompt: str | None = None) -> str:
    """The chat template up to and including the user header, where the user's text would start.

    Derived from the template itself: a conversation with a sentinel user message is rendered
    and cut at the sentinel. SmolLM2: ``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n``.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": SENTINEL})
    try:
        text = render_chat(tokenizer, messages, add_generation_prompt=False)
    except Exception as exc:  # jinja raises its own errors for unsupported roles
        raise DsparkError(f"the chat template cannot render a system prompt for Magpie: {exc}") from exc
    return text[: text.index(SENTINEL)]


def synthesize_magpie(
    target, domain: str, n: int, config: MagpieConfig | None = None, progress: bool = True
) -> list[PromptRecord]:
    """Up to ``n`` unique user prompts written by the target after a domain-hinting system prompt.

    The target sees only the template prefix ending at the user header, so what it writes
    until the end-of-turn token is a user message in its own distribution (Magpie, Xu et al.
    2024). Prompts cut by ``max_new_tokens``, too short or repeated are dropped.
    """
    from tqdm.auto import tqdm

    config = config or MagpieConfig()
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tokenizer = target.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise DsparkError(f"Magpie synthesis needs a chat template; {target.name} has none")
    prefix_ids = encode_text(tokenizer, user_header_prefix(tokenizer, MAGPIE_SYSTEM_PROMPTS[domain]))
    user_eot = end_of_turn_id(tokenizer, role="user")
    stops = stop_ids(target) | ({user_eot} if user_eot is not None else set())
    source = f"magpie-{domain}"
    max_attempts = int(n * config.attempts_per_prompt)
    kept: list[PromptRecord] = []
    seen: set[str] = set()
    attempts = batch_index = 0
    with tqdm(total=n, desc=source, unit="prompt", disable=not progress) as bar:
        while len(kept) < n and attempts < max_attempts:
            seed = derived_seed(config.seed, source, batch_index)
            batch = sample_batch(
                target, [prefix_ids] * config.batch_size, config.max_new_tokens,
                config.temperature, config.top_p, seed, stops,
            )
            attempts += config.batch_size
            batch_index += 1
            for ids, reason in zip(batch.tokens, batch.finish_reasons):
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                key = normalize_text(text)
                if reason != "stop" or len(text) < config.min_chars or key in seen:
                    continue
                seen.add(key)
                kept.append(PromptRecord.make(source, domain, [text]))
                bar.update(1)
                if len(kept) == n:
                    break
            bar.set_postfix(tried=attempts)
    return kept
