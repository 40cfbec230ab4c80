#!/usr/bin/env bash
# The GPU benchmark in one device call (issue 11; docs/accelerators.md §6); estimated, not yet
# measured: 7 to 9 minutes on one H100/H200. Prepare it here with `bash benchmarks/gpu_bundle.sh MLORE_CHECKOUT
# MTLORA_CHECKOUT`, then, with the device tool:
#   run(command='bash benchmarks/gpu_run.sh', carry=['benchmarks/wheels',
#       'benchmarks/reference_code'], timeout_s=590)
# 1. versions and the device; 2. gpu_suite.py --smoke (seconds) with the image's flax/optax,
# then, while it fails, with XLA attention and with the pinned wheels; 3. the suite with both
# originals, in the setting that passed. Everything printed is also in $OUT/gpu_suite.log and
# the summary in $OUT/gpu_suite.json. Extra arguments go to the last gpu_suite.py call
# (`bash benchmarks/gpu_run.sh --smoke` checks it all on CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG=$OUT/gpu_suite.log
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
for d in benchmarks/wheels benchmarks/reference_code/mlore benchmarks/reference_code/mtlora; do
  [ -d "$d" ] || { echo "error: $d missing: run benchmarks/gpu_bundle.sh and carry it" | tee -a "$LOG"; exit 2; }
done

{ date -u; uptime; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import importlib, sys, jax
print("python", sys.version.split()[0], *(m + " " + importlib.import_module(m).__version__
      for m in ("jax", "flax", "optax", "numpy", "torch")))
print(jax.devices())'; } 2>&1 | tee -a "$LOG"

# The smoke run picks the first setting that works: the image's flax/optax or the pinned wheels,
# each with the ViT attention's default (cuDNN in bf16) and then with XLA's.
pinned() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pinned \
    benchmarks/wheels/pinned/*.whl && export PYTHONPATH=/tmp/pinned${PYTHONPATH:+:$PYTHONPATH}
}
ok=
for setting in image:auto image:xla pinned:auto pinned:xla; do
  packages=${setting%%:*} ATTENTION=${setting##*:}
  if [ "$packages" = pinned ] && [ -z "${PINNED:-}" ]; then pinned || exit 1; PINNED=1; fi
  if timeout 300 "$PY" benchmarks/gpu_suite.py --smoke --steps=2 --attention="$ATTENTION" \
      > "$OUT/smoke_$packages-$ATTENTION.log" 2>&1; then
    ok=1; break
  fi
  { echo "== smoke failed with $packages flax/optax, attention $ATTENTION:"
    tail -25 "$OUT/smoke_$packages-$ATTENTION.log"; } | tee -a "$LOG"
done
[ -n "$ok" ] || exit 1
{ echo "== smoke ($packages flax/optax, attention $ATTENTION)"
  grep -v '^{' "$OUT/smoke_$packages-$ATTENTION.log" | tail -4; } | tee -a "$LOG"

echo "== suite" | tee -a "$LOG"
"$PY" benchmarks/gpu_suite.py --budget_s="${BUDGET_S:-90}" --steps=10 --attention="$ATTENTION" \
  --mlore_checkout=benchmarks/reference_code/mlore \
  --mtlora_checkout=benchmarks/reference_code/mtlora "$@" 2>&1 | tee -a "$LOG"
status=$?
grep '^{"rows"' "$LOG" | tail -1 > "$OUT/gpu_suite.json"
exit $status
