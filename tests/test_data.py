"""Loaders on small files in each raw format (good and malformed), split invariants, atomic IO and
the manifest's stale-input refusal."""
import csv
import os
import time

import numpy as np
import pytest
import torch

import common
import data
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
    d = data.load_ml100k(tmp_path)
    assert d.item_text["1"] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert sorted(zip(d.users, d.items)) == [("186", "2"), ("196", "1")]
    assert d.n_duplicates == 1
    assert d.times[d.users.index("196")] == 881250949  # the earliest copy is kept


@pytest.mark.parametrize("inter, match", [
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t1\t3\n", r"ml-100k.inter:2: expected 4"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t1\tgood\t1\n",
     r"ml-100k.inter:2: expected a number for rating"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t3\t1\n196\t9\t3\t1\n",
     r"ml-100k.inter:3: item '9'"),
    ("", r"ml-100k.inter:1: file is empty"),
])
def test_ml100k_malformed(tmp_path, inter, match):
    write(tmp_path / "ml-100k.item", ML_ITEM)
    write(tmp_path / "ml-100k.inter", inter)
    with pytest.raises(DataError, match=match):
        data.load_ml100k(tmp_path)


def test_ml100k_bad_item_line(tmp_path):
    write(tmp_path / "ml-100k.item", ML_ITEM + "3\tNo year\n")
    write(tmp_path / "ml-100k.inter", ML_INTER)
    with pytest.raises(DataError, match=r"ml-100k.item:4: expected 4 tab-separated"):
        data.load_ml100k(tmp_path)


# ----------------------------------------------------------------------------- MIND

NEWS = ("N1\tsports\tfootball\tBig win\tThe team won.\thttp://x\t[]\t[]\n"
        "N2\tnews\tworld\tElection\tVotes counted.\thttp://y\t[]\t[]\n"
        "N3\tfinance\tmarkets\tStocks up\t\thttp://z\t[]\t[]\n")


def test_mind_clicks_are_history_and_positive_impressions(tmp_path):
    write(tmp_path / "news.tsv", NEWS)
    write(tmp_path / "behaviors.tsv", "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-0\n"
                                      "2\tU1\t11/16/2019 9:00:00 AM\tN1 N2\tN3-1\n"
                                      "3\tU2\t11/16/2019 10:00:00 PM\t\tN1-0 N2-1\n")
    d = data.load_mind(tmp_path)
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
    ("1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-0\n2\tU2\t11/15/2019 8:55:22 AM\tN9\tN2-0\n",
     r"behaviors.tsv:2: news id 'N9'"),
])
def test_mind_malformed(tmp_path, behaviors, match):
    write(tmp_path / "news.tsv", NEWS)
    write(tmp_path / "behaviors.tsv", behaviors)
    with pytest.raises(DataError, match=match):
        data.load_mind(tmp_path)


