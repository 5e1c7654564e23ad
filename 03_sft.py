"""03_sft — LoRA instruction tuning of the profile LLM (paper sec. 2.3, appendix 6.4 / 6.6).

Variants (--variant):
  gpt_kd  single turn: the user's items -> its teacher profile (knowledge distillation, sec. 2.3.1)
  naive   two turns: the target's and its similar users' items -> their profiles; "will the target interact with
          item v?" -> Yes/No. Loss on the Yes/No answer only.
  mask    the same dialogue, loss on every response segment (sec. 2.3.2, "Tuning Strategy")
gpt_kd and mask also train on item-profile examples (06's item prompts). naive and mask continue training the
sft_gpt_kd LoRA, as in the paper's ablation (appendix 6.4): train gpt_kd first, or pass --init fresh. Every prompt
shows a user as 02's teacher saw it (prompt.json "teacher"); examples longer than --max-length are left out.

Reads  data/split.npz, data/items.jsonl, neighbors.npz, distill.jsonl, user_sets.json, prompt.json
       (naive, mask: sft_gpt_kd/, the LoRA they start from, which also writes the profiles of neighbours the teacher
       did not see)
Writes sft_<variant>/ (trained in sft_<variant>.tmp/, renamed when finished): adapter_config.json,
       adapter_model.safetensors, tokenizer files, train_log.jsonl (per-step loss), sft_info.json (counts, options,
       "init", and "prompt": what it was trained on, which 06 reads); naive, mask: sft_kd_profiles.jsonl (resumable)
Run    python 03_sft.py --run runs/ml100k --variant gpt_kd
       python 03_sft.py --run runs/ml100k --variant mask      # after gpt_kd: starts from it
"""
import collections
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import common
import generate
import llm
import prompts
import teachers

log = common.log

# ----------------------------------------------------------------------------- defaults
# The official RecLM code's SFT (llm/lora/sft_base*.py, Llama-2-7b-chat there; SmolLM2-135M here), bf16 autocast on a
# GPU. scripts/presets.sh `cpu` overrides the budget for a 2-core CPU (16 steps at lr 2e-3, LoRA on every projection).
VARIANT = "mask"           # the paper's method: two turns, loss on every response (sec. 2.3.2)
MAX_STEPS = 0              # 0: train EPOCHS full epochs, as the official code does
EPOCHS = 3.0               # num_train_epochs=3
BATCH_SIZE = 1             # per_device_train_batch_size=1
GRAD_ACCUM = 1             # gradient_accumulation_steps=1
LR = 5e-5                  # learning_rate=5e-5
LORA_R = 8                 # LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1)
LORA_ALPHA = 16
LORA_DROPOUT = 0.1
LORA_TARGETS = "q_proj,v_proj"  # the official code names none: peft's default for Llama
MAX_LENGTH = 2048          # MAX_SEQ_LENGTH=2048 (prompt + responses); longer examples are left out, never cut
N_NBRS = 2                 # similar users per dialogue (<= k of neighbors.npz); 02's inference prompt shows 2 too
ITEM_FRAC = 0.5            # gpt_kd and mask: item-profile examples per user example (06 asks items in this form)
KD_GEN_BATCH = 8           # naive/mask: generation batch of sft_gpt_kd's profiles of untaught neighbours
KD_MAX_NEW_TOKENS = 48     # a 3+3 profile is ~25-30 SmolLM2 tokens
INIT = "gpt_kd"            # naive/mask: continue the sft_gpt_kd LoRA (the paper's ablation) | fresh
CKPT_EVERY = 200           # optimizer steps between checkpoints; a re-run with the same inputs resumes from the last
KD_ADAPTER = "sft_gpt_kd"
ITEM_USERS = 5             # warm item examples show 1-5 of the item's most recent users (06's default)
ITEM_NBRS = 3              # cold item examples show this many text-similar warm items (06's --item-nbrs default)
# The cpu preset's budget is what teaches SmolLM2-135M the profile format in minutes (docs/results.md, "03's
# budget"; step times: bench/RESULTS.md, "Stage timings").

# ----------------------------------------------------------------------------- data
# The prompts (prompts.kd_messages, prompts.two_turn_messages, the item prompts) are in prompts.py.

