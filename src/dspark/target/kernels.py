"""Float32 CPU linears on whichever GEMM this host runs fastest at the number of rows fed.

Why: speculative decoding lives on the cost of a target forward over 1 and over a few tokens,
and which library streams the weights faster there depends on the CPU and the thread count.
Measured (SmolLM2-135M verification step, context 256, ms; ``benchmarks/speed/bench_cpu_linear.py``):

- session 6's host (AMD EPYC, 2 threads): ATen took as long for 1 row as oneDNN for 8, and
  2-3 rows cost 1.6-2x one row; oneDNN streamed the weights at every row count;
- session 14's host (Intel Xeon, 1 thread): ATen 47 / 51 / 56 / 76 ms at 1 / 2 / 3 / 4 tokens,
  oneDNN 55 / 76 / 78 / 79 ms; at 2 threads ATen was faster at every count up to 8.

Four kernels:

- ``aten``: ``F.linear`` (x Wᵀ: MKL's GEMM with the rows as the short side);
- ``onednn``: oneDNN's inner product;
- ``tall``: ATen's GEMM the other way round, (W xᵀ)ᵀ, the weight as the tall left operand. The
  same product through another of MKL's kernels: session 16's host (AMD EPYC, AVX-512, 1
  thread) ran a 2- or 4-row pass over all of SmolLM2's linears in 26 / 29 ms where oneDNN took
  37 / 37 and one row took 28, but 3 rows in 37 and 8 in 70 (oneDNN 41): so 3 rows run
  zero-padded to 4 there. In the whole verification step: 2 / 3 / 4 tokens 1.13-1.16 /
  1.25-1.32 / 1.22-1.27x one token, against oneDNN's 1.37 / 1.41 / 1.41x.
- ``mkl``: MKL's packed GEMM (``torch.ops.mkl._mkl_linear``, what inductor runs for float32 CPU
  linears) over weights packed once for ``PACK_ROWS`` rows, fewer rows zero-padded up to it
  (PyTorch runs the packed path only at the row count it was packed for). Session 15's host
  (Intel Xeon, 1 thread): eight tokens cost 1.4x one instead of 1.8x; on session 16's AMD host
  it lost to oneDNN at every count.

So the default (``auto``) probes all four on the model's own largest weights once per host,
model shape and thread count (the choice is cached under the dspark cache folder) at every row
count up to :data:`PLAN_ROWS` and at a few above, and makes a :class:`KernelPlan`: for each
row count up to :data:`PLAN_ROWS`, the kernel and the (probed, padded) row count that ran
fastest; above it, the one kernel fastest there. The plan is part of the kernel's name
(``onednn<=1+tall<=2+tall@4<=4+onednn``, ``aten<=3+mkl<=8+onednn``), and so of the
scheduler's cost-table key.

A swapped module keeps its parameters (tied weights stay tied, ``state_dict`` is unchanged)
and only its ``forward`` changes; a plan that uses the packed kernel adds one packed copy of
each weight, so the float32 weights then sit in memory twice. It is used only where no gradient
is wanted (the frozen target under ``no_grad``); anything else falls back to ATen. Results
agree with ATen's to float32 rounding (the tests compare every kernel with ``F.linear`` on
every shape the engines use, padded or not). No library gives a row the same bits at every row
count, so greedy equality with plain decoding rests, as before, on no near-ties at float32
rounding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

AUTO, ATEN, ONEDNN, TALL, MKL = "auto", "aten", "onednn", "tall", "mkl"
LINEAR_KERNELS = (AUTO, ATEN, ONEDNN)
"""What a user may ask for: ``auto`` (probe, plan per row count) or one kernel everywhere."""
PACK_ROWS = 8
"""Rows the packed weights are packed for; 4-8 rows is what a batch-1 verification feeds."""
PLAN_ROWS = 8
"""Row counts a plan chooses one by one (and may pad within); above, one kernel, unpadded."""
CHOICE_VERSION = 3
"""Part of the cached choice's key: version 1 knew ATen and oneDNN only, 2 the packed band."""
PAD_MARGIN = 0.05
"""A padded option is taken only where it beats every less padded one by more than this share
(one pass's noise on a quiet host is a few per cent)."""
PROBE_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
PROBE_BYTES = 256 << 20
"""The probe streams the model's largest weights up to this many bytes: more than the caches,
as a real forward does, and a fraction of a second per pass."""
DISK_CACHE_BYTES = 16 << 20
"""Models with fewer linear-weight bytes are probed in memory only (tests' tiny models)."""