def tz_split(tmp_path, tz):
    """load_mind + the snapshot split with the process's time zone set to tz."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = tz
    time.tzset()
    try:
        d = data.load_mind(tmp_path)
        split = data.make_split(d, "snapshot", cutoff="2019-11-15T12:00:00", valid_frac=0.5)
        return time.localtime(1573776000).tm_gmtoff, d.times.tolist(), split
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_mind_times_are_utc_whatever_the_machine_time_zone(tmp_path):
    write(tmp_path / "news.tsv", NEWS)
    # 40 impressions of 8 users around the cutoff: a local-time parse would move rows across it by hours
    rows = [f"{k}\tU{k % 8}\t11/{14 + k % 3}/2019 {1 + k % 12}:{k % 60:02d}:00 {'AM' if k % 5 < 2 else 'PM'}\t\t"
            f"N{1 + k % 3}-1 N{1 + (k + 1) % 3}-{k % 2}\n" for k in range(40)]
    write(tmp_path / "behaviors.tsv", "".join(rows))
    _, times, (s, user_raw, item_raw, stats) = tz_split(tmp_path, "UTC0")
    assert times[0] == data.dt.datetime(2019, 11, 14, 1, 0, tzinfo=data.dt.timezone.utc).timestamp()  # 1:00:00 AM
    # POSIX zone strings (no tz database needed): Los Angeles in November (UTC-8) and Tokyo (UTC+9)
    for tz, offset in (("PST8PDT,M3.2.0,M11.1.0", -8 * 3600), ("JST-9", 9 * 3600)):
        gmtoff, times_tz, (s_tz, user_raw_tz, item_raw_tz, stats_tz) = tz_split(tmp_path, tz)
        assert gmtoff == offset  # the zone took effect
        assert times_tz == times and (user_raw_tz, item_raw_tz, stats_tz) == (user_raw, item_raw, stats)
        assert all(np.array_equal(s[k], s_tz[k]) for k in s)


@pytest.mark.parametrize("news, behaviors, match", [
    (NEWS + "N2\tnews\tworld\tAgain\tDup.\thttp://y\t[]\t[]\n", "",
     r"news.tsv:4: news id 'N2' is repeated \(first on line 2\); expected one row per news item"),
    (NEWS + "\tnews\tworld\tNo id\tx\thttp://y\t[]\t[]\n", "", r"news.tsv:4: empty news id"),
    (NEWS, "1\t\t11/15/2019 8:55:22 AM\tN1\tN2-1\n", r"behaviors.tsv:1: empty user id"),
    (NEWS, "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1\r2\tU2\t11/15/2019 8:55:22 AM\tN1\tN2-1\r",
     r"behaviors.tsv:1: expected LF or CRLF line endings, found a carriage return inside the line \(CR-only"),
])
def test_mind_refuses_repeated_and_empty_ids_and_cr_endings(tmp_path, news, behaviors, match):
    write(tmp_path / "news.tsv", news)
    write(tmp_path / "behaviors.tsv", behaviors or "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1\n")
    with pytest.raises(DataError, match=match):
        data.load_mind(tmp_path)


# ----------------------------------------------------------------------------- Netflix

TITLES = "1,2003,Dinosaur Planet\n2,NULL,Isle of Man TT 2004 Review\n3,1997,Character, The Movie\n"


def test_netflix_reads_titles_with_commas_and_null_years(tmp_path):
    write(tmp_path / "movie_titles.csv", TITLES, "latin-1")
    write(tmp_path / "combined_data_1.txt", "1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n3:\n1488844,4,2004-01-01\n")
    d = data.load_netflix(tmp_path)
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
        data.load_netflix(tmp_path)


def test_netflix_bad_year(tmp_path):
    write(tmp_path / "movie_titles.csv", "1,20x3,Title\n")
    write(tmp_path / "combined_data_1.txt", "1:\n1,3,2005-09-06\n")
    with pytest.raises(DataError, match=r"movie_titles.csv:1: expected a year or NULL"):
        data.load_netflix(tmp_path)


def load_netflix_reference(root, min_rating=0.0):
    """data.load_netflix as it was before the byte parser (a strptime per line, Python lists), kept as the plain
    reference that the loader must match on valid files (and bench/bench_netflix_loader.py times against)."""
    root = data.Path(root)
    titles_path = root / "movie_titles.csv"
    item_text = {}
    with open(titles_path, encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            mid, year, title = line.rstrip("\r\n").split(",", 2)
            item_text[mid] = title.strip() + ("" if year == "NULL" else f" ({year.strip()})")
    users, items, times = [], [], []
    for path in sorted(root.glob("combined_data_*.txt")):
        movie = None
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if line.endswith(":"):
                    movie = line[:-1]
                    assert movie in item_text
                    continue
                parts = line.split(",")
                assert movie is not None and len(parts) == 3
                rating = data._parse_number(path, n, parts[1], "rating")
                ts = data.dt.datetime.strptime(parts[2], "%Y-%m-%d").replace(tzinfo=data.dt.timezone.utc).timestamp()
                if rating >= min_rating:
                    users.append(parts[0])
                    items.append(movie)
                    times.append(ts)
    return data._finish("netflix", users, items, times, item_text, titles_path)


NETFLIX_TITLES = ("1,2003,Dinosaur Planet\n2,NULL,Isle of Man TT 2004 Review\n3,1997,Character, The Movie\n"
                  "10,2001,Fighter\n11,1999,Unrated, Unseen, Unloved\n01,1990,Leading Zero\n")
ODD_USERS = ["0", "007", "123456789012345678", "1234567890123456789", "x9", "42 "]


def netflix_files(rng, n_files=2, n_lines=300, messy=True):
    """Combined_data files as lists of (line, day or None for a header), in the prize's shape; messy: with the
    variations the old loader accepted (CRLF, spaces, 4.0 ratings, unpadded dates, odd user ids, no final newline,
    repeated headers, duplicated ratings)."""
    movies = ["1", "2", "3", "10", "01"]  # 11 has no ratings
    files = []
    for _ in range(n_files):
        lines = []
        for _ in range(n_lines):
            if not lines or rng.random() < 0.08:
                lines.append((f"{rng.choice(movies)}:", None))
                continue
            user = str(rng.integers(1, 60)) if not messy or rng.random() < 0.85 else str(rng.choice(ODD_USERS))
            day = data.dt.date(2004, 1, 1) + data.dt.timedelta(days=int(rng.integers(0, 90)))
            date = f"{day.year}-{day.month}-{day.day}" if messy and rng.random() < 0.1 else str(day)
            rating = str(rng.integers(1, 6)) + (".0" if messy and rng.random() < 0.05 else "")
            lines.append((f"{user},{rating},{date}", (day - data.EPOCH).days))
        files.append(lines)
    return files


def write_netflix(root, files, rng=None, day_range=None):
    """Write the files (only the ratings with day_range[0] <= day < day_range[1], if given)."""
    write(root / "movie_titles.csv", NETFLIX_TITLES, "latin-1")
    for k, lines in enumerate(files, 1):
        text = ""
        for line, day in lines:
            if day is not None and day_range and not day_range[0] <= day < day_range[1]:
                continue
            if rng is not None and rng.random() < 0.05:
                line = f"  {line} "
            text += line + ("\r\n" if rng is not None and rng.random() < 0.1 else "\n")
        (root / f"combined_data_{k}.txt").write_bytes(text[:-1].encode() if rng is not None else text.encode())
    return root


def same_raw(a, b):
    assert (a.name, a.n_duplicates, a.item_text) == (b.name, b.n_duplicates, b.item_text)
    assert a.users == b.users and a.items == b.items
    assert a.times.dtype == b.times.dtype and np.array_equal(a.times, b.times)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [16, 61, 1 << 25])
def test_netflix_loader_matches_the_line_by_line_reference(tmp_path, monkeypatch, seed, chunk):
    """Messy files (the slow path on some chunks, the byte parser on others, chunk cuts anywhere)."""
    rng = np.random.default_rng(seed)
    root = write_netflix(tmp_path, netflix_files(rng), rng)
    monkeypatch.setattr(data, "NETFLIX_CHUNK", chunk)
    for min_rating in (4.5, 3.0, 0.0):
        got, want = data.load_netflix(root, min_rating), load_netflix_reference(root, min_rating)
        same_raw(got, want)
    assert got.n_duplicates > 0 and {"007", "42 ", "1234567890123456789", "01"} <= set(got.users + got.items)


@pytest.mark.parametrize("chunk", [64, 1 << 25])
def test_netflix_byte_parser_reads_the_prize_shape_alone(tmp_path, monkeypatch, chunk):
    """A file in the prize's own shape never falls back to the line-by-line parser (that is where the speed is)."""
    root = write_netflix(tmp_path, netflix_files(np.random.default_rng(3), n_lines=2000, messy=False))
    monkeypatch.setattr(data, "NETFLIX_CHUNK", chunk)
    want = load_netflix_reference(root, 2.0)
    monkeypatch.setattr(data, "_netflix_slow", lambda *a: pytest.fail("fell back to the line parser"))
    same_raw(data.load_netflix(root, 2.0), want)


