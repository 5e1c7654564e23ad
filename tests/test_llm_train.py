"""Stages 03 (SFT), 04 (reward model) and 05 (PPO) on the tiny random LLM and a synthetic run.

02's outputs (distill.jsonl, reward_pairs.jsonl, user_sets.json) are written here in the contract's format.
"""
import importlib
import importlib.util
import json
import math
import time

import numpy as np
import pytest
import scipy.stats
import torch

import common
import llm
import prompts
import teachers
from test_generate import CHAR_MAX_NEW, CHAR_PROFILE, build_char_llm, char_prompts

torch.set_num_threads(1)
sft = common.load_stage("03_sft")
rw = common.load_stage("04_reward")
ppo = common.load_stage("05_ppo")
prof = common.load_stage("06_profile")

IDENTITIES = ["student", "fan", "teen", "adult", "parent", "critic"]
GENRES = ["comedy", "drama", "horror", "romance", "action", "animation"]
KINDS = ["substitution", "oversmoothing", "incomplete", "repeated", "empty", "junk"]


def profile_of(u):
    ids = [IDENTITIES[(u + k) % 6] for k in range(3)]
    return f"User identity: {', '.join(ids)}; User interests: {', '.join(GENRES[(u % 2)::2])}"


UNTAUGHT = (2,)  # a reward user without a teacher profile: sft_gpt_kd writes theirs as neighbours


def write_stage02(run, teacher="rules"):
    """Users 0-1 are the held-out eval set (never taught, never shown), 2 has no teacher profile: SFT targets
    have an eval neighbour, the even ones an untaught one too (neighbours: the same parity, lowest ids first)."""
    split = common.load_split(run)
    n = split["n_users"]
    items = common.load_items(run)
    train = common.user_items(split["train_u"], split["train_i"], n)
    nbrs = common.load_neighbors(run)["user_nbrs"]
    sets = {"eval": [0, 1], "sft": list(range(6, 22)), "reward": list(range(2, 6)) + list(range(22, 34)),
            "ppo": list(range(34, n))}
    prompt = {u: prompts.inference_messages(train[u], [train[v] for v in nbrs[u]], items) for u in range(n)}
    distill = [{"user": u, "prompt": prompt[u], "profile": profile_of(u), "teacher": teacher} for u in range(2, n)
               if u not in UNTAUGHT]
    pairs = []
    for u in sets["reward"] + sets["eval"]:
        good = profile_of(u)
        bad = {"substitution": profile_of(u + 1), "oversmoothing": good + " " + profile_of(u + 1),
               "incomplete": good.split(";")[0], "repeated": good + " " + good, "empty": "",
               "junk": "movie movie 7 ! ?"}
        pairs += [{"user": u, "prompt": prompt[u], "chosen": good, "rejected": bad[k], "kind": k} for k in KINDS]
    common.write_jsonl(run / "distill.jsonl", distill)
    common.write_jsonl(run / "reward_pairs.jsonl", pairs)
    common.write_json(run / "user_sets.json", sets)
    common.write_json(run / prompts.PROMPT_FILE, {"teacher": {"max_items": 5, "max_chars": 48},
                                              "inference": prompts.PROMPT_SIZES,
                                              "inference_format": prompts.INFERENCE_FORMAT})

    class Args:
        seed = 0
    common.record_stage(run, "02_distill", Args(), [], ["distill.jsonl", "reward_pairs.jsonl", "user_sets.json",
                                                        prompts.PROMPT_FILE], time.time())
    return run


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def segments(labels):
    """Contiguous runs of supervised positions: [(start, [ids])]."""
    out, cur, start = [], [], None
    for k, t in enumerate(labels + [-100]):
        if t != -100:
            if not cur:
                start = k
            cur.append(t)
        elif cur:
            out.append((start, cur))
            cur = []
    return out


# ----------------------------------------------------------------------------- 03: data and supervised spans

def sft_args(run, variant, tiny_llm, *extra):
    args = sft.parse_args(["--run", str(run), "--variant", variant, "--model", tiny_llm, *extra])
    args.prompt = prompts.prompt_settings(run)  # as main sets it
    return args


