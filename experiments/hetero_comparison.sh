#!/usr/bin/env bash
# HSplitLoRA vs baselines on SmolLM2-135M with E2E, 5 clients with budgets in the ratio of
# the paper's 5-20 GB spread (emulated on the model, runner.hetero.emulated_devices).
# Same seed, steps and data for every method; results feed docs/results.md.
#
#   STEPS=30 BATCH=4 PARALLEL=2 bash experiments/hetero_comparison.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=${DATA:-../shared/data/e2e/devset.csv}
STEPS=${STEPS:-30}
BATCH=${BATCH:-4}
SEED=${SEED:-0}
OUT=${OUT:-runs/hetero}
MAX_MRS=${MAX_MRS:-30}
PARALLEL=${PARALLEL:-1}
METHODS=${METHODS:-"hsplitlora splitlora hetlora fedlora cenlora"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MALLOC_MMAP_THRESHOLD_=65536

one() {
  local m=$1 fed="--clients 5 --agg-interval 5"
  # the central methods pool the data: no clients, nothing to aggregate (`testbed train`
  # refuses an option a method does not use)
  case $m in cenlora|ft) fed="" ;; esac
  # shellcheck disable=SC2086
  $BIN/testbed train --method "$m" --model smollm2-135m --data "$DATA" $fed \
    --steps "$STEPS" --batch-size "$BATCH" --eval-every "${EVAL_EVERY:-10}" \
    --eval-max-examples 128 --seed "$SEED" --out "$OUT/$m" --overwrite
  $BIN/testbed eval "$OUT/$m" --max-mrs "$MAX_MRS"
}
mkdir -p "$OUT"
export -f one
export BIN DATA STEPS BATCH SEED OUT MAX_MRS
printf '%s\n' $METHODS | xargs -P "$PARALLEL" -I{} bash -c 'one {} > "$OUT/{}.log" 2>&1 || echo "{} failed (see $OUT/{}.log)"' 
$BIN/testbed report $(printf "$OUT/%s " $METHODS) -o "$OUT/report.md" --baseline splitlora
