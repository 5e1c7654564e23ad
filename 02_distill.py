"""02_distill — teacher profiles (knowledge-distillation data), disjoint user sets, reward-model pairs, and the
profile-quality probe of the teacher (docs/spec.md, sections 2, 4-7; paper 2.3.1, 2.4 and appendix 6.6).

Reads   data/split.npz, data/items.jsonl, neighbors.npz, item_text_emb.npy
Writes  distill.jsonl        {"user", "prompt", "profile", "teacher", "teacher_model", "attempts", "upstream"
                              [, "fallback_from"], "items" (the shown items), "n_items"}, one row per sampled user;
                              resumable: a row is redone when its prompt or upstream state changed (stats "redone")
        user_sets.json       {"sft", "reward", "ppo", "eval"}: a disjoint, seeded split of the distilled users
        reward_pairs.jsonl   {"user", "prompt" (prompts.inference_messages), "chosen", "rejected", "kind", "variant",
                              "set"}: one pair per negative kind for each user of the "reward" and "eval" sets,
                              but --train-substitutions substitution pairs per "reward" user
        prompt.json          the prompt sizes of every later stage, which has no flags for them: "teacher"
                             (--max-items, --max-chars; 03 trains on these) and "inference" (--pair-*; 05, 06)
        distill_probe.json   the probe of the teacher's profiles (eval users, validation items), diversity, pairs
        teacher_cache.jsonl  (--teacher api) answers by prompt hash, so a re-run makes no repeated requests
Teachers (--teacher; teachers.py): rules (default; a profile computed from the shown items, instant), local (an
instruct model, --teacher-model), api (an OpenAI-compatible endpoint; the key is read from the variable that
--api-key-env names).
Run     python 02_distill.py --run runs/ml100k                       # rules teacher, every training user
        python 02_distill.py --run runs/ml100k --teacher local --n-users 200
        OPENAI_API_KEY=... python 02_distill.py --run runs/ml100k --teacher api \\
            --api-base https://api.openai.com/v1 --api-model gpt-4o-mini --concurrency 8
"""
import collections
import functools
import json
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

import common
import llm
import prompts
import teachers

log = logging.getLogger("reclm.02")

# ----------------------------------------------------------------------------- defaults
# The paper's teacher is an API model (--teacher api); the offline default is rules: it beat the local SmolLM2
# teacher on the probe (distill_probe.json), which compares teachers on validation items only (never test items).
TEACHERS = {"rules": teachers.run_rules, "local": teachers.run_local, "api": teachers.run_api}
TEACHER = "rules"              # the offline default (above)
DEFAULT_N_USERS = {"rules": None, "local": 200, "api": 500}   # None = every user with training items
MIN_ITEMS = 1                  # sample users with at least this many training items
FRACTIONS = {"sft": 0.5, "reward": 0.2, "ppo": 0.15, "eval": 0.15}  # disjoint user sets of 03, 04, 05, held out
PAIRS_FOR = "reward,eval"      # the user sets that get reward pairs: 04 trains on one and scores the other
TRAIN_SUBSTITUTIONS = 1        # substitution pairs (other users' profiles) per reward-set user; one of each other kind
ON_FAIL = "rules"              # a user still malformed after RETRIES gets the rules profile, so every user has one
MAX_FALLBACK_SHARE = 0.2       # local/api teacher: more sampled users than this without its profile fail the stage:
                               # a teacher that mostly failed must not pass for one that answered (issue 29)
BATCH_SIZE = 16                # local teacher: prompts per generation batch
MAX_NEW_TOKENS = 100           # local teacher: the official code's; an answer ends at its first profile line
TEMPERATURE = 0.8              # local and api teachers: retries sample, so a malformed answer is not repeated
THREADS = 1                    # one torch thread per process: OpenMP threads spin on shared cores (docs/design.md)
API_BASE = "https://api.openai.com/v1"  # any OpenAI-compatible endpoint
API_KEY_ENV = "OPENAI_API_KEY"  # the *name* of the variable holding the key (never the key)
API_TIMEOUT = 60.0             # seconds per request
API_MAX_TRIES = 8              # tries per request (jittered backoff doubling from API_BACKOFF seconds, at most
API_BACKOFF = 1.0              # teachers.MAX_BACKOFF): about two minutes of waiting before a failing request gives up
API_RETRY_BUDGET = 900.0       # seconds all requests of a run may wait to retry, in all: an endpoint down for long
                               # stops the run instead of every request waiting out its own tries
