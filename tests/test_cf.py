"""Stage 07 (07_train_cf.py) on the synthetic run: every backbone x variant trains and writes what 08
reads, early stopping never looks at the test split, NCF's tiled ranking equals a dense reference, and
stale inputs are refused."""
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common

cf = common.load_stage("07_train_cf")

FAST = ["--max-epochs", "6", "--eval-every", "2", "--batch-size", "64", "--lr", "0.01"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_profiles(run, source="test", d_t=16, seed=1):
    """Profile embeddings as 06 writes them, recorded in the manifest so that check_inputs accepts them."""
    split = common.load_split(run)
    rng = np.random.default_rng(seed)
    files = []
    for name, n in (("user_emb.npy", split["n_users"]), ("item_emb.npy", split["n_items"])):
        x = rng.standard_normal((n, d_t)).astype(np.float32)
        common.save_npy(run / "profiles" / source / name, x / np.linalg.norm(x, axis=1, keepdims=True))
        files.append(f"profiles/{source}/{name}")

    class Args:
        seed = 0
    common.record_stage(run, f"06_profile/{source}", Args(), [], files, time.time())
    return run


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backbone", cf.BACKBONES)
def test_every_variant_trains_and_writes_outputs(synthetic_run, backbone):
    run = write_profiles(synthetic_run)
    split = common.load_split(run)
    n_users, n_items = split["n_users"], split["n_items"]
    metas = cf.main(["--run", str(run), "--backbone", backbone, "--variant", "all", "--source", "test", *FAST])
    assert [m["variant"] for m in metas] == list(cf.VARIANTS)
    manifest = common.read_manifest(run)["stages"]
    for meta in metas:
        name = f"{backbone}_{meta['variant']}_{meta['source']}_s0"
        folder = run / "cf" / name
        assert meta["source"] == ("none" if meta["variant"] in ("base", "id") else "test")
        assert json.loads((folder / "meta.json").read_text())["best_epoch"] == meta["best_epoch"]
        assert meta["can_score_cold"] == (meta["variant"] != "id")
        assert 1 <= meta["best_epoch"] <= 6 and meta["seconds_per_epoch"] > 0
        log = read_log(folder)
        assert [r["epoch"] for r in log] == list(range(1, len(log) + 1))
        assert log[-1]["loss"] < log[0]["loss"], f"{name}: training loss did not fall: {[r['loss'] for r in log]}"
        assert all("valid_recall@20" in r for r in log if r["epoch"] % 2 == 0)
        state = torch.load(folder / "model.pt", weights_only=True)
        assert "towers.user_id.weight" in state and ("towers.item_id.weight" in state) == (meta["variant"] == "id")
        assert not any(k.endswith(("text", "user_prof", "item_prof")) for k in state)  # inputs are not parameters
        if meta["scorer"] == "dot":
            user, item = np.load(folder / "user_emb.npy"), np.load(folder / "item_emb.npy")
            width = 32 + (backbone == "biasmf")
            assert user.shape == (n_users, width) and item.shape == (n_items, width)
            assert user.dtype == item.dtype == np.float32 and np.isfinite(user).all() and np.isfinite(item).all()
        else:
            full = np.load(folder / "topk_full.npz")["indices"]
            assert full.shape == (n_users, cf.TOPK)
            assert (folder / "topk_zero.npz").exists() == meta["can_score_cold"]
            if meta["can_score_cold"]:
                zero = np.load(folder / "topk_zero.npz")["indices"]
                assert np.isin(zero[zero >= 0], split["cold_items"]).all()
            seen = set(zip(np.r_[split["train_u"], split["valid_u"]].tolist(),
                           np.r_[split["train_i"], split["valid_i"]].tolist()))
            assert not any((u, i) in seen for u in range(n_users) for i in full[u] if i >= 0)
        rec = manifest[f"07_train_cf/{name}"]
        assert set(rec["outputs"]) == {f"cf/{name}/{f.name}" for f in folder.iterdir()}
        assert ("item_text_emb.npy" in rec["inputs"]) == (meta["variant"] != "id")


def test_early_stopping_never_reads_test(synthetic_run, monkeypatch):
    """Validation ranks against the validation items, and rewriting the test split changes nothing."""
    run = synthetic_run
    split = common.load_split(run)
    valid = common.csr(split["valid_u"], split["valid_i"], split["n_users"])
    calls = []
    real = common.rank_eval

    def spy(user, item, exclude, test, *a, **kw):
        calls.append(test)
        return real(user, item, exclude, test, *a, **kw)
    monkeypatch.setattr(common, "rank_eval", spy)
    argv = ["--run", str(run), "--backbone", "biasmf", "ncf", "sgl", *FAST]

    def outputs():
        cf.main(argv)
        out = {}
        for folder in sorted((run / "cf").iterdir()):
            out[folder.name] = [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(folder)]
            for f in ("user_emb.npy", "item_emb.npy"):
                if (folder / f).exists():
                    out[folder.name, f] = np.load(folder / f)
            if (folder / "topk_full.npz").exists():
                out[folder.name, "topk"] = np.load(folder / "topk_full.npz")["indices"]
        return out

    before = outputs()
    assert calls and all(torch.equal(t[0], valid[0]) and torch.equal(t[1], valid[1]) for t in calls)
    rng = np.random.default_rng(7)   # a different test split: other users, other items
    split["test_u"] = rng.integers(0, split["n_users"], len(split["test_u"]))
    split["test_i"] = rng.integers(0, split["n_items"], len(split["test_i"]))
    common.save_npz(run / "data" / "split.npz", **split)

    class Args:
        seed = 0
    record = common.read_manifest(run)["stages"]["01_neighbors"]
    common.record_stage(run, "01_neighbors", Args(), [], list(record["outputs"]), time.time())
    after = outputs()
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], np.ndarray):
            assert np.array_equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key


