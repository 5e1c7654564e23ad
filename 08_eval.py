"""Stage 08: all-rank evaluation of every trained recommender in the run, beside reference rankings.

Full-shot ranks every item in the catalogue (warm and cold) with the user's training and validation items masked,
against the user's test items; zero-shot ranks only the cold items against the user's cold test items
(docs/spec.md, section 5). Recall@K = hits / |test items|; NDCG@K with IDCG over min(|test|, K). Users without
test items in a setting are skipped and counted; `id` models cannot score cold items, and their zero-shot rows say
so instead of reporting zeros.
References on the same users and candidates: random, popularity, content centroid, test-popularity oracle.

Reads data/split.npz, item_text_emb.npy, neighbors.npz, and every cf/<backbone>_<variant>_<source>_s<seed>/ of 07
(meta.json, and user_emb.npy + item_emb.npy, or for NCF topk_full.npz / topk_zero.npz).
Writes into --run:
  results/metrics.jsonl   one row per (backbone, variant, source, seed, setting, metric): value, users, skipped;
                          reference rows have variant "reference" and seed null
  results/per_user/<model>_<setting>.npz  per-user metrics (for paired tests), references as ref_<name>_<setting>
  results/tables.md       per setting: every model and reference, mean ± std over seeds, the change against Base and
                          against the content centroid (* for p < --alpha, paired t-test over users), ties@K (⚠ above
                          --tie-warn), zero item vectors; seconds per epoch (Table 3); models built by changed code
Run:
  python 08_eval.py --run runs/ml100k [--ks 20 40]
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

KS = common.EVAL_KS
ALPHA = 0.05              # significance level of the paired t-test
# ties@K is the share of top-K slots whose score equals the next slot's: where it is high, the tie rule, not the
# model, picked much of the list. References break ties at random (seeded); models break them toward the lower item
# index, and item indices are a seeded random numbering (01), so index order carries no information.
TIE_WARN = 0.05           # flag a row (⚠) when more than this share of its top-K slots are ties
SOURCE_ORDER = common.PROFILE_SOURCES[::-1]   # row order of Augment: 02's teacher (the upper bound) first
VARIANT_ORDER = ("base", "augment", "no_user_aug", "no_item_aug", "id")
REFERENCES = ("random", "popularity", "content centroid", "oracle: test popularity")


def parse_args(argv):
    p = common.stage_parser(__doc__)
    p.add_argument("--ks", type=common.positive_int, nargs="+", action=common.Distinct, default=list(KS),
                   help="cut-offs K of Recall@K and NDCG@K")
    p.add_argument("--alpha", type=common.open_fraction, default=ALPHA, help="significance level of the paired t-test")
    p.add_argument("--tie-warn", type=common.share, default=TIE_WARN, help="flag rows with more top-K ties than this")
    p.add_argument("--device", default=None, help="where the references rank (default: cuda if available)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def settings(split):
    """Per setting: (exclude CSR, test CSR, item subset or None)."""
    n_users = split["n_users"]
    seen_u = np.concatenate([split["train_u"], split["valid_u"]])
    seen_i = np.concatenate([split["train_i"], split["valid_i"]])
    exclude = common.csr(seen_u, seen_i, n_users)
    cold = np.isin(split["test_i"], split["cold_items"])
    return {"full": (exclude, common.csr(split["test_u"], split["test_i"], n_users), None),
            "zero": (exclude, common.csr(split["test_u"][cold], split["test_i"][cold], n_users),
                     torch.from_numpy(np.sort(split["cold_items"]).astype(np.int64)))}


# ----------------------------------------------------------------------------- models

def evaluate_model(folder, meta, setting, exclude, test, subset, ks):
    """Per-user metrics and ties of one trained model in one setting, or None where it cannot score it. Dot-product
    scorers are ranked here from user_emb.npy and item_emb.npy; NCF's score is not a dot product, so 07 ranks it and
    writes topk_<setting>.npz."""
    if setting == "zero" and not meta.get("can_score_cold", True):
        return None
    if meta.get("scorer", "dot") == "dot":
        user = torch.from_numpy(common.load_npy(folder / "user_emb.npy"))
        item = torch.from_numpy(common.load_npy(folder / "item_emb.npy"))
        return common.rank_eval(user, item, exclude, test, ks, subset)
    topk = common.load_npz(folder / f"topk_{setting}.npz")
    idx, scores = torch.from_numpy(topk["indices"]), torch.from_numpy(topk["scores"])
    if idx.shape[1] < max(ks) + 1:
        raise common.StageError(f"{folder}/topk_{setting}.npz holds top-{idx.shape[1]}, but K={max(ks)} needs "
                                f"{max(ks) + 1} (one more slot, to see ties); re-run 07 with --topk {max(ks) + 1}")
    m = common.ops().rank_metrics(idx[:, :max(ks)], test[0], test[1], list(ks))
    m.update(common.tie_shares(scores[:, :max(ks) + 1], ks))
    return common.metrics_numpy(m, ks)


# ----------------------------------------------------------------------------- references

def random_ranking(exclude, test, subset, n_items, ks):
    """Exact expected Recall@K / NDCG@K of a uniformly random ranking of each user's candidates: every slot
    holds one of the user's t test items with probability t / n (n candidates)."""
    cand = np.ones(n_items, dtype=bool) if subset is None else np.isin(np.arange(n_items), subset.numpy())
    ex_ptr, ex_col = exclude[0].numpy(), exclude[1].numpy()
    n_users = len(ex_ptr) - 1
    excluded = np.bincount(np.repeat(np.arange(n_users), np.diff(ex_ptr)), weights=cand[ex_col], minlength=n_users)
    n = (cand.sum() - excluded).astype(np.int64)
    t = np.diff(test[0].numpy())   # common.csr rows hold unique items
    cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(max(ks)) + 2))])   # cum[j]: DCG of j hits
    out = {}
    for k in ks:
        slots = np.minimum(k, n)
        dcg = cum[slots] * t / np.maximum(n, 1)
        idcg = cum[np.clip(t, 1, k)]
        has = t > 0
        out[f"recall@{k}"] = np.where(has, slots / np.maximum(n, 1), np.nan)
        out[f"ndcg@{k}"] = np.where(has, dcg / idcg, np.nan)
        out[f"ties@{k}"] = np.where(has, 0.0, np.nan)
    return out


