#!/usr/bin/env bash
# Grow the committed regenerated stores from the prompt pool: greedy first, then T = 0.8.
#
# Every command resumes by prompt id (a kill loses at most one shard of 64 answers), so
# rerunning this script continues where it stopped; a second copy is refused by the store's
# lock. One thread, niced: the machine is shared. Start, check, stop:
#
#   nohup benchmarks/recipes/grow_data.sh >> runs/logs/regen.log 2>&1 & echo $! > runs/logs/regen.pid
#   tail -c 2000 runs/logs/regen.log; .venv/bin/dspark data summary data/smollm2-135m-instruct/*
#   kill -- -"$(ps -o pgid= "$(cat runs/logs/regen.pid)" | tr -d ' ')"   # the script and its child
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"  # one progress line per 30 s in the log
renice -n 10 $$ > /dev/null

POOL=data/prompts/pool.jsonl
STORES=data/smollm2-135m-instruct
COMMON=(--prompts "$POOL" --max-new-tokens 256 --batch-size 32 --shard-size 64 --device cpu)

echo "== $(date -Is) greedy"
.venv/bin/dspark data regen "${COMMON[@]}" --store "$STORES/regen-greedy" --temperature 0
echo "== $(date -Is) T = 0.8, top-p 0.95"
.venv/bin/dspark data regen "${COMMON[@]}" --store "$STORES/regen-t0.8" --temperature 0.8 --top-p 0.95
echo "== $(date -Is) done"
