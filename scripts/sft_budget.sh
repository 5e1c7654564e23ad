#!/usr/bin/env bash
# 03's training budget against the profiles it gives (issue 10). For each N in STEPS, from a finished run (01, 02
# and 04 done, e.g. by scripts/pipeline.sh): a copy of it without its SFT, PPO, profile and recommender outputs;
# 03 gpt_kd and mask with the cpu preset's flags but N steps; the sft_mask probe (06 --probe-only: the eval users'
# profiles, Recall@20 of their validation items); 05 with the preset's flags against the run's reward model; the
# ppo probe. Then one scripts/compare_probes.py table of them all (Wilcoxon against the first).
#   RUN=runs/ml100k STEPS="16 64" ROOT=runs/sft_budget bash scripts/sft_budget.sh
#   STEPS=128 ... & STEPS=64 ... &      (one process each: two scans side by side on a 2-core machine)
# Resumable like experiments.sh: run it again until it prints the table. Wall seconds: ROOT/stepsN/.done/times.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export OMP_NUM_THREADS=1
PRESET=cpu . scripts/presets.sh
. scripts/steps.sh
SOURCE_RUN=${RUN:-runs/ml100k}
STEPS=${STEPS:-"16 64"}
ROOT=${ROOT:-runs/sft_budget}
[ -e "$SOURCE_RUN/reward/config.json" ] || { echo "$SOURCE_RUN: no reward model (run 01-04 first)"; exit 2; }

probes=()
for n in $STEPS; do
  RUN=$ROOT/steps$n
  if [ ! -e "$RUN/.done/copy" ]; then
    rm -rf "$RUN" && mkdir -p "$ROOT"
    cp -r "$SOURCE_RUN" "$RUN"
    rm -rf "$RUN"/{sft_gpt_kd,sft_naive,sft_mask,ppo,profiles,cf,results,.done} "$RUN"/*.tmp
    mkdir -p "$RUN/.done" && touch "$RUN/.done/copy"
  fi
  step 03-gpt_kd python 03_sft.py --run "$RUN" --variant gpt_kd $SFT_FLAGS --max-steps "$n"
  step 03-mask python 03_sft.py --run "$RUN" --variant mask $SFT_FLAGS --max-steps "$n"
  step 06-probe-sft_mask python 06_profile.py --run "$RUN" --source sft_mask --probe-only $PROFILE_FLAGS
  step 05 python 05_ppo.py --run "$RUN" --sft sft_mask $PPO_FLAGS
  step 06-probe-ppo python 06_profile.py --run "$RUN" --source ppo --probe-only $PROFILE_FLAGS
  probes+=("$RUN/profiles/sft_mask/probe_only" "$RUN/profiles/ppo/probe_only")
done
python -m scripts.compare_probes "${probes[@]}"
