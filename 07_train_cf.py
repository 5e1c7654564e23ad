"""Stage 07: train the collaborative-filtering recommenders, Base vs Augment (paper section 2.2).

Items have no ID embedding: an item is its text (item_text_emb.npy), so cold items can be scored.
  base         item = normalize(T_raw(f_v))                       user = x_u (ID embedding)
  augment      item = normalize(Psi_i([T_raw(f_v), T_pro(p_v)]))   user = Psi_u([x_u, normalize(T_pro(p_u))])
  no_user_aug  augmented items, base users          no_item_aug  augmented users, base items
  id           the textbook model: items are ID embeddings, no text (cannot score cold items)
with p_u, p_v the profile embeddings of --source (06), Psi as --fusion says (Fusion), on biasmf, ncf, lightgcn,
sgl, simgcl (--backbone all). Training: BPR + L2, Adam, negatives from warm items, early stopping on validation
Recall@20 after --min-epochs; test is never read. A model already trained with the same arguments on current
inputs is skipped (--redo retrains; a stale input retrains it).

Reads  data/split.npz, item_text_emb.npy; augment variants: profiles/<source>/user_emb.npy, item_emb.npy
Writes cf/<backbone>_<variant>_<source>_s<seed>/ (source `none` for base and id): model.pt (best by validation
       Recall@20), log.jsonl (per epoch), meta.json (best epoch, seconds per epoch, scorer, collapse counts,
       args), and user_emb.npy + item_emb.npy (scorer "dot") or, for ncf, topk_full.npz / topk_zero.npz
       (`indices` int64, `scores` float32 [n_users, TOPK], train and valid items excluded, -1 / -inf padding)
Run    python 07_train_cf.py --run runs/ml100k --backbone lightgcn --variant base
       python 07_train_cf.py --run runs/ml100k --backbone all --variant base augment --source ppo --seeds 0 1 2
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# ----------------------------------------------------------------------------- defaults
BACKBONES = ("biasmf", "ncf", "lightgcn", "sgl", "simgcl")
VARIANTS = ("base", "augment", "no_user_aug", "no_item_aug", "id")
DIM, LAYERS, LR, L2, BATCH = 32, 2, 5e-3, 1e-4, 4096
MAX_EPOCHS, EVAL_EVERY = 1000, 5
# lr 5e-3: on ml-100k validation recall dips after the first epochs and recovers, and Base peaks late, so patience
# alone stops the Augment models undertrained: never stop before MIN_EPOCHS.
MIN_EPOCHS, PATIENCE = 100, 50
FUSION = "residual"                                # Psi; see the docstring ("relu" is the paper's)
# SGL / SimGCL. At the SGL/SimGCL papers' weights (0.1-0.02 at temperature 0.2), InfoNCE's gradient on ml-100k
# (batch 4096, d 32) dwarfs BPR's and BPR never leaves log(2), so the model learns no ranking. Weight 0.01 at
# temperature 0.5 (in the paper's search space) trains.
CL_WEIGHT, CL_TEMP, EDGE_DROP, NOISE_EPS = 0.01, 0.5, 0.1, 0.1
TOPK = max(common.EVAL_KS) + 1                     # NCF: ranked items written for 08: its largest K + 1,
                                                   # so that 08 can see a tie at slot K


def parse_args(argv):
    p = common.stage_parser(__doc__)
    d = " (default: %(default)s)"
    p.add_argument("--backbone", nargs="+", default=["lightgcn"], choices=BACKBONES + ("all",), help="one or more" + d)
    p.add_argument("--variant", nargs="+", default=["base"], choices=VARIANTS + ("all",), help="one or more" + d)
    p.add_argument("--source", default="ppo", help="profiles/<source>/ for the augment variants" + d)
    p.add_argument("--seeds", type=int, nargs="+", action=common.Distinct, default=None,
                   help="one model per seed (default: --seed)")
    p.add_argument("--dim", type=common.positive_int, default=DIM, help="representation size d" + d)
    p.add_argument("--layers", type=common.non_negative_int, default=LAYERS,
                   help="graph backbones: propagation layers" + d)
    p.add_argument("--lr", type=common.positive_float, default=LR, help="Adam learning rate" + d)
    p.add_argument("--l2", type=common.non_negative_float, default=L2,
                   help="L2 weight: batch rows of ID embeddings, and Adam weight decay on Linear weights" + d)
    p.add_argument("--fusion", default=FUSION, choices=["residual", "linear", "relu"],
                   help="Psi, the fusion of [x, profile]; relu is the paper's (can collapse cold items)" + d)
    p.add_argument("--batch-size", type=common.positive_int, default=BATCH, help=d.strip())
    p.add_argument("--max-epochs", type=common.positive_int, default=MAX_EPOCHS, help=d.strip())
    p.add_argument("--eval-every", type=common.positive_int, default=EVAL_EVERY, help="epochs between validations" + d)
    p.add_argument("--patience", type=common.positive_int, default=PATIENCE,
                   help="stop after this many epochs without a better validation Recall@20" + d)
    p.add_argument("--min-epochs", type=common.non_negative_int, default=MIN_EPOCHS,
                   help="never stop early before this epoch" + d)
    p.add_argument("--redo", action="store_true", help="retrain models already trained on the current inputs")
    p.add_argument("--cl-weight", type=common.non_negative_float, default=CL_WEIGHT,
                   help="SGL/SimGCL: InfoNCE weight" + d)
    p.add_argument("--cl-temp", type=common.positive_float, default=CL_TEMP, help="SGL/SimGCL: InfoNCE temperature" + d)
    p.add_argument("--edge-drop", type=common.fraction, default=EDGE_DROP,
                   help="SGL: fraction of edges dropped per view" + d)
    p.add_argument("--noise-eps", type=common.non_negative_float, default=NOISE_EPS, help="SimGCL: noise magnitude" + d)
    p.add_argument("--neg-pool", default="warm", choices=["warm", "all"],
                   help="BPR negatives from the warm items (cold ones belong to the test period) or all items" + d)
    p.add_argument("--topk", type=common.positive_int, default=TOPK,
                   help="NCF: ranked items per user written for 08" + d)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help=d.strip())
    args = p.parse_args(argv)
    args.backbone = list(BACKBONES) if "all" in args.backbone else args.backbone
    args.variant = list(VARIANTS) if "all" in args.variant else args.variant
    args.seeds = args.seeds if args.seeds is not None else [args.seed]
    return args


def uses_profiles(variant):
    return variant in ("augment", "no_user_aug", "no_item_aug")


# ----------------------------------------------------------------------------- initial representations

def mlp(d_in, d):
    """T_raw and T_pro: Linear(d_t, d)-ReLU-Linear(d, d); one T_pro, shared by user and item profiles (eq. 2)."""
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d))


class Fusion(nn.Module):
    """Psi([x, p]) -> d for one side (one for users, one for items):
      residual (default)  x + Linear([x, p]): the Base representation plus a learned correction
      linear              Linear([x, p])
      relu                Linear([x, p])-ReLU, the paper's and the official code's. It can map a row to exactly
                          zero; cold items never get a gradient, so on ml-100k it collapsed the cold items to a
                          handful of vectors (many exactly zero) and top-K ties then ranked them by item id.
    collapse_counts logs zero and non-finite vectors and the distinct cold-item vectors at each validation."""

    def __init__(self, d, kind):
        super().__init__()
        self.kind, self.linear = kind, nn.Linear(2 * d, d)

    def forward(self, x, p):
        y = self.linear(torch.cat([x, p], -1))
        return x + y if self.kind == "residual" else torch.relu(y) if self.kind == "relu" else y


def distinct_rows(n, idx):
    """(rows, inv) for the index tensors idx: the rows of n that a step evaluates (None: all of them, when idx hold
    at least n indices; then no more rows than one evaluation per use, and no gather of the wide fixed inputs; else
    the distinct indices), and each index's position among them."""
    flat = torch.cat(idx)
    return (None, flat) if len(flat) >= n else torch.unique(flat, return_inverse=True)


