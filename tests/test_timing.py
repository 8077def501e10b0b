"""Durations on the device's clock (dspark.timing), issue 29 item 7: on a GPU a host timestamp
after a launch misses the work, so every duration that feeds the scheduler or a report is read
after the device finished. Tested here with a fake device clock."""

from __future__ import annotations

import time

import pytest
import torch

from dspark.timing import device_clock


def test_the_cpu_clock_is_perf_counter_and_cuda_waits_for_the_device(monkeypatch):
    assert device_clock("cpu") is time.perf_counter
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    clock = device_clock("cuda:1")
    clock(), clock()
    assert waited == [torch.device("cuda:1")] * 2


def test_the_engine_times_its_steps_and_feeds_the_policy_on_its_clock():
    from dspark.engine.batched import BatchEngine
    from dspark.engine.request import GenerationRequest
    from dspark.scheduling import DSparkScheduler
    from test_batch_engine import COST, dspark_drafter, mixed_requests, rich_target

    target = rich_target()
    engine = BatchEngine(target, dspark_drafter(rich=True), DSparkScheduler(COST), max_batch=2)
    readings = iter(range(0, 10**6, 2))  # a fake device clock: 2 s per reading, whatever the host did
    engine.clock = lambda: float(next(readings))
    seen = []
    observe = engine.policy.observe
    engine.policy.observe = lambda outcome: seen.append(outcome) or observe(outcome)
    batch = engine.generate(mixed_requests()[:2])
    # Every step reads the clock at t0, t1, t2, after the forward, and at t3: draft 2 s, schedule 2 s,
    # forward 2 s, verify + commits 4 s (one of them the forward's), overhead = (t3 - t1) - forward = 4 s.
    assert {(s.draft_s, s.schedule_s, s.verify_s) for s in batch.stats.steps} == {(2.0, 2.0, 4.0)}
    assert {o.overhead_s for o in seen} == {4.0}
