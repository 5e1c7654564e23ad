"""Our spmm alone (forward, forward + backward) on bench_ops.py's industrial graph, for A/B runs of two builds:
bench_ops.py times ours against torch in one process, and two builds of ours cannot share a process.

    # one checkout per build, each with its own extension cache; alternate them, run each a few times
    (cd old_checkout && RECLM_CACHE=/tmp/reclm_old python /path/to/bench/spmm_ab.py)
    (cd new_checkout && RECLM_CACHE=/tmp/reclm_new python /path/to/bench/spmm_ab.py)
    ... spmm_ab.py --threads 2          # torch threads (default 1)

The ops come from the current directory's csrc/ (the checkout under test), and the line printed names that
folder. --threads threads (default 1), bench_ops.time_pair (forward and forward + backward interleaved, 9 reps after a warm-up),
median in ms, and the minor page faults of one forward (its fresh output). The backward is bench_ops.fwd_bwd's
(x.grad cleared first); the huge-page A/B in bench/RESULTS.md was measured before that, with each backward also
adding into the previous x.grad, in both builds alike.
"""
import argparse
import os
import resource
import statistics
import sys

import torch

# The checkout's ops first: bench_ops puts its own repository first on sys.path and imports csrc.ops from there.
sys.path.insert(0, os.getcwd())
from csrc.ops import spmm  # noqa: E402
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import SIZES, _nosync, fwd_bwd, lightgcn_adj, powerlaw_edges, time_pair  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    threads = ap.parse_args().threads
    torch.set_num_threads(threads)
    U, I, E = SIZES["industrial"]
    A = lightgcn_adj(*powerlaw_edges(U, I, E), U, I)
    for d in (32, 64):
        x, gy = torch.randn(U + I, d), torch.randn(U + I, d)
        xg = x.clone().requires_grad_()
        (fwd, _), (both, _) = time_pair([lambda: spmm(A, x), lambda: fwd_bwd(spmm, A, xg, gy)], 9, _nosync, threads)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        spmm(A, x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"{os.path.dirname(sys.modules['csrc.ops'].__file__)} d={d}, {threads} thread(s): fwd {statistics.median(fwd) * 1e3:.1f} ms, "
              f"fwd+bwd {statistics.median(both) * 1e3:.1f} ms, {faults} page faults per forward", flush=True)


if __name__ == "__main__":
    main()
