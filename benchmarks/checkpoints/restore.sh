#!/usr/bin/env bash
# Restore the baseline checkpoints' weights (model.safetensors of the DFlash and EAGLE-3 scaling
# drafters) from git history. They left the tracked tree to keep a checkout under 60 MiB; their
# config.json and run logs stay committed beside them.
#
#     bash benchmarks/checkpoints/restore.sh
#
# Each file is taken from commit $COMMIT (`git show $COMMIT:<path> > <path>`) and checked against
# SHA256SUMS. A file already present with the right sum is left alone. Where the commit is not in
# this clone (a shallow or partial clone), try `git fetch --unshallow` first; failing that, the
# script prints the training recipe that made the checkpoint (README.md in this folder) and exits 1.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(git -C "$here" rev-parse --show-toplevel)"
cd "$here"
COMMIT=1483156574d4e6c134ec219ad201c34e840522d9   # the last commit that tracked both files
prefix="${here#"$root"/}"                          # benchmarks/checkpoints

recipe() {
  cat >&2 <<'RECIPE'
To rebuild it instead (one CPU thread; benchmarks/checkpoints/README.md has the exact commands):
  dspark data text --sharegpt --store runs/data/sharegpt-text   # then copy its first 20 shards to runs/data/sharegpt-text-20
  dspark train --data runs/data/sharegpt-text-20 --out runs/scale_<variant> --variant <dflash|eagle3> \
      --steps 360 --save-every 45 --max-length 512 --draft-vocab 8192 --anchors 64   # stop after step 270
and save runs/scale_<variant>/step_00000270 in fp16 into this folder (README.md here has the line).
RECIPE
}

failed=0
while read -r sum path; do
  [ -n "$sum" ] || continue
  if [ -f "$path" ] && [ "$(sha256sum "$path" | cut -d' ' -f1)" = "$sum" ]; then
    echo "ok       $prefix/$path (already present)"
    continue
  fi
  if ! git -C "$root" cat-file -e "$COMMIT:$prefix/$path" 2>/dev/null; then
    echo "missing  $prefix/$path: commit $COMMIT is not in this clone (try: git fetch --unshallow)" >&2
    recipe
    failed=1
    continue
  fi
  git -C "$root" show "$COMMIT:$prefix/$path" > "$path.partial"
  if [ "$(sha256sum "$path.partial" | cut -d' ' -f1)" != "$sum" ]; then
    rm -f "$path.partial"
    echo "bad sum  $prefix/$path from $COMMIT (expected $sum)" >&2
    recipe
    failed=1
    continue
  fi
  mv "$path.partial" "$path"
  echo "restored $prefix/$path from $COMMIT (sha256 ok)"
done < SHA256SUMS
exit $failed
