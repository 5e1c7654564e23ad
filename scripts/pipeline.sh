#!/usr/bin/env bash
# The whole pipeline on the bundled ml-100k data, on a fresh machine too:
#   bash scripts/pipeline.sh [RUN_DIR]        (default runs/ml100k)
# Each stage prints its wall time; outputs go to RUN_DIR (see README: "The run directory").
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
stage 01_neighbors.py --run "$RUN"
for variant in base id; do
  stage 07_train_cf.py --run "$RUN" --backbone all --variant "$variant"
done
stage 08_eval.py --run "$RUN"
echo "== pipeline took $((SECONDS - total)) s; tables in $RUN/results/tables.md"
