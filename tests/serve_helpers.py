"""A live server on a free loopback port, and the tiny chat target and drafter it serves.

The target is a random-init Llama over the default model's real tokenizer (chat template,
multi-byte tokens, a real EOS id) that generates nonsense in milliseconds; the drafter is a
random DSpark drafter with confidences, so the dspark scheduler really schedules. Both are
rebuilt from fixed seeds, so a reference engine gets the very same weights as the server's.
"""

from __future__ import annotations

import socket
import threading
import time

import torch

from conftest import tiny_llama

MODEL = "tiny-chat"
BLOCK = 4
MAX_MODEL_LEN = 128


def load_tokenizer():
    from transformers import AutoTokenizer

    from dspark.target.loading import resolve

    return AutoTokenizer.from_pretrained(resolve(None)[0])


def chat_target(tokenizer):
    from dspark.target import TargetModel

    return TargetModel(tiny_llama(vocab_size=len(tokenizer), hidden=16, layers=3, scale=4.0), tokenizer, name=MODEL)


def chat_drafter(target, seed: int = 11):
    from dspark.drafters.dspark import DSparkConfig, DSparkDrafter, DSparkModel

    torch.manual_seed(seed)
    config = DSparkConfig.for_target(target, num_hidden_layers=1, markov_rank=4, block_size=BLOCK, target_layer_ids=(0, 1))
    model = DSparkModel(config)
    with torch.no_grad():  # confidences that vary around σ(1), so the scheduler verifies some drafts
        model.confidence_head.proj.weight.normal_(std=0.5)
    return DSparkDrafter(model)


def flat_cost():
    from dspark.scheduling import FlatCost

    # Each extra verified token costs 1/16 of a plain step: drafts pay when confident.
    return FlatCost([1.0 / (1.0 + b / 16) for b in range(1, 1025)])


def build(target, policy: str = "dspark", max_batch: int = 8):
    """An engine through the composition root, as the CLI builds it (with a fixed cost table)."""
    from dspark.engine.build import build_engine
    from dspark.scheduling import DSparkScheduler, FixedGamma

    if policy == "plain":
        return build_engine(target, None, "plain", max_batch)
    chosen = DSparkScheduler(flat_cost()) if policy == "dspark" else FixedGamma()
    return build_engine(target, chat_drafter(target), chosen, max_batch)


class LiveServer:
    """uvicorn in a thread on a free loopback port; ``stop`` shuts it down gracefully."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def loop(self):
        return self.app.state.loop

    def client(self, api_key: str = "none", **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)


def serve(target, engine, calibrate=None, **settings):
    """A :class:`LiveServer` over ``engine`` (not started)."""
    from dspark.serving.app import build_app
    from dspark.serving.config import ServeSettings

    settings = {"max_model_len": MAX_MODEL_LEN, "drafter": engine.drafter.name, "policy": engine.policy.name, **settings}
    return LiveServer(build_app(engine, target, ServeSettings(model_name=MODEL, **settings), calibrate))


def metric(url: str, name: str, **labels) -> float | None:
    """One sample of the server's /metrics (summed over label sets matching ``labels``)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    found = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found = (found or 0.0) + sample.value
    return found


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
