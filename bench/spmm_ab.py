"""Our spmm alone (forward, forward + backward) on bench_ops.py's industrial graph: for A/B runs of two builds.

    # one checkout per build, each with its own extension cache; alternate them, run each a few times
    (cd old_checkout && RECLM_CACHE=/tmp/reclm_old python /path/to/bench/spmm_ab.py)
    (cd new_checkout && RECLM_CACHE=/tmp/reclm_new python /path/to/bench/spmm_ab.py)

The ops are loaded from the current directory's csrc/ (the checkout under test). 1 thread, median of 9 calls
after a warm-up, in ms, and the minor page faults of one forward (its fresh output). bench_ops.py interleaves ours with torch's in one process; two builds of ours cannot
share a process, hence this script.
"""
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.getcwd())                          # the checkout under test, imported before bench_ops
from csrc.ops import spmm  # noqa: E402                  # (which puts this repository first on sys.path)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import SIZES, lightgcn_adj, powerlaw_edges  # noqa: E402


def median_ms(fn, reps=9):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    torch.set_num_threads(1)
    U, I, E = SIZES["industrial"]
    A = lightgcn_adj(*powerlaw_edges(U, I, E), U, I)
    for d in (32, 64):
        x, gy = torch.randn(U + I, d), torch.randn(U + I, d)
        xg = x.clone().requires_grad_()
        fwd = median_ms(lambda: spmm(A, x))
        fwd_bwd = median_ms(lambda: spmm(A, xg).backward(gy))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        spmm(A, x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"{os.path.dirname(sys.modules['csrc.ops'].__file__)} d={d}: fwd {fwd:.1f} ms, fwd+bwd {fwd_bwd:.1f} ms, "
              f"{faults} page faults per forward", flush=True)


if __name__ == "__main__":
    main()
