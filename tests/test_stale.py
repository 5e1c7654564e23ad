"""The manifest's staleness check across stages (docs/spec.md, section 2): a re-run upstream stage makes everything
built from its old outputs stale (checked from the hashes each consumer recorded, transitively, model directories
included), resumed rows of 02 and 06 are reused only when built from the same prompt and upstream state, and
every record holds the code (git revision, sha256 of the script and of the repository modules it imports) that 08
compares."""
import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch

import common
import llm
from test_eval import toy_run  # noqa: F401 - a fixture

torch.set_num_threads(1)
D = common.load_stage("02_distill")
RW = common.load_stage("04_reward")
P = common.load_stage("06_profile")
CF = common.load_stage("07_train_cf")
EV = common.load_stage("08_eval")

CF_FAST = ["--backbone", "biasmf", "--max-epochs", "2", "--min-epochs", "1", "--eval-every", "1",
           "--batch-size", "64", "--dim", "8"]


class Args:
    seed = 0


def rows(path):
    return [json.loads(line) for line in open(path)]


def resplit(run, n=6):
    """01 re-run with another split: the first `n` training interactions move to test; recorded as 01 records."""
    split = dict(np.load(run / "data" / "split.npz"))
    split["test_u"] = np.concatenate([split["test_u"], split["train_u"][:n]])
    split["test_i"] = np.concatenate([split["test_i"], split["train_i"][:n]])
    split["train_u"], split["train_i"] = split["train_u"][n:], split["train_i"][n:]
    common.save_npz(run / "data" / "split.npz", **split)
    outputs = list(common.read_manifest(run)["stages"]["01_neighbors"]["outputs"])
    common.record_stage(run, "01_neighbors", Args(), [], outputs, time.time())
    return {int(u) for u in split["test_u"][-n:]}


def profile_args(run, model, source="base_llm", *extra):
    return ["--run", str(run), "--model", model, "--source", source, "--device", "cpu", "--max-new-tokens", "6",
            "--batch-size", "8", "--retries", "0", *extra]


# ----------------------------------------------------------------------------- the check itself

def test_consumer_hashes_checked_transitively(tmp_path):
    run = tmp_path / "run"
    common.write_json(run / "a.json", {"v": 1})
    common.record_stage(run, "01_neighbors", Args(), [], ["a.json"], time.time())
    common.write_json(run / "b.json", {"v": 2})
    common.record_stage(run, "02_distill", Args(), ["a.json"], ["b.json"], time.time())
    common.write_json(run / "w.bin", {"w": 1})
    common.record_stage(run, "03_sft_mask", Args(), ["b.json"], ["w.bin"], time.time())
    common.write_json(run / "c.json", {"v": 3})
    common.record_stage(run, "06_profile_x", Args(), ["a.json", "w.bin"], ["c.json"], time.time())
    common.check_inputs(run, ["a.json", "b.json", "w.bin", "c.json"])
    common.write_json(run / "a.json", {"v": 9})  # 01 re-run: every file matches what its producer last wrote
    common.record_stage(run, "01_neighbors", Args(), [], ["a.json"], time.time())
    common.check_inputs(run, ["a.json"])
    with pytest.raises(common.StaleInputError, match=r"^b.json was built by 02_distill from a.json, which "
                                                     r"01_neighbors has since rewritten; re-run 02_distill \(or"):
        common.check_inputs(run, ["b.json"])
    # the longest chain names the most upstream stage, and the order of every stage to re-run
    with pytest.raises(common.StaleInputError, match=r"c.json was written by 06_profile_x from inputs that are now "
                                                     r"stale: w.bin was written by 03_sft_mask .* re-run 02_distill, "
                                                     r"then 03_sft_mask, 06_profile_x \(or pass --force\)"):
        common.check_inputs(run, ["c.json"])
    common.check_inputs(run, ["c.json"], force=True)
    assert "06_profile_x" in common.stage_stale(run, "06_profile_x")


