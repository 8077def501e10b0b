"""Float32 CPU linears on ATen's GEMM or oneDNN's inner product, whichever this host runs
faster at the number of rows being fed.

Why: speculative decoding lives on the cost of a target forward over 1 and over a few tokens,
and which library streams the weights faster there depends on the CPU and the thread count.
Measured (SmolLM2-135M verification step, context 256, ms; ``benchmarks/speed/bench_cpu_linear.py``):

- session 6's host (AMD EPYC, 2 threads): ATen took as long for 1 row as oneDNN for 8, and
  2-3 rows cost 1.6-2x one row; oneDNN streamed the weights at every row count;
- this session's host (Intel Xeon, 1 thread): ATen 47 / 51 / 56 / 76 ms at 1 / 2 / 3 / 4 tokens,
  oneDNN 55 / 76 / 78 / 79 ms; at 2 threads ATen was faster at every count up to 8.

A third kernel: MKL's packed GEMM (``torch.ops.mkl._mkl_linear``, what inductor runs for
float32 CPU linears) over weights packed once for ``PACK_ROWS`` rows, with fewer rows
zero-padded up to it (PyTorch runs the packed path only at the row count it was packed for).
Session 15's host (Intel Xeon, 1 thread), SmolLM2-135M verification at context 256, ms:
ATen/oneDNN as chosen 71 / 72 / 65 / 93 / 102 / 127 at 1 / 2 / 3 / 4 / 6 / 8 tokens, with 4-8
tokens on the packed weights 80 / 83 / 85: eight tokens cost 1.4x one instead of 1.8x, which is
what speculative decoding verifies.

So the default (``auto``) probes all three on the model's own largest weights once per host,
model shape and thread count (the choice is cached under the dspark cache folder), and runs
ATen up to the last row count where it wins, the packed weights above that up to
``PACK_ROWS`` where they beat oneDNN, oneDNN above. The choice is part of the kernel's name
(``aten<=3+onednn``, ``aten<=3+mkl<=8+onednn``), and so of the scheduler's cost-table key.

A swapped module keeps its parameters (tied weights stay tied, ``state_dict`` is unchanged)
and only its ``forward`` changes; the packed band adds one packed copy of each weight, so the
float32 weights sit in memory twice. It is used only where
no gradient is wanted (the frozen target under ``no_grad``); anything else falls back to ATen.
Results agree with ATen's to float32 rounding (the tests compare both on every shape the
engines use). Neither library gives a row the same bits at every row count, so greedy
equality with plain decoding rests, as before, on no near-ties at float32 rounding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

AUTO, ATEN, ONEDNN, MKL = "auto", "aten", "onednn", "mkl"
LINEAR_KERNELS = (AUTO, ATEN, ONEDNN)
PACK_ROWS = 8
"""Rows the packed weights are packed for; 4-8 rows is what a batch-1 verification feeds."""
CHOICE_VERSION = 2
"""Part of the cached choice's key: version 1 knew ATen and oneDNN only."""
PROBE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16)
PROBE_BYTES = 256 << 20
"""The probe streams the model's largest weights up to this many bytes: more than the caches,
as a real forward does, and a fraction of a second per pass."""
DISK_CACHE_BYTES = 16 << 20
"""Models with fewer linear-weight bytes are probed in memory only (tests' tiny models)."""
ALL_ROWS = sys.maxsize


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` # [out, in] packed for MKL's GEMM at :data:`PACK_ROWS` rows (a copy)."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACK_ROWS)


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows < PACK_ROWS:  # the packed path runs only at the row count it was packed for
        flat = torch.cat([flat, flat.new_zeros(PACK_ROWS - rows, flat.shape[1])])
    out = torch.ops.mkl._mkl_linear(flat.contiguous(), packed, weight, bias, PACK_ROWS)[:rows]
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, aten_rows: int = 0,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, when no gradient is wanted and the operands are CPU float32: on ATen up to
    ``aten_rows`` rows, on the ``packed`` weights (:func:`pack_weight`) above that up to
    :data:`PACK_ROWS` rows, on oneDNN above."""
    rows = x.numel() // max(1, x.shape[-1])
    if (torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu"
            or rows <= aten_rows or not onednn_works()):
        return F.linear(x, weight, bias)
    if packed is not None and rows <= PACK_ROWS:
        return _packed_linear(x, weight, packed, bias)
    return _onednn_linear(x, weight, bias)


class OneDNNLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose gradient-free CPU float32 forward runs on oneDNN above
    ``aten_rows`` rows, or on packed weights up to :data:`PACK_ROWS` rows where ``packed`` is
    set (both by :func:`set_linear_kernel`)."""

    aten_rows: int = 0
    packed: torch.Tensor | None = None
    """The weight packed by :func:`pack_weight`: a plain attribute, not in ``state_dict``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.aten_rows, self.packed)


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
    return torch._C.has_mkl and _agrees_with_aten(lambda x, w: _packed_linear(x, w, pack_weight(w), None), rows=5)


def kernel_name(aten_rows: int, packed: bool = False) -> str:
    """'onednn' (0 rows on ATen), 'aten' (all rows), 'aten<=N+onednn', or with packed weights
    between ATen and oneDNN 'aten<=N+mkl<=8+onednn' ('mkl<=8+onednn' from 1 row)."""
    if aten_rows >= ALL_ROWS:
        return ATEN
    parts = [f"aten<={aten_rows}"] if aten_rows > 0 else []
    if packed and aten_rows < PACK_ROWS:
        parts.append(f"{MKL}<={PACK_ROWS}")
    return "+".join([*parts, ONEDNN])


def set_linear_kernel(model: torch.nn.Module, kernel: str = AUTO, cache_dir: Path | None = None) -> str:
    """Run every plain ``nn.Linear`` of ``model`` on ``kernel``; returns what they now run on
    (:func:`kernel_name`; 'aten' when nothing fits oneDNN: it needs float32 weights on the CPU
    and a build that has it). ``auto`` probes (:func:`choose_aten_rows`)."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel {kernel!r}; choose one of {LINEAR_KERNELS}")
    fits = {id(m): m for m in model.modules() if type(m) in (torch.nn.Linear, OneDNNLinear)
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32}
    aten_rows, packed = {ATEN: (ALL_ROWS, False), ONEDNN: (0, False)}.get(kernel, (None, False))
    if not fits or not onednn_works():
        aten_rows, packed = ALL_ROWS, False
    elif aten_rows is None:
        aten_rows, packed = choose_aten_rows([m.weight for m in fits.values()], cache_dir=cache_dir)
    packed = packed and aten_rows < PACK_ROWS
    for module in model.modules():
        if type(module) in (torch.nn.Linear, OneDNNLinear):
            module.__class__ = OneDNNLinear if id(module) in fits and aten_rows < ALL_ROWS else torch.nn.Linear
            if module.__class__ is OneDNNLinear:
                module.aten_rows = aten_rows
                module.packed = pack_weight(module.weight) if packed else None
            elif "packed" in vars(module):
                del module.packed
    return kernel_name(aten_rows, packed)


_CHOSEN: dict[str, tuple[int, bool]] = {}


def choose_aten_rows(weights: Sequence[torch.Tensor], cache_dir: Path | None = None,
                     timer: Callable[[], float] = time.perf_counter, repeats: int = 3) -> tuple[int, bool]:
    """(The most rows for which ATen beats the other kernels at this and every smaller probed
    count, :data:`ALL_ROWS` when it wins at all of them; whether the packed weights beat oneDNN
    at every probed count above that up to :data:`PACK_ROWS`), over the largest of ``weights``.
    Remembered per process, and on disk for real models (``cache_dir``/kernels/)."""
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
            _CHOSEN[key] = (int(record["aten_rows"]), bool(record["packed"]))
            return _CHOSEN[key]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    ms = probe(sample, timer=timer, repeats=repeats)
    chosen = _CHOSEN[key] = choice_from(ms)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"aten_rows": chosen[0], "packed": chosen[1], "kernel": kernel_name(*chosen), "cpu": _cpu_name(),
                  "threads": torch.get_num_threads(), "weights": shapes, "ms_per_pass": ms}
        path.write_text(json.dumps(record, indent=1))
    return chosen


def aten_rows_from(ms: dict[str, dict[int, float]]) -> int:
    """The last probed row count up to which ATen is never slower than any other kernel
    probed there (:data:`ALL_ROWS` when that is every count probed, 0 when it loses at 1 row)."""
    chosen = 0
    for rows in sorted(ms[ATEN]):
        if any(ms[ATEN][rows] > other[rows] for name, other in ms.items() if name != ATEN and rows in other):
            return chosen
        chosen = rows
    return ALL_ROWS


def choice_from(ms: dict[str, dict[int, float]]) -> tuple[int, bool]:
    """(:func:`aten_rows_from`, whether the packed weights, where probed, beat oneDNN at every
    probed row count above the ATen rows up to :data:`PACK_ROWS`)."""
    aten_rows = aten_rows_from(ms)
    band = [r for r in ms.get(MKL, {}) if aten_rows < r <= PACK_ROWS]
    return aten_rows, bool(band) and all(ms[MKL][r] < ms[ONEDNN][r] for r in band)


@torch.no_grad()
def probe(weights: Sequence[torch.Tensor], rows: Sequence[int] = PROBE_ROWS,
          timer: Callable[[], float] = time.perf_counter, repeats: int = 3) -> dict[str, dict[int, float]]:
    """Median ms of one pass of ``linear`` over ``weights`` per kernel and row count; the
    kernels and counts are interleaved within each repeat so a drifting host bends neither."""
    inputs = {r: [torch.randn(r, w.shape[1]) for w in weights] for r in rows}
    kernels = {ATEN: F.linear, ONEDNN: lambda x, w: _onednn_linear(x, w, None)}
    if mkl_packed_works():
        packed = {w.data_ptr(): pack_weight(w) for w in weights}
        kernels[MKL] = lambda x, w: _packed_linear(x, w, packed[w.data_ptr()], None)
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
