"""Stage 08: all-rank evaluation of every trained recommender in the run, and the paper's tables.

Reads data/split.npz and every cf/<backbone>_<variant>_<source>_s<seed>/ written by 07
(meta.json, and user_emb.npy + item_emb.npy for dot-product scorers, or topk_full.npz / topk_zero.npz
for NCF, whose score is not a dot product and is ranked by 07 itself).
Writes into --run:
  results/metrics.jsonl   one row per (backbone, variant, source, seed, setting, metric): value, users, skipped
  results/per_user/<model>_<setting>.npz  per-user metrics (for paired tests)
  results/tables.md       Table 1 (Base vs Augment, improvement, * for p < 0.05 in a paired t-test over
                          users), Table 2 (no_user_aug / no_item_aug), the profile-source ablation, Table 3
                          (seconds per epoch), and the ID-embedding reference
Run:
  python 08_eval.py --run runs/ml100k [--ks 20 40]

Protocol (SPEC section 5): full-shot ranks every item in the catalogue (warm and cold) with the user's
training and validation items masked, against the user's test items; zero-shot ranks only the cold
items against the user's cold test items. Recall@K = hits / |test items|; NDCG@K with IDCG over
min(|test|, K). Users without test items in a setting are skipped and counted. With several seeds the
per-user metrics are averaged over seeds before the mean and the t-test. `id` models cannot score
cold items: their zero-shot rows say so instead of reporting zeros.
"""
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

import common

KS = (20, 40)
AUGMENT_SOURCE = "ppo"            # the source shown in Table 1 when it exists
SOURCES = ("base_llm", "sft_gpt_kd", "sft_naive", "sft_mask", "ppo")


def parse_args(argv):
    p = common.stage_parser(__doc__)
    p.add_argument("--ks", type=int, nargs="+", default=list(KS), help="cut-offs K of Recall@K and NDCG@K")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the paired t-test")
    return p.parse_args(argv)


def settings(split):
    """Per setting: (exclude CSR, test CSR, item subset)."""
    n_users = split["n_users"]
    seen_u = np.concatenate([split["train_u"], split["valid_u"]])
    seen_i = np.concatenate([split["train_i"], split["valid_i"]])
    exclude = common.csr(seen_u, seen_i, n_users)
    cold = np.isin(split["test_i"], split["cold_items"])
    return {"full": (exclude, common.csr(split["test_u"], split["test_i"], n_users), None),
            "zero": (exclude, common.csr(split["test_u"][cold], split["test_i"][cold], n_users),
                     torch.from_numpy(split["cold_items"].astype(np.int64)))}


def evaluate_model(folder, meta, setting, exclude, test, subset, ks):
    """Per-user metrics of one trained model in one setting, or None where it cannot score it."""
    if setting == "zero" and not meta.get("can_score_cold", True):
        return None
    if meta.get("scorer", "dot") == "dot":
        user = torch.from_numpy(np.load(folder / "user_emb.npy"))
        item = torch.from_numpy(np.load(folder / "item_emb.npy"))
        return common.rank_eval(user, item, exclude, test, ks, subset)
    topk = torch.from_numpy(np.load(folder / f"topk_{setting}.npz")["indices"])
    if topk.shape[1] < max(ks):
        raise ValueError(f"{folder}/topk_{setting}.npz holds top-{topk.shape[1]}, fewer than K={max(ks)}")
    m = common.ops().rank_metrics(topk, test[0], test[1], list(ks))
    return {name: v.numpy() for name, v in m.items()}


def fmt(x):
    return "—" if x is None or not np.isfinite(x) else f"{x:.4f}"


def compare(base, other, alpha):
    """Mean of `other`, improvement over `base` in %, and '*' if a paired t-test over users gives p < alpha."""
    ok = np.isfinite(base) & np.isfinite(other)
    b, o = base[ok].mean(), other[ok].mean()
    improve = (o - b) / b * 100 if b > 0 else float("nan")
    star = ""
    if ok.sum() > 1 and not np.allclose(base[ok], other[ok]):
        star = "*" if stats.ttest_rel(other[ok], base[ok]).pvalue < alpha and o > b else ""
    return o, improve, star


