"""The Netflix loader (data.load_netflix: 32 MiB chunks parsed with numpy on their bytes, duplicates merged on
integer codes) against the line-by-line loader it replaced (tests/test_data.py: load_netflix_reference, a strptime
and Python lists per rating), on synthetic files in the prize's shape, in one process; prints each one's wall and
CPU time, their ratio, and checks that both give the same data (bench/RESULTS.md, "Netflix loader"). Not a timed test.

    python -m bench.bench_netflix_loader                                    # 1M ratings, generated under /tmp
    python -m bench.bench_netflix_loader --ratings 10000000 --dir /tmp/nf10m --keep
    /usr/bin/time -v python -m bench.bench_netflix_loader --dir /tmp/nf10m --keep --only new   # one loader's peak RSS

The files: --ratings ratings over ratings/5,600 movies (the prize's 100M over 17,770) in 4 combined_data files,
users drawn from 480,189 ids below 2,649,430, dates from 1999-11-11 to 2005-12-31, as in the prize.
"""
import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import data
from tests.test_data import load_netflix_reference

RATINGS, FILES, PER_MOVIE, USERS, MAX_USER = 1_000_000, 4, 5_600, 480_189, 2_649_430
FIRST_DAY, N_DAYS = (np.datetime64("1999-11-11") - np.datetime64("1970-01-01")).astype(int), 2_243


def generate(root, n, seed=0):
    """movie_titles.csv and FILES combined_data files with n ratings in all, each movie's ratings in one block."""
    rng = np.random.default_rng(seed)
    n_movies = max(FILES, n // PER_MOVIE)
    root.mkdir(parents=True, exist_ok=True)
    (root / "movie_titles.csv").write_text("".join(f"{m},{1950 + m % 56},Title {m}, part {m % 7}\n"
                                                   for m in range(1, n_movies + 1)), encoding="latin-1")
    pool = np.sort(rng.choice(np.arange(1, MAX_USER), USERS, replace=False))
    dates = [str(np.datetime64(int(FIRST_DAY + d), "D")) for d in range(N_DAYS)]
    movie = np.sort(rng.integers(1, n_movies + 1, n))
    user, rating, day = pool[rng.integers(0, USERS, n)], rng.integers(1, 6, n), rng.integers(0, N_DAYS, n)
    bounds = np.searchsorted(movie, np.arange(1, n_movies + 2))
    for k, movies in enumerate(np.array_split(np.arange(1, n_movies + 1), FILES), 1):
        with open(root / f"combined_data_{k}.txt", "w") as f:
            for m in movies:
                lo, hi = bounds[m - 1], bounds[m]
                f.write(f"{m}:\n" + "".join(f"{u},{r},{dates[d]}\n" for u, r, d in
                                            zip(user[lo:hi].tolist(), rating[lo:hi].tolist(), day[lo:hi].tolist())))


def timed(fn, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratings", type=int, default=RATINGS, help="synthetic ratings in all")
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: a new folder under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the files (and reuse them if --dir has them)")
    ap.add_argument("--only", choices=["old", "new", "both"], default="both", help="which loader to run")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="netflix_bench_"))
    generated = not (root / "movie_titles.csv").exists()
    try:
        if generated:
            _, wall, _ = timed(generate, root, args.ratings)
            print(f"generated {args.ratings:,} ratings in {root} ({wall:.1f} s)")
        size = sum(p.stat().st_size for p in root.glob("combined_data_*.txt"))
        out = {}
        for name, fn in (("old", load_netflix_reference), ("new", data.load_netflix)):
            if args.only in (name, "both"):
                out[name], wall, cpu = timed(fn, root)
                n = len(out[name].users)
                print(f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU for {n:,} ratings ({size / 2**20:.0f} MiB), "
                      f"{1e9 * wall / n:.0f} ns per rating")
                out[name + "_wall"], out[name + "_cpu"] = wall, cpu
        if args.only == "both":
            a, b = out["old"], out["new"]
            same = (a.users == b.users and a.items == b.items and np.array_equal(a.times, b.times)
                    and a.item_text == b.item_text and a.n_duplicates == b.n_duplicates)
            print(f"old/new: {out['old_wall'] / out['new_wall']:.1f}x wall, {out['old_cpu'] / out['new_cpu']:.1f}x CPU;"
                  f" same data: {same}")
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
              + (" (includes generating the files)" if generated else ""))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
