"""06_profile --source teacher: the rules teacher of 02 writes every user and item profile (the upper bound of
distillation), no LLM. Fast: the synthetic run of conftest.py and the shipped text encoder."""
import json

import numpy as np
import pytest

import common
import prompts
import teachers
from conftest import GENRES, assert_probes_close

D = common.load_stage("02_distill")
P = common.load_stage("06_profile")


def rows(path):
    return [json.loads(line) for line in open(path)]


def terms(profile, side):
    return prompts.PROFILE_RE.search(profile).group(side).split(", ")


def teacher_args(run, *extra):
    return ["--run", str(run), "--source", "teacher", "--device", "cpu", *extra]


def test_teacher_profiles_embeddings_manifest(synthetic_run):
    D.main(["--run", str(synthetic_run), "--no-probe"])  # distill.jsonl (the targets) and user_sets.json
    probe = P.main(teacher_args(synthetic_run))
    out = synthetic_run / "profiles" / "teacher"
    split = common.load_split(synthetic_run)
    n_users, n_items = int(split["n_users"]), int(split["n_items"])
    users, items = rows(out / "users.jsonl"), rows(out / "items.jsonl")

    # users: exactly 02's distillation targets, one valid profile each
    assert [r["user"] for r in users] == list(range(n_users))
    target = {r["user"]: r["profile"] for r in rows(synthetic_run / "distill.jsonl")}
    assert all(r["valid"] and r["teacher"] == "rules" and r["profile"] == target[r["user"]] for r in users)
    assert all(prompts.parse_profile(r["profile"]) == r["profile"] for r in users)

    # items: one valid profile each in the user format, warm from their recent training users, the others from
    # their warm text neighbours, each the merge of those profiles
    assert [r["item"] for r in items] == list(range(n_items))
    assert all(r["valid"] and prompts.parse_profile(r["profile"]) == r["profile"] and r["prompt_hash"]
               for r in items)
    users_of = common.user_items(split["train_i"], split["train_u"], n_items)
    item_nbrs = common.load_neighbors(synthetic_run)["item_nbrs"]
    kind = {r["item"]: r["kind"] for r in items}
    for r in items:
        i = r["item"]
        if len(users_of[i]):
            assert r["kind"] == "warm" and r["from_users"] == [int(u) for u in users_of[i][-5:][::-1]]
            assert terms(r["profile"], "interests")[0] in {t for u in r["from_users"]
                                                          for t in terms(target[u], "interests")}
            assert r["profile"] == prompts.merge_profiles([target[u] for u in r["from_users"]])
        else:
            assert r["kind"] == "cold" and r["from_items"]
            assert set(r["from_items"]) <= set(item_nbrs[i].tolist())
            assert all(kind[j] == "warm" for j in r["from_items"])
            # the synthetic items of one genre are text neighbours, liked by one taste group (odd / even genres):
            # a cold item's interests are its group's genres (or the teacher's fillers, for users of two genres),
            # learnt from its warm neighbours' users
            group = {GENRES[g].title() for g in range(len(GENRES)) if g % 2 == (i % len(GENRES)) % 2}
            got = set(terms(r["profile"], "interests"))
            assert len(got & group) >= 2 and got <= group | set(teachers.INTEREST_FILL), (got, group)
    assert {r["kind"] for r in items} == {"warm", "cold"}

    ue, ie = np.load(out / "user_emb.npy"), np.load(out / "item_emb.npy")
    assert ue.dtype == ie.dtype == np.float32 and ue.shape == (n_users, 384) and ie.shape == (n_items, 384)
    assert np.allclose(np.linalg.norm(ie, axis=1), 1, atol=1e-4)

    assert probe["source"] == "teacher" and probe["teacher"] == "rules"
    assert probe["malformed_users"] == probe["malformed_items"] == 0 and probe["eval_users"]["n_users"] > 0
    stage = common.read_manifest(synthetic_run)["stages"]["06_profile_teacher"]
    assert {"data/split.npz", "neighbors.npz", "user_sets.json"} <= set(stage["inputs"])
    assert stage["outputs"]["profiles/teacher/item_emb.npy"] == common.sha256_file(out / "item_emb.npy")
    common.check_inputs(synthetic_run, ["profiles/teacher/user_emb.npy", "profiles/teacher/item_emb.npy"])  # 07 may


def test_teacher_probe_only_and_refusals(synthetic_run):
    D.main(["--run", str(synthetic_run), "--no-probe"])
    eval_users = sorted(json.loads((synthetic_run / "user_sets.json").read_text())["eval"])
    quick = P.main(teacher_args(synthetic_run, "--probe-only"))
    out = synthetic_run / "profiles" / "teacher" / "probe_only"
    assert [r["user"] for r in rows(out / "users.jsonl")] == eval_users
    assert "06_probe_teacher" in common.read_manifest(synthetic_run)["stages"]
    full = P.main(teacher_args(synthetic_run))
    assert_probes_close(quick["eval_users"], full["eval_users"])
    for extra, msg in ((["--shard", "0/2"], "--shard"), (["--merge"], "--merge"), (["--limit", "3"], "--limit")):
        with pytest.raises(common.UsageError, match=msg):
            P.main(teacher_args(synthetic_run, *extra))
    with pytest.raises(common.UsageError, match="--source teacher only"):
        P.main(["--run", str(synthetic_run), "--source", "ppo", "--teacher", "rules"])


def test_merge_profiles_counts_ties_and_fill():
    a = "User identity: fan, teen, parent; User interests: comedy, drama, war"
    b = "User identity: Teen, critic, student; User interests: war, horror, comedy"
    # identities: teen twice, then the first met; interests: comedy and war twice (comedy met first)
    assert prompts.merge_profiles([a, b]) == "User identity: teen, fan, parent; User interests: comedy, war, drama"
    assert prompts.merge_profiles([b, a, a]) == "User identity: Teen, fan, parent; User interests: war, comedy, drama"
    fill = "User identity: x1, teen, x2; User interests: y1, y2, y3"
    # fill terms rank after every counted term, whatever their count in the fill
    one = "User identity: solo, fan, critic; User interests: noir, war, jazz"
    assert prompts.merge_profiles([one], fill=[fill, fill]) == one
    assert prompts.merge_profiles([], fill=[fill]) == fill  # no source profile: the fill alone
    assert prompts.merge_profiles([]) is None and prompts.merge_profiles(["not a profile"]) is None