CONCURRENCY = 8                # parallel API requests
# The teacher is shown what the student's prompts show (the inference prompt's target list, which the SFT prompts
# of 03 also show): a profile is then a function of its prompt's input. The reward queries must show at least this.
MAX_ITEMS = prompts.PROMPT_SIZES["max_items"]  # newest training items
MAX_CHARS = prompts.PROMPT_SIZES["max_chars"]  # item text cut, as the prompts cut it
RETRIES = 3
KINDS = ("substitution", "oversmoothing", "incomplete", "repeated", "empty", "junk")
# Users whose profiles a set's pairs may use as the substitution negative. The reward model trains on the "reward"
# pairs: never an eval user's profile (held out) nor a PPO user's (PPO optimises on users the reward model has not
# seen). Held-out pairs (other sets) may use any distilled user's: nothing of them is trained on.
PAIR_DONORS = {"reward": ("sft", "reward")}
GENERIC_PROFILE = ("User identity: casual viewer, general audience, curious viewer; "
                   "User interests: popular titles, new releases, classics")  # substitution without donors
UNRELATED = [  # the "junk" negative's unrelated texts
    "The weather today is sunny with a light breeze from the west.",
    "To reset your password, open the settings page and follow the instructions.",
    "Add two cups of flour and stir until the dough is smooth.",
    "The train to the airport leaves every fifteen minutes.",
    "Photosynthesis converts light energy into chemical energy.",
]


# ----------------------------------------------------------------------------- resume

class StampedRows:
    """distill.jsonl as the teachers append to it (common.append_jsonl writes one whole line at a time): every row
    also gets "upstream", the state it was built from, so that a resumed run reuses only rows of the same state."""

    def __init__(self, f, upstream):
        self.f, self.upstream, self.name = f, upstream, f.name

    def write(self, line):
        self.f.write(json.dumps({**json.loads(line), "upstream": self.upstream}, ensure_ascii=False) + "\n")

    def flush(self):
        self.f.flush()


def upstream_key(run, args):
    """What a distill row is built from besides its prompt: data/split.npz and data/items.jsonl (the rules
    teacher's catalogue statistics too) and the teacher with its model; for the rules teacher, this file (its rules:
    they are instant to rerun, and a changed rule must not leave old profiles in place): teachers.py."""
    rules = "rules " + common.sha256_file(Path(teachers.__file__))
    model = {"rules": rules, "local": args.teacher_model, "api": f"{args.api_base} {args.api_model}"}[args.teacher]
    files = {r: common.sha256_path(run, r) for r in ("data/split.npz", "data/items.jsonl")}
    return prompts.prompt_hash(json.dumps({"inputs": files, "teacher": args.teacher, "model": str(model)},
                                      sort_keys=True))


# ----------------------------------------------------------------------------- user sets, reward pairs

