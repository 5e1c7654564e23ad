"""Seconds for 06's user phase (first answers and retries of those that do not parse) on a run's first N users, with
the code of the checkout it runs in, so that two commits can be compared on the same prompts and model:

    python -m bench.bench_profile_phase --run R                       # this checkout, 06's defaults
    cd /tmp/other && python -m bench.bench_profile_phase --run R      # another checkout with this layout
    python -m bench.bench_profile_phase --run R --prefill-rows 16     # generate.generate_batches' prefill chunking

R is a run in which 05 (or 03, with --source sft_mask) has run. Greedy first answers, then up to --retries samples at
06's retry temperature, batch 64, 40 new tokens, bf16 where the CPU has it, 1 thread. The other checkout needs the
module layout of this one (prompts.py, generate.py, llm.load_profile_model). Prints seconds, the share that parses,
and attempts.
Run on an idle machine, one checkout after the other.
"""
import argparse
import collections
import time
from pathlib import Path

import numpy as np
import torch

import common
import generate
import prompts
from bench.profile_prompts import model_and_prompts

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--run", type=Path, required=True)
p.add_argument("--source", default="ppo")
p.add_argument("--n", type=int, default=128, help="users (default: %(default)s)")
p.add_argument("--retries", type=int, default=5)
p.add_argument("--prefill-rows", type=int, default=None)
args = p.parse_args()

P06 = common.load_stage("06_profile")
torch.set_num_threads(1)
model, tok, texts = model_and_prompts(args.run, args.source, args.n)
parses = (lambda a: prompts.normalize_profile(a) is not None)
print(f"{common.REPO}: {type(model).__name__}, {len(texts)} prompts", flush=True)

start, result = time.perf_counter(), {}
extra = {"prefill_rows": args.prefill_rows} if args.prefill_rows else {}
for idx, answers, attempts in generate.generate_batches(model, tok, texts, P06.MAX_NEW_TOKENS, P06.BATCH_SIZE, 0.0,
                                                        accept=parses, retries=args.retries,
                                                        retry_temperature=P06.RETRY_TEMPERATURE, **extra):
    result.update(zip(idx, zip(answers, attempts)))
seconds = time.perf_counter() - start
print(f"{common.REPO}: {seconds:.1f} s for {len(texts)} users; "
      f"parse {np.mean([parses(a) for a, _ in result.values()]):.3f}"
      f" (first answers {np.mean([parses(a) and k == 0 for a, k in result.values()]):.3f}); attempts "
      f"{sorted(collections.Counter(k for _, k in result.values()).items())}")