@dataclass(frozen=True)
class KernelPlan:
    """Which kernel runs a linear of n rows, and over how many rows (the input zero-padded up
    to them): ``small[n - 1]`` for n up to its length, ``above`` unpadded beyond."""

    small: tuple[tuple[str, int], ...] = ()
    """(kernel, rows run) per row count 1, 2, …; rows run >= the row count (MKL: PACK_ROWS)."""
    above: str = ONEDNN

    def __post_init__(self) -> None:
        for n, (kernel, run) in enumerate(self.small, 1):
            if kernel not in (ATEN, ONEDNN, TALL, MKL) or run < n or (kernel == MKL and run != PACK_ROWS):
                raise ValueError(f"a kernel plan cannot run {n} rows as ({kernel!r}, {run} rows)")
        if self.above not in (ATEN, ONEDNN, TALL):
            raise ValueError(f"unknown kernel {self.above!r} above a plan's rows")

    def at(self, rows: int) -> tuple[str, int]:
        """(kernel, rows it runs over) for a linear of ``rows`` rows."""
        return self.small[rows - 1] if 0 < rows <= len(self.small) else (self.above, rows)

    @property
    def packs(self) -> bool:
        """Whether some row count runs on the packed weights."""
        return any(kernel == MKL for kernel, _ in self.small)

    @property
    def name(self) -> str:
        """Runs of row counts with one kernel, in order: 'kernel<=n' (or 'kernel@m<=n' where
        they run padded to m rows), the last kernel unbounded: 'aten<=3+mkl<=8+onednn',
        'onednn<=1+tall<=2+tall@4<=3+tall<=4+onednn', 'onednn'."""
        keys = [(k, None if k == MKL or run == n else run) for n, (k, run) in enumerate(self.small, 1)]
        while keys and keys[-1] == (self.above, None):
            keys.pop()
        parts = []
        for n, key in enumerate(keys, 1):
            if n == len(keys) or keys[n] != key:
                kernel, run = key
                parts.append(f"{kernel}{'' if run is None else f'@{run}'}<={n}")
        return "+".join([*parts, self.above])

    @classmethod
    def everywhere(cls, kernel: str) -> "KernelPlan":
        return cls((), kernel)


