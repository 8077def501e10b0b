"""Float32 linears on the CPU through oneDNN instead of ATen's default GEMM.

Why: speculative decoding lives on the cost of a target forward over 1 and over a few tokens.
On this project's host (AMD EPYC, 2 cores; ``benchmarks/bench_cpu_linear.py``, results in
``benchmarks/results/cpu_linear.json``) ATen's float32 ``linear`` is slow exactly there: over
the 30 MLP projections of SmolLM2-135M it takes as long for M = 1 row as oneDNN takes for 8, and
M = 2..3 rows cost 1.6-2x M = 1. oneDNN's inner-product primitive, which torch ships for
inductor as ``mkldnn._linear_pointwise``, streams the same dense weights at every M.

Nothing is repacked or copied: a swapped module keeps its parameters (tied weights stay
tied, ``state_dict`` is unchanged) and only its ``forward`` changes. It is used only where
no gradient is wanted (the frozen target under ``no_grad``); anything else falls back to ATen.
Results agree with ATen's to float32 rounding (the tests compare both on every shape the
engines use); greedy equality with plain decoding holds because plain decoding and
verification run the same kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATEN, ONEDNN = "aten", "onednn"
LINEAR_KERNELS = (ATEN, ONEDNN)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, on oneDNN when no gradient is wanted and the operands are CPU float32."""
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or not onednn_works():
        return F.linear(x, weight, bias)
    return _onednn_linear(x, weight, bias)


class OneDNNLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose gradient-free CPU float32 forward runs on oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def onednn_works() -> bool:
    """Whether this torch build runs oneDNN's linear and agrees with ATen (probed once)."""
    global _WORKS
    if _WORKS is None:
        try:
            w, x = torch.randn(3, 4), torch.randn(2, 4)
            with torch.no_grad():
                _WORKS = torch.allclose(_onednn_linear(x, w, None), F.linear(x, w), atol=1e-5)
        except (RuntimeError, AttributeError, NotImplementedError):
            _WORKS = False
    return _WORKS


_WORKS: bool | None = None


def set_linear_kernel(model: torch.nn.Module, kernel: str = ONEDNN) -> int:
    """Run every plain ``nn.Linear`` of ``model`` on ``kernel``; returns how many now do.

    ``onednn`` applies to float32 weights on the CPU and only when the build supports it
    (else nothing changes and 0 is returned); ``aten`` restores the default everywhere."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel {kernel!r}; choose one of {LINEAR_KERNELS}")
    swapped = 0
    for module in model.modules():
        if type(module) not in (torch.nn.Linear, OneDNNLinear):
            continue
        fits = module.weight.device.type == "cpu" and module.weight.dtype == torch.float32
        if kernel == ONEDNN and fits and onednn_works():
            module.__class__ = OneDNNLinear
            swapped += 1
        else:
            module.__class__ = torch.nn.Linear
    return swapped
