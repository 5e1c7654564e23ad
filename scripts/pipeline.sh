#!/usr/bin/env bash
# The whole pipeline on the bundled ml-100k data, on a fresh machine too:
#   bash scripts/pipeline.sh [RUN_DIR]        (default runs/ml100k)
#   PRESET=cpu bash scripts/pipeline.sh       (the preset: gpu when torch sees a GPU, else cpu; scripts/presets.sh)
#   MODEL=meta-llama/Llama-2-7b-chat-hf TEACHER=api API_MODEL=gpt-4o-mini bash scripts/pipeline.sh   (on a GPU)
# Each stage prints its wall time; outputs go to RUN_DIR (docs/design.md, "The run directory and its manifest").
# The preset's LAYOUT: sequential (gpu) runs one stage at a time, so that one model has the device; side_by_side
# (cpu, for 2 cores) runs independent work as two one-thread processes: the reward model trains beside SFT and 07's
# Base models; 06 runs as two shards; 07's Augment models as two processes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. scripts/presets.sh
RUN=${1:-runs/ml100k}
total=$SECONDS
stage() {
  local t=$SECONDS
  echo "== $*"
  python "$@"
  echo "== $1 took $((SECONDS - t)) s"
}
both() {  # two stage commands side by side; fails if either fails
  local t=$SECONDS
  echo "== $1  &  $2"
  python $1 & local a=$!
  python $2 & local b=$!
  wait $a && wait $b
  echo "== ${1%% *} (two processes) took $((SECONDS - t)) s"
}
stage 01_neighbors.py --run "$RUN"
stage 02_distill.py --run "$RUN" $DISTILL_FLAGS       # rules teacher unless TEACHER says otherwise
if [ "$LAYOUT" = sequential ]; then
  stage 03_sft.py --run "$RUN" --variant gpt_kd $SFT_FLAGS
  stage 03_sft.py --run "$RUN" --variant mask $SFT_FLAGS
  stage 04_reward.py --run "$RUN" $REWARD_FLAGS
  stage 05_ppo.py --run "$RUN" --sft sft_mask $PPO_FLAGS
  stage 06_profile.py --run "$RUN" --source ppo $PROFILE_FLAGS
  stage 07_train_cf.py --run "$RUN" --backbone simgcl sgl lightgcn biasmf ncf --variant base augment --source ppo
  stage 08_eval.py --run "$RUN"
  echo "== pipeline took $((SECONDS - total)) s; tables in $RUN/results/tables.md"
  exit 0
fi
# One process per core, the work split so that both finish together (docs/results.md, "The quick pipeline, timed"):
#   this shell:  03 gpt_kd -> 03 mask (continues gpt_kd's LoRA) -> 07 base (all backbones) -> 05 (needs 04 too)
#   background:  04                                                  (log: $RUN/track2.out)
t=$SECONDS
rm -f "$RUN/.reward_ready"
echo "== 04_reward.py in the background"
( stage 04_reward.py --run "$RUN" $REWARD_FLAGS && touch "$RUN/.reward_ready" ) > "$RUN/track2.out" 2>&1 &
track2=$!
stage 03_sft.py --run "$RUN" --variant gpt_kd $SFT_FLAGS
stage 03_sft.py --run "$RUN" --variant mask $SFT_FLAGS
stage 07_train_cf.py --run "$RUN" --backbone simgcl sgl lightgcn biasmf ncf --variant base
until [ -e "$RUN/.reward_ready" ]; do  # 05 needs the reward model
  kill -0 $track2 2>/dev/null || { tail -n 20 "$RUN/track2.out"; exit 1; }
  sleep 2
done
rm -f "$RUN/.reward_ready"
wait $track2 || { tail -n 20 "$RUN/track2.out"; exit 1; }
grep "^== .* took" "$RUN/track2.out" || true
stage 05_ppo.py --run "$RUN" --sft sft_mask $PPO_FLAGS
echo "== 03-05 and 07 base (two processes at a time) took $((SECONDS - t)) s"
both "06_profile.py --run $RUN --source ppo --shard 0/2 $PROFILE_FLAGS" \
     "06_profile.py --run $RUN --source ppo --shard 1/2 $PROFILE_FLAGS"
stage 06_profile.py --run "$RUN" --source ppo --merge $PROFILE_FLAGS
both "07_train_cf.py --run $RUN --backbone biasmf sgl lightgcn --variant augment --source ppo" \
     "07_train_cf.py --run $RUN --backbone ncf simgcl --variant augment --source ppo"
stage 08_eval.py --run "$RUN"
echo "== pipeline took $((SECONDS - total)) s; tables in $RUN/results/tables.md"
