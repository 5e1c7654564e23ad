"""02_distill — teacher profiles (knowledge-distillation data), disjoint user sets, reward-model pairs, and the
profile-quality probe of the teacher (SPEC sections 2, 4, 5, 6, 7; paper 2.3.1, 2.4 and appendix 6.6).

Reads   data/split.npz, data/items.jsonl, neighbors.npz, item_text_emb.npy
Writes  distill.jsonl        {"user", "prompt", "profile", "teacher", "teacher_model", "attempts", "upstream"
                              [, "fallback_from"], "items" (the shown items), "n_items"}, one row per sampled user;
                              resumable: a row is redone when its prompt or upstream state changed (stats "redone")
        user_sets.json       {"sft", "reward", "ppo", "eval"}: a disjoint, seeded split of the distilled users
        reward_pairs.jsonl   {"user", "prompt" (llm.inference_messages), "chosen", "rejected", "kind", "variant",
                              "set"}: one pair per negative kind for each user of the "reward" and "eval" sets,
                              but --train-substitutions substitution pairs per "reward" user
        prompt.json          the prompt sizes of every later stage, which has no flags for them: "teacher"
                             (--max-items, --max-chars; 03 trains on these) and "inference" (--pair-*; 05, 06)
        distill_probe.json   the probe of the teacher's profiles (eval users, validation items), diversity, pairs
        teacher_cache.jsonl  (--teacher api) answers by prompt hash, so a re-run makes no repeated requests
Teachers (--teacher): rules (default; a profile computed from the shown items, instant), local (an instruct model,
--teacher-model), api (an OpenAI-compatible endpoint; the key is read from the variable that --api-key-env names).
Run     python 02_distill.py --run runs/ml100k                       # rules teacher, every training user
        python 02_distill.py --run runs/ml100k --teacher local --n-users 200
        OPENAI_API_KEY=... python 02_distill.py --run runs/ml100k --teacher api \\
            --api-base https://api.openai.com/v1 --api-model gpt-4o-mini --concurrency 8
"""
import collections
import concurrent.futures as cf
import functools
import hashlib
import http.client
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

import common
import llm

log = logging.getLogger("reclm.02")

# ----------------------------------------------------------------------------- defaults
# The paper's teacher is an API model (--teacher api); the offline default is rules: it beat the local SmolLM2
# teacher on the probe (distill_probe.json), which compares teachers on validation items only (never test items).
TEACHERS = ("rules", "local", "api")
TEACHER = "rules"              # the offline default (above)
DEFAULT_N_USERS = {"rules": None, "local": 200, "api": 500}   # None = every user with training items
MIN_ITEMS = 1                  # sample users with at least this many training items
FRACTIONS = {"sft": 0.5, "reward": 0.2, "ppo": 0.15, "eval": 0.15}  # disjoint user sets of 03, 04, 05, held out
PAIRS_FOR = "reward,eval"      # the user sets that get reward pairs: 04 trains on one and scores the other
TRAIN_SUBSTITUTIONS = 1        # substitution pairs (other users' profiles) per reward-set user; one of each other kind
ON_FAIL = "rules"              # a user still malformed after RETRIES gets the rules profile, so every user has one
BATCH_SIZE = 16                # local teacher: prompts per generation batch
MAX_NEW_TOKENS = 48            # local teacher: a 3+3 profile is ~25-30 SmolLM2 tokens
TEMPERATURE = 0.8              # local and api teachers: retries sample, so a malformed answer is not repeated
THREADS = 1                    # one torch thread per process: OpenMP threads spin on shared cores (see 06)
API_BASE = "https://api.openai.com/v1"  # any OpenAI-compatible endpoint
API_KEY_ENV = "OPENAI_API_KEY" # the *name* of the variable holding the key (never the key)
API_TIMEOUT = 60.0             # seconds per request
API_MAX_TRIES = 6              # tries per request (backoff doubling from API_BACKOFF seconds)
API_BACKOFF = 1.0
CONCURRENCY = 8                # parallel API requests
# The teacher is shown what the student's prompts show (the inference prompt's target list, which the SFT prompts
# of 03 also show): a profile is then a function of its prompt's input. The reward queries must show at least this.
MAX_ITEMS = llm.PROMPT_SIZES["max_items"]  # newest training items
MAX_CHARS = llm.PROMPT_SIZES["max_chars"]  # item text cut, as the prompts cut it
RETRIES = 3
KINDS = ("substitution", "oversmoothing", "incomplete", "repeated", "empty", "junk")
# Users whose profiles a set's pairs may use as the substitution negative. The reward model trains on the "reward"
# pairs: never an eval user's profile (held out) nor a PPO user's (PPO optimises on users the reward model has not
# seen). Held-out pairs (other sets) may use any distilled user's: nothing of them is trained on.
PAIR_DONORS = {"reward": ("sft", "reward")}
GENERIC_PROFILE = ("User identity: casual viewer, general audience, curious viewer; "
                   "User interests: popular titles, new releases, classics")  # substitution without donors

# ----------------------------------------------------------------------------- teacher prompt
TEACHER_SYSTEM = (
    "You are an expert at understanding people from what they watch, read or buy. Given a user's items, "
    "describe the user in exactly this form and nothing else:\n"
    "User identity: A, B, C; User interests: X, Y, Z\n"
    "Identities say who the user probably is (age group, life stage, kind of viewer or reader); interests name "
    "genres, topics or themes the items share. Exactly three of each, 1-4 words each, no commas inside a term, "
    "no explanation.")
