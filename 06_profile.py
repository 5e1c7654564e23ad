"""06_profile — user profiles, item profiles (warm and cold) and their text embeddings (docs/spec.md, sections 5-7).

A user's profile answers the inference prompt (its and its neighbours' training items, as prompt.json "inference"
shows them: turn 1 of 03's dialogue, whose answer is opened at "Target user:" and kept up to the end of that line, so
the model is asked what it was trained on and writes the target's profile only; sft_gpt_kd: the single-turn prompt 03
trained it on). A warm item's (one with training users) is written from its text and its most recent users' profiles
(--item-users), any other item's from its text and the item profiles of its text-similar warm items (--item-nbrs).
Rows are appended as batches finish; a re-run reuses those built from the same prompt and upstream state (inputs,
model, decoding settings and this stage's code: an edit to 06, common.py or llm.py writes the rows again). An answer
that does not parse is sampled again (--retries, --retry-temperature); one that never parses keeps its raw text,
"valid": false; "attempt" says which try wrote a row (0: the greedy answer).

Reads   data/split.npz, data/items.jsonl, neighbors.npz, item_text_emb.npy, prompt.json, user_sets.json (the probe's
        eval users, if any), and the model of --source: base_llm (the untuned --model), sft_gpt_kd | sft_naive |
        sft_mask (03's adapters), ppo (05's, on the SFT model it was trained from); teacher --teacher api: distill.jsonl
Writes  profiles/<source>/users.jsonl   {"user", "profile", "prompt_hash", "valid"[, "attempt", "upstream"]
                                         [, "teacher"]}
        profiles/<source>/items.jsonl   {"item", "profile", "prompt_hash", "valid", "kind": "warm"|"cold"
                                         [, "attempt", "upstream"][, "teacher", "from_users"|"from_items"]}
        profiles/<source>/user_emb.npy, item_emb.npy   float32 [n_users | n_items, d_t] (--encoder)
        profiles/<source>/probe.json    profile-quality probe (validation items only) + malformed-profile counts;
                                        the manifest records stage "06_profile_<source>"
Run     python 06_profile.py --run runs/ml100k --source base_llm
        python 06_profile.py --run runs/ml100k --source teacher   # 02's teacher (--teacher rules | api), no LLM
        python 06_profile.py --run runs/ml100k --source sft_mask --probe-only  # eval users and probe, in minutes:
                                                                              # profiles/<source>/probe_only/
        for i in 0 1; do python 06_profile.py --run R --source S --shard $i/2 & done; wait
        python 06_profile.py --run R --source S --merge                       # combine the shards and embed
"""
import argparse
import collections
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import common
import generate
import llm
import prompts
import teachers

log = logging.getLogger("reclm.06")

# ----------------------------------------------------------------------------- defaults
# The paper's setting, bf16 on a GPU (--dtype auto). scripts/presets.sh `cpu` passes --item-users 2 for the LLM
# sources: generation is prefill-bound on a CPU (bench/RESULTS.md, "Batched generation").
# The decoding defaults below were chosen on the probe of the eval users (validation items only); the measurements
# are in docs/results.md, "Decoding".
SOURCE = "base_llm"            # the untuned LLM: the reference every trained source is compared with
BATCH_SIZE = 64                # prompts per generation batch
MAX_NEW_TOKENS = 100           # the official code's max_new_tokens; an answer ends at its first profile line
TEMPERATURE = 0.0              # greedy: a profile is the model's most likely answer, reproducible
NO_REPEAT_NGRAM = 0            # > 0: no n-token run twice in one answer (generate.NoRepeatInAnswer), against the greedy
                               # loops of a small tuned model ("heavy viewer, heavy viewer, ..."). Off: more profiles
                               # parse with it, but the probe fell
DISTINCT_TERMS = False         # True: no term twice in a profile's list (generate.DistinctTerms): the greedy answer
                               # extends or changes a repeated term instead of being rejected for it. Off: nearly every
                               # first answer parses with it, but the probe was not better than the retries' own spread
RETRIES = 5                    # an answer that does not parse is sampled again up to this many times: most profiles
                               # then parse, at the same probe
