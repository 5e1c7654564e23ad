#!/usr/bin/env bash
# The whole pipeline on the bundled ml-100k data, on a fresh machine too:
#   bash scripts/pipeline.sh [RUN_DIR]        (default runs/ml100k)
# Each stage prints its wall time; outputs go to RUN_DIR (see README: "The run directory").
# Independent work runs as two single-threaded processes, one per core of a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
RUN=${1:-runs/ml100k}
total=$SECONDS
stage() {
  local t=$SECONDS
  echo "== $*"
  python "$@"
  echo "== $1 took $((SECONDS - t)) s"
}
both() {  # two stage commands side by side, one thread each; fails if either fails
  local t=$SECONDS
  echo "== $1  &  $2"
  OMP_NUM_THREADS=1 python $1 & local a=$!
  OMP_NUM_THREADS=1 python $2 & local b=$!
  wait $a && wait $b
  echo "== ${1%% *} (two processes) took $((SECONDS - t)) s"
}
stage 01_neighbors.py --run "$RUN"
stage 02_distill.py --run "$RUN"                      # rules teacher: the offline default (see README)
stage 03_sft.py --run "$RUN" --variant mask
stage 04_reward.py --run "$RUN"
stage 05_ppo.py --run "$RUN" --sft sft_mask
both "06_profile.py --run $RUN --source ppo --shard 0/2" "06_profile.py --run $RUN --source ppo --shard 1/2"
stage 06_profile.py --run "$RUN" --source ppo --merge
both "07_train_cf.py --run $RUN --backbone all --variant base" "07_train_cf.py --run $RUN --backbone all --variant id"
both "07_train_cf.py --run $RUN --backbone biasmf ncf lightgcn --variant augment --source ppo" \
     "07_train_cf.py --run $RUN --backbone sgl simgcl --variant augment --source ppo"
stage 08_eval.py --run "$RUN"
echo "== pipeline took $((SECONDS - total)) s; tables in $RUN/results/tables.md"