def test_model_directories_are_inputs(tmp_path):
    run = tmp_path / "run"
    common.write_json(run / "m" / "w.bin", {"w": 1})
    common.write_json(run / "m" / "sub" / "cfg.json", {"r": 8})
    common.record_stage(run, "03_sft_mask", Args(), [], ["m/w.bin", "m/sub/cfg.json"], time.time())
    common.write_json(run / "c.json", {"v": 3})
    common.record_stage(run, "06_profile_x", Args(), ["m/"], ["c.json"], time.time())
    assert common.read_manifest(run)["stages"]["06_profile_x"]["inputs"]["m/"] == common.sha256_path(run, "m/")
    common.check_inputs(run, ["m/", "c.json"])
    common.write_json(run / "m" / "w.bin", {"w": 2})  # retrained through its stage
    common.record_stage(run, "03_sft_mask", Args(), [], ["m/w.bin", "m/sub/cfg.json"], time.time())
    common.check_inputs(run, ["m/"])
    with pytest.raises(common.StaleInputError, match=r"c.json was built by 06_profile_x from m/, which 03_sft_mask "
                                                     r"has since rewritten; re-run 06_profile_x \("):
        common.check_inputs(run, ["c.json"])
    common.write_json(run / "m" / "extra.bin", {})  # a file added outside any stage
    with pytest.raises(common.StaleInputError, match=r"m/ changed since 03_sft_mask wrote it; re-run 03_sft_mask"):
        common.check_inputs(run, ["m/"])
    assert common.stage_stale(run, "03_sft_mask") is None  # its recorded files are all still as written


def test_record_has_code_and_works_without_git(tmp_path, monkeypatch):
    run = tmp_path / "run"
    common.write_json(run / "a.json", {"v": 1})
    common.record_stage(run, "07_train_cf/x", Args(), [], ["a.json"], time.time())
    code = common.read_manifest(run)["stages"]["07_train_cf/x"]["code"]
    assert code["files"] == {"07_train_cf.py": common.sha256_file(common.REPO / "07_train_cf.py"),
                             "common.py": common.sha256_file(common.REPO / "common.py")}
    assert "git" in code
    monkeypatch.setattr(common, "_GIT", {})
    monkeypatch.setenv("PATH", "")  # no git at all
    common.record_stage(run, "08_eval", Args(), ["a.json"], [], time.time())
    code = common.read_manifest(run)["stages"]["08_eval"]["code"]
    assert code["git"] is None and set(code["files"]) == {"08_eval.py", "common.py"}


def test_code_includes_the_shared_modules_a_stage_imports(tmp_path):
    """A stage's recorded code is its script and the repository modules it imports, directly or through one another:
    data.py for 01; llm.py, generate.py and prompts.py for 02-06, and teachers.py for those that use a teacher (02, 03,
    06). Editing a prompt makes what 02-06 built show as built by changed code in 08, as editing common.py does."""
    def names(stage):
        return sorted(p.name for p in common.stage_code(stage))
    assert names("01_neighbors") == ["01_neighbors.py", "common.py", "data.py"]
    lm = ["common.py", "generate.py", "llm.py", "prompts.py"]
    scripts = {"02_distill": ["02_distill.py", "teachers.py"], "03_sft_mask": ["03_sft.py", "teachers.py"],
               "04_reward": ["04_reward.py"], "05_ppo": ["05_ppo.py"],
               "06_profile_ppo": ["06_profile.py", "teachers.py"],
               "06_probe_base_llm": ["06_profile.py", "teachers.py"]}
    for stage, own in scripts.items():
        assert names(stage) == sorted(own + lm)
    assert names("08_eval") == ["08_eval.py", "common.py"]
    run = tmp_path / "run"
    common.write_json(run / "a.json", {"v": 1})
    common.record_stage(run, "02_distill", Args(), [], ["a.json"], time.time())
    common.write_json(run / "b.json", {"v": 2})
    common.record_stage(run, "06_profile_ppo", Args(), ["a.json"], ["b.json"], time.time())
    manifest = common.read_manifest(run)
    assert manifest["stages"]["06_profile_ppo"]["code"]["files"]["llm.py"] == common.sha256_file(common.REPO / "llm.py")
    assert EV.code_changes(run, "06_profile_ppo", manifest) == {}
    manifest["stages"]["02_distill"]["code"]["files"]["llm.py"] = "0" * 64  # llm.py edited since 02 ran
    assert EV.code_changes(run, "06_profile_ppo", manifest) == {"02_distill": ["llm.py"]}