def make_user_sets(users, fractions, seed):
    users = np.array(sorted(users), dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(users)
    total = sum(fractions.values())
    names = list(fractions)
    cuts, acc = [], 0.0
    for name in names[:-1]:
        acc += fractions[name] / total
        cuts.append(int(round(acc * len(perm))))
    parts = np.split(perm, cuts)
    return {name: sorted(int(u) for u in part) for name, part in zip(names, parts)}


def split_profile(p):
    m = prompts.PROFILE_RE.search(p)
    return ([t.strip() for t in m.group("identity").split(",")], [t.strip() for t in m.group("interests").split(",")])


@functools.lru_cache(maxsize=None)
def terms_key(p):
    """A profile's terms as two sets, order and case ignored; None unless `p` is one well-formed profile. A negative
    with the chosen profile's key is the chosen profile reordered: no worse an answer, so not a negative."""
    p = prompts.parse_profile(p)
    if p is None:
        return None
    ident, interests = split_profile(p)
    return frozenset(t.lower() for t in ident), frozenset(t.lower() for t in interests)


def substitutes(u, profiles, donors, nbrs, rng, n=1):
    """Up to n [(another user's profile, variant)], each with terms that differ from u's and from each other's: u's
    first such neighbours among `donors`, then random such donors, else (none at all) a generic profile."""
    seen, out = {terms_key(profiles[u])}, []

    def take(v, how):
        if v == u or v not in donors or len(out) >= n:
            return  # donors are distilled users; a neighbour need not be one (--n-users samples some)
        key = terms_key(profiles[v])
        if key not in seen:
            seen.add(key)
            out.append((profiles[v], how))

    for v in nbrs[u]:
        take(int(v), "neighbour")
    if len(out) < n:
        pool = [v for v in sorted(donors) if v != u]
        for k in rng.permutation(len(pool)):
            take(pool[k], "random_user")
    return out or [(GENERIC_PROFILE, "generic")]


def negatives(u, profiles, donors, nbrs, item_text, rng, n_substitutions=1):
    """[(kind, rejected, variant)] for user u (docs/spec.md, section 5; paper appendix 6.6): one of each kind but up to
    n_substitutions substitutions (other users' profiles, from `donors`); over-smoothing uses the first."""
    own = profiles[u]
    subs = substitutes(u, profiles, donors, nbrs, rng, n_substitutions)
    other = subs[0][0]
    oi, on = split_profile(own)
    ni, nn = split_profile(other)
    out = {}
    mi = list(dict.fromkeys([oi[0], ni[0], ni[1], oi[1], ni[2]]))
    mn = list(dict.fromkeys([on[0], nn[0], nn[1], on[1], nn[2]]))
    merged = f"User identity: {', '.join(mi[:3])}; User interests: {', '.join(mn[:3])}"
    # a merge that keeps only u's own terms (the neighbour shares them) is u's profile reordered: concatenate then
    if rng.random() < 0.5 or terms_key(merged) == terms_key(own):
        out["oversmoothing"] = (own + " " + other, "concatenated")
    else:
        out["oversmoothing"] = (merged, "merged")
    out["incomplete"] = (f"User identity: {', '.join(oi)}", "identity_only")
    if rng.random() < 0.5:
        out["repeated"] = (f"User identity: {', '.join([oi[0]] * 3)}; User interests: {', '.join([on[0]] * 3)}",
                           "repeated_terms")
    else:
        out["repeated"] = (" ".join([own] * 3), "repeated_profile")
    out["empty"] = ("", "empty")
    if rng.random() < 0.5:
        words = [w for t in item_text[:200] for w in re.findall(r"[A-Za-z']+", t)]
        out["junk"] = (" ".join(rng.choice(words, size=12)) if words else "lorem ipsum dolor", "random_tokens")
    else:
        out["junk"] = (UNRELATED[int(rng.integers(len(UNRELATED)))], "unrelated_text")
    return [("substitution", r, how) for r, how in subs] + [(k, r, how) for k, (r, how) in out.items()]


def check_pair_sizes(args):
    """The reward queries must show every item and character the teacher saw: the chosen profile is then a function
    of its query (a reward model cannot tell a profile of hidden items from a neighbour's). 0 = no limit."""
    def size(name):
        return getattr(args, name) or math.inf
    short = [f"--pair-{k.replace('_', '-')} {getattr(args, 'pair_' + k)} < --{k.replace('_', '-')} {getattr(args, k)}"
             for k in ("max_items", "max_chars") if size("pair_" + k) < size(k)]
    if short:
        raise common.UsageError("the reward queries would hide what the teacher saw (" + "; ".join(short) + "): "
                                "raise the --pair-* sizes or lower the teacher's")


def pair_donors(set_name, sets, profiles):
    """The users whose profiles `set_name`'s pairs may substitute (PAIR_DONORS)."""
    allowed = PAIR_DONORS.get(set_name)
    if allowed is None:
        return set(profiles)
    return {int(v) for s in allowed for v in sets.get(s, []) if int(v) in profiles}


def build_pairs(sets, profiles, train, nbrs, item_text, seed, for_sets=("reward", "eval"), sizes=None,
                train_substitutions=1):
    """(rows, counts): a pair of every kind (KINDS) for every user of `for_sets`, with train_substitutions
    substitution pairs per user of the "reward" set (held-out sets: one, so their accuracies stay comparable
    across settings). A rejected answer with the chosen
    profile's terms is dropped; counts[set] holds the pairs per kind, the dropped ones ("same_terms_<kind>") and
    the substitution variants ("substitution_<variant>"). The default sets are "reward" (to train 04) and "eval"
    (04's held-out accuracy), not "ppo": the reward model then never saw the teacher profiles of the users PPO
    optimises on."""
    rows, counts = [], {}
    for set_name in for_sets:
        rng = np.random.default_rng([seed + 1, *set_name.encode()])  # a set's pairs do not depend on the others'
        donors = pair_donors(set_name, sets, profiles)
        c = counts[set_name] = collections.Counter()
        for u in sets[set_name]:
            prompt = prompts.user_prompt(u, train, nbrs, item_text, **(sizes or {}))
            n_sub = train_substitutions if set_name == "reward" else 1
            for kind, rejected, variant in negatives(u, profiles, donors, nbrs, item_text, rng, n_sub):
                if terms_key(rejected) is not None and terms_key(rejected) == terms_key(profiles[u]):
                    c["same_terms_" + kind] += 1
                    continue
                rows.append({"user": int(u), "prompt": prompt, "chosen": profiles[u], "rejected": rejected,
                             "kind": kind, "variant": variant, "set": set_name})
                c[kind] += 1
                if kind == "substitution":
                    c["substitution_" + variant] += 1
        counts[set_name] = dict(sorted(c.items()))
    return rows, counts


# ----------------------------------------------------------------------------- probe of the teacher

def most_common(counter):
    """(key, count) of the highest count, ties to the smallest key (Counter.most_common ties by insertion order);
    (None, 0) when empty."""
    return min(counter.items(), key=lambda kv: (-kv[1], kv[0]), default=(None, 0))


def profile_diversity(profiles):
    """How far a set of profiles tells users apart (docs/spec.md, section 7): distinct profiles, the share of the most
    common identity part (its three terms, in any order) and of the most common identity term, distinct interest
    triples (in any order). Unparseable profiles are counted and left out."""
    parts = [m for m in (prompts.PROFILE_RE.search(p or "") for p in profiles) if m]
    terms = [[[t.strip().lower() for t in m.group(k).split(",")] for k in ("identity", "interests")] for m in parts]
    n = len(terms)
    ident = most_common(collections.Counter(", ".join(sorted(set(i))) for i, _ in terms))
    term = most_common(collections.Counter(t for i, _ in terms for t in set(i)))
    return {"n": n, "malformed": len(profiles) - n,
            "distinct_profiles": len({(frozenset(i), frozenset(x)) for i, x in terms}),
            "top_identity": ident[0], "top_identity_share": ident[1] / n if n else float("nan"),
            "top_identity_term": term[0], "top_identity_term_share": term[1] / n if n else float("nan"),
            "distinct_interest_triples": len({frozenset(x) for _, x in terms})}


def teacher_probe(run, split, profiles, users, item_text, encoder, device):
    users = [u for u in users if u in profiles]
    emb = common.encode_texts([profiles[u] for u in users], encoder, device=device, desc="encode teacher profiles")
    item_emb, src = llm.item_embeddings_for_probe(run, item_text, emb.shape[1], encoder, device)
    return {**llm.profile_probe(split, users, emb, item_emb), "item_embeddings": src}


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = common.stage_parser(__doc__)
    p.add_argument("--teacher", default=TEACHER, choices=TEACHERS, help="who writes the profiles (see above)")
    p.add_argument("--n-users", type=common.positive_int, default=None,
                   help="users to distil (default: all for rules, %d for local, %d for api)"
                        % (DEFAULT_N_USERS["local"], DEFAULT_N_USERS["api"]))
    p.add_argument("--min-items", type=common.positive_int, default=MIN_ITEMS,
                   help="sample only users with this many training items")
    p.add_argument("--retries", type=common.non_negative_int, default=RETRIES, help="re-asks for malformed answers")
    p.add_argument("--on-fail", default=ON_FAIL, choices=["rules", "skip"],
                   help="users still malformed after the retries: rules profile or no row")
    p.add_argument("--max-fallback-share", type=common.share, default=MAX_FALLBACK_SHARE,
                   help="local/api teacher: fail when a larger share of the sampled users has no profile from it "
                        "(rules fallback or left out)")
    p.add_argument("--max-items", type=common.non_negative_int, default=MAX_ITEMS,
                   help="newest items shown to the teacher, whose profile depends on these only; the reward queries "
                        "(--pair-max-items) must show at least as many (default: %(default)s, the inference prompt's)")
    p.add_argument("--max-chars", type=common.non_negative_int, default=MAX_CHARS,
                   help="item text cut, as the prompts cut it")
    p.add_argument("--chat-template", default=None, help="local teacher: " + llm.TEMPLATE_HELP)
    p.add_argument("--teacher-model", default=llm.DEFAULT_LLM,
                   help="local teacher: local path or hub id (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=common.non_negative_int, default=THREADS,
                   help="torch CPU threads; 0 = torch's choice")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="local teacher dtype; auto, as in 06: bf16 where the hardware has it")
    p.add_argument("--batch-size", type=common.positive_int, default=BATCH_SIZE,
                   help="local teacher: prompts per generation batch")
    p.add_argument("--max-new-tokens", type=common.positive_int, default=MAX_NEW_TOKENS,
                   help="local teacher: tokens per profile")
    p.add_argument("--temperature", type=common.non_negative_float, default=TEMPERATURE,
                   help="sampling temperature of the retries (the first answer is greedy)")
    p.add_argument("--api-base", default=API_BASE, help="OpenAI-compatible endpoint")
    p.add_argument("--api-model", default=None, help="e.g. gpt-4o-mini")
    p.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable holding the key")
    p.add_argument("--api-timeout", type=common.positive_float, default=API_TIMEOUT,
                   help="seconds per request, its whole answer included")
    p.add_argument("--api-max-tries", type=common.positive_int, default=API_MAX_TRIES, help="tries per request")
    p.add_argument("--api-retry-budget", type=common.non_negative_float, default=API_RETRY_BUDGET,
                   help="seconds all requests may wait to retry, in all, before the run stops")
    p.add_argument("--api-backoff", type=common.non_negative_float, default=API_BACKOFF,
                   help="first backoff in seconds, doubled each try")
    p.add_argument("--concurrency", type=common.positive_int, default=CONCURRENCY, help="parallel api requests")
    for name, frac in FRACTIONS.items():
        p.add_argument(f"--{name}-frac", type=common.share, default=frac, help=f"share of users in the {name} set")
    p.add_argument("--pairs-for", default=PAIRS_FOR, help="user sets that get reward pairs")
    p.add_argument("--train-substitutions", type=common.positive_int, default=TRAIN_SUBSTITUTIONS,
                   help="substitution pairs per reward-set user (the held-out sets get one)")
    for name, val in prompts.PROMPT_SIZES.items():  # the inference prompt's sizes, as 05 and 06 show it
        p.add_argument("--pair-" + name.replace("_", "-"), type=common.non_negative_int, default=val,
                       help="reward-pair prompts (prompts.user_prompt): " + name)
    p.add_argument("--encoder", default=None, help="text encoder for the probe (default: the shipped MiniLM)")
    p.add_argument("--no-probe", action="store_true", help="skip the profile-quality probe")
    p.add_argument("--restart", action="store_true", help="delete distill.jsonl (not the api cache) first")
    args = p.parse_args(argv)
    if args.teacher == "api":
        teachers.api_key(args.api_key_env)  # no key (or a key given in place of its variable's name): refuse now
        if not args.api_model:
            raise common.UsageError("--teacher api needs --api-model")
    check_pair_sizes(args)
    if args.n_users is None:  # recorded resolved, so that 06 --source teacher draws the same sample
        args.n_users = DEFAULT_N_USERS[args.teacher]
    return args


