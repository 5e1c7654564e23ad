"""Throughput and peak memory of each LLM stage's unit of work at 7B, on random weights built from the models'
configs (no download), against the GPU's physical limits; for the first lent GPU (bench/gpu_check.sh runs it).

Units (bf16 frozen base with a float32 LoRA, as the stages run on a GPU):
  03  one training step: LoRA r 8 on q,v, batch 1 x --sft-tokens, activation checkpointing (llm.precision_settings)
  04  one reward step: a chosen and a rejected sequence of --sft-tokens through the classifier, LoRA r 4
  05  one PPO update's model work: a forward and backward of --ppo-prompts rollouts (prompt + --new-tokens)
  06  --prompts prompts: the prefill of --prompt-tokens each, then --new-tokens decode steps (static cache)
Each is timed after one warm-up; FLOP/s are against --peak-tflops (bf16 dense) and decode bytes/s (weights + the
cache read per step) against --peak-tbs (memory bandwidth). The last lines extrapolate the gpu preset's LLM stages
from the unit counts given (--sft-examples etc.; defaults: ml-100k at the paper's ~1,500 distilled users).

Run   python -m bench.gpu_llm_bench [--models llama2-7b qwen2.5-7b] [--peak-tflops 989 --peak-tbs 3.35]
      python -m bench.gpu_llm_bench --models tiny --device cpu     # a smoke run of the code paths
"""
import argparse
import time

import torch

CONFIGS = {  # from each model's config.json (bench/memory_at_7b.py has the same numbers)
    "llama2-7b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    "qwen2.5-7b": dict(model_type="qwen2", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
    "tiny": dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=512),
}


def build(name, device, classifier=False):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    cfg = AutoConfig.for_model(**CONFIGS[name], max_position_embeddings=4096, pad_token_id=0)
    if classifier:
        cfg.num_labels = 1
    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device(device):
        model = cls.from_config(cfg, dtype=torch.bfloat16 if device != "cpu" else torch.float32)
    return model.eval()


def with_lora(model, r, task_type):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                             task_type=task_type))
    for p in model.parameters():  # as llm.trainable_float32
        if p.requires_grad:
            p.data = p.data.float()
    return model


def timed(fn, device, reps=3):
    """(seconds per call, peak GiB) after one warm-up call."""
    fn()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    return (time.perf_counter() - t) / reps, peak


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def train_step(model, ids, device, labels=None):
    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device != "cpu"):
            out = model(input_ids=ids, labels=labels) if labels is not None else model(input_ids=ids)
            loss = out.loss if labels is not None else out.logits.float().sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def bench_model(name, a):
    torch.manual_seed(0)
    lm = build(name, a.device)
    n = n_params(lm)
    rows = generation_units(lm, n, a) + policy_units(with_lora(lm, 8, "CAUSAL_LM"), n, a)
    lm = None  # free the 7B before the reward model is built
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return n, rows + reward_units(with_lora(build(name, a.device, classifier=True), 4, "SEQ_CLS"), n, a)


