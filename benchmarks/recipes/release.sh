#!/usr/bin/env bash
# The measurements the README quotes for the shipped drafter, in the order they depend on
# each other. Run on an otherwise idle machine from the repository root:
#
#     DFLASH=runs/export/dflash bash benchmarks/recipes/release.sh
#
# DFLASH is the same-budget DFlash baseline (not shipped; `dspark train --variant dflash`,
# see the README). Steps can be run one by one with STEPS="calibrate eval profile concurrency".
set -euo pipefail
cd "$(dirname "$0")/../.."
DS=.venv/bin/dspark
PY=.venv/bin/python
DFLASH=${DFLASH:-runs/export/dflash}
STEPS=${STEPS:-"calibrate eval profile concurrency"}
RESULTS=benchmarks/results
EVAL_ARGS=(--limit 30 --max-new-tokens 128 --turns 1 --drafter dspark --drafter "dflash:$DFLASH" --drafter ngram)

for step in $STEPS; do
  case $step in
    calibrate)  # calibration split (last 20% of each set), disjoint from eval's test split
      $DS calibrate --overwrite-shipped --limit 10 --max-new-tokens 128 --temperature 0 --out $RESULTS/calibration ;;
    eval)  # ~50 min each on 2 cores; plain decoding runs interleaved in each
      $DS eval "${EVAL_ARGS[@]}" --temperature 0 --out $RESULTS/eval_t0
      $DS eval "${EVAL_ARGS[@]}" --temperature 1 --out $RESULTS/eval_t1 ;;
    profile)
      $DS profile --repeats 7 ;;
    concurrency)
      $PY benchmarks/speed/bench_concurrency.py --waves 2 --repeats 2 --out $RESULTS/concurrency.json ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
