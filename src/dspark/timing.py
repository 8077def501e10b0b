"""Durations on the device's clock: what the scheduler's costs and the reports are made of.

On a GPU kernels run asynchronously: a host timestamp taken right after a launch measures the
launch, and the device's work lands in whatever is timed next (a forward's time would show up
as "overhead", and be counted twice by the scheduler). :func:`device_clock` returns a clock
that first waits for the device (``torch.cuda.synchronize``, ``torch.mps.synchronize``), so
the time between two readings is the device time of what ran in between. On the CPU it is
``time.perf_counter`` itself: nothing changes there.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

Clock = Callable[[], float]


def device_clock(device: torch.device | str) -> Clock:
    """A seconds clock that waits for ``device``'s queued work before each reading."""
    device = torch.device(device)
    if device.type == "cuda":
        def cuda_clock() -> float:
            torch.cuda.synchronize(device)  # host sync: a duration that feeds a decision must be the device's
            return time.perf_counter()

        return cuda_clock
    if device.type == "mps":
        def mps_clock() -> float:
            torch.mps.synchronize()
            return time.perf_counter()

        return mps_clock
    return time.perf_counter