def generation_units(lm, n, a):
    """06: the prefill of a batch of prompts, and its decode steps on a static cache."""
    dev, rows = a.device, []
    kv_per_token = 2 * lm.config.num_hidden_layers * lm.config.num_key_value_heads * \
        (lm.config.hidden_size // lm.config.num_attention_heads) * lm.dtype.itemsize
    vocab = lm.config.vocab_size

    # 06: prefill and decode
    from transformers import StaticCache
    prompts = torch.randint(1, vocab, (a.prompts, a.prompt_tokens), device=dev)

    def prefill():
        with torch.no_grad():
            lm.model(input_ids=prompts)
    t, peak = timed(prefill, dev, reps=1)
    flops = 2 * n * a.prompts * a.prompt_tokens
    rows.append(("06 prefill", t, peak, f"{flops / t / 1e12:.1f} TFLOP/s ({flops / t / 1e12 / a.peak_tflops:.0%})"))

    def decode():
        cache = StaticCache(config=lm.config, max_cache_len=a.prompt_tokens + a.new_tokens)
        with torch.no_grad():
            lm(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = prompts[:, -1:]
            for s in range(a.new_tokens):
                pos = torch.full((a.prompts, 1), a.prompt_tokens + s, device=dev)
                logits = lm(input_ids=tok, past_key_values=cache, use_cache=True, position_ids=pos,
                            cache_position=pos[0]).logits
                tok = logits[:, -1].argmax(-1, keepdim=True)
    t_all, peak = timed(decode, dev, reps=1)
    t_dec = max(t_all - t, 1e-9)  # the decode steps alone: less the prefill just measured
    moved = a.new_tokens * (2 * n + a.prompts * (a.prompt_tokens + a.new_tokens / 2) * kv_per_token)
    rows.append((f"06 decode x{a.new_tokens}", t_dec, peak,
                 f"{moved / t_dec / 1e12:.2f} TB/s ({moved / t_dec / 1e12 / a.peak_tbs:.0%}), "
                 f"{a.prompts * a.new_tokens / t_dec:.0f} tokens/s"))

    return rows


def policy_units(policy, n, a):
    """03: an SFT step; 05: the PPO update's forward and backward over its rollouts."""
    dev, rows, vocab = a.device, [], policy.config.vocab_size
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    ids = torch.randint(1, vocab, (1, a.sft_tokens), device=dev)
    t, peak = timed(train_step(policy, ids, dev, labels=ids), dev)
    flops = 8 * n * a.sft_tokens  # forward, recomputed forward, backward through the frozen weights
    rows.append(("03 step", t, peak, f"{flops / t / 1e12:.1f} TFLOP/s ({flops / t / 1e12 / a.peak_tflops:.0%})"))
    ppo_ids = torch.randint(1, vocab, (a.ppo_prompts, a.prompt_tokens + a.new_tokens), device=dev)
    t, peak = timed(train_step(policy, ppo_ids, dev, labels=ppo_ids), dev)
    rows.append(("05 update", t, peak, f"{8 * n * ppo_ids.numel() / t / 1e12:.1f} TFLOP/s"))
    return rows


def reward_units(rm, n, a):
    """04: a reward step on a chosen and a rejected sequence."""
    dev, vocab = a.device, rm.config.vocab_size
    rm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rm.train()
    pair = torch.randint(1, vocab, (2, a.sft_tokens), device=dev)
    t, peak = timed(train_step(rm, pair, dev), dev)
    return [("04 step", t, peak, f"{8 * n * pair.numel() / t / 1e12:.1f} TFLOP/s")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama2-7b", "qwen2.5-7b"], choices=sorted(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM 989, A100 312)")
    p.add_argument("--peak-tbs", type=float, default=3.35, help="memory bandwidth, TB/s (H100 SXM 3.35, A100 2.0)")
    p.add_argument("--prompts", type=int, default=64, help="06's batch")
    p.add_argument("--prompt-tokens", type=int, default=420)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--sft-tokens", type=int, default=1024, help="tokens of an 03 example / an 04 sequence")
    p.add_argument("--ppo-prompts", type=int, default=4, help="rollouts per PPO update")
    # unit counts of the gpu preset on ml-100k (1,500 distilled users: 750 sft, 300 reward, 225 ppo users)
    p.add_argument("--sft-examples", type=int, default=3 * 1125, help="03: examples x epochs, per variant")
    p.add_argument("--reward-pairs", type=int, default=3 * 1800, help="04: pairs x epochs")
    p.add_argument("--ppo-steps", type=int, default=225, help="05: PPO steps (one per ppo user)")
    p.add_argument("--profile-prompts", type=int, default=943 + 1682, help="06: user and item prompts")
    a = p.parse_args(argv)
    for name in a.models:
        n, rows = bench_model(name, a)
        print(f"\n{name}: {n / 1e9:.2f}B parameters on {a.device}"
              + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""))
        print("| unit | seconds | peak GiB | rate |\n|---|---|---|---|")
        for unit, t, peak, rate in rows:
            print(f"| {unit} | {t:.3f} | {peak:.1f} | {rate} |")
        s = {u.split()[0] + " " + u.split()[1]: t for u, t, _, _ in rows}
        per_batch = s["06 prefill"] + next(t for u, t, _, _ in rows if u.startswith("06 decode"))
        hours = {"03 (two variants)": 2 * a.sft_examples * s["03 step"], "04": a.reward_pairs * s["04 step"],
                 "05 (updates only; rollouts ~ 06 decode)": a.ppo_steps * (s["05 update"] + per_batch / a.prompts
                                                                           * a.ppo_prompts),
                 "06": a.profile_prompts / a.prompts * per_batch}
        print("extrapolated gpu preset on ml-100k: " + ", ".join(f"{k} {v / 3600:.2f} h" for k, v in hours.items()))


if __name__ == "__main__":
    main()