def distil(run, args, train, item_text, rules):
    """{user: distill row} of every sampled user: rows of an earlier run are reused when built from the same
    upstream state and prompt (a new split, other item texts or another teacher model redo them), the other sampled
    users are profiled by the teacher, appended as they go. Also returns the teacher's counts."""
    sample_set, example = teachers.sample_and_example(train, rules, args)
    path = run / "distill.jsonl"
    if args.restart and path.exists():
        path.unlink()
    rows = common.read_jsonl(path, repair=True)
    used = {r.get("fallback_from", r["teacher"]) for r in rows}
    if rows and used != {args.teacher}:
        raise common.StageError(f"{path} holds profiles from teacher(s) {sorted(used)}, not {args.teacher!r}; "
                                "pass --restart to start over")
    upstream = upstream_key(run, args)
    keep = [r for r in rows if r.get("upstream") == upstream and 0 <= int(r["user"]) < len(train) and r["prompt"] ==
            prompts.teacher_messages(train[int(r["user"])], item_text, example, args.max_items, args.max_chars)
            and reusable(r)]
    if len(keep) < len(rows):
        common.write_jsonl(path, keep)
    done = {int(r["user"]) for r in keep}
    todo = [int(u) for u in sorted(sample_set) if int(u) not in done]
    n_redo = len(({int(r["user"]) for r in rows} - done) & sample_set)
    log.info("teacher %s: %d users sampled, %d already done, %d to do (%d of them redone: built from another prompt "
             "or upstream state)", args.teacher, len(sample_set), len(sample_set) - len(todo), len(todo), n_redo)
    stats = collections.Counter(written=0, failed=0, malformed_answers=0, retries=0, retried_ok=0, redone=n_redo)
    t0 = time.time()
    with common.open_append(path) as f:
        TEACHERS[args.teacher](todo, train, item_text, rules, example, args, StampedRows(f, upstream), stats)
    stats["teacher_s"] = round(time.time() - t0, 1)
    final = {}  # one row per user, sorted
    for r in common.read_jsonl(path, repair=True):
        final.setdefault(int(r["user"]), r)
    for u, r in final.items():  # what the profile is a function of: 03 shows these, and the test checks it
        r.update(items=rules.shown(train[u]), n_items=len(train[u]))
    common.write_jsonl(path, [final[u] for u in sorted(final)])
    log.info("distill.jsonl: %d users (%d written now; %d malformed answers, %d retried, %d still failed -> %s)",
             len(final), stats["written"], stats["malformed_answers"], stats["retries"], stats["failed"], args.on_fail)
    check_fallbacks(final, sample_set, args, stats)
    return final, stats


