"""Compare profile probes on the same users: each probe's Recall@K, share of profiles that parse, distinct valid
profiles and the share of valid profiles holding the most common identity line (diversity), and a paired
Wilcoxon signed-rank test of each against the first, over the users both scored (the per-user values that
llm.profile_probe writes to probe.json). Used for the decoding comparisons (docs/results.md, "Decoding: banned
repeats and distinct terms do not help; sampling again does").

Run  python -m scripts.compare_probes DIR_OR_PROBE_JSON [...] [--part eval_users]
     (a directory holds probe.json and users.jsonl, e.g. runs/R/profiles/ppo/probe_only)
"""
import argparse
import collections
import json
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

import llm
import prompts


def load(path, part):
    path = Path(path)
    probe_json = path / "probe.json" if path.is_dir() else path
    probe = json.loads(probe_json.read_text())
    if part not in probe:
        parts = ", ".join(k for k in probe if isinstance(probe[k], dict))
        raise SystemExit(f"{probe_json}: no {part!r} part (has {parts})")
    p = probe[part]
    key = f"recall@{llm.PROBE_K}_by_user"
    if key not in p:
        raise SystemExit(f"{probe_json}: {part} has no per-user values ({key}); re-run 06 with the current code")
    users_jsonl = probe_json.parent / "users.jsonl"
    stats = None
    if users_jsonl.exists():
        rows = list({r["user"]: r for r in map(json.loads, users_jsonl.open())}.values())  # a re-run appends: last wins
        good = [r["profile"] for r in rows if r.get("valid")]
        identities = collections.Counter(prompts.PROFILE_RE.search(g).group("identity").lower() for g in good)
        top = identities.most_common(1)[0][1] / len(good) if good else float("nan")
        stats = f"{len(good)} / {len(rows)} ({len(good) / max(len(rows), 1):.0%}) | {len(set(good))} | {top:.1%}"
    return dict(zip(p["users"], p[key])), p, stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probes", nargs="+", help="probe.json files or the directories that hold them")
    ap.add_argument("--part", default="eval_users", help="which part of probe.json (eval_users, all_users, ...)")
    args = ap.parse_args(argv)
    loaded = [load(p, args.part) for p in args.probes]
    ref = loaded[0][0]
    print(f"| probe | profiles that parse | distinct | top identity | Recall@{llm.PROBE_K} | users | "
          "p (Wilcoxon, vs first) |")
    print("|---|---|---|---|---|---|---|")
    for path, (by_user, p, stats) in zip(args.probes, loaded):
        common_users = sorted(set(ref) & set(by_user))
        a = np.array([ref[u] for u in common_users])
        b = np.array([by_user[u] for u in common_users])
        pval = "" if by_user is ref else ("1.0" if np.all(a == b) else f"{wilcoxon(a, b).pvalue:.3g}")
        print(f"| {path} | {stats or '? | ? | ?'} | {p[f'recall@{llm.PROBE_K}']:.4f} | {len(common_users)} | {pval} |")


if __name__ == "__main__":
    main()
