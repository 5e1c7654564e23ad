"""04_reward — the reward model of RecLM (paper eq. 6, sec. 2.4): r(query, response) -> scalar.

AutoModelForSequenceClassification(num_labels=1) on the LLM (--model): LoRA on the attention projections with the
score head trained in full (--lora-r 0: every weight) over a frozen base (bf16 on a GPU). Trained with trl's
RewardTrainer (loss -log sigmoid(r(q, chosen) - r(q, rejected))) on the reward_pairs.jsonl rows of the "reward" user
set. Every held-out pair (--heldout: eval = the "eval" set's pairs, split = --heldout-frac of the reward users, auto
= eval when there are any) is scored: pairwise accuracy overall and per negative kind, each with its 95% Wilson
interval, and the mean margin, beside a lexical reference that needs no model (lexical_overlap: the share of a
profile's terms with a word in the target's items as the query shows them). Pairs longer than --max-length tokens
are dropped (counted).

Reads  reward_pairs.jsonl, user_sets.json (02)
Writes reward/ (trained in reward.tmp/, renamed when finished): adapter_config.json + adapter_model.safetensors
       (the LoRA and the score head, unmerged: a merge into a bf16 base would round the LoRA away; with --lora-r 0
       config.json + model.safetensors) + tokenizer files, loaded by llm.load_reward_model;
       train_log.jsonl (per-step loss, accuracy); eval.json (held-out accuracies, each pair's margin, the
       lexical reference's accuracies, counts)
Run    python 04_reward.py --run runs/ml100k       # the official code's settings (3 epochs); on a CPU pass the
                                                   # flags of scripts/presets.sh's cpu preset
"""
import json
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import common
import llm
import prompts

log = common.log

# ----------------------------------------------------------------------------- defaults
# The official RecLM code's reward model (llm/lora/rlhf/reward_modeling.py), bf16 autocast on a GPU.
# scripts/presets.sh `cpu` overrides the budget for a 2-core CPU (32 steps at lr 3e-4, LoRA r 8 on q,k,v,o).
MAX_STEPS = 0              # 0: train EPOCHS full epochs, as the official code does
EPOCHS = 3.0               # num_train_epochs=3
BATCH_SIZE = 4             # per_device_train_batch_size=4 (pairs per step)
GRAD_ACCUM = 1             # gradient_accumulation_steps=1
LR = 1.41e-5               # learning_rate=1.41e-5
LORA_R = 4                 # LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1); the score head is trained in full
LORA_ALPHA = 8
LORA_DROPOUT = 0.1
LORA_TARGETS = "q_proj,v_proj"  # the official code names none: peft's default for Llama
MAX_LENGTH = 2048          # max_length=2048; longer pairs are dropped (counted)
HELDOUT = "auto"           # held-out pairs: the "eval" set's when it has any, else a split of the reward users
HELDOUT_FRAC = 0.2         # --heldout split: the share of reward users held out
CKPT_EVERY = 200           # optimizer steps between checkpoints; a re-run with the same inputs resumes from the last
MAX_EVAL_PAIRS = 0         # 0 = every held-out pair (a sample of 48 could not tell 0.7 from 0.9 on one kind)
CENTER_REWARDS = 0.01      # RewardConfig.center_rewards_coefficient: keeps scores near 0, where 05's
                           # INCOMPLETE_SCORE (-3) sits below every real profile's
CI_Z = 1.96                # 95% Wilson intervals on the accuracies: with a few dozen pairs per kind an accuracy is
                           # uncertain by +-0.1 or more, and the interval says so


# ----------------------------------------------------------------------------- held-out evaluation