def test_sft_supervised_spans(synthetic_run, tiny_llm):
    run = write_stage02(synthetic_run)
    tok = llm.load_tokenizer(tiny_llm)
    header = ids_of(tok, "<|im_start|>assistant")
    eot = ids_of(tok, "<|im_end|>")
    split = common.load_split(run)
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    valid = common.user_items(split["valid_u"], split["valid_i"], split["n_users"])
    texts = common.load_items(run)
    rules = teachers.RulesTeacher(texts, train, 5, 48)
    for variant in ["gpt_kd", "naive", "mask"]:
        examples, stats = sft.build_examples(run, variant, tok, sft_args(run, variant, tiny_llm, "--n-nbrs", "3"))
        users = [e for e in examples if e["kind"] in ("user", "two_turn")]
        items = [e for e in examples if e["kind"] not in ("user", "two_turn")]
        assert len(users) >= 15 and len(items) == (0 if variant == "naive" else round(len(users) / 2)), stats
        assert {e["kind"] for e in items} == (set() if variant == "naive" else {"warm_item", "cold_item"})
        for e in examples:
            segs = segments(e["labels"])
            for start, _ in segs:  # every supervised span opens an assistant turn
                assert e["input_ids"][start - len(header):start] == header
            answers = [m["content"] for m in e["messages"] if m["role"] == "assistant"]
            if e["kind"] != "two_turn":
                assert [s for _, s in segs] == [ids_of(tok, answers[0]) + eot]
            if e["kind"] == "user":
                assert answers == [profile_of(e["user"])]
                continue
            if e["kind"] in ("warm_item", "cold_item"):  # the answer is the merge of the profiles the prompt shows
                shown = [line.split(" -> ")[-1].split(". ", 1)[-1] for line in
                         e["messages"][1]["content"].split("\n") if "User identity:" in line]
                assert shown and answers == [prompts.merge_profiles(shown)]
                continue
            turn1, turn2 = answers
            assert turn2 == ("Yes" if e["label"] else "No")
            target_block = e["messages"][1]["content"].split("Similar user")[0]
            v = e["item"]
            shown_items = ([i for i in train[e["user"]] if int(i) != v][-5:] if e["reprofiled"]
                           else train[e["user"]][-5:])
            assert all(f"{texts[i][:30]}" in target_block for i in shown_items)
            # the target's profile is a function of its shown list: the teacher's, or the rules profile of the list
            expect_profile = rules.profile([i for i in train[e["user"]] if int(i) != v]) if e["reprofiled"] \
                else profile_of(e["user"])
            assert turn1.splitlines()[0] == "Target user: " + expect_profile
            assert all(line.startswith(f"Similar user {n}: ") for n, line in enumerate(turn1.splitlines()[1:], 1))
            expect = [ids_of(tok, turn2) + eot] if variant == "naive" else [ids_of(tok, turn1) + eot,
                                                                              ids_of(tok, turn2) + eot]
            assert [s for _, s in segs] == expect
            # no leakage: a positive item is absent from the turn-1 target list; a negative is not the target's
            assert f"Movie {v} (" not in target_block
            if e["label"]:
                assert v in set(train[e["user"]].tolist())
                assert e["reprofiled"] == (v in set(train[e["user"]][-5:].tolist()))
            else:
                assert v not in set(train[e["user"]].tolist()) | set(valid[e["user"]].tolist())
            assert f"Movie {v} (" in e["messages"][1]["content"].split("Similar user", 1)[1]
            # neighbours are shown as the teacher saw them (their profiles are answers too)
            assert "Similar user 1's items (" in e["messages"][1]["content"]
        if variant != "gpt_kd":
            labels = [e["label"] for e in users]
            assert stats["positives"] == sum(labels) and stats["negatives"] == len(labels) - sum(labels)
            assert abs(stats["positives"] - stats["negatives"]) <= 1, stats  # Yes/No balanced
            assert stats["nbrs_eval"] > 0  # eval users are never shown
            assert stats["nbrs_skipped"] > 0  # untaught ones are left out until sft_gpt_kd exists
            assert stats["pos_hidden"] > 0 and stats["pos_reprofiled"] > 0, stats
    # a teacher that cannot be re-asked here: positives come from items older than the shown window only
    run = write_stage02(synthetic_run, teacher="api")
    examples, stats = sft.build_examples(run, "mask", tok, sft_args(run, "mask", tiny_llm))
    pos = [e for e in examples if e.get("label") == 1]
    assert pos and not any(e["reprofiled"] for e in pos) and stats["pos_reprofiled"] == 0
    assert all(e["item"] in set(train[e["user"]][:-5].tolist()) for e in pos)
    # prompts are never cut (a shorter list is not what the teacher saw): too long examples are left out
    examples, stats = sft.build_examples(run, "mask", tok, sft_args(run, "mask", tiny_llm, "--max-length", "200"))
    assert stats["too_long"] > 0 and all(len(e["input_ids"]) <= 200 for e in examples)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_labels(seed):
    """As many Yes as No up to one; one-kind targets keep their kind; a surplus of them is left out (seeded)."""
    rng = np.random.default_rng(seed)
    cases = [([1] * 3 + [0] * 9 + [1] * 8, [0] * 3 + [1] * 9 + [1] * 8),  # 3 Yes-only, 9 No-only, 8 either
             ([1] * 10 + [0] * 2 + [1], [0] * 10 + [1] * 2 + [1]),        # too many Yes-only: some left out
             ([1] * 7, [1] * 7), ([], [])]
    for can_pos, can_neg in cases:
        labels = sft.balanced_labels(can_pos, can_neg, rng)
        kept = [v for v in labels if v is not None]
        assert abs(sum(kept) - (len(kept) - sum(kept))) <= 1, labels
        for v, p, n in zip(labels, can_pos, can_neg):
            assert v is None or (v == 1 and p) or (v == 0 and n)
        assert len(kept) == min(len(labels), 2 * min(sum(can_pos), sum(can_neg)) + 1)
    assert sft.balanced_labels([1] * 9, [1] * 9, np.random.default_rng(7)) == \
        sft.balanced_labels([1] * 9, [1] * 9, np.random.default_rng(7))