# ----------------------------------------------------------------------------- a re-run 01 through the stages

def test_new_split_makes_every_later_stage_refuse(synthetic_run, tiny_llm):
    run = synthetic_run
    D.main(["--run", str(run), "--no-probe"])
    P.main(profile_args(run, tiny_llm, "base_llm", "--limit", "4"))
    CF.main(["--run", str(run), "--variant", "augment", "--source", "base_llm", *CF_FAST])
    EV.main(["--run", str(run), "--ks", "5"])
    resplit(run)
    with pytest.raises(common.StaleInputError, match=r"reward_pairs.jsonl was built by 02_distill from "
                                                     r"data/split.npz, which 01_neighbors has since rewritten; "
                                                     r"re-run 02_distill \("):
        RW.main(["--run", str(run), "--model", tiny_llm, "--device", "cpu"])
    with pytest.raises(common.StaleInputError,
                       match=r"(user_sets|prompt).json was built by 02_distill .* re-run 02_distill"):
        P.main(profile_args(run, tiny_llm, "base_llm", "--probe-only"))
    with pytest.raises(common.StaleInputError,
                       match=r"profiles/base_llm/user_emb.npy was written by 06_profile_base_llm from "
                             r"inputs that are now stale: .*re-run 02_distill, then 06_profile_base_llm"):
        CF.main(["--run", str(run), "--variant", "augment", "--source", "base_llm", *CF_FAST])
    with pytest.raises(common.StaleInputError,
                       match=r"cf/biasmf_augment_base_llm_s0/.* re-run 02_distill, then "
                             r"06_profile_base_llm, 07_train_cf/biasmf_augment_base_llm_s0"):
        EV.main(["--run", str(run), "--ks", "5"])
    # 02 reads only 01's outputs, which are current: it redoes every row built from the old split
    n = len(rows(run / "distill.jsonl"))
    out = D.main(["--run", str(run), "--no-probe"])
    assert out["stats"]["redone"] == n and out["stats"]["written"] == n
    common.check_inputs(run, ["reward_pairs.jsonl", "user_sets.json"])


def test_retrained_ppo_makes_profiles_and_models_stale(synthetic_run, tiny_llm, monkeypatch):
    """06 records the model directories it loads (ppo/ and the SFT adapter under it): a retrained 05 makes its
    profiles stale, 07 refuses them, and with --force retrains instead of skipping the model."""
    run = synthetic_run
    D.main(["--run", str(run), "--no-probe"])  # prompt.json: the prompt sizes 06 shows
    for name, stage, files in (("sft_mask", "03_sft_mask", ["adapter_model.safetensors"]),
                               ("ppo", "05_ppo", ["adapter_model.safetensors", "base.json"])):
        for f in files:
            common.write_text(run / name / f, json.dumps({"sft": "sft_mask"}) if f == "base.json" else "weights 1")
        inputs = ["data/split.npz"] + (["sft_mask/adapter_model.safetensors"] if name == "ppo" else [])
        common.record_stage(run, stage, Args(), inputs, [f"{name}/{f}" for f in files], time.time())
    monkeypatch.setattr(llm, "load_profile_model", lambda run, source, model, device=None, chat_template=None:
                        llm.load_llm(tiny_llm, device="cpu"))
    P.main(profile_args(run, tiny_llm, "ppo", "--limit", "3"))
    argv = ["--run", str(run), "--variant", "augment", "--source", "ppo", *CF_FAST]
    CF.main(argv)
    model = run / "cf" / "biasmf_augment_ppo_s0" / "model.pt"
    written = model.stat().st_mtime_ns
    CF.main(argv)  # current: skipped
    assert model.stat().st_mtime_ns == written
    common.write_text(run / "ppo" / "adapter_model.safetensors", "weights 2")  # 05 retrained
    common.record_stage(run, "05_ppo", Args(), ["data/split.npz", "sft_mask/adapter_model.safetensors"],
                        ["ppo/adapter_model.safetensors", "ppo/base.json"], time.time())
    with pytest.raises(common.StaleInputError,
                       match=r"profiles/ppo/user_emb.npy was built by 06_profile_ppo from ppo/, which "
                             r"05_ppo has since rewritten; re-run 06_profile_ppo"):
        CF.main(argv)
    CF.main(argv + ["--force"])  # the profiles' files did not change, but what they were built from did
    assert model.stat().st_mtime_ns != written  # retrained, not skipped
    # an SFT adapter retrained under the PPO model: 05 is stale, so are 06's profiles
    common.write_text(run / "sft_mask" / "adapter_model.safetensors", "weights 3")
    common.record_stage(run, "03_sft_mask", Args(), ["data/split.npz"], ["sft_mask/adapter_model.safetensors"],
                        time.time())
    with pytest.raises(common.StaleInputError, match=r"re-run 05_ppo, then 06_profile_ppo"):
        CF.main(argv)
    # 06 re-run: every row was built by the old model, so every row is redone
    assert {"ppo/", "sft_mask/"} <= set(common.read_manifest(run)["stages"]["06_profile_ppo"]["inputs"])
    probe = P.main(profile_args(run, tiny_llm, "ppo", "--limit", "3", "--force"))
    assert probe["redone"] == {"user profiles": 3, "warm item profiles": 3, "cold item profiles": 3}


