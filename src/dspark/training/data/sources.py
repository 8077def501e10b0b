"""Prompt sources mixed into one file: jsonl files, the ShareGPT package and Magpie synthesis.

:func:`mix_sources` is ``dspark data prompts`` (any of the three sources), :func:`pool_by_domain`
is ``dspark data pool`` (ShareGPT first turns split into code / math / chat by the keyword rule,
plus prompt files taken whole). Both check what is cheap first, since nothing may fail after
minutes of synthesis, and mix under the evaluation-overlap filter
(:func:`~dspark.training.data.mix.mix_prompts`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dspark.errors import DsparkError
from dspark.training.data.mix import EvalOverlapFilter, MixResult, PromptPool, default_eval_dir, mix_prompts
from dspark.training.data.prompts import (
    DOMAINS,
    PromptRecord,
    classify_domain,
    read_prompt_jsonl,
    read_prompts,
    read_sharegpt,
)

SHAREGPT_NOTE = "note: ShareGPT conversations have unclear provenance and licence terms"
"""Printed (stderr) whenever ShareGPT prompts are read."""


def mix_sources(jsonl: Sequence[Path], jsonl_domain: str, jsonl_limit: int, sharegpt: int,
                magpie: Mapping[str, int], magpie_batch_size: int, max_turns: int, seed: int,
                eval_dir: Path | None, load_target: Callable[[], Any]) -> MixResult:
    """Prompts from every ``jsonl`` file (``jsonl_limit`` each, 0 = all), ``sharegpt`` from the
    ShareGPT package and ``magpie[domain]`` synthesized by the target (``load_target()``,
    called only when Magpie is asked for; ``magpie_batch_size`` prompts per generate call),
    mixed with ``seed``, refused where they overlap the evaluation sets of ``eval_dir``
    (default: :func:`~dspark.training.data.mix.default_eval_dir`)."""
    from dspark.training.data.magpie import MagpieConfig, synthesize_magpie

    missing = [str(p) for p in jsonl if not p.is_file()]
    if missing:  # cheap checks first: nothing may fail after minutes of synthesis
        raise DsparkError(f"prompt file not found: {', '.join(missing)}")
    # The filter next: a missing eval dir must fail before minutes of synthesis.
    eval_filter = EvalOverlapFilter.from_dir(eval_dir or default_eval_dir())
    magpie_config = MagpieConfig(batch_size=magpie_batch_size, seed=seed)
    pools = []
    for path in jsonl:
        records = read_prompt_jsonl(path, domain=jsonl_domain, max_turns=max_turns)
        pools.append(PromptPool(f"jsonl:{path.name}", records, jsonl_limit or None))
    if sharegpt:
        print(SHAREGPT_NOTE, file=sys.stderr)
        pools.append(PromptPool("sharegpt", read_sharegpt(max_turns=max_turns), sharegpt))
    if any(magpie.values()):
        target = load_target()
        for domain, n in magpie.items():
            if n:
                records = synthesize_magpie(target, domain, n, magpie_config)
                pools.append(PromptPool(f"magpie-{domain}", records, n))
    return mix_prompts(pools, eval_filter, seed=seed)


def pool_by_domain(sharegpt: Mapping[str, int], prompt_files: Sequence[Path], max_chars: int, seed: int,
                   eval_dir: Path | None) -> MixResult:
    """Every prompt of ``prompt_files`` (``dspark data prompts`` output, e.g. Magpie), plus
    ``sharegpt[domain]`` ShareGPT first turns of each domain (code, math, chat) by
    :func:`~dspark.training.data.prompts.classify_domain`, leaving out those longer than
    ``max_chars`` (pasted documents); mixed with ``seed``, evaluation overlaps refused."""
    missing = [str(p) for p in prompt_files if not p.is_file()]
    if missing:
        raise DsparkError(f"prompt file not found: {', '.join(missing)}")
    eval_filter = EvalOverlapFilter.from_dir(eval_dir or default_eval_dir())
    pools = [PromptPool(f"prompts:{p.name}", read_prompts(p), None) for p in prompt_files]
    if any(sharegpt.values()):
        print(SHAREGPT_NOTE, file=sys.stderr)
        by_domain: dict[str, list] = {d: [] for d in DOMAINS}
        for r in read_sharegpt(max_turns=1):
            if len(r.turns[0]) <= max_chars:
                domain = classify_domain(r.turns[0])
                by_domain[domain].append(PromptRecord(r.id, r.source, domain, r.turns))
        for domain in ("code", "math", "chat"):
            if sharegpt.get(domain):
                pools.append(PromptPool(f"sharegpt-{domain}", by_domain[domain], sharegpt[domain]))
    return mix_prompts(pools, eval_filter, seed=seed)
