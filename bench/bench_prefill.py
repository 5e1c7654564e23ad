"""Seconds for one prefill forward of 06 (8 user prompts, what generate._prefill runs at a time on a CPU): the full
causal LM asked for the last position's logits only (logits_to_keep=1) against the decoder without its LM head (what
_prefill runs, since it keeps only the keys/values), and the LM head alone on the strided last-position slice the
full model feeds it against the same rows made contiguous.

    python -m bench.bench_prefill --run R                  # the untuned SmolLM2-135M on R's user prompts
    python -m bench.bench_prefill --run R --source ppo     # R's profile model (llm.load_profile_model)

R is a run in which 02 has run (and the stage that trains --source, for a tuned one).

bf16 where the CPU has it (06's default), 1 thread, the median of --reps after a warm-up. Not a timed test.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

import generate
from bench.profile_prompts import model_and_prompts

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--run", type=Path, required=True)
p.add_argument("--source", default="base_llm", help="06's --source (default: %(default)s)")
p.add_argument("--prompts", type=int, default=generate.CPU_PREFILL_ROWS)
p.add_argument("--reps", type=int, default=5)
args = p.parse_args()
torch.set_num_threads(1)
model, tok, texts = model_and_prompts(args.run, args.source, args.prompts)
batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
head = model.get_output_embeddings()
last = torch.randn(*batch["input_ids"].shape, head.in_features, dtype=head.weight.dtype)[:, -1:, :]
paths = {
    "full model, logits_to_keep=1": lambda: model(**batch, logits_to_keep=1),
    "decoder only (no LM head)": lambda: model.get_decoder()(**batch),
    "LM head on the strided last position": lambda: head(last),
    "LM head on those rows made contiguous": lambda: head(last.contiguous()),
}
times = {name: [] for name in paths}
with torch.no_grad():
    for name, f in paths.items():
        f()  # warm-up
    for _ in range(args.reps):
        for name, f in paths.items():  # interleaved, so that a slow spell hits every path
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
print(f"{args.source}, {next(model.parameters()).dtype}, 1 thread, {args.prompts} prompts x "
      f"{batch['input_ids'].shape[1]} tokens (padded), median of {args.reps}:")
for name, ts in times.items():
    print(f"  {name:40s} {statistics.median(ts) * 1e3:9.1f} ms  ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})")
full, dec = (statistics.median(times[k]) for k in list(paths)[:2])
print(f"decoder only: {full / dec:.2f}x faster than the full model")