# ----------------------------------------------------------------------------- resumed rows

def test_distill_redoes_rows_of_another_prompt_or_upstream(synthetic_run):
    run = synthetic_run
    args = ["--run", str(run), "--no-probe"]
    D.main(args)
    path = run / "distill.jsonl"
    first = rows(path)
    again = D.main(args)
    assert again["stats"]["written"] == 0 and again["stats"].get("redone", 0) == 0
    n = len(first)
    tampered = json.loads(json.dumps(first))
    tampered[2]["prompt"][-1]["content"] += " (an older prompt format)"
    tampered[2]["profile"] = "User identity: a, b, c; User interests: x, y, z"
    tampered[5].pop("upstream", None)  # a row without a recorded upstream state
    common.write_jsonl(path, tampered)
    out = D.main(args)
    assert rows(path) == first
    assert out["stats"]["written"] == 2 and out["stats"]["redone"] == 2
    moved = resplit(run)  # the split changes: every row is redone, and prompts of the moved users change
    out = D.main(args)
    assert out["stats"]["written"] == n and out["stats"]["redone"] == n
    now = rows(path)
    assert [r["user"] for r in now] == [r["user"] for r in first]
    assert moved <= {r["user"] for r, o in zip(now, first) if r["prompt"] != o["prompt"]}
    assert len({r["upstream"] for r in now} | {first[0]["upstream"]}) == 2


def test_profile_rows_redone_when_prompt_or_upstream_changed(synthetic_run, tiny_llm):
    run = synthetic_run
    argv = profile_args(run, tiny_llm, "base_llm", "--limit", "4")
    D.main(["--run", str(run), "--no-probe"])
    P.main(argv)
    out = run / "profiles" / "base_llm"
    users, items = rows(out / "users.jsonl"), rows(out / "items.jsonl")
    # a prompt that changed since (its stored hash no longer matches) and a row without an upstream state
    tampered = [dict(r) for r in users]
    tampered[1]["prompt_hash"] = "0" * 16
    tampered[1]["profile"] = "written from another prompt"
    tampered[3].pop("upstream", None)
    common.write_jsonl(out / "users.jsonl", tampered)
    probe = P.main(argv)
    assert rows(out / "users.jsonl") == users and rows(out / "items.jsonl") == items
    assert probe["redone"] == {"user profiles": 2, "warm item profiles": 0, "cold item profiles": 0}
    resplit(run)  # 01 re-run: every row was built from the old split
    D.main(["--run", str(run), "--no-probe"])
    probe = P.main(argv)
    assert rows(out / "users.jsonl") != users
    assert probe["redone"] == {"user profiles": 4, "warm item profiles": 4, "cold item profiles": 4}
    assert len({r["upstream"] for r in rows(out / "users.jsonl")} | {users[0]["upstream"]}) == 2