def one_list(item_score, rng):
    """An item vector that ranks by `item_score`, ties broken at random: the same list for every user."""
    order = np.lexsort((rng.random(len(item_score)), -np.asarray(item_score, dtype=np.float64)))
    rank_score = np.empty(len(item_score), dtype=np.float32)
    rank_score[order] = np.arange(len(item_score), 0, -1)
    return torch.from_numpy(rank_score)[:, None]


def references(split, text_emb, item_nbrs, setups, ks, seed, device="cpu"):
    """Per setting, per reference name: per-user metrics of REFERENCES, on the models' users and candidates (a model
    that does not beat them has learnt nothing useful):
      random              the expected value of a uniformly random ranking (exact, per user)
      popularity          full-shot: training interactions per item; zero-shot: cold items by the mean training
                          popularity of their text-nearest warm items (neighbors.npz), since none has training rows
      content centroid    cosine(mean text embedding of the user's training items, item text embedding)
      oracle              items by their number of test interactions in the setting: it reads the test set, so it is
                          an upper reference for any one list shown to everyone, not a method"""
    n_users, n_items = split["n_users"], split["n_items"]
    rng = np.random.default_rng(seed)
    ones = torch.ones(n_users, 1)
    train_pop = np.bincount(split["train_i"], minlength=n_items).astype(np.float64)
    nbr_pop = train_pop.copy()   # cold items have no training rows: the popularity of their text neighbours
    cold = split["cold_items"]
    nbr_pop[cold] = train_pop[item_nbrs[cold]].mean(1)
    emb = text_emb / np.maximum(np.linalg.norm(text_emb, axis=1, keepdims=True), 1e-12)
    train = common.user_items(split["train_u"], split["train_i"], n_users)
    cent = common.history_centroids(train, emb)
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    out = {}
    for setting, (exclude, test, subset) in setups.items():
        test_pop = np.bincount(test[1].numpy(), minlength=n_items)
        rank = lambda u, i: common.rank_eval(u, i, exclude, test, ks, subset)
        out[setting] = {
            "random": random_ranking(exclude, test, subset, n_items, ks),
            "popularity": rank(ones, one_list(train_pop if setting == "full" else nbr_pop, rng)),
            "content centroid": rank(torch.from_numpy(cent).to(device),
                                     torch.from_numpy(emb.astype(np.float32)).to(device)),
            "oracle: test popularity": rank(ones, one_list(test_pop, rng)),
        }
    return out


