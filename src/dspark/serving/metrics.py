"""The server's Prometheus metrics, in vLLM's names with a ``dspark:`` prefix.

Speculative decoding, counted per request and verification round (a *draft* is one round
that verified at least one drafted token; *draft tokens* are the ℓ drafted tokens a round
verified; *accepted tokens* are those that survived; ``position`` k is the (k+1)-th draft
slot, 0-based as in vLLM):

- ``dspark:spec_decode_num_drafts``, ``..._num_draft_tokens``, ``..._num_accepted_tokens``
  and ``..._num_accepted_tokens_per_pos{position}`` (counters);
- ``dspark:spec_decode_mean_accepted_length`` τ (tokens committed per request and step,
  accepted + 1) and ``dspark:spec_decode_mean_verify_length`` ℓ, over the server's life;
- predicted against realised acceptance per slot: the prefix survival a_k = ∏_{i≤k} c_i of
  the calibrated confidences (the drafter's STS calibration, the map the scheduler applies
  before its online survival scale) against whether x_1..x_k were all accepted, over rounds
  that verified slot k: ``dspark:acceptance_predicted{position}``,
  ``dspark:acceptance_realised{position}`` and ``dspark:acceptance_calibration_error{position}``,
  the running expected calibration error (ECE, 10 equal-width bins of a_k);
- with ``dspark serve --metrics-compat vllm``, the same counts under vLLM's own names and
  labels too (``vllm:spec_decode_num_drafts_total{model_name, engine}``, ``..._num_draft_tokens``,
  ``..._num_accepted_tokens``, ``..._num_accepted_tokens_per_pos{position}``), which the
  field's benchmark clients read;
- per source of a hybrid drafter (``source`` = ``ngram`` or ``dspark``):
  ``dspark:spec_decode_source_num_drafts``, ``..._source_num_draft_tokens``,
  ``..._source_num_accepted_tokens`` and ``dspark:source_acceptance_calibration_error{position}``.

Load: ``dspark:num_requests_running``, ``dspark:num_requests_waiting`` (the queue),
``dspark:generation_tokens_per_second`` (over the last ``RATE_WINDOW_S``), token and request
counters, and histograms of time to first token, time per output token and end-to-end latency.

Each server has its own registry, so several can live in one process (the tests).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Sequence

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from dspark.engine.request import GenerationResult
from dspark.engine.stats import RoundRecord, StepRecord
from dspark.scheduling.policy import Calibrate

RATE_WINDOW_S = 10.0
"""Seconds of history behind the tokens/s gauge."""
ECE_BINS = 10
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class SlotCalibration:
    """Running predicted-vs-realised acceptance of one draft slot, binned by prediction."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.count = [0] * bins
        self.predicted = [0.0] * bins
        self.realised = [0.0] * bins

    def add(self, predicted: float, survived: bool) -> None:
        b = min(len(self.count) - 1, max(0, int(predicted * len(self.count))))
        self.count[b] += 1
        self.predicted[b] += predicted
        self.realised[b] += float(survived)

    @property
    def n(self) -> int:
        return sum(self.count)

    def mean_predicted(self) -> float:
        return sum(self.predicted) / self.n if self.n else 0.0

    def mean_realised(self) -> float:
        return sum(self.realised) / self.n if self.n else 0.0

    def ece(self) -> float:
        """Σ_bins |Σ predicted - Σ realised| / n: 0 for a calibrated slot."""
        return sum(abs(p - r) for p, r in zip(self.predicted, self.realised)) / self.n if self.n else 0.0


VLLM_ENGINE = "0"
"""The ``engine`` label of the vLLM-named counters: one engine, vLLM's index 0."""


