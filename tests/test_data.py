"""Loaders on small files in each raw format (good and malformed), split invariants, atomic IO and
the manifest's stale-input refusal."""
import time

import numpy as np
import pytest

import common
from common import DataError


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


# ----------------------------------------------------------------------------- ml-100k (RecBole atomic files)

ML_ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
           "1\tToy Story\t1995\tAnimation Children's Comedy\n2\tGoldenEye\t1995\tAction Adventure Thriller\n")
ML_INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            "196\t1\t3\t881250949\n186\t2\t5\t891717742\n196\t1\t4\t881250999\n")


def test_ml100k_reads_and_merges_duplicates(tmp_path):
    write(tmp_path / "ml-100k.item", ML_ITEM)
    write(tmp_path / "ml-100k.inter", ML_INTER)
    d = common.load_ml100k(tmp_path)
    assert d.item_text["1"] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert sorted(zip(d.users, d.items)) == [("186", "2"), ("196", "1")]
    assert d.n_duplicates == 1
    assert d.times[d.users.index("196")] == 881250949  # the earliest copy is kept


@pytest.mark.parametrize("inter, match", [
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t1\t3\n", r"ml-100k.inter:2: expected 4"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t1\tgood\t1\n", r"ml-100k.inter:2: expected a number for rating"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t3\t1\n196\t9\t3\t1\n", r"ml-100k.inter:3: item '9'"),
    ("", r"ml-100k.inter:1: file is empty"),
])
def test_ml100k_malformed(tmp_path, inter, match):
    write(tmp_path / "ml-100k.item", ML_ITEM)
    write(tmp_path / "ml-100k.inter", inter)
    with pytest.raises(DataError, match=match):
        common.load_ml100k(tmp_path)


def test_ml100k_bad_item_line(tmp_path):
    write(tmp_path / "ml-100k.item", ML_ITEM + "3\tNo year\n")
    write(tmp_path / "ml-100k.inter", ML_INTER)
    with pytest.raises(DataError, match=r"ml-100k.item:4: expected 4 tab-separated"):
        common.load_ml100k(tmp_path)


# ----------------------------------------------------------------------------- MIND

NEWS = ("N1\tsports\tfootball\tBig win\tThe team won.\thttp://x\t[]\t[]\n"
        "N2\tnews\tworld\tElection\tVotes counted.\thttp://y\t[]\t[]\n"
        "N3\tfinance\tmarkets\tStocks up\t\thttp://z\t[]\t[]\n")


def test_mind_clicks_are_history_and_positive_impressions(tmp_path):
    write(tmp_path / "news.tsv", NEWS)
    write(tmp_path / "behaviors.tsv", "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-0\n"
                                      "2\tU1\t11/16/2019 9:00:00 AM\tN1 N2\tN3-1\n"
                                      "3\tU2\t11/16/2019 10:00:00 PM\t\tN1-0 N2-1\n")
    d = common.load_mind(tmp_path)
    got = sorted(zip(d.users, d.items))
    assert got == [("U1", "N1"), ("U1", "N2"), ("U1", "N3"), ("U2", "N2")]
    assert d.n_duplicates == 2  # U1's history repeats N1 and N2 in impression 2
    assert d.item_text["N1"] == "sports / football: Big win. The team won."
    t = dict(zip(zip(d.users, d.items), d.times))
    assert t[("U1", "N1")] < t[("U1", "N3")]


@pytest.mark.parametrize("behaviors, match", [
    ("1\tU1\t11/15/2019 8:55:22 AM\tN1\n", r"behaviors.tsv:1: expected 5 tab-separated"),
    ("1\tU1\tyesterday\tN1\tN2-1\n", r"behaviors.tsv:1: expected a time"),
    ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-x\n", r"behaviors.tsv:1: expected impressions like"),
    ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-0\n2\tU2\t11/15/2019 8:55:22 AM\tN9\tN2-0\n", r"behaviors.tsv:2: news id 'N9'"),
])
def test_mind_malformed(tmp_path, behaviors, match):
    write(tmp_path / "news.tsv", NEWS)
    write(tmp_path / "behaviors.tsv", behaviors)
    with pytest.raises(DataError, match=match):
        common.load_mind(tmp_path)


# ----------------------------------------------------------------------------- Netflix

TITLES = "1,2003,Dinosaur Planet\n2,NULL,Isle of Man TT 2004 Review\n3,1997,Character, The Movie\n"