RETRY_TEMPERATURE = 0.7        # ... at this temperature (top-k 50, top-p 0.95), seeded per batch and attempt: retried
RETRY_SEED = 0                 # answers depend on which others share their batch, so shards may retry differently
ITEM_USERS = 5                 # warm items: profiles of up to this many most recent training users (the paper's 5)
ITEM_NBRS = 3                  # cold items: this many text-similar warm items
WAIT_S = 3600                  # --shard: how long to wait for the other shards' user profiles
# One torch thread per process, parallelism through --shard: OpenMP threads spin at barriers when the cores are
# shared, which made small-batch decode matmuls many times slower than one thread (docs/design.md, "One torch
# thread per process").
THREADS = 1
# User prompts show what 02's prompt.json "inference" says (newest target items, items per neighbour, neighbours,
# item text chars), as 02's reward queries and 05's rollouts do: no flags here (prompts.prompt_settings).
TEACHER = "teacher"            # --source teacher: 02's teacher writes every profile (no LLM)
SOURCES = common.PROFILE_SOURCES  # the LLM sources, then TEACHER
PROBE_K = llm.PROBE_K

# ----------------------------------------------------------------------------- prompts
# User prompts are prompts.inference_messages (shared with 02's reward pairs and 05's PPO prompts); item prompts are
# prompts.warm_item_messages / cold_item_messages (shared with 03, which trains them).

def user_messages(u, train, nbrs, item_text, args):
    return prompts.user_prompt(u, train, nbrs, item_text, **args.prompt["inference"])


def kd_user_messages(run, train, item_text_full):
    """sft_gpt_kd's user prompt: the single-turn prompt 03 trained it on (prompts.kd_messages: the user's own items,
    no neighbours), with the sizes sft_gpt_kd/sft_info.json records. Asked with the inference prompt instead,
    GPT_KD answers a prompt it never saw."""
    shown = json.loads((run / "sft_gpt_kd" / "sft_info.json").read_text())["prompt"]
    return lambda u: prompts.kd_messages(train[u], item_text_full, shown["max_items"], shown["max_chars"])


def short_profile(row):
    return row["profile"] if row["valid"] else " ".join(row["profile"].split())[:200]


def warm_item_messages(i, item_text, users_of, user_rows, args):
    recent = [int(u) for u in users_of[i] if int(u) in user_rows][-args.item_users:][::-1]  # newest first
    return prompts.warm_item_messages(item_text[i], [short_profile(user_rows[u]) for u in recent])


def cold_item_messages(i, item_text, item_nbrs, item_rows, args):
    similar = [int(j) for j in item_nbrs[i] if int(j) != i and int(j) in item_rows][:args.item_nbrs]
    return prompts.cold_item_messages(item_text[i], [(item_text[j], short_profile(item_rows[j])) for j in similar])


# ----------------------------------------------------------------------------- files
# Several processes (--shard i/n): each writes users.shard{i}of{n}.jsonl / items.shard{i}of{n}.jsonl and waits
# (polling, --wait-s) for the other shards' user profiles before its item phase; --merge combines them and embeds.
# `--what users|warm|cold` runs one phase only (e.g. to run the shards' phases one after another).