def test_naive_and_mask_need_gpt_kd(synthetic_run, tiny_llm):
    """Naive and Mask are built on GPT_KD: without sft_gpt_kd they refuse with what to run, unless --init fresh."""
    run = write_stage02(synthetic_run)
    base = ["--run", str(run), "--model", tiny_llm, "--device", "cpu", "--max-steps", "1", "--batch-size", "2"]
    with pytest.raises(common.DataError, match=r"sft_gpt_kd: no adapter; --variant mask continues training the "
                                               r"GPT_KD LoRA.*--variant gpt_kd.*--init fresh"):
        sft.main(base + ["--variant", "mask"])
    assert not (run / "sft_mask").exists()
    out = sft.main(base + ["--variant", "mask", "--init", "fresh"])
    assert json.loads((out / "sft_info.json").read_text())["init"] == "fresh"
    assert common.read_manifest(run)["stages"]["03_sft_mask"]["init"] == "fresh"


# ----------------------------------------------------------------------------- 03 -> 04 -> 05 on the tiny model

def import_script(name):
    """A module of scripts/ (not a package)."""
    spec = importlib.util.spec_from_file_location(name, common.REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sft_reward_ppo_stages(synthetic_run, tiny_llm, monkeypatch, tmp_path):
    run = write_stage02(synthetic_run)
    base = ["--run", str(run), "--model", tiny_llm, "--device", "cpu"]
    for variant in ["gpt_kd", "naive", "mask"]:
        out = sft.main(base + ["--variant", variant, "--max-steps", "2", "--batch-size", "2",
                               "--kd-max-new-tokens", "8"])
        assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer_config.json").exists()
        rows = common.read_jsonl(out / "train_log.jsonl")
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    # the two-turn variants asked sft_gpt_kd for the untaught neighbours' profiles and cached them
    cache = common.read_jsonl(run / "sft_kd_profiles.jsonl")
    assert cache and {r["user"] for r in cache} <= set(UNTAUGHT)  # never an eval user
    manifest = common.read_manifest(run)
    assert {"03_sft_gpt_kd", "03_sft_naive", "03_sft_mask"} <= set(manifest["stages"])
    kd_sha = common.sha256_file(run / "sft_gpt_kd" / "adapter_model.safetensors")
    for variant in ["naive", "mask"]:  # built on GPT_KD (the paper's ablation), and the record says so
        info = json.loads((run / f"sft_{variant}" / "sft_info.json").read_text())
        assert (info["init"], info["init_adapter_sha256"]) == ("sft_gpt_kd", kd_sha)
        assert manifest["stages"][f"03_sft_{variant}"]["init"] == "sft_gpt_kd"
    # it continues the GPT_KD LoRA itself: with a zero learning rate naive's adapter is GPT_KD's
    from safetensors.torch import load_file
    out = sft.main(base + ["--variant", "naive", "--max-steps", "1", "--lr", "0"])
    kd_w = load_file(run / "sft_gpt_kd" / "adapter_model.safetensors")
    naive_w = load_file(out / "adapter_model.safetensors")
    assert kd_w.keys() == naive_w.keys() and all(torch.equal(kd_w[k], naive_w[k]) for k in kd_w)
    # 06 asks sft_gpt_kd with the prompt it was trained on
    split = common.load_split(run)
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    trained = sft.build_examples(run, "gpt_kd", llm.load_tokenizer(tiny_llm),
                                 sft_args(run, "gpt_kd", tiny_llm))[0]
    asked = prof.kd_user_messages(run, train, common.load_items(run))
    assert all(e["messages"][:-1] == asked(e["user"]) for e in trained if e["kind"] == "user")
    model, _ = llm.load_profile_model(run, "sft_mask", model=tiny_llm, device="cpu")

    # 04: trains, scores every held-out pair, reports per-kind accuracy with a 95% interval, reloads as a classifier
    out = rw.main(base + ["--max-steps", "3", "--batch-size", "4"])
    ev = json.loads((out / "eval.json").read_text())
    assert ev["counts"]["heldout_mode"] == "eval" and ev["heldout"]["n"] == 12 and not ev["counts"]["subsampled"]
    assert set(ev["heldout"]["per_kind"]) == set(KINDS)
    assert 0.0 <= ev["heldout"]["accuracy"] <= 1.0
    for r in [ev["heldout"]] + list(ev["heldout"]["per_kind"].values()):
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] and r["correct"] == round(r["accuracy"] * r["n"])
    # scripts/eval_reward.py re-scores the saved model on every held-out pair: the accuracies 04 wrote
    eval_reward = import_script("eval_reward")
    printed = eval_reward.main(["--run", str(run), "--out", str(tmp_path / "rescored.json"),
                                "--against", str(out / "eval.json")])
    assert (printed["correct"], printed["n"]) == (ev["heldout"]["correct"], 12)
    assert {k: v["correct"] for k, v in printed["per_kind"].items()} == \
        {k: v["correct"] for k, v in ev["heldout"]["per_kind"].items()}
    assert sum(p["margin"] > 0 for p in ev["heldout"]["pairs"]) == ev["heldout"]["correct"]
    lexical = ev["heldout_lexical_reference"]  # the no-model reference beside it, the same per kind as the script's
    assert set(lexical["per_kind"]) == set(KINDS) and lexical["per_kind"]["empty"] == 1.0
    assert eval_reward.main(["--run", str(run), "--lexical-only"]) == lexical
    rescored = json.loads((tmp_path / "rescored.json").read_text())
    paired = eval_reward.mcnemar(rescored, ev["heldout"])  # the same model on the same pairs: no discordant pair
    assert paired["all"] == (12, ev["heldout"]["accuracy"], ev["heldout"]["accuracy"], 1.0)
    flipped = {"pairs": [{**p, "margin": -p["margin"]} for p in rescored["pairs"]]}
    n_right = ev["heldout"]["correct"]
    assert eval_reward.mcnemar(rescored, flipped)["all"][3] == pytest.approx(
        scipy.stats.binomtest(n_right, 12).pvalue)  # every pair discordant
    with pytest.raises(ValueError, match="different held-out pairs"):
        eval_reward.mcnemar(rescored, {"pairs": rescored["pairs"][1:]})
    scorer = ppo.RewardScorer(out)
    rows = common.read_jsonl(run / "reward_pairs.jsonl")[:3]
    batched = scorer([r["prompt"] for r in rows], ["", "a b", rows[2]["chosen"]])
    single = [scorer([r["prompt"]], [t])[0] for r, t in zip(rows, ["", "a b", rows[2]["chosen"]])]
    torch.testing.assert_close(batched, torch.stack(single), atol=1e-4, rtol=1e-4)  # left padding is harmless

    # 05: runs, logs, writes an adapter that llm.load_profile_model stacks on the SFT model. The tiny model
    # never writes a profile line, so --no-profile-stop lets the reward model score its answers here
    args = base + ["--steps", "3", "--batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "6",
                   "--ckpt-every", "2", "--ppo-epochs", "1", "--no-profile-stop"]
    out = ppo.main(args)
    log_a = common.read_jsonl(out / "ppo_log.jsonl")
    assert [r["step"] for r in log_a] == [1, 2, 3]
    assert json.loads((out / "ppo_info.json").read_text())["trend"]["steps"] == 3
    for key in ("score", "rm_score", "complete_frac", "kl", "response_length", "clip_fraction", "value_loss",
                "explained_variance", "policy_loss", "beta"):
        assert key in log_a[0]
    assert log_a[0]["value_mean"] == 0.0 and log_a[0]["explained_variance"] == pytest.approx(0.0)  # zero critic
    assert len({r["score"] for r in log_a}) > 1  # reward-model scores
    assert json.loads((out / "base.json").read_text()) == {"sft": "sft_mask"}
    assert (out / "value_head.pt").exists()
    assert {"sft_mask/", "reward/"} <= set(common.read_manifest(run)["stages"]["05_ppo"]["inputs"])  # model dirs
    model, tok = llm.load_profile_model(run, "ppo", model=tiny_llm, device="cpu")
    # 06's ppo model is base + SFT LoRA + PPO LoRA, both folded, not merged (a merge into bf16 weights would round the
    # deltas away); in float32 that is the same function as both adapters merged
    from peft import PeftModel
    q_proj = model.model.layers[0].self_attn.q_proj
    ranks = [json.loads((run / d / "adapter_config.json").read_text())["r"] for d in ("sft_mask", "ppo")]
    assert isinstance(q_proj, llm.FoldedLoRA) and q_proj.down.shape[0] == sum(ranks)  # both adapters
    sft_llm, _ = llm.load_llm(tiny_llm, adapter=run / "sft_mask", device="cpu")
    merged = PeftModel.from_pretrained(sft_llm.merge_and_unload(), run / "ppo").merge_and_unload()
    ids = torch.tensor([tok("User identity: fan; User interests: war")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)

    # resume: interrupt after the step-2 checkpoint, re-run, get the same log as the uninterrupted run
    calls = {"n": 0}
    real = ppo.rollout

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*a, **kw)
    monkeypatch.setattr(ppo, "rollout", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ppo.main(args + ["--restart"])
    assert (run / "ppo.partial" / "checkpoint.pt").exists()
    ck = torch.load(run / "ppo.partial" / "checkpoint.pt", weights_only=True)  # plain tensors and numbers only
    assert ck["step"] == 2 and ck["optimizer"]["state"]
    monkeypatch.setattr(ppo, "rollout", real)
    out = ppo.main(args)
    log_b = common.read_jsonl(out / "ppo_log.jsonl")
    assert [r["step"] for r in log_b] == [1, 2, 3]
    for a, b in zip(log_a, log_b):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    assert not (run / "ppo.partial").exists()

    # by default no answer of the tiny model completes a profile line: each scores INCOMPLETE_SCORE
    out = ppo.main([a for a in args if a != "--no-profile-stop"] + ["--steps", "1"])
    (row,) = common.read_jsonl(out / "ppo_log.jsonl")
    assert row["complete_frac"] == 0.0 and row["rm_score"] is None and row["score"] == ppo.INCOMPLETE_SCORE


def test_reward_eval_scores_every_heldout_pair(synthetic_run, tiny_llm):
    run = write_stage02(synthetic_run)
    rows = common.read_jsonl(run / "reward_pairs.jsonl")
    common.write_jsonl(run / "reward_pairs.jsonl", rows + [r for r in rows if r["user"] in (0, 1)] * 4)  # 60 held out
    tok = llm.load_tokenizer(tiny_llm)
    train, held, counts = rw.load_pairs(run, tok, rw.parse_args(["--run", str(run)]))
    assert len(held) == 60 and not counts["subsampled"]
    _, held, counts = rw.load_pairs(run, tok, rw.parse_args(["--run", str(run), "--max-eval-pairs", "12"]))
    assert len(held) == 12 and counts["subsampled"]


def test_lexical_reference_reads_the_target_items_only():
    items = ["Heat (1995). Genres: Action, Crime.", "Casino (1995). Genres: Crime, Drama.",
             "Babe (1995). Genres: Comedy."]
    prompt = prompts.inference_messages([0, 1], [[2]], items, max_items=5, max_nbr_items=2, max_chars=200)
    target = rw.target_text(prompt)
    assert "Casino" in target and "Babe" not in target  # the neighbour's items are not the target's
    words = rw.words(target)
    own = "User identity: crime fan, action lover, night owl; User interests: Crime, Drama, Action"
    neighbour = "User identity: family viewer, comedy lover, parent; User interests: Comedy, Children's, Musical"
    assert rw.lexical_overlap(words, own) == pytest.approx(5 / 6)  # "night owl" is not in the items
    assert rw.lexical_overlap(words, neighbour) == 0.0  # Comedy is only in the neighbour's items
    assert rw.lexical_overlap(words, "crime crime crime") == -1.0  # not a profile
    pairs = [{"kind": "substitution", "lexical_margin": m} for m in (0.5, 0.0, -0.2, 0.1)]
    ref = rw.lexical_reference(pairs + [{"kind": "empty", "lexical_margin": 1.0}])
    assert ref["per_kind"] == {"empty": 1.0, "substitution": pytest.approx(2.5 / 4)}  # a tie counts half
    assert ref["accuracy"] == pytest.approx(3.5 / 5)


def test_wilson_interval():
    lo, hi = rw.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook values for 8/10
    assert rw.wilson_interval(0, 5)[0] == 0.0 and rw.wilson_interval(0, 5)[1] > 0.4  # not [0, 0]
    assert rw.wilson_interval(5, 5)[1] == 1.0 and rw.wilson_interval(5, 5)[0] < 0.6
    row = rw.accuracy_row([1.0, -0.5, 0.0, 2.0])  # a tie is not a win
    assert (row["n"], row["correct"], row["accuracy"]) == (4, 2, 0.5)


class Planted:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_ppo_refuses_a_checkpoint_that_would_run_code(synthetic_run, tiny_llm):
    """A file planted where 05 resumes from is never unpickled: 05 stops with an error naming it, before loading
    any model, and the planted code does not run."""
    run = write_stage02(synthetic_run)
    for f in ("sft_mask/adapter_model.safetensors", "reward/adapter_model.safetensors"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_bytes(b"not loaded before the checkpoint")
    marker = run.parent / "marker"
    ckpt = run / "ppo.partial" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save({"step": 2, "steps": 3, "sft_sha": "x", "beta": 0.1, "state": {"lora": {}, "value_head": {}},
                "optimizer": Planted(marker)}, ckpt)
    args = ["--run", str(run), "--model", tiny_llm, "--device", "cpu", "--force", "--steps", "3"]
    with pytest.raises(common.DataError, match=r"checkpoint.pt: refused to load this PPO checkpoint \(it asks to "
                                               r"unpickle \S*exec, which could run code\).*--restart"):
        ppo.main(args)
    assert not marker.exists()
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    with pytest.raises(common.DataError, match=r"checkpoint.pt: refused to load this PPO checkpoint"):
        ppo.main(args)
    torch.save({"step": 2}, ckpt)  # safe, but not what 05 writes
    with pytest.raises(common.DataError, match=r"checkpoint.pt: not a checkpoint 05 wrote"):
        ppo.main(args)
    assert not marker.exists()


# ----------------------------------------------------------------------------- PPO core

def gae_reference(rewards, values, lengths, gamma, lam):
    adv = np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * (np.arange(rewards.shape[1])[None] < np.array(lengths)[:, None])


def test_gae_matches_loop():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 5]
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).float()
    rewards = torch.randn(4, 7, generator=g) * mask
    values = torch.randn(4, 7, generator=g)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
        adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = gae_reference(rewards.numpy(), values.numpy(), lengths, gamma, lam)
        np.testing.assert_allclose(adv.numpy(), ref_adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret.numpy(), ref_ret, rtol=1e-5, atol=1e-6)
    # lambda = 1, gamma = 1: advantage = reward-to-go minus value
    adv, _ = ppo.gae(rewards, values, mask, 1.0, 1.0)
    togo = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
    torch.testing.assert_close(adv, (togo - values) * mask)


