"""02_distill's teacher and reward pairs: the teacher profiles what the prompts show, its terms set a user apart
from the population, and the reward pairs hold no reordered chosen profile and no held-out or PPO user's profile.
Fast: hand-built catalogues and the synthetic run of conftest.py."""
import collections
import json
import types

import numpy as np
import pytest

import common
import llm
import prompts
import teachers

D = common.load_stage("02_distill")
R = common.load_stage("04_reward")
S = common.load_stage("03_sft")


def rows(path):
    return [json.loads(line) for line in open(path)]


def load(run):
    split = common.load_split(run)
    return split, common.load_items(run), common.user_items(split["train_u"], split["train_i"], split["n_users"])


def shown_lines(items, item_text, max_chars):
    """The lines a prompt writes for `items` (without their numbers)."""
    return [prompts.clip(item_text[i], max_chars) for i in items]


# ----------------------------------------------------------------------------- what the prompt shows

def test_profile_depends_only_on_what_the_prompt_shows(synthetic_run):
    _, text, train = load(synthetic_run)
    nbrs = common.load_neighbors(synthetic_run)["user_nbrs"]
    rules = teachers.RulesTeacher(text, train)
    u = next(u for u in range(len(train)) if len(train[u]) > D.MAX_ITEMS + 1)
    items = [int(i) for i in train[u]]
    n_hidden = len(items) - D.MAX_ITEMS
    # the other taste group's items (odd / even genres): a teacher that read them would name their genres
    other = [i for i in range(len(text)) if i not in items and (i % 6) % 2 != u % 2]
    changed = other[:n_hidden] + items[n_hidden:]
    train2 = list(train)
    train2[u] = np.array(changed)
    assert prompts.user_prompt(u, train2, nbrs, text) == prompts.user_prompt(u, train, nbrs, text)
    assert rules.profile(changed) == rules.profile(items)
    assert rules.profile(items[:-1] + [other[-1]]) != rules.profile(items)  # a shown item does count


def test_distill_rows_depend_only_on_shown_items(synthetic_run):
    """End to end: 02 on a split whose hidden training items are all replaced writes the same profiles; every
    row names its shown items, and the reward query and 03's KD prompt show each of them."""
    D.main(["--run", str(synthetic_run), "--no-probe"])
    first = {r["user"]: r for r in rows(synthetic_run / "distill.jsonl")}
    split, text, train = load(synthetic_run)
    for u, r in first.items():
        assert r["items"] == [int(i) for i in train[u][-D.MAX_ITEMS:]] and r["n_items"] == len(train[u])
        shown = prompts.prompt_settings(synthetic_run)["teacher"]
        assert shown == {"max_items": D.MAX_ITEMS, "max_chars": D.MAX_CHARS}
        kd = prompts.kd_messages(train[u], text, shown["max_items"], shown["max_chars"])[1]["content"]
        assert all(line in kd for line in shown_lines(r["items"], text, D.MAX_CHARS))
    for p in rows(synthetic_run / "reward_pairs.jsonl"):
        target = p["prompt"][1]["content"].split("Similar users' items")[0]
        assert all(line in target for line in shown_lines(first[p["user"]]["items"], text, D.MAX_CHARS))

    # replace every hidden training item (same count, so the "older items not shown" note stays) by another item
    tu, ti = split["train_u"].copy(), split["train_i"].copy()
    n_items = int(split["n_items"])
    for u in range(int(split["n_users"])):
        rows_u = np.flatnonzero(tu == u)
        hidden = rows_u[:max(len(rows_u) - D.MAX_ITEMS, 0)]
        ti[hidden] = (ti[hidden] + 1) % n_items
    common.save_npz(synthetic_run / "data" / "split.npz", **{**split, "train_i": ti})
    D.main(["--run", str(synthetic_run), "--no-probe", "--force"])
    again = {r["user"]: r for r in rows(synthetic_run / "distill.jsonl")}
    assert {u: r["profile"] for u, r in again.items()} == {u: r["profile"] for u, r in first.items()}


def test_teacher_reads_item_text_as_the_prompt_cuts_it():
    vocab = {"crime": "Crime", "drama": "Drama", "thriller": "Thriller", "documentary": "Documentary"}
    # cut at 48: "... Genres: Crime, Drama, Thr…": the cut genre has one completion
    assert teachers.visible_item("Guilty as Sin (1993). Genres: Crime, Drama, Thriller.", 48, vocab) == \
        ("Guilty as Sin", 1993, ["Crime", "Drama", "Thriller"])
    # "D…": Drama or Documentary, so not read
    shown = teachers.visible_item("Guilty as Sin Again No (1993). Genres: Crime, Documentary.", 48, vocab)
    assert shown[2] == ["Crime"]
    long = "An Extremely Long Title That Fills The Line (1995). Genres: Horror."
    assert teachers.visible_item(long, 48, vocab)[1:] == (None, [])  # "... Fills The Line (19…": no year, no genre
    assert teachers.visible_item(long, 0, vocab)[2] == ["Horror"]