# ----------------------------------------------------------------------------- tables

def change(ref, other, alpha):
    """'+x.x%' of other's mean over ref's on the users both score (absolute difference where ref is 0),
    with * when a paired t-test over users gives p < alpha."""
    ok = np.isfinite(ref) & np.isfinite(other)
    if ok.sum() == 0:
        return "—"
    r, o = ref[ok].mean(), other[ok].mean()
    text = f"{(o - r) / r * 100:+.1f}%" if r > 0 else f"{o - r:+.4f}"
    if ok.sum() > 1 and not np.allclose(ref[ok], other[ok]) and stats.ttest_rel(other[ok], ref[ok]).pvalue < alpha:
        text += "*"
    return text


def mean_std(per_seed_means):
    m = np.mean(per_seed_means)
    return f"{m:.4f} ± {np.std(per_seed_means, ddof=1):.4f}" if len(per_seed_means) > 1 else f"{m:.4f}"


def model_order(key):
    b, v, s = key
    return (b, VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99,
            SOURCE_ORDER.index(s) if s in SOURCE_ORDER else 99, s)


def setting_table(runs, refs, meta_by_key, metrics, ks, alpha, tie_warn):
    """One markdown table: the references, then every model. runs[key] = {seed: per-user dict}; refs[name] =
    per-user dict. A change against Base is measured on the seeds both have (seed-averaged per user)."""
    k0 = ks[0]
    heads = [f"recall@{k0}", f"ndcg@{k0}"]
    cols = (["Model", "Variant", "Source", "seeds"] + metrics
            + [f"{h} vs {w}" for h in heads for w in ("Base", "centroid")] + [f"ties@{k0}", "zero items"])
    centroid = refs["content centroid"]

    def seed_avg(by_seed, names, seeds=None):
        seeds = sorted(by_seed) if seeds is None else seeds
        return {m: np.mean([by_seed[x][m] for x in seeds], axis=0) for m in names}

    def line(name, variant, source, by_seed, base, zero):
        avg = seed_avg(by_seed, list(next(iter(by_seed.values()))))
        both = sorted(set(by_seed) & set(base)) if base else []
        cells = [name, variant, source, str(len(by_seed))]
        cells += [mean_std([np.nanmean(p[m]) for p in by_seed.values()]) for m in metrics]
        for h in heads:
            cells.append(change(seed_avg(base, [h], both)[h], seed_avg(by_seed, [h], both)[h], alpha) if both else "")
            cells.append(change(centroid[h], avg[h], alpha) if name != "content centroid" else "")
        ties = float(np.nanmean(avg[f"ties@{k0}"]))
        cells += [("⚠ " if ties > tie_warn else "") + f"{ties:.1%}", zero]
        return "| " + " | ".join(cells) + " |"

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name in REFERENCES:
        out.append(line(name, "reference", "—", {None: refs[name]}, None, "—"))
    for key in sorted(meta_by_key, key=model_order):
        b, v, s = key
        zero = ", ".join(sorted({str(m.get("zero_items", "—")) for m in meta_by_key[key]}))
        if key not in runs:   # cannot score this setting (id models, zero-shot)
            out.append("| " + " | ".join([b, v, s, str(len(meta_by_key[key]))] + ["n/a"] * (len(cols) - 6)
                                         + ["", zero]) + " |")
            continue
        base = runs.get((b, "base", "none")) if v != "base" else None
        out.append(line(b, v, s, runs[key], base, zero))
    return out