def dense_topk(scores, exclude, k, subset=None):
    """Reference: every score at once, excluded items dropped, (score desc, item id asc)."""
    n_users, n_items = scores.shape
    cand = np.arange(n_items) if subset is None else np.asarray(subset)
    idx = np.full((n_users, k), -1)
    for u in range(n_users):
        ex = set(exclude[1][exclude[0][u]:exclude[0][u + 1]].tolist())
        items = np.array([i for i in cand if i not in ex], dtype=np.int64)
        order = np.lexsort((items, -scores[u, items]))[:k]
        idx[u, :len(order)] = items[order]
    return idx


def tiny_ncf(variant="base", n_users=13, n_items=37, d=8, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    towers = cf.Towers(variant, n_users, n_items, d, text=rng.standard_normal((n_items, 6)))
    return cf.NeuMF(towers, d).double().eval()


@pytest.mark.parametrize("subset", [None, np.array([1, 4, 5, 9, 20, 21, 22, 30, 36])])
def test_ncf_tiled_topk_matches_dense(subset):
    model = tiny_ncf()
    n_users, n_items = 13, 37
    rng = np.random.default_rng(3)
    ex_u = np.r_[rng.integers(0, n_users, 60), np.zeros(n_items - 3, dtype=np.int64)]   # user 0: 3 candidates left
    ex_i = np.r_[rng.integers(0, n_items, 60), np.arange(3, n_items)]
    exclude = common.csr(ex_u, ex_i, n_users)
    with torch.no_grad():
        dense = model.pair_scores(model.towers.users()[:, None], model.towers.items()[None]).numpy()
    k = 6
    scores, idx = cf.ncf_topk(model, exclude, k, subset, users_per_tile=4, items_per_tile=5)
    ref = dense_topk(dense, (exclude[0].numpy(), exclude[1].numpy()), k, subset)
    np.testing.assert_array_equal(idx.numpy(), ref)
    assert (idx[0, 3:] == -1).all() and torch.isinf(scores[0, 3:]).all()   # fewer candidates than k
    ok = idx >= 0
    rows = torch.arange(n_users)[:, None].expand_as(idx)
    torch.testing.assert_close(scores[ok], torch.from_numpy(dense)[rows[ok], idx[ok]])


def test_ncf_ties_go_to_the_lower_item_id():
    model = tiny_ncf()
    torch.nn.init.zeros_(model.out.weight)   # every score is 0
    exclude = common.csr(np.array([0, 0, 1]), np.array([0, 2, 1]), 13)
    _, idx = cf.ncf_topk(model, exclude, 4, users_per_tile=5, items_per_tile=3)
    assert idx[0].tolist() == [1, 3, 4, 5] and idx[1].tolist() == [0, 2, 3, 4] and idx[2].tolist() == [0, 1, 2, 3]


def test_biasmf_dot_reps_rank_like_the_biased_score():
    torch.manual_seed(0)
    towers = cf.Towers("base", 5, 9, 4, text=np.random.default_rng(0).standard_normal((9, 3)))
    model = cf.BiasMF(towers, 5, 9, 4)
    torch.nn.init.normal_(model.user_bias.weight)
    torch.nn.init.normal_(model.item_bias.weight)
    u, v = torch.arange(5).repeat_interleave(9), torch.arange(9).repeat(5)
    with torch.no_grad():
        score, _, _ = model(u, v, v)
        user, item = model.dot_reps()
        torch.testing.assert_close((user @ item.T).reshape(-1), score - model.user_bias(u).squeeze(-1))


def test_stale_inputs_are_refused_unless_forced(synthetic_run):
    run = synthetic_run
    emb = np.load(run / "item_text_emb.npy")
    common.save_npy(run / "item_text_emb.npy", emb[:, ::-1].copy())   # changed after 01 wrote it
    argv = ["--run", str(run), "--backbone", "biasmf", "--max-epochs", "2", "--eval-every", "1"]
    with pytest.raises(common.StaleInputError, match="01_neighbors"):
        cf.main(argv)
    assert not (run / "cf").exists()
    metas = cf.main(argv + ["--force"])
    assert (run / "cf" / "biasmf_base_none_s0" / "user_emb.npy").exists() and metas[0]["best_epoch"] >= 1


def test_augment_needs_recorded_profiles(synthetic_run):
    with pytest.raises(common.StaleInputError, match="profiles/ppo/user_emb.npy"):
        cf.main(["--run", str(synthetic_run), "--variant", "augment", "--source", "ppo", *FAST])


def test_fusion_relu_can_kill_a_row_and_residual_cannot():
    """The paper's Linear-ReLU maps a row to exactly zero when its pre-activation is negative; the default
    residual fusion keeps the base vector, and collapse_counts counts the dead rows."""
    x, p = torch.ones(3, 4), torch.ones(3, 4)
    dead = {}
    for kind in ("relu", "linear", "residual"):
        psi = cf.Fusion(4, kind)
        torch.nn.init.zeros_(psi.linear.weight)
        torch.nn.init.constant_(psi.linear.bias, -3.0)
        dead[kind] = int((psi(x, p).abs().sum(1) == 0).sum())
    assert dead == {"relu": 3, "linear": 0, "residual": 0}
    towers = cf.Towers("augment", 3, 5, 4, text=np.ones((5, 2)), user_prof=np.ones((3, 2)), item_prof=np.ones((5, 2)),
                       fusion="relu")
    torch.nn.init.constant_(towers.psi_item.linear.bias, -10.0)
    torch.nn.init.zeros_(towers.psi_item.linear.weight)
    counts = cf.collapse_counts(towers, np.array([3, 4]))
    assert counts["zero_items"] == 5 and counts["distinct_cold_items"] == 1


def test_l2_acts_on_the_tower_weights(synthetic_run):
    """With a large L2 the Linear weights of the towers and Psi end smaller than with none: the decay reaches
    parameters (an L2 on unit-normalised item vectors would have had no gradient)."""
    run = write_profiles(synthetic_run)
    norms = {}
    for l2 in ("0", "1"):
        cf.main(["--run", str(run), "--backbone", "biasmf", "--variant", "augment", "--source", "test", *FAST,
                 "--l2", l2, "--redo"])
        state = torch.load(run / "cf" / "biasmf_augment_test_s0" / "model.pt", weights_only=True)
        norms[l2] = {k: float(v.norm()) for k, v in state.items()
                     if k.startswith("towers.") and "_id." not in k and k.endswith("weight")}
    assert norms["0"].keys() == norms["1"].keys() and len(norms["0"]) == 6
    assert all(norms["1"][k] < norms["0"][k] for k in norms["0"]), norms


def test_min_epochs_holds_off_early_stopping(synthetic_run):
    meta, = cf.main(["--run", str(synthetic_run), "--backbone", "biasmf", *FAST, "--max-epochs", "12",
                     "--patience", "1", "--min-epochs", "12"])
    assert meta["epochs_run"] == 12


def test_a_rerun_skips_models_trained_on_the_current_inputs(synthetic_run):
    """A grid can be resumed: the same call skips finished models; other arguments, other inputs or --redo
    retrain."""
    run = synthetic_run
    argv = ["--run", str(run), "--backbone", "biasmf", "lightgcn", *FAST]
    first = cf.main(argv)
    log = run / "cf" / "biasmf_base_none_s0" / "log.jsonl"
    stamp = log.stat().st_mtime_ns
    assert cf.main(argv) == first and log.stat().st_mtime_ns == stamp
    cf.main(argv + ["--redo"])
    assert log.stat().st_mtime_ns != stamp
    stamp = log.stat().st_mtime_ns
    cf.main(argv[:4] + FAST[:-1] + ["0.02"])             # another learning rate: retrained
    assert log.stat().st_mtime_ns != stamp
    stamp = log.stat().st_mtime_ns
    (run / "cf" / "biasmf_base_none_s0" / "item_emb.npy").write_bytes(b"x")   # a damaged output: retrained
    cf.main(argv[:4] + FAST[:-1] + ["0.02"])
    assert log.stat().st_mtime_ns != stamp


def naive_reps(t, users, items, prof):
    """Eqs. 1-2 written out from the parameters, row by row: every use recomputes its tower on its own row of the
    profile embeddings prof (T_pro is not shared between equal rows), and Psi multiplies x and p by the two halves
    of its weight instead of concatenating them."""
    lin = lambda m, x: x @ m.weight.T + m.bias
    mlp = lambda s, x: lin(s[2], torch.relu(lin(s[0], x)))
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)   # F.normalize: a zero row stays zero

    def psi(f, x, p):
        d = x.shape[-1]
        y = x @ f.linear.weight[:, :d].T + p @ f.linear.weight[:, d:].T + f.linear.bias
        return {"residual": x + y, "linear": y, "relu": torch.relu(y)}[f.kind]
    x_u = t.user_id.weight[users]
    if t.aug_user:
        x_u = psi(t.psi_user, x_u, unit(mlp(t.t_pro, prof["user_prof"][users])))
    if t.variant == "id":
        return x_u, t.item_id.weight[items]
    x_v = mlp(t.t_raw, t.text[items])
    if t.aug_item:
        x_v = psi(t.psi_item, x_v, mlp(t.t_pro, prof["item_prof"][items]))
    return x_u, unit(x_v)