def tokenize_example(tok, messages, last_turn_only):
    """input_ids and labels (-100 off the supervised spans) from the template's {% generation %} markers: the
    assistant-token mask of apply_chat_template(..., return_assistant_tokens_mask=True), as SFTTrainer's
    assistant_only_loss uses it; `last_turn_only` (naive) keeps the last assistant turn only."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if 1 not in mask:
        raise RuntimeError("the chat template marked no assistant tokens: it needs {% generation %} markers")
    if last_turn_only:  # keep only the last contiguous run of assistant tokens
        end = len(mask) - mask[::-1].index(1)
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        mask = [1 if start <= k < end else 0 for k in range(len(mask))]
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    return ids, labels


def teacher_profiles(run, sets):
    """{user: profile} from distill.jsonl, excluding users of the held-out "eval" set."""
    eval_users = set(sets.get("eval", []))
    prof = {}
    for r in common.read_jsonl(Path(run) / "distill.jsonl"):
        if r["user"] not in eval_users and r.get("profile"):
            prof[int(r["user"])] = r["profile"]
    return prof


def balanced_labels(can_pos, can_neg, rng):
    """Turn-2 labels, 1 (Yes), 0 (No) or None (left out), with as many Yes as No up to one. can_pos/can_neg: bool
    arrays, whether a target has a positive / negative candidate. One-kind targets get their kind; targets with
    both are split so that the totals balance (an odd half rounded at random); if one-kind targets alone outnumber
    the other label, a seeded sample of them is left out."""
    can_pos, can_neg = np.asarray(can_pos, bool), np.asarray(can_neg, bool)
    idx = np.arange(len(can_pos))
    pos_only, neg_only = idx[can_pos & ~can_neg], idx[can_neg & ~can_pos]
    both = rng.permutation(idx[can_pos & can_neg])
    half = (len(neg_only) + len(both) - len(pos_only)) / 2  # Yes among `both` that equals the totals
    n_yes = int(np.clip(np.floor(half) + (half % 1 and rng.random() < 0.5), 0, len(both)))
    labels = np.full(len(idx), -1)
    labels[pos_only], labels[neg_only] = 1, 0
    labels[both[:n_yes]], labels[both[n_yes:]] = 1, 0
    labels[_surplus(labels, pos_only, neg_only, rng)] = -1
    return [None if v < 0 else int(v) for v in labels]


def _surplus(labels, pos_only, neg_only, rng):
    """Indices to leave out so that |Yes - No| <= 1: a seeded sample of the larger label's one-kind targets."""
    n_yes, n_no = int((labels == 1).sum()), int((labels == 0).sum())
    extra, pool = (n_yes - n_no - 1, pos_only) if n_yes > n_no else (n_no - n_yes - 1, neg_only)
    return rng.choice(pool, extra, replace=False) if extra > 0 else np.array([], int)


def fits(tok, msgs, max_length):
    """Prompts are never cut: a shorter list would no longer be what the teacher profiled (an example longer than
    --max-length is left out and counted)."""
    return len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]) <= max_length


def rules_reprofiler(rows, train, item_text, shown):
    """The rules teacher's profile function when every distill row is its profile (then a target whose shown list
    loses the positive item gets the profile of the list it shows), else None (such positives are not drawn)."""
    if not rows or any(r.get("teacher") != "rules" for r in rows):
        return None
    teacher = teachers.RulesTeacher(item_text, train, shown["max_items"], shown["max_chars"])
    return teacher.profile


def add_example(examples, stats, tok, args, msgs, last_turn_only=False, **info):
    if not fits(tok, msgs, args.max_length):
        stats["too_long"] += 1
        return
    ids, labels = tokenize_example(tok, msgs, last_turn_only)
    examples.append({"messages": msgs, "input_ids": ids, "labels": labels, **info})


