"""08_eval on a toy run whose right answers are known by construction."""
import time

import numpy as np
import pytest

import common

eval08 = common.load_stage("08_eval")


class Args:
    seed = 0


def write_model(run, name, meta, user_emb=None, item_emb=None):
    folder = run / "cf" / name
    files = []
    if user_emb is not None:
        common.save_npy(folder / "user_emb.npy", user_emb.astype(np.float32))
        common.save_npy(folder / "item_emb.npy", item_emb.astype(np.float32))
        files += ["user_emb.npy", "item_emb.npy"]
    common.write_json(folder / "meta.json", {"seed": 0, "best_epoch": 3, "seconds_per_epoch": 0.5, **meta})
    files.append("meta.json")
    common.record_stage(run, f"07_train_cf/{name}", Args(), ["data/split.npz"], [f"cf/{name}/{f}" for f in files],
                        time.time())


@pytest.fixture
def toy_run(tmp_path):
    """8 users, 10 items; items 8, 9 are cold. User u trained on item u, tests on item (u+1) % 8 (warm)
    and, for even users, on cold item 8 + (u // 2) % 2. The oracle embeds each user next to its test items."""
    run = tmp_path / "run"
    n_users, n_items = 8, 10
    train_u = np.arange(8)
    train_i = np.arange(8)
    test_u = [u for u in range(8)] + [u for u in range(0, 8, 2)]
    test_i = [(u + 1) % 8 for u in range(8)] + [8 + (u // 2) % 2 for u in range(0, 8, 2)]
    split = {"train_u": train_u, "train_i": train_i, "valid_u": np.zeros(0, np.int64), "valid_i": np.zeros(0, np.int64),
             "test_u": np.array(test_u), "test_i": np.array(test_i), "cold_items": np.array([8, 9]),
             "n_users": np.int64(n_users), "n_items": np.int64(n_items)}
    common.save_npz(run / "data" / "split.npz", **split)
    common.save_npy(run / "item_text_emb.npy", np.eye(n_items, 4, dtype=np.float32) + 0.1)
    common.save_npz(run / "neighbors.npz", item_nbrs=np.tile(np.arange(3), (n_items, 1)))
    common.record_stage(run, "01_neighbors", Args(), [], ["data/split.npz", "item_text_emb.npy", "neighbors.npz"],
                        time.time())
    items = np.eye(n_items)
    oracle = np.zeros((n_users, n_items))
    for u, i in zip(test_u, test_i):
        oracle[u, i] = 1.0
    oracle[np.arange(8), np.arange(8)] = 5.0   # training items score highest but are masked
    write_model(run, "lightgcn_augment_ppo_s0", {"backbone": "lightgcn", "variant": "augment", "source": "ppo",
                                                 "scorer": "dot", "can_score_cold": True}, oracle, items)
    worst = -oracle
    worst[np.arange(8), np.arange(8)] = 5.0
    write_model(run, "lightgcn_base_none_s0", {"backbone": "lightgcn", "variant": "base", "source": "none",
                                               "scorer": "dot", "can_score_cold": True}, worst, items)
    write_model(run, "lightgcn_id_none_s0", {"backbone": "lightgcn", "variant": "id", "source": "none",
                                             "scorer": "dot", "can_score_cold": False}, oracle, items)
    return run


def rows_by(run):
    out = {}
    for r in common.read_jsonl(run / "results" / "metrics.jsonl"):
        out[(r["variant"], r["setting"], r["metric"])] = r
    return out


def test_oracle_scores_perfectly_and_worst_scores_zero(toy_run):
    eval08.main(["--run", str(toy_run), "--ks", "1", "2"])
    rows = rows_by(toy_run)
    # full-shot: even users have 2 test items, so Recall@1 = 0.5 for them, 1 for odd users
    assert rows[("augment", "full", "recall@1")]["value"] == pytest.approx(0.75)
    assert rows[("augment", "full", "recall@2")]["value"] == pytest.approx(1.0)
    assert rows[("augment", "full", "ndcg@1")]["value"] == pytest.approx(1.0)
    assert rows[("augment", "full", "ndcg@2")]["value"] == pytest.approx(1.0)
    # zero-shot: only the 4 even users have cold test items; the other 4 are skipped and counted
    z = rows[("augment", "zero", "recall@1")]
    assert z["value"] == pytest.approx(1.0) and z["users"] == 4 and z["skipped_users"] == 4
    # the worst model ranks every test item below all other candidates
    assert rows[("base", "full", "recall@2")]["value"] == pytest.approx(0.0)
    assert rows[("base", "zero", "recall@1")]["value"] == pytest.approx(0.0)
    # the ID model's zero-shot rows say it cannot score cold items instead of reporting zeros
    assert rows[("id", "zero", None)]["note"].startswith("ID item embeddings cannot")
    md = (toy_run / "results" / "tables.md").read_text()
    # base is 0: the change is absolute, and significant; 4 metrics, then vs Base / vs centroid per headline metric
    assert "| lightgcn | augment | ppo | 1 | 0.7500 | 1.0000 | 1.0000 | 1.0000 | +0.7500* |" in md
    assert "| lightgcn | id | none | 1 | n/a |" in md and "Seconds per training epoch" in md
    per_user = np.load(toy_run / "results" / "per_user" / "lightgcn_augment_ppo_s0_zero.npz")
    assert np.isnan(per_user["recall@1"][1::2]).all()


def test_ndcg_partial_credit(toy_run):
    """Put each user's warm test item second (behind a non-test item): NDCG@2 = 1/log2(3) / IDCG."""
    split = common.load_split(toy_run)
    users = np.zeros((8, 10))
    for u in range(8):
        users[u, (u + 1) % 8] = 1.0
        users[u, (u + 2) % 8] = 2.0 if (u + 2) % 8 != (u + 1) % 8 else 0.0
        users[u, 8:] = -1.0
    write_model(toy_run, "biasmf_base_none_s0", {"backbone": "biasmf", "variant": "base", "source": "none",
                                                 "scorer": "dot", "can_score_cold": True}, users, np.eye(10))
    eval08.main(["--run", str(toy_run), "--ks", "2"])
    rows = [r for r in common.read_jsonl(toy_run / "results" / "metrics.jsonl")
            if r["backbone"] == "biasmf" and r["setting"] == "full" and r["metric"] == "ndcg@2"]
    odd = 1 / np.log2(3)                   # one test item, found at rank 2
    even = (1 / np.log2(3)) / (1 + 1 / np.log2(3))  # two test items, one found at rank 2
    assert rows[0]["value"] == pytest.approx((4 * odd + 4 * even) / 8)
    assert split["n_users"] == 8


def test_refuses_models_written_from_a_stale_split(toy_run):
    split = dict(np.load(toy_run / "data" / "split.npz"))
    split["test_i"] = split["test_i"][::-1].copy()
    common.save_npz(toy_run / "data" / "split.npz", **split)
    with pytest.raises(common.StaleInputError, match="01_neighbors"):
        eval08.main(["--run", str(toy_run)])


def test_reference_rows(toy_run):
    """The random row is the exact expectation; the oracle (test popularity) is flagged as reading test."""
    eval08.main(["--run", str(toy_run), "--ks", "1", "2"])
    refs = {(r["backbone"], r["setting"], r["metric"]): r
            for r in common.read_jsonl(toy_run / "results" / "metrics.jsonl") if r["variant"] == "reference"}
    # full-shot: 9 candidates per user (its training item masked); any one slot holds a test item w.p. t/9
    assert refs[("random", "full", "recall@1")]["value"] == pytest.approx(1 / 9)
    assert refs[("random", "full", "recall@2")]["value"] == pytest.approx(2 / 9)
    odd, even = (1 + 1 / np.log2(3)) / 9, (2 + 2 / np.log2(3)) / 9 / (1 + 1 / np.log2(3))   # NDCG@2, t = 1 and 2
    assert refs[("random", "full", "ndcg@2")]["value"] == pytest.approx((odd + even) / 2)
    # zero-shot: 2 cold candidates, one of them is the user's
    assert refs[("random", "zero", "recall@1")]["value"] == pytest.approx(0.5)
    # the oracle: cold items 8 and 9 have 2 test rows each, so one list cannot beat 0.5 at K=1
    assert refs[("oracle: test popularity", "zero", "recall@1")]["value"] == pytest.approx(0.5)
    assert refs[("oracle: test popularity", "full", "ties@1")]["value"] == 0.0   # references break ties at random
    md = (toy_run / "results" / "tables.md").read_text()
    for name in eval08.REFERENCES:
        assert md.count(f"| {name} | reference |") == 2


def test_ties_are_counted_and_flagged(toy_run):
    """A model that gives every item the same score: every top-K slot is a tie, and the row says so."""
    write_model(toy_run, "biasmf_base_none_s0", {"backbone": "biasmf", "variant": "base", "source": "none",
                                                 "scorer": "dot", "can_score_cold": True, "zero_items": 0},
                np.ones((8, 2)), np.ones((10, 2)))
    eval08.main(["--run", str(toy_run), "--ks", "1", "2"])
    rows = {(r["backbone"], r["variant"], r["setting"], r["metric"]): r["value"]
            for r in common.read_jsonl(toy_run / "results" / "metrics.jsonl")}
    assert rows[("biasmf", "base", "full", "ties@2")] == 1.0 and rows[("biasmf", "base", "zero", "ties@1")] == 1.0
    # the oracle model ties only where a user's two test items share the top score (the 4 even users)
    assert rows[("lightgcn", "augment", "full", "ties@1")] == 0.5
    md = (toy_run / "results" / "tables.md").read_text()
    assert "| biasmf | base | none | 1 |" in md and "⚠ 100.0% | 0 |" in md


def test_ncf_topk_without_a_tie_slot_is_refused(toy_run):
    folder = toy_run / "cf" / "ncf_base_none_s0"
    for setting in ("full", "zero"):
        common.save_npz(folder / f"topk_{setting}.npz", indices=np.zeros((8, 2), np.int64),
                        scores=np.zeros((8, 2), np.float32))
    write_model(toy_run, "ncf_base_none_s0", {"backbone": "ncf", "variant": "base", "source": "none", "scorer": "ncf",
                                              "can_score_cold": True})
    common.record_stage(toy_run, "07_train_cf/ncf_base_none_s0", Args(), ["data/split.npz"],
                        [f"cf/ncf_base_none_s0/{f}" for f in ("meta.json", "topk_full.npz", "topk_zero.npz")],
                        time.time())
    with pytest.raises(common.StageError, match="one more slot"):
        eval08.main(["--run", str(toy_run), "--ks", "2"])


def test_change_against_base_uses_the_seeds_both_have(toy_run):
    """Base trained at seeds 0 and 1, Augment at seed 1 only: the change is measured against Base's seed 1."""
    good = np.zeros((8, 10))
    for u in range(8):
        good[u, (u + 1) % 8] = 1.0
    meta = {"backbone": "biasmf", "source": "none", "scorer": "dot", "can_score_cold": True}
    write_model(toy_run, "biasmf_base_none_s0", {**meta, "variant": "base", "seed": 0}, good, np.eye(10))
    write_model(toy_run, "biasmf_base_none_s1", {**meta, "variant": "base", "seed": 1}, -good, np.eye(10))
    write_model(toy_run, "biasmf_augment_ppo_s1", {**meta, "variant": "augment", "source": "ppo", "seed": 1},
                good, np.eye(10))
    eval08.main(["--run", str(toy_run), "--ks", "1"])
    md = (toy_run / "results" / "tables.md").read_text()
    full = md.split("## Zero-shot")[0]
    row = next(line for line in full.splitlines() if line.startswith("| biasmf | augment |"))
    # Recall@1 0.75 against seed 1 of Base (0): an absolute change; the two-seed mean (0.375) would give +100%
    assert row.split(" | ")[6] == "+0.7500*", row