TEACHER_USER = "The user's items, oldest to newest{dropped}:\n{items}\n\nWrite this user's profile."
UNRELATED = [
    "The weather today is sunny with a light breeze from the west.",
    "To reset your password, open the settings page and follow the instructions.",
    "Add two cups of flour and stir until the dough is smooth.",
    "The train to the airport leaves every fifteen minutes.",
    "Photosynthesis converts light energy into chemical energy.",
]

# ----------------------------------------------------------------------------- rules teacher
# 06 (--source teacher, the upper bound of distillation) writes every user's and item's profile with this teacher:
# it reuses RulesTeacher, sample_and_example and run_api.
# The teacher sees exactly what the prompts that carry its profile show (SPEC section 5): the newest MAX_ITEMS
# training items, each item's text cut at MAX_CHARS as the prompts cut it (a genre cut to a prefix that only one
# catalogue genre has, "Thr…", still reads as Thriller; a genre cut away is not seen), and the history's length
# (the prompts say how many older items they leave out). A target the student cannot see is a target it cannot
# learn: it learns the population's modal profile instead. Neighbours' items never enter a user's profile: the KD
# prompt shows none, and one profile per user then serves the KD, two-turn and inference prompts alike, and stays
# apart from the substitution negative (the neighbour's own profile).
# Terms are chosen by smoothed lift against the population of shown items (every user's newest MAX_ITEMS), so
# that a profile says what sets the user apart: Drama, in most ml-100k windows, names only users who watch more of
# it than most, and a decade names only users whose items lean to it (not "90s film fan" for everyone).

STOP = set("""a an the of and or in on at to for with from by is are was be as it its this that these those his her
their our your my me you he she they we i not no new one two three part ii iii iv vs de la le les el los das der die
und about after into over under out up down how what when who why where which all more most than then there here
just like own movie film story""".split())
PRIOR_ITEMS = 3.0   # pseudo-items of the population's mix pooled with the shown items: one item of a rare genre
                    # cannot outweigh a genre that fills the window, and a lift needs more than one item to be large
MIN_LIFT = 1.5      # smoothed lift a genre, keyword or decade needs to describe the user (below it: the population)
KW_WEIGHT = 0.5     # title keywords rank below genres of the same score (they name a franchise, not a taste)
CLASSIC_BEFORE = 1960
PERSONA = {  # over-represented genre (lower case) -> identity; others: "<genre> enthusiast" ("<category> follower")
    "action": "action junkie", "adventure": "adventure seeker", "animation": "animation lover",
    "children's": "family viewer", "comedy": "comedy lover", "crime": "crime story buff",
    "documentary": "documentary watcher", "drama": "drama lover", "fantasy": "fantasy fan",
    "film-noir": "film noir aficionado", "horror": "horror buff", "musical": "musical lover",
    "mystery": "mystery solver", "romance": "romantic", "sci-fi": "science fiction geek",
    "thriller": "suspense seeker", "war": "history and war buff", "western": "western fan",
}
INTEREST_FILL = ("popular titles", "new releases", "classics")
IDENTITY_FILL = ("curious {noun}", "general audience")


def parse_item(text):
    """(title, year or None, [genres/categories]) from a rendered item text of any dataset."""
    genres = []
    m = re.search(r"Genres?:\s*([^.]+)", text)
    if m:
        genres = [g.strip() for g in m.group(1).split(",") if g.strip() and g.strip().lower() != "unknown"]
        text = text[:m.start()]
    m = re.match(r"\s*([^/:]{1,40}) / ([^:]{1,40}):\s*(.*)", text)  # MIND: "category / subcategory: title. abstract"
    if m:
        genres = [m.group(1).strip(), m.group(2).strip()]
        text = m.group(3).split(". ")[0]
    year = None
    m = re.search(r"\((\d{4})\)", text)
    if m:
        year = int(m.group(1))
        text = text[:m.start()]
    return text.strip(" ."), year, genres


def visible_item(text, max_chars, vocab):
    """parse_item of the text as a prompt shows it (cut at max_chars; 0 = whole). A genre cut short ("Thr…") is
    read as the one catalogue genre (`vocab`: lower case -> name) it is a prefix of, else dropped."""
    title, year, genres = parse_item(llm.clip(text, max_chars) if max_chars else text)
    seen = []
    for g in genres:
        if g.endswith("…"):
            stem = g[:-1].strip().lower()
            full = [name for low, name in vocab.items() if stem and low.startswith(stem)]
            if len(full) != 1:
                continue
            g = full[0]
        seen.append(g)
    return title, year, seen


def clean_term(t):
    return re.sub(r"\s+", " ", re.sub(r"[,;:\n]", " ", t)).strip(" .'\"")


def distinct(terms):
    """The non-empty terms, the first of each case-insensitive spelling, in order (a profile's terms must differ
    in more than case: a title keyword "drama" and the genre "Drama" are one term)."""
    out = {}
    for t in terms:
        if t:
            out.setdefault(t.lower(), t)
    return list(out.values())


def shares(counter, total):
    return {k: v / max(total, 1) for k, v in counter.items()}