@pytest.mark.parametrize("start, end", [("2004-01-20", "2004-02-10"), (None, "2004-01-05"), ("2004-03-01", None)])
def test_netflix_date_window_is_start_inclusive_end_exclusive(tmp_path, start, end):
    files = netflix_files(np.random.default_rng(4))
    full = write_netflix(tmp_path / "full", files)
    lo, hi = data._window(start, end)
    want = load_netflix_reference(write_netflix(tmp_path / "cut", files, day_range=(lo, hi)))
    got = data.load_netflix(full, start=start, end=end)
    same_raw(got, want)
    days = got.times / 86400
    assert days.min() >= lo and days.max() < hi
    if start:
        assert days.min() == lo  # the start day itself is in


def test_netflix_date_window_errors(tmp_path):
    root = write_netflix(tmp_path, netflix_files(np.random.default_rng(5)))
    with pytest.raises(common.UsageError, match=r"--start: expected an ISO date YYYY-MM-DD, got '2004/01/01'"):
        data.load_netflix(root, start="2004/01/01")
    with pytest.raises(common.UsageError, match=r"--start 2004-02-01 must be before --end 2004-02-01"):
        data.load_netflix(root, start="2004-02-01", end="2004-02-01")
    with pytest.raises(DataError, match=r"netflix: no ratings in the window 2005-01-01 <= date < \.\.\. \(the ratings "
                                         r"run from 2004-01-01 to 2004-03-"):
        data.load_netflix(root, start="2005-01-01")
    with pytest.raises(common.UsageError, match=r"--start/--end \(a date window\) apply to --dataset netflix"):
        data.load_dataset("csv", tmp_path, start="2004-01-01")