def parse_shard(s):
    if s is None:
        return 0, 1
    try:
        i, n = (int(x) for x in s.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise common.UsageError(f"--shard expects i/n with 0 <= i < n, got {s!r}") from None
    return i, n


def own_file(out, kind, shard):
    i, n = shard
    return out / (f"{kind}.jsonl" if n == 1 else f"{kind}.shard{i}of{n}.jsonl")


def read_all(out, kind, own=None, fresh=None):
    """id -> row over the final file and every shard file. Only `own` (this process's file) is repaired; the
    others may be mid-append by another process, their partial last lines are simply not read. With
    `fresh(id, row)`, rows it rejects (built from another prompt or upstream state) are left out; of several rows
    of an id the later one wins (a redone row is appended after the stale one)."""
    key = "user" if kind == "users" else "item"
    rows = {}
    for path in [out / f"{kind}.jsonl"] + sorted(out.glob(f"{kind}.shard*of*.jsonl")):
        for r in common.read_jsonl(path, repair=(own is not None and path == own)):
            if fresh is None or fresh(int(r[key]), r):
                rows[int(r[key])] = r
    return rows


def fresh_rows(upstream, hashes=None):
    """fresh(id, row) for read_all: the row was built from the current upstream state (`upstream`: the hash of the
    data files and the model that write the profiles) and, with `hashes` ({id: prompt hash}), the current prompt."""
    if hashes is None:
        return lambda k, r: r.get("upstream") == upstream
    return lambda k, r: r.get("upstream") == upstream and r.get("prompt_hash") == hashes.get(k)


def model_dirs(run, source):
    """The run's model directories that --source loads (load_profile_model): inputs of this stage, so that
    retraining one makes these profiles stale."""
    if source == "ppo":
        base = run / "ppo" / "base.json"
        return ["ppo/"] + ([json.loads(base.read_text())["sft"] + "/"] if base.exists() else [])
    return [f"{source}/"] if source.startswith("sft_") else []


def wait_for(out, kind, needed, args, what, fresh=None):
    deadline = time.time() + args.wait_s
    while True:
        rows = read_all(out, kind, fresh=fresh)
        missing = [k for k in needed if k not in rows]
        if not missing:
            return rows
        if time.time() > deadline:
            raise common.StageError(f"{what}: {len(missing)} {kind} profiles are still missing (e.g. id {missing[0]}) "
                                    f"after --wait-s {args.wait_s}; run the other shards (or `--what {kind}` without "
                                    "--shard)")
        log.info("%s: waiting for %d %s profiles from other shards", what, len(missing), kind)
        time.sleep(min(30, max(1, args.wait_s / 20)))


def run_phase(name, ids, make_messages, kind, out, shard, model, tok, args, max_new_tokens, extra=None,
              upstream=None, redone=None):
    """Generate the profiles of `ids` that no file holds from the current prompt and `upstream` state (rows of
    another prompt or upstream state are redone, counted in `redone[name]`); append them to this process's file.
    An answer that prompts.normalize_profile cannot repair into a 3+3 profile (items too: they are asked for the user
    format, which 03 trains on teacher item profiles) is sampled again, up to --retries times; one that never
    parses keeps its raw text, since its embedding still carries signal, and is marked "valid": false (counted in
    the log and probe.json). Rows are written as their batch finishes."""
    own = own_file(out, kind, shard)
    key = "user" if kind == "users" else "item"
    texts = {k: prompts.render(tok, make_messages(k)) for k in ids}
    hashes = {k: prompts.prompt_hash(t) for k, t in texts.items()}
    present = read_all(out, kind, own=own)
    done = read_all(out, kind, fresh=fresh_rows(upstream, hashes))
    todo = [k for k in ids if k not in done]
    n_redo = sum(k in present for k in todo)
    if redone is not None:
        redone[name] = n_redo
    log.info("%s: %d to write (%d of them redone: built from another prompt or upstream state), %d already done",
             name, len(todo), n_redo, len(ids) - len(todo))
    if not todo:
        return 0
    n_fixed, n_bad = 0, 0
    with common.open_append(own) as f:
        # the first answer is the decoding of --temperature; one that does not parse is sampled again from the
        # prompt already run (generate.generate_batches: a retry costs decoding only)
        for idx, answers, attempts in generate.generate_batches(
                model, tok, [texts[k] for k in todo], max_new_tokens, args.batch_size, args.temperature,
                no_repeat_ngram=args.no_repeat_ngram, desc=name,
                accept=lambda a: prompts.normalize_profile(a) is not None,
                retries=args.retries, retry_temperature=args.retry_temperature, seed=args.retry_seed,
                distinct_terms=args.distinct_terms, kv_budget_bytes=int(args.kv_budget_gb * 2 ** 30)):
            for j, answer, attempt in zip(idx, answers, attempts):
                prof = prompts.normalize_profile(answer)
                row = {key: int(todo[j]), "profile": prof if prof else answer, "prompt_hash": hashes[todo[j]],
                       "upstream": upstream, "valid": prof is not None, "attempt": attempt}
                common.append_jsonl(f, {**row, **(extra or {})})
                n_fixed, n_bad = n_fixed + (prof is not None and attempt > 0), n_bad + (prof is None)
    log.info("%s: %d written, %d of them sampled again until they parsed, %d malformed (raw text kept)",
             name, len(todo), n_fixed, n_bad)
    return len(todo)


# ----------------------------------------------------------------------------- --source teacher (no LLM)
# The upper bound of distillation: what profiles of teacher quality do to each backbone. Every profile is written by
# 02's teacher itself, in seconds (plus the text encoder), in one pass: no shards or resume (--shard, --merge, --what
# and --limit are refused); --probe-only works as for the other sources.

API_ARGS = ("n_users", "min_items", "max_items", "max_chars", "retries", "temperature", "max_new_tokens", "api_base",
            "api_model", "api_key_env", "api_timeout", "api_max_tries", "api_backoff", "concurrency")


def api_teacher_args(run):
    """The arguments 02 last ran with (manifest.json), which must be --teacher api: 06 then sends exactly 02's
    prompts to the same model, with the same retries."""
    rec = common.read_manifest(run)["stages"].get("02_distill")
    used = rec["args"].get("teacher") if rec else None
    if used != "api":
        raise common.StageError("--source teacher --teacher api reuses 02's API teacher with the settings 02 last ran "
                                f"with, but {'02 has not run' if rec is None else f'02 last ran with --teacher {used}'}"
                                ": run 02_distill.py --teacher api --api-model M [--api-base URL] first")
    missing = [k for k in API_ARGS if k not in rec["args"]]
    if rec["args"].get("n_users") is None:  # 02 records it resolved; None is an older 02's "the default"
        missing.append("n_users (resolved)")
    if missing:
        raise common.StaleInputError(f"{run}/manifest.json: 02's record lacks {', '.join(missing)} (written by an "
                                     "older 02_distill.py): run 02 again")
    # every user needs a profile: one the API never answers in form gets the rules profile
    return argparse.Namespace(**{**rec["args"], "run": Path(run), "on_fail": "rules"})


def teacher_user_rows(run, users, train, item_text, rules, args):
    """({user: row}, what the probe records): exactly the distillation target 02 would write for every user.
    --teacher rules: the rules teacher on the user's training items. --teacher api: 02's API teacher with the
    arguments 02 last ran with: the same prompts, worked example, model and retries, answers from
    teacher_cache.jsonl where 02 already asked (new answers are appended to it), the rules profile for a user the
    API never answers in form (02's --on-fail rules). "prompt_hash" hashes what the profile was computed from (the
    teacher prompt for --teacher api)."""
    if args.teacher == "rules":
        rows = {u: {"user": u, "profile": rules.profile(train[u]), "teacher": "rules",
                    "prompt_hash": prompts.prompt_hash(json.dumps({"teacher": "rules", "items": train[u].tolist()}))}
                for u in users}
        return rows, {"teacher": "rules", "teacher_model": "rules"}
    a = api_teacher_args(run)
    _, example = teachers.sample_and_example(train, rules, a)
    stats = collections.Counter(written=0, failed=0, malformed_answers=0, retries=0, retried_ok=0)
    buf = io.StringIO()  # run_api appends 02's distill rows; they are only read back here
    teachers.run_api(users, train, item_text, rules, example, a, buf, stats)
    rows = {}
    for r in map(json.loads, buf.getvalue().splitlines()):
        rows[int(r["user"])] = {"user": int(r["user"]), "profile": r["profile"], "teacher": r["teacher"],
                                "prompt_hash": prompts.prompt_hash(json.dumps(r["prompt"], sort_keys=True))}
    return rows, {"teacher": "api", "teacher_model": a.api_model, "stats": dict(stats)}


def teacher_item_rows(warm, other, users_of, user_rows, item_nbrs, rules, args):
    """{item: row} in the user format (prompts.merge_profiles, as 03's item examples): a warm item takes the most
    common identity and interest terms of the teacher profiles of its (up to --item-users) most recent training
    users; any other item those of the teacher item profiles of its (up to --item-nbrs) text-similar warm items. Ties
    go to the term met first (newest user / most similar item first, then the order within the profile); fewer than
    three distinct terms are topped up from the rules profile of the item alone. Each row names the users or items it
    came from ("from_users" / "from_items")."""
    def row(i, kind, profiles, src):
        prof = prompts.merge_profiles(profiles, fill=[rules.profile([i])])  # topped up by the item's own genres
        return {"item": i, "profile": prof, "kind": kind, "teacher": args.teacher, **src,
                "prompt_hash": prompts.prompt_hash(json.dumps({"teacher": args.teacher, "from": profiles}))}

    rows = {}
    for i in warm:
        recent = [int(u) for u in users_of[i] if int(u) in user_rows][-args.item_users:][::-1]  # newest first
        rows[i] = row(i, "warm", [user_rows[u]["profile"] for u in recent], {"from_users": recent})
    for i in other:
        similar = [int(j) for j in item_nbrs[i] if int(j) != i and int(j) in rows and rows[int(j)]["kind"] == "warm"]
        similar = similar[:args.item_nbrs]
        rows[i] = row(i, "cold", [rows[j]["profile"] for j in similar], {"from_items": similar})
    return rows


def write_teacher_profiles(run, out, d, args):
    """--source teacher: users.jsonl and items.jsonl (when items are asked for) in one pass; returns what the
    probe records about the teacher."""
    rules = teachers.RulesTeacher(d.item_text_full, d.train, **args.prompt["teacher"])  # as 02 built it
    users, info = teacher_user_rows(run, d.user_ids, d.train, d.item_text_full, rules, args)
    rows = {"users": users}
    if d.warm or d.other:
        rows["items"] = teacher_item_rows(d.warm, d.other, d.users_of, users, d.nbrs["item_nbrs"], rules, args)
    for kind, by_id in rows.items():
        for r in by_id.values():
            r["valid"] = prompts.parse_profile(r["profile"]) == r["profile"]
        common.write_jsonl(out / f"{kind}.jsonl", [by_id[k] for k in sorted(by_id)])
        log.info("teacher %s: %d profiles of %s, %d malformed", args.teacher, len(by_id), kind,
                 sum(not r["valid"] for r in by_id.values()))
    return info


# ----------------------------------------------------------------------------- the LLM sources
# The order of the work (item profiles need user profiles): users, warm items (items with training users), the
# other items (cold, and any item without training users); then (finish) embeddings and the probe.

def write_llm_profiles(run, out, d, args, upstream, shard, t_gen, redone):
    """Generate the phases --what asks for, for this shard's ids, appending rows as batches finish."""
    model, tok = llm.load_profile_model(run, args.source, args.model, device=args.device,
                                        chat_template=args.chat_template)
    model = model.to(llm.pick_dtype(args.dtype, args.device)).eval()
    log.info("model dtype %s, %d torch threads", next(model.parameters()).dtype, torch.get_num_threads())
    user_msgs = (kd_user_messages(run, d.train, d.item_text_full) if args.source == "sft_gpt_kd" else
                 (lambda u: user_messages(u, d.train, d.nbrs["user_nbrs"], d.item_text, args)))
    mine = (lambda ids: [k for k in ids if k % shard[1] == shard[0]])

    def fresh(ids, make):  # other shards' rows count only once built from the current prompt and upstream
        return fresh_rows(upstream, {k: prompts.prompt_hash(prompts.render(tok, make(k))) for k in ids})

    def phase(name, ids, make, kind, t_key, extra=None, t0=None):
        t0 = t0 or time.time()
        run_phase(name, mine(ids), make, kind, out, shard, model, tok, args, args.max_new_tokens, extra,
                  upstream=upstream, redone=redone)
        t_gen[t_key] = round(time.time() - t0, 1)

    if args.what in ("all", "users"):
        phase("user profiles", d.user_ids, user_msgs, "users", "users_s")
    if args.what in ("all", "warm", "cold"):
        user_rows = wait_for(out, "users", d.user_ids, args, "warm items", fresh(d.user_ids, user_msgs))
        warm_msgs = (lambda i: warm_item_messages(i, d.item_text, d.users_of, user_rows, args))
    if args.what in ("all", "warm"):
        phase("warm item profiles", d.warm, warm_msgs, "items", "warm_items_s", {"kind": "warm"})
    if args.what in ("all", "cold"):
        t = time.time()
        item_rows = wait_for(out, "items", d.warm, args, "cold items", fresh(d.warm, warm_msgs))
        cold_msgs = (lambda i: cold_item_messages(i, d.item_text, d.nbrs["item_nbrs"], item_rows, args))
        phase("cold item profiles", d.other, cold_msgs, "items", "cold_items_s", {"kind": "cold"}, t0=t)


# ----------------------------------------------------------------------------- finish: files, embeddings, probe

def collect_rows(out, d, teacher, upstream):
    """One row per id in users.jsonl / items.jsonl (the shard files merged and removed), and the malformed counts."""
    result = {}
    for kind, ids in (("users", d.user_ids), ("items", d.warm + d.other)):
        key = "user" if kind == "users" else "item"
        rows = read_all(out, kind, own=out / f"{kind}.jsonl", fresh=None if teacher else fresh_rows(upstream))
        missing = [k for k in ids if k not in rows]
        if missing:
            raise common.StageError(f"{out}: {len(missing)} {kind} profiles missing (e.g. {key} {missing[0]}); "
                                    "run the shards (or this stage without --merge) first")
        final = [rows[k] for k in sorted(rows)]
        common.write_jsonl(out / f"{kind}.jsonl", final)
        for p in out.glob(f"{kind}.shard*of*.jsonl"):
            p.unlink()
        result[kind] = final
        bad = sum(not r["valid"] for r in final)
        result[f"malformed_{kind}"] = bad
        log.info("%s: %d profiles, %d malformed (%.1f%%)", kind, len(final), bad, 100 * bad / max(len(final), 1))
    return result


def embed_and_probe(run, out, d, args, result, info):
    """The profile embeddings (all users and items; --probe-only: the eval users') and probe.json: Recall@K of the
    users' validation items ranked by their profile against the item texts (and, all users, the item profiles).
    Returns (probe, outputs)."""
    user_prof = {r["user"]: r["profile"] for r in result["users"]}
    probe = {"source": args.source, **info["teacher"]}
    if args.probe_only:
        u_emb = common.encode_texts([user_prof[u] for u in d.user_ids], args.encoder, device=args.device,
                                    desc="encode user profiles")
        text_emb, probe["item_embeddings"] = llm.item_embeddings_for_probe(run, d.item_text_full, u_emb.shape[1],
                                                                           args.encoder, args.device)
        probe.update(malformed_users=result["malformed_users"], redone=info["redone"],
                     eval_users=llm.profile_probe(d.split, d.user_ids, u_emb, text_emb))
        outputs = ["users.jsonl", "probe.json"]
    else:
        item_prof = {r["item"]: r["profile"] for r in result["items"]}
        # --limit leaves some ids without a profile: embed their item text / an empty string instead
        t = time.time()
        u_emb = common.encode_texts([user_prof.get(u, "") for u in range(d.n_users)], args.encoder,
                                    device=args.device, desc="encode user profiles")
        i_emb = common.encode_texts([item_prof.get(i, d.item_text_full[i]) for i in range(d.n_items)], args.encoder,
                                    device=args.device, desc="encode item profiles")
        common.save_npy(out / "user_emb.npy", u_emb.astype(np.float32))
        common.save_npy(out / "item_emb.npy", i_emb.astype(np.float32))
        info["seconds"]["embed_s"] = round(time.time() - t, 1)
        text_emb, probe["item_embeddings"] = llm.item_embeddings_for_probe(run, d.item_text_full, u_emb.shape[1],
                                                                           args.encoder, args.device)
        everyone = np.arange(d.n_users)
        probe.update(n_users=d.n_users, n_items=d.n_items, malformed_users=result["malformed_users"],
                     malformed_items=result["malformed_items"],
                     all_users=llm.profile_probe(d.split, everyone, u_emb, text_emb),
                     all_users_vs_item_profiles=llm.profile_probe(d.split, everyone, u_emb, i_emb),
                     seconds=info["seconds"], redone=info["redone"])
        if d.eval_users:
            probe["eval_users"] = llm.profile_probe(d.split, d.eval_users, u_emb[d.eval_users], text_emb)
        outputs = ["users.jsonl", "items.jsonl", "user_emb.npy", "item_emb.npy", "probe.json"]
    common.write_json(out / "probe.json", probe)
    head = probe.get("eval_users", probe.get("all_users"))
    k = PROBE_K
    log.info("probe (%d %s users, %s): profile Recall@%d = %.4f (history centroid %.4f, random %.4f)%s",
             head["n_users"], "eval" if "eval_users" in probe else "all", args.source, k, head[f"recall@{k}"],
             head[f"centroid_recall@{k}"], head[f"random_recall@{k}"],
             "" if args.probe_only else "; user profile vs item profile Recall@%d = %.4f"
             % (k, probe["all_users_vs_item_profiles"][f"recall@{k}"]))
    return probe, outputs


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = common.stage_parser(__doc__)
    p.add_argument("--source", default=SOURCE, choices=SOURCES,
                   help="which model writes the profiles, or `teacher`: 02's teacher itself")
    p.add_argument("--teacher", default=None, choices=["rules", "api"],
                   help="--source teacher only: 02's rules teacher, or its API teacher with 02's last arguments "
                        "(default: rules)")
    p.add_argument("--model", default=llm.DEFAULT_LLM, help=llm.MODEL_HELP)
    p.add_argument("--chat-template", default=None, help=llm.TEMPLATE_HELP + "; the tuned sources use the "
                   "template their adapter was trained with")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model dtype; auto: bf16 on a GPU that has it and on a CPU with native bf16 matmuls "
                        "(AVX512-BF16/AMX), else float32")
    p.add_argument("--threads", type=common.non_negative_int, default=THREADS,
                   help="torch CPU threads; 0 = torch's choice (see THREADS)")
    p.add_argument("--encoder", default=None, help="text encoder for the embeddings (default: the shipped MiniLM)")
    p.add_argument("--batch-size", type=common.positive_int, default=BATCH_SIZE, help="prompts per generation batch")
    p.add_argument("--kv-budget-gb", type=common.non_negative_float, default=0.0,
                   help="a batch's KV cache at most (GiB); a batch is cut short to fit (0: half the free GPU memory; "
                        "no limit on a CPU)")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=MAX_NEW_TOKENS,
                   help="tokens per profile at most")
    p.add_argument("--temperature", type=common.non_negative_float, default=TEMPERATURE, help="0 = greedy")
    p.add_argument("--no-repeat-ngram", type=common.non_negative_int, default=NO_REPEAT_NGRAM,
                   help="ban repeating any n-token run within one answer (0 = off)")
    p.add_argument("--distinct-terms", action=argparse.BooleanOptionalAction, default=DISTINCT_TERMS,
                   help="ban repeating a term within a profile's list (see DISTINCT_TERMS)")
    p.add_argument("--retries", type=common.non_negative_int, default=RETRIES,
                   help="sample an answer that does not parse again, up to this many times (0 = keep it malformed)")
    p.add_argument("--retry-temperature", type=common.non_negative_float, default=RETRY_TEMPERATURE,
                   help="temperature of the retries")
    p.add_argument("--retry-seed", type=int, default=RETRY_SEED, help="seed of the retries' draws")
    p.add_argument("--item-users", type=common.positive_int, default=ITEM_USERS,
                   help="warm items: profiles of up to this many recent users")
    p.add_argument("--item-nbrs", type=common.positive_int, default=ITEM_NBRS,
                   help="cold items: similar warm items shown")
    p.add_argument("--shard", default=None, help="i/n: this process does every n-th id starting at i")
    p.add_argument("--merge", action="store_true", help="combine shard files, then embed and probe")
    p.add_argument("--what", default="all", choices=["all", "users", "warm", "cold"],
                   help="run one phase only; embeddings are written after `all` or --merge")
    p.add_argument("--wait-s", type=common.non_negative_float, default=WAIT_S,
                   help="shards: seconds to wait for the other shards")
    p.add_argument("--limit", type=common.positive_int, default=None, help="only the first N users/items (smoke runs)")
    p.add_argument("--restart", action="store_true", help="delete this source's profiles first")
    p.add_argument("--probe-only", action="store_true",
                   help="only the eval users' profiles (user_sets.json) and the probe, in profiles/<source>/"
                        "probe_only/: compares sources in minutes; 07 cannot use it")
    args = p.parse_args(argv)
    if args.source == TEACHER:
        bad = [o for o, on in (("--shard", args.shard), ("--merge", args.merge), ("--what", args.what != "all"),
                               ("--limit", args.limit is not None)) if on]
        if bad:
            raise common.UsageError(f"--source teacher writes every profile in one pass without an LLM; "
                                    f"{', '.join(bad)} apply to the LLM sources only")
        args.teacher = args.teacher or "rules"
    elif args.teacher:
        raise common.UsageError(f"--teacher applies to --source teacher only, not --source {args.source}")
    parse_shard(args.shard)  # checked now; main parses it again
    if args.merge and args.shard:
        raise common.UsageError("--merge combines all shards; do not pass --shard with it")
    return args


