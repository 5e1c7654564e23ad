"""Score a run's trained reward model (reward/) on every held-out pair and print overall and per-kind accuracy with
95% Wilson intervals: the evaluation 04 ends with, for runs whose 04 scored a sample (--max-eval-pairs) or to
re-check one. Writes nothing into the run.

--out F writes the result (with each pair's margin) to F. --against G compares with another result on the same
held-out pairs (G: an --out file or a run's reward/eval.json): per kind, both accuracies and the exact McNemar test
over the pairs that one model ranks correctly and the other does not (two-sided binomial test on the discordant
pairs), the comparison for two reward models scored on the same pairs.

--lexical-only prints the lexical reference alone (04_reward.lexical_reference: word overlap of each answer with the
target's items, no model), also for runs without a reward model.

Run  python -m scripts.eval_reward --run runs/ml100k [--device cuda] [--out F] [--against OTHER_RUN/reward/eval.json]
     python -m scripts.eval_reward --run runs/ml100k --lexical-only
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from scipy.stats import binomtest

import common
import llm

RW = common.load_stage("04_reward")


def mcnemar(ours, theirs):
    """Per kind and overall: (n, our accuracy, their accuracy, exact McNemar p) over pairs matched by (user, kind)
    and, within those, by order. Raises ValueError when the two results do not hold the same pairs."""
    def keyed(res):
        seen, out = defaultdict(int), {}
        for p in res["pairs"]:
            k = (p["user"], p["kind"])
            out[k + (seen[k],)] = p["margin"] > 0
            seen[k] += 1
        return out
    a, b = keyed(ours), keyed(theirs)
    if a.keys() != b.keys():
        raise ValueError(f"the two results hold different held-out pairs ({len(a)} and {len(b)}; "
                         f"{len(a.keys() ^ b.keys())} differ): compare reward models scored on the same pairs")
    rows = {}
    for kind in sorted({k[1] for k in a}) + ["all"]:
        keys = [k for k in a if kind in ("all", k[1])]
        only_a = sum(a[k] and not b[k] for k in keys)
        only_b = sum(b[k] and not a[k] for k in keys)
        p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
        rows[kind] = (len(keys), sum(a[k] for k in keys) / len(keys), sum(b[k] for k in keys) / len(keys), p)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the result, with each pair's margin, to this JSON file")
    ap.add_argument("--against", default=None, help="another result on the same pairs: paired comparison")
    ap.add_argument("--lexical-only", action="store_true", help="only the lexical reference (no reward model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    if args.lexical_only:
        # the tokenizer renders the pairs for --max-length: the reward model's when 04 has run, as 04 rendered them
        trained = run / "reward" / "tokenizer_config.json"
        tok = llm.load_tokenizer(trained.parent if trained.exists() else llm.resolve_llm(llm.DEFAULT_LLM))
        _, held, counts = RW.load_pairs(run, tok, RW.parse_args(["--run", str(run)]))
        lexical = RW.lexical_reference(held)
        per_kind = ", ".join(f"{k} {v:.3f}" for k, v in lexical["per_kind"].items())
        print(f"{run}: {len(held)} held-out pairs ({counts['heldout_mode']}), lexical reference "
              f"{lexical['accuracy']:.3f}; per kind: {per_kind}")
        return lexical
    if not any((run / "reward" / f).exists() for f in ("adapter_config.json", "config.json")):
        raise SystemExit(f"{run}/reward: no trained reward model (run 04_reward.py)")
    other = None
    if args.against:
        other = json.loads(Path(args.against).read_text())
        other = other.get("heldout", other)  # a run's eval.json holds the result under "heldout"
        if not other or "pairs" not in other:
            raise SystemExit(f"{args.against}: no per-pair margins (written by 04 since eval.json held them, or by "
                             "--out)")
    model, tok = llm.load_reward_model(run / "reward", args.device)
    _, held, counts = RW.load_pairs(run, tok, RW.parse_args(["--run", str(run)]))   # every held-out pair
    res = RW.pairwise_eval(model, tok, held)
    print(f"{run}: {len(held)} held-out pairs ({counts['heldout_mode']}), "
          f"{RW.describe(res, RW.lexical_reference(held))}")
    print(json.dumps({k: v for k, v in res.items() if k != "pairs"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res))
        print(f"wrote {args.out}")
    if other is not None:
        print(f"paired against {args.against} (exact McNemar test on the pairs only one model ranks correctly):")
        print("kind            n   this   that   p")
        for kind, (n, acc_a, acc_b, p) in mcnemar(res, other).items():
            print(f"{kind:<14}{n:>4}  {acc_a:.3f}  {acc_b:.3f}  {p:.3g}")
    return res


if __name__ == "__main__":
    main()
