#!/usr/bin/env bash
# Issue 25's benchmarks of n-gram lookup scheduled on its online confidences and the hybrid
# dspark+ngram, on the default target at one thread (each step resumes from its journal):
#
#   STEPS="eval_t0 eval_t1 concurrency gemma_t0 demo" bash benchmarks/recipes/hybrid_benchmarks.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DS=.venv/bin/dspark
PY=.venv/bin/python
STEPS=${STEPS:-"eval_t0 eval_t1 concurrency gemma_t0 demo"}
LIMIT=${LIMIT:-30}
DRAFTERS=(--drafter ngram --drafter dspark --drafter dspark+ngram)

for step in $STEPS; do
  case $step in
    eval_t0|eval_t1)  # the product path (batched engine at one request), interleaved with plain decoding;
      # lookup keeps its store of earlier turns (default --lookup-store)
      t=${step#eval_t}
      $DS eval --limit "$LIMIT" --max-new-tokens 128 --turns 1 --policy auto "${DRAFTERS[@]}" \
        --temperature "$t" --out "benchmarks/results/eval_t${t}_store" ;;
    concurrency)  # every policy over the hybrid's blocks, c = 1..16
      $PY benchmarks/speed/bench_concurrency.py --drafter dspark+ngram --policies plain gamma1 fixed:7 dspark \
        --concurrency 1 2 4 8 16 --repeats 2 --out benchmarks/results/concurrency_hybrid.json ;;
    concurrency_long)  # c = 8 and 16 with three times the requests: the tail where the last requests run alone weighs less
      $PY benchmarks/speed/bench_concurrency.py --drafter dspark+ngram --policies plain gamma1 dspark \
        --concurrency 8 16 --waves 6 --repeats 2 --out benchmarks/results/concurrency_hybrid_waves6.json ;;
    gemma_t0)  # Gemma 3 270M: the hybrid against lookup alone
      $DS eval --model gemma3-270m --limit "${GEMMA_LIMIT:-10}" --max-new-tokens 128 --turns 1 --policy auto \
        --drafter ngram --drafter dspark+ngram --temperature 0 --out benchmarks/results/eval_gemma3_t0_hybrid ;;
    demo)  # make demo's command (the default drafter), three times back to back, and their median
      runs=()
      for i in 1 2 3; do
        runs+=("$($DS generate "Write a Python function that checks whether a number is prime." --max-new-tokens 128 \
          --compare --json)")
      done
      printf '%s\n' "${runs[@]}" | $PY -c '
import json, statistics, sys, datetime, subprocess
runs = [json.loads(line) for line in sys.stdin if line.strip()]
speedups = [r["speedup"] for r in runs]
out = {"benchmark": "demo", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "command": "OMP_NUM_THREADS=1 .venv/bin/dspark generate \"Write a Python function that checks whether a number is prime.\" --max-new-tokens 128 --compare --json (make demo without --json), three times back to back",
       "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
       "median_speedup": statistics.median(speedups), "speedups": speedups, "runs": runs}
json.dump(out, open("benchmarks/results/demo.json", "w"), indent=1)
print("demo speedups", speedups, "median", out["median_speedup"])
' ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
