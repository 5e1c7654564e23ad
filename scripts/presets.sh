# The flags each preset passes to the stages; sourced by pipeline.sh and experiments.sh (after setup.sh, so that
# `python` is the environment's). Choose with PRESET=gpu|cpu; by default gpu when torch sees a CUDA device, else cpu.
#   gpu  every stage's defaults, which are the paper's and the official RecLM code's settings (prompts: 5 items per
#        user with whole texts, answers of up to 100 tokens; 03: 3 epochs, batch 1, lr 5e-5, LoRA r 8 on q,v; 04: 3
#        epochs, batch 4, lr 1.41e-5, LoRA r 4; 05: one PPO step per ppo user, lr 1e-5, top_p 0.9, temperature 0.9,
#        LoRA r 4; 06: 5 users per warm item), the paper's sample
#        of distilled users (N_USERS, 1500), and one stage at a time (LAYOUT=sequential: one model per device)
#   cpu  the sizes of the CPU runs in docs/results.md, which fit a 2-core machine: the budget that teaches
#        SmolLM2-135M the profile format in minutes, item texts cut at 48 characters, one torch thread per process
#        and two processes side by side (LAYOUT=side_by_side)
# Each *_FLAGS variable holds one stage's flags, for every run of that stage (03: both variants; 06: the LLM
# sources; 06 --source teacher gets none, it runs no LLM). Either preset also takes, from the environment:
#   MODEL        --model of 03-06: a local path or hub id (Llama-2-7b-chat, Llama-3-8B-Instruct, Qwen2.5-7B-Instruct);
#                unset: the shipped SmolLM2-135M-Instruct
#   TEACHER      02's --teacher (rules | local | api); with api also API_MODEL, API_BASE, API_KEY_ENV (02's --api-*)
#   N_USERS      02's --n-users (gpu: 1500, the paper's sample whatever the dataset's size; cpu: 02's default)
PRESET=${PRESET:-$(python -c 'import torch; print("gpu" if torch.cuda.is_available() else "cpu")')}
case $PRESET in
  gpu)
    LAYOUT=sequential
    N_USERS=${N_USERS:-1500}
    DISTILL_FLAGS=""
    SFT_FLAGS=""
    REWARD_FLAGS=""
    PPO_FLAGS=""
    PROFILE_FLAGS=""
    ;;
  cpu)
    LAYOUT=side_by_side
    export OMP_NUM_THREADS=1  # OpenMP threads spinning on shared cores made training many times slower
    # item texts cut at 48 characters in every prompt (02 records the sizes for 03-06): CPU generation is
    # prefill-bound; a 3+3 profile is ~25-30 SmolLM2 tokens, so answers stop at 48 (local teacher) and 40 (06)
    DISTILL_FLAGS="--max-chars 48 --pair-max-chars 48 --max-new-tokens 48"
    # SFT_STEPS (default 16) steps of 2 examples at lr 2e-3, LoRA on every projection; examples up to 1024 tokens.
    # 16 keeps the quick pipeline short; 128 gave profiles as diverse as the teacher's (docs/results.md, "03's
    # budget"), and experiments.sh runs 128 unless SFT_STEPS says otherwise
    SFT_FLAGS="--max-steps ${SFT_STEPS:-16} --epochs 1 --batch-size 2 --lr 2e-3 --lora-dropout 0.05 --max-length 1024"
    SFT_FLAGS+=" --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    # 32 steps of 4 pairs at lr 3e-4, LoRA r 8 on the attention projections (8 steps left the reward model near its
    # untrained head on the two-turn prompt: docs/results.md, "The reward model"); every held-out pair is
    # scored (a user's query once for its 6 pairs: bench/RESULTS.md, "Held-out reward scoring")
    REWARD_FLAGS="--max-steps 32 --epochs 1 --lr 3e-4 --lora-r 8 --lora-alpha 16 --lora-dropout 0"
    REWARD_FLAGS+=" --lora-targets q_proj,k_proj,v_proj,o_proj"
    # 3 steps of 4 prompts at lr 5e-5, plain sampling, 40 new tokens, LoRA r 8 on the attention projections
    PPO_FLAGS="--steps 3 --batch-size 4 --minibatch-size 2 --lr 5e-5 --temperature 1 --top-p 1 --max-new-tokens 40"
    PPO_FLAGS+=" --lora-r 8 --lora-alpha 16 --lora-dropout 0 --lora-targets q_proj,k_proj,v_proj,o_proj"
    # warm items from 2 users' profiles: generation is prefill-bound on a CPU
    PROFILE_FLAGS="--item-users 2 --max-new-tokens 40"
    ;;
  *) echo "unknown PRESET=$PRESET (gpu or cpu)" >&2; exit 2 ;;
esac
[ -n "${TEACHER:-}" ] && DISTILL_FLAGS+=" --teacher $TEACHER"
[ -n "${N_USERS:-}" ] && DISTILL_FLAGS+=" --n-users $N_USERS"
[ -n "${API_MODEL:-}" ] && DISTILL_FLAGS+=" --api-model $API_MODEL"
[ -n "${API_BASE:-}" ] && DISTILL_FLAGS+=" --api-base $API_BASE"
[ -n "${API_KEY_ENV:-}" ] && DISTILL_FLAGS+=" --api-key-env $API_KEY_ENV"
if [ -n "${MODEL:-}" ]; then
  SFT_FLAGS+=" --model $MODEL"
  REWARD_FLAGS+=" --model $MODEL"
  PPO_FLAGS+=" --model $MODEL"
  PROFILE_FLAGS+=" --model $MODEL"
fi
echo "== preset $PRESET (layout $LAYOUT)${MODEL:+, model $MODEL}${TEACHER:+, teacher $TEACHER}"
