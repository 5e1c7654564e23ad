"""GPU memory each LLM stage needs at 7B, from the models' configs (weights and 06's KV cache; activations and
optimizer state of the LoRA are not counted). Prints the README's table:  python -m bench.memory_at_7b

The configs are written out (no download): layers, hidden size, KV heads, head dim, MLP width, vocabulary, whether
the LM head is tied. On a GPU 03/04 load the frozen base in bf16 (llm.frozen_dtype), 05 a bf16 policy beside the
bf16 reward model (its LoRA and score head live, llm.load_reward_model), 06 bf16 weights and one KV cache of 64
prompts x ~420 tokens (generate.generate_batches frees a batch's cache before the next; --kv-budget-gb caps it)."""
GiB = 2 ** 30
CONFIGS = {  # from each model's config.json
    "Llama-2-7b-chat": dict(layers=32, hidden=4096, kv_heads=32, head_dim=128, mlp=11008, vocab=32000),
    "Llama-3-8B-Instruct": dict(layers=32, hidden=4096, kv_heads=8, head_dim=128, mlp=14336, vocab=128256),
    "Qwen2.5-7B-Instruct": dict(layers=28, hidden=3584, kv_heads=4, head_dim=128, mlp=18944, vocab=152064),
}
PROMPTS, TOKENS, CACHES = 64, 420, 1


def params(c):
    attention = 2 * c["hidden"] ** 2 + 2 * c["hidden"] * c["kv_heads"] * c["head_dim"]
    return c["layers"] * (attention + 3 * c["hidden"] * c["mlp"]) + 2 * c["vocab"] * c["hidden"]


def kv_bytes_per_token(c):
    return 2 * c["layers"] * c["kv_heads"] * c["head_dim"] * 2  # keys and values, bf16


for name, c in CONFIGS.items():
    p, kv = params(c), kv_bytes_per_token(c)
    sft = p * 2 / GiB
    ppo = (p * 2 + p * 2) / GiB
    profile = (p * 2 + CACHES * PROMPTS * TOKENS * kv) / GiB
    print(f"{name}: {p / 1e9:.2f}B parameters, KV {kv // 1024} KB/token; 03/04 {sft:.0f} GB, 05 {ppo:.0f} GB, "
          f"06 {profile:.0f} GB")