def code_changes(run, stage, manifest=None):
    """{stage: [code files]} for `stage` and every stage upstream of it (through the producers of the inputs it
    recorded) whose recorded sha256 of a code file (its script, or a module it imports: common.stage_code) differs
    from the current file: results built by code that has changed since. Stages recorded without code hashes are
    left out."""
    manifest = manifest or common.read_manifest(run)
    out, todo, seen = {}, [stage], set()
    while todo:
        name = todo.pop()
        rec = manifest["stages"].get(name)
        if name in seen or rec is None:
            continue
        seen.add(name)
        changed = [f for f, sha in rec.get("code", {}).get("files", {}).items()
                   if not (common.REPO / f).is_file() or common.sha256_file(common.REPO / f) != sha]
        if changed:
            out[name] = sorted(changed)
        todo += [p for p in (common.producer_of(manifest, up) for up in rec.get("inputs", {})) if p]
    return out


def code_note(run, folders):
    """One line for tables.md: which models were built (by 07, or upstream of it: 06's prompts, 03-05's models) by
    code that has changed since (code_changes), or that every model comes from the current code."""
    manifest = common.read_manifest(run)
    changed, unknown = defaultdict(list), []
    for f in folders:
        stage = f"07_train_cf/{f.name}"
        if "code" not in manifest["stages"].get(stage, {}):
            unknown.append(f.name)
            continue
        files = sorted({x for fs in code_changes(run, stage, manifest).values() for x in fs})
        if files:
            changed[", ".join(files)].append(f.name)
    parts = [f"{files} changed since {len(names)} model(s) were built ({', '.join(names[:3])}"
             f"{', …' if len(names) > 3 else ''})" for files, names in changed.items()]
    if unknown:
        parts.append(f"{len(unknown)} model(s) were recorded without code hashes")
    rev = common.git_revision() or "unknown"
    if not parts:
        return f"Code: every model was built by the current code (git {rev})."
    return f"⚠ Code: {'; '.join(parts)}; re-run them to get results of the current code (git {rev})."