def test_netflix_reads_titles_with_commas_and_null_years(tmp_path):
    write(tmp_path / "movie_titles.csv", TITLES, "latin-1")
    write(tmp_path / "combined_data_1.txt", "1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n3:\n1488844,4,2004-01-01\n")
    d = common.load_netflix(tmp_path)
    assert d.item_text["3"] == "Character, The Movie (1997)"
    assert d.item_text["2"] == "Isle of Man TT 2004 Review"
    assert sorted(zip(d.users, d.items)) == [("1488844", "1"), ("1488844", "3"), ("822109", "1")]


@pytest.mark.parametrize("combined, match", [
    ("1488844,3,2005-09-06\n", r"combined_data_1.txt:1: expected a `movie_id:` header"),
    ("1:\n1488844,3\n", r"combined_data_1.txt:2: expected user,rating,date"),
    ("1:\n1488844,3,06/09/2005\n", r"combined_data_1.txt:2: expected a date YYYY-MM-DD"),
    ("9:\n1488844,3,2005-09-06\n", r"combined_data_1.txt:1: movie '9' is not in movie_titles.csv"),
    ("1:\n1488844,x,2005-09-06\n", r"combined_data_1.txt:2: expected a number for rating"),
])
def test_netflix_malformed(tmp_path, combined, match):
    write(tmp_path / "movie_titles.csv", TITLES)
    write(tmp_path / "combined_data_1.txt", combined)
    with pytest.raises(DataError, match=match):
        common.load_netflix(tmp_path)


def test_netflix_bad_year(tmp_path):
    write(tmp_path / "movie_titles.csv", "1,20x3,Title\n")
    write(tmp_path / "combined_data_1.txt", "1:\n1,3,2005-09-06\n")
    with pytest.raises(DataError, match=r"movie_titles.csv:1: expected a year or NULL"):
        common.load_netflix(tmp_path)


# ----------------------------------------------------------------------------- generic CSV

def test_csv_reads_quoted_text_and_iso_times(tmp_path):
    write(tmp_path / "items.csv", 'item,text\na,"A book, with commas"\nb,Another\n')
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu1,a,2020-01-01T00:00:00\nu1,b,1577840000\n")
    d = common.load_csv(tmp_path)
    assert d.item_text["a"] == "A book, with commas"
    assert len(d.users) == 2 and d.times[0] == 1577836800.0


@pytest.mark.parametrize("inter, match", [
    ("user,item\nu1,a\n", r"interactions.csv:1: expected the header user,item,timestamp"),
    ("user,item,timestamp\nu1,a\n", r"interactions.csv:2: expected 3 fields"),
    ("user,item,timestamp\nu1,a,soon\n", r"interactions.csv:2: expected a number or an ISO date"),
    ("user,item,timestamp\nu1,zz,1\n", r"interactions.csv:2: item 'zz' is not in items.csv"),
    ("", r"interactions.csv:1: file is empty"),
])
def test_csv_malformed(tmp_path, inter, match):
    write(tmp_path / "items.csv", "item,text\na,A\n")
    write(tmp_path / "interactions.csv", inter)
    with pytest.raises(DataError, match=match):
        common.load_csv(tmp_path)


# ----------------------------------------------------------------------------- splits

def random_data(seed=0, n_users=60, n_items=80, n=1500):
    rng = np.random.default_rng(seed)
    users = [f"u{k}" for k in rng.integers(0, n_users, n)]
    items = [str(k) for k in rng.integers(0, n_items, n)]
    times = rng.uniform(0, 1000, n)
    users, items, times, dups = common._merge_duplicates(users, items, times)
    return common.RawData(users, items, times, {str(k): f"item {k}" for k in range(n_items)}, "random", dups)


def check_invariants(s):
    train = set(zip(s["train_u"], s["train_i"]))
    valid = set(zip(s["valid_u"], s["valid_i"]))
    test = set(zip(s["test_u"], s["test_i"]))
    assert not train & valid and not train & test and not valid & test
    cold = set(s["cold_items"])
    assert not cold & set(s["train_i"]) and not cold & set(s["valid_i"])
    assert cold == set(s["test_i"]) - set(s["train_i"]) - set(s["valid_i"])
    assert set(s["test_u"]) <= set(s["train_u"])
    assert set(s["valid_u"]) <= set(s["train_u"])
    assert sorted(set(s["train_u"])) == list(range(s["n_users"]))  # dense user ids


def test_cold_items_split_invariants():
    d = random_data()
    s, user_raw, item_raw, stats = common.make_split(d, "cold-items", cold_frac=0.2)
    check_invariants(s)
    assert len(user_raw) == s["n_users"] and len(item_raw) == s["n_items"] == 80
    # the newest 20% of items by first interaction are cold, and all their rows are test
    first = {}
    for i, t in zip(d.items, d.times):
        first[i] = min(first.get(i, np.inf), t)
    newest = sorted(first, key=first.get)[-16:]
    assert {item_raw[i] for i in s["cold_items"]} >= set(newest)
    assert stats["n_cold_items"] == len(s["cold_items"])


