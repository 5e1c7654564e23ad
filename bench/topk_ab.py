"""Our top-K alone on bench_ops.py's three sizes, for A/B runs of two builds (two builds of the extension cannot
share a process; see spmm_ab.py, which this mirrors).

    # one checkout per build, each with its own extension cache; alternate them, run each a few times
    (cd old_checkout && RECLM_CACHE=/tmp/reclm_old python /path/to/bench/topk_ab.py [--threads 2])
    (cd new_checkout && RECLM_CACHE=/tmp/reclm_new python /path/to/bench/topk_ab.py [--threads 2])

The ops come from the current directory's csrc/, and each line names that folder. k = 40 with the training items
excluded, as bench_ops.py; 4096 sampled users (2048 at industrial size); median of 7 calls after a warm-up, in ms.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.getcwd())  # the checkout's ops first
from csrc.ops import topk_scores  # noqa: E402
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import SIZES, topk_inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    threads = ap.parse_args().threads
    torch.set_num_threads(threads)
    for size in SIZES:
        ue, ie, erp, ecol = topk_inputs(size, 2048 if size == "industrial" else 4096, "cpu")
        topk_scores(ue, ie, 40, erp, ecol)
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            topk_scores(ue, ie, 40, erp, ecol)
            ts.append(time.perf_counter() - t)
        print(f"{os.path.dirname(sys.modules['csrc.ops'].__file__)} {size}, {threads} thread(s): "
              f"{statistics.median(ts) * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
