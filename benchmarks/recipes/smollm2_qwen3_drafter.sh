#!/usr/bin/env bash
# The shipped SmolLM2 drafter (v6, Qwen3 backbone), from the committed data, and the measurements
# made for it, in order (docs/drafters/smollm2-135m-instruct-dspark.md). Each step resumes (train
# and eval keep their progress) and can be run alone: STEPS="eval_t0 parity" bash <this script>.
# eval_t0 / eval_t1 measure v6 alone (eval_t{0,1}_v6, not kept: the current v6 rows are the
# `dspark` rows of the hybrid evals, benchmarks/recipes/hybrid_benchmarks.sh).
#
# v6 is v5 (the previous shipped drafter, Llama backbone; git show 985a9b6:src/dspark/assets/...)
# warm-started into a Qwen3 backbone (q/k norms start at 1) and trained on the target's own
# answers in the committed stores. Runs at one thread; RUNS holds the run and exports.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DS=.venv/bin/dspark
PY=.venv/bin/python
RUNS=${RUNS:-runs}
V5=${V5:-$RUNS/v5}                      # v5 as shipped: git show 985a9b6:<path> for each of its three files
SHIPPED=src/dspark/assets/drafters/smollm2-135m-instruct-dspark
DATA=(--data data/smollm2-135m-instruct/regen-greedy --data data/smollm2-135m-instruct/regen-t0.8)
STEPS=${STEPS:-"train export calibrate heldout eval_t0 eval_t1 parity"}

for step in $STEPS; do
  case $step in
    train)  # ~45 min at 4.5 s a step on one core
      $DS train "${DATA[@]}" --out $RUNS/v6_qwen3 --variant dspark --layer-family qwen3 --steps 600 --batch-size 4 \
        --anchors 64 --draft-vocab 8192 --max-length 512 --lr 3e-4 --init-from "$V5" --save-every 50 --log-every 5 ;;
    export)  # the best held-out checkpoint, fp16, over the shipped one
      $PY -c "import sys, torch; from dspark.drafters.dspark import DSparkModel; \
DSparkModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.float16)" $RUNS/v6_qwen3/best $SHIPPED ;;
    calibrate)  # STS on the calibration split; writes calibration.json beside the weights
      $DS calibrate --overwrite-shipped --limit 5 --max-new-tokens 128 --temperature 0 --out benchmarks/results/calibration_v6 ;;
    heldout)  # v5 and v6 on the run's held-out batches
      $PY benchmarks/studies/heldout_compare.py --run $RUNS/v6_qwen3 "${DATA[@]}" --drafter "$V5" --drafter $SHIPPED \
        --out benchmarks/results/heldout_v5_v6.json ;;
    eval_t0)  # the product path, interleaved with plain decoding
      $DS eval --limit 30 --max-new-tokens 128 --turns 1 --policy auto --drafter dspark \
        --temperature 0 --out benchmarks/results/eval_t0_v6 ;;
    eval_t1)
      $DS eval --limit 30 --max-new-tokens 128 --turns 1 --policy auto --drafter dspark \
        --temperature 1 --out benchmarks/results/eval_t1_v6 ;;
    parity)  # llama.cpp built once into ~/.cache/dspark/llama.cpp (about 7 minutes)
      $PY benchmarks/speed/llamacpp_parity.py --limit 10 --out benchmarks/results/llamacpp_parity.json ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
