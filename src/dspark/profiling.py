"""The cost table SPS(B): how many engine steps per second the target sustains when one step
verifies B tokens in total (B = Σ_r (1 + ℓ_r), paper §3.2.2).

``measure_cost_table`` times the batched engine's own verification step
(:func:`~dspark.batch_engine.verify_forward` plus the per-request verify rule) for B from 1
to ``max_requests · (1 + max_draft)``, with the B tokens spread as evenly as possible over
min(B, max_requests) requests whose slots hold ``context`` committed positions each. Tables
are JSON files keyed by model, device, dtype and thread count, under
``~/.cache/dspark/profiles/`` (or ``$DSPARK_PROFILE_DIR``). Between measured budgets the step
*time* is interpolated linearly. A table is never invented: a missing one is an error that
names ``dspark profile``.

Not measured: drafting, which costs the same whatever the scheduler picks, and the
dependence on context length beyond the one profiled.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dspark.errors import DsparkError

PROFILE_DIR_ENV = "DSPARK_PROFILE_DIR"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CostKey:
    """What a cost table depends on; one file per key."""

    model: str
    device: str
    """'cpu', or the accelerator's type and name (e.g. 'cuda:NVIDIA H200')."""
    dtype: str
    threads: int
    """torch intra-op threads while measuring."""

    def filename(self) -> str:
        raw = f"{self.model}__{self.device}__{self.dtype}__t{self.threads}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-") + ".json"

    def describe(self) -> str:
        return f"{self.model} on {self.device} ({self.dtype}, {self.threads} threads)"


@dataclass(frozen=True)
class CostTable:
    """Measured SPS(B) of one (model, device, dtype, threads)."""

    key: CostKey
    budgets: tuple[int, ...]
    """Measured B, increasing, starting at 1."""
    steps_per_s: tuple[float, ...]
    """SPS(B) at each measured budget."""
    max_requests: int = 16
    """Most requests per measured step (B tokens spread over min(B, max_requests) rows)."""
    context: int = 256
    """Committed positions per request while measuring."""
    created: str = ""

    def __post_init__(self) -> None:
        if len(self.budgets) != len(self.steps_per_s) or len(self.budgets) < 2:
            raise ValueError("a cost table needs at least 2 budgets and one SPS value per budget")
        if self.budgets[0] != 1 or any(b <= a for a, b in zip(self.budgets, self.budgets[1:])):
            raise ValueError(f"budgets must increase from 1, got {self.budgets}")
        if any(not (s > 0.0) for s in self.steps_per_s):
            raise ValueError("steps per second must be positive")

    @property
    def max_budget(self) -> int:
        return self.budgets[-1]

    def steps_per_second(self, budgets: torch.Tensor) -> torch.Tensor:
        """SPS at ``budgets`` # [N] (1 <= B <= max_budget) -> # [N] float32."""
        device = budgets.device
        xs = torch.tensor(self.budgets, dtype=torch.float32, device=device)
        ys = 1.0 / torch.tensor(self.steps_per_s, dtype=torch.float32, device=device)  # s per step
        b = budgets.to(torch.float32)
        hi = torch.searchsorted(xs, b).clamp(1, len(self.budgets) - 1)
        x0, x1, y0, y1 = xs[hi - 1], xs[hi], ys[hi - 1], ys[hi]
        return 1.0 / (y0 + (b - x0) / (x1 - x0) * (y1 - y0))

    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "CostTable":
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown cost table format {data.get('format')!r}")
        fields = {k: v for k, v in data.items() if k != "format"}
        fields["key"] = CostKey(**fields["key"])
        fields["budgets"] = tuple(int(b) for b in fields["budgets"])
        fields["steps_per_s"] = tuple(float(s) for s in fields["steps_per_s"])
        return cls(**fields)

    def save(self, directory: str | Path | None = None) -> Path:
        path = profile_dir(directory) / self.key.filename()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        try:
            return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DsparkError(f"{path} is not a dspark cost table: {exc}") from exc


def profile_dir(directory: str | Path | None = None) -> Path:
    """``directory``, else $DSPARK_PROFILE_DIR, else ~/.cache/dspark/profiles."""
    if directory is not None:
        return Path(directory).expanduser()
    if os.environ.get(PROFILE_DIR_ENV):
        return Path(os.environ[PROFILE_DIR_ENV]).expanduser()
    return Path.home() / ".cache" / "dspark" / "profiles"


