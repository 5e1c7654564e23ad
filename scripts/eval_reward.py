"""Score a run's trained reward model (reward/) on every held-out pair and print overall and per-kind accuracy with
95% Wilson intervals: the evaluation 04 ends with, for runs whose 04 scored a sample (--max-eval-pairs) or to
re-check one. Writes nothing into the run.

Run  python scripts/eval_reward.py --run runs/ml100k [--device cuda]
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llm  # noqa: E402

RW = importlib.import_module("04_reward")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    if not (run / "reward" / "config.json").exists():
        raise SystemExit(f"{run}/reward: no trained reward model (run 04_reward.py)")
    model, tok = llm.load_reward_model(run / "reward", args.device)
    _, held, counts = RW.load_pairs(run, tok, RW.parse_args(["--run", str(run)]))   # every held-out pair
    res = RW.pairwise_eval(model, tok, held)
    print(f"{run}: {len(held)} held-out pairs ({counts['heldout_mode']}), {RW.describe(res)}")
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
