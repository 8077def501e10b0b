"""The cost table: how many engine steps per second the target sustains, SPS(R, W), when one
step verifies R requests whose rows are padded to W = 1 + max_r ℓ_r tokens each.

The paper writes SPS(B) with B = Σ_r (1 + ℓ_r), the cost of an engine that flattens a step's
tokens. This engine pads the rows of a step to the longest one (:mod:`dspark.engine.batched`),
so the target really processes R × W positions and B alone misprices a step: at R = 4, one
row verifying 4 drafted tokens costs what four such rows cost. The table is therefore
measured over the engine's real shapes, and the scheduler (:mod:`dspark.scheduling.algorithm1`) costs
every candidate step by its (R, W).

``measure_cost_table`` times the batched engine's own verification step
(:func:`~dspark.target.ragged.verify_forward` plus the per-request verify rule) for every W
from 1 to 1 + ``max_draft`` and R on a grid up to ``max_requests``, with each request's slot
holding ``context`` committed positions, for each of several contexts. Between measured R,
and between measured contexts, the step *time* is interpolated linearly (attention's cost
grows linearly with the KV length; above the longest context the last segment's slope goes
on). The scheduler reads the table at the context of the step before
(:meth:`CostTable.at`). Step time never decreases with R or W in truth, so measurement noise
that says otherwise is removed with a running maximum along both axes. Steps are timed on the
device's clock (:func:`~dspark.timing.device_clock`), so a GPU's queued work is counted.
Tables are JSON files keyed by model, device (a GPU by its name), dtype, linear kernel and,
on the CPU, thread count, under ``~/.cache/dspark/profiles/`` (or ``$DSPARK_PROFILE_DIR``). A
table is never invented: a missing one is an error that names ``dspark profile``.

Not measured: drafting (the scheduler adds the drafting time it observes on earlier steps).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dspark.errors import DsparkError

PROFILE_DIR_ENV = "DSPARK_PROFILE_DIR"
FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
"""Format 2 tables (one context, no ``longer``) still load."""
DEFAULT_CONTEXTS = (256, 1024)
"""Contexts ``dspark profile`` measures by default."""


@dataclass(frozen=True)
class CostKey:
    """What a cost table depends on; one file per key."""

    model: str
    device: str
    """'cpu', or the accelerator's type and name (e.g. 'cuda:NVIDIA H200')."""
    dtype: str
    threads: int
    """torch intra-op threads while measuring; 0 off the CPU, where they do not set the cost."""
    kernel: str = "aten"
    """The target's linear kernel (:mod:`dspark.target.kernels`): it changes SPS(R, W)."""

    def filename(self) -> str:
        raw = f"{self.model}__{self.device}__{self.dtype}__{self.kernel}__t{self.threads}"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-") + ".json"

    def describe(self) -> str:
        threads = f", {self.threads} threads" if self.threads else ""
        return f"{self.model} on {self.device} ({self.dtype}, {self.kernel} linears{threads})"