def wilson_interval(k, n, z=CI_Z):
    """The Wilson score interval of a proportion k/n: stays inside [0, 1] and is honest at 0/n and n/n, where the
    normal approximation gives zero width."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def accuracy_row(margins):
    m = np.asarray(margins, dtype=float)
    k = int((m > 0).sum())
    return {"n": len(m), "correct": k, "accuracy": k / len(m) if len(m) else None,
            "ci95": wilson_interval(k, len(m)), "mean_margin": float(m.mean()) if len(m) else None}


def target_text(prompt):
    """The part of a pair's query that shows the target user's items: its user turn up to the first neighbour."""
    turn = next(m["content"] for m in prompt if m["role"] == "user")
    return turn.split(prompts.TURN1_NEIGHBOR.split("{n}")[0])[0]


def words(text):
    """The lower-case words of 3+ letters or digits in `text` (what the lexical reference matches)."""
    return set(re.findall(r"[a-z0-9]{3,}", text.lower()))


def lexical_overlap(query_words, profile):
    """The share of a profile's terms (identity and interests) with a word of 3+ characters among `query_words`;
    -1 for an answer that is not one well-formed profile. A reference a reward model should beat: it reads no
    more than word overlap and the profile format (on the quick pipeline's 846 held-out pairs: 0.96 overall, 0.86
    on substitution, where the trained reward model was near chance; scripts/eval_reward.py --lexical-only)."""
    p = prompts.parse_profile(profile)
    if p is None:
        return -1.0
    m = prompts.PROFILE_RE.search(p)
    terms = [t for side in ("identity", "interests") for t in m.group(side).split(",") if t.strip()]
    return sum(bool(words(t) & query_words) for t in terms) / len(terms)


def lexical_reference(pairs):
    """Per kind and overall: the share of pairs whose chosen answer overlaps the target's items more than the
    rejected one, ties counted as half (a reference choosing at random among tied answers)."""
    by = defaultdict(list)
    for p in pairs:
        m = p["lexical_margin"]
        by[p["kind"]].append(1.0 if m > 0 else 0.5 if m == 0 else 0.0)
    mean = (lambda v: float(np.mean(v)) if v else None)
    return {"accuracy": mean([x for v in by.values() for x in v]),
            "per_kind": {k: mean(v) for k, v in sorted(by.items())}}


def query_groups(pairs):
    """The pairs grouped by user (one query each): ([pair indices], [their chosen ids, then their rejected ids])."""
    by_user = defaultdict(list)
    for k, p in enumerate(pairs):
        by_user[p["user"]].append(k)
    groups = list(by_user.values())
    return groups, [[pairs[k]["chosen_ids"] for k in ks] + [pairs[k]["rejected_ids"] for k in ks] for ks in groups]


def pairwise_eval(model, tok, pairs):
    """Accuracy and mean margin overall and per kind over tokenised pairs, and each pair's margin (so that two reward
    models can be compared pair by pair: scripts/eval_reward.py --against). A user's pairs share its query: they are
    scored as one group (llm.score_groups), the query once and each distinct answer once."""
    model.eval()
    groups, sequences = query_groups(pairs)
    scores = llm.score_groups(model, tok, sequences, desc="score held-out pairs")
    margin = np.zeros(len(pairs))
    for ks, sc in zip(groups, scores):
        margin[ks] = (sc[:len(ks)] - sc[len(ks):]).numpy()
    by = defaultdict(list)
    for p, m in zip(pairs, margin):
        by[p["kind"]].append(m)
    return {**accuracy_row(margin), "per_kind": {k: accuracy_row(v) for k, v in sorted(by.items())},
            "pairs": [{"user": int(p["user"]), "kind": p["kind"], "margin": float(m)}   # for paired comparisons
                      for p, m in zip(pairs, margin)]}


def describe(res, lexical=None):
    """One log line: overall and per-kind accuracy with their 95% intervals (and the lexical reference's)."""
    ref = (lambda acc: f" (lexical {acc:.2f})" if acc is not None else "")
    lex = lexical or {"accuracy": None, "per_kind": {}}
    row = (lambda r: f"{r['accuracy']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] of {r['n']}")
    return (row(res) + ref(lex["accuracy"]) + "; per kind: "
            + ", ".join(f"{k} {row(v)}{ref(lex['per_kind'].get(k))}" for k, v in res["per_kind"].items()))


# ----------------------------------------------------------------------------- data

def load_pairs(run, tok, args):
    """(train pairs, held-out pairs, counts); each pair tokenised: chosen_ids, rejected_ids, kind, user. A query is
    the row's prompt messages (prompts.inference_messages), a response one assistant turn after it, rendered with the
    tokenizer's chat template (prompts.render_ids): the score is read at the last token of the rendered assistant turn,
    the same rendering 05 scores its rollouts with."""
    run = Path(run)
    sets = json.loads((run / "user_sets.json").read_text())
    rows = common.read_jsonl(run / "reward_pairs.jsonl")
    reward_users = sorted(int(u) for u in sets.get("reward", []))
    eval_users = set(int(u) for u in sets.get("eval", []))
    mode = args.heldout
    has_eval = any(int(r["user"]) in eval_users for r in rows)
    if mode == "auto":
        mode = "eval" if has_eval else "split"
    if mode == "eval":
        held_users = eval_users
        train_users = set(reward_users)
    else:
        rng = np.random.default_rng(args.seed)
        users_with_pairs = sorted({int(r["user"]) for r in rows} & set(reward_users))
        n_held = max(1, int(round(args.heldout_frac * len(users_with_pairs)))) if users_with_pairs else 0
        held_users = set(rng.permutation(users_with_pairs)[:n_held].tolist())
        train_users = set(reward_users) - held_users
    train, held = [], []
    counts = {"heldout_mode": mode, "rows": len(rows), "too_long": 0, "other_users": 0}
    for r in rows:
        u = int(r["user"])
        dest = train if u in train_users else held if u in held_users else None
        if dest is None:
            counts["other_users"] += 1
            continue
        c = prompts.render_ids(tok, r["prompt"], r["chosen"])
        j = prompts.render_ids(tok, r["prompt"], r["rejected"])
        if max(len(c), len(j)) > args.max_length:
            counts["too_long"] += 1
            continue
        shown = words(target_text(r["prompt"]))
        dest.append({"user": u, "kind": r.get("kind", "?"), "chosen_ids": c, "rejected_ids": j,
                     "lexical_margin": lexical_overlap(shown, r["chosen"]) - lexical_overlap(shown, r["rejected"])})
    if args.limit is not None:  # a smoke run: the first N pairs of each side
        counts["limit"] = args.limit
        train, held = train[:args.limit], held[:args.limit]
    counts["subsampled"] = bool(args.max_eval_pairs) and len(held) > args.max_eval_pairs
    if counts["subsampled"]:  # --max-eval-pairs: a seeded subsample, for a quick look only
        log.warning("scoring %d of %d held-out pairs (--max-eval-pairs): the accuracies are a sample's",
                    args.max_eval_pairs, len(held))
        rng = np.random.default_rng(args.seed + 1)
        held = [held[k] for k in sorted(rng.choice(len(held), args.max_eval_pairs, replace=False))]
    counts.update(train_pairs=len(train), heldout_pairs=len(held), train_users=len(train_users),
                  heldout_users=len(held_users))
    return train, held, counts


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = common.stage_parser(__doc__)
    p.add_argument("--model", default=llm.DEFAULT_LLM, help=llm.MODEL_HELP)
    p.add_argument("--chat-template", default=None, help=llm.TEMPLATE_HELP)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--max-steps", type=common.non_negative_int, default=MAX_STEPS,
                   help="optimizer steps; 0 = --epochs full epochs")
    p.add_argument("--epochs", type=common.positive_float, default=EPOCHS,
                   help="passes over the pairs (with --max-steps 0)")
    p.add_argument("--batch-size", type=common.positive_int, default=BATCH_SIZE, help="pairs per device step")
    p.add_argument("--grad-accum", type=common.positive_int, default=GRAD_ACCUM, help="device steps per optimizer step")
    p.add_argument("--lr", type=common.non_negative_float, default=LR, help="peak learning rate (cosine schedule)")
    p.add_argument("--lora-r", type=common.non_negative_int, default=LORA_R, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=common.positive_int, default=LORA_ALPHA, help="LoRA scale numerator")
    p.add_argument("--lora-dropout", type=common.fraction, default=LORA_DROPOUT, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default=LORA_TARGETS, help="comma-separated module names that get a LoRA")
    p.add_argument("--max-length", type=common.positive_int, default=MAX_LENGTH,
                   help="tokens per rendered query + response; longer pairs are dropped")
    p.add_argument("--heldout", choices=["auto", "eval", "split"], default=HELDOUT,
                   help="held-out pairs: the eval set's, a split of the reward users, or auto (eval if it has pairs)")
    p.add_argument("--heldout-frac", type=common.fraction, default=HELDOUT_FRAC,
                   help="split: share of reward users held out")
    p.add_argument("--max-eval-pairs", type=common.non_negative_int, default=MAX_EVAL_PAIRS,
                   help="score a seeded sample of this many held-out pairs; 0 = all")
    p.add_argument("--center-rewards", type=common.non_negative_float, default=CENTER_REWARDS,
                   help="RewardConfig.center_rewards_coefficient; 0 = off")
    p.add_argument("--eval-before", action="store_true", help="also score the held-out pairs before training")
    p.add_argument("--limit", type=common.positive_int, default=None,
                   help="only the first N training and N held-out pairs (a smoke run; every other setting as given)")
    p.add_argument("--ckpt-every", type=common.non_negative_int, default=CKPT_EVERY,
                   help="steps between checkpoints (0 = none)")
    llm.add_activation_checkpointing_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    args = parse_args(argv)
    run = args.run
    started = time.time()
    common.setup_logging(run, "04_reward")
    common.seed_everything(args.seed)
    inputs = ["reward_pairs.jsonl", "user_sets.json"]
    common.check_inputs(run, inputs, args.force)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_path = llm.resolve_llm(args.model)
    tok = llm.load_tokenizer(model_path, args.chat_template)
    train, held, counts = load_pairs(run, tok, args)
    log.info("reward pairs: %s", json.dumps(counts))
    if not train:
        raise common.DataError(f"{run}/reward_pairs.jsonl: no pairs for the reward user set ({counts})")

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1,
                                                               dtype=llm.frozen_dtype(device))
    model.config.pad_token_id = tok.pad_token_id
    if args.lora_r > 0:
        model = llm.lora_model(model, args, task_type="SEQ_CLS")  # the score head is trained in full
    model = llm.trainable_float32(model).to(device)
    before = None
    if held and args.eval_before:
        before = pairwise_eval(model, tok, held)
        log.info("held-out pairwise accuracy before training: %s", describe(before))

    tmp, final = run / "reward.tmp", run / "reward"
    resume_from = llm.resumable_work(tmp, llm.resume_key(run, inputs, args))
    cfg = RewardConfig(
        output_dir=str(tmp / "trainer"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps > 0 else -1, logging_steps=1, **llm.checkpoint_config(args),
        report_to=[], use_cpu=(device == "cpu"), seed=args.seed, data_seed=args.seed,
        **llm.precision_settings(model, device, args.activation_checkpointing),
        max_length=args.max_length, center_rewards_coefficient=args.center_rewards or None,
        lr_scheduler_type="cosine", dataloader_num_workers=0,
    )
    ds = Dataset.from_list([{"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]} for p in train])
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                            callbacks=[llm.step_logger(tmp / "train_log.jsonl")])
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    train_s = time.time() - t0
    model = trainer.model  # saved unmerged: LoRA and score head (llm.load_reward_model)
    model.config.pad_token_id = tok.pad_token_id
    after = pairwise_eval(model, tok, held) if held else None
    lexical = lexical_reference(held) if held else None
    if after:
        log.info("held-out pairwise accuracy after training (95%% Wilson intervals; the lexical reference's in "
                 "parentheses): %s", describe(after, lexical))
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    common.write_json(tmp / "eval.json", {"heldout": after, "heldout_before_training": before,
                                          "heldout_lexical_reference": lexical, "counts": counts,
                                          "train_loss": result.training_loss, "steps": result.global_step,
                                          "train_seconds": round(train_s, 1), "base_model": str(args.model)})
    llm.replace_dir(tmp, final)
    outputs = sorted(str(p.relative_to(run)) for p in final.rglob("*") if p.is_file())
    common.record_stage(run, "04_reward", args, inputs, outputs, started)
    return final


if __name__ == "__main__":
    common.run_stage(main)