def test_01_passes_the_date_window(monkeypatch):
    args = common.load_stage("01_neighbors").parse_args(["--run", "r", "--start", "2005-01-01", "--end", "2005-07-01"])
    assert (args.start, args.end) == ("2005-01-01", "2005-07-01")


@pytest.mark.parametrize("combined, match", [
    ("1:\n1,3,2005-09-06\n" + "2,4,2005-09-07\n" * 20 + "2,4,2005-02-30\n", r"combined_data_1.txt:23: expected a date"),
    ("1:\n1,3,2005-09-06\n" * 20 + "1:\n,3,2005-09-06\n", r"combined_data_1.txt:42: empty user id"),
    ("1:\n1,3,2005-09-06\n" * 20 + "1:\n1,3,2005-09-06,x\n", r"combined_data_1.txt:42: expected user,rating,date"),
    ("1:\n1,3,2005-09-06\n" * 20 + "11:\n9,\xe9,2005-09-06\n", r"combined_data_1.txt:42: not valid UTF-8 \(byte 0xe9 "
                                                             r"at column 3\); re-encode .* iconv -f latin1"),
    ("1:\r1,3,2005-09-06\r2,3,2005-09-06\r", r"combined_data_1.txt:1: expected LF or CRLF line endings, found a "
                                             r"carriage return inside the line \(CR-only"),
    ("1:\n1,3,2005-09-06\n" * 20 + "\n", r"combined_data_1.txt:41: expected user,rating,date, got ''"),
    ("1:\n1,3,2005-09-06\n" * 20 + "12:\n", r"combined_data_1.txt:41: movie '12' is not in movie_titles.csv"),
])
@pytest.mark.parametrize("chunk", [32, 1 << 25])
def test_netflix_errors_name_the_line_in_any_chunk(tmp_path, monkeypatch, combined, match, chunk):
    write(tmp_path / "movie_titles.csv", NETFLIX_TITLES, "latin-1")
    write(tmp_path / "combined_data_1.txt", combined, "latin-1")
    monkeypatch.setattr(data, "NETFLIX_CHUNK", chunk)
    with pytest.raises(DataError, match=match):
        data.load_netflix(tmp_path)


@pytest.mark.parametrize("titles, match", [
    ("1,2003,A\n2,2004,B\n1,2005,C\n", r"movie_titles.csv:3: movie id '1' is repeated \(first on line 1\)"),
    ("1,2003,A\n2,2004,  \n", r"movie_titles.csv:2: movie '2' has an empty title"),
    ("1,2003,A\n,2004,B\n", r"movie_titles.csv:2: empty movie id"),
    ("1,2003,A\n2,199²,B\n", r"movie_titles.csv:2: expected a year or NULL, got '199²'"),  # '²'.isdigit()
])
def test_netflix_titles_are_one_per_movie_and_not_empty(tmp_path, titles, match):
    write(tmp_path / "movie_titles.csv", titles, "latin-1")
    write(tmp_path / "combined_data_1.txt", "1:\n1,3,2005-09-06\n")
    with pytest.raises(DataError, match=match):
        data.load_netflix(tmp_path)


def test_items_without_interactions_are_counted(tmp_path, caplog):
    write(tmp_path / "movie_titles.csv", TITLES, "latin-1")
    write(tmp_path / "combined_data_1.txt", "1:\n1,3,2005-09-06\n2,5,2005-05-13\n")
    with caplog.at_level("INFO", logger="reclm"):
        data.load_netflix(tmp_path)
    assert "netflix: 2 of the 3 items in movie_titles.csv have no interactions and are left out" in caplog.text


# ----------------------------------------------------------------------------- generic CSV

def test_csv_reads_quoted_text_and_iso_times(tmp_path):
    write(tmp_path / "items.csv", 'item,text\na,"A book, with commas"\nb,Another\n')
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu1,a,2020-01-01T00:00:00\nu1,b,1577840000\n")
    d = data.load_csv(tmp_path)
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
        data.load_csv(tmp_path)