def reusable(row):
    """A resumed row is kept unless it is a fallback (the teacher is asked again) or a teacher's profile that
    prompts.teacher_profile now refuses (non-profile content)."""
    if row.get("fallback_from"):
        return False
    return row["teacher"] == "rules" or prompts.teacher_profile(row["profile"]) == row["profile"]


def check_fallbacks(final, sample_set, args, stats):
    """Fail (StageError, the stage is not recorded) when more than --max-fallback-share of the sampled users have no
    profile from the local or api teacher: their rows stay in distill.jsonl and a re-run asks the teacher again."""
    if args.teacher == "rules" or not sample_set:
        return
    n_own = sum(1 for u in sample_set if u in final and final[u]["teacher"] == args.teacher)
    share = 1 - n_own / len(sample_set)
    stats["fallback_share"] = round(share, 4)
    if share > args.max_fallback_share:
        raise common.StageError(
            f"{len(sample_set) - n_own} of {len(sample_set)} sampled users ({100 * share:.1f}%) have no profile from "
            f"the {args.teacher} teacher (malformed or refused answers, --on-fail {args.on_fail}), more than "
            f"--max-fallback-share {args.max_fallback_share}: check the teacher; a re-run asks it again for them")


def log_diversity(d):
    log.info("teacher diversity (%d users): %d distinct profiles, most common identity %.1f%% (%s), most common "
             "identity term %.1f%% (%s), %d distinct interest triples", d["n"], d["distinct_profiles"],
             100 * d["top_identity_share"], d["top_identity"], 100 * d["top_identity_term_share"],
             d["top_identity_term"], d["distinct_interest_triples"])