def lift_scores(counts, n, base):
    """{term: (score, lift)} of the terms counted in n shown items against their population shares `base`:
    smoothed rate r = (c + PRIOR_ITEMS·p) / (n + PRIOR_ITEMS), lift = r / p, score = r·log(lift) (the term's part
    of the KL divergence of the user's mix from the population's: frequent and over-represented terms first)."""
    out = {}
    for k, c in counts.items():
        p = max(base.get(k, 0.0), 1e-3)
        r = (c + PRIOR_ITEMS * p) / (n + PRIOR_ITEMS)
        out[k] = (r * math.log(r / p), r / p)
    return out


class RulesTeacher:
    """A profile from what a prompt shows of a user (see above). Interests: the genres/categories (and title
    keywords met twice) of the shown items by smoothed lift. Identities: personas of the most over-represented
    genres, a decade the items lean to, activity (history length) and breadth (genre entropy) where they sit in
    the population's outer thirds. Deterministic, instant."""

    def __init__(self, item_text, train, max_items=MAX_ITEMS, max_chars=MAX_CHARS):
        self.max_items = max_items
        self.news = any(re.match(r"\s*[^/:]{1,40} / [^:]{1,40}:", t) for t in item_text[:50])
        self.noun = "reader" if self.news else "viewer"
        vocab = {g.lower(): g for t in item_text for g in parse_item(t)[2]}  # catalogue genres, for cut ones
        self.items = [visible_item(t, max_chars, vocab) for t in item_text]
        windows = [self.shown(x) for x in train if len(x)]
        n_shown = sum(len(w) for w in windows)
        g, kw = collections.Counter(), collections.Counter()
        for w in windows:
            g.update(self.genre_counts(w))
            kw.update(self.keyword_counts(w))
        self.g_base, self.kw_base = shares(g, n_shown), shares(kw, n_shown)
        dated = [self.items[i][1] for w in windows for i in w if self.items[i][1]]
        self.era_base = shares(collections.Counter(y // 10 * 10 for y in dated), len(dated))
        lens = [len(x) for x in train if len(x)]
        self.q_lo, self.q_hi = (np.quantile(lens, [1 / 3, 2 / 3]) if lens else (5, 20))
        breadth = [self.breadth(w) for w in windows]
        self.b_lo, self.b_hi = (np.quantile(breadth, [1 / 3, 2 / 3]) if breadth else (1.0, 3.0))

    def shown(self, items):
        return [int(i) for i in llm.shown_items(items, self.max_items)]

    def genre_counts(self, shown):
        """{genre (lower case): number of shown items with it}."""
        return collections.Counter(g for i in shown for g in {x.lower() for x in self.items[i][2]})

    def keyword_counts(self, shown):
        return collections.Counter(w for i in shown for w in set(self.words(self.items[i][0])))

    def breadth(self, shown):
        """Effective number of genres (exp of the entropy of the shown items' genre mix)."""
        p = np.array(list(self.genre_counts(shown).values()), dtype=float)
        return float(np.exp(-(p / p.sum() * np.log(p / p.sum())).sum())) if len(p) else 0.0

    @staticmethod
    def words(title):
        return [w for w in re.findall(r"[a-z][a-z'\-]{3,}", title.lower()) if w not in STOP]

    def names(self, shown):
        """{genre (lower case): its name as the items write it}."""
        return {g.lower(): clean_term(g) for i in shown for g in self.items[i][2]}

    def ranked_genres(self, shown):
        """[(genre, score, lift)] of the shown items' genres, highest score first."""
        scores = lift_scores(self.genre_counts(shown), len(shown), self.g_base)
        return sorted(((g, s, l) for g, (s, l) in scores.items()), key=lambda t: (-t[1], t[0]))

    def interests(self, shown, ranked):
        """Over-represented genres and twice-met title keywords by score, then the other shown genres, then
        fillers (a window of one genre)."""
        names = self.names(shown)
        kws = self.keyword_counts(shown)
        kw_scores = lift_scores({k: c for k, c in kws.items() if c >= 2}, len(shown), self.kw_base)
        cands = [(s, names[g]) for g, s, l in ranked if l >= MIN_LIFT]
        cands += [(KW_WEIGHT * s, w) for w, (s, l) in kw_scores.items() if l >= MIN_LIFT]
        out = [t for _, t in sorted(cands, key=lambda c: (-c[0], c[1]))]
        out += [names[g] for g, _, l in ranked if l < MIN_LIFT] + list(INTEREST_FILL)
        return distinct(out)

    def era(self, shown):
        """The decade the shown items lean to (by smoothed lift), as an identity, or None."""
        years = [self.items[i][1] for i in shown if self.items[i][1]]
        scores = lift_scores(collections.Counter(y // 10 * 10 for y in years), len(years), self.era_base)
        best = sorted(((s, d) for d, (s, l) in scores.items() if l >= MIN_LIFT), reverse=True)
        if not best:
            return None
        d = best[0][1]
        return "classic film buff" if d < CLASSIC_BEFORE else f"{d % 100:02d}s film fan" if d < 2000 else \
            f"{d}s release fan"

    def persona(self, genre):
        if self.news:
            return f"{clean_term(genre)} follower"
        return PERSONA.get(genre, f"{clean_term(genre)} enthusiast")

    def identity(self, shown, n_total, ranked):
        """Personas of the two most over-represented genres, the era, activity and breadth where distinctive
        (outer thirds), then the middle third's activity and fillers; the first three distinct."""
        over = [self.persona(g) for g, _, l in ranked if l >= MIN_LIFT][:2]
        b = self.breadth(shown)
        act = f"heavy {self.noun}" if n_total >= self.q_hi else f"casual {self.noun}" if n_total <= self.q_lo \
            else None
        wide = f"eclectic {self.noun}" if b > self.b_hi else f"focused {self.noun}" if b < self.b_lo else None
        cands = over[:1] + [self.era(shown)] + over[1:] + [act, wide, act or f"regular {self.noun}"]
        cands += [t.format(noun=self.noun) for t in IDENTITY_FILL]
        return distinct(cands)[:3]

    def profile(self, items):
        """The profile of a history `items` (oldest to newest): a function of its shown items (the newest
        max_items, their texts cut at max_chars) and of its length only."""
        shown = self.shown(items)
        ranked = self.ranked_genres(shown)
        ident = self.identity(shown, len(items), ranked)
        prof = llm.parse_profile(f"User identity: {', '.join(ident)}; "
                                 f"User interests: {', '.join(self.interests(shown, ranked)[:3])}")
        assert prof, (ident, items)
        return prof


def teacher_messages(items, item_text, example, max_items=MAX_ITEMS, max_chars=MAX_CHARS):
    """System + worked example (another user's items and their rules profile) + this user's items. Every teacher is
    shown the same: the newest max_items items cut at max_chars and how many older ones are left out, so that a
    target is inferable from the student's prompt (SPEC section 5)."""
    def user_turn(its):
        text, dropped = llm.item_list(its, item_text, max_items, max_chars)
        return TEACHER_USER.format(dropped=f" ({dropped} older items not shown)" if dropped else "", items=text)
    ex_items, ex_profile = example
    return [{"role": "system", "content": TEACHER_SYSTEM},
            {"role": "user", "content": user_turn(ex_items)},
            {"role": "assistant", "content": ex_profile},
            {"role": "user", "content": user_turn(items)}]


def sample_and_example(train, rules, args):
    """(the users to distil, the worked example shown to the local and api teachers). The users: a seeded sample
    (--seed, --n-users) of those with --min-items training items. The example: a user outside the sample (if
    any) with a mid-length history and its rules profile; its whole history, so that the prompt shows the newest
    items and how many older ones it leaves out, all that the profile depends on. 06 (--source teacher --teacher
    api) calls this with 02's recorded arguments, so that it sends the API exactly the prompts 02 sends."""
    eligible = np.array([u for u in range(len(train)) if len(train[u]) >= args.min_items], dtype=np.int64)
    n = args.n_users if args.n_users is not None else DEFAULT_N_USERS[args.teacher]
    sample = np.random.default_rng(args.seed).permutation(eligible)[:n if n is not None else len(eligible)]
    sample_set = set(int(u) for u in sample)
    outside = [u for u in eligible if int(u) not in sample_set] or list(eligible)
    ex_user = int(sorted(outside, key=lambda u: (abs(len(train[u]) - 8), u))[0])
    return sample_set, (train[ex_user], rules.profile(train[ex_user]))


# ----------------------------------------------------------------------------- api teacher

class ApiError(common.StageError):
    """The API teacher cannot go on; the message never holds the key."""


class ApiCancelled(ApiError):
    """A request given up because another one hit an unrecoverable error."""


MAX_CONNECTION_FAILURES = 3  # connection failures in a row (over all requests) after which the endpoint is dead
KEY_ENV_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
REDACTED = "[redacted]"


def api_key(env_name):
    """The key from the environment variable named `env_name`. Refuses (without echoing it) a value that looks
    like a key rather than a variable name, and a variable that is unset or empty."""
    if not KEY_ENV_RE.match(env_name or ""):
        raise common.UsageError("--api-key-env takes the NAME of the environment variable that holds the key (e.g. "
                                "OPENAI_API_KEY: upper-case letters, digits and _), but the value given is not such a "
                                "name (it may be the key itself; it is not shown). export NAME=<key> and pass "
                                "--api-key-env NAME")
    key = os.environ.get(env_name, "").strip()
    if not key:
        state = "empty" if env_name in os.environ else "not set"
        raise common.UsageError(f"--teacher api: the environment variable {env_name} is {state}; export "
                                f"{env_name}=<your key> (or name another variable with --api-key-env)")
    return key


class ApiClient:
    """POST {base}/chat/completions with retries (429, 5xx, timeouts, connection errors) and a prompt-hash cache.
    An unrecoverable error (another 4xx, e.g. 401 or 404; MAX_CONNECTION_FAILURES connection failures in a row;
    a request out of tries) sets `abort`, so that every other request stops at once; `error` keeps the first one.
    Every message it logs or raises goes through redact(): the key, and any Bearer token, become [redacted]."""

    def __init__(self, base, model, key, cache_path, timeout=60.0, max_tries=6, backoff=1.0, max_tokens=80):
        self.url = base.rstrip("/") + "/chat/completions"
        self.model, self._key, self.timeout = model, key, timeout
        self.max_tries, self.backoff, self.max_tokens = max_tries, backoff, max_tokens
        self.cache_path = Path(cache_path)
        self.cache = {r["hash"]: r["answer"] for r in common.read_jsonl(self.cache_path, repair=True)}
        self.lock = threading.Lock()
        self.n_requests = self.n_retries = self.n_cached = 0
        self.n_failed_connections = 0  # in a row, over all threads
        self.abort, self.error = threading.Event(), None

    def redact(self, text):
        text = str(text)
        if self._key:
            text = text.replace(self._key, REDACTED)
        return re.sub(r"(?i)\b(bearer\s+)[^\s\"',;}]+", r"\1" + REDACTED, text)

    def fail(self, msg):
        """Raise the unrecoverable error `msg` (redacted) and stop every other request."""
        err = ApiError(self.redact(msg))
        with self.lock:
            if self.error is None:
                self.error = err
        self.abort.set()
        raise err

    def key_for(self, messages, temperature, attempt):
        blob = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "attempt": attempt, "max_tokens": self.max_tokens}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def complete(self, messages, temperature=0.0, attempt=0):
        h = self.key_for(messages, temperature, attempt)
        with self.lock:
            if h in self.cache:
                self.n_cached += 1
                return self.cache[h]
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        for t in range(self.max_tries):
            if self.abort.is_set():
                raise ApiCancelled("cancelled")
            wait = None
            try:
                with self.lock:
                    self.n_requests += 1
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                with self.lock:
                    self.n_failed_connections = 0
                data = json.loads(raw.decode())
                answer = data["choices"][0]["message"]["content"] or ""
                with self.lock:
                    self.cache[h] = answer
                    with open(self.cache_path, "a") as f:
                        common.append_jsonl(f, {"hash": h, "answer": answer})
                return answer
            except urllib.error.HTTPError as e:
                with self.lock:
                    self.n_failed_connections = 0  # the server answered
                if e.code not in (408, 429) and e.code < 500:
                    try:
                        detail = " ".join(e.read()[:300].decode(errors="replace").split())
                    except Exception:  # noqa: BLE001 - the body is only a detail of the message
                        detail = ""
                    self.fail(f"{self.url}: HTTP {e.code} {e.reason}" + (f" ({detail})" if detail else "")
                              + "; not retried" + (": check the key (--api-key-env)" if e.code in (401, 403) else
                                                   ": check --api-base and --api-model" if e.code == 404 else ""))
                why = f"HTTP {e.code}"
                ra = e.headers.get("Retry-After") if e.headers else None
                if ra:
                    try:
                        wait = min(float(ra), 60.0)
                    except ValueError:
                        pass
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as e:
                why = type(e).__name__ + (f" ({e.reason})" if hasattr(e, "reason") else "")
                with self.lock:
                    self.n_failed_connections += 1
                    n_failed = self.n_failed_connections
                if n_failed >= MAX_CONNECTION_FAILURES:
                    self.fail(f"{self.url}: {n_failed} connection failures in a row (last: {why}); is --api-base "
                              "right and the endpoint up?")
            except (KeyError, IndexError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
                why = f"unexpected response ({type(e).__name__})"
            if t == self.max_tries - 1:
                self.fail(f"{self.url}: gave up after {self.max_tries} tries (last: {why})")
            wait = wait if wait is not None else self.backoff * (2 ** t) * (1 + 0.25 * random.random())
            with self.lock:
                self.n_retries += 1
            log.warning("api: %s; retry %d/%d in %.2fs", self.redact(why), t + 1, self.max_tries - 1, wait)
            if self.abort.wait(wait):
                raise ApiCancelled("cancelled")


# ----------------------------------------------------------------------------- teachers -> rows

def run_rules(todo, train, item_text, rules, example, args, f, stats):
    from tqdm import tqdm
    for u in tqdm(todo, desc="rules teacher", unit="user"):
        common.append_jsonl(f, {"user": int(u), "prompt": teacher_messages(train[u], item_text, example,
                                                                           args.max_items, args.max_chars),
                                "profile": rules.profile(train[u]), "teacher": "rules", "teacher_model": "rules",
                                "attempts": 1})
        stats["written"] += 1


def finish_failed(u, prompt, train, rules, args, f, stats, attempts):
    stats["failed"] += 1
    if args.on_fail == "rules":
        common.append_jsonl(f, {"user": int(u), "prompt": prompt, "profile": rules.profile(train[u]),
                                "teacher": "rules", "teacher_model": "rules", "attempts": attempts,
                                "fallback_from": args.teacher})
        stats["written"] += 1


def run_local(todo, train, item_text, rules, example, args, f, stats):
    """The local teacher: an instruct model (--teacher-model) prompted with a worked example, batched greedy
    generation, then sampled retries (--retries, --temperature) of the answers that do not parse. Users still
    malformed after the retries get the rules profile ("teacher": "rules", "fallback_from": "local"; --on-fail skip
    leaves them out)."""
    model, tok = llm.load_llm(args.teacher_model, device=args.device)
    model = model.to(llm.pick_dtype(args.dtype, args.device)).eval()
    name = Path(llm.resolve_llm(args.teacher_model)).name
    chunk = args.batch_size * 4  # rows are appended after every chunk (resumable)
    for s in range(0, len(todo), chunk):
        users = todo[s:s + chunk]
        prompts = {u: teacher_messages(train[u], item_text, example, args.max_items, args.max_chars) for u in users}
        texts = {u: llm.render(tok, prompts[u]) for u in users}
        ok = (lambda a: llm.normalize_profile(a, 3) is not None)
        for idx, answers, attempts in llm.generate_batches(
                model, tok, [texts[u] for u in users], args.max_new_tokens, args.batch_size, desc="local teacher",
                accept=ok, retries=args.retries, retry_temperature=args.temperature, seed=args.seed):
            for k, answer, attempt in zip(idx, answers, attempts):
                u, prof = users[k], llm.normalize_profile(answer, 3)
                stats["malformed_answers"] += attempt + (prof is None)
                stats["retries"] += attempt
                if prof is None:
                    finish_failed(u, prompts[u], train, rules, args, f, stats, args.retries + 1)
                    continue
                common.append_jsonl(f, {"user": int(u), "prompt": prompts[u], "profile": prof, "teacher": "local",
                                        "teacher_model": name, "attempts": attempt + 1})
                stats["written"] += 1
                stats["retried_ok"] += attempt > 0


def run_api(todo, train, item_text, rules, example, args, f, stats):
    """The API teacher: --concurrency parallel requests through ApiClient (backoff on 429, 5xx, timeouts and
    connection errors, Retry-After honoured; answers cached by prompt hash in teacher_cache.jsonl; the key never
    logged), malformed answers retried at --temperature. It stops at the first unrecoverable error (another 4xx such
    as 401 or 404, MAX_CONNECTION_FAILURES connection failures in a row, a request out of tries) and cancels what is
    queued; a re-run resumes."""
    from tqdm import tqdm
    key = api_key(args.api_key_env)
    if not args.api_model:
        raise SystemExit("--teacher api needs --api-model")
    client = ApiClient(args.api_base, args.api_model, key, args.run / "teacher_cache.jsonl", args.api_timeout,
                       args.api_max_tries, args.api_backoff, args.max_new_tokens)

    def one(u):
        prompt = teacher_messages(train[u], item_text, example, args.max_items, args.max_chars)
        bad = 0
        for attempt in range(args.retries + 1):
            ans = client.complete(prompt, 0.0 if attempt == 0 else args.temperature, attempt)
            prof = llm.normalize_profile(ans, 3)
            if prof:
                return u, prompt, prof, attempt + 1, bad
            bad += 1
        return u, prompt, None, args.retries + 1, bad

    with cf.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = [pool.submit(one, u) for u in todo]
        try:
            for fut in tqdm(cf.as_completed(futures), total=len(futures), desc="api teacher", unit="user"):
                u, prompt, prof, attempts, bad = fut.result()
                write_api_row(u, prompt, prof, attempts, bad, train, rules, args, f, stats)
        except BaseException as e:  # stop everything at the first error (and on Ctrl-C): nothing queued is sent
            client.abort.set()
            n_cancelled = sum(fut.cancel() for fut in futures)
            err = client.error or e
            if isinstance(err, ApiError):
                raise ApiError(f"api teacher stopped: {client.redact(err)} ({stats['written']} users written this "
                               f"run, {n_cancelled} queued requests cancelled; a re-run resumes)") from None
            raise
    stats.update(api_requests=client.n_requests, api_retries=client.n_retries, api_cached=client.n_cached)
    log.info("api: %d requests, %d transport retries, %d answers from the cache", client.n_requests,
             client.n_retries, client.n_cached)


def write_api_row(u, prompt, prof, attempts, bad, train, rules, args, f, stats):
    stats["malformed_answers"] += bad
    stats["retries"] += min(bad, args.retries)
    if prof is None:
        finish_failed(u, prompt, train, rules, args, f, stats, attempts)
        return
    common.append_jsonl(f, {"user": int(u), "prompt": prompt, "profile": prof, "teacher": "api",
                            "teacher_model": args.api_model, "attempts": attempts})
    stats["written"] += 1
    stats["retried_ok"] += attempts > 1


# ----------------------------------------------------------------------------- resume

class StampedRows:
    """distill.jsonl as the teachers append to it (common.append_jsonl writes one whole line at a time): every row
    also gets "upstream", the state it was built from, so that a resumed run reuses only rows of the same state."""

    def __init__(self, f, upstream):
        self.f, self.upstream = f, upstream

    def write(self, line):
        self.f.write(json.dumps({**json.loads(line), "upstream": self.upstream}, ensure_ascii=False) + "\n")

    def flush(self):
        self.f.flush()


def upstream_key(run, args):
    """What a distill row is built from besides its prompt: data/split.npz and data/items.jsonl (the rules
    teacher's catalogue statistics too) and the teacher with its model; for the rules teacher, this file (its rules:
    they are instant to rerun, and a changed rule must not leave old profiles in place)."""
    rules = "rules " + common.sha256_file(Path(__file__))
    model = {"rules": rules, "local": args.teacher_model, "api": f"{args.api_base} {args.api_model}"}[args.teacher]
    files = {r: common.sha256_path(run, r) for r in ("data/split.npz", "data/items.jsonl")}
    return llm.prompt_hash(json.dumps({"inputs": files, "teacher": args.teacher, "model": str(model)},
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
    m = llm.PROFILE_RE.search(p)
    return ([t.strip() for t in m.group("identity").split(",")], [t.strip() for t in m.group("interests").split(",")])


@functools.lru_cache(maxsize=None)
def terms_key(p):
    """A profile's terms as two sets, order and case ignored; None unless `p` is one well-formed profile. A negative
    with the chosen profile's key is the chosen profile reordered: no worse an answer, so not a negative."""
    p = llm.parse_profile(p)
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
    """[(kind, rejected, variant)] for user u (SPEC section 5; paper appendix 6.6): one of each kind but up to
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
            prompt = llm.user_prompt(u, train, nbrs, item_text, **(sizes or {}))
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
    """How far a set of profiles tells users apart (SPEC section 7): distinct profiles, the share of the most common
    identity part (its three terms, in any order) and of the most common identity term, distinct interest triples
    (in any order). Unparseable profiles are counted and left out."""
    parts = [m for m in (llm.PROFILE_RE.search(p or "") for p in profiles) if m]
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

def build_parser():
    p = common.stage_parser(__doc__)
    p.add_argument("--teacher", default=TEACHER, choices=TEACHERS, help="who writes the profiles (see above)")
    p.add_argument("--n-users", type=int, default=None,
                   help="users to distil (default: all for rules, %d for local, %d for api)"
                        % (DEFAULT_N_USERS["local"], DEFAULT_N_USERS["api"]))
    p.add_argument("--min-items", type=int, default=MIN_ITEMS, help="sample only users with this many training items")
    p.add_argument("--retries", type=int, default=RETRIES, help="re-asks for malformed answers")
    p.add_argument("--on-fail", default=ON_FAIL, choices=["rules", "skip"],
                   help="users still malformed after the retries: rules profile or no row")
    p.add_argument("--max-items", type=int, default=MAX_ITEMS,
                   help="newest items shown to the teacher, whose profile depends on these only; the reward queries "
                        "(--pair-max-items) must show at least as many (default: %(default)s, the inference prompt's)")
    p.add_argument("--max-chars", type=int, default=MAX_CHARS, help="item text cut, as the prompts cut it")
    p.add_argument("--teacher-model", default=llm.DEFAULT_LLM,
                   help="local teacher: local path or hub id (default: the shipped SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads; 0 = torch's choice")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="local teacher dtype; auto, as in 06: bf16 where the hardware has it")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="local teacher: prompts per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="local teacher: tokens per profile")
    p.add_argument("--temperature", type=float, default=TEMPERATURE,
                   help="sampling temperature of the retries (the first answer is greedy)")
    p.add_argument("--api-base", default=API_BASE, help="OpenAI-compatible endpoint")
    p.add_argument("--api-model", default=None, help="e.g. gpt-4o-mini")
    p.add_argument("--api-key-env", default=API_KEY_ENV, help="environment variable holding the key")
    p.add_argument("--api-timeout", type=float, default=API_TIMEOUT, help="seconds per request")
    p.add_argument("--api-max-tries", type=int, default=API_MAX_TRIES, help="tries per request")
    p.add_argument("--api-backoff", type=float, default=API_BACKOFF, help="first backoff in seconds, doubled each try")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY, help="parallel api requests")
    for name, frac in FRACTIONS.items():
        p.add_argument(f"--{name}-frac", type=float, default=frac, help=f"share of users in the {name} set")
    p.add_argument("--pairs-for", default=PAIRS_FOR, help="user sets that get reward pairs")
    p.add_argument("--train-substitutions", type=int, default=TRAIN_SUBSTITUTIONS,
                   help="substitution pairs per reward-set user (the held-out sets get one)")
    for name, val in llm.PROMPT_SIZES.items():  # the inference prompt's sizes, as 05 and 06 show it
        p.add_argument("--pair-" + name.replace("_", "-"), type=int, default=val,
                       help="reward-pair prompts (llm.user_prompt): " + name)
    p.add_argument("--encoder", default=None, help="text encoder for the probe (default: the shipped MiniLM)")
    p.add_argument("--no-probe", action="store_true", help="skip the profile-quality probe")
    p.add_argument("--restart", action="store_true", help="delete distill.jsonl (not the api cache) first")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.teacher == "api":
        api_key(args.api_key_env)  # no key (or a key given in place of its variable's name): refuse before any work
    check_pair_sizes(args)
    if args.train_substitutions < 1:
        raise common.UsageError(f"--train-substitutions {args.train_substitutions}: at least 1 substitution pair "
                                "per reward-set user")
    run = args.run
    common.setup_logging(run, "02_distill")
    common.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    inputs = ["data/split.npz", "data/items.jsonl", "neighbors.npz", "item_text_emb.npy"]
    common.check_inputs(run, inputs, args.force)
    split = common.load_split(run)
    n_users = split["n_users"]
    item_text = common.load_items(run)
    nbrs = common.load_neighbors(run)["user_nbrs"]
    train = common.user_items(split["train_u"], split["train_i"], n_users)
    rules = RulesTeacher(item_text, train, args.max_items, args.max_chars)

    sample_set, example = sample_and_example(train, rules, args)

    path = run / "distill.jsonl"
    if args.restart and path.exists():
        path.unlink()
    rows = common.read_jsonl(path, repair=True)
    teachers = {r.get("fallback_from", r["teacher"]) for r in rows}
    if rows and teachers != {args.teacher}:
        raise SystemExit(f"{path} holds profiles from teacher(s) {sorted(teachers)}, not {args.teacher!r}; "
                         "pass --restart to start over")
    # a row is reused only if built from the same upstream state and prompt (a new split, other item texts or
    # another teacher model redo it); the others are dropped, and redone for the sampled users
    upstream = upstream_key(run, args)
    keep = [r for r in rows if r.get("upstream") == upstream and 0 <= int(r["user"]) < n_users and r["prompt"] ==
            teacher_messages(train[int(r["user"])], item_text, example, args.max_items, args.max_chars)]
    if len(keep) < len(rows):
        common.write_jsonl(path, keep)
    done = {int(r["user"]) for r in keep}
    todo = [int(u) for u in sorted(sample_set) if int(u) not in done]
    n_redo = len(({int(r["user"]) for r in rows} - done) & sample_set)
    log.info("teacher %s: %d users sampled, %d already done, %d to do (%d of them redone: built from another prompt "
             "or upstream state)", args.teacher, len(sample_set), len(sample_set) - len(todo), len(todo), n_redo)
    stats = collections.Counter(written=0, failed=0, malformed_answers=0, retries=0, retried_ok=0, redone=n_redo)
    t0 = time.time()
    with open(path, "a") as f:
        {"rules": run_rules, "local": run_local, "api": run_api}[args.teacher](
            todo, train, item_text, rules, example, args, StampedRows(f, upstream), stats)
    stats["teacher_s"] = round(time.time() - t0, 1)
    # finalise: one row per user, sorted
    final = {}
    for r in common.read_jsonl(path, repair=True):
        final.setdefault(int(r["user"]), r)
    for u, r in final.items():  # what the profile is a function of: 03 shows these, and the test checks it
        r.update(items=rules.shown(train[u]), n_items=len(train[u]))
    common.write_jsonl(path, [final[u] for u in sorted(final)])
    log.info("distill.jsonl: %d users (%d written now; %d malformed answers, %d retried, %d still failed -> %s)",
             len(final), stats["written"], stats["malformed_answers"], stats["retries"], stats["failed"], args.on_fail)

    profiles = {u: r["profile"] for u, r in final.items()}
    fractions = {k: getattr(args, f"{k}_frac") for k in FRACTIONS}
    sets = make_user_sets(list(profiles), fractions, args.seed)
    common.write_json(run / "user_sets.json", sets)
    pair_sets = tuple(s for s in args.pairs_for.split(",") if s)
    pairs, pair_counts = build_pairs(sets, profiles, train, nbrs, item_text, args.seed, pair_sets,
                                     {k: getattr(args, "pair_" + k) for k in llm.PROMPT_SIZES},
                                     args.train_substitutions)
    common.write_jsonl(run / "reward_pairs.jsonl", pairs)
    log.info("user sets: %s; reward pairs: %d (%s users)", {k: len(v) for k, v in sets.items()}, len(pairs),
             "+".join(pair_sets))
    for name, c in pair_counts.items():
        log.info("reward pairs of the %s set: %s", name, json.dumps(c))
    diversity = {"all_users": profile_diversity(list(profiles.values())),
                 "eval_users": profile_diversity([profiles[u] for u in sets["eval"]])}
    d = diversity["all_users"]
    log.info("teacher diversity (%d users): %d distinct profiles, most common identity %.1f%% (%s), most common "
             "identity term %.1f%% (%s), %d distinct interest triples", d["n"], d["distinct_profiles"],
             100 * d["top_identity_share"], d["top_identity"], 100 * d["top_identity_term_share"],
             d["top_identity_term"], d["distinct_interest_triples"])

    # the prompt sizes every later stage shows: 03 trains on the teacher's, 05 and 06 answer the inference prompt's
    common.write_json(run / llm.PROMPT_FILE, {
        "teacher": {"max_items": args.max_items, "max_chars": args.max_chars},
        "inference": {k: getattr(args, "pair_" + k) for k in llm.PROMPT_SIZES},
        "inference_format": llm.INFERENCE_FORMAT})
    outputs = ["distill.jsonl", "user_sets.json", "reward_pairs.jsonl", llm.PROMPT_FILE]
    probe = None
    if not args.no_probe:
        eval_users = sets["eval"] or sorted(profiles)
        probe = {"teacher": args.teacher, "teacher_model": args.teacher_model if args.teacher == "local" else
                 (args.api_model if args.teacher == "api" else "rules"),
                 "eval_users": teacher_probe(run, split, profiles, eval_users, item_text, args.encoder, args.device),
                 "stats": dict(stats), "diversity": diversity, "reward_pairs": pair_counts}
        if args.teacher != "rules":  # the rules profiles of the same users, for comparison
            rp = {u: rules.profile(train[u]) for u in eval_users}
            probe["rules_same_users"] = teacher_probe(run, split, rp, eval_users, item_text, args.encoder,
                                                      args.device)
        common.write_json(run / "distill_probe.json", probe)
        e = probe["eval_users"]
        k = llm.PROBE_K
        log.info("probe (%d eval users): teacher %s Recall@%d = %.4f (history centroid %.4f, random %.4f)",
                 e["n_users"], args.teacher, k, e[f"recall@{k}"], e[f"centroid_recall@{k}"], e[f"random_recall@{k}"])
        outputs.append("distill_probe.json")
    if (run / "teacher_cache.jsonl").exists():
        outputs.append("teacher_cache.jsonl")
    common.record_stage(run, "02_distill", args, inputs, outputs, started)
    return {"rows": len(final), "stats": dict(stats), "sets": {k: len(v) for k, v in sets.items()},
            "pairs": len(pairs), "pair_counts": pair_counts, "diversity": diversity, "probe": probe}


if __name__ == "__main__":
    common.run_stage(main)