def test_reward_queries_must_show_what_the_teacher_saw(synthetic_run):
    with pytest.raises(common.UsageError, match="--pair-max-items 3 < --max-items 5"):
        D.main(["--run", str(synthetic_run), "--no-probe", "--pair-max-items", "3"])
    with pytest.raises(common.UsageError, match="--pair-max-items 5 < --max-items 0"):
        D.main(["--run", str(synthetic_run), "--no-probe", "--max-items", "0"])


# ----------------------------------------------------------------------------- discriminative terms

def catalogue():
    """Drama for everyone, from the 1990s; a few horror, comedy and 1950s westerns."""
    texts = [f"Drama {k} (199{k % 10}). Genres: Drama." for k in range(10)]
    texts += [f"Scream {k} (1996). Genres: Horror." for k in range(3)]
    texts += [f"Laugh {k} (1994). Genres: Comedy." for k in range(6)]
    texts += [f"Saddle {k} (195{k}). Genres: Western." for k in range(3)]
    return texts


def test_terms_by_lift_not_frequency():
    texts = catalogue()
    drama, horror, comedy, western = range(10), range(10, 13), range(13, 19), range(19, 22)
    train = [np.array([drama[(u + k) % 10] for k in range(3)] + [comedy[u % 6], comedy[(u + 1) % 6]])
             for u in range(30)]
    train.append(np.array([drama[0], drama[1], drama[2], horror[0], horror[1]]))       # user 30
    train.append(np.array([drama[3], drama[4], drama[5], western[0], western[1]]))     # user 31
    rules = teachers.RulesTeacher(texts, train)
    prof = [rules.profile(x) for x in train]
    ident, interests = zip(*(D.split_profile(p) for p in prof))
    # what sets them apart comes first, not Drama (3 of 5 items, as for everyone)
    assert interests[30][0] == "Horror" and "horror buff" in ident[30]
    assert interests[31][0] == "Western" and {"western fan", "classic film buff"} <= set(ident[31])
    assert prof[30] != prof[31]
    # every item is from the 1990s but the westerns: no one is a "90s film fan", nor a "drama lover"
    assert not any(t in ("90s film fan", "drama lover") for ids in ident for t in ids)
    div = D.profile_diversity(prof)
    assert div["n"] == 32 and div["top_identity_share"] < 1 and div["distinct_interest_triples"] >= 3


def test_profile_diversity():
    a = "User identity: fan, teen, parent; User interests: comedy, drama, war"
    b = "User identity: Teen, parent, fan; User interests: war, comedy, drama"    # a reordered
    c = "User identity: fan, critic, parent; User interests: horror, drama, war"
    d = D.profile_diversity([a, b, c, "not a profile"])
    assert d == {"n": 3, "malformed": 1, "distinct_profiles": 2, "top_identity": "fan, parent, teen",
                 "top_identity_share": pytest.approx(2 / 3), "top_identity_term": "fan",
                 "top_identity_term_share": 1.0, "distinct_interest_triples": 2}


def test_distill_reports_teacher_diversity(synthetic_run):
    out = D.main(["--run", str(synthetic_run)])
    probe = json.loads((synthetic_run / "distill_probe.json").read_text())
    d = probe["diversity"]["all_users"]
    assert d == out["diversity"]["all_users"] and d["n"] == 40 and d["malformed"] == 0
    assert d["distinct_profiles"] > 2 and d["top_identity_share"] < 0.5  # two taste groups, not two profiles
    assert probe["reward_pairs"] == out["pair_counts"]


# ----------------------------------------------------------------------------- reward pairs

P = {0: "User identity: a, b, c; User interests: x, y, z",
     1: "User identity: c, b, a; User interests: z, y, x",   # 0's terms reordered
     2: "User identity: b, c, q; User interests: y, z, w",   # a merge with 0 keeps 0's own terms
     3: "User identity: e1, e2, e3; User interests: e4, e5, e6",
     4: "User identity: p1, p2, p3; User interests: p4, p5, p6",
     5: "User identity: s1, s2, s3; User interests: s4, s5, s6"}
SETS = {"sft": [2, 5], "reward": [0, 1], "ppo": [4], "eval": [3]}