def stage_inputs(run, args):
    """(the files this stage reads, the model directories among them): retraining a model it loads, or re-running
    02 for the API teacher's prompts, makes these profiles stale."""
    inputs = ["data/split.npz", "data/items.jsonl", "neighbors.npz", "item_text_emb.npy", prompts.PROMPT_FILE]
    if args.source == TEACHER and args.teacher == "api":
        api_teacher_args(run)  # fails early, with what to run, unless 02 used the API teacher
        inputs.append("distill.jsonl")
    models = [] if args.source == TEACHER else model_dirs(run, args.source)
    recorded = {o for s in common.read_manifest(run)["stages"].values() for o in s.get("outputs", {})}
    users = ["user_sets.json"] if (run / "user_sets.json").exists() and (
        args.probe_only or "user_sets.json" in recorded) else []  # the probe's eval users
    return inputs + models + users, models


def upstream_state(run, args, models):
    """What the rows are built from besides their prompt: a resumed row is reused only if both match."""
    return prompts.prompt_hash(json.dumps({
        "inputs": {r: common.sha256_path(run, r) for r in ["data/split.npz", "data/items.jsonl", "neighbors.npz"]
                   + models}, "source": args.source, "model": str(args.model),
        "decoding": [args.temperature, args.max_new_tokens, args.no_repeat_ngram, args.retries,
                     args.retry_temperature, args.retry_seed, args.distinct_terms],
        "code": {p.name: common.sha256_file(p) for p in common.stage_code("06_profile")}}, sort_keys=True))


