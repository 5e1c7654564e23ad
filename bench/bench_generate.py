"""Profiles per second: 06's batched generator (generate.generate_batches: left padding, prompts sorted by length,
the shared system-prompt prefix run once, a preallocated cache) against one-at-a-time `model.generate` on the same
prompts and the same model, greedy, in one run; prints the ratios (bench/RESULTS.md, section "Batched generation"),
and the batched generator without the prefix cache, to show what that part brings. Not a timed test.

    python -m bench.bench_generate                     # 64 prompts, SmolLM2-135M, CPU
    python -m bench.bench_generate --quick             # 32 prompts batched, 8 of them one at a time
    python -m bench.bench_generate --run runs/ml100k   # prompts of that run (default: ml-100k from the recbole wheel)
    python -m bench.bench_generate --model PATH --device cuda

Prompts are 06's user prompts (prompts.user_prompt with prompts.PROMPT_SIZES). Each path is timed on its own
prompts after one warm-up generate; the one-at-a-time rate may be measured on a subset (--n-single) since it is the
slow side. Wall time and process CPU
time are both printed (on a shared machine the CPU-time ratio is the steadier one).
"""
import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

import common
import data
import generate
import llm
import prompts

P06 = common.load_stage("06_profile")


def ml100k_prompts(n, seed=0):
    """User prompts built straight from the raw ml-100k files (no run directory needed): each user's items in
    time order, neighbours = the next users in a random order (the prompt length is what matters here)."""
    raw = data.load_ml100k()
    split, _, items_raw, _ = data.make_split(raw)
    text = [raw.item_text[r] for r in items_raw]
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    users = np.random.default_rng(seed).permutation(split["n_users"])[:n + 3]
    nbrs = {int(u): [int(v) for v in users[k + 1:k + 4]] for k, u in enumerate(users[:n])}
    return [prompts.user_prompt(int(u), train, nbrs, text) for u in users[:n]]


def run_prompts(run, n):
    split = common.load_split(run)
    nb = common.load_neighbors(run)["user_nbrs"]
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    return [prompts.user_prompt(u, train, nb, common.load_items(run)) for u in range(min(n, split["n_users"]))]


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=llm.DEFAULT_LLM, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--run", type=Path, default=None, help="take the prompts from this run (default: raw ml-100k)")
    p.add_argument("--n", type=int, default=64, help="prompts for the batched side (default: %(default)s)")
    p.add_argument("--n-single", type=int, default=16, help="prompts for the one-at-a-time side (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=P06.BATCH_SIZE)
    p.add_argument("--max-new-tokens", type=int, default=P06.MAX_NEW_TOKENS)
    p.add_argument("--threads", type=int, default=P06.THREADS,
                   help="torch threads (default: %(default)s as in 06; 0 = torch's choice)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="as in 06")
    p.add_argument("--quick", action="store_true", help="32 batched prompts, 8 one at a time")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_single = 32, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = llm.load_llm(args.model, device=args.device)
    model = model.to(llm.pick_dtype(args.dtype, args.device)).eval()
    msgs = run_prompts(args.run, args.n) if args.run else ml100k_prompts(args.n)
    texts = [prompts.render(tok, m) for m in msgs]
    lens = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
    print(f"model {llm.resolve_llm(args.model)} ({next(model.parameters()).dtype}) on {args.device}, "
          f"{torch.get_num_threads()} threads; "
          f"{len(texts)} prompts, {np.mean(lens):.0f} tokens on average (min {min(lens)}, max {max(lens)}); "
          f"max_new_tokens {args.max_new_tokens}, greedy")
    stops = generate.stop_token_ids(tok)
    list(generate.generate_batches(model, tok, texts[:2], 4, 2, progress=False))  # warm-up

    def batched(prefix_cache=True):
        out = [None] * len(texts)
        for idx, ans, _ in generate.generate_batches(model, tok, texts, args.max_new_tokens, args.batch_size,
                                             desc="batched", prefix_cache=prefix_cache):
            for k, a in zip(idx, ans):
                out[k] = a
        return out

    @torch.no_grad()
    def single():
        out = []
        for t in texts[:args.n_single]:
            enc = tok(t, return_tensors="pt", add_special_tokens=False).to(args.device)
            y = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, temperature=None,
                               top_p=None, top_k=None, eos_token_id=stops, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(y[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out

    b_out, b_wall, b_cpu = timed(batched)
    _, n_wall, n_cpu = timed(lambda: batched(prefix_cache=False))
    s_out, s_wall, s_cpu = timed(single)
    nb, ns = len(texts), args.n_single
    same = np.mean([a == b for a, b in zip(b_out, s_out)])
    valid = np.mean([prompts.normalize_profile(a) is not None for a in b_out])
    print(f"batched (batch {args.batch_size}): {nb / b_wall:.2f} profiles/s wall ({b_wall:.1f}s for {nb}), "
          f"{nb / b_cpu:.2f} profiles per CPU-second")
    print(f"batched, no prefix cache: {nb / n_wall:.2f} profiles/s wall ({n_wall:.1f}s for {nb}); the prefix cache "
          f"gives {n_wall / b_wall:.2f}x wall, {n_cpu / b_cpu:.2f}x CPU time")
    print(f"one at a time:     {ns / s_wall:.2f} profiles/s wall ({s_wall:.1f}s for {ns}), "
          f"{ns / s_cpu:.2f} profiles per CPU-second")
    print(f"ratio batched / one-at-a-time: {(nb / b_wall) / (ns / s_wall):.1f}x wall, "
          f"{(nb / b_cpu) / (ns / s_cpu):.1f}x CPU time (target >= 6x)")
    print(f"identical answers on the shared prompts: {same:.0%}; valid profiles (batched): {valid:.0%}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("example:", b_out[0][:200])


if __name__ == "__main__":
    main()
