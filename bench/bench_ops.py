"""Benchmark of the reclm ops against plain torch; prints a markdown report.

Run from the repository root, as a module:

    python -m bench.bench_ops            # full: 3 sizes, d=32/64, 1 and 2 threads (minutes)
    python -m bench.bench_ops --quick    # ml-100k + netflix, 1 thread, no memory runs
    python -m bench.bench_ops --device cuda

Everything printed is markdown, ready to paste into bench/RESULTS.md: a header
(machine, torch, command, load average before and after), then one table.

Rows. spmm fwd: ``spmm(A, x)`` vs ``torch.sparse.mm`` on a ``sparse_csr_tensor``
of the same CSR, with A the LightGCN-normalised bipartite adjacency
((U+I) x (U+I)) of a synthetic power-law graph. spmm fwd+bwd: the same plus
``.backward(gy)`` w.r.t. x, whose .grad is set to None before each call (as a
training step's ``zero_grad()`` leaves it), so that a backward never also adds
into the previous call's gradient, which neither a training loop nor 07 (where
x is not a leaf) does. top-K: k=40 over all items with the training
items excluded, d=64, ours vs a blocked torch reference (matmul a block of
users, -inf via index_put_, torch.topk; the block is sized to a 256 MB score
buffer). For top-K the table also gives the GEMM floor: the same
user-block x item-tile GEMMs ours runs (topk_tile), into one cache-resident
tile, with no selection (CPU: measured on one thread and divided by the thread
count, i.e. ideal scaling; CUDA: the reference's blocked GEMMs without
masking/top-k).

Trust on a shared machine. Each (ours, reference) pair is timed interleaved,
``--reps`` times (the order alternates), after a warm-up; the table gives the
median and the spread (min-max) of each, and the speedup is the ratio of the
medians. For every timed call the bench also records the CPU time the process
got; a row where the median call got less than 90% of the CPU it asked for
(threads x wall time) is marked *contended*: other processes were running on its cores,
and its numbers (thread scaling above all) are not to be trusted. The header
gives the 1-minute load average before and after the run.

Peak extra memory (CPU, not with --quick): each measurement runs in a fresh
subprocess that builds its inputs, calls malloc_trim, records VmRSS, resets
the kernel's peak-RSS counter (/proc/self/clear_refs = 5), runs the op once
and reads VmHWM; extra = VmHWM - VmRSS before. It counts everything the op
touches (outputs included); it is what the OS saw, not an allocator estimate.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from csrc.ops import csr_from_coo, load_extension, spmm, topk_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def time_pair(fns, reps, sync, threads):
    """Time the callables in ``fns`` interleaved (order alternating per rep)
    after one warm-up each. Returns per callable (sorted wall times, median CPU
    share), CPU share = process CPU time / (wall time x threads)."""
    for f in fns:
        f()
    sync()
    walls = [[] for _ in fns]
    share = [[] for _ in fns]
    for r in range(reps):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            c, t = time.process_time(), time.perf_counter()
            fns[i]()
            sync()
            w, cpu = time.perf_counter() - t, time.process_time() - c
            walls[i].append(w)
            # CPU time is meaningful only for CPU work
            share[i].append(cpu / (w * threads) if sync is _nosync else 1.0)
    return [(sorted(w), statistics.median(s)) for w, s in zip(walls, share)]


def fwd_bwd(op, adj, x, gy):
    """op(adj, x).backward(gy) as a training step runs it: x.grad set to None first (zero_grad's default), so the
    backward does not also add into the previous call's gradient."""
    x.grad = None
    op(adj, x).backward(gy)


def _nosync():
    pass


def fmt(ts):
    """median (min-max) in ms"""
    med = statistics.median(ts)
    return f"{med * 1e3:.2f} ({ts[0] * 1e3:.2f}-{ts[-1] * 1e3:.2f})"


def topk_tile(n_items, d, elem_size):
    """(users, items) per GEMM of our CPU top-K: csrc/reclm_ops.cpp topk_tile, whose comment says why."""
    return (256, 1024) if n_items * d * elem_size > 8 << 20 else (64, 2048)


def gemm_floor(ue, ie, sync):
    """The GEMMs of our CPU top-K (its user-block x item-tile shape) into one
    cache-resident tile, no selection."""
    if ue.is_cuda:
        B = max(1, REF_BUDGET // (ie.shape[0] * ue.element_size()))
        return lambda: [ue[u0:u0 + B] @ ie.T for u0 in range(0, ue.shape[0], B)]
    nu, nt = topk_tile(*ie.shape, ie.element_size())
    buf = torch.empty(nu, nt, dtype=ue.dtype)

    def run():
        for u0 in range(0, ue.shape[0], nu):
            ub = ue[u0:u0 + nu]
            for t0 in range(0, ie.shape[0], nt):
                it = ie[t0:t0 + nt]
                torch.mm(ub, it.T, out=buf[:ub.shape[0], :it.shape[0]])
    return run


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
    cmd = [sys.executable, "-m", "bench.bench_ops", "--_mem", which, size, str(n_users), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} CPUs"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default=None, help="comma list (CPU); default 1,2 (--quick: 1)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sizes", default=None, help="comma list of " + ",".join(SIZES))
    ap.add_argument("--topk-users", type=int, default=4096,
                    help="users scored per top-K timing (sampled; all items always)")
    ap.add_argument("--mem-users", type=int, default=0,
                    help="users for the peak-memory runs at industrial size (0: all)")
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--_mem", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._mem:
        w, s, n, t = a._mem
        return mem_child(w, s, int(n), int(t))
    import warnings
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    load_extension()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else _nosync
    sizes = a.sizes.split(",") if a.sizes else (["ml-100k", "netflix"] if a.quick else list(SIZES))
    reps = 3 if a.quick and a.reps == 7 else a.reps
    if cuda:
        threads = [torch.get_num_threads()]
    else:
        threads = [int(t) for t in (a.threads or ("1" if a.quick else "1,2")).split(",")]
    n_topk = 1024 if a.quick else a.topk_users
    load0 = os.getloadavg()
    dev_name = torch.cuda.get_device_name(dev) if cuda else cpu_name()
    print(f"Machine: {dev_name}; torch {torch.__version__}; device {dev}. "
          f"Command: `{' '.join(['python -m bench.bench_ops'] + sys.argv[1:])}`; {reps} interleaved reps "
          f"after a warm-up, median (min-max) in ms.\n")
    rows = []
    print("References: spmm `torch.sparse.mm` on a CSR tensor (MKL on CPU, cuSPARSE on CUDA); "
          "top-K the blocked torch top-k (see bench/bench_ops.py).\n")
    head = ("| op | size | d / k | threads | ours ms | reference ms | speedup | note |\n"
            "|---|---|---|---|---|---|---|---|")
    print(head, flush=True)

    def row(op, size, dk, t, o, r, note=""):
        (to, so), (tr, sr) = o, r
        cont = min(so, sr) < 0.9
        note = "; ".join(x for x in (note, f"contended (CPU share {min(so, sr):.0%})" if cont else "") if x)
        line = (f"| {op} | {size} | {dk} | {t} | {fmt(to)} | {fmt(tr)} | "
                f"{statistics.median(tr) / statistics.median(to):.2f}x | {note} |")
        rows.append(line)
        print(line, flush=True)

    for size in sizes:
        U, I, E = SIZES[size]
        u, i = powerlaw_edges(U, I, E)
        A = lightgcn_adj(u, i, U, I).to(dev)
        At = torch.sparse_csr_tensor(A.rowptr, A.col, A.val, (U + I, U + I))
        desc = f"{size} ({U + I} nodes, {A.col.numel()} nnz)"
        for t in threads:
            torch.set_num_threads(t)
            for d in (32, 64):
                x = torch.randn(U + I, d, device=dev)
                o, r = time_pair([lambda: spmm(A, x), lambda: torch.sparse.mm(At, x)], reps, sync, t)
                row("spmm fwd", desc, d, t, o, r)
                xg = x.clone().requires_grad_()
                gy = torch.randn(U + I, d, device=dev)
                o, r = time_pair([lambda: fwd_bwd(spmm, A, xg, gy), lambda: fwd_bwd(torch.sparse.mm, At, xg, gy)],
                                 reps, sync, t)
                row("spmm fwd+bwd", desc, d, t, o, r)
        ue, ie, erp, ecol = topk_inputs(size, min(U, n_topk), dev)
        torch.set_num_threads(1)
        (fl, _), = time_pair([gemm_floor(ue, ie, sync)], reps, sync, 1)
        for t in threads:
            torch.set_num_threads(t)
            o, r = time_pair([lambda: topk_scores(ue, ie, 40, erp, ecol),
                              lambda: ref_topk(ue, ie, 40, erp, ecol)], reps, sync, t)
            floor = statistics.median(fl) / (1 if cuda else t)
            row("top-K", f"{size} ({ue.shape[0]} users x {I} items)", 40, t, o, r,
                f"GEMM floor {floor * 1e3:.2f} ms, ours/floor {statistics.median(o[0]) / floor:.2f}")
    load1 = os.getloadavg()
    print(f"\nLoad average (1 min) before {load0[0]:.2f}, after {load1[0]:.2f} "
          f"({os.cpu_count()} CPUs).")
    if not cuda and not a.quick and not a.no_mem:
        size = "industrial"
        n = a.mem_users or SIZES[size][0]
        t = max(threads)
        print(f"\nPeak extra RSS, top-K at {size} ({n} users, {t} threads, k=40):\n")
        print("| | peak extra RSS | of which outputs | wall time |\n|---|---|---|---|")
        for w in ("ours", "torch"):
            m = peak_mem(w, size, n, t)
            print(f"| {w} | {m['extra_mb']:.1f} MB | {m['out_mb']:.1f} MB | {m['seconds']:.1f} s |",
                  flush=True)


if __name__ == "__main__":
    main()