def load_data(run, args):
    """The split, texts, neighbours, and the ids to profile: every user, warm items (with training users), the
    others; --probe-only: the eval users only; --limit: the first N of each."""
    d = argparse.Namespace(split=common.load_split(run), item_text_full=common.load_items(run),
                           nbrs=common.load_neighbors(run))
    d.n_users, d.n_items = d.split["n_users"], d.split["n_items"]
    d.item_text = [prompts.clip(t, args.prompt["inference"]["max_chars"]) for t in d.item_text_full]
    d.train = common.user_items(d.split["train_u"], d.split["train_i"], d.n_users)
    d.users_of = common.user_items(d.split["train_i"], d.split["train_u"], d.n_items)  # chronological per item
    sets_path = run / "user_sets.json"
    d.eval_users = json.loads(sets_path.read_text())["eval"] if sets_path.exists() else None
    d.user_ids = list(range(d.n_users))[:args.limit]
    d.warm = [i for i in range(d.n_items) if len(d.users_of[i])][:args.limit]
    d.other = [i for i in range(d.n_items) if not len(d.users_of[i])][:args.limit]
    if args.probe_only:
        if d.eval_users is None:
            raise common.StageError(f"--probe-only needs {sets_path} (run 02_distill.py)")
        d.user_ids, d.warm, d.other = sorted(d.eval_users)[:args.limit], [], []
    return d