def test_csv_latin1_names_file_and_line(tmp_path):
    write(tmp_path / "items.csv", "item,text\na,Plain\nb,Café au lait\n", "latin-1")
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu1,a,1\n")
    with pytest.raises(DataError, match=r"items.csv:3: not valid UTF-8 \(byte 0xe9 at column 6\); re-encode the file "
                                        r"as UTF-8, e.g. iconv -f latin1"):
        data.load_csv(tmp_path)
    write(tmp_path / "items.csv", "item,text\na,Plain\n")
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu1,a,1\nJosé,a,2\n", "latin-1")
    with pytest.raises(DataError, match=r"interactions.csv:3: not valid UTF-8"):
        data.load_csv(tmp_path)


def test_csv_accepts_a_byte_order_mark(tmp_path):
    write(tmp_path / "items.csv", "\ufeffitem,text\na,Café\nb,B\n")
    write(tmp_path / "interactions.csv", "\ufeffuser,item,timestamp\r\nu1,a,1\r\nu1,b,2\r\n")
    d = data.load_csv(tmp_path)
    assert d.item_text == {"a": "Café", "b": "B"} and d.users == ["u1", "u1"] and d.items == ["a", "b"]


@pytest.mark.parametrize("ts", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_csv_rejects_non_finite_timestamps(tmp_path, ts):
    write(tmp_path / "items.csv", "item,text\na,A\nb,B\n")
    write(tmp_path / "interactions.csv", f"user,item,timestamp\nu1,a,1\nu1,b,{ts}\n")
    with pytest.raises(DataError, match=rf"interactions.csv:3: expected a finite timestamp .*got '{ts}'"):
        data.load_csv(tmp_path)


def test_csv_rejects_repeated_item_ids_and_empty_texts(tmp_path):
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu1,a,1\n")
    write(tmp_path / "items.csv", "item,text\na,First\nb,B\na,Second\n")
    with pytest.raises(DataError, match=r"items.csv:4: item id 'a' is repeated \(first on line 2\)"):
        data.load_csv(tmp_path)
    write(tmp_path / "items.csv", 'item,text\na,A\nb,"  "\n')
    with pytest.raises(DataError, match=r"items.csv:3: item 'b' has an empty text"):
        data.load_csv(tmp_path)


def test_csv_reads_a_long_text_field(tmp_path):
    long = "word " * 40_000  # 200,000 characters, over the csv module's default limit of 131,072
    write(tmp_path / "items.csv", f'item,text\na,"{long}"\nb,B\n')
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu1,a,1\nu1,b,2\n")
    assert data.load_csv(tmp_path).item_text["a"] == long.strip()
    assert csv.field_size_limit() == 131072  # the module's limit is restored after the read


@pytest.mark.parametrize("items, match", [
    ("item,text\ra,A\rb,B\r", r"items.csv:1: not readable as CSV \(new-line character seen in unquoted field.*\): "
                              r"a carriage return inside an unquoted field, from CR-only"),
    ("item,text\na,A\nb,B\rstray\nc,C\n", r"items.csv:3: not readable as CSV .*carriage return"),
    ('item,text\na,A\nb,"' + "x" * 70_000_000, r"items.csv:3: not readable as CSV \(field larger than field limit.*"
                                               r"a field longer than 67,108,864 characters"),
    ("item,text\n,A\n", r"items.csv:2: empty item id"),
])
def test_csv_inputs_the_csv_module_refuses_name_the_line(tmp_path, items, match):
    write(tmp_path / "items.csv", items)
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu1,a,1\n")
    with pytest.raises(DataError, match=match):
        data.load_csv(tmp_path)


def test_csv_refuses_an_empty_user_id(tmp_path):
    write(tmp_path / "items.csv", "item,text\na,A\n")
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu1,a,1\n,a,2\n")
    with pytest.raises(DataError, match=r"interactions.csv:3: empty user id"):
        data.load_csv(tmp_path)


def test_ids_with_non_ascii_digits_split(tmp_path):
    """'²'.isdigit() is True and int('²') fails: the split's id order takes only ASCII digits as numbers."""
    write(tmp_path / "items.csv", "item,text\n2,Two\n²,Squared\n10,Ten\n٣,Three\n")
    write(tmp_path / "interactions.csv", "user,item,timestamp\n" + "".join(
        f"u{k % 2},{i},{k}\n" for k, i in enumerate(["2", "²", "10", "٣"] * 6)))
    d = data.load_csv(tmp_path)
    assert sorted(set(d.items), key=data._natural_key) == ["2", "10", "²", "٣"]
    data.make_split(d, "cold-items", cold_frac=0.25, valid_frac=0.5)


def test_csv_warns_when_timestamps_are_mostly_tied(tmp_path, caplog):
    write(tmp_path / "items.csv", "item,text\n" + "".join(f"i{k},Item {k}\n" for k in range(6)))
    write(tmp_path / "interactions.csv", "user,item,timestamp\n" + "".join(
        f"u{k % 2},i{k},{0 if k < 4 else k}\n" for k in range(6)))
    with caplog.at_level("WARNING", logger="reclm"):
        data.load_csv(tmp_path)
    assert "csv: 4 of 6 interactions (67%) share the timestamp 0.0" in caplog.text
    caplog.clear()
    write(tmp_path / "interactions.csv", "user,item,timestamp\n" + "".join(
        f"u{k % 2},i{k},{k // 2}\n" for k in range(6)))  # pairs tied, no timestamp held by more than half
    with caplog.at_level("WARNING", logger="reclm"):
        data.load_csv(tmp_path)
    assert "share the timestamp" not in caplog.text


def test_truncated_npz_names_the_file(tmp_path):
    run = tmp_path / "run"
    common.save_npz(run / "data" / "split.npz", train_u=np.arange(1000), n_users=np.int64(3), n_items=np.int64(4))
    path = run / "data" / "split.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"split.npz: not a readable .npz file \(BadZipFile"):
        common.load_split(run)
    common.save_npy(run / "x.npy", np.ones((50, 4), np.float32))
    (run / "x.npy").write_bytes((run / "x.npy").read_bytes()[:300])
    with pytest.raises(DataError, match=r"x.npy: not a readable .npy file"):
        common.load_npy(run / "x.npy")


# ----------------------------------------------------------------------------- splits

def random_data(seed=0, n_users=60, n_items=80, n=1500):
    rng = np.random.default_rng(seed)
    users = [f"u{k}" for k in rng.integers(0, n_users, n)]
    items = [str(k) for k in rng.integers(0, n_items, n)]
    times = rng.uniform(0, 1000, n)
    users, items, times, dups = data._merge_duplicates(users, items, times)
    return data.RawData(users, items, times, {str(k): f"item {k}" for k in range(n_items)}, "random", dups)


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
    assert list(s["cold_items"]) == sorted(cold)


def raw_pairs(s, user_raw, item_raw, part):
    """A part's (raw user, raw item) rows, in the order stored."""
    return [(user_raw[u], item_raw[i]) for u, i in zip(s[f"{part}_u"], s[f"{part}_i"])]


def test_cold_items_split_invariants():
    d = random_data()
    s, user_raw, item_raw, stats = data.make_split(d, "cold-items", cold_frac=0.2)
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
    s, user_raw, item_raw, _ = data.make_split(d, "cold-items", cold_frac=0.0, test_frac=0.2, valid_frac=0.1)
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
    d = data.RawData(["a", "a", "a", "b", "c"], ["1", "3", "2", "2", "1"], np.array([1.0, 3.0, 5.0, 2.0, 9.0]),
                     {"1": "x", "2": "y", "3": "z"}, "toy")
    s, user_raw, item_raw, stats = data.make_split(d, "snapshot", cutoff=4, valid_frac=0.5)
    assert sorted(user_raw) == ["a", "b"]
    assert stats["dropped_test_rows_of_unknown_users"] == 1  # user c exists only after the cutoff
    assert raw_pairs(s, user_raw, item_raw, "test") == [("a", "2")]
    assert raw_pairs(s, user_raw, item_raw, "valid") == [("a", "3")]
    check_invariants(s)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="snapshot", cutoff="1970-01-01T00:00:00", valid_frac=0.5),
     r"toy: the split has no training interactions: --cutoff 1970-01-01T00:00:00 is at or before the first "
     r"interaction \(the interactions run from 1970-01-01T00:00:01Z to 1970-01-01T00:00:09Z\)"),
    (dict(split="snapshot", cutoff=4, valid_frac=0.1),
     r"toy: the split has no validation interactions: with --valid-frac 0.1 a user needs at least 10 training rows "
     r"to give one, and the most any user has is 2"),
    (dict(split="snapshot", cutoff=4, valid_frac=0.0), r"with --valid-frac 0.0 no row goes to validation"),
    (dict(split="snapshot", cutoff=10, valid_frac=0.5),
     r"toy: the split has no test interactions of known users: --cutoff 10 is after the last interaction"),
    (dict(split="cold-items", cold_frac=0.0, test_frac=0.0, valid_frac=0.5), r"no test interactions of known users"),
])
def test_a_split_without_training_validation_or_test_rows_is_refused(kwargs, match):
    d = data.RawData(["a", "a", "a", "b", "c"], ["1", "3", "2", "2", "1"], np.array([1.0, 3.0, 5.0, 2.0, 9.0]),
                     {"1": "x", "2": "y", "3": "z"}, "toy")
    with pytest.raises(DataError, match=match):
        data.make_split(d, **kwargs)


