#!/usr/bin/env bash
# A small DSpark drafter for Gemma 3 270M on data that target generated (issue 13).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 TQDM_MININTERVAL=30
.venv/bin/dspark train --model gemma3-270m \
  --data data/gemma3-270m/regen-greedy --data data/gemma3-270m/regen-t0.8 \
  --out runs/gemma_dspark --variant dspark --layer-family gemma3 --num-layers 1 --draft-vocab 8192 --markov-w1 draft \
  --batch-size 4 --anchors 32 --max-length 384 --steps "${STEPS:-170}" --save-every 50 --log-every 10
