#!/usr/bin/env bash
# Every result docs/results.md quotes as current, in the order they depend on each other. Run on
# an otherwise idle machine from the repository root (many hours on two CPU cores):
#
#     bash benchmarks/recipes/release.sh
#     STEPS="hybrid guidellm" bash benchmarks/recipes/release.sh     # some steps only
#     DRY_RUN=1 bash benchmarks/recipes/release.sh                   # print the commands, run nothing
#
# hybrid     the product-path evals at T = 0 and 1, the concurrency sweep, Gemma 3, make demo
# drafter    v6's calibration (over the shipped calibration.json), held-out τ against v5, llama.cpp
#            parity; needs runs/v6_qwen3 and runs/v5 (benchmarks/recipes/smollm2_qwen3_drafter.sh)
# guidellm   guidellm against dspark serve
# baselines  the DFlash and EAGLE-3 rows (restores their weights from git history first)
# costs      what a round costs on this machine, then what a speedup needs
#
# Not here: the one-off design measurements (cpu_linear, dtype, generation_backends), the Gemma
# drafter's own calibration and eval (docs/drafters/gemma3-270m-dspark.md) and the scaling study,
# which needs the scaling runs' checkpoints (docs/results.md#studies).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DS=.venv/bin/dspark
PY=.venv/bin/python
R=benchmarks/results
STEPS=${STEPS:-"hybrid drafter guidellm baselines costs"}
EVAL=(--limit 30 --max-new-tokens 128 --turns 1 --policy auto)

run() {
  echo "+ $*"
  if [ -z "${DRY_RUN:-}" ]; then "$@"; fi
}

for step in $STEPS; do
  case $step in
    hybrid)
      run env STEPS="eval_t0 eval_t1 concurrency gemma_t0 demo" bash benchmarks/recipes/hybrid_benchmarks.sh ;;
    drafter)
      run env STEPS="calibrate heldout parity" bash benchmarks/recipes/smollm2_qwen3_drafter.sh ;;
    guidellm)
      run $PY benchmarks/speed/bench_guidellm.py ;;
    baselines)
      run bash benchmarks/checkpoints/restore.sh
      for t in 0 1; do
        run $DS eval "${EVAL[@]}" --drafter dflash:benchmarks/checkpoints/smollm2-dflash-scaling-270 \
          --temperature $t --out $R/eval_t${t}_dflash
        run $DS eval "${EVAL[@]}" --drafter eagle3:benchmarks/checkpoints/smollm2-eagle3-scaling-270 \
          --temperature $t --out $R/eval_t${t}_eagle3
      done ;;
    costs)
      run $PY benchmarks/speed/bench_round_cost.py --out $R/round_cost.json
      run $PY benchmarks/studies/speedup_reach.py ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