def once(rep, rows, inv, idx):
    """For each index tensor i in idx, the rows i of rep(None), with rep evaluated once for all of them, on
    `rows` (rows, inv: distinct_rows(n, idx))."""
    x = rep(rows)
    return list(x.index_select(0, inv).split([len(i) for i in idx]))   # index_select: faster than x[inv]


class Towers(nn.Module):
    """The initial user and item representations of one variant (eqs. 1-2). both() gives every user's and every
    item's, users(idx) / items(idx) the rows of idx (everyone when idx is None), batch() a training batch's rows
    with each tower run once. The text and profile embeddings are non-persistent buffers: model.pt holds only what
    was learned.

    T_pro runs once per step on each distinct profile embedding that the step reads, users' and items' together
    (row-wise, so exact): a tuned model writes the same profile for many users and items, and T_pro's first layer
    on 384-d inputs is Augment's largest extra cost (both counted in bench/RESULTS.md, section "Augment's overhead
    per epoch")."""

    def __init__(self, variant, n_users, n_items, d, text=None, user_prof=None, item_prof=None, fusion=FUSION):
        super().__init__()
        self.variant = variant
        self.aug_user = variant in ("augment", "no_item_aug")
        self.aug_item = variant in ("augment", "no_user_aug")
        self.user_id = nn.Embedding(n_users, d)
        if variant == "id":
            self.item_id = nn.Embedding(n_items, d)
        else:
            self.register_buffer("text", torch.as_tensor(text, dtype=torch.float32), persistent=False)
            self.t_raw = mlp(self.text.shape[1], d)
        sides = {s: np.asarray(p, dtype=np.float32) for s, p, on in
                 (("user", user_prof, self.aug_user), ("item", item_prof, self.aug_item)) if on}
        if sides:
            distinct, row = np.unique(np.concatenate(list(sides.values())), axis=0, return_inverse=True)
            self.register_buffer("prof", torch.from_numpy(distinct), persistent=False)
            self.t_pro = mlp(distinct.shape[1], d)
        start = 0
        for side, p in sides.items():   # <side>_prof_row: that side's row of `prof`
            self.register_buffer(f"{side}_prof_row", torch.from_numpy(row[start:start + len(p)].reshape(-1)),
                                 persistent=False)
            setattr(self, f"psi_{side}", Fusion(d, fusion))
            start += len(p)

    def profile_rows(self, need=None):
        """T_pro of the distinct profile embeddings (None without profiles): of all, or of the rows `need` only, the
        others left zero (a training step reads no other row; batch())."""
        if not (self.aug_user or self.aug_item):
            return None
        if need is None:
            return self.t_pro(self.prof)
        h = self.t_pro(self.prof.index_select(0, need))
        return h.new_zeros(len(self.prof), h.shape[1]).index_copy(0, need, h)

    def users(self, idx=None, h=None):
        """h: profile_rows(), when the caller has it already."""
        x = self.user_id.weight if idx is None else self.user_id(idx)
        if self.aug_user:
            h = self.profile_rows() if h is None else h
            rows = self.user_prof_row if idx is None else self.user_prof_row.index_select(0, idx)
            x = self.psi_user(x, F.normalize(h.index_select(0, rows), dim=-1))
        return x

    def items(self, idx=None, h=None):
        if self.variant == "id":
            return self.item_id.weight if idx is None else self.item_id(idx)
        f = self.text if idx is None else self.text.index_select(0, idx)
        x = self.t_raw(f)
        if self.aug_item:
            h = self.profile_rows() if h is None else h
            rows = self.item_prof_row if idx is None else self.item_prof_row.index_select(0, idx)
            x = self.psi_item(x, h.index_select(0, rows))
        return F.normalize(x, dim=-1)

    def both(self):
        """Every user's and every item's representation, T_pro run once for both."""
        h = self.profile_rows()
        return self.users(h=h), self.items(h=h)

    def batch(self, u, *items):
        """A training batch's rows: x_u for the users u, then x_v for each item index tensor. Each tower runs
        once per step (not once per use), see `once`, and T_pro only on the profile rows those users and items
        read (on ml-100k every row; on larger data, where a batch holds a fraction of the users, far fewer)."""
        if self.variant == "id":
            return [self.user_id(u)] + [self.item_id(i) for i in items]
        user_rows, user_inv = distinct_rows(len(self.user_id.weight), [u]) if self.aug_user else (None, u)
        item_rows, item_inv = distinct_rows(len(self.text), items)
        h = self.profile_rows(self.profile_rows_read(user_rows, item_rows))
        users = once(lambda r: self.users(r, h), user_rows, user_inv, [u]) if self.aug_user else [self.user_id(u)]
        return users + once(lambda r: self.items(r, h), item_rows, item_inv, items)

    def profile_rows_read(self, user_rows, item_rows):
        """The rows of `prof` that users(user_rows) and items(item_rows) read: None for all of them."""
        read = ([(self.user_prof_row, user_rows)] if self.aug_user else []) + \
               ([(self.item_prof_row, item_rows)] if self.aug_item else [])
        if all(r is None for _, r in read):   # every row of each side with profiles: all of `prof`
            return None
        return torch.unique(torch.cat([m if r is None else m.index_select(0, r) for m, r in read]))

    def id_rows(self, u, pos, neg):
        """The batch's rows of the ID embeddings (what the per-example L2 acts on)."""
        rows = [self.user_id(u)]
        if self.variant == "id":
            rows += [self.item_id(pos), self.item_id(neg)]
        return rows