def probe_teacher(run, args, split, train, item_text, rules, profiles, eval_users, extra):
    """distill_probe.json: the probe of the teacher's profiles of the eval users, `extra` (counts), and for another
    teacher the probe of the rules profiles of the same users."""
    probe = {"teacher": args.teacher, "teacher_model": args.teacher_model if args.teacher == "local" else
             (args.api_model if args.teacher == "api" else "rules"),
             "eval_users": teacher_probe(run, split, profiles, eval_users, item_text, args.encoder, args.device),
             **extra}
    if args.teacher != "rules":
        rp = {u: rules.profile(train[u]) for u in eval_users}
        probe["rules_same_users"] = teacher_probe(run, split, rp, eval_users, item_text, args.encoder, args.device)
    e, k = probe["eval_users"], llm.PROBE_K
    log.info("probe (%d eval users): teacher %s Recall@%d = %.4f (history centroid %.4f, random %.4f)",
             e["n_users"], args.teacher, k, e[f"recall@{k}"], e[f"centroid_recall@{k}"], e[f"random_recall@{k}"])
    return probe


def main(argv=None):
    args = parse_args(argv)
    run, started = args.run, time.time()
    common.setup_logging(run, "02_distill")
    common.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = ["data/split.npz", "data/items.jsonl", "neighbors.npz", "item_text_emb.npy"]
    common.check_inputs(run, inputs, args.force)
    split = common.load_split(run)
    item_text = common.load_items(run)
    nbrs = common.load_neighbors(run)["user_nbrs"]
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    rules = teachers.RulesTeacher(item_text, train, args.max_items, args.max_chars)

    # 1. the teacher's profiles
    final, stats = distil(run, args, train, item_text, rules)
    profiles = {u: r["profile"] for u, r in final.items()}

    # 2. disjoint user sets, and reward pairs for some of them
    sets = make_user_sets(list(profiles), {k: getattr(args, f"{k}_frac") for k in FRACTIONS}, args.seed)
    common.write_json(run / "user_sets.json", sets)
    pair_sets = tuple(s for s in args.pairs_for.split(",") if s)
    pairs, pair_counts = build_pairs(sets, profiles, train, nbrs, item_text, args.seed, pair_sets,
                                     {k: getattr(args, "pair_" + k) for k in prompts.PROMPT_SIZES},
                                     args.train_substitutions)
    common.write_jsonl(run / "reward_pairs.jsonl", pairs)
    log.info("user sets: %s; reward pairs: %d (%s users)", {k: len(v) for k, v in sets.items()}, len(pairs),
             "+".join(pair_sets))
    for name, c in pair_counts.items():
        log.info("reward pairs of the %s set: %s", name, json.dumps(c))
    diversity = {"all_users": profile_diversity(list(profiles.values())),
                 "eval_users": profile_diversity([profiles[u] for u in sets["eval"]])}
    log_diversity(diversity["all_users"])

    # 3. the prompt sizes every later stage shows: 03 trains on the teacher's, 05 and 06 answer the inference prompt's
    common.write_json(run / prompts.PROMPT_FILE, {
        "teacher": {"max_items": args.max_items, "max_chars": args.max_chars},
        "inference": {k: getattr(args, "pair_" + k) for k in prompts.PROMPT_SIZES},
        "inference_format": prompts.INFERENCE_FORMAT})
    outputs = ["distill.jsonl", "user_sets.json", "reward_pairs.jsonl", prompts.PROMPT_FILE]

    # 4. the probe of the teacher (validation items of the eval users)
    probe = None
    if not args.no_probe:
        probe = probe_teacher(run, args, split, train, item_text, rules, profiles, sets["eval"] or sorted(profiles),
                              {"stats": dict(stats), "diversity": diversity, "reward_pairs": pair_counts})
        common.write_json(run / "distill_probe.json", probe)
        outputs.append("distill_probe.json")
    if (run / "teacher_cache.jsonl").exists():
        outputs.append("teacher_cache.jsonl")
    common.record_stage(run, "02_distill", args, inputs, outputs, started)
    return {"rows": len(final), "stats": dict(stats), "sets": {k: len(v) for k, v in sets.items()},
            "pairs": len(pairs), "pair_counts": pair_counts, "diversity": diversity, "probe": probe}


if __name__ == "__main__":
    common.run_stage(main)
