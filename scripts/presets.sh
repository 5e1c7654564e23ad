# The flags each preset passes to the language-model stages; sourced by pipeline.sh and experiments.sh (after
# setup.sh, so that `python` is the environment's). Choose with PRESET=gpu|cpu; by default gpu when torch sees a
# CUDA device, else cpu.
#   gpu  no flags: every stage's defaults are the paper's and the official RecLM code's settings (03: 3 epochs,
#        batch 1, lr 5e-5, LoRA r 8 on q,v; 04: 3 epochs, batch 4, lr 1.41e-5, LoRA r 4; 05: one PPO step per
#        ppo user, lr 1e-5, top_p 0.9, temperature 0.9, 100 new tokens, LoRA r 4; 06: 5 users per warm item)
#   cpu  the sizes of the CPU runs in docs/results.md, which fit a 2-core machine: the budget that teaches
#        SmolLM2-135M the profile format in minutes, and short item prompts
# Each variable holds one stage's flags, for every run of that stage (03: both variants; 06: the LLM sources; 06
# --source teacher gets none, it runs no LLM).
PRESET=${PRESET:-$(python -c 'import torch; print("gpu" if torch.cuda.is_available() else "cpu")')}
case $PRESET in
  gpu)
    SFT_FLAGS=""
    REWARD_FLAGS=""
    PPO_FLAGS=""
    PROFILE_FLAGS=""
    ;;
  cpu)
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
    PROFILE_FLAGS="--item-users 2"
    ;;
  *) echo "unknown PRESET=$PRESET (gpu or cpu)" >&2; exit 2 ;;
esac
echo "== preset $PRESET"
