"""`dspark serve` driven by guidellm, a load generator users already point at vLLM.

guidellm 0.8.1 lives in its own environment (``--bench-venv``, made on first use: torch is
pinned to the CPU wheel first, since guidellm requires torch and an unpinned one is a CUDA
build). For each policy one server runs (``dspark serve --metrics-compat vllm``, the default
target and drafter unless given), and guidellm runs its ``concurrent`` profile at each level
(synthetic chat prompts of ``--prompt-tokens``, ``--output-tokens`` each with ``ignore_eos``,
at most ``--requests-per-stream`` × c requests per level) against it. Around each level the
server's ``/metrics`` is read, and acceptance is computed as a dashboard would from vLLM's
counters: accepted / draft tokens and 1 + accepted / drafts.

Writes guidellm's own JSON report per level under ``--out`` (``<policy>-c<c>.guidellm.json.gz``),
the Prometheus text before and after each level, and ``summary.json`` + ``summary.png``:
per (policy, c) the output tokens/s, TTFT and TPOT medians from guidellm's report and the
acceptance from the counters.

    .venv/bin/python benchmarks/speed/bench_guidellm.py                                  # dspark and plain, c = 1 4 16
    .venv/bin/python benchmarks/speed/bench_guidellm.py --policies plain --streams 1 --requests-per-stream 1  # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GUIDELLM = "guidellm==0.8.1"
TORCH = "torch==2.13.0"
VLLM_COUNTERS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", default=["dspark", "plain"])
    parser.add_argument("--drafter", default=None, help="dspark serve --drafter (default: the target's shipped one)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="guidellm concurrency levels")
    parser.add_argument("--requests-per-stream", type=int, default=2, help="requests per level = this × c")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--bench-venv", type=Path, default=Path.home() / ".cache" / "dspark" / "bench-venv")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "guidellm")
    return parser.parse_args(argv)


def ensure_guidellm(venv: Path) -> Path:
    """guidellm in its own environment, installed on first use."""
    exe = venv / "bin" / "guidellm"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, GUIDELLM, TORCH], check=True)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    """The vLLM-named spec-decode counters of ``url``/metrics (summed over label sets)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = dict.fromkeys(VLLM_COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


def acceptance(before: dict, after: dict) -> dict:
    drafts, tokens, accepted = (after[k] - before[k] for k in VLLM_COUNTERS)
    return {"drafts": drafts, "draft_tokens": tokens, "accepted_tokens": accepted,
            "acceptance_rate": accepted / tokens if tokens else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None}


def serve(policy: str, args, port: int) -> subprocess.Popen:
    command = [str(REPO_ROOT / ".venv" / "bin" / "dspark"), "serve", "--policy", policy, "--port", str(port),
               "--max-batch", str(max(args.streams)), "--metrics-compat", "vllm", "--log-level", "warning"]
    if args.drafter and policy != "plain":
        command += ["--drafter", args.drafter]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"error: dspark serve --policy {policy} exited: {server.stderr.read()[-2000:]}")
            time.sleep(1)
    server.kill()
    raise SystemExit("error: the server did not come up in 300 s")