def test_ppo_trend_compares_thirds_and_ranks_score_against_step():
    rows = [{"step": k, "score": float(k), "rm_score": None if k == 1 else 1.0, "complete_frac": k / 6,
             "kl": 0.0} for k in (6, 1, 2, 3, 4, 5)]   # order of the log does not matter
    t = ppo.trend(rows)
    assert t["steps"] == 6 and t["score"] == {"first_third": 1.5, "last_third": 5.5}
    assert t["rm_score"] == {"first_third": 1.0, "last_third": 1.0}  # steps with no profile to score are left out
    assert t["complete_frac"]["last_third"] == pytest.approx(11 / 12)
    assert t["score_vs_step"]["spearman_rho"] == pytest.approx(1.0) and t["score_vs_step"]["p"] < 0.01
    assert "score_vs_step" not in ppo.trend(rows[:2])


def test_kl_rewards_and_losses():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).float()
    lp, ref = torch.tensor([[-1.0, -2.0, -0.5, -9.0]] * 2), torch.tensor([[-1.5, -2.0, -1.0, 0.0]] * 2)
    rewards, kl = ppo.kl_penalised_rewards(torch.tensor([2.0, -1.0]), lp, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.95, 0.0], [-1.05, 0.0, 0.0, 0.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0], [0.5, 9.0, 9.0, 9.0]])
    pg, vf, st = ppo.ppo_losses(lp, lp, torch.zeros(2, 4), torch.zeros(2, 4), adv, torch.ones(2, 4), mask, 0.2, 0.2)
    assert pg.item() == pytest.approx(-(1 - 1 + 2 + 0.5) / 4) and vf.item() == pytest.approx(0.5)
    assert st["clipfrac"] == 0.0
    pg, _, st = ppo.ppo_losses(lp + 1.0, lp, torch.zeros(2, 4), torch.zeros(2, 4), adv, torch.ones(2, 4), mask,
                               0.2, 0.2)
    assert st["clipfrac"] > 0  # ratio e > 1.2: positive advantages clipped
    ctl = ppo.KLController(0.1, target=1.0, horizon=10)
    assert ctl.update(5.0, 1) == pytest.approx(0.1 * 1.02)