@dataclass(frozen=True)
class CostTable:
    """Measured SPS(R, W) of one (model, device, dtype, threads)."""

    key: CostKey
    requests: tuple[int, ...]
    """Measured batch sizes R, increasing, starting at 1."""
    steps_per_s: tuple[tuple[float, ...], ...]
    """SPS at (requests[i], W = w + 1) in ``steps_per_s[i][w]``; every row covers W = 1..max_width."""
    context: int = 256
    """Committed positions per request while measuring."""
    created: str = ""
    longer: tuple["CostTable", ...] = ()
    """The same key and grid measured at longer contexts, increasing (empty: one context)."""

    padded = True
    """Costs depend on the padded shape (R, W), not on B: see :class:`~dspark.scheduling.algorithm1.DSparkScheduler`."""

    def __post_init__(self) -> None:
        if len(self.requests) != len(self.steps_per_s) or not self.requests:
            raise ValueError("a cost table needs one row of SPS values per measured batch size")
        if self.requests[0] != 1 or any(b <= a for a, b in zip(self.requests, self.requests[1:])):
            raise ValueError(f"batch sizes must increase from 1, got {self.requests}")
        if len({len(row) for row in self.steps_per_s}) != 1 or not self.steps_per_s[0]:
            raise ValueError("every batch size needs SPS at the same widths W = 1..max_width")
        if any(not (v > 0.0) for row in self.steps_per_s for v in row):
            raise ValueError("steps per second must be positive")
        contexts = self.contexts
        if any(b <= a for a, b in zip(contexts, contexts[1:])):
            raise ValueError(f"contexts must increase, got {contexts}")
        for other in self.longer:
            if other.key != self.key or other.requests != self.requests or other.max_width != self.max_width:
                raise ValueError("every context of a cost table needs the same key, batch sizes and widths")
            if other.longer:
                raise ValueError("a longer context's table holds no further contexts")

    @property
    def contexts(self) -> tuple[int, ...]:
        return (self.context, *(t.context for t in self.longer))

    def at(self, context: int | None) -> "CostTable":
        """The one-context table at ``context`` committed positions (None: the first measured):
        step times interpolated linearly between measured contexts, the last slope extended
        above them, the first context's times below it."""
        if not self.longer or context is None or context <= self.context:
            return self if not self.longer else self._single()
        tables = (self, *self.longer)
        hi = next((i for i, t in enumerate(tables) if t.context >= context), len(tables) - 1)
        lo, up = tables[hi - 1], tables[hi]
        f = (context - lo.context) / (up.context - lo.context)
        rows = []
        for lo_row, up_row in zip(lo.steps_per_s, up.steps_per_s):
            seconds = [max(1.0 / a, 1.0 / a + f * (1.0 / b - 1.0 / a)) for a, b in zip(lo_row, up_row)]
            rows.append(tuple(1.0 / t for t in seconds))
        return CostTable(self.key, self.requests, tuple(rows), context, self.created)

    def _single(self) -> "CostTable":
        return CostTable(self.key, self.requests, self.steps_per_s, self.context, self.created)

    @property
    def max_requests(self) -> int:
        return self.requests[-1]

    @property
    def max_width(self) -> int:
        return len(self.steps_per_s[0])

    def covers(self, requests: int, width: int) -> bool:
        return 1 <= requests <= self.max_requests and 1 <= width <= self.max_width

    def describe_coverage(self) -> str:
        return f"R <= {self.max_requests} requests of W <= {self.max_width} tokens"

    def step_seconds(self, requests: int) -> list[float]:
        """Seconds per step at W = 1..max_width for ``requests`` rows, interpolated between
        measured batch sizes."""
        if not self.covers(requests, 1):
            raise ValueError(f"the table covers {self.describe_coverage()}, not R = {requests}")
        hi = next(i for i, r in enumerate(self.requests) if r >= requests)
        upper = [1.0 / v for v in self.steps_per_s[hi]]
        if self.requests[hi] == requests:
            return upper
        lower = [1.0 / v for v in self.steps_per_s[hi - 1]]
        f = (requests - self.requests[hi - 1]) / (self.requests[hi] - self.requests[hi - 1])
        return [lo + f * (up - lo) for lo, up in zip(lower, upper)]

    def steps_per_second(self, requests: int, widths: torch.Tensor, budgets: torch.Tensor | None = None) -> torch.Tensor:
        """SPS of ``requests`` rows padded to ``widths`` # [N] (B is not needed) -> # [N] float32."""
        seconds = torch.tensor(self.step_seconds(requests), dtype=torch.float32, device=widths.device)
        return 1.0 / seconds[widths.long().clamp(1, self.max_width) - 1]

    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "CostTable":
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(
                f"cost table format {data.get('format')!r} is not one of {READABLE_FORMATS} (SPS over R × W); "
                "measure it again with `dspark profile`"
            )
        fields = {k: v for k, v in data.items() if k != "format"}
        fields["key"] = CostKey(**fields["key"])
        fields["requests"] = tuple(int(r) for r in fields["requests"])
        fields["steps_per_s"] = tuple(tuple(float(v) for v in row) for row in fields["steps_per_s"])
        fields["longer"] = tuple(cls.from_json({**t, "format": FORMAT_VERSION}) for t in fields.get("longer", ()))
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
            raise DsparkError(f"{path} is not a usable dspark cost table: {exc}") from exc


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
    """The key of ``target`` as it runs now (threads: torch.get_num_threads(); 0 off the CPU)."""
    dtype = str(next(target.model.parameters()).dtype).removeprefix("torch.")
    on_cpu = torch.device(target.device).type == "cpu"
    return CostKey(
        model=target.name,
        device=describe_device(target.device),
        dtype=dtype,
        threads=(threads if threads is not None else torch.get_num_threads()) if on_cpu else 0,
        kernel=target.linear_kernel,
    )


def load_cost_table(target, directory: str | Path | None = None) -> CostTable | None:
    """The saved table for ``target`` as it runs now, or None."""
    path = profile_dir(directory) / cost_key(target).filename()
    return CostTable.load(path) if path.is_file() else None


