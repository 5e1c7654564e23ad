"""One build of our ops alone, for A/B runs of two builds: bench_ops.py times ours against torch in one process,
and two builds of the extension cannot share a process.

    # one checkout per build, each with its own extension cache; alternate them, run each a few times
    (cd old_checkout && RECLM_CACHE=/tmp/reclm_old python -m bench.ops_ab --op spmm [--threads 2])
    (cd new_checkout && RECLM_CACHE=/tmp/reclm_new python -m bench.ops_ab --op spmm [--threads 2])

Run as a module from the root of the checkout under test: the ops come from its csrc/ and the bench from its
bench/ (copy this file and bench_ops.py into a checkout that lacks them), and each line printed names the csrc/
folder. --threads torch threads (default 1).
  --op spmm  bench_ops.py's industrial graph, d = 32 and 64: forward and forward + backward (bench_ops.fwd_bwd,
             x.grad cleared first) interleaved by bench_ops.time_pair, 9 reps after a warm-up, median in ms, and the
             minor page faults of one forward (its fresh output). Its fwd+bwd times are not comparable with the
             huge-page A/B in bench/RESULTS.md (section Ops, "Huge pages, A/B"), whose backward did not clear
             x.grad.
  --op topk  bench_ops.py's three sizes, k = 40 with the training items excluded: 4096 sampled users (2048 at
             industrial size), median of 7 calls after a warm-up, in ms.
"""
import argparse
import os
import resource
import statistics
import sys
import time

import torch

from bench.bench_ops import (
    SIZES,
    _nosync,
    fwd_bwd,
    lightgcn_adj,
    powerlaw_edges,
    time_pair,
    topk_inputs,
)
from csrc.ops import spmm, topk_scores


def where():
    return os.path.dirname(sys.modules["csrc.ops"].__file__)


def ab_spmm(threads):
    U, I, E = SIZES["industrial"]
    A = lightgcn_adj(*powerlaw_edges(U, I, E), U, I)
    for d in (32, 64):
        x, gy = torch.randn(U + I, d), torch.randn(U + I, d)
        xg = x.clone().requires_grad_()
        (fwd, _), (both, _) = time_pair([lambda: spmm(A, x), lambda: fwd_bwd(spmm, A, xg, gy)], 9, _nosync, threads)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        spmm(A, x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(f"{where()} d={d}, {threads} thread(s): fwd {statistics.median(fwd) * 1e3:.1f} ms, "
              f"fwd+bwd {statistics.median(both) * 1e3:.1f} ms, {faults} page faults per forward", flush=True)


def ab_topk(threads):
    for size in SIZES:
        ue, ie, erp, ecol = topk_inputs(size, 2048 if size == "industrial" else 4096, "cpu")
        topk_scores(ue, ie, 40, erp, ecol)
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            topk_scores(ue, ie, 40, erp, ecol)
            ts.append(time.perf_counter() - t)
        print(f"{where()} top-K {size}, {threads} thread(s): {statistics.median(ts) * 1e3:.2f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=["spmm", "topk"], default="spmm")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    (ab_spmm if a.op == "spmm" else ab_topk)(a.threads)


if __name__ == "__main__":
    main()