def item_examples(run, tok, args, teacher, n, rng, stats):
    """Up to n single-turn item-profile examples, half warm, half cold (06's item prompts, prompts.*_item_messages), the
    answer in the user format: warm, the profiles of an item's 1-ITEM_USERS most recent taught training users ->
    their merged profile (prompts.merge_profiles); cold, up to ITEM_NBRS text-similar warm items with their warm item
    profiles -> those profiles merged. Each target is a function of its prompt, and 06 then asks items for a form
    the model was trained on."""
    split = common.load_split(run)
    n_items = split["n_items"]
    text = [prompts.clip(t, args.prompt["inference"]["max_chars"]) for t in common.load_items(run)]
    users_of = common.user_items(split["train_i"], split["train_u"], n_items)  # chronological per item
    taught = [[int(u) for u in users_of[i] if int(u) in teacher][::-1] for i in range(n_items)]  # newest first
    warm_profile = {i: prompts.merge_profiles([teacher[u] for u in us[:ITEM_USERS]]) for i, us in enumerate(taught)
                    if us}
    item_nbrs = common.load_neighbors(run)["item_nbrs"]
    examples = []
    for i in rng.permutation(sorted(warm_profile))[:(n + 1) // 2]:
        users = taught[i][:int(rng.integers(1, ITEM_USERS + 1))]  # 06 shows --item-users of them: any count
        msgs = prompts.warm_item_messages(text[i], [teacher[u] for u in users])
        target = prompts.merge_profiles([teacher[u] for u in users])
        add_example(examples, stats, tok, args, msgs + [{"role": "assistant", "content": target}], item=int(i),
                    kind="warm_item")
    for i in rng.permutation(n_items):
        if len(examples) >= n:
            break
        similar = [int(j) for j in item_nbrs[i] if int(j) != i and int(j) in warm_profile][:ITEM_NBRS]
        if similar:
            msgs = prompts.cold_item_messages(text[i], [(text[j], warm_profile[j]) for j in similar])
            target = prompts.merge_profiles([warm_profile[j] for j in similar])
            add_example(examples, stats, tok, args, msgs + [{"role": "assistant", "content": target}],
                        item=int(i), kind="cold_item")
    return examples


def sft_targets(sets, args):
    """The users of the "sft" set that get a training example: all, or the first --limit (a smoke run)."""
    return sets["sft"][:args.limit]


def build_examples(run, variant, tok, args, kd_profiles=None):
    """The tokenised training examples of one variant and counts for the log. Each example: {"user" (or "item"),
    "kind", "messages", "input_ids", "labels"; two-turn: "label" (1/0), "item" (v), "reprofiled"}."""
    run = Path(run)
    rng = np.random.default_rng(args.seed)
    shown = args.prompt["teacher"]  # what the teacher saw of a user: every prompt here shows the same
    sets = json.loads((run / "user_sets.json").read_text())
    eval_users = {int(u) for u in sets.get("eval", [])}
    split = common.load_split(run)
    n_users = split["n_users"]
    item_text = common.load_items(run)
    train = common.user_items(split["train_u"], split["train_i"], n_users)
    valid = common.user_items(split["valid_u"], split["valid_i"], n_users)
    teacher = teacher_profiles(run, sets)
    targets = [int(u) for u in sft_targets(sets, args) if int(u) in teacher and len(train[int(u)])]
    stats = collections.Counter(targets=len(sft_targets(sets, args)), targets_with_profile=len(targets), too_long=0)
    examples = []
    if variant == "gpt_kd":
        for u in targets:
            msgs = prompts.kd_messages(train[u], item_text, shown["max_items"], shown["max_chars"], teacher[u])
            add_example(examples, stats, tok, args, msgs, user=u, kind="user")
    else:
        examples = two_turn_examples(run, variant, tok, args, train, valid, item_text, teacher, targets, eval_users,
                                     kd_profiles or {}, rng, stats)
    if variant != "naive" and args.item_frac > 0:
        items = item_examples(run, tok, args, teacher, round(args.item_frac * len(examples)), rng, stats)
        stats.update(item_examples=len(items))
        examples += items
    return examples, dict(stats)


def two_turn_examples(run, variant, tok, args, train, valid, item_text, teacher, targets, eval_users, kd_profiles,
                      rng, stats):
    """The two-turn dialogues (naive, mask), one per target user (the "sft" set of user_sets.json).
    System: collaborative filtering and the two stages (prompts.TWO_TURN_SYSTEM).
    Turn 1: the target's and its similar users' (neighbors.npz user_nbrs) item lists -> every user's profile, one
    per line. Profiles come from the teacher (distill.jsonl) and, for neighbours the teacher did not see, from
    sft_gpt_kd (`kd_profiles`). Users of the "eval" set are held out: never a target, left out as neighbours;
    neighbours with no (valid) profile are left out too (each case counted).
    Turn 2: "will the target interact with item v?" -> Yes or No. Positive: a training item of the target that a
    shown neighbour shows, drawn from the target's items older than its shown window (the list and profile stay the
    teacher's), or, when 02's teacher was the rules teacher, from all its training items: a shown v is then removed
    from the target's list, which shows one older item instead, and the target's turn-1 profile is the rules
    teacher's profile of that list ("pos_reprofiled"). Negative: a shown neighbour's item the target never
    interacted with in train or valid. The labels are balanced (balanced_labels): a model that sees more No than Yes
    learns to say No."""
    shown = args.prompt["teacher"]
    mi = shown["max_items"]
    reprofile = rules_reprofiler(common.read_jsonl(Path(run) / "distill.jsonl"), train, item_text, shown)
    nbr_table = common.load_neighbors(run)["user_nbrs"]
    stats.update(nbrs_teacher=0, nbrs_kd=0, nbrs_eval=0, nbrs_skipped=0, positives=0, negatives=0, pos_only=0,
                 neg_only=0, no_candidate=0, dropped_for_balance=0, pos_hidden=0, pos_reprofiled=0)
    plans = []  # (target, its shown neighbours, positive candidates, negative candidates)
    for u in targets:
        nbrs = []
        for v in nbr_table[u][:args.n_nbrs]:
            v = int(v)
            if v < 0 or v == u or not len(train[v]):
                continue
            if v in eval_users:  # held out of every training set, as a neighbour too
                stats["nbrs_eval"] += 1
            elif v in teacher:
                nbrs.append((train[v], teacher[v]))
                stats["nbrs_teacher"] += 1
            elif v in kd_profiles:
                nbrs.append((train[v], kd_profiles[v]))
                stats["nbrs_kd"] += 1
            else:
                stats["nbrs_skipped"] += 1
        nbr_shown = set(int(i) for items, _ in nbrs for i in prompts.shown_items(items, mi))
        own = set(int(i) for i in train[u]) | set(int(i) for i in valid[u])
        # a positive is an item of the target's that a neighbour shows: one older than the target's shown window
        # (its list and profile stay as they are), or, with a re-profiling teacher, one of its shown items (the
        # list then shows one older item instead, and its profile is of that list)
        hidden = set(int(i) for i in train[u][:-mi]) if mi else set()
        pos_cand = sorted(nbr_shown & (set(int(i) for i in train[u]) if reprofile else hidden))
        neg_cand = sorted(nbr_shown - own)
        if not pos_cand and not neg_cand:
            stats["no_candidate"] += 1
            continue
        stats["pos_only"] += bool(pos_cand) and not neg_cand
        stats["neg_only"] += bool(neg_cand) and not pos_cand
        plans.append((u, nbrs, pos_cand, neg_cand, hidden))
    labels = balanced_labels([bool(p[2]) for p in plans], [bool(p[3]) for p in plans], rng)
    examples = []
    for (u, nbrs, pos_cand, neg_cand, hidden), label in zip(plans, labels):
        if label is None:
            stats["dropped_for_balance"] += 1
            continue
        v_item = int(rng.choice(pos_cand if label else neg_cand))
        target_items, profile, reprofiled = list(train[u]), teacher[u], False
        if label and v_item not in hidden:
            target_items = [i for i in train[u] if int(i) != v_item]
            profile, reprofiled = reprofile(target_items), True
        stats["pos_hidden"] += bool(label) and not reprofiled
        stats["pos_reprofiled"] += reprofiled
        msgs = prompts.two_turn_messages(target_items, nbrs, item_text, v_item, label, profile, mi, mi,
                                         shown["max_chars"])
        add_example(examples, stats, tok, args, msgs, last_turn_only=(variant == "naive"), user=u, kind="two_turn",
                    label=label, item=v_item, reprofiled=reprofiled)
    # examples too long to fit can unbalance the labels again
    got = np.array([e["label"] for e in examples])
    drop = set(_surplus(got, np.flatnonzero(got == 1), np.flatnonzero(got == 0), rng).tolist())
    stats["dropped_for_balance"] += len(drop)
    examples = [e for k, e in enumerate(examples) if k not in drop]
    stats["positives"] = sum(e["label"] for e in examples)
    stats["negatives"] = len(examples) - stats["positives"]
    return examples


# ----------------------------------------------------------------------------- neighbours' profiles from sft_gpt_kd

def kd_neighbor_profiles(run, args, teacher, sets):
    """{user: profile} written by sft_gpt_kd for the sft targets' neighbours that the teacher did not see;
    cached in sft_kd_profiles.jsonl (resumable; rows of another adapter version are ignored)."""
    run = Path(run)
    adapter = run / "sft_gpt_kd"
    if not (adapter / "adapter_model.safetensors").exists():
        return {}, []
    common.check_inputs(run, ["sft_gpt_kd/"], args.force)  # the model directory it loads is an input
    sha = common.sha256_file(adapter / "adapter_model.safetensors")
    split = common.load_split(run)
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    nbr_table = common.load_neighbors(run)["user_nbrs"]
    eval_users = {int(u) for u in sets.get("eval", [])}  # held out: never a training target, as a neighbour too
    need = sorted({int(v) for u in sft_targets(sets, args) for v in nbr_table[int(u)][:args.n_nbrs]
                   if int(v) >= 0 and int(v) not in teacher and int(v) not in eval_users and len(train[int(v)])})
    cache = run / "sft_kd_profiles.jsonl"
    rows = [r for r in common.read_jsonl(cache, repair=True) if r.get("adapter_sha") == sha]
    if not cache.exists() or len(rows) != len(common.read_jsonl(cache)):
        common.write_jsonl(cache, rows)  # create it, or drop rows of an older adapter
    done = {r["user"] for r in rows}
    todo = [v for v in need if v not in done]
    log.info("neighbour profiles from sft_gpt_kd: %d needed, %d cached, %d to generate", len(need),
             len(need) - len(todo), len(todo))
    if todo:
        item_text = common.load_items(run)
        model, tok = llm.load_llm(args.model, adapter=adapter, device=args.device)
        model.eval()
        with common.open_append(cache) as f:
            for s in range(0, len(todo), args.kd_gen_batch * 4):
                chunk = todo[s:s + args.kd_gen_batch * 4]
                shown = args.prompt["teacher"]
                msgs = [prompts.kd_messages(train[v], item_text, shown["max_items"], shown["max_chars"]) for v in chunk]
                texts = generate.generate_texts(model, tok, msgs, args.kd_max_new_tokens, args.kd_gen_batch,
                                                desc="kd profiles")
                for v, t in zip(chunk, texts):
                    row = {"user": v, "raw": t, "profile": prompts.parse_profile(t), "adapter_sha": sha}
                    common.append_jsonl(f, row)
                    rows.append(row)
        del model
    prof = {r["user"]: r["profile"] for r in rows if r["profile"]}
    bad = sum(1 for r in rows if not r["profile"])
    log.info("sft_gpt_kd neighbour profiles: %d valid, %d malformed (those neighbours are left out)",
             len(prof), bad)
    return prof, ["sft_kd_profiles.jsonl"]


# ----------------------------------------------------------------------------- training

def start_lora(model, args, init_adapter=None):
    """The LoRA to train: `init_adapter`'s, trainable (naive and mask continue sft_gpt_kd's), or a new one."""
    if init_adapter is None:
        return llm.lora_model(model, args)
    from peft import PeftModel
    llm.check_adapter_base(init_adapter, model.config._name_or_path)
    return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)