def test_split_rows_are_chronological():
    d = random_data(2)
    s, user_raw, item_raw, _ = data.make_split(d, "cold-items")
    t = {(u, i): tm for u, i, tm in zip(d.users, d.items, d.times)}
    times = [t[(user_raw[u], item_raw[i])] for u, i in zip(s["train_u"], s["train_i"])]
    assert times == sorted(times)


def test_split_is_a_seeded_relabelling():
    d = random_data(3)
    a, b, c = (data.make_split(d, "cold-items", seed=seed) for seed in (0, 0, 1))
    for k in a[0]:
        assert np.array_equal(a[0][k], b[0][k])  # same seed: the same arrays
    assert a[1:] == b[1:]
    assert a[1] != c[1] and a[2] != c[2]       # another seed: another numbering of users and items ...
    assert not np.array_equal(a[0]["train_i"], c[0]["train_i"])
    for part in ("train", "valid", "test"):     # ... of the same rows, in the same (chronological) order
        assert raw_pairs(a[0], a[1], a[2], part) == raw_pairs(c[0], c[1], c[2], part)
    assert sorted(a[2][i] for i in a[0]["cold_items"]) == sorted(c[2][i] for i in c[0]["cold_items"])
    check_invariants(c[0])


def spearman(x, y):
    rank = (lambda v: np.argsort(np.argsort(v, kind="stable")))
    return np.corrcoef(rank(x), rank(y))[0, 1]


