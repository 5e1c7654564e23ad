"""Benchmark of the reclm ops against plain torch, as ratios measured in one run.

    python bench/bench_ops.py            # full (minutes on 2 cores)
    python bench/bench_ops.py --quick    # small version, < 1 min
    python bench/bench_ops.py --device cuda

spmm: forward+backward of A @ x with A the LightGCN-normalised bipartite
adjacency ((U+I) x (U+I)), ours vs torch.sparse.mm on a sparse_csr_tensor of
the same CSR. top-K: k=40 over all items with the training items excluded,
ours vs a blocked torch reference (matmul a block of users, -inf via
index_put_, torch.topk) whose block is sized to a 256 MB score buffer.

Peak extra memory (CPU): each measurement runs in a fresh subprocess that
builds its inputs, calls malloc_trim, records VmRSS, resets the kernel's
peak-RSS counter (/proc/self/clear_refs = 5), runs the op once and reads
VmHWM; extra = VmHWM - VmRSS before. It counts everything the op touches
(outputs included); it is what the OS saw, not an allocator estimate.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from csrc.ops import csr_from_coo, load_extension, spmm, topk_scores  # noqa: E402

SIZES = {  # users, items, edges
    "ml-100k": (943, 1682, 64_000),
    "netflix": (17_770, 8_400, 1_660_000),
    "industrial": (117_000, 158_000, 860_000),
}
REF_BUDGET = 256 << 20


def powerlaw_edges(U, I, E, seed=0, alpha=0.9):
    """Unique (user, item) pairs with Zipf-like user activity and item popularity."""
    g = torch.Generator().manual_seed(seed)
    pu = torch.arange(1, U + 1, dtype=torch.float64) ** -alpha
    pi = torch.arange(1, I + 1, dtype=torch.float64) ** -alpha
    keys = torch.empty(0, dtype=torch.long)
    while keys.numel() < E:
        n = int((E - keys.numel()) * 1.3) + 1000
        u = torch.multinomial(pu, n, replacement=True, generator=g)
        i = torch.multinomial(pi, n, replacement=True, generator=g)
        keys = torch.unique(torch.cat([keys, u * I + i]))
    keys = keys[torch.randperm(keys.numel(), generator=g)[:E]]
    u, i = keys // I, keys % I
    pu_, pi_ = torch.randperm(U, generator=g), torch.randperm(I, generator=g)  # scatter hubs
    return pu_[u], pi_[i]


def lightgcn_adj(u, i, U, I):
    r = torch.cat([u, i + U])
    c = torch.cat([i + U, u])
    deg = torch.bincount(r, minlength=U + I).float().clamp(min=1)
    v = deg[r].rsqrt() * deg[c].rsqrt()
    return csr_from_coo(r, c, v, U + I, U + I)


def timeit(fn, reps, sync):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def ref_topk(ue, ie, k, erp, ecol):
    """Blocked torch reference: matmul a block, mask with -inf, torch.topk."""
    U, I = ue.shape[0], ie.shape[0]
    B = max(1, REF_BUDGET // (I * ue.element_size()))
    out_s, out_i = [], []
    for u0 in range(0, U, B):
        u1 = min(U, u0 + B)
        s = ue[u0:u1] @ ie.T
        a, b = int(erp[u0]), int(erp[u1])
        rows = torch.repeat_interleave(torch.arange(u1 - u0, device=ue.device),
                                       erp[u0:u1 + 1].diff())
        s.index_put_((rows, ecol[a:b]), torch.tensor(float("-inf"), device=ue.device))
        v, i = torch.topk(s, k, dim=1)
        out_s.append(v)
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)


def topk_inputs(size, n_users, device, seed=0):
    U, I, E = SIZES[size]
    u, i = powerlaw_edges(U, I, E, seed)
    R = csr_from_coo(u, i, None, U, I)
    g = torch.Generator().manual_seed(seed + 1)
    users = torch.randperm(U, generator=g)[:n_users].sort().values if n_users < U else torch.arange(U)
    ue = torch.randn(users.numel(), 64, generator=g) * 0.1
    ie = torch.randn(I, 64, generator=g) * 0.1
    cnt = R.rowptr.diff()[users]
    erp = torch.zeros(users.numel() + 1, dtype=torch.long)
    erp[1:] = cnt.cumsum(0)
    ecol = torch.cat([R.col[R.rowptr[x]:R.rowptr[x + 1]] for x in users.tolist()]) \
        if n_users < U else R.col
    return [t.to(device) for t in (ue, ie, erp, ecol)]


def mem_child(which, size, n_users, threads):
    torch.set_num_threads(threads)
    load_extension()
    ue, ie, erp, ecol = topk_inputs(size, n_users, "cpu")
    fn = (lambda: topk_scores(ue, ie, 40, erp, ecol)) if which == "ours" else \
        (lambda: ref_topk(ue, ie, 40, erp, ecol))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
    before = rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    print(json.dumps({"extra_mb": (rss("VmHWM:") - before) / 1024, "seconds": dt,
                      "out_mb": sum(o.numel() * o.element_size() for o in out) / 2**20}))


def peak_mem(which, size, n_users, threads):
    cmd = [sys.executable, __file__, "--_mem", which, size, str(n_users), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--topk-users", type=int, default=4096,
                    help="users scored per top-K timing (sampled; all items always)")
    ap.add_argument("--mem-users", type=int, default=0,
                    help="users for the peak-memory runs at industrial size (0: all)")
    ap.add_argument("--_mem", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._mem:
        w, s, n, t = a._mem
        return mem_child(w, s, int(n), int(t))
    load_extension()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sizes = ["ml-100k", "netflix"] if a.quick else list(SIZES)
    reps = 2 if a.quick else a.reps
    threads = [int(t) for t in a.threads.split(",")] if dev.type == "cpu" else [torch.get_num_threads()]
    n_topk = 1024 if a.quick else a.topk_users
    print(f"device={dev} torch={torch.__version__} reps={reps} (median)")
    print(f"{'op':<8}{'size':<12}{'d/k':>5}{'thr':>4}{'ours ms':>10}{'torch ms':>10}{'speedup':>9}")
    for size in sizes:
        U, I, E = SIZES[size]
        u, i = powerlaw_edges(U, I, E)
        A = lightgcn_adj(u, i, U, I).to(dev)
        At = torch.sparse_csr_tensor(A.rowptr, A.col, A.val, (U + I, U + I))
        for t in threads:
            torch.set_num_threads(t)
            for d in (32, 64):
                x = torch.randn(U + I, d, device=dev, requires_grad=True)
                gy = torch.randn(U + I, d, device=dev)
                ours = timeit(lambda: spmm(A, x).backward(gy), reps, sync)
                ref = timeit(lambda: torch.sparse.mm(At, x).backward(gy), reps, sync)
                print(f"{'spmm':<8}{size:<12}{d:>5}{t:>4}{ours*1e3:>10.1f}{ref*1e3:>10.1f}"
                      f"{ref/ours:>8.2f}x", flush=True)
        ue, ie, erp, ecol = topk_inputs(size, min(U, n_topk), dev)
        for t in threads:
            torch.set_num_threads(t)
            ours = timeit(lambda: topk_scores(ue, ie, 40, erp, ecol), reps, sync)
            ref = timeit(lambda: ref_topk(ue, ie, 40, erp, ecol), reps, sync)
            print(f"{'top-K':<8}{size:<12}{40:>5}{t:>4}{ours*1e3:>10.1f}{ref*1e3:>10.1f}"
                  f"{ref/ours:>8.2f}x   ({ue.shape[0]} users x {I} items)", flush=True)
    if dev.type == "cpu":
        size = "netflix" if a.quick else "industrial"
        n = a.mem_users or SIZES[size][0]
        t = max(threads)
        print(f"peak extra RSS, top-K at {size} ({n} users, {t} threads, k=40):")
        for w in ("ours", "torch"):
            m = peak_mem(w, size, n, t)
            print(f"  {w:<6} {m['extra_mb']:8.1f} MB  (outputs {m['out_mb']:.1f} MB, "
                  f"{m['seconds']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