def tiny_policy(tiny_llm, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "lm_head")):
    """The tiny LLM + LoRA. Its random embeddings are so small (|e| ~ 0.1) that attention-only LoRA can move a
    token's logit by well under one nat, so the PPO tests also put a LoRA on lm_head to let the policy learn."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32)
    tok = llm.load_tokenizer(tiny_llm)
    model.generation_config.pad_token_id = tok.pad_token_id
    policy = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                              target_modules=list(targets)))
    return policy, torch.nn.Linear(model.config.hidden_size, 1), tok


def short_prompts(run, n=8):
    """Fixed prompts, independent of the production templates, so the PPO dynamics tested here do not move
    when a prompt's wording changes."""
    return [[{"role": "user", "content": f"write the profile of user {k} : comedy drama"}] for k in range(n)]


def even_token_reward(queries, texts, resp):
    """Fraction of generated tokens (up to the end-of-turn) with an even id."""
    out = []
    for row in resp:
        row = row.tolist()
        n = row.index(2) if 2 in row else len(row)
        out.append(sum(t % 2 == 0 for t in row[:n]) / max(n, 1))
    return torch.tensor(out)


def test_ppo_raises_a_programmatic_reward(synthetic_run, tiny_llm):
    policy, vh, tok = tiny_policy(tiny_llm)
    queries = short_prompts(synthetic_run)
    cfg = ppo.PPOConfig(steps=30, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-2, max_new_tokens=8,
                        beta=0.05, seed=0, stop_at_profile=False)  # a reward of any text, not of profile lines
    hist = ppo.train(policy, vh, tok, queries, even_token_reward, cfg, progress=False)
    scores = [h["score"] for h in hist]
    first, last = np.mean(scores[:5]), np.mean(scores[-10:])
    assert last > first + 0.1, scores   # a random policy sits at 0.5; 0.1 is a clear rise above its noise
    assert all(math.isfinite(h["kl"]) and h["kl"] < 10.0 for h in hist)
    assert all(0.0 <= h["clip_fraction"] <= 1.0 for h in hist)