def main(argv=None):
    args = parse_args(argv)
    run, teacher, started = args.run, args.source == TEACHER, time.time()
    out = run / "profiles" / args.source / ("probe_only" if args.probe_only else "")
    stage = f"06_{'probe' if args.probe_only else 'profile'}_{args.source}"
    common.setup_logging(run, stage)
    common.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    shard = parse_shard(args.shard)
    inputs, models = stage_inputs(run, args)
    common.check_inputs(run, inputs, args.force)
    args.prompt = prompts.prompt_settings(run)  # 02's sizes (recorded in the manifest with the other arguments)
    upstream = upstream_state(run, args, models)
    out.mkdir(parents=True, exist_ok=True)
    if args.restart:
        for p in list(out.glob("*.jsonl")) + list(out.glob("*.npy")):
            p.unlink()
    d = load_data(run, args)

    # 1. the profiles: the teacher's in one pass, or the LLM's phases (a shard or one phase stops after its own)
    info = {"teacher": {}, "seconds": {}, "redone": {}}
    if teacher:
        t = time.time()
        info["teacher"] = write_teacher_profiles(run, out, d, args)
        info["seconds"]["teacher_s"] = round(time.time() - t, 1)
    elif not args.merge:
        write_llm_profiles(run, out, d, args, upstream, shard, info["seconds"], info["redone"])
        if shard[1] > 1 or args.what != "all":
            log.info("phase(s) done in %.1fs; run --merge (or --what all) to combine and embed", time.time() - started)
            return None

    # 2. one file per kind, the embeddings and the probe
    result = collect_rows(out, d, teacher, upstream)
    probe, outputs = embed_and_probe(run, out, d, args, result, info)
    rel = out.relative_to(run)
    common.record_stage(run, stage, args, inputs, [f"{rel}/{o}" for o in outputs], started)
    return probe


if __name__ == "__main__":
    common.run_stage(main)