def test_dense_ids_carry_no_raw_order():
    """Index order must not follow raw-id order (items) or order of first appearance (users)."""
    d = random_data(4, n_users=2000, n_items=3000, n=40000)
    s, user_raw, item_raw, _ = data.make_split(d, "cold-items")
    raw_item_rank = np.argsort(np.argsort([int(r) for r in item_raw]))
    assert abs(spearman(np.arange(len(item_raw)), raw_item_rank)) < 0.08   # null sd: 1/sqrt(3000) = 0.018
    first_seen = {u: k for k, u in reversed(list(enumerate(d.users)))}
    assert abs(spearman(np.arange(len(user_raw)), [first_seen[u] for u in user_raw])) < 0.1  # null sd 0.022
    cold_raw = np.array([int(item_raw[i]) for i in s["cold_items"]])
    assert abs(spearman(s["cold_items"], cold_raw)) < 0.25                 # ~600 cold items


def leaky_data(seed, n_users=500, n_items=1000, n_cold=200):
    """Cold items (the newest, raw ids above n_items - n_cold) whose test popularity falls with the raw id,
    as on ml-100k, where a low raw id among the cold items means a blockbuster."""
    rng = np.random.default_rng(seed)
    n_warm = n_items - n_cold
    pop = np.exp(-np.arange(n_cold) / 25)
    users, items, times = [], [], []
    for u in range(n_users):
        warm = rng.choice(n_warm, 20, replace=False)
        cold = n_warm + np.unique(np.append(rng.choice(n_cold, 4, replace=False, p=pop / pop.sum()), u % n_cold))
        users += [f"u{u}"] * (20 + len(cold))
        items += [str(i + 1) for i in np.concatenate([warm, cold])]
        times += list(rng.uniform(0, 1000, 20)) + list(rng.uniform(1000, 1100, len(cold)))
    return data.RawData(users, items, np.array(times), {str(i + 1): f"item {i + 1}" for i in range(n_items)},
                        "leaky")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constant_scores_get_random_level_zero_shot_recall(seed):
    """A model that scores every item the same ranks by the tie rule (lowest index first): with seeded random
    ids it gets random-level zero-shot recall, not the popularity ranking that raw-id order would give."""
    d = leaky_data(seed)
    s, _, item_raw, _ = data.make_split(d, "cold-items", seed=seed)
    cold = s["cold_items"]
    assert len(cold) == 200 and all(int(item_raw[i]) > 800 for i in cold)  # the designed cold items
    on_cold = np.isin(s["test_i"], cold)
    test = common.csr(s["test_u"][on_cold], s["test_i"][on_cold], s["n_users"])
    exclude = common.csr(s["train_u"], s["train_i"], s["n_users"])
    const = common.rank_eval(torch.zeros(s["n_users"], 4), torch.zeros(s["n_items"], 4), exclude, test, ks=(20,),
                             item_subset=torch.from_numpy(cold.astype(np.int64)))
    chance = 20 / len(cold)
    assert np.nanmean(const["recall@20"]) < 2 * chance   # chance level, up to the seed's noise
    # the same fixed list in raw-id order (what numbering by raw id would rank) would look like a strong model
    by_raw = set(sorted(cold, key=lambda i: int(item_raw[i]))[:20])
    hits = [len(by_raw & set(t)) / len(t) for t in common.user_items(s["test_u"][on_cold], s["test_i"][on_cold],
                                                                      s["n_users"]) if len(t)]
    assert np.mean(hits) > 4 * chance