@pytest.fixture(scope="module")
def char_llm(tmp_path_factory):
    return build_char_llm(tmp_path_factory.mktemp("char_llm"))


def test_ppo_rollouts_end_where_06_stops(char_llm):
    """A rollout ends at its first complete profile line (06's rule) or at any end-of-turn token (here Llama-3's
    <|eot_id|>, which is not the tokenizer's eos); the reward model scores only answers that complete a parseable
    profile line, the others get INCOMPLETE_SCORE; the log reports the share that completed one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    tok = llm.load_tokenizer(char_llm)
    model = AutoModelForCausalLM.from_pretrained(char_llm, dtype=torch.float32)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    asked, seen = [], []

    def reward_fn(queries, texts, resp):
        asked.extend(texts)
        return torch.full((len(texts),), 1.5)
    cfg = ppo.PPOConfig(steps=1, batch_size=6, minibatch_size=3, max_new_tokens=CHAR_MAX_NEW, seed=0)
    hist = ppo.train(policy, ppo.new_value_head(model.config.hidden_size), tok, char_prompts(6), reward_fn, cfg,
                     on_step=lambda row, ro: seen.append(ro), progress=False)
    ro, eot = seen[0], tok.convert_tokens_to_ids("<|eot_id|>")
    lengths = ro["mask"].sum(1).long().tolist()
    assert sorted(map(str, ro["how"])) == ["None", "None", "eot", "eot", "profile", "profile"]
    for k, how in enumerate(ro["how"]):
        kept = ro["resp"][k, :lengths[k]].tolist()
        if how == "profile":  # cut right after the line's newline, although the model goes on
            assert ro["texts"][k] == CHAR_PROFILE and tok.decode(kept).endswith("\n")
            assert ro["complete"][k] and ro["scores"][k] == 1.5
        elif how == "eot":
            assert ro["texts"][k] == "No idea." and kept[-1] == eot
            assert not ro["complete"][k] and ro["scores"][k] == ppo.INCOMPLETE_SCORE
        else:
            assert lengths[k] == CHAR_MAX_NEW and not ro["complete"][k] and ro["scores"][k] == ppo.INCOMPLETE_SCORE
        assert (ro["resp"][k, lengths[k]:] == tok.pad_token_id).all()
    assert asked == [CHAR_PROFILE] * 2  # the reward model sees complete answers only
    assert hist[0]["complete_frac"] == pytest.approx(2 / 6) and hist[0]["rm_score"] == pytest.approx(1.5)
    assert hist[0]["score"] == pytest.approx((2 * 1.5 + 4 * ppo.INCOMPLETE_SCORE) / 6)
    assert hist[0]["value_mean"] == 0.0 and hist[0]["explained_variance"] == pytest.approx(0.0)


def test_value_head_and_explained_variance():
    head = ppo.new_value_head(16)
    assert torch.equal(head(torch.randn(3, 5, 16)), torch.zeros(3, 5, 1))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    returns = torch.tensor([[1.0, 2.0, 3.0, 9.0], [-1.0, 0.5, 9.0, 9.0]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert ppo.explained_variance(-returns, returns, mask) < 0


def exact_kl(policy, tok, queries):
    """Mean KL(policy || reference) of the next-token distributions over the queries' positions, and the largest
    log-probability difference."""
    enc = tok([tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in queries],
              return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        lp = torch.log_softmax(policy(**enc).logits, -1)
        with policy.disable_adapter():
            lq = torch.log_softmax(policy(**enc).logits, -1)
    m = enc["attention_mask"].float()
    kl = ((lp.exp() * (lp - lq)).sum(-1) * m).sum() / m.sum()
    return kl.item(), ((lp - lq).abs().amax(-1) * m).max().item()


def test_ppo_huge_beta_stays_at_reference(synthetic_run, tiny_llm):
    """With beta huge the KL term dominates the reward: the policy is pulled back to the reference after each
    move, while without a penalty it drifts away chasing the reward."""
    queries = short_prompts(synthetic_run)
    out = {}
    for beta in (0.0, 1e3):
        policy, vh, tok = tiny_policy(tiny_llm)
        cfg = ppo.PPOConfig(steps=10, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-2, max_new_tokens=8,
                            beta=beta, seed=0, stop_at_profile=False)
        hist = ppo.train(policy, vh, tok, queries, even_token_reward, cfg, progress=False)
        out[beta] = exact_kl(policy, tok, queries) + (np.mean([h["score"] for h in hist[-3:]]),)
        assert hist[0]["kl"] == 0.0  # the new LoRA starts as the identity: policy == reference
    (kl_free, diff_free, _), (kl_huge, diff_huge, _) = out[0.0], out[1e3]
    assert kl_huge < 0.2 * kl_free and kl_huge < 0.1, out
    assert diff_huge < 0.5 * diff_free, out


@pytest.mark.parametrize("lora", [False, True])
def test_score_groups_equals_score_ids(synthetic_run, tiny_llm, lora):
    """The shared-prefix scorer against scoring every whole sequence: the held-out pairs grouped by user (a query,
    its chosen answer and its rejected ones), a group with one sequence, a group holding one sequence twice, and a
    LoRA-wrapped model whose adapters are not zero (the cached path must run through them)."""
    from transformers import AutoModelForSequenceClassification
    run = write_stage02(synthetic_run)
    tok = llm.load_tokenizer(tiny_llm)
    _, held, _ = rw.load_pairs(run, tok, rw.parse_args(["--run", str(run)]))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llm, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    if lora:
        model = llm.lora_model(model, rw.parse_args(["--run", str(run)]), task_type="SEQ_CLS")
        with torch.no_grad():
            for name, w in model.named_parameters():
                if "lora_B" in name:
                    w.normal_(0, 0.5)
    model.eval()
    groups = rw.query_groups(held)[1] + [[held[0]["rejected_ids"]], [held[1]["chosen_ids"], held[1]["chosen_ids"]]]
    got = llm.score_groups(model, tok, groups, progress=False)
    flat = [ids for g in groups for ids in g]
    expected = llm.score_ids(model, tok, flat, batch_size=3).split([len(g) for g in groups])
    assert all(len(g) > 2 for g in groups[:-2])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert expected[0].std() > 0   # the scores differ between answers: the comparison can fail


def test_score_groups_of_a_float32_head_over_a_bf16_base(synthetic_run, tiny_llm):
    """04 on a GPU: the frozen base in bf16, the LoRA and score head trained in float32; its held-out scoring runs
    without autocast and must agree with the float32 model within bf16's precision."""
    from transformers import AutoModelForSequenceClassification
    run = write_stage02(synthetic_run)
    tok = llm.load_tokenizer(tiny_llm)
    _, held, _ = rw.load_pairs(run, tok, rw.parse_args(["--run", str(run)]))
    groups = rw.query_groups(held)[1][:3]
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_llm, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id
        model = llm.trainable_float32(llm.lora_model(model, rw.parse_args(["--run", str(run)]), task_type="SEQ_CLS"))
        assert model.base_model.model.score.modules_to_save["default"].weight.dtype == torch.float32
        scores[dtype] = torch.cat(llm.score_groups(model.eval(), tok, groups, progress=False))
    torch.testing.assert_close(scores[torch.bfloat16], scores[torch.float32], atol=0.05, rtol=0.05)