def scenario(args, port: int, streams: int, out: Path) -> dict:
    from dspark.target.loading import resolve

    return {"spec": {
        "backend": {"kind": "openai_http", "target": f"http://127.0.0.1:{port}", "model": "smollm2-135m-instruct",
                    "request_format": "/v1/chat/completions"},
        "profile": {"kind": "concurrent", "streams": streams},
        "tokenizer": {"kind": "huggingface_auto", "model": str(resolve(None)[0])},  # the default target's, offline
        "data": [{"kind": "synthetic_text", "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens}],
        "constraints": [{"kind": "max_requests", "count": streams * args.requests_per_stream}],
        "outputs": [{"kind": "json", "path": str(out)}],
    }}


def guidellm_metrics(report: dict) -> dict:
    """Output tokens/s and TTFT / TPOT medians of guidellm's report (its first benchmark)."""
    bench = report["benchmarks"][0]
    metrics = bench["metrics"]

    def median(name: str, key: str = "successful"):
        entry = metrics.get(name, {})
        entry = entry.get(key, entry) if isinstance(entry, dict) else entry
        return entry.get("median") if isinstance(entry, dict) else None

    requests = bench["requests"]
    return {
        "output_tokens_per_s": (metrics.get("output_tokens_per_second", {}).get("successful", {}) or {}).get("mean"),
        "ttft_ms_median": median("time_to_first_token_ms"),
        "tpot_ms_median": median("time_per_output_token_ms"),
        "latency_s_median": median("request_latency"),
        "successful": len(requests.get("successful") or []), "errored": len(requests.get("errored") or []),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    exe = ensure_guidellm(args.bench_venv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in args.policies:
        port = free_port()
        server = serve(policy, args, port)
        url = f"http://127.0.0.1:{port}"
        try:
            for streams in args.streams:
                report_path = args.out / f"{policy}-c{streams}.guidellm.json"
                spec = Path(tempfile.mkdtemp()) / "scenario.json"  # it names this machine's paths: not kept
                spec.write_text(json.dumps(scenario(args, port, streams, report_path), indent=1))
                before = scrape(url)
                (args.out / f"{policy}-c{streams}.before.prom").write_text(
                    urllib.request.urlopen(url + "/metrics").read().decode())
                subprocess.run([str(exe), "run", "--scenario", str(spec), "--disable-progress"], check=True,
                               stdout=subprocess.DEVNULL)
                after = scrape(url)
                (args.out / f"{policy}-c{streams}.after.prom").write_text(
                    urllib.request.urlopen(url + "/metrics").read().decode())
                from dspark.target.loading import resolve

                # guidellm's report names this machine's tokenizer folder: keep the name, not the path
                report = report_path.read_bytes().replace(str(resolve(None)[0]).encode(), b"<the default target's tokenizer>")
                report = report.replace(str(REPO_ROOT).encode() + b"/", b"")  # its own output path: repository-relative
                row = {"policy": policy, "streams": streams, **guidellm_metrics(json.loads(report)),
                       **acceptance(before, after)}
                report_path.with_suffix(".json.gz").write_bytes(gzip.compress(report))  # guidellm's own report, kept small
                report_path.unlink()
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    summary = {"benchmark": "guidellm", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": shlex.join([".venv/bin/python", "benchmarks/speed/bench_guidellm.py", *sys.argv[1:]]),
               "client": GUIDELLM, "rows": rows,
               "scenario": "guidellm's concurrent profile, openai_http backend on /v1/chat/completions, synthetic_text "
                           f"data of {args.prompt_tokens} prompt and {args.output_tokens} output tokens (ignore_eos), "
                           f"max_requests = {args.requests_per_stream} x streams, the default target's tokenizer"}
    from dspark.evaluation.provenance import git_state

    summary["git"] = git_state()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, args.out / "summary.png")
    print(markdown(summary))


def markdown(summary: dict) -> str:
    lines = ["| policy | c | output tok/s | TTFT median ms | TPOT median ms | accepted / draft tokens | mean acceptance length | ok / errors |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "–"  # noqa: E731
        lines.append(f"| {r['policy']} | {r['streams']} | {fmt(r['output_tokens_per_s'], '.1f')} | "
                     f"{fmt(r['ttft_ms_median'], '.0f')} | {fmt(r['tpot_ms_median'], '.1f')} | "
                     f"{fmt(r['acceptance_rate'], '.3f')} | {fmt(r['mean_acceptance_length'], '.2f')} | "
                     f"{r['successful']} / {r['errored']} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for policy in dict.fromkeys(r["policy"] for r in summary["rows"]):
        rows = [r for r in summary["rows"] if r["policy"] == policy]
        ax.plot([r["streams"] for r in rows], [r["output_tokens_per_s"] or 0 for r in rows], marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("guidellm concurrent streams")
    ax.set_ylabel("output tokens/s (guidellm)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