def naive_forward(model, args, u, pos, neg, noise_seed, prof):
    """What model(u, pos, neg) computes, from naive_reps and dense matrices (SimGCL's noise redrawn in the same
    order from the same seed)."""
    t = model.towers
    if isinstance(model, (cf.BiasMF, cf.NeuMF)):
        (x_u, x_p), (_, x_n) = naive_reps(t, u, pos, prof), naive_reps(t, u, neg, prof)
        if isinstance(model, cf.NeuMF):
            return model.pair_scores(x_u, x_p), model.pair_scores(x_u, x_n), 0.0
        b_u = model.user_bias.weight[u, 0]
        w = model.item_bias.weight
        b_v = lambda i, x: w[i, 0] if t.variant == "id" else x @ w[0] + model.item_bias.bias
        return (x_u * x_p).sum(-1) + b_u + b_v(pos, x_p), (x_u * x_n).sum(-1) + b_u + b_v(neg, x_n), 0.0
    n_users, n_items = len(t.user_id.weight), len(t.text) if t.variant != "id" else len(t.item_id.weight)
    e0 = torch.cat(naive_reps(t, torch.arange(n_users), torch.arange(n_items), prof))

    def propagate(adj, eps=0.0):
        layers = [e0]
        for _ in range(args.layers):
            e = adj.to_dense() @ layers[-1]
            layers.append(e + torch.sign(e) * F.normalize(torch.rand_like(e), dim=-1) * eps if eps else e)
        return torch.stack(layers).mean(0)
    torch.manual_seed(noise_seed)
    e = propagate(model.adj)
    extra = 0.0
    if isinstance(model, cf.SGL):
        extra = cf.cl_loss(propagate(model.views[0]), propagate(model.views[1]), u, pos, n_users, args)
    elif isinstance(model, cf.SimGCL):
        extra = cf.cl_loss(*(propagate(model.adj, args.noise_eps) for _ in range(2)), u, pos, n_users, args)
    eu, ep, en = e[u], e[n_users + pos], e[n_users + neg]
    return (eu * ep).sum(-1), (eu * en).sum(-1), extra