def test_ppo_policy_is_the_sft_adapter_with_a_lora_stacked_on_it(tiny_llm, tmp_path):
    """05's policy keeps the SFT adapter unmerged and frozen under the new LoRA (a merge into bf16 weights would round
    the SFT delta away); its reference is the SFT model, not the base; what it saves, 06 loads as the same network."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in sft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    sft.save_pretrained(tmp_path / "sft_mask")
    llm.load_tokenizer(tiny_llm).save_pretrained(tmp_path / "sft_mask")
    ids = torch.tensor([[5, 9, 17, 3, 11, 2]])

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    sft_model, _ = llm.load_llm(tiny_llm, adapter=tmp_path / "sft_mask", device="cpu")
    want_sft = logits(sft_model)
    with sft_model.disable_adapter():
        base = logits(sft_model)
    assert (want_sft - base).abs().max() > 1e-3  # the SFT adapter changes the model

    policy, _ = llm.load_llm(tiny_llm, adapter=tmp_path / "sft_mask", device="cpu")
    llm.stack_lora(policy, ppo.PPO_ADAPTER, ppo.PPOConfig(lora_dropout=0.0))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all(f".{ppo.PPO_ADAPTER}." in n for n in trainable)
    torch.testing.assert_close(logits(policy), want_sft, atol=1e-6, rtol=0)  # the new LoRA starts as the identity
    for n, p in policy.named_parameters():
        if p.requires_grad and "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    trained = logits(policy)
    assert (trained - want_sft).abs().max() > 1e-3
    with ppo.reference(policy):
        torch.testing.assert_close(logits(policy), want_sft, atol=1e-6, rtol=0)  # reference = the SFT model
    torch.testing.assert_close(logits(policy), trained, atol=1e-6, rtol=0)
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == trainable  # still only the new LoRA

    llm.save_adapter(policy, ppo.PPO_ADAPTER, tmp_path / "ppo")
    common.write_json(tmp_path / "ppo" / "base.json", {"sft": "sft_mask"})
    assert (tmp_path / "ppo" / "adapter_model.safetensors").exists() and not (tmp_path / "ppo" / ".adapter").exists()
    sampler, _ = llm.load_profile_model(tmp_path, "ppo", model=tiny_llm, device="cpu")
    torch.testing.assert_close(logits(sampler), trained, atol=1e-5, rtol=0)  # 06 samples what 05 trained