def tables(per_user, meta_by_key, metrics, alpha):
    """Markdown tables in the layout of the paper's Tables 1-3 for whatever exists in the run."""
    backbones = sorted({k[0] for k in per_user})
    head = "| Backbone | Variant | " + " | ".join(f"{s} {m}" for s in ("full", "zero") for m in metrics) + " |"
    sep = "|" + "---|" * (2 + 2 * len(metrics))
    out = []

    def row(label_b, label_v, key, base_key=None):
        cells = []
        for s in ("full", "zero"):
            for m in metrics:
                cur = per_user.get(key, {}).get(s)
                if cur is None:
                    cells.append("n/a" if key in per_user else "—")
                    continue
                if base_key and per_user.get(base_key, {}).get(s) is not None:
                    o, imp, star = compare(per_user[base_key][s][m], cur[m], alpha)
                    cells.append(f"{o:.4f}{star} ({imp:+.1f}%)" if np.isfinite(imp) else f"{o:.4f}{star}")
                else:
                    cells.append(fmt(np.nanmean(cur[m])))
        return f"| {label_b} | {label_v} | " + " | ".join(cells) + " |"

    aug_sources = sorted({k[2] for k in per_user if k[1] == "augment"},
                         key=lambda s: (s != AUGMENT_SOURCE, s))
    src = aug_sources[0] if aug_sources else None
    out += [f"## Table 1: Base vs Augment (profiles from `{src}`)" if src else "## Table 1: Base", "",
            "Augment cells: value, * if better than Base with p < %.2f (paired t-test over users), (change vs Base)." % alpha,
            "", head, sep]
    for b in backbones:
        out.append(row(b, "Base", (b, "base", "none")))
        if src:
            out.append(row(b, "Augment", (b, "augment", src), (b, "base", "none")))
    if any(k[1] in ("no_user_aug", "no_item_aug") for k in per_user):
        out += ["", f"## Table 2: one side augmented (profiles from `{src}`)", "", head, sep]
        for b in backbones:
            for v in ("no_user_aug", "no_item_aug", "augment"):
                if (b, v, src) in per_user:
                    out.append(row(b, v, (b, v, src), (b, "base", "none")))
    if len(aug_sources) > 1:
        out += ["", "## Ablation: which model wrote the profiles (Augment)", "", head, sep]
        for b in backbones:
            for s in [s for s in SOURCES if s in aug_sources] + [s for s in aug_sources if s not in SOURCES]:
                out.append(row(b, s, (b, "augment", s), (b, "base", "none")))
    out += ["", "## Table 3: seconds per training epoch", "", "| Backbone | Variant | Source | s/epoch | best epoch |",
            "|---|---|---|---|---|"]
    for key in sorted(meta_by_key):
        ms = meta_by_key[key]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {np.mean([m['seconds_per_epoch'] for m in ms]):.3f} | "
                   f"{', '.join(str(m['best_epoch']) for m in ms)} |")
    if any(k[1] == "id" for k in per_user):
        out += ["", "## Reference: ID-embedding models (textbook backbones, no text; cannot score cold items)",
                "", head, sep]
        for b in backbones:
            if (b, "id", "none") in per_user:
                out.append(row(b, "id", (b, "id", "none")))
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    run = Path(args.run)
    common.setup_logging(run, "08_eval")
    folders = sorted(p for p in (run / "cf").glob("*_s*") if (p / "meta.json").exists())
    if not folders:
        raise SystemExit(f"08: no trained models under {run / 'cf'}; run 07_train_cf.py first")
    inputs = ["data/split.npz"] + [str(f.relative_to(run) / n) for f in folders for n in sorted(
        x.name for x in f.iterdir() if x.suffix in (".npy", ".npz", ".json"))]
    common.check_inputs(run, inputs, args.force)
    split = common.load_split(run)
    setups = settings(split)
    metrics = [f"{m}@{k}" for m in ("recall", "ndcg") for k in args.ks]

    rows, seeds_of, meta_by_key = [], defaultdict(lambda: defaultdict(list)), defaultdict(list)
    for folder in tqdm(folders, desc="08 evaluate", unit="model"):
        meta = json.loads((folder / "meta.json").read_text())
        key = (meta["backbone"], meta["variant"], meta["source"])
        meta_by_key[key].append(meta)
        for setting, (exclude, test, subset) in setups.items():
            m = evaluate_model(folder, meta, setting, exclude, test, subset, args.ks)
            if m is None:
                rows.append({**dict(zip(("backbone", "variant", "source"), key)), "seed": meta["seed"],
                             "setting": setting, "metric": None, "value": None,
                             "note": "ID item embeddings cannot score cold items"})
                continue
            common.save_npz(run / "results" / "per_user" / f"{folder.name}_{setting}.npz", **m)
            seeds_of[key][setting].append(m)
            for name in metrics:
                v = m[name]
                rows.append({"backbone": key[0], "variant": key[1], "source": key[2], "seed": meta["seed"],
                             "setting": setting, "metric": name, "value": float(np.nanmean(v)),
                             "users": int(np.isfinite(v).sum()), "skipped_users": int(np.isnan(v).sum())})
    # per-user metrics averaged over seeds; a setting is None where the model cannot score it
    per_user = {key: {s: ({name: np.mean([m[name] for m in ms], axis=0) for name in metrics}
                          if (ms := by_setting.get(s)) else None) for s in setups}
                for key, by_setting in seeds_of.items()}
    for key in meta_by_key:
        per_user.setdefault(key, {s: None for s in setups})
    md = tables(per_user, meta_by_key, metrics, args.alpha)
    common.write_jsonl(run / "results" / "metrics.jsonl", rows)
    common.write_text(run / "results" / "tables.md", md)
    print(md)
    outputs = ["results/metrics.jsonl", "results/tables.md"]
    common.record_stage(run, "08_eval", args, inputs, outputs, started)


if __name__ == "__main__":
    main()
