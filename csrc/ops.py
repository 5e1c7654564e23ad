"""RecLM custom ops (namespace ``reclm``): sparse propagation and top-K retrieval.

The C++/CUDA sources next to this file (``reclm_ops.cpp``, ``reclm_ops_cuda.cu``
and the header they share, ``reclm_ops.h``) are built with
``torch.utils.cpp_extension.load`` on first use and cached in
``$RECLM_CACHE/ops/<torch version>_<cpu|cuXXX>`` (``RECLM_CACHE`` defaults to
``~/.cache/reclm``); an edit to any of them rebuilds it. The CUDA file is
compiled only when a GPU and CUDA_HOME are present (``RECLM_BUILD_CUDA=1``
forces it, for compile-only checks).

Ops
---
``spmm(A, x)`` -> ``A @ x`` for a CSR matrix ``A`` (float32/float64) and a dense
``x [n_cols, d]``. The op takes the CSR of ``A`` *and* of ``A^T`` (see
:class:`CSR`): the backward is ``grad_x = A^T @ grad_y``, computed by the same
row-parallel kernel on the transpose, so no atomics are needed and symmetry
is never assumed. Only ``x`` is differentiable; asking for a gradient w.r.t.
the values raises in the backward. ``col`` must be sorted within each row and
in range, ``rowptr`` non-decreasing from 0 to nnz: checked on every CPU call
inside the kernel (no separate pass; a bad entry is never read), and on CUDA
once per (rowptr, col) pair (one device sync, then remembered until either
tensor is modified in place). The transpose's contents are trusted (only its
sizes are checked) until the backward uses it. CPU kernel: rows in chunks of
equal nnz + rows, d = 16/32/64/128 summed in SIMD registers (one store per
row), other widths in the output row; compiled for AVX-512, AVX2 and the
baseline ISA and picked at run time (``RECLM_ISA=avx2|base`` caps it).
CPU outputs of 16 MB or more come from a pool of up to four freed blocks
whose pages stay mapped (no page faults on reuse). CUDA kernel: one warp per
chunk of equal nnz (rows cut by a chunk edge are summed by a second kernel in
chunk order: deterministic, no atomics).

``topk_scores(user_emb, item_emb, k, ...)`` -> ``(scores, indices)``, both
``[U, k]``: for each user the k items with the highest dot product, excluding
that user's items in an exclusion CSR (sorted per row), optionally only over
``item_subset`` (sorted, unique ids). Only a tile of the U x I score matrix
exists at any time (CPU: 64 users x 2048 items per thread, 256 x 1024 when
the candidates' embeddings exceed 8 MB, one GEMM each, then a vectorised scan
against each user's running k-th best score; CUDA: a cuBLAS GEMM per tile of
users x all candidates, 1 GiB by default or ``RECLM_TOPK_TILE_MB``, then one
block per user selects from its row). The exclusion CSR and the subset are
checked once per tensor and remembered until modified in place, as for spmm
on CUDA. Conventions:

* order: score descending; equal scores -> lower item id first;
* NaN scores are never returned (treated as "not a candidate");
* fewer than k candidates -> the remaining slots hold score ``-inf`` and
  index ``-1``;
* not differentiable (inputs are detached; only a fake impl is registered).

``rank_metrics(topk_indices, test_rowptr, test_col, ks)`` -> per-user
``recall@K`` and ``ndcg@K`` (float64, vectorised torch). Users without test
items get NaN.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import threading
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

_HERE = os.path.dirname(os.path.abspath(__file__))
_LOCK = threading.Lock()
_LOADED = False
_HEADERS = ("reclm_ops.h",)  # included by the sources; see _headers_define

__all__ = ["CSR", "csr_from_coo", "spmm", "topk_scores", "rank_metrics", "load_extension"]


# --------------------------------------------------------------------- build

def _build_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("RECLM_BUILD_CUDA") == "1":
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError("RECLM_BUILD_CUDA=1 needs a CUDA build of torch and CUDA_HOME "
                               f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME})")
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def _headers_define() -> str:
    """``-DRECLM_HEADERS_SHA=<digest of the headers>``. torch's ``load`` decides
    whether to rebuild from the sources it is given and the compiler flags, and a
    header cannot be given as a source (it would be compiled on its own), so the
    headers' digest goes into the flags: an edit to a header changes the compile
    commands and rebuilds both files (ninja's depfiles would catch it too)."""
    h = hashlib.sha256()
    for name in _HEADERS:
        with open(os.path.join(_HERE, name), "rb") as f:
            h.update(f.read())
    return "-DRECLM_HEADERS_SHA=" + h.hexdigest()[:16]


def _cache_dir(cuda: bool) -> str:
    root = os.environ.get("RECLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reclm")
    tag = "cu" + torch.version.cuda.replace(".", "") if cuda else "cpu"
    return os.path.join(root, "ops", f"{torch.__version__}_{tag}")


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """Hold an flock on the build directory around torch's ``load``. torch's own lock
    is a file that only its creator removes: a process killed mid-build (Ctrl-C,
    OOM, a session's end) leaves it behind and every later process waits on it
    forever, silently. An flock dies with its process, so whoever holds it knows
    that a leftover torch lock file is stale and removes it."""
    fd = os.open(os.path.join(build_dir, ".reclm-build.flock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"reclm ops: waiting for another process building in {build_dir}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            print(f"reclm ops: removing {stale}, left by a build that was killed", file=sys.stderr, flush=True)
            os.remove(stale)
        yield
    finally:
        os.close(fd)


def load_extension() -> None:
    """Build (first time) and load the ops into this process; idempotent.

    Concurrent processes (pytest workers, 06's shards) wait for one build instead
    of corrupting the cache (see _build_lock).
    """
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise RuntimeError(
                f"reclm ops: no C++ compiler found (looked for {cxx!r}, from $CXX or the default "
                "'c++'). Install one (e.g. `apt-get install g++` or `conda install gxx_linux-64`) "
                "or point $CXX at it.")
        # The venv's ninja must be found even when the venv is not activated.
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        from torch.utils.cpp_extension import load

        cuda = _build_cuda()
        sources = [os.path.join(_HERE, "reclm_ops.cpp")]
        if cuda:
            sources.append(os.path.join(_HERE, "reclm_ops_cuda.cu"))
        build_dir = _cache_dir(cuda)
        os.makedirs(build_dir, exist_ok=True)
        headers = _headers_define()
        with _build_lock(build_dir):
            load(name="reclm_ops", sources=sources, extra_cflags=["-O3", "-fopenmp", headers],
                 extra_cuda_cflags=["-O3", headers], extra_ldflags=["-fopenmp"],
                 extra_include_paths=[_HERE], build_directory=build_dir, is_python_module=False,
                 verbose=os.environ.get("RECLM_VERBOSE") == "1")
        _register_python_impls()
        _LOADED = True


def _register_python_impls() -> None:
    @torch.library.register_fake("reclm::spmm")
    def _spmm_fake(rowptr, col, val, t_rowptr, t_col, t_val, x):
        torch._check(x.dim() == 2, lambda: "reclm::spmm: x must be 2-D")
        torch._check(rowptr.dtype == torch.int64, lambda: "reclm::spmm: rowptr must be int64")
        torch._check(val.dtype == x.dtype, lambda: "reclm::spmm: val must have the dtype of x")
        torch._check(t_rowptr.shape[0] == x.shape[0] + 1,
                     lambda: "reclm::spmm: t_rowptr must have x.size(0)+1 entries")
        return x.new_empty((rowptr.shape[0] - 1, x.shape[1]))

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])

    def _backward(ctx, grad):
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[5]:
            raise RuntimeError("reclm::spmm: val/t_val are not differentiable "
                               "(only the gradient w.r.t. x is implemented)")
        rowptr, col, val, t_rowptr, t_col, t_val = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[6]:
            gx = torch.ops.reclm.spmm(t_rowptr, t_col, t_val, rowptr, col, val, grad)
        return None, None, None, None, None, None, gx

    torch.library.register_autograd("reclm::spmm", _backward, setup_context=_setup)

    # Non-differentiable: no autograd formula, only the fake impl.
    @torch.library.register_fake("reclm::topk_scores")
    def _topk_fake(user_emb, item_emb, exclude_rowptr, exclude_col, k, item_subset):
        torch._check(k >= 0, lambda: "reclm::topk_scores: k must be >= 0")
        torch._check(user_emb.shape[1] == item_emb.shape[1],
                     lambda: "reclm::topk_scores: user_emb and item_emb dims differ")
        n = user_emb.shape[0]
        return user_emb.new_empty((n, k)), user_emb.new_empty((n, k), dtype=torch.int64)


# ---------------------------------------------------------------------- spmm

class CSR(NamedTuple):
    """A sparse matrix in CSR together with the CSR of its transpose."""
    rowptr: Tensor
    col: Tensor
    val: Tensor
    t_rowptr: Tensor
    t_col: Tensor
    t_val: Tensor
    n_rows: int
    n_cols: int

    def t(self) -> "CSR":
        return CSR(self.t_rowptr, self.t_col, self.t_val, self.rowptr, self.col, self.val,
                   self.n_cols, self.n_rows)

    def to(self, device=None, dtype=None) -> "CSR":
        i = lambda a: a.to(device=device)
        v = lambda a: a.to(device=device, dtype=dtype)
        return CSR(i(self.rowptr), i(self.col), v(self.val), i(self.t_rowptr), i(self.t_col),
                   v(self.t_val), self.n_rows, self.n_cols)

    def to_dense(self) -> Tensor:
        rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.col.device),
                                       self.rowptr.diff())
        out = self.val.new_zeros((self.n_rows, self.n_cols))
        return out.index_put_((rows, self.col), self.val, accumulate=True)