def test_pairs_drop_reordered_and_keep_eval_and_ppo_users_out():
    nbrs = np.array([[1, 3, 4, 2], [0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3], [0, 1, 2, 3]])
    text = ["Some Film (1995). Genres: Drama."]
    for seed in range(12):  # both oversmoothing variants, both repeated variants
        pairs, counts = D.build_pairs(SETS, P, [np.array([0])] * 6, nbrs, text, seed)
        for p in pairs:
            assert D.terms_key(p["rejected"]) is None or D.terms_key(p["rejected"]) != D.terms_key(p["chosen"])
        sub = {p["user"]: p["rejected"] for p in pairs if p["kind"] == "substitution"}
        assert sub[0] == P[2]  # not 1 (reordered), 3 (eval) nor 4 (PPO)
        assert sub[1] == P[2]  # its neighbour 0 is fine, but 0 is 1 reordered
        assert sub[3] == P[0]  # held-out pairs may take any user's profile
        over = next(p for p in pairs if p["user"] == 0 and p["kind"] == "oversmoothing")
        assert over["variant"] == "concatenated"  # the merge with 2 would be 0's own terms
        assert counts["reward"]["substitution"] == 2 and counts["eval"]["substitution"] == 1
        assert all(counts[s][k] == len(SETS[s]) for s in ("reward", "eval") for k in D.KINDS)
    # no neighbour but reordered ones, eval and PPO users: a random donor of the training sets
    pairs, _ = D.build_pairs(SETS, P, [np.array([0])] * 6, np.array([[1, 3, 4]] * 6), text, 0)
    p = next(p for p in pairs if p["user"] == 0 and p["kind"] == "substitution")
    assert p["variant"] == "random_user" and p["rejected"] in (P[2], P[5])


def test_several_substitutions_per_training_user_are_distinct_and_held_out_get_one():
    nbrs = np.array([[1, 3, 4, 2], [0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3], [0, 1, 2, 3]])
    text = ["Some Film (1995). Genres: Drama."]
    pairs, counts = D.build_pairs(SETS, P, [np.array([0])] * 6, nbrs, text, 0, train_substitutions=3)
    sub = collections.defaultdict(list)
    for p in pairs:
        if p["kind"] == "substitution":
            sub[p["user"]].append((p["rejected"], p["variant"]))
    # user 0: neighbour 2 first, then the other training donors (1 is 0 reordered; 3 eval, 4 ppo): only 5 is left
    assert sub[0] == [(P[2], "neighbour"), (P[5], "random_user")]
    assert len(sub[3]) == 1 and counts["eval"]["substitution"] == 1   # held-out users: one, as before
    for u, subs in sub.items():
        keys = [D.terms_key(r) for r, _ in subs]
        assert len(set(keys)) == len(keys) and D.terms_key(P[u]) not in keys
    assert counts["reward"]["substitution"] == sum(len(sub[u]) for u in SETS["reward"])
    assert all(counts["reward"][k] == len(SETS["reward"]) for k in D.KINDS if k != "substitution")
    # the held-out pairs do not depend on the training set's settings (one RNG per set)
    held = [p for p in pairs if p["set"] == "eval"]
    for n, sets in ((1, ("reward", "eval")), (3, ("eval",))):
        again, _ = D.build_pairs(SETS, P, [np.array([0])] * 6, nbrs, text, 0, sets, train_substitutions=n)
        assert [p for p in again if p["set"] == "eval"] == held


def test_train_substitutions_below_one_is_refused(synthetic_run, capsys):
    with pytest.raises(SystemExit) as e:
        D.main(["--run", str(synthetic_run), "--no-probe", "--train-substitutions", "0"])
    assert e.value.code == 2 and "argument --train-substitutions: expected an integer >= 1, got 0" in \
        capsys.readouterr().err


def test_every_heldout_pair_can_be_scored(synthetic_run, tiny_llm):
    D.main(["--run", str(synthetic_run), "--no-probe"])
    sets = json.loads((synthetic_run / "user_sets.json").read_text())
    pairs = rows(synthetic_run / "reward_pairs.jsonl")
    held = [p for p in pairs if p["set"] == "eval"]
    assert len(held) == len(D.KINDS) * len(sets["eval"])
    tok = llm.load_tokenizer(tiny_llm)
    args = types.SimpleNamespace(heldout="auto", seed=0, heldout_frac=0.2, max_length=R.MAX_LENGTH,
                                 max_eval_pairs=len(pairs), limit=None)
    train, scored, counts = R.load_pairs(synthetic_run, tok, args)
    assert counts["too_long"] == 0 and len(scored) == len(held) and len(train) == len(pairs) - len(held)
    assert {k: sum(p["kind"] == k for p in scored) for k in D.KINDS} == {k: len(sets["eval"]) for k in D.KINDS}
