"""Seconds for 06's user phase (first answers and retries of those that do not parse) on a run's first N users, with
the llm.py and 06_profile.py of any checkout, so that two commits can be compared on the same prompts and model:

    python bench/bench_profile_phase.py --run R                       # this checkout, 06's defaults
    python bench/bench_profile_phase.py --run R --code /tmp/old       # another checkout of the project
    python bench/bench_profile_phase.py --run R --prefill-rows 16     # llm.generate_batches' prefill chunking

R is a run in which 05 (or 03, with --source sft_mask) has run. Greedy first answers, then up to --retries samples at
06's retry temperature, batch 64, 40 new tokens, bf16 where the CPU has it, 1 thread. A checkout whose
generate_batches has no retries (before this script) is run as 06 ran it then: every answer that does not parse is
sampled again over the whole phase, prompts included. Prints seconds, the share that parses, and attempts.
Run on an idle machine, one checkout after the other.
"""
import argparse
import collections
import importlib
import inspect
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--run", type=Path, required=True)
p.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to time")
p.add_argument("--source", default="ppo")
p.add_argument("--n", type=int, default=128, help="users (default: %(default)s)")
p.add_argument("--retries", type=int, default=5)
p.add_argument("--prefill-rows", type=int, default=None)
args = p.parse_args()
sys.path.insert(0, str(args.code.resolve()))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import llm  # noqa: E402
from profile_prompts import model_and_prompts  # noqa: E402  (bench/, next to this script)

P06 = importlib.import_module("06_profile")
torch.set_num_threads(1)
model, tok, texts = model_and_prompts(args.run, args.source, args.n)
parses = (lambda a: llm.normalize_profile(a) is not None)
print(f"{args.code}: {type(model).__name__}, {len(texts)} prompts", flush=True)

start, result = time.perf_counter(), {}
if "accept" in inspect.signature(llm.generate_batches).parameters:
    extra = {"prefill_rows": args.prefill_rows} if args.prefill_rows else {}
    for idx, answers, attempts in llm.generate_batches(model, tok, texts, P06.MAX_NEW_TOKENS, P06.BATCH_SIZE, 0.0,
                                                       accept=parses, retries=args.retries,
                                                       retry_temperature=P06.RETRY_TEMPERATURE, **extra):
        result.update(zip(idx, zip(answers, attempts)))
else:  # 06 before in-batch retries: whole-phase retry passes, each prompt run again
    pending = list(range(len(texts)))
    for attempt in range(args.retries + 1):
        torch.manual_seed(P06.RETRY_SEED + attempt)
        temperature = 0.0 if attempt == 0 else P06.RETRY_TEMPERATURE
        failed = []
        for idx, answers in llm.generate_batches(model, tok, [texts[k] for k in pending], P06.MAX_NEW_TOKENS,
                                                 P06.BATCH_SIZE, temperature):
            for j, a in zip(idx, answers):
                result[pending[j]] = (a, attempt)
                failed += [] if parses(a) else [pending[j]]
        pending = failed
        if not pending:
            break
seconds = time.perf_counter() - start
print(f"{args.code}: {seconds:.1f} s for {len(texts)} users; parse {np.mean([parses(a) for a, _ in result.values()]):.3f}"
      f" (first answers {np.mean([parses(a) and k == 0 for a, k in result.values()]):.3f}); attempts "
      f"{sorted(collections.Counter(k for _, k in result.values()).items())}")