def test_each_users_latest_rows_are_test_and_valid():
    d = random_data(1)
    s, user_raw, item_raw, _ = common.make_split(d, "cold-items", cold_frac=0.0, test_frac=0.2, valid_frac=0.1)
    check_invariants(s)
    t = {(u, i): tm for u, i, tm in zip(d.users, d.items, d.times)}
    ur = np.array(user_raw)
    ir = np.array(item_raw)
    for u in range(s["n_users"]):
        tr = [t[(ur[u], ir[i])] for i in s["train_i"][s["train_u"] == u]]
        va = [t[(ur[u], ir[i])] for i in s["valid_i"][s["valid_u"] == u]]
        te = [t[(ur[u], ir[i])] for i in s["test_i"][s["test_u"] == u]]
        if va:
            assert max(tr) <= min(va)
        if te:
            assert max(tr + va) <= min(te)
        n = len(tr) + len(va) + len(te)
        assert len(te) == int(np.floor(0.2 * n)) or len(te) == n - 1


def test_snapshot_split_drops_unknown_test_users():
    d = common.RawData(["a", "a", "b", "c"], ["1", "2", "2", "1"], np.array([1.0, 5.0, 2.0, 9.0]),
                       {"1": "x", "2": "y"}, "toy")
    s, user_raw, _, stats = common.make_split(d, "snapshot", cutoff=4, valid_frac=0.0)
    assert user_raw == ["a", "b"]
    assert stats["dropped_test_rows_of_unknown_users"] == 1  # user c exists only after the cutoff
    assert list(zip(s["test_u"], s["test_i"])) == [(0, 1)]
    check_invariants(s)


def test_split_rows_are_chronological():
    d = random_data(2)
    s, user_raw, item_raw, _ = common.make_split(d, "cold-items")
    t = {(u, i): tm for u, i, tm in zip(d.users, d.items, d.times)}
    times = [t[(user_raw[u], item_raw[i])] for u, i in zip(s["train_u"], s["train_i"])]
    assert times == sorted(times)


def test_ml100k_default_split_matches_spec():
    try:
        d = common.load_ml100k()
    except FileNotFoundError:
        pytest.skip("recbole wheel not installed")
    s, _, _, stats = common.make_split(d)
    check_invariants(s)
    assert 330 <= stats["n_cold_items"] <= 345 and 4000 <= stats["n_cold_test_rows"] <= 4200


# ----------------------------------------------------------------------------- atomic IO and manifest

def test_interrupted_write_leaves_old_file(tmp_path):
    path = tmp_path / "x.json"
    common.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with common.atomic_path(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed")
    assert common.json.loads(path.read_text()) == {"v": 1}
    assert not (tmp_path / "x.json.tmp").exists()


def test_read_jsonl_drops_truncated_last_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"user": 0}\n{"user": 1}\n{"user": 2, "prof')
    assert common.read_jsonl(path, repair=True) == [{"user": 0}, {"user": 1}]
    assert path.read_text() == '{"user": 0}\n{"user": 1}\n'
    path.write_text('{"user": 0}\nnot json\n{"user": 2}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: not valid JSON"):
        common.read_jsonl(path)


class Args:
    seed = 0


def test_stale_inputs_are_refused(tmp_path):
    run = tmp_path / "run"
    common.write_json(run / "a.json", {"v": 1})
    common.record_stage(run, "01_neighbors", Args(), [], ["a.json"], time.time())
    common.write_json(run / "b.json", {"v": 2})
    common.record_stage(run, "06_profile", Args(), ["a.json"], ["b.json"], time.time())
    common.check_inputs(run, ["a.json", "b.json"])
    common.write_json(run / "a.json", {"v": 3})  # 01's output changed after 06 used it
    with pytest.raises(common.StaleInputError, match="a.json changed since 01_neighbors wrote it"):
        common.check_inputs(run, ["a.json"])
    with pytest.raises(common.StaleInputError, match="written by 06_profile from inputs that are now stale"):
        common.check_inputs(run, ["b.json"])
    common.check_inputs(run, ["b.json"], force=True)
    with pytest.raises(common.StaleInputError, match="missing.json is not recorded"):
        common.check_inputs(run, ["missing.json"])


def test_csr_rows_sorted_and_unique():
    rowptr, col = common.csr(np.array([1, 0, 1, 1]), np.array([5, 2, 3, 5]), 3)
    assert rowptr.tolist() == [0, 1, 3, 3] and col.tolist() == [2, 3, 5]