def timing_table(meta_by_key):
    out = ["| Backbone | Variant | Source | s/epoch | vs Base | best epochs | epochs run |",
           "|---|---|---|---|---|---|---|"]
    for key in sorted(meta_by_key, key=model_order):
        ms = meta_by_key[key]
        sec = np.mean([m["seconds_per_epoch"] for m in ms])
        base = meta_by_key.get((key[0], "base", "none"))
        ratio = f"{sec / np.mean([m['seconds_per_epoch'] for m in base]):.2f}x" if base and key[1] != "base" else ""
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {sec:.3f} | {ratio} | "
                   f"{', '.join(str(m['best_epoch']) for m in ms)} | "
                   f"{', '.join(str(m.get('epochs_run', '')) for m in ms)} |")
    return out


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    run = Path(args.run)
    common.setup_logging(run, "08_eval")
    folders = sorted(p for p in (run / "cf").glob("*_s*") if (p / "meta.json").exists())
    if not folders:
        raise common.StageError(f"no trained models under {run / 'cf'}; run 07_train_cf.py first")
    inputs = ["data/split.npz", "item_text_emb.npy", "neighbors.npz"] + [
        str(f.relative_to(run) / n) for f in folders for n in sorted(
            x.name for x in f.iterdir() if x.suffix in (".npy", ".npz", ".json"))]
    common.check_inputs(run, inputs, args.force)
    split = common.load_split(run)
    if max(args.ks) >= split["n_items"]:  # top-K also reads slot K (ties@K), so K < the items there are
        raise common.UsageError(f"--ks {max(args.ks)}: expected each K below the {split['n_items']} items")
    setups = settings(split)
    ks = sorted(args.ks)
    metrics = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks]
    saved = metrics + [f"ties@{k}" for k in ks]

    common.log.info("08: reference rankings (random, popularity, content centroid, oracle)")
    refs = references(split, common.load_npy(run / "item_text_emb.npy"), common.load_neighbors(run)["item_nbrs"],
                      setups, ks, args.seed, args.device)
    rows, per_user_files = [], []

    def save_per_user(name, m):
        rel = f"results/per_user/{name}.npz"
        common.save_npz(run / rel, **{k: m[k] for k in saved})
        per_user_files.append(rel)

    def add_rows(ident, setting, m):
        for name in saved:
            v = m[name]
            rows.append({**ident, "setting": setting, "metric": name, "value": float(np.nanmean(v)),
                         "users": int(np.isfinite(v).sum()), "skipped_users": int(np.isnan(v).sum())})
    for setting, by_name in refs.items():
        for name, m in by_name.items():
            save_per_user(f"ref_{name.split(':')[0].replace(' ', '_')}_{setting}", m)
            add_rows({"backbone": name, "variant": "reference", "source": "none", "seed": None}, setting, m)

    runs, meta_by_key = {s: defaultdict(dict) for s in setups}, defaultdict(list)
    for folder in tqdm(folders, desc="08 evaluate", unit="model"):
        meta = json.loads((folder / "meta.json").read_text())
        key = (meta["backbone"], meta["variant"], meta["source"])
        meta_by_key[key].append(meta)
        ident = dict(zip(("backbone", "variant", "source"), key), seed=meta["seed"])
        for setting, (exclude, test, subset) in setups.items():
            m = evaluate_model(folder, meta, setting, exclude, test, subset, ks)
            if m is None:
                rows.append({**ident, "setting": setting, "metric": None, "value": None,
                             "note": "ID item embeddings cannot score cold items"})
                continue
            save_per_user(f"{folder.name}_{setting}", m)
            runs[setting][key][meta["seed"]] = m
            add_rows(ident, setting, m)

    n_cold_users = int(np.isfinite(refs["zero"]["random"][f"recall@{ks[0]}"]).sum())
    n_full_users = int(np.isfinite(refs["full"]["random"][f"recall@{ks[0]}"]).sum())
    md = [f"# Results of {run}", "",
          f"Mean ± std over seeds; 'vs' columns: change of the seed-averaged mean, * where a paired t-test over users "
          f"gives p < {args.alpha}; ties@{ks[0]}: share of top-{ks[0]} slots tied with the next (⚠ above "
          f"{args.tie_warn:.0%}); zero items: item vectors that are zero or non-finite (per seed).", "",
          code_note(run, folders), "",
          f"## Full-shot: all {split['n_items']} items, {n_full_users} users", "",
          *setting_table(runs["full"], refs["full"], meta_by_key, metrics, ks, args.alpha, args.tie_warn), "",
          f"## Zero-shot: the {len(split['cold_items'])} cold items, {n_cold_users} users with cold test items", "",
          *setting_table(runs["zero"], refs["zero"], meta_by_key, metrics, ks, args.alpha, args.tie_warn), "",
          "## Seconds per training epoch (training only), best epochs by validation Recall@20", "",
          *timing_table(meta_by_key)]
    md = "\n".join(md) + "\n"
    common.write_jsonl(run / "results" / "metrics.jsonl", rows)
    common.write_text(run / "results" / "tables.md", md)
    print(md)
    common.record_stage(run, "08_eval", args, inputs, ["results/metrics.jsonl", "results/tables.md", *per_user_files],
                        started)


if __name__ == "__main__":
    common.run_stage(main)