def require_cost_table(
    target,
    directory: str | Path | None = None,
    profile_if_missing: bool = False,
    max_requests: int = 16,
    max_draft: int = 7,
    **measure_kwargs,
) -> CostTable:
    """Load the table for ``target``; measure (and save) it when allowed, else raise.

    A table that does not cover ``max_requests`` rows of 1 + ``max_draft`` tokens is treated
    as missing.
    """
    key = cost_key(target)
    width = 1 + max_draft
    where = profile_dir(directory) / key.filename()
    try:
        table = load_cost_table(target, directory)
    except DsparkError as exc:
        if not profile_if_missing:
            raise DsparkError(f"{exc}; run `dspark profile` (see `dspark profile --help`)") from None
        table = None
    if table is not None and table.covers(max_requests, width):
        return table
    if not profile_if_missing:
        if table is None:
            problem = f"no cost table for {key.describe()} at {where}"
        else:
            problem = (
                f"the cost table at {where} covers {table.describe_coverage()}, but "
                f"{max_requests} requests of {width} tokens are needed"
            )
        raise DsparkError(
            f"{problem}; the dspark policy needs SPS(R, W). Run `dspark profile` with the same "
            "model, device, dtype and threads (see `dspark profile --help`) and try again"
        )
    table = measure_cost_table(target, max_requests=max_requests, max_draft=max_draft, **measure_kwargs)
    table.save(directory)
    return table


def default_requests(max_requests: int) -> list[int]:
    """Batch sizes to measure: 1..4, then about 1.5× apart, and ``max_requests`` itself."""
    grid, r = [], 1
    while r < max_requests:
        grid.append(r)
        r = r + 1 if r < 4 else r + max(1, r // 2)
    return [*grid, max_requests]


def _monotone(rows: list[list[float]]) -> list[list[float]]:
    """Step times made non-decreasing along W (within a row) and along R (across rows)."""
    out: list[list[float]] = []
    for row in rows:
        fixed, most = [], 0.0
        for i, t in enumerate(row):
            most = max(most, t, out[-1][i] if out else 0.0)
            fixed.append(most)
        out.append(fixed)
    return out


@torch.inference_mode()
def measure_cost_table(
    target,
    max_requests: int = 16,
    max_draft: int = 7,
    context: int | Sequence[int] = 256,
    repeats: int = 5,
    requests: Sequence[int] | None = None,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> CostTable:
    """Time the engine's verification step for every (R, W) at each ``context``; the median of
    ``repeats`` sweeps over all shapes (after one warm-up sweep) gives its step time.
    ``progress(R, W, sps)`` is called after every timed step: |contexts| · (repeats + 1) ·
    |grid| · (1 + max_draft) calls."""
    contexts = sorted({context} if isinstance(context, int) else set(context))
    if not contexts or contexts[0] < 1:
        raise ValueError("contexts must be >= 1")
    tables = [_measure_at(target, max_requests, max_draft, c, repeats, requests, seed, progress) for c in contexts]
    return dataclasses.replace(tables[0], longer=tuple(tables[1:]))


def _measure_at(target, max_requests, max_draft, context, repeats, requests, seed, progress) -> CostTable:
    """One context's table (see :func:`measure_cost_table`)."""
    from dspark.target.ragged import verify_forward
    from dspark.target.slot_cache import SlotCache
    from dspark.timing import device_clock
    from dspark.verify import greedy_verify

    if max_requests < 1 or max_draft < 0 or context < 1 or repeats < 1:
        raise ValueError("max_requests, context and repeats must be >= 1 and max_draft >= 0")
    grid = sorted(set(requests)) if requests is not None else default_requests(max_requests)
    if grid[0] != 1:
        grid = [1, *grid]
    if grid[-1] != max_requests or any(r < 1 or r > max_requests for r in grid):
        raise ValueError(f"batch sizes must lie in 1..{max_requests} and include it, got {grid}")
    device = target.device
    dtype = next(target.model.parameters()).dtype
    width = 1 + max_draft
    cache = SlotCache.for_hf_config(target.model.config, max_requests, context + width, dtype, device)
    generator = torch.Generator().manual_seed(seed)
    clock = device_clock(device)

    def tokens(*shape: int) -> torch.Tensor:
        return torch.randint(0, target.vocab_size, shape, generator=generator).to(device)

    for slot in range(max_requests):
        verify_forward(target, cache, [slot], [0], tokens(1, context))
    shapes = [(rows, w) for rows in grid for w in range(1, width + 1)]
    feeds = {shape: tokens(*shape) for shape in shapes}
    times: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
    # Sweeps over every shape, not runs of one shape: this host's speed drifts by tens of
    # percent over seconds, and a drift inside one shape's runs would bend the table.
    for sweep in range(repeats + 1):
        for rows, w in shapes:
            feed = feeds[rows, w]
            start = clock()
            out = verify_forward(target, cache, list(range(rows)), [context] * rows, feed)
            for r in range(rows):  # the engine's per-request rule, host syncs included
                greedy_verify(feed[r, 1:], out.logits[r])
            took = clock() - start
            if sweep:  # the first sweep warms up allocators and kernels
                times[rows, w].append(took)
            if progress is not None:
                progress(rows, w, 1.0 / took)
    seconds = [[statistics.median(times[rows, w]) for w in range(1, width + 1)] for rows in grid]
    return CostTable(
        key=cost_key(target),
        requests=tuple(grid),
        steps_per_s=tuple(tuple(1.0 / t for t in row) for row in _monotone(seconds)),
        context=context,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