# ----------------------------------------------------------------------------- backbones
# Each forward(u, pos, neg) returns (positive scores, negative scores, extra loss). Dot-product
# backbones also give dot_reps(): all users' and all items' final vectors, whose dot product is the score.
#   biasmf    x_u . x_v + b_u + b_v (b_v from the item's representation, so cold items get one); exported as
#             [x_u, 1] . [x_v, b_v]: b_u moves all of a user's scores alike, so no ranking changes
#   ncf       NeuMF: h . [x_u * x_v, MLP([x_u, x_v])] (both branches read the same x_u, x_v); not a dot product,
#             so 07 ranks with the real score in tiles (ncf_topk; ties: lower item id first)
#   lightgcn  2 layers over the normalised bipartite training graph, layer mean (layer 0 included)
#   sgl       lightgcn + InfoNCE between two edge-dropout views (redrawn each epoch)
#   simgcl    lightgcn + InfoNCE between two views with sign(e) * normalize(U(0,1) noise) * eps per layer

class BiasMF(nn.Module):
    scorer = "dot"

    def __init__(self, towers, n_users, n_items, d):
        super().__init__()
        self.towers = towers
        self.user_bias = nn.Embedding(n_users, 1)   # cancels in BPR and in any ranking; kept for the textbook model
        self.item_bias = nn.Embedding(n_items, 1) if towers.variant == "id" else nn.Linear(d, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def b_item(self, idx, x):
        return (self.item_bias(idx) if self.towers.variant == "id" else self.item_bias(x)).squeeze(-1)

    def forward(self, u, pos, neg):
        x_u, x_p, x_n = self.towers.batch(u, pos, neg)
        b_u = self.user_bias(u).squeeze(-1)
        s_p = (x_u * x_p).sum(-1) + b_u + self.b_item(pos, x_p)
        s_n = (x_u * x_n).sum(-1) + b_u + self.b_item(neg, x_n)
        return s_p, s_n, 0.0

    def dot_reps(self):
        x_u, x_v = self.towers.both()
        b_v = self.b_item(torch.arange(len(x_v), device=x_v.device), x_v)
        return torch.cat([x_u, torch.ones_like(x_u[:, :1])], 1), torch.cat([x_v, b_v[:, None]], 1)


class NeuMF(nn.Module):
    scorer = "ncf"

    def __init__(self, towers, d):
        super().__init__()
        self.towers = towers
        self.mlp = nn.Sequential(nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, d // 2), nn.ReLU())
        self.out = nn.Linear(d + d // 2, 1, bias=False)   # a bias would not change any ranking

    def pair_scores(self, x_u, x_v):
        """NeuMF score of matching rows (broadcasting over leading dims)."""
        x_u, x_v = torch.broadcast_tensors(x_u, x_v)
        return self.out(torch.cat([x_u * x_v, self.mlp(torch.cat([x_u, x_v], -1))], -1)).squeeze(-1)

    def forward(self, u, pos, neg):
        x_u, x_p, x_n = self.towers.batch(u, pos, neg)
        return self.pair_scores(x_u, x_p), self.pair_scores(x_u, x_n), 0.0


class LightGCN(nn.Module):
    scorer = "dot"

    def __init__(self, towers, adj, n_users, args):
        super().__init__()
        self.towers, self.adj, self.n_users, self.args = towers, adj, n_users, args

    def initial(self):
        return torch.cat(self.towers.both())

    def propagate(self, e0, adj=None, eps=0.0):
        """Layer mean over layers 0..L. Layer 0 stays in the mean: a cold item has no edges, so without
        it a cold item would be all zeros. eps > 0: SimGCL's noise on every propagated layer."""
        if not eps:
            return common.lightgcn(self.adj if adj is None else adj, e0, self.args.layers)
        layers = [e0]
        for _ in range(self.args.layers):
            e = common.ops().spmm(self.adj, layers[-1])
            layers.append(e + torch.sign(e) * F.normalize(torch.rand_like(e), dim=-1) * eps)
        return torch.stack(layers).mean(0)

    def forward(self, u, pos, neg):
        e0 = self.initial()
        e = self.propagate(e0)
        n = self.n_users
        eu, ep, en = e[u], e[n + pos], e[n + neg]
        extra = self.contrastive(e0, u, pos)
        return (eu * ep).sum(-1), (eu * en).sum(-1), extra

    def contrastive(self, e0, u, pos):
        return 0.0

    def new_epoch(self, rng):
        pass

    def dot_reps(self):
        e = self.propagate(self.initial())
        return e[:self.n_users], e[self.n_users:]


def info_nce(a, b, temp):
    """Row r of a and row r of b are positives; every other row of b is a negative."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temp
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def cl_loss(v1, v2, u, pos, n_users, args):
    """InfoNCE on the batch's users and on its positive items (each counted once)."""
    uu, ii = torch.unique(u), n_users + torch.unique(pos)
    return args.cl_weight * (info_nce(v1[uu], v2[uu], args.cl_temp) + info_nce(v1[ii], v2[ii], args.cl_temp))


class SGL(LightGCN):
    def __init__(self, towers, adj, n_users, args, train_u, train_i, n_items):
        super().__init__(towers, adj, n_users, args)
        self.edges = (train_u, train_i, n_items)
        self.views = None

    def new_epoch(self, rng):
        """Two edge-dropout views of the training graph (SGL-ED), redrawn each epoch."""
        train_u, train_i, n_items = self.edges
        keep = [torch.from_numpy(rng.random(len(train_u)) >= self.args.edge_drop).to(train_u.device) for _ in range(2)]
        self.views = [common.norm_adj(train_u, train_i, self.n_users, n_items, keep=k) for k in keep]

    def contrastive(self, e0, u, pos):
        v1, v2 = (self.propagate(e0, adj) for adj in self.views)
        return cl_loss(v1, v2, u, pos, self.n_users, self.args)


class SimGCL(LightGCN):
    def contrastive(self, e0, u, pos):
        v1, v2 = (self.propagate(e0, eps=self.args.noise_eps) for _ in range(2))
        return cl_loss(v1, v2, u, pos, self.n_users, self.args)


def build_model(backbone, towers, split, args):
    n_users, n_items, d = split["n_users"], split["n_items"], args.dim
    if backbone == "biasmf":
        model = BiasMF(towers, n_users, n_items, d)
    elif backbone == "ncf":
        model = NeuMF(towers, d)
    else:
        train_u = torch.as_tensor(split["train_u"], dtype=torch.int64, device=args.device)
        train_i = torch.as_tensor(split["train_i"], dtype=torch.int64, device=args.device)
        adj = common.norm_adj(train_u, train_i, n_users, n_items)
        if backbone == "lightgcn":
            model = LightGCN(towers, adj, n_users, args)
        elif backbone == "sgl":
            model = SGL(towers, adj, n_users, args, train_u, train_i, n_items)
        else:
            model = SimGCL(towers, adj, n_users, args)
    for name, p in model.named_parameters():   # Xavier (paper 6.5.2); biases start at zero
        if p.dim() == 2 and "bias" not in name.split(".")[0]:
            nn.init.xavier_uniform_(p)
        elif p.dim() == 1:
            nn.init.zeros_(p)
    return model.to(args.device)


# ----------------------------------------------------------------------------- ranking

@torch.no_grad()
def ncf_topk(model, exclude, k, item_subset=None, users_per_tile=256, items_per_tile=1024):
    """All-rank top-k by the real NeuMF score, one (users x items) tile at a time. Same conventions as
    the ops' topk_scores: excluded items never returned, ties -> lower item id first, -inf / -1 fill.
    exclude: (rowptr, col) CSR over users; item_subset: sorted item ids to rank (zero-shot)."""
    x_u, x_v = model.towers.both()
    n_users, n_items = len(x_u), len(x_v)
    cand = torch.arange(n_items) if item_subset is None else torch.as_tensor(item_subset, dtype=torch.int64)
    cand = cand.to(x_v.device)
    rowptr, col = exclude[0].to(x_v.device), exclude[1].to(x_v.device)
    all_s, all_i = [], []
    for u0 in range(0, n_users, users_per_tile):
        u1 = min(u0 + users_per_tile, n_users)
        counts = rowptr[u0 + 1:u1 + 1] - rowptr[u0:u1]
        rows = torch.repeat_interleave(torch.arange(u1 - u0, device=x_v.device), counts)
        masked = torch.zeros(u1 - u0, n_items, dtype=torch.bool, device=x_v.device)
        masked[rows, col[rowptr[u0]:rowptr[u1]]] = True
        best_s = torch.empty(u1 - u0, 0, device=x_v.device)
        best_i = torch.empty(u1 - u0, 0, dtype=torch.int64, device=x_v.device)
        for t0 in range(0, len(cand), items_per_tile):
            ids = cand[t0:t0 + items_per_tile]
            s = model.pair_scores(x_u[u0:u1, None, :], x_v[ids][None, :, :])
            s = s.masked_fill(masked[:, ids], float("-inf"))
            # kept items all have lower ids than this tile's, and ties among them are already in id
            # order, so a stable descending sort keeps "lower id first" for equal scores
            s = torch.cat([best_s, s], 1)
            i = torch.cat([best_i, ids.expand(u1 - u0, -1)], 1)
            s, order = torch.sort(s, dim=1, descending=True, stable=True)
            best_s, best_i = s[:, :k], torch.gather(i, 1, order[:, :k])
        if best_s.shape[1] < k:   # fewer candidates than k
            pad = k - best_s.shape[1]
            best_s = torch.cat([best_s, best_s.new_full((u1 - u0, pad), float("-inf"))], 1)
            best_i = torch.cat([best_i, best_i.new_full((u1 - u0, pad), -1)], 1)
        best_i = best_i.masked_fill(best_s == float("-inf"), -1)
        all_s.append(best_s.cpu())
        all_i.append(best_i.cpu())
    return torch.cat(all_s), torch.cat(all_i)


@torch.no_grad()
def evaluate(model, exclude, test, item_subset, ks=(20,)):
    """Per-user Recall@K / NDCG@K (NaN for users without test items)."""
    model.eval()
    if model.scorer == "dot":
        user, item = model.dot_reps()
        out = common.rank_eval(user, item, exclude, test, ks, item_subset)
    else:
        _, idx = ncf_topk(model, exclude, max(ks), item_subset)
        out = {k: v.numpy() for k, v in common.ops().rank_metrics(idx, test[0], test[1], list(ks)).items()}
    model.train()
    return out


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def collapse_counts(towers, cold_items):
    """Initial vectors that are zero or non-finite (a dead fusion), and how many distinct vectors the cold
    items have (a collapse: they are scored by these alone)."""
    users, items = towers.both()
    dead = lambda x: int(((x.abs().sum(1) == 0) | ~torch.isfinite(x).all(1)).sum())
    cold = items[torch.as_tensor(cold_items, dtype=torch.int64, device=items.device)]
    return {"zero_users": dead(users), "zero_items": dead(items),
            "distinct_cold_items": int(torch.unique(cold, dim=0).shape[0]) if len(cold) else 0}


def warm_items(split):
    """The negative pool (`--neg-pool warm`): cold items belong to the test period, so the model must not know
    they exist."""
    return np.setdiff1d(np.arange(split["n_items"]), split["cold_items"])


def setup_training(backbone, variant, seed, split, feats, args):
    """The model, its Adam, the BPR sampler and SGL's edge-dropout generator, seeded."""
    common.seed_everything(seed)
    n_items = split["n_items"]
    towers = Towers(variant, split["n_users"], n_items, args.dim, **feats, fusion=args.fusion)
    model = build_model(backbone, towers, split, args)
    linear_w = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    rest = [q for q in model.parameters() if all(q is not w for w in linear_w)]
    # fused: one pass over all parameters, not a loop of small ops per tensor (Augment has twice Base's tensors)
    opt = torch.optim.Adam([{"params": linear_w, "weight_decay": args.l2}, {"params": rest}], lr=args.lr, fused=True)
    # negatives: warm items only (or all)
    sampler = common.BPRSampler(split["train_u"], split["train_i"], n_items, seed,
                                pool=warm_items(split) if args.neg_pool == "warm" else None)
    rng = np.random.default_rng(seed + 1)   # SGL's edge dropout
    return model, opt, sampler, rng


def train_epoch(model, opt, sampler, rng, args):
    """One pass over the training interactions; returns the mean loss and the mean BPR term.
    L2 acts on parameters: on the batch's rows of the ID embeddings (scaled per example, as LightGCN does) and, as
    Adam's weight decay, on every Linear weight (towers, Psi, NeuMF); item vectors are unit-normalised, so an L2
    on them would have no gradient. Each tower runs once per step and every use in it (BPR's users, positives,
    negatives, both contrastive views) reads that output (Towers.batch); bench/bench_epoch.py times it."""
    if hasattr(model, "new_epoch"):   # SGL: fresh edge-dropout views
        model.new_epoch(rng)
    tot, tot_bpr, n = 0.0, 0.0, 0
    for u, pos, neg in sampler.epoch(args.batch_size):
        u, pos, neg = u.to(args.device), pos.to(args.device), neg.to(args.device)
        s_pos, s_neg, extra = model(u, pos, neg)
        loss, bpr = common.bpr_loss(s_pos, s_neg, model.towers.id_rows(u, pos, neg), args.l2)
        loss = loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        tot, tot_bpr, n = tot + loss.item(), tot_bpr + bpr.item(), n + 1
    return tot / n, tot_bpr / n


def train_one(backbone, variant, source, seed, split, feats, args, out_dir):
    """Train one model; keep the state with the best validation Recall@20.
    Returns (the model holding that state, the state, meta, per-epoch log rows)."""
    model, opt, sampler, rng = setup_training(backbone, variant, seed, split, feats, args)
    towers, n_users = model.towers, split["n_users"]

    # validation: rank the warm items, the user's training items excluded, against its validation items
    exclude = common.csr(split["train_u"], split["train_i"], n_users)
    valid = common.csr(split["valid_u"], split["valid_i"], n_users)
    valid_items = torch.from_numpy(warm_items(split).astype(np.int64))

    best_state, best_recall, best_epoch, log_rows, epoch_secs = None, -1.0, 0, [], []
    bar = tqdm(range(1, args.max_epochs + 1), desc=out_dir.name, unit="epoch")
    for epoch in bar:
        t0 = time.time()
        loss, bpr = train_epoch(model, opt, sampler, rng, args)
        epoch_secs.append(time.time() - t0)   # training only; validation is not timed
        row = {"epoch": epoch, "loss": loss, "bpr": bpr, "seconds": round(epoch_secs[-1], 4)}
        if epoch % args.eval_every == 0 or epoch == args.max_epochs:
            m = evaluate(model, exclude, valid, valid_items, ks=(20,))
            row["valid_recall@20"] = float(np.nanmean(m["recall@20"]))
            row["valid_ndcg@20"] = float(np.nanmean(m["ndcg@20"]))
            row.update(collapse_counts(towers, split["cold_items"]))
            if row["valid_recall@20"] > best_recall:
                best_recall, best_epoch = row["valid_recall@20"], epoch
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        log_rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", best_r20=f"{best_recall:.4f}@{best_epoch}")
        if epoch >= args.min_epochs and epoch - best_epoch >= args.patience and best_state is not None:
            break
    model.load_state_dict(best_state)
    model.eval()
    meta = {"backbone": backbone, "variant": variant, "source": source, "seed": seed,
            "best_epoch": best_epoch, "best_valid_recall20": best_recall, "epochs_run": epoch,
            "seconds_per_epoch": float(np.mean(epoch_secs)), "scorer": model.scorer,
            "can_score_cold": variant != "id", "neg_pool": args.neg_pool, "fusion": args.fusion,
            "n_params": sum(p.numel() for p in model.parameters()), **collapse_counts(towers, split["cold_items"])}
    if meta["zero_items"] or meta["zero_users"]:
        common.log.warning("%s: %d item and %d user vectors are zero or non-finite (fusion %s)", out_dir.name,
                           meta["zero_items"], meta["zero_users"], args.fusion)
    common.log.info("%s: best validation Recall@20 %.4f at epoch %d of %d (%.3fs/epoch)",
                    out_dir.name, best_recall, best_epoch, epoch, meta["seconds_per_epoch"])
    return model, best_state, meta, log_rows


def save_outputs(model, state, meta, log_rows, split, out_dir, args):
    """Write one model's folder; returns the files written."""
    files = ["model.pt", "log.jsonl", "meta.json"]
    common.save_torch(out_dir / "model.pt", state)
    common.write_jsonl(out_dir / "log.jsonl", log_rows)
    with torch.no_grad():
        if model.scorer == "dot":
            user, item = model.dot_reps()
            common.save_npy(out_dir / "user_emb.npy", user.float().cpu().numpy())
            common.save_npy(out_dir / "item_emb.npy", item.float().cpu().numpy())
            files += ["user_emb.npy", "item_emb.npy"]
        else:   # rank here with the real NeuMF score: train and valid items excluded
            n_users = split["n_users"]
            seen = common.csr(np.concatenate([split["train_u"], split["valid_u"]]),
                              np.concatenate([split["train_i"], split["valid_i"]]), n_users)
            settings = {"full": None, "zero": np.sort(split["cold_items"]).astype(np.int64)}
            for name, subset in settings.items():
                if name == "zero" and not meta["can_score_cold"]:
                    continue
                s, idx = ncf_topk(model, seen, args.topk, subset)
                common.save_npz(out_dir / f"topk_{name}.npz", indices=idx.numpy(), scores=s.float().numpy())
                files.append(f"topk_{name}.npz")
            meta["topk"] = {"k": args.topk, "exclude": "train+valid"}
    common.write_json(out_dir / "meta.json", meta)
    return files


def load_features(run, variant, source, split):
    """The fixed inputs of the towers: item text embeddings and, for the augment variants, profiles."""
    feats = {}
    if variant != "id":
        feats["text"] = common.load_npy(run / "item_text_emb.npy")
    if uses_profiles(variant):
        feats["user_prof"] = common.load_npy(run / "profiles" / source / "user_emb.npy")
        feats["item_prof"] = common.load_npy(run / "profiles" / source / "item_emb.npy")
    files = {"text": "item_text_emb.npy", "user_prof": f"profiles/{source}/user_emb.npy",
             "item_prof": f"profiles/{source}/item_emb.npy"}
    for key, n in (("text", split["n_items"]), ("user_prof", split["n_users"]), ("item_prof", split["n_items"])):
        if key in feats and (feats[key].ndim != 2 or len(feats[key]) != n):
            raise common.StageError(f"{run / files[key]} has shape {feats[key].shape}, expected [{n}, d_t]")
    return feats


COMPARED_ARGS_SKIP = ("force", "redo", "device", "run")   # do not change what a model is


def already_trained(run, name, used, run_args):
    """True when cf/<name>/ was written by these arguments from the current inputs, so that a re-run of a grid
    skips it: its outputs are what it wrote, and its inputs are the files it read and fresh, transitively
    (common.stage_stale: a new split or new profiles, or profiles from a retrained model, retrain it)."""
    stage = f"07_train_cf/{name}"
    rec = common.read_manifest(run)["stages"].get(stage)
    if rec is None:
        return False
    want = json.loads(json.dumps({k: v for k, v in vars(run_args).items() if k not in COMPARED_ARGS_SKIP},
                                 default=str))
    have = {k: v for k, v in rec["args"].items() if k not in COMPARED_ARGS_SKIP}
    if want != have or not set(used) <= set(rec["inputs"]):
        return False
    stale = common.stage_stale(run, stage)
    if stale:
        common.log.info("%s: retraining: %s", name, stale)
    return stale is None


def main(argv=None):
    args = parse_args(argv)
    run = Path(args.run)
    common.setup_logging(run, "07_train_cf")
    inputs = ["data/split.npz", "item_text_emb.npy"]
    if any(uses_profiles(v) for v in args.variant):
        inputs += [f"profiles/{args.source}/user_emb.npy", f"profiles/{args.source}/item_emb.npy"]
    common.check_inputs(run, inputs, args.force)
    split = common.load_split(run)
    if len(split["valid_u"]) == 0:
        raise common.StageError("data/split.npz has no validation interactions to stop early on")
    results = []
    for backbone in args.backbone:
        for variant in args.variant:
            source = args.source if uses_profiles(variant) else "none"
            feats = load_features(run, variant, source, split)
            used = [r for r in inputs if r == "data/split.npz" or (variant != "id" and r == "item_text_emb.npy")
                    or (uses_profiles(variant) and r.startswith("profiles/"))]
            for seed in args.seeds:
                started = time.time()
                name = f"{backbone}_{variant}_{source}_s{seed}"
                run_args = argparse.Namespace(**{**vars(args), "backbone": backbone, "variant": variant,
                                                 "source": source, "seed": seed})
                del run_args.seeds
                # one process at a time per model: another 07 on the same model (other arguments) would mix its
                # files with ours; the lock lives outside cf/ (whose folders are read as models)
                with common.locked(run / ".locks" / f"cf_{name}.lock"):
                    results.append(train_or_skip(run, name, used, split, feats, run_args, started))
    return results


def train_or_skip(run, name, used, split, feats, run_args, started):
    """meta of cf/<name>/: the one already there when it was trained by these arguments on the current inputs,
    else that of a model trained now (its files and its manifest record written together)."""
    out_dir = run / "cf" / name
    if not run_args.redo and already_trained(run, name, used, run_args):
        common.log.info("%s: already trained on the current inputs, skipped (--redo retrains)", name)
        return json.loads((out_dir / "meta.json").read_text())
    a = run_args
    model, state, meta, log_rows = train_one(a.backbone, a.variant, a.source, a.seed, split, feats, a, out_dir)
    meta["args"] = json.loads(json.dumps(vars(run_args), default=str))
    files = save_outputs(model, state, meta, log_rows, split, out_dir, run_args)
    common.log.info("%s: wrote %s to %s", name, ", ".join(files), out_dir)
    common.record_stage(run, f"07_train_cf/{name}", run_args, used, [f"cf/{name}/{f}" for f in files], started)
    return meta


if __name__ == "__main__":
    common.run_stage(main)