ONEDNN_PLAN = KernelPlan.everywhere(ONEDNN)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _tall_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x # [n, in] -> (W xᵀ)ᵀ # [n, out]: F.linear with the GEMM's operands the other way round."""
    out = torch.mm(weight, x.t()).t()
    return (out + bias if bias is not None else out).contiguous()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` # [out, in] packed for MKL's GEMM at :data:`PACK_ROWS` rows (a copy)."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACK_ROWS)


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x # [PACK_ROWS, in] (the packed path runs only at the row count it was packed for)."""
    return torch.ops.mkl._mkl_linear(x.contiguous(), packed, weight, bias, PACK_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, plan: KernelPlan = ONEDNN_PLAN,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` # [..., in] -> [..., out], when no gradient is wanted and the operands are
    CPU float32: on the kernel ``plan`` names for this many rows, zero-padded to the rows it
    names (the ``packed`` weights of :func:`pack_weight` for ``mkl``)."""
    rows = x.numel() // max(1, x.shape[-1])
    kernel, run = plan.at(rows)
    if ((kernel == ATEN and run == rows) or torch.is_grad_enabled() or x.dtype != torch.float32
            or x.device.type != "cpu" or (kernel == MKL and packed is None) or not onednn_works()):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    if run > rows:
        flat = torch.cat([flat, flat.new_zeros(run - rows, flat.shape[1])])
    if kernel == MKL:
        out = _packed_linear(flat, weight, packed, bias)
    elif kernel == TALL:
        out = _tall_linear(flat, weight, bias)
    elif kernel == ATEN:
        out = F.linear(flat, weight, bias)
    else:
        out = _onednn_linear(flat, weight, bias)
    return out[:rows].reshape(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose gradient-free CPU float32 forward runs on its ``plan`` (with
    ``packed`` weights where the plan uses them; both set by :func:`set_linear_kernel`)."""

    plan: KernelPlan = ONEDNN_PLAN
    packed: torch.Tensor | None = None
    """The weight packed by :func:`pack_weight`: a plain attribute, not in ``state_dict``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.plan, self.packed)


def _agrees_with_aten(fast: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: int) -> bool:
    """Whether ``fast(x, w)`` runs in this torch build and agrees with ATen's ``F.linear``."""
    try:
        w, x = torch.randn(3, 4), torch.randn(rows, 4)
        with torch.no_grad():
            return torch.allclose(fast(x, w), F.linear(x, w), atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def onednn_works() -> bool:
    """Whether this torch build runs oneDNN's linear and agrees with ATen (probed once)."""
    return _agrees_with_aten(lambda x, w: _onednn_linear(x, w, None), rows=2)


@functools.cache
def mkl_packed_works() -> bool:
    """Whether this torch build runs MKL's packed linear and agrees with ATen (probed once)."""
    return torch._C.has_mkl and _agrees_with_aten(lambda x, w: _packed_linear(
        torch.cat([x, x.new_zeros(PACK_ROWS - x.shape[0], x.shape[1])]), w, pack_weight(w), None)[: x.shape[0]], rows=5)


def set_linear_kernel(model: torch.nn.Module, kernel: str = AUTO, cache_dir: Path | None = None) -> str:
    """Run every plain ``nn.Linear`` of ``model`` on ``kernel``; returns what they now run on
    (:attr:`KernelPlan.name`; 'aten' when nothing fits: the other kernels need float32
    weights on the CPU and a build that has oneDNN). ``auto`` probes (:func:`choose_plan`)."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel {kernel!r}; choose one of {LINEAR_KERNELS}")
    fits = {id(m): m for m in model.modules() if type(m) in (torch.nn.Linear, OneDNNLinear)
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32}
    plan = None if kernel == AUTO else KernelPlan.everywhere(kernel)
    if not fits or not onednn_works():
        plan = KernelPlan.everywhere(ATEN)
    elif plan is None:
        plan = choose_plan([m.weight for m in fits.values()], cache_dir=cache_dir)
    swap = plan != KernelPlan.everywhere(ATEN)
    for module in model.modules():
        if type(module) in (torch.nn.Linear, OneDNNLinear):
            module.__class__ = OneDNNLinear if id(module) in fits and swap else torch.nn.Linear
            if module.__class__ is OneDNNLinear:
                module.plan = plan
                module.packed = pack_weight(module.weight) if plan.packs else None
            else:
                for attr in ("plan", "packed"):
                    vars(module).pop(attr, None)
    return plan.name


_CHOSEN: dict[str, KernelPlan] = {}


def choose_plan(weights: Sequence[torch.Tensor], cache_dir: Path | None = None,
                timer: Callable[[], float] = time.perf_counter, repeats: int = 3) -> KernelPlan:
    """The :func:`plan_from` a :func:`probe` over the largest of ``weights``. Remembered per
    process, and on disk for real models (``cache_dir``/kernels/)."""
    unique = {w.data_ptr(): w for w in weights}.values()
    sample, total = [], 0
    for w in sorted(unique, key=lambda w: -w.numel()):
        if total >= PROBE_BYTES:
            break
        sample.append(w)
        total += w.numel() * w.element_size()
    shapes = ",".join("x".join(map(str, w.shape)) for w in sample)
    key = hashlib.sha1(f"v{CHOICE_VERSION}|{_cpu_name()}|{torch.get_num_threads()}|{shapes}".encode()).hexdigest()[:16]
    if key in _CHOSEN:
        return _CHOSEN[key]
    path = None
    if cache_dir is not None and total >= DISK_CACHE_BYTES:
        path = Path(cache_dir) / "kernels" / f"linear-{key}.json"
        try:
            record = json.loads(path.read_text())
            plan = KernelPlan(tuple((str(k), int(n)) for k, n in record["small"]), str(record["above"]))
            _CHOSEN[key] = plan
            return plan
        except (OSError, ValueError, KeyError, TypeError):
            pass
    ms = probe(sample, timer=timer, repeats=repeats)
    plan = _CHOSEN[key] = plan_from(ms)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"small": plan.small, "above": plan.above, "kernel": plan.name, "cpu": _cpu_name(),
                  "threads": torch.get_num_threads(), "weights": shapes, "ms_per_pass": ms}
        path.write_text(json.dumps(record, indent=1))
    return plan


def plan_from(ms: dict[str, dict[int, float]]) -> KernelPlan:
    """The plan of probe times ``ms`` (kernel -> rows -> ms): for each row count n up to
    :data:`PLAN_ROWS`, the kernel and probed row count m >= n (padded up to it) with the least
    time, the least padded of those within :data:`PAD_MARGIN` of it; above, the kernel with the least total
    time over the probed counts above (unpadded; at the largest probed count where none lies
    above). Row counts past the last one probed up to :data:`PLAN_ROWS` go to ``above`` too."""
    small = []
    for n in range(1, PLAN_ROWS + 1):
        runs = [(t, kernel, PACK_ROWS if kernel == MKL else m)
                for kernel, by_rows in ms.items() for m, t in by_rows.items() if n <= m <= PLAN_ROWS]
        options = [(t, run - n, kernel, run) for t, kernel, run in runs]
        if not options:
            break
        fastest = min(t for t, *_ in options)
        # Padding must pay by more than the probe's noise: the least padded option near the fastest.
        _, _, kernel, run = min((pad, t, kernel, run) for t, pad, kernel, run in options if t <= fastest * (1 + PAD_MARGIN))
        small.append((kernel, run))
    probed = {m for by_rows in ms.values() for m in by_rows}
    counts = sorted(m for m in probed if m > len(small)) or ([max(probed)] if probed else [])
    unpadded = {k: by for k, by in ms.items() if k != MKL and all(m in by for m in counts)}
    above = min(unpadded, key=lambda k: (sum(unpadded[k][m] for m in counts), k)) if counts and unpadded else ONEDNN
    return KernelPlan(tuple(small), above)


@torch.no_grad()
def probe(weights: Sequence[torch.Tensor], rows: Sequence[int] = PROBE_ROWS,
          timer: Callable[[], float] = time.perf_counter, repeats: int = 3) -> dict[str, dict[int, float]]:
    """Median ms of one pass of each kernel over ``weights`` per kernel and row count (the
    packed one at up to :data:`PACK_ROWS` rows, padded); the kernels and counts are
    interleaved within each repeat so a drifting host bends none of them."""
    inputs = {r: [torch.randn(r, w.shape[1]) for w in weights] for r in rows}
    kernels = {ATEN: F.linear, ONEDNN: lambda x, w: _onednn_linear(x, w, None), TALL: lambda x, w: _tall_linear(x, w, None)}
    if mkl_packed_works():
        packed = {w.data_ptr(): pack_weight(w) for w in weights}
        kernels[MKL] = lambda x, w: linear(x, w, None, KernelPlan(((MKL, PACK_ROWS),) * PACK_ROWS), packed[w.data_ptr()])
    times: dict[str, dict[int, list[float]]] = {name: {r: [] for r in rows} for name in kernels}
    for sweep in range(repeats + 1):
        for r in rows:
            for name, fn in kernels.items():
                if name == MKL and r > PACK_ROWS:
                    continue
                start = timer()
                for x, w in zip(inputs[r], weights):
                    fn(x, w)
                if sweep:  # the first sweep warms caches and oneDNN's primitive cache
                    times[name][r].append((timer() - start) * 1e3)
    return {name: {r: statistics.median(ts) for r, ts in by_rows.items() if ts} for name, by_rows in times.items()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