def _compress(row: Tensor, col: Tensor, val: Tensor, n_rows: int, n_cols: int):
    key = row * n_cols + col
    key, perm = torch.sort(key)
    key, inv = torch.unique_consecutive(key, return_inverse=True)
    v = val.new_zeros(key.numel()).index_add_(0, inv, val[perm])  # duplicates summed
    r = torch.div(key, n_cols, rounding_mode="floor")
    rowptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=row.device)
    rowptr[1:] = torch.bincount(r, minlength=n_rows).cumsum(0)
    return rowptr, key - r * n_cols, v


def csr_from_coo(row: Tensor, col: Tensor, val: Optional[Tensor], n_rows: int,
                 n_cols: int) -> CSR:
    """CSR (both directions) from COO triplets. Duplicate (row, col) pairs are
    summed; nothing else is added (no symmetrisation, no self-loops).
    ``val=None`` means all ones (float32)."""
    row, col = row.reshape(-1).long(), col.reshape(-1).long()
    if row.shape != col.shape:
        raise ValueError(f"csr_from_coo: row has {row.numel()} entries but col has {col.numel()}")
    if val is None:
        val = torch.ones(row.numel(), dtype=torch.float32, device=row.device)
    val = val.reshape(-1)
    if val.numel() != row.numel():
        raise ValueError(f"csr_from_coo: val has {val.numel()} entries, expected {row.numel()}")
    if row.numel() and (int(row.min()) < 0 or int(row.max()) >= n_rows):
        raise ValueError(f"csr_from_coo: row has indices outside [0, n_rows={n_rows})")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= n_cols):
        raise ValueError(f"csr_from_coo: col has indices outside [0, n_cols={n_cols})")
    rp, c, v = _compress(row, col, val, n_rows, n_cols)
    trp, tc, tv = _compress(col, row, val, n_cols, n_rows)
    return CSR(rp, c, v, trp, tc, tv, int(n_rows), int(n_cols))


