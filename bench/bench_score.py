"""Held-out reward scoring: 04's grouped scorer (llm.score_groups: a user's query once, each distinct answer on its
cached keys/values) against scoring every chosen and rejected sequence whole (llm.score_ids, the plain path), on
the same pairs and the same trained reward model, in one process; prints the time of each, their ratio, and the
largest score difference. Not a timed test.

    python -m bench.bench_score --run runs/ml100k [--users 20]      # needs the run's 02 and 04 outputs
"""
import argparse
import time
from pathlib import Path

import torch

import common
import llm

RW = common.load_stage("04_reward")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--users", type=int, default=20, help="held-out users whose pairs are scored")
    ap.add_argument("--batch-size", type=int, default=8, help="score_ids: sequences per forward pass (04's old 8)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    model, tok = llm.load_reward_model(run / "reward")
    _, held, _ = RW.load_pairs(run, tok, RW.parse_args(["--run", str(run)]))
    users = sorted({p["user"] for p in held})[:args.users]
    pairs = [p for p in held if p["user"] in set(users)]
    _, groups = RW.query_groups(pairs)
    t0 = time.perf_counter()
    grouped = torch.cat(llm.score_groups(model, tok, groups, progress=False))
    t_grouped = time.perf_counter() - t0
    t0 = time.perf_counter()
    whole = llm.score_ids(model, tok, [ids for g in groups for ids in g], args.batch_size)
    t_whole = time.perf_counter() - t0
    n_tokens = sum(len(ids) for g in groups for ids in g)
    print(f"{len(pairs)} pairs of {len(users)} users, {n_tokens} tokens as whole sequences, {args.threads} thread(s)")
    print(f"score_ids (whole sequences, batch {args.batch_size}): {t_whole:.1f} s")
    print(f"score_groups (shared prefix):                {t_grouped:.1f} s   ratio {t_whole / t_grouped:.2f}x")
    print(f"largest score difference: {(grouped - whole).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
