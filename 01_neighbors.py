"""Stage 01: the split, item text embeddings, LightGCN user embeddings, similar users and items.

Reads the raw data: ml-100k from the recbole wheel by default; MIND, Netflix or your CSV with --dataset and
--data-dir (the formats: data.py and README, "Your own data").
Writes into --run:
  data/split.npz        train/valid/test (u, i) arrays in time order, cold_items, n_users, n_items
  data/items.jsonl      {"item", "raw_id", "text"}       data/users.jsonl  {"user", "raw_id"}
  data/split_stats.json sizes, cold counts, merged duplicates, id order, the training cap and what it did, and the
                        LightGCN's validation Recall@20 (logged too, so that a bad neighbour model shows)
  item_text_emb.npy     L2-normalised text-encoder embeddings of the item texts [n_items, d_t]
  lightgcn_users.npy    user embeddings of a LightGCN trained with BPR on the training graph
  neighbors.npz         user_nbrs/user_sims: top-k cosine over LightGCN users; item_nbrs/item_sims: top-k cosine over
                        item texts among warm items (those with training rows); self excluded
Users and items are numbered in a random order seeded by --seed; the raw ids are kept in users.jsonl and items.jsonl.
Run:
  python 01_neighbors.py --run runs/ml100k
  python 01_neighbors.py --run runs/mind --dataset mind --data-dir MINDsmall_train --split snapshot --cutoff 2019-11-14
  python 01_neighbors.py --run runs/ml100k_n5 --max-train-per-user 5        # the data-scarce setting
"""
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import data

# ----------------------------------------------------------------------------- defaults
DATASET, SPLIT, COLD_FRAC, TEST_FRAC, VALID_FRAC = "ml-100k", "cold-items", 0.2, 0.2, 0.1
# The data-scarce setting (--max-train-per-user N): after the split each user keeps at most N training rows, N at
# random (seeded by --seed) or the earliest N (--scarce-keep earliest); validation and test are unchanged, and test
# items left with no training or validation row join cold_items (split_stats.json: n_cold_items_from_cap,
# n_train_u_before_cap). The LightGCN and both neighbour lists are computed on the reduced training set.
MAX_TRAIN_PER_USER, SCARCE_KEEP = 0, "random"  # 0: no cap (the dense setting)
K_NEIGHBORS = 5
DIM, LAYERS, LR, L2, BATCH = 64, 2, 5e-3, 1e-4, 2048
MAX_EPOCHS, EVAL_EVERY, PATIENCE = 150, 5, 4   # patience counts evaluations


def parse_args(argv):
    p = common.stage_parser(__doc__)
    p.add_argument("--dataset", default=DATASET, choices=["ml-100k", "mind", "netflix", "csv"], help="raw format")
    p.add_argument("--data-dir", type=Path, default=None, help="raw files (ml-100k: the recbole wheel's copy)")
    p.add_argument("--min-rating", type=float, default=0.0, help="keep ratings >= this (ml-100k, netflix)")
    p.add_argument("--start", default=None, help="netflix: keep ratings on or after this ISO date (YYYY-MM-DD)")
    p.add_argument("--end", default=None, help="netflix: keep ratings before this ISO date (exclusive)")
    p.add_argument("--split", default=SPLIT, choices=["cold-items", "snapshot"], help="see README: Splits")
    p.add_argument("--cold-frac", type=common.fraction, default=COLD_FRAC,
                   help="cold-items: newest fraction of items held out")
    p.add_argument("--test-frac", type=common.fraction, default=TEST_FRAC,
                   help="cold-items: each user's latest fraction to test")
    p.add_argument("--cutoff", default=None, help="snapshot split: a timestamp or ISO date")
    p.add_argument("--valid-frac", type=common.open_fraction, default=VALID_FRAC,
                   help="each user's latest training fraction to validation")
    p.add_argument("--max-train-per-user", type=common.non_negative_int, default=MAX_TRAIN_PER_USER,
                   help="data-scarce setting: each user keeps at most N training rows (0: all)")
    p.add_argument("--scarce-keep", default=SCARCE_KEEP, choices=["random", "earliest"],
                   help="which training rows the cap keeps (random: seeded by --seed)")
    p.add_argument("--encoder", default="default",
                   help="text encoder: local path or hub id (default: the shipped MiniLM)")
    p.add_argument("--k", type=common.positive_int, default=K_NEIGHBORS, help="neighbours per user and per item")
    p.add_argument("--dim", type=common.positive_int, default=DIM, help="LightGCN embedding size")
    p.add_argument("--layers", type=common.non_negative_int, default=LAYERS, help="LightGCN propagation layers")
    p.add_argument("--lr", type=common.positive_float, default=LR, help="Adam learning rate")
    p.add_argument("--l2", type=common.non_negative_float, default=L2,
                   help="L2 weight on the batch's layer-0 embeddings")
    p.add_argument("--batch-size", type=common.positive_int, default=BATCH, help="BPR triples per step")
    p.add_argument("--max-epochs", type=common.positive_int, default=MAX_EPOCHS, help="epoch cap")
    p.add_argument("--eval-every", type=common.positive_int, default=EVAL_EVERY, help="epochs between validations")
    p.add_argument("--patience", type=common.positive_int, default=PATIENCE,
                   help="validations without improvement before stopping")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p.parse_args(argv)


