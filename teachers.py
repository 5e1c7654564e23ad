"""The teachers of 02 (and of 06 --source teacher): who writes the profiles that 03 distils and 04 ranks.

  rules   RulesTeacher: a profile computed from what a prompt shows of a user (deterministic, instant; the
          offline default)
  local   run_local: an instruct model prompted with a worked example (generate.generate_batches)
  api     run_api: an OpenAI-compatible endpoint through ApiClient (retries, backoff, a prompt-hash cache, the key
          read from a named environment variable and never logged)
Each run_<teacher>(todo, train, item_text, rules, example, args, f, stats) appends one distill row per user to `f`;
`args` holds 02's arguments (06 passes the ones 02 recorded in manifest.json). sample_and_example picks the users to
distil and the worked example the local and api teachers are shown. To add a teacher: a run_<name> function here,
and its name in 02's TEACHERS and DEFAULT_N_USERS. The teacher prompt itself is prompts.teacher_messages.
"""
import collections
import concurrent.futures as cf
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
from tqdm import tqdm

import common
import generate
import llm
import prompts

log = logging.getLogger("reclm.teachers")

# ----------------------------------------------------------------------------- rules teacher
# The teacher sees exactly what the prompts that carry its profile show (docs/spec.md, section 5): the newest max_items
# training items, each item's text cut at max_chars as the prompts cut it (a genre cut to a prefix that only one
# catalogue genre has, "Thr…", still reads as Thriller; a genre cut away is not seen), and the history's length
# (the prompts say how many older items they leave out). A target the student cannot see is a target it cannot
# learn: it learns the population's modal profile instead. Neighbours' items never enter a user's profile: the KD
# prompt shows none, and one profile per user then serves the KD, two-turn and inference prompts alike, and stays
# apart from the substitution negative (the neighbour's own profile).
# Terms are chosen by smoothed lift against the population of shown items (every user's newest max_items), so
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
    title, year, genres = parse_item(prompts.clip(text, max_chars) if max_chars else text)
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

    def __init__(self, item_text, train, max_items=prompts.PROMPT_SIZES["max_items"],
                 max_chars=prompts.PROMPT_SIZES["max_chars"]):
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
        return [int(i) for i in prompts.shown_items(items, self.max_items)]

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
        prof = prompts.parse_profile(f"User identity: {', '.join(ident)}; "
                                 f"User interests: {', '.join(self.interests(shown, ranked)[:3])}")
        assert prof, (ident, items)
        return prof