@pytest.mark.parametrize("backbone", cf.BACKBONES)
@pytest.mark.parametrize("variant", cf.VARIANTS)
def test_forward_equals_a_naive_reference(backbone, variant):
    """Each tower runs once per step and its rows are shared by every use (BPR's positives and negatives, both
    contrastive views; T_pro's rows, by every user and item with that profile embedding): scores, contrastive loss
    and gradients equal a naive per-use computation, on the path that evaluates all rows (batch >= rows) and on
    the one that evaluates the distinct rows (a small batch); T_pro runs on the profile rows the batch reads."""
    n_users, n_items, d, d_t = 7, 11, 4, 5
    rng = np.random.default_rng(0)
    train_u, train_i = rng.integers(0, n_users, 30), rng.integers(0, n_items - 2, 30)   # two items without edges
    split = {"n_users": n_users, "n_items": n_items, "train_u": train_u, "train_i": train_i}
    pool = rng.standard_normal((6, d_t))   # profiles repeat, within a side and across users and items
    feats = {"text": rng.standard_normal((n_items, d_t)), "user_prof": pool[rng.integers(0, 4, n_users)],
             "item_prof": pool[rng.integers(2, 6, n_items)]}
    prof = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in feats.items()}
    for fusion in ("residual", "linear", "relu") if cf.uses_profiles(variant) else ("residual",):
        args = cf.parse_args(["--run", "unused", "--dim", str(d), "--device", "cpu", "--fusion", fusion])
        torch.manual_seed(0)
        towers = cf.Towers(variant, n_users, n_items, d, **(feats if variant != "id" else {}), fusion=fusion)
        if variant == "augment":   # T_pro runs on the 6 distinct rows, not on 7 + 11
            assert len(towers.prof) == len(np.unique(np.r_[feats["user_prof"], feats["item_prof"]], axis=0)) == 6
        model = cf.build_model(backbone, towers, split, args)
        for p in model.parameters():   # no zero biases: every term shows
            torch.nn.init.normal_(p, std=0.5)
        if backbone == "sgl":
            model.new_epoch(np.random.default_rng(1))
        t_pro_rows = []
        if cf.uses_profiles(variant):
            towers.t_pro.register_forward_hook(lambda m, inp, out: t_pro_rows.append(len(inp[0])))
        for batch in (12, 6, 3):   # users and items all; users distinct, items all; both distinct
            u, pos, neg = (torch.as_tensor(rng.integers(0, n, batch)) for n in (n_users, n_items, n_items))
            torch.manual_seed(5)
            t_pro_rows.clear()
            got = model(u, pos, neg)
            if cf.uses_profiles(variant) and backbone in ("biasmf", "ncf"):   # graph backbones read every row
                # a side whose batch holds at least its row count is evaluated on all its rows, else on the batch's
                read = [m if len(r) >= len(m) else m[r] for on, m, r in
                        ((towers.aug_user, getattr(towers, "user_prof_row", None), u),
                         (towers.aug_item, getattr(towers, "item_prof_row", None), torch.cat([pos, neg]))) if on]
                assert t_pro_rows == [len(torch.unique(torch.cat(read)))]   # T_pro once, on the rows read
                assert variant != "augment" or batch > 3 or t_pro_rows[0] < len(towers.prof)   # fewer here
            want = naive_forward(model, args, u, pos, neg, noise_seed=5, prof=prof)
            for g, w in zip(got, want):
                torch.testing.assert_close(torch.as_tensor(g), torch.as_tensor(w), rtol=1e-4, atol=1e-5)
            params = [p for p in model.parameters()]
            loss = lambda out: (out[0] * 1.3 - out[1] * 0.7).sum() + out[2]
            g_got = torch.autograd.grad(loss(got), params, allow_unused=True)
            g_want = torch.autograd.grad(loss(want), params, allow_unused=True)
            for p, a, b in zip(params, g_got, g_want):
                a = torch.zeros_like(p) if a is None else a
                b = torch.zeros_like(p) if b is None else b
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bpr_loss_is_the_plain_formula():
    """One BPR + L2 for 01 and 07: -log sigmoid(s_pos - s_neg) averaged, plus l2 * 0.5 * ||rows||^2 / batch."""
    g = torch.Generator().manual_seed(0)
    s_pos, s_neg = torch.randn(7, generator=g), torch.randn(7, generator=g)
    rows = (torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g))
    loss, bpr = common.bpr_loss(s_pos, s_neg, rows, l2=0.1)
    ref_bpr = -torch.log(torch.sigmoid(s_pos - s_neg)).mean()
    ref_reg = 0.5 * (rows[0].pow(2).sum() + rows[1].pow(2).sum()) / 7
    torch.testing.assert_close(bpr, ref_bpr)
    torch.testing.assert_close(loss, ref_bpr + 0.1 * ref_reg)