def capped(d, n, keep="random", seed=0):
    return data.make_split(d, "cold-items", seed=seed, max_train_per_user=n, scarce_keep=keep)


@pytest.mark.parametrize("keep", ["random", "earliest"])
def test_training_cap_keeps_valid_and_test(keep):
    d = random_data(5, n_users=60, n_items=400)
    full, user_raw, item_raw, full_stats = data.make_split(d, "cold-items", seed=3)
    s, user_raw_c, item_raw_c, stats = capped(d, 5, keep, seed=3)
    check_invariants(s)
    assert (user_raw_c, item_raw_c) == (user_raw, item_raw)  # the numbering does not depend on the cap
    for k in ("valid_u", "valid_i", "test_u", "test_i", "n_users", "n_items"):
        assert np.array_equal(s[k], full[k])
    full_train = set(zip(full["train_u"], full["train_i"]))
    assert set(zip(s["train_u"], s["train_i"])) <= full_train
    assert np.array_equal(np.bincount(s["train_u"], minlength=s["n_users"]),
                          np.minimum(np.bincount(full["train_u"], minlength=s["n_users"]), 5))
    # test items left without training and validation rows are cold now
    assert set(full["cold_items"]) < set(s["cold_items"])
    assert stats["n_cold_items_from_cap"] == len(s["cold_items"]) - len(full["cold_items"]) > 0
    assert stats["n_train_u_before_cap"] == len(full["train_u"]) and stats["n_train_u"] == len(s["train_u"])
    assert (stats["max_train_per_user"], stats["scarce_keep"]) == (5, keep)
    assert (full_stats["max_train_per_user"], full_stats["n_cold_items_from_cap"]) == (0, 0)


def test_training_cap_earliest_keeps_the_earliest_rows():
    d = random_data(6)
    t = {(u, i): tm for u, i, tm in zip(d.users, d.items, d.times)}
    full, user_raw, item_raw, _ = data.make_split(d, "cold-items")
    s, _, _, _ = capped(d, 4, "earliest")
    for u in range(s["n_users"]):
        kept = [t[(user_raw[u], item_raw[i])] for i in s["train_i"][s["train_u"] == u]]
        every = sorted(t[(user_raw[u], item_raw[i])] for i in full["train_i"][full["train_u"] == u])
        assert sorted(kept) == every[:4]


def test_training_cap_random_is_seeded():
    d = random_data(7)
    a, b, c = capped(d, 4, seed=0), capped(d, 4, seed=0), capped(d, 4, seed=1)
    assert np.array_equal(a[0]["train_u"], b[0]["train_u"]) and np.array_equal(a[0]["train_i"], b[0]["train_i"])
    assert set(raw_pairs(a[0], a[1], a[2], "train")) != set(raw_pairs(c[0], c[1], c[2], "train"))
    assert raw_pairs(a[0], a[1], a[2], "test") == raw_pairs(c[0], c[1], c[2], "test")
    earliest = capped(d, 4, "earliest")
    assert set(raw_pairs(a[0], a[1], a[2], "train")) != set(raw_pairs(*earliest[:3], "train"))


def test_training_cap_rejects_bad_options():
    d = random_data(8)
    with pytest.raises(ValueError, match="max_train_per_user"):
        capped(d, -1)
    with pytest.raises(ValueError, match="scarce_keep"):
        capped(d, 3, "latest")


def test_ml100k_default_split_matches_spec():
    try:
        d = data.load_ml100k()
    except FileNotFoundError:
        pytest.skip("recbole wheel not installed")
    s, _, _, stats = data.make_split(d)
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