def test_profile_rows_redone_when_the_code_changed(synthetic_run, tiny_llm, monkeypatch, tmp_path):
    """Rows written by another version of 06 or of a module it imports (llm.py here) are not reused by a resume."""
    run = synthetic_run
    argv = profile_args(run, tiny_llm, "base_llm", "--limit", "4")
    D.main(["--run", str(run), "--no-probe"])
    P.main(argv)
    assert P.main(argv)["redone"] == {"user profiles": 0, "warm item profiles": 0, "cold item profiles": 0}
    edited = tmp_path / "llm.py"
    edited.write_text((common.REPO / "llm.py").read_text() + "\n# an edit\n")
    real = common.stage_code
    monkeypatch.setattr(common, "stage_code", lambda stage: [p for p in real(stage) if p.name != "llm.py"] + [edited])
    assert P.main(argv)["redone"] == {"user profiles": 4, "warm item profiles": 4, "cold item profiles": 4}


def test_probe_only_redoes_rows_of_another_prompt(synthetic_run, tiny_llm):
    run = synthetic_run
    D.main(["--run", str(run), "--no-probe"])
    argv = profile_args(run, tiny_llm, "base_llm", "--probe-only")
    P.main(argv)
    path = run / "profiles" / "base_llm" / "probe_only" / "users.jsonl"
    before = rows(path)
    tampered = [dict(r, prompt_hash="f" * 16) if k < 2 else r for k, r in enumerate(before)]
    common.write_jsonl(path, tampered)
    probe = P.main(argv)
    assert rows(path) == before and probe["redone"]["user profiles"] == 2


# ----------------------------------------------------------------------------- 08: code that changed since

def test_eval_names_results_of_changed_code(toy_run):  # noqa: F811 - the fixture imported above
    EV.main(["--run", str(toy_run), "--ks", "1", "2"])
    assert "Code: every model was built by the current code" in (toy_run / "results" / "tables.md").read_text()
    path = toy_run / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["stages"]["07_train_cf/lightgcn_base_none_s0"]["code"]["files"]["07_train_cf.py"] = "0" * 64
    path.write_text(json.dumps(manifest))
    EV.main(["--run", str(toy_run), "--ks", "1", "2"])
    md = (toy_run / "results" / "tables.md").read_text()
    assert "⚠ Code: 07_train_cf.py changed since 1 model(s) were built (lightgcn_base_none_s0)" in md
    manifest = json.loads(path.read_text())
    manifest["stages"]["01_neighbors"]["code"]["files"]["common.py"] = "0" * 64  # e.g. a new ranking helper
    path.write_text(json.dumps(manifest))
    EV.main(["--run", str(toy_run), "--ks", "1", "2"])
    md = (toy_run / "results" / "tables.md").read_text()
    assert "common.py changed since 2 model(s) were built" in md
    assert "07_train_cf.py, common.py changed since 1 model(s) were built (lightgcn_base_none_s0)" in md


def test_large_file_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "SHA_CACHE_BYTES", 1000)
    big = tmp_path / "model.safetensors"
    big.write_bytes(b"a" * 4000)
    reads = []
    real_open = open

    def counting_open(path, *a, **kw):
        reads.append(str(path))
        return real_open(path, *a, **kw)
    monkeypatch.setattr("builtins.open", counting_open)
    first = common.sha256_file(big)
    assert common.sha256_file(big) == first and reads.count(str(big)) == 1  # remembered
    tmp = tmp_path / "model.tmp"
    tmp.write_bytes(b"b" * 4000)
    os.replace(tmp, big)  # rewritten as the stages write: same size, another inode
    assert common.sha256_file(big) == hashlib.sha256(b"b" * 4000).hexdigest() != first
    small = tmp_path / "meta.json"
    small.write_bytes(b"x" * 10)
    common.sha256_file(small)
    small.write_bytes(b"y" * 10)  # in place, same size, maybe within the clock's tick: still read again
    assert common.sha256_file(small) == hashlib.sha256(b"y" * 10).hexdigest()