def train_lightgcn(split, args):
    """BPR LightGCN with ID embeddings; returns the best (by validation Recall@20) user embeddings."""
    n_users, n_items = split["n_users"], split["n_items"]
    adj = common.norm_adj(split["train_u"], split["train_i"], n_users, n_items).to(args.device)
    emb = torch.nn.Parameter(0.1 * torch.randn(n_users + n_items, args.dim, device=args.device))
    opt = torch.optim.Adam([emb], lr=args.lr)
    sampler = common.BPRSampler(split["train_u"], split["train_i"], n_items, args.seed)
    exclude = common.csr(split["train_u"], split["train_i"], n_users)
    valid = common.csr(split["valid_u"], split["valid_i"], n_users)
    best, best_recall, best_epoch, bad = None, -1.0, 0, 0
    bar = tqdm(range(1, args.max_epochs + 1), desc="01 LightGCN", unit="epoch")
    for epoch in bar:
        total = 0.0
        for u, pos, neg in sampler.epoch(args.batch_size):
            u, pos, neg = u.to(args.device), pos.to(args.device), neg.to(args.device)
            out = common.lightgcn(adj, emb, args.layers)
            eu, ep, en = out[u], out[n_users + pos], out[n_users + neg]
            loss, _ = common.bpr_loss((eu * ep).sum(-1), (eu * en).sum(-1),
                                      (emb[u], emb[n_users + pos], emb[n_users + neg]), args.l2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        if epoch % args.eval_every and epoch != args.max_epochs:
            continue
        with torch.no_grad():
            out = common.lightgcn(adj, emb, args.layers)
        recall = float(np.nanmean(
            common.rank_eval(out[:n_users], out[n_users:], exclude, valid, ks=(20,))["recall@20"]))
        bar.set_postfix(loss=f"{total / sampler.n_batches(args.batch_size):.4f}", valid_r20=f"{recall:.4f}")
        if recall > best_recall:
            best, best_recall, best_epoch, bad = out[:n_users].detach().cpu().clone(), recall, epoch, 0
        else:
            bad += 1
            if bad >= args.patience:
                break
    common.log.info("neighbour LightGCN: best validation Recall@20 %.4f at epoch %d", best_recall, best_epoch)
    return best, best_recall, best_epoch


def top_k_cosine(query, keys, k, key_ids, device="cpu"):
    """Top-k cosine neighbours of query row r (whose id is r) among `keys` (the rows of ids key_ids),
    never r itself, computed on `device`. Returns neighbour ids and similarities, best first."""
    unit = lambda x: torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1).contiguous()
    own = np.full(len(query), -1)
    own[key_ids] = np.arange(len(key_ids))  # where each query's own id sits among the keys
    rowptr = torch.from_numpy(np.concatenate([[0], np.cumsum(own >= 0)]).astype(np.int64))
    sims, idx = common.ops().topk_scores(unit(query).to(device), unit(keys).to(device), k=k,
                                          exclude_rowptr=rowptr.to(device),
                                          exclude_col=torch.from_numpy(own[own >= 0].astype(np.int64)).to(device))
    return key_ids[idx.cpu().numpy()], sims.cpu().numpy()


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    common.setup_logging(args.run, "01_neighbors")
    common.seed_everything(args.seed)
    run = Path(args.run)

    raw = data.load_dataset(args.dataset, args.data_dir, args.min_rating, args.start, args.end)
    split, user_raw, item_raw, stats = data.make_split(raw, args.split, args.cold_frac, args.test_frac,
                                                       args.cutoff, args.valid_frac, args.seed,
                                                       args.max_train_per_user, args.scarce_keep)
    common.log.info("%s split %s: %s", raw.name, args.split, stats)
    texts = [raw.item_text[r] for r in item_raw]

    item_emb = common.encode_texts(texts, args.encoder, desc="01 item texts")
    user_emb, best_recall, best_epoch = train_lightgcn(split, args)
    # neighbour candidates are items with training rows (06's warm items, the ones with profiles), so that cold items
    # get warm neighbours; under --max-train-per-user some non-cold items keep only validation rows, or none
    warm = np.unique(split["train_i"])
    if split["n_users"] <= args.k or len(warm) <= args.k:
        raise common.StageError(f"need more than k={args.k} users and warm items for neighbours")
    user_nbrs, user_sims = top_k_cosine(user_emb, user_emb, args.k, np.arange(split["n_users"]), args.device)
    item_nbrs, item_sims = top_k_cosine(item_emb, item_emb[warm], args.k, key_ids=warm, device=args.device)

    stats.update(dataset=raw.name, lightgcn_valid_recall20=best_recall, lightgcn_best_epoch=best_epoch)
    common.save_npz(run / "data" / "split.npz", **split)
    common.write_jsonl(run / "data" / "items.jsonl",
                       [{"item": k, "raw_id": r, "text": t} for k, (r, t) in enumerate(zip(item_raw, texts))])
    common.write_jsonl(run / "data" / "users.jsonl", [{"user": k, "raw_id": r} for k, r in enumerate(user_raw)])
    common.write_json(run / "data" / "split_stats.json", stats)
    common.save_npy(run / "item_text_emb.npy", item_emb)
    common.save_npy(run / "lightgcn_users.npy", user_emb.numpy().astype(np.float32))
    common.save_npz(run / "neighbors.npz", user_nbrs=user_nbrs, user_sims=user_sims.astype(np.float32),
                    item_nbrs=item_nbrs, item_sims=item_sims.astype(np.float32))
    outputs = ["data/split.npz", "data/items.jsonl", "data/users.jsonl", "data/split_stats.json",
               "item_text_emb.npy", "lightgcn_users.npy", "neighbors.npz"]
    common.record_stage(run, "01_neighbors", args, [], outputs, started)


if __name__ == "__main__":
    common.run_stage(main)
