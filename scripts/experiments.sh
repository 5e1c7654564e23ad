#!/usr/bin/env bash
# The result tables of docs/results.md: ml-100k dense (as shipped) and sparse (at most 5 training rows per user, the
# paper's data-scarce setting), each with Base and Augment (profiles from the rules teacher itself, the upper
# bound of distillation, and from the PPO-tuned model) for the five backbones at 3 seeds, beside 08's
# reference rows.
#   bash scripts/experiments.sh            (SETTINGS="dense sparse5" SEEDS="0 1 2" ROOT=runs/exp by default)
# Resumable: finished LM steps leave a marker in RUN/.done/ and are skipped; 06 resumes its profiles; 07 skips
# every model already trained on the current inputs; so run it again (as often as needed, e.g. in one-hour
# pieces) until it prints "experiments done". Delete RUN/.done/<step> to redo a step. Wall seconds of every
# step go to RUN/.done/times.
# Laid out for a 2-core machine (one torch thread per process, two processes at a time): docs/design.md.
# The language-model stages run with the flags of PRESET (scripts/presets.sh: gpu when torch sees a GPU, else cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export SFT_STEPS=${SFT_STEPS:-128}  # cpu preset: 03's steps; longer than the quick pipeline's 16 (docs/results.md, "03's budget")
. scripts/presets.sh
SETTINGS=${SETTINGS:-"dense sparse5"}
SEEDS=${SEEDS:-"0 1 2"}
ROOT=${ROOT:-runs/exp}

. scripts/steps.sh

run_dir() { RUN=$ROOT/$1; }
# 1. the split, the language-model stages and both profile sources, per setting
for setting in $SETTINGS; do
  run_dir "$setting"
  case $setting in
    dense) split_opts="" ;;
    sparse*) split_opts="--max-train-per-user ${setting#sparse}" ;;
    *) echo "unknown setting $setting (dense or sparseN)"; exit 2 ;;
  esac
  step 01 python 01_neighbors.py --run "$RUN" $split_opts
  step 02 python 02_distill.py --run "$RUN" $DISTILL_FLAGS
  step 03kd+04 both "03_sft.py --run $RUN --variant gpt_kd $SFT_FLAGS" "04_reward.py --run $RUN $REWARD_FLAGS"
  step 03 python 03_sft.py --run "$RUN" --variant mask $SFT_FLAGS  # continues the gpt_kd LoRA (the paper's ablation)
  step 05 python 05_ppo.py --run "$RUN" --sft sft_mask $PPO_FLAGS
  step 06-teacher python 06_profile.py --run "$RUN" --source teacher
  if [ "$LAYOUT" = sequential ]; then  # one process: shards run one after the other would wait for each other
    step 06-ppo python 06_profile.py --run "$RUN" --source ppo $PROFILE_FLAGS
    continue
  fi
  step 06-ppo-shards both "06_profile.py --run $RUN --source ppo --shard 0/2 $PROFILE_FLAGS" \
                          "06_profile.py --run $RUN --source ppo --shard 1/2 $PROFILE_FLAGS"
  step 06-ppo-merge python 06_profile.py --run "$RUN" --source ppo --merge $PROFILE_FLAGS
done
# 2. the recommenders, seeds outermost, so that a partial run already has every setting, backbone, variant and
# source at seed 0; two processes with about equal work (the graph models with contrastive views are the slow
# ones). 07 skips models already trained on the current inputs.
for seed in $SEEDS; do
  for setting in $SETTINGS; do
    run_dir "$setting"
    for source in teacher ppo; do
      timed "07-$source-s$seed" both \
        "07_train_cf.py --run $RUN --backbone lightgcn biasmf sgl --variant base augment --source $source --seeds $seed" \
        "07_train_cf.py --run $RUN --backbone ncf simgcl --variant base augment --source $source --seeds $seed"
    done
    timed "08-s$seed" python 08_eval.py --run "$RUN"   # tables of what exists so far
  done
done
echo "== experiments done; tables in $ROOT/*/results/tables.md"