class ServeMetrics:
    """Every metric of one server. The running sums behind the gauges are written by the
    engine loop's thread only; prometheus_client's own metrics are thread safe."""

    def __init__(self, model_name: str, calibrate: Calibrate | None = None, vllm_compat: bool = False) -> None:
        """``calibrate``: the drafter's raw c_k -> calibrated, as the scheduler applies it (None: raw).
        ``vllm_compat``: also count under vLLM's own names and labels (:data:`VLLM_ENGINE`)."""
        disable_created_metrics()  # no ``*_created`` series beside every counter (process-wide, as in vLLM)
        self.registry = registry = CollectorRegistry()
        self.calibrate = calibrate
        self.model_name = model_name
        label = ["model_name"]

        def counter(name, doc, extra=()):
            return Counter(f"dspark:{name}", doc, label + list(extra), registry=registry)

        def gauge(name, doc, extra=()):
            return Gauge(f"dspark:{name}", doc, label + list(extra), registry=registry)

        self.num_drafts = counter("spec_decode_num_drafts", "Rounds that verified at least one drafted token.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Drafted tokens sent to verification.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Drafted tokens accepted.")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Drafted tokens accepted at each draft position (0-based).", ["position"])
        self.draft_tokens_per_pos = counter("spec_decode_num_draft_tokens_per_pos",
                                            "Drafted tokens verified at each draft position (0-based).", ["position"])
        self.mean_accepted_length = gauge("spec_decode_mean_accepted_length",
                                          "τ: tokens committed per request and step (accepted + 1), server lifetime.")
        self.mean_verify_length = gauge("spec_decode_mean_verify_length",
                                        "ℓ: drafted tokens verified per request and step, server lifetime.")
        self.acceptance_predicted = gauge("acceptance_predicted",
                                          "Mean predicted prefix survival a_k of slot k over rounds verifying it.",
                                          ["position"])
        self.acceptance_realised = gauge("acceptance_realised",
                                         "Realised rate at which x_1..x_k were all accepted, rounds verifying slot k.",
                                         ["position"])
        self.calibration_error = gauge("acceptance_calibration_error",
                                       "Running ECE (10 bins) of predicted prefix survival at slot k.", ["position"])
        self.source_drafts = counter("spec_decode_source_num_drafts",
                                     "Rounds that verified drafted tokens, per source of a hybrid drafter.", ["source"])
        self.source_draft_tokens = counter("spec_decode_source_num_draft_tokens",
                                           "Drafted tokens verified, per source of a hybrid drafter.", ["source"])
        self.source_accepted_tokens = counter("spec_decode_source_num_accepted_tokens",
                                              "Drafted tokens accepted, per source of a hybrid drafter.", ["source"])
        self.source_calibration_error = gauge("source_acceptance_calibration_error",
                                              "Running ECE (10 bins) of predicted prefix survival at slot k, per "
                                              "source of a hybrid drafter.", ["source", "position"])
        self.running = gauge("num_requests_running", "Requests holding a slot.")
        self.waiting = gauge("num_requests_waiting", "Requests queued for a slot.")
        self.tokens_per_second = gauge("generation_tokens_per_second",
                                       f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.steps = counter("engine_steps", "Batched verification steps.")
        self.requests_finished = counter("request_success", "Requests answered in full.", ["finished_reason"])
        self.requests_failed = counter("request_failed", "Requests failed by an error inside the server.")
        self.requests_cancelled = counter("request_cancelled", "Requests whose client left; their slots were freed.")
        self.requests_rejected = counter("request_rejected", "Requests refused because the queue was full.")
        self.ttft = Histogram("dspark:time_to_first_token_seconds", "Time from arrival to the first token.",
                              label, buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram("dspark:time_per_output_token_seconds", "Time per output token after the first.",
                              label, buckets=TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram("dspark:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             label, buckets=E2E_BUCKETS, registry=registry)
        self.vllm = None
        if vllm_compat:  # vllm/v1/spec_decode/metrics.py:229-257 (0.33.0): names, labels [model_name, engine]
            labels = ["model_name", "engine"]
            self.vllm = {
                "drafts": Counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", labels, registry=registry),
                "draft_tokens": Counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", labels, registry=registry),
                "accepted": Counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", labels, registry=registry),
                "per_pos": Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
                                   labels + ["position"], registry=registry),
            }
        self.slots: list[SlotCalibration] = []
        self.source_slots: dict[str, list[SlotCalibration]] = {}
        self._rounds = self._accepted = self._verified = 0
        self._recent: deque[tuple[float, int]] = deque()
        self.running.labels(model_name).set(0)
        self.waiting.labels(model_name).set(0)

    def describe(self, drafter: str, policy: str, max_batch: int, max_model_len: int) -> None:
        """``dspark:server_info``: what this server runs (value 1)."""
        info = Gauge("dspark:server_info", "What this server runs.",
                     ["model_name", "drafter", "policy", "max_batch", "max_model_len"], registry=self.registry)
        info.labels(self.model_name, drafter, policy, str(max_batch), str(max_model_len)).set(1)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    # -- events from the engine loop ------------------------------------------------------
    def on_step(self, record: StepRecord | None, rounds: Sequence[RoundRecord], new_tokens: int,
                running: int, waiting: int) -> None:
        """After every session step: its rounds (one per request verified), tokens, load."""
        m = self.model_name
        now = time.perf_counter()
        self._recent.append((now, new_tokens))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()
        span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
        self.tokens_per_second.labels(m).set(sum(n for _, n in self._recent) / span if span > 0 else 0.0)
        self.generation_tokens.labels(m).inc(new_tokens)
        self.on_load(running, waiting)
        if record is None:
            return
        self.steps.labels(m).inc()
        for r in rounds:
            self._count_round(r)
        self._calibrate_rounds([r for r in rounds if r.proposed and r.confidences is not None])
        if self._rounds:
            self.mean_accepted_length.labels(m).set((self._accepted + self._rounds) / self._rounds)
            self.mean_verify_length.labels(m).set(self._verified / self._rounds)

    def _count_round(self, r: RoundRecord) -> None:
        m = self.model_name
        self._rounds += 1
        self._accepted += r.accepted
        self._verified += r.proposed
        if not r.proposed:
            return
        self.num_drafts.labels(m).inc()
        self.num_draft_tokens.labels(m).inc(r.proposed)
        self.num_accepted_tokens.labels(m).inc(r.accepted)
        for k in range(r.proposed):
            self.draft_tokens_per_pos.labels(m, str(k)).inc()
            if k < r.accepted:
                self.accepted_per_pos.labels(m, str(k)).inc()
        if self.vllm is not None:
            self.vllm["drafts"].labels(m, VLLM_ENGINE).inc()
            self.vllm["draft_tokens"].labels(m, VLLM_ENGINE).inc(r.proposed)
            self.vllm["accepted"].labels(m, VLLM_ENGINE).inc(r.accepted)
            for k in range(r.accepted):
                self.vllm["per_pos"].labels(m, VLLM_ENGINE, str(k)).inc()
        if r.source:
            self.source_drafts.labels(m, r.source).inc()
            self.source_draft_tokens.labels(m, r.source).inc(r.proposed)
            self.source_accepted_tokens.labels(m, r.source).inc(r.accepted)

    def _calibrate_rounds(self, rounds: list[RoundRecord]) -> None:
        """Add each round's predicted a_k and realised survival to its slots' running ECE."""
        if not rounds:
            return
        width = max(r.proposed for r in rounds)
        conf = torch.full((len(rounds), width), 0.5)  # [R, W]; padding is never read
        for i, r in enumerate(rounds):
            conf[i, : r.proposed] = r.confidences[: r.proposed].detach().float().cpu()
        c = self.calibrate(conf) if self.calibrate is not None else conf
        survival = torch.cumprod(c.float().clamp(0.0, 1.0), dim=1).tolist()  # one host copy per step
        while len(self.slots) < width:
            self.slots.append(SlotCalibration())
        for r, a in zip(rounds, survival):
            by_source = self.source_slots.setdefault(r.source, []) if r.source else None
            while by_source is not None and len(by_source) < r.proposed:
                by_source.append(SlotCalibration())
            for k in range(r.proposed):
                self.slots[k].add(a[k], r.accepted > k)
                if by_source is not None:
                    by_source[k].add(a[k], r.accepted > k)
        m = self.model_name
        for source, slots in self.source_slots.items():
            for k, slot in enumerate(slots):
                self.source_calibration_error.labels(m, source, str(k)).set(slot.ece())
        for k in range(width):
            slot = self.slots[k]
            self.acceptance_predicted.labels(m, str(k)).set(slot.mean_predicted())
            self.acceptance_realised.labels(m, str(k)).set(slot.mean_realised())
            self.calibration_error.labels(m, str(k)).set(slot.ece())

    def on_load(self, running: int, waiting: int) -> None:
        """Slots in use and requests queued, after every step and every inbox (a cancel)."""
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    def on_admit(self, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)

    def on_finish(self, result: GenerationResult, ttft_s: float | None, e2e_s: float) -> None:
        m = self.model_name
        self.requests_finished.labels(m, result.finish_reason).inc()
        self.e2e.labels(m).observe(e2e_s)
        if ttft_s is not None:
            self.ttft.labels(m).observe(ttft_s)
            if len(result.token_ids) > 1:
                self.tpot.labels(m).observe((e2e_s - ttft_s) / (len(result.token_ids) - 1))

    def on_failed(self) -> None:
        self.requests_failed.labels(self.model_name).inc()

    def on_cancelled(self) -> None:
        self.requests_cancelled.labels(self.model_name).inc()

    def on_rejected(self) -> None:
        self.requests_rejected.labels(self.model_name).inc()