def describe_device(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    name = device.type
    if device.type == "cuda" and torch.cuda.is_available():
        name = f"cuda:{torch.cuda.get_device_name(device)}"
    return name


def cost_key(target, threads: int | None = None) -> CostKey:
    """The key of ``target`` as it runs now (threads: torch.get_num_threads())."""
    dtype = str(next(target.model.parameters()).dtype).removeprefix("torch.")
    return CostKey(
        model=target.name,
        device=describe_device(target.device),
        dtype=dtype,
        threads=threads if threads is not None else torch.get_num_threads(),
    )


def load_cost_table(target, directory: str | Path | None = None) -> CostTable | None:
    """The saved table for ``target`` as it runs now, or None."""
    path = profile_dir(directory) / cost_key(target).filename()
    return CostTable.load(path) if path.is_file() else None


def require_cost_table(
    target,
    directory: str | Path | None = None,
    profile_if_missing: bool = False,
    min_budget: int | None = None,
    **measure_kwargs,
) -> CostTable:
    """Load the table for ``target``; measure (and save) it when allowed, else raise.

    ``min_budget`` is the largest B the caller may verify in one step; a table that does
    not reach it is treated as missing.
    """
    key = cost_key(target)
    table = load_cost_table(target, directory)
    if table is not None and (min_budget is None or table.max_budget >= min_budget):
        return table
    if not profile_if_missing:
        where = profile_dir(directory) / key.filename()
        if table is None:
            problem = f"no cost table for {key.describe()} at {where}"
        else:
            problem = f"the cost table at {where} covers B <= {table.max_budget}, but B up to {min_budget} is needed"
        raise DsparkError(
            f"{problem}; the dspark policy needs SPS(B). Run `dspark profile` with the same "
            "model, device, dtype and threads (see `dspark profile --help`) and try again"
        )
    table = measure_cost_table(target, **measure_kwargs)
    if min_budget is not None and table.max_budget < min_budget:
        raise DsparkError(f"the measured table covers B <= {table.max_budget} < {min_budget}; raise max_requests or max_draft")
    table.save(directory)
    return table


def default_budgets(max_budget: int) -> list[int]:
    """Every B up to 16, then steps of 1/8 of the current power of two, then max_budget."""
    budgets = list(range(1, min(16, max_budget) + 1))
    b = 16
    while b < max_budget:
        b += max(2, 1 << max(0, b.bit_length() - 4))
        budgets.append(min(b, max_budget))
    return sorted(set(budgets))


def spread(budget: int, max_requests: int) -> list[int]:
    """B tokens over min(B, max_requests) rows as evenly as possible: (1 + ℓ_r) per row."""
    rows = min(budget, max_requests)
    return [budget // rows + (1 if r < budget % rows else 0) for r in range(rows)]


@torch.inference_mode()
def measure_cost_table(
    target,
    max_requests: int = 16,
    max_draft: int = 7,
    context: int = 256,
    repeats: int = 5,
    budgets: Sequence[int] | None = None,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> CostTable:
    """Time the engine's verification step at each budget; the median of ``repeats`` runs
    (after one warm-up) gives SPS(B). ``progress(B, sps)`` is called after each budget."""
    from dspark.batch_engine import verify_forward
    from dspark.slot_cache import SlotCache
    from dspark.verify import greedy_verify

    if max_requests < 1 or max_draft < 0 or context < 1 or repeats < 1:
        raise ValueError("max_requests, context and repeats must be >= 1 and max_draft >= 0")
    max_budget = max_requests * (1 + max_draft)
    budgets = sorted(set(budgets)) if budgets is not None else default_budgets(max_budget)
    if budgets[0] != 1:
        budgets = [1, *budgets]
    device = target.device
    dtype = next(target.model.parameters()).dtype
    cache = SlotCache.for_hf_config(target.model.config, max_requests, context + max_draft + 1, dtype, device)
    generator = torch.Generator().manual_seed(seed)

    def tokens(*shape: int) -> torch.Tensor:
        return torch.randint(0, target.vocab_size, shape, generator=generator).to(device)

    for slot in range(max_requests):
        verify_forward(target, cache, [slot], [0], tokens(1, context))
    sps = []
    for budget in budgets:
        lengths = spread(budget, max_requests)
        rows = len(lengths)
        feed = tokens(rows, max(lengths))
        times = []
        for run in range(repeats + 1):
            start = time.perf_counter()
            out = verify_forward(target, cache, list(range(rows)), [context] * rows, feed)
            for r, n in enumerate(lengths):  # the engine's per-request rule, host syncs included
                greedy_verify(feed[r, 1:n], out.logits[r, :n])
            if run:  # the first run warms up allocators and kernels
                times.append(time.perf_counter() - start)
        sps.append(1.0 / statistics.median(times))
        if progress is not None:
            progress(budget, sps[-1])
    return CostTable(
        key=cost_key(target),
        budgets=tuple(budgets),
        steps_per_s=tuple(sps),
        max_requests=max_requests,
        context=context,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