def spmm(A: CSR, x: Tensor) -> Tensor:
    """``A @ x`` (differentiable w.r.t. ``x`` only)."""
    load_extension()
    return torch.ops.reclm.spmm(A.rowptr, A.col, A.val, A.t_rowptr, A.t_col, A.t_val, x)


# ---------------------------------------------------------------------- top-k

_NO_EXCL: dict = {}


def _no_exclusions(n_users: int, device) -> tuple[Tensor, Tensor]:
    """An empty exclusion CSR, reused per (n_users, device): the op checks an
    exclusion CSR once per tensor (a device sync on CUDA), so fresh empty
    tensors on every call would cost that check every call."""
    key = (int(n_users), str(device))
    if key not in _NO_EXCL:
        if len(_NO_EXCL) >= 16:
            _NO_EXCL.clear()
        _NO_EXCL[key] = (torch.zeros(n_users + 1, dtype=torch.int64, device=device),
                         torch.zeros(0, dtype=torch.int64, device=device))
    return _NO_EXCL[key]


def topk_scores(user_emb: Tensor, item_emb: Tensor, k: int,
                exclude_rowptr: Optional[Tensor] = None, exclude_col: Optional[Tensor] = None,
                item_subset: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Top-k items per user by dot product; see the module docstring for the
    tie rule and the ``-inf``/``-1`` fill. Exclusions default to none."""
    load_extension()
    if (exclude_rowptr is None) != (exclude_col is None):
        raise ValueError("topk_scores: pass both exclude_rowptr and exclude_col, or neither")
    if exclude_rowptr is None:
        exclude_rowptr, exclude_col = _no_exclusions(user_emb.shape[0], user_emb.device)
    return torch.ops.reclm.topk_scores(user_emb.detach(), item_emb.detach(), exclude_rowptr,
                                       exclude_col, int(k), item_subset)


# -------------------------------------------------------------------- metrics

def rank_metrics(topk_indices: Tensor, test_rowptr: Tensor, test_col: Tensor,
                 ks: Sequence[int]) -> dict[str, Tensor]:
    """Per-user Recall@K and NDCG@K (float64 ``[U]`` each, keys ``recall@K``,
    ``ndcg@K``). Recall = hits in the top K / |test items|; NDCG = DCG / IDCG
    with gain 1/log2(rank+2) and IDCG over min(|test|, K) positions. Repeated
    test items count once; ``-1`` slots never hit; users without test items
    get NaN (the caller skips and counts them)."""
    if topk_indices.dim() != 2:
        raise ValueError(f"rank_metrics: topk_indices must be 2-D, got {tuple(topk_indices.shape)}")
    U, W = topk_indices.shape
    if test_rowptr.numel() != U + 1:
        raise ValueError(f"rank_metrics: test_rowptr has {test_rowptr.numel()} entries, "
                         f"expected n_users+1 = {U + 1}")
    for K in ks:
        if not 0 < K <= W:
            raise ValueError(f"rank_metrics: ks entry {K} must be in [1, topk width {W}]")
    dev = topk_indices.device
    topk = topk_indices.long()
    test_rowptr, test_col = test_rowptr.to(dev).long(), test_col.to(dev).long()
    users = torch.repeat_interleave(torch.arange(U, device=dev), test_rowptr.diff())
    n = int(max(int(test_col.max()) if test_col.numel() else 0,
                int(topk.max()) if topk.numel() else 0)) + 1
    keys = torch.unique(users * n + test_col)  # sorted, duplicates dropped
    n_test = torch.bincount(torch.div(keys, n, rounding_mode="floor"), minlength=U)
    q = torch.arange(U, device=dev).unsqueeze(1) * n + topk
    if keys.numel():
        pos = torch.searchsorted(keys, q).clamp_(max=keys.numel() - 1)
        hits = (keys[pos] == q) & (topk >= 0)
    else:
        hits = torch.zeros_like(topk, dtype=torch.bool)
    hits = hits.double()
    disc = 1.0 / torch.log2(torch.arange(W, device=dev, dtype=torch.float64) + 2)
    cum = disc.cumsum(0)
    has = n_test > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=dev)
    out = {}
    for K in ks:
        h = hits[:, :K]
        recall = h.sum(1) / n_test.clamp(min=1)
        idcg = cum[(n_test.clamp(max=K) - 1).clamp(min=0)]
        ndcg = (h * disc[:K]).sum(1) / idcg
        out[f"recall@{K}"] = torch.where(has, recall, nan)
        out[f"ndcg@{K}"] = torch.where(has, ndcg, nan)
    return out
