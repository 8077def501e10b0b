"""Load on `dspark serve`: latency, time to first token, throughput and τ against concurrency.

One server per policy (the engine built by `dspark.engine.build`, as `dspark serve` builds
it, with ``max_batch`` = the largest level) runs in this process on a free loopback port;
for each concurrency level c, c clients send streamed chat completions (``stream_options:
include_usage``) back to back until ``--requests`` have been sent or ``--max-seconds`` have
passed. Prompts are the first turns of the built-in eval sets' test splits, interleaved,
the same for every policy and level. Each level first sends c short warm-up requests.

Per (policy, c): p50 / p99 end-to-end latency and time to first token (first content
chunk), aggregate tokens/s (completion tokens over the level's wall time), mean per-request
tokens/s, mean τ from each answer's ``dspark`` object, and at T = 0 how many answers equal
plain decoding's. Writes JSON (machine, git commit, settings) and a PNG.

    .venv/bin/python benchmarks/speed/bench_serve.py                                   # c = 1 4 16, 64 requests
    .venv/bin/python benchmarks/speed/bench_serve.py --requests 8 --max-tokens 16      # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dspark.evaluation.datasets import load_dataset
from dspark.evaluation.provenance import git_state, machine_info, write_report

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "serve" / "serve.json"
DEFAULT_DATASETS = ["gsm8k", "humaneval", "mbpp", "mt-bench"]
REFERENCE = "plain"
MODEL_NAME = "served"


@dataclass
class Answer:
    """One request as its client saw it."""

    index: int
    latency_s: float = 0.0
    ttft_s: float | None = None
    completion_tokens: int = 0
    tau: float | None = None
    text: str = ""
    error: str | None = None


@dataclass
class Row:
    """One policy at one concurrency level."""

    policy: str
    concurrency: int
    requests: int = 0
    errors: int = 0
    first_error: str | None = None
    """What the first failed request said (e.g. a prompt longer than --max-model-len)."""
    truncated: bool = False
    """The level stopped at --max-seconds before sending --requests."""
    wall_s: float = 0.0
    completion_tokens: int = 0
    tokens_per_s: float = 0.0
    per_request_tokens_per_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p99_s: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    mean_tau: float = 0.0
    identical_to_plain: int | None = None
    texts: list[str] = field(default_factory=list, repr=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--policies", nargs="+", default=["dspark", REFERENCE], help="plain | fixed[:γ] | gamma1 | dspark")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (bounded)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop sending at a level after this long")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS)
    parser.add_argument("--model", default=None, help="target spec; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--drafter", default=None, help="drafter spec; default: the shipped DSpark drafter")
    parser.add_argument("--max-model-len", type=int, default=1024, help="tokens per slot")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (part of the cost table's key)")
    parser.add_argument("--profile-dir", type=Path, default=None)
    parser.add_argument("--no-profile", action="store_true", help="fail instead of profiling when no cost table fits")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file; the PNG goes beside it")
    args = parser.parse_args(argv)
    if any(c < 1 for c in args.concurrency) or args.requests < 1 or args.max_tokens < 1:
        parser.error("--concurrency levels, --requests and --max-tokens must be >= 1")
    if args.max_seconds <= 0:
        parser.error("--max-seconds must be > 0")
    return args


def prompts(args) -> list[str]:
    """First turns, round-robin over the datasets, enough for one level."""
    per_set = -(-args.requests // len(args.datasets))
    sets = [load_dataset(spec, split="test", limit=per_set, max_turns=1) for spec in args.datasets]
    out = []
    for i in range(args.requests):
        d = sets[i % len(sets)]
        out.append(d.conversations[(i // len(sets)) % len(d.conversations)].turns[0])
    return out


class Server:
    """The app in a uvicorn thread on a free loopback port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise SystemExit("error: the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


async def ask(http, url: str, index: int, prompt: str, args) -> Answer:
    """One streamed chat completion, timed from send to the last chunk."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": index, "stream": True, "stream_options": {"include_usage": True}}
    answer, parts = Answer(index), []
    start = time.perf_counter()
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                answer.error = f"{response.status_code}: {(await response.aread()).decode()[:200]}"
                return answer
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    answer.error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        answer.ttft_s = answer.ttft_s or time.perf_counter() - start
                        parts.append(choice["delta"]["content"])
                if chunk.get("usage"):
                    answer.completion_tokens = chunk["usage"]["completion_tokens"]
                    answer.tau = chunk["dspark"]["tau"]
    except Exception as exc:  # a benchmark records a failed request and goes on
        answer.error = f"{type(exc).__name__}: {exc}"
    answer.latency_s = time.perf_counter() - start
    answer.text = "".join(parts)
    return answer


async def level(url: str, c: int, texts: list[str], args, warm_up: bool = False) -> tuple[list[Answer], float, bool]:
    """c clients back to back over ``texts``; stops sending after --max-seconds."""
    import httpx

    todo = list(enumerate(texts))
    answers: list[Answer] = []
    start = time.perf_counter()
    truncated = False

    async def client(http) -> None:
        nonlocal truncated
        while todo:
            if time.perf_counter() - start > args.max_seconds:
                truncated = True
                return
            index, prompt = todo.pop(0)
            answers.append(await ask(http, url, index, prompt, args))

    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(c)))
    return sorted(answers, key=lambda a: a.index), time.perf_counter() - start, truncated


def summarize(policy: str, c: int, answers: list[Answer], wall_s: float, truncated: bool) -> Row:
    ok = [a for a in answers if a.error is None]
    latency = sorted(a.latency_s for a in ok) or [0.0]
    ttft = sorted(a.ttft_s for a in ok if a.ttft_s is not None) or [0.0]
    tokens = sum(a.completion_tokens for a in ok)
    taus = [a.tau for a in ok if a.tau is not None]
    return Row(
        policy=policy, concurrency=c, requests=len(answers), errors=len(answers) - len(ok),
        first_error=next((a.error for a in answers if a.error is not None), None), truncated=truncated,
        wall_s=wall_s, completion_tokens=tokens, tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        per_request_tokens_per_s=statistics.fmean([a.completion_tokens / a.latency_s for a in ok if a.latency_s > 0] or [0.0]),
        latency_p50_s=percentile(latency, 50), latency_p99_s=percentile(latency, 99),
        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
        mean_tau=statistics.fmean(taus) if taus else 0.0, texts=[a.text if a.error is None else None for a in answers],
    )


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def run(args) -> dict:
    import torch

    from dspark.drafters import resolve_drafter
    from dspark.engine.build import PLAIN, build_engine, drafter_calibration
    from dspark.serving.app import build_app
    from dspark.serving.config import ServeSettings
    from dspark.target import TargetModel

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    texts = prompts(args)
    load_avg_start = os.getloadavg()
    target = TargetModel.load(args.model, device=args.device)
    target.warm_up()
    most = max(args.concurrency)
    spec = resolve_drafter(args.drafter, target.name)  # as `dspark serve` reads it
    rows: list[Row] = []
    for policy in args.policies:
        engine = build_engine(target, spec, policy, most, profile_dir=args.profile_dir,
                              profile_if_missing=not args.no_profile)
        settings = ServeSettings(MODEL_NAME, args.max_model_len, max_queue=max(64, 2 * most),
                                 drafter=engine.drafter.name, policy=engine.policy.name)
        calibrate = None if policy == PLAIN else drafter_calibration(spec)
        with Server(build_app(engine, target, settings, calibrate)) as server:
            for c in args.concurrency:
                print(f"{policy}: c = {c} ...", file=sys.stderr, flush=True)
                warm = argparse.Namespace(**{**vars(args), "max_tokens": 4})
                asyncio.run(level(server.url, c, texts[:c], warm))
                answers, wall_s, truncated = asyncio.run(level(server.url, c, texts, args))
                rows.append(summarize(policy, c, answers, wall_s, truncated))
    if args.temperature == 0 and REFERENCE in args.policies:
        plain = {r.concurrency: r.texts for r in rows if r.policy == REFERENCE}
        for r in rows:
            reference = plain[r.concurrency]
            r.identical_to_plain = sum(a is not None and a == b for a, b in zip(r.texts, reference))
    return {
        "benchmark": "serve",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "benchmarks/speed/bench_serve.py", *sys.argv[1:]]),
        "machine": {**machine_info(target), "load_avg_start": load_avg_start, "load_avg_end": os.getloadavg()},
        "git": git_state(),
        "model": target.name,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [{k: v for k, v in asdict(r).items() if k != "texts"} for r in rows],
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = [("tokens_per_s", "aggregate tokens/s"), ("latency_p50_s", "latency p50 / p99 (s)"),
              ("ttft_p50_s", "time to first token p50 / p99 (s)"), ("mean_tau", "mean τ")]
    for policy in report["settings"]["policies"]:
        rs = sorted((r for r in report["rows"] if r["policy"] == policy), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rs]
        for ax, (key, label) in zip(axes, panels):
            line, = ax.plot(cs, [r[key] for r in rs], "o-", label=policy)
            if key.endswith("_p50_s"):
                ax.plot(cs, [r[key.replace("p50", "p99")] for r in rs], "x--", color=line.get_color(), alpha=0.6)
            ax.set(xlabel="concurrent clients", ylabel=label, xscale="log")
    for ax in axes:
        ax.set_xticks(report["settings"]["concurrency"], [str(c) for c in report["settings"]["concurrency"]])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s, m = report["settings"], report["machine"]
    fig.suptitle(f"dspark serve · {report['model']} · {s['max_tokens']} max tokens · T={s['temperature']:g} · "
                 f"{m['device']}, {m['torch_num_threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dspark serve · {report['model']}")
    for name in ["policy", "c", "requests", "errors", "tok/s", "p50 s", "p99 s", "ttft p50", "ttft p99", "τ", "== plain"]:
        table.add_column(name, justify="left" if name == "policy" else "right")
    for r in report["rows"]:
        same = "" if r["identical_to_plain"] is None else f"{r['identical_to_plain']}/{r['requests']}"
        table.add_row(r["policy"], str(r["concurrency"]), f"{r['requests']}" + (" (cut)" if r["truncated"] else ""),
                      str(r["errors"]), f"{r['tokens_per_s']:.1f}", f"{r['latency_p50_s']:.2f}", f"{r['latency_p99_s']:.2f}",
                      f"{r['ttft_p50_s']:.3f}", f"{r['ttft_p99_s']:.3f}", f"{r['mean_tau']:.2f}", same)
    Console(width=130).print(table)
    for r in report["rows"]:
        if r["first_error"]:
            print(f"{r['policy']} c={r['concurrency']}: {r['errors']} failed, first: {r['first_error']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    write_report(args.out, run(args), plot=plot, table=print_table)


if __name__ == "__main__":
    main()