def sample_and_example(train, rules, args):
    """(the users to distil, the worked example shown to the local and api teachers). The users: a seeded sample
    (--seed, --n-users; None = all) of those with --min-items training items. The example: a user outside the sample (if
    any) with a mid-length history and its rules profile; its whole history, so that the prompt shows the newest
    items and how many older ones it leaves out, all that the profile depends on. 06 (--source teacher --teacher
    api) calls this with 02's recorded arguments, so that it sends the API exactly the prompts 02 sends."""
    eligible = np.array([u for u in range(len(train)) if len(train[u]) >= args.min_items], dtype=np.int64)
    n = args.n_users if args.n_users is not None else len(eligible)
    sample = np.random.default_rng(args.seed).permutation(eligible)[:n]
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
MAX_BACKOFF = 60.0           # seconds, the longest wait before one retry (Retry-After is capped there too)
KEY_ENV_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
REDACTED = "[redacted]"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect with the Authorization header, sending the key to wherever the endpoint
    points: no redirect is followed, and complete() reports it (a 3xx HTTPError)."""
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


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


def read_before(resp, deadline):
    """The response body, read in pieces: the socket timeout bounds each read, the deadline (--api-timeout after the
    request was sent) the whole answer, which a server dribbling a byte at a time would otherwise hold forever."""
    chunks = []
    while chunk := resp.read1(1 << 16):
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError("no whole answer within --api-timeout")
    return b"".join(chunks)


class ApiClient:
    """POST {base}/chat/completions with retries (429, 5xx, timeouts, connection errors) and a prompt-hash cache.
    An unrecoverable error (another 4xx, e.g. 401 or 404; MAX_CONNECTION_FAILURES connection failures in a row;
    a request out of tries) sets `abort`, so that every other request stops at once; `error` keeps the first one.
    Every message it logs or raises goes through redact(): the key, and any Bearer token, become [redacted]."""

    def __init__(self, base, model, key, cache_path, timeout=60.0, max_tries=6, backoff=1.0, max_tokens=80,
                 budget=None):
        self.url = base.rstrip("/") + "/chat/completions"
        self.budget, self.waited = budget, 0.0  # seconds all requests together may wait to retry (None: no limit)
        self.model, self._key, self.timeout = model, key, timeout
        self.max_tries, self.backoff, self.max_tokens = max_tries, backoff, max_tokens
        self.cache_path = Path(cache_path)
        self.cache = {r["hash"]: r["answer"] for r in common.read_jsonl(self.cache_path, repair=True)
                      if isinstance(r.get("answer"), str)}  # an answer of another type (an older run's) is no answer
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

    def complete(self, messages, temperature=0.0, attempt=0, valid=None):
        """The answer's text. Only an answer that `valid` accepts (default: any) enters the cache, and a cached one it
        refuses is asked again: a malformed answer never stands in for a good one on a re-run."""
        h = self.key_for(messages, temperature, attempt)
        with self.lock:
            if h in self.cache and (valid is None or valid(self.cache[h])):
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
                deadline = time.monotonic() + self.timeout
                with _OPENER.open(req, timeout=self.timeout) as resp:
                    raw = read_before(resp, deadline)
                with self.lock:
                    self.n_failed_connections = 0
                data = json.loads(raw.decode())
                answer = data["choices"][0]["message"]["content"] or ""
                if not isinstance(answer, str):  # a JSON object or a number: a malformed answer (re-asked, then failed)
                    log.warning("api: message.content is a %s, not text: a malformed answer", type(answer).__name__)
                    answer = ""
                if valid is None or valid(answer):
                    with self.lock:
                        self.cache[h] = answer
                        with common.open_append(self.cache_path) as f:
                            common.append_jsonl(f, {"hash": h, "answer": answer})
                return answer
            except urllib.error.HTTPError as e:
                with self.lock:
                    self.n_failed_connections = 0  # the server answered
                if 300 <= e.code < 400:
                    where = e.headers.get("Location", "?") if e.headers else "?"
                    self.fail(f"{self.url}: HTTP {e.code} redirect to {where} refused (the key is sent to --api-base "
                              "only); pass the address it redirects to as --api-base if you trust it")
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
                        wait = min(float(ra), MAX_BACKOFF)
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
            # jittered (0.5-1.5x), so that parallel requests that failed together do not retry together
            wait = wait if wait is not None else min(self.backoff * 2 ** t, MAX_BACKOFF) * random.uniform(0.5, 1.5)
            with self.lock:
                self.n_retries += 1
                self.waited += wait
                over = self.budget is not None and self.waited > self.budget
            if over:
                self.fail(f"{self.url}: the run would wait more than --api-retry-budget {self.budget:g}s in all to "
                          f"retry (last: {why}); the endpoint keeps failing: try again later (a re-run resumes)")
            log.warning("api: %s; retry %d/%d in %.2fs", self.redact(why), t + 1, self.max_tries - 1, wait)
            if self.abort.wait(wait):
                raise ApiCancelled("cancelled")



# ----------------------------------------------------------------------------- teachers -> rows

def run_rules(todo, train, item_text, rules, example, args, f, stats):
    for u in tqdm(todo, desc="rules teacher", unit="user"):
        common.append_jsonl(f, {"user": int(u), "prompt": prompts.teacher_messages(train[u], item_text, example,
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
    model, tok = llm.load_llm(args.teacher_model, device=args.device, chat_template=args.chat_template)
    model = model.to(llm.pick_dtype(args.dtype, args.device)).eval()
    name = Path(llm.resolve_llm(args.teacher_model)).name
    chunk = args.batch_size * 4  # rows are appended after every chunk (resumable)
    for s in range(0, len(todo), chunk):
        users = todo[s:s + chunk]
        messages = {u: prompts.teacher_messages(train[u], item_text, example, args.max_items, args.max_chars)
                    for u in users}
        texts = {u: prompts.render(tok, messages[u]) for u in users}
        ok = (lambda a: prompts.teacher_profile(a, 3) is not None)
        for idx, answers, attempts in generate.generate_batches(
                model, tok, [texts[u] for u in users], args.max_new_tokens, args.batch_size, desc="local teacher",
                accept=ok, retries=args.retries, retry_temperature=args.temperature, seed=args.seed):
            for k, answer, attempt in zip(idx, answers, attempts):
                u, prof = users[k], prompts.teacher_profile(answer, 3)
                stats["malformed_answers"] += attempt + (prof is None)
                stats["retries"] += attempt
                if prof is None:
                    finish_failed(u, messages[u], train, rules, args, f, stats, args.retries + 1)
                    continue
                common.append_jsonl(f, {"user": int(u), "prompt": messages[u], "profile": prof, "teacher": "local",
                                        "teacher_model": name, "attempts": attempt + 1})
                stats["written"] += 1
                stats["retried_ok"] += attempt > 0


def run_api(todo, train, item_text, rules, example, args, f, stats):
    """The API teacher: --concurrency parallel requests through ApiClient (backoff on 429, 5xx, timeouts and
    connection errors, Retry-After honoured; answers cached by prompt hash in teacher_cache.jsonl; the key never
    logged), malformed answers retried at --temperature. It stops at the first unrecoverable error (another 4xx such
    as 401 or 404, MAX_CONNECTION_FAILURES connection failures in a row, a request out of tries) and cancels what is
    queued; a re-run resumes."""
    key = api_key(args.api_key_env)
    if not args.api_model:
        raise common.UsageError("--teacher api needs --api-model")
    client = ApiClient(args.api_base, args.api_model, key, args.run / "teacher_cache.jsonl", args.api_timeout,
                       args.api_max_tries, args.api_backoff, args.max_new_tokens,
                       getattr(args, "api_retry_budget", None))  # None: 02's record is older than the flag

    def valid(answer):
        return prompts.teacher_profile(answer, 3) is not None

    def one(u):
        prompt = prompts.teacher_messages(train[u], item_text, example, args.max_items, args.max_chars)
        bad = 0
        for attempt in range(args.retries + 1):
            ans = client.complete(prompt, 0.0 if attempt == 0 else args.temperature, attempt, valid=valid)
            prof = prompts.teacher_profile(ans, 3)
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
