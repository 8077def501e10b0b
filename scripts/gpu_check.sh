#!/usr/bin/env bash
# The GPU smoke check (see scripts/gpu_check.py for what it runs and why the targets are random-init).
#   here, once:      bash scripts/gpu_check.sh --prepare
#   on the device:   bash scripts/gpu_check.sh --device cuda --out "$OUT"   (the device tool's run, carry .gpu_check)
#   here, a test:    bash scripts/gpu_check.sh --device cpu --tiny --out /tmp/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