def train_sft(model_path, tok, examples, out_dir, args, init_adapter=None, resume_from=None):
    """LoRA SFT with trl's SFTTrainer on pre-tokenised input_ids + labels, from a new LoRA or from the one in
    `init_adapter` (or from the checkpoint `resume_from`); saves adapter + tokenizer to out_dir."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=llm.frozen_dtype(device))
    model.config.pad_token_id = tok.pad_token_id
    model = llm.trainable_float32(start_lora(model, args, init_adapter))
    ds = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    cfg = SFTConfig(
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps > 0 else -1, logging_steps=1, **llm.checkpoint_config(args),
        report_to=[], use_cpu=(device == "cpu"), seed=args.seed, data_seed=args.seed,
        **llm.precision_settings(model, device, args.activation_checkpointing),
        max_length=args.max_length, lr_scheduler_type="cosine", warmup_steps=min(5, max(args.max_steps // 10, 0)),
        disable_tqdm=False, dataloader_num_workers=0, remove_unused_columns=True,
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[llm.step_logger(out_dir / "train_log.jsonl")])
    result = trainer.train(resume_from_checkpoint=resume_from)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    return result


def parse_args(argv=None):
    p = common.stage_parser(__doc__)
    p.add_argument("--variant", choices=["gpt_kd", "naive", "mask"], default=VARIANT, help="what to train (see above)")
    p.add_argument("--model", default=llm.DEFAULT_LLM, help=llm.MODEL_HELP)
    p.add_argument("--chat-template", default=None, help=llm.TEMPLATE_HELP)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--max-steps", type=common.non_negative_int, default=MAX_STEPS,
                   help="optimizer steps; 0 = --epochs full epochs")
    p.add_argument("--epochs", type=common.positive_float, default=EPOCHS,
                   help="passes over the examples (with --max-steps 0)")
    p.add_argument("--batch-size", type=common.positive_int, default=BATCH_SIZE, help="examples per device step")
    p.add_argument("--grad-accum", type=common.positive_int, default=GRAD_ACCUM, help="device steps per optimizer step")
    p.add_argument("--lr", type=common.non_negative_float, default=LR, help="peak learning rate (cosine schedule)")
    p.add_argument("--lora-r", type=common.positive_int, default=LORA_R, help="LoRA rank")
    p.add_argument("--lora-alpha", type=common.positive_int, default=LORA_ALPHA, help="LoRA scale numerator")
    p.add_argument("--lora-dropout", type=common.fraction, default=LORA_DROPOUT, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default=LORA_TARGETS, help="comma-separated module names that get a LoRA")
    p.add_argument("--max-length", type=common.positive_int, default=MAX_LENGTH,
                   help="tokens per example; longer ones are left out")
    p.add_argument("--n-nbrs", type=common.positive_int, default=N_NBRS, help="similar users per dialogue")
    p.add_argument("--item-frac", type=common.non_negative_float, default=ITEM_FRAC,
                   help="gpt_kd, mask: item-profile examples per user example")
    p.add_argument("--kd-gen-batch", type=common.positive_int, default=KD_GEN_BATCH,
                   help="naive, mask: generation batch of sft_gpt_kd's neighbour profiles")
    p.add_argument("--kd-max-new-tokens", type=common.positive_int, default=KD_MAX_NEW_TOKENS,
                   help="naive, mask: tokens per sft_gpt_kd neighbour profile")
    p.add_argument("--init", choices=["gpt_kd", "fresh"], default=INIT,
                   help="naive/mask: continue the sft_gpt_kd LoRA (the paper's ablation; it must exist) or train a "
                        "new LoRA on the base model")
    p.add_argument("--limit", type=common.positive_int, default=None,
                   help="only the first N users of the sft set (a smoke run; every other setting as given)")
    p.add_argument("--ckpt-every", type=common.non_negative_int, default=CKPT_EVERY,
                   help="steps between checkpoints (0 = none)")
    llm.add_activation_checkpointing_arg(p)
    return p.parse_args(argv)


def init_name(init_adapter):
    return "fresh" if init_adapter is None else KD_ADAPTER


def init_adapter_of(run, args):
    """The adapter naive/mask start from: run/sft_gpt_kd (refused clearly when it is missing), or None (a new LoRA:
    gpt_kd itself, or --init fresh, which is not the paper's ablation). Continuing GPT_KD's LoRA (its weights and its
    LoRA settings; --lora-* do not apply) keeps the profile-writing it learnt, which sft_naive's Yes/No loss alone
    would not teach. sft_info.json and the manifest record which ("init", with the adapter's sha256)."""
    if args.variant == "gpt_kd" or args.init == "fresh":
        return None
    path = run / KD_ADAPTER
    if not (path / "adapter_model.safetensors").exists():
        raise common.DataError(f"{path}: no adapter; --variant {args.variant} continues training the GPT_KD LoRA "
                               f"(the paper's ablation): run `python 03_sft.py --run {run} --variant gpt_kd` first, "
                               "or pass --init fresh to train a new LoRA on the base model instead")
    return path


def prompt_info(args):
    """The prompt a variant is trained on, for 06: sft_gpt_kd must be asked with its own single-turn prompt."""
    shown = args.prompt["teacher"]
    if args.variant == "gpt_kd":
        return {"template": "kd", **shown}
    return {"template": "two_turn", **shown, "n_nbrs": args.n_nbrs}


def main(argv=None):
    args = parse_args(argv)
    run = args.run
    started = time.time()
    common.setup_logging(run, f"03_sft_{args.variant}")
    common.seed_everything(args.seed)
    inputs = ["data/split.npz", "data/items.jsonl", "neighbors.npz", "distill.jsonl", "user_sets.json",
              prompts.PROMPT_FILE]
    common.check_inputs(run, inputs, args.force)
    args.prompt = prompts.prompt_settings(run)  # 02's sizes (recorded in the manifest with the other arguments)
    model_path = llm.resolve_llm(args.model)
    init_adapter = init_adapter_of(run, args)  # before any work: a missing sft_gpt_kd is refused at once
    # the LoRA it continues was trained with a template, saved beside it: keep training on that one
    saved = init_adapter is not None and (Path(init_adapter) / "tokenizer_config.json").exists()
    tok = llm.load_tokenizer(init_adapter if saved else model_path, None if saved else args.chat_template)
    sets = json.loads((run / "user_sets.json").read_text())

    kd, extra_outputs = {}, []
    if args.variant != "gpt_kd":
        kd, extra_outputs = kd_neighbor_profiles(run, args, teacher_profiles(run, sets), sets)
        if extra_outputs:
            inputs += ["sft_gpt_kd/"]
        else:
            log.info("no %s/sft_gpt_kd: neighbours the teacher did not see are left out of the dialogues "
                     "(run --variant gpt_kd first to fill them in)", run)
    examples, stats = build_examples(run, args.variant, tok, args, kd)
    log.info("%s: %d examples from %s", args.variant, len(examples), json.dumps(stats))
    if args.variant != "gpt_kd" and stats.get("nbrs_skipped"):
        log.info("%d neighbour slots had no profile and were skipped", stats["nbrs_skipped"])
    if not examples:
        raise common.DataError(f"{run}: no {args.variant} training examples could be built ({stats})")
    lengths = [len(e["input_ids"]) for e in examples]
    log.info("tokens per example: mean %.0f, max %d; supervised tokens per example: mean %.1f",
             np.mean(lengths), max(lengths), np.mean([sum(l != -100 for l in e["labels"]) for e in examples]))

    final = run / f"sft_{args.variant}"
    tmp = run / f"sft_{args.variant}.tmp"
    resume_from = llm.resumable_work(tmp, llm.resume_key(run, inputs, args, init_adapter and common.sha256_file(
        init_adapter / "adapter_model.safetensors")))
    t0 = time.time()
    if init_adapter is not None:
        log.info("%s continues the LoRA of %s (its LoRA settings; --lora-* do not apply)", args.variant, init_adapter)
    result = train_sft(model_path, tok, examples, tmp, args, init_adapter, resume_from)
    train_s = time.time() - t0
    init = {"init": init_name(init_adapter), "init_adapter_sha256":
            common.sha256_file(init_adapter / "adapter_model.safetensors") if init_adapter else None}
    info = {"variant": args.variant, "base_model": str(args.model), "resolved_model": model_path,
            "n_examples": len(examples), "stats": stats, "train_seconds": round(train_s, 1),
            "train_loss": result.training_loss, "steps": result.global_step, **init, "prompt": prompt_info(args)}
    common.write_json(tmp / "sft_info.json", info)
    llm.replace_dir(tmp, final)
    log.info("trained %d steps in %.1fs (%.2fs/step), mean loss %.4f", result.global_step, train_s,
             train_s / max(result.global_step, 1), result.training_loss)
    outputs = sorted(str(p.relative_to(run)) for p in final.rglob("*") if p.is_file()) + extra_outputs
    extra = {**init, "absent_inputs": ["sft_gpt_kd/"]} if args.variant != "gpt_kd" and not extra_outputs else init
    common.record_stage(run, f"03_sft_{args.variant}", args, inputs, outputs, started, extra)
    return final


if __name__ == "__main__":
    common.run_stage(main)
