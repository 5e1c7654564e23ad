"""Tests for csrc/ops.py against plain torch references."""
import math
import os
import sys

import pytest
import torch

from csrc.ops import csr_from_coo, load_extension, rank_metrics, spmm, topk_scores

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@pytest.fixture(autouse=True, scope="module")
def _setup():
    load_extension()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def powerlaw_coo(n_rows, n_cols, nnz, g, alpha=1.2, empty_rows=()):
    """Random COO with Zipf-like row/col popularity (many light rows, a few hubs)."""
    pr = torch.arange(1, n_rows + 1, dtype=torch.float64) ** -alpha
    pc = torch.arange(1, n_cols + 1, dtype=torch.float64) ** -alpha
    r = torch.multinomial(pr, nnz, replacement=True, generator=g)
    c = torch.multinomial(pc, nnz, replacement=True, generator=g)
    r = torch.randperm(n_rows, generator=g)[r] if n_rows > 1 else r  # scatter the hubs
    keep = ~torch.isin(r, torch.tensor(list(empty_rows), dtype=torch.long))
    return r[keep], c[keep]


def make_csr(n_rows, n_cols, nnz, dtype, g, empty_rows=()):
    r, c = powerlaw_coo(n_rows, n_cols, nnz, g, empty_rows=empty_rows)
    v = torch.randn(r.numel(), generator=g, dtype=dtype)
    return csr_from_coo(r, c, v, n_rows, n_cols)


# ----------------------------------------------------------------------- spmm

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 32, 64])
@pytest.mark.parametrize("shape", [(60, 45, 400), (1, 30, 12), (200, 120, 3000)])
def test_spmm_matches_dense(dtype, d, shape):
    g = gen(hash((d, shape)) % 1000)
    n_rows, n_cols, nnz = shape
    A = make_csr(n_rows, n_cols, nnz, dtype, g, empty_rows=(0, n_rows - 1) if n_rows > 2 else ())
    x = torch.randn(n_cols, d, generator=g, dtype=dtype, requires_grad=True)
    y = spmm(A, x)
    dense = A.to_dense()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}  # hub rows: long sums
    torch.testing.assert_close(y, dense @ x, **tol)
    gy = torch.randn(n_rows, d, generator=g, dtype=dtype)
    y.backward(gy)
    torch.testing.assert_close(x.grad, dense.T @ gy, **tol)


def test_spmm_empty_rows_and_duplicates():
    # Row 1 is empty, (0, 2) appears twice and is summed.
    A = csr_from_coo(torch.tensor([0, 0, 2, 0]), torch.tensor([2, 0, 1, 2]),
                     torch.tensor([1.0, 2.0, 3.0, 4.0]), 3, 3)
    assert A.rowptr.tolist() == [0, 2, 2, 3] and A.col.tolist() == [0, 2, 1]
    assert A.val.tolist() == [2.0, 5.0, 3.0]
    x = torch.arange(6.0).view(3, 2)
    torch.testing.assert_close(spmm(A, x), A.to_dense() @ x)
    assert spmm(A, x)[1].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [16, 32, 64, 128, 24, 7, 0])
def test_spmm_compiled_and_fallback_widths(dtype, d):
    # 16/32/64/128 have register-accumulator kernels, other widths the generic
    # one; 2500 columns make x larger than 1 MB at d >= 128 (float) / 64
    # (double), which turns on the prefetching variant.
    g = gen(20 + d)
    A = make_csr(300, 2500, 20000, dtype, g, empty_rows=(0, 1, 150, 299))
    x = torch.randn(2500, d, generator=g, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(spmm(A, x), A.to_dense() @ x, **tol)
    # The transpose direction (the backward's kernel): hub columns make long
    # sums, so float32 is compared relative to the largest entry.
    ref = A.to_dense().T @ (A.to_dense() @ x)
    got = spmm(A.t(), spmm(A, x))
    if dtype == torch.float32 and d:
        tol = dict(rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(got, ref, **tol)


@pytest.mark.parametrize("threads", [1, 2])
def test_spmm_chunk_boundaries(threads):
    # Rows are split into nnz-balanced chunks (8 per thread): one hub row with
    # most of the nnz, long runs of empty rows, and fewer rows than chunks.
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = gen(30)
        hub = torch.zeros(3000, dtype=torch.long)
        r = torch.cat([hub, torch.randint(0, 40, (200,), generator=g) * 5 + 7])
        c = torch.randint(0, 500, (r.numel(),), generator=g)
        for n_rows in (3, 250):
            rr = r % n_rows
            A = csr_from_coo(rr, c, torch.randn(r.numel(), generator=g, dtype=torch.float64),
                             n_rows, 500)
            for d in (32, 5):
                x = torch.randn(500, d, generator=g, dtype=torch.float64)
                torch.testing.assert_close(spmm(A, x), A.to_dense() @ x)
    finally:
        torch.set_num_threads(n)


def test_spmm_large_outputs_reuse_pooled_memory():
    # Outputs of 16 MB and more come from a pool that keeps freed blocks mapped: a later output of about the same
    # size gets the same memory back, with the last output's values still in it, so every row (empty ones too) must
    # be written. The first output is filled with NaN before it is freed.
    g = gen(31)
    n_rows = n_cols = 70000  # outputs of 70000 x 64 floats = 17.9 MB, the backward's too
    d = 64

    def ref(A, x):
        rows = torch.repeat_interleave(torch.arange(A.rowptr.numel() - 1), A.rowptr.diff())
        return torch.zeros(A.rowptr.numel() - 1, x.shape[1]).index_add_(0, rows, A.val[:, None] * x[A.col])
    A1, A2 = (make_csr(n_rows, n_cols, 60000, torch.float32, g) for _ in range(2))
    x = torch.randn(n_cols, d, generator=g)
    y1 = spmm(A1, x)
    tol = dict(rtol=1e-4, atol=1e-4)  # hub rows: float32 sums in another order
    torch.testing.assert_close(y1, ref(A1, x), **tol)
    address = y1.data_ptr()
    y1.fill_(float("nan"))
    del y1
    y2 = spmm(A2, x)
    assert y2.data_ptr() == address  # the pooled block came back
    assert int((A2.rowptr.diff() == 0).sum()) > 1000  # empty rows, which must be zeros again
    torch.testing.assert_close(y2, ref(A2, x), **tol)
    # The backward's output comes from the same pool (y2's block is still in use).
    xg = x.clone().requires_grad_()
    gy = torch.randn(n_rows, d, generator=g)
    spmm(A1, xg).backward(gy)
    expected = ref(A1.t(), gy)  # hub columns: long float32 sums, compared relative to the largest entry
    torch.testing.assert_close(xg.grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_spmm_fused_validation_zero_width():
    # The CSR check is fused with the kernel; it must still run when d == 0.
    with pytest.raises(RuntimeError, match="col has indices outside"):
        torch.ops.reclm.spmm(*_spmm_args(col=torch.tensor([1, 0, 3]), x=torch.ones(3, 0)))
    with pytest.raises(RuntimeError, match="rowptr must be non-decreasing"):
        torch.ops.reclm.spmm(*_spmm_args(rowptr=torch.tensor([0, 4, 3])))


_ISA_SCRIPT = r"""
import torch
import test_ops as T
torch.set_num_threads(1)
for dtype in (torch.float32, torch.float64):
    for d in (16, 32, 64, 128, 24, 3):
        T.test_spmm_compiled_and_fallback_widths(dtype, d)
    for U, I, D, k in [(37, 300, 16, 10), (130, 2500, 32, 40)]:
        T.test_topk_exclusions(dtype, U, I, D, k)
T.test_topk_ties_integer_embeddings()
T.test_topk_all_ties_and_signed_zero()
T.test_topk_large_k_and_nan_rows(torch.float32)
T.test_topk_large_k_and_nan_rows(torch.float64)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_cpu_isa_fallbacks(isa):
    # The CPU kernels are compiled for AVX-512, AVX2 and the baseline ISA and
    # picked at run time; RECLM_ISA caps the choice (read once per process).
    # The child imports this file (from tests/) and csrc.ops (from the root).
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, RECLM_ISA=isa, OMP_NUM_THREADS="1", PYTHONPATH=path)
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_a_build_killed_midway_does_not_hang_the_next_load():
    # torch's build lock is a plain file: a process killed while building leaves it, and torch's load then waits
    # for it forever. A later load must remove it and go on (here the extension is already built, as after a kill
    # during a rebuild, and torch still takes its lock).
    import subprocess

    from csrc import ops
    load_extension()
    stale = os.path.join(ops._cache_dir(ops._build_cuda()), "lock")
    open(stale, "w").close()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", "from csrc import ops; ops.load_extension(); print('ok')"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    assert "left by a build that was killed" in res.stderr and not os.path.exists(stale)


def test_spmm_gradcheck():
    g = gen(1)
    A = make_csr(12, 9, 40, torch.float64, g)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: spmm(A, x), (x,))
    assert torch.autograd.gradgradcheck(lambda x: spmm(A, x), (x,))


def test_spmm_noncontiguous_x():
    g = gen(2)
    A = make_csr(20, 16, 100, torch.float32, g)
    x = torch.randn(8, 16, generator=g).T  # [16, 8], not contiguous
    torch.testing.assert_close(spmm(A, x), A.to_dense() @ x)


def test_spmm_val_not_differentiable():
    g = gen(3)
    A = make_csr(5, 4, 10, torch.float64, g)
    A = A._replace(val=A.val.clone().requires_grad_())
    x = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    with pytest.raises(RuntimeError, match="val/t_val are not differentiable"):
        spmm(A, x).sum().backward()


def test_spmm_opcheck():
    g = gen(4)
    A = make_csr(15, 11, 50, torch.float64, g)
    x = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.reclm.spmm.default, tuple(A[:6]) + (x,))


def _spmm_args(**over):
    A = csr_from_coo(torch.tensor([0, 1, 1]), torch.tensor([1, 0, 2]), torch.ones(3), 2, 3)
    args = dict(zip(["rowptr", "col", "val", "t_rowptr", "t_col", "t_val"], A[:6]))
    args["x"] = torch.ones(3, 4)
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize("over, match", [
    (dict(rowptr=torch.tensor([0, 1, 3], dtype=torch.int32)), "rowptr must be int64"),
    (dict(col=torch.tensor([1, 0, 2], dtype=torch.int32)), "col must be int64"),
    (dict(val=torch.ones(3, dtype=torch.int64)), "val must have the dtype of x"),
    (dict(val=torch.ones(3, dtype=torch.float64)), "val must have the dtype of x"),
    (dict(x=torch.ones(4, 4)), "t_rowptr has 4 entries but x has 4 rows"),
    (dict(x=torch.ones(3, 4, dtype=torch.int64)), "x must be float32 or float64"),
    (dict(col=torch.tensor([1, 0, 3])), "col has indices outside"),
    (dict(col=torch.tensor([1, 2, 0])), "col must be sorted"),
    (dict(rowptr=torch.tensor([0, 2, 1])), "rowptr must start at 0 and end at nnz"),
    (dict(val=torch.ones(2)), "val has 2 entries but col has 3"),
    (dict(t_col=torch.tensor([0, 1])), "t_col/t_val must have the same nnz"),
])
def test_spmm_bad_inputs(over, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.reclm.spmm(*_spmm_args(**over))


# ---------------------------------------------------------------------- top-k

def ref_topk(ue, ie, k, ex_rp=None, ex_col=None, subset=None):
    """Dense scores, mask, then sort by (-score, item id); NaN never kept."""
    scores = ue @ ie.T
    U, I = scores.shape
    cand = torch.ones(U, I, dtype=torch.bool)
    if subset is not None:
        cand[:] = False
        cand[:, subset] = True
    if ex_rp is not None:
        rows = torch.repeat_interleave(torch.arange(U), ex_rp.diff())
        cand[rows, ex_col] = False
    cand &= ~scores.isnan()
    out_s = torch.full((U, k), -math.inf, dtype=ue.dtype)
    out_i = torch.full((U, k), -1, dtype=torch.long)
    for u in range(U):
        items = cand[u].nonzero().flatten()  # ascending id
        s = scores[u, items]
        order = torch.sort(s, descending=True, stable=True).indices[:k]  # ties: lower id
        out_s[u, :order.numel()] = s[order]
        out_i[u, :order.numel()] = items[order]
    return out_s, out_i


def random_exclusions(U, I, per_user, g):
    r, c = powerlaw_coo(U, I, U * per_user, g)
    E = csr_from_coo(r, c, None, U, I)  # sorted, unique per row
    return E.rowptr, E.col


def check_topk(got, ref, exact_indices):
    torch.testing.assert_close(got[0], ref[0])
    if exact_indices:
        assert torch.equal(got[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("U, I, D, k", [(37, 300, 16, 10), (1, 50, 1, 5), (130, 2500, 32, 40)])
def test_topk_exclusions(dtype, U, I, D, k):
    g = gen(U + I)
    ue = torch.randn(U, D, generator=g, dtype=dtype)
    ie = torch.randn(I, D, generator=g, dtype=dtype)
    erp, ecol = random_exclusions(U, I, 8, g)
    got = topk_scores(ue, ie, k, erp, ecol)
    ref = ref_topk(ue, ie, k, erp, ecol)
    check_topk(got, ref, exact_indices=False)
    # Indices must point at the returned scores and never at an excluded item.
    torch.testing.assert_close((ue.unsqueeze(1) * ie[got[1]]).sum(-1), got[0])
    for u in range(U):
        assert not set(got[1][u].tolist()) & set(ecol[erp[u]:erp[u + 1]].tolist())


def test_topk_ties_integer_embeddings():
    g = gen(5)
    ue = torch.randint(-2, 3, (70, 4), generator=g).double()
    ie = torch.randint(-2, 3, (3000, 4), generator=g).double()  # > one item tile
    erp, ecol = random_exclusions(70, 3000, 20, g)
    check_topk(topk_scores(ue, ie, 25, erp, ecol), ref_topk(ue, ie, 25, erp, ecol), True)
    ie[5] = float("nan")  # NaN scores are skipped
    check_topk(topk_scores(ue, ie, 25), ref_topk(ue, ie, 25), True)


def test_topk_all_ties_and_signed_zero():
    # Every score equal (0.0 or -0.0, which compare equal): the k lowest
    # non-excluded ids, over rows long enough for the per-row lower bound and
    # buffer overflows while ties are being kept.
    g = gen(12)
    U, I, k = 20, 5000, 40
    ue = torch.zeros(U, 8)
    ue[::2, 0] = -1.0  # even users: products -1 * 0 = -0.0
    ie = torch.zeros(I, 8)
    erp, ecol = random_exclusions(U, I, 30, g)
    got = topk_scores(ue, ie, k, erp, ecol)
    check_topk(got, ref_topk(ue, ie, k, erp, ecol), True)
    # Two score levels: ties at the k-th best straddle tiles.
    ie[:, 1] = (torch.arange(I) % 7 == 3).float()
    ue[:, 1] = 1.0
    check_topk(topk_scores(ue, ie, k, erp, ecol), ref_topk(ue, ie, k, erp, ecol), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_large_k_and_nan_rows(dtype):
    # k too large for the per-row bound (2k groups > the scratch, or rows too
    # short) takes the fill path; NaN items and all-NaN users are never kept.
    g = gen(13)
    U, I = 12, 2600
    ue = torch.randint(-3, 4, (U, 6), generator=g).to(dtype)
    ie = torch.randint(-3, 4, (I, 6), generator=g).to(dtype)
    ie[::3] = float("nan")
    ue[5] = float("nan")
    for k in (1, 128, 129, 300, 700, 2000):  # 128 | 129: the last rank-placed output | the first sorted one
        check_topk(topk_scores(ue, ie, k), ref_topk(ue, ie, k), True)


def test_topk_validation_memo_sees_inplace_changes():
    # Passed checks are remembered per tensor; an in-place change re-checks.
    g = gen(14)
    ue, ie = torch.randn(6, 4, generator=g), torch.randn(50, 4, generator=g)
    erp, ecol = random_exclusions(6, 50, 4, g)
    sub = torch.arange(0, 50, 2)
    for _ in range(2):
        check_topk(topk_scores(ue, ie, 3, erp, ecol, sub), ref_topk(ue, ie, 3, erp, ecol, sub), True)
    ecol[0] = 99
    with pytest.raises(RuntimeError, match="exclude_col has indices outside"):
        topk_scores(ue, ie, 3, erp, ecol)
    sub[1] = 0
    with pytest.raises(RuntimeError, match="item_subset must be sorted and unique"):
        topk_scores(ue, ie, 3, item_subset=sub)


def test_topk_subset_and_fill():
    g = gen(6)
    U, I = 40, 2600
    ue = torch.randint(-3, 4, (U, 8), generator=g).float()
    ie = torch.randint(-3, 4, (I, 8), generator=g).float()
    subset = torch.randperm(I, generator=g)[:2100].sort().values
    erp, ecol = random_exclusions(U, I, 30, g)
    check_topk(topk_scores(ue, ie, 30, erp, ecol, subset),
               ref_topk(ue, ie, 30, erp, ecol, subset), True)
    # k larger than the candidate count: -inf / -1 fill after the real ones.
    small = torch.tensor([3, 17, 1000])
    got = topk_scores(ue, ie, 6, erp, ecol, small)
    check_topk(got, ref_topk(ue, ie, 6, erp, ecol, small), True)
    assert (got[1][:, 3:] == -1).all() and torch.isinf(got[0][:, 3:]).all()
    s, i = topk_scores(ue, ie, 0)
    assert s.shape == (U, 0) and i.shape == (U, 0)
    s, i = topk_scores(ue, ie, 3, item_subset=torch.zeros(0, dtype=torch.long))
    assert (i == -1).all()


def test_topk_streamed_candidates_use_large_blocks():
    # Candidate matrices over 8 MB (csrc topk_tile) are scored in 256-user x 1024-item tiles: two user blocks, the
    # last one partial, and item tiles cut mid-row, with and without a subset; integer embeddings make ties exact.
    g = gen(8)
    U, I, D = 300, 33000, 64
    ue = torch.randint(-2, 3, (U, D), generator=g).float()
    ie = torch.randint(-2, 3, (I, D), generator=g).float()
    erp, ecol = random_exclusions(U, I, 20, g)
    check_topk(topk_scores(ue, ie, 25, erp, ecol), ref_topk(ue, ie, 25, erp, ecol), True)
    subset = torch.randperm(I, generator=g)[:32800].sort().values  # 32800 x 64 floats: still over 8 MB
    check_topk(topk_scores(ue, ie, 25, erp, ecol, subset), ref_topk(ue, ie, 25, erp, ecol, subset), True)


def test_topk_noncontiguous_and_detached():
    g = gen(7)
    ue = torch.randn(8, 20, generator=g).T.requires_grad_()  # [20, 8]
    ie = torch.randn(8, 100, generator=g).T
    s, i = topk_scores(ue, ie, 7)
    check_topk((s, i), ref_topk(ue.detach(), ie, 7), True)
    assert not s.requires_grad


def test_topk_opcheck():
    g = gen(8)
    ue = torch.randn(9, 6, generator=g, requires_grad=True)
    ie = torch.randn(70, 6, generator=g)
    erp, ecol = random_exclusions(9, 70, 5, g)
    op = torch.ops.reclm.topk_scores.default
    torch.library.opcheck(op, (ue, ie, erp, ecol, 5, None))
    torch.library.opcheck(op, (ue, ie, erp, ecol, 5, torch.arange(0, 70, 3)))


def _topk_args(**over):
    args = dict(user_emb=torch.ones(2, 3), item_emb=torch.ones(5, 3),
                exclude_rowptr=torch.tensor([0, 2, 3]), exclude_col=torch.tensor([1, 3, 0]),
                k=2, item_subset=None)
    args.update(over)
    return list(args.values())


@pytest.mark.parametrize("over, match", [
    (dict(k=-1), "k must be >= 0"),
    (dict(item_emb=torch.ones(5, 4)), "user_emb dim 3 != item_emb dim 4"),
    (dict(item_emb=torch.ones(5, 3, dtype=torch.float64)), "item_emb dtype"),
    (dict(user_emb=torch.ones(2, 3, dtype=torch.int64), item_emb=torch.ones(5, 3, dtype=torch.int64)),
     "user_emb must be float32 or float64"),
    (dict(exclude_rowptr=torch.tensor([0, 2, 3], dtype=torch.int32)), "exclude_rowptr must be int64"),
    (dict(exclude_rowptr=torch.tensor([0, 3])), "exclude_rowptr has 2 entries"),
    (dict(exclude_col=torch.tensor([3, 1, 0])), "exclude_col must be sorted"),
    (dict(exclude_col=torch.tensor([1, 5, 0])), "exclude_col has indices outside"),
    (dict(item_subset=torch.tensor([2, 1])), "item_subset must be sorted and unique"),
    (dict(item_subset=torch.tensor([1, 1])), "item_subset must be sorted and unique"),
    (dict(item_subset=torch.tensor([0, 7])), "item_subset has ids outside"),
    (dict(item_subset=torch.tensor([0, 1], dtype=torch.int32)), "item_subset must be int64"),
    (dict(item_emb=torch.ones(1, 3).expand(2**31, 3)), r"at most 2\^31 - 1 items"),  # no memory: a view
])
def test_topk_bad_inputs(over, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.reclm.topk_scores(*_topk_args(**over))


# -------------------------------------------------------------------- metrics

def test_rank_metrics_hand_computed():
    topk = torch.tensor([[5, 1, 7, 2],     # test {1, 2, 9}: hits at ranks 1, 3
                         [3, -1, -1, -1],  # test {3}: fewer test items than K
                         [0, 1, 2, 3],     # no test items
                         [4, 4, 6, 8]])    # test {8, 8 (dup)}: hit at rank 3
    rp = torch.tensor([0, 3, 4, 4, 6])
    col = torch.tensor([2, 1, 9, 3, 8, 8])
    m = rank_metrics(topk, rp, col, [2, 4])
    d = [1 / math.log2(r + 2) for r in range(4)]
    torch.testing.assert_close(m["recall@2"], torch.tensor([1 / 3, 1.0, math.nan, 0.0],
                                                           dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(m["recall@4"], torch.tensor([2 / 3, 1.0, math.nan, 1.0],
                                                           dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(m["ndcg@2"], torch.tensor(
        [d[1] / (d[0] + d[1]), 1.0, math.nan, 0.0], dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(m["ndcg@4"], torch.tensor(
        [(d[1] + d[3]) / (d[0] + d[1] + d[2]), 1.0, math.nan, d[3] / d[0]],
        dtype=torch.float64), equal_nan=True)
    with pytest.raises(ValueError, match="ks entry 5"):
        rank_metrics(topk, rp, col, [5])
    with pytest.raises(ValueError, match="test_rowptr has 3 entries"):
        rank_metrics(topk, rp[:3], col, [2])


# ----------------------------------------------------------------------- CUDA

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 32, 64, 100])
def test_spmm_cuda(dtype, d):
    g = gen(9)
    A = make_csr(300, 200, 5000, dtype, g, empty_rows=(0, 7))
    x = torch.randn(200, d, generator=g, dtype=dtype)
    gy = torch.randn(300, d, generator=g, dtype=dtype)
    xc = x.cuda().requires_grad_()
    y = spmm(A.to("cuda"), xc)
    y.backward(gy.cuda())
    torch.testing.assert_close(y.cpu(), A.to_dense() @ x)
    torch.testing.assert_close(xc.grad.cpu(), A.to_dense().T @ gy)


@needs_cuda
@pytest.mark.parametrize("d", [5, 32, 64, 128, 130])
@pytest.mark.parametrize("aligned", [True, False])
def test_spmm_cuda_hub_rows_and_widths(d, aligned):
    # The CUDA kernel splits the entries into equal chunks, whatever the rows:
    # a hub row spans many chunks, runs of empty rows fall on chunk edges, and
    # x is read 1, 2 or 4 floats at a time depending on d and its alignment.
    g = gen(31)
    hub = torch.full((3000,), 3, dtype=torch.long)
    r = torch.cat([hub, torch.randint(0, 40, (700,), generator=g) * 5 + 7])
    c = torch.randint(0, 500, (r.numel(),), generator=g)
    A = csr_from_coo(r, c, torch.randn(r.numel(), generator=g), 250, 500)
    x = torch.randn(500 * d + 1, generator=g)
    x = x[:-1] if aligned else x[1:]  # storage offset of one float: no wide loads
    x = x.view(500, d).cuda() if aligned else x.cuda().view(500, d)
    # float32 sums of 3000 terms in another order: compare with a float64 reference
    ref = A.to(dtype=torch.float64).to_dense() @ x.cpu().double()
    torch.testing.assert_close(spmm(A.to("cuda"), x).cpu().double(), ref, rtol=1e-5, atol=1e-4)


@needs_cuda
def test_spmm_cuda_checks_and_opcheck():
    g = gen(10)
    A = make_csr(30, 20, 100, torch.float64, g).to("cuda")
    x = torch.randn(20, 5, generator=g, dtype=torch.float64).cuda().requires_grad_()
    torch.library.opcheck(torch.ops.reclm.spmm.default, tuple(A[:6]) + (x,))
    with pytest.raises(RuntimeError, match="rowptr is on cuda:0 but the other inputs are on cpu"):
        torch.ops.reclm.spmm(*A[:6], x.detach().cpu())
    bad = A.col.clone()
    bad[0] = 99
    with pytest.raises(RuntimeError, match="col has indices outside"):
        torch.ops.reclm.spmm(A.rowptr, bad, *A[2:6], x)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_cuda(dtype):
    g = gen(11)
    U, I = 50, 3000
    ue = torch.randint(-2, 3, (U, 8), generator=g).to(dtype)
    ie = torch.randint(-2, 3, (I, 8), generator=g).to(dtype)
    erp, ecol = random_exclusions(U, I, 40, g)
    subset = torch.randperm(I, generator=g)[:1500].sort().values
    for k, sub in [(40, None), (7, subset), (300, None), (5, torch.tensor([4, 9]))]:
        ref = ref_topk(ue, ie, k, erp, ecol, sub)
        got = topk_scores(ue.cuda(), ie.cuda(), k, erp.cuda(), ecol.cuda(),
                          None if sub is None else sub.cuda())
        check_topk((got[0].cpu(), got[1].cpu()), ref, True)
    # A score tile of 1 MiB holds 13 users of 20,000 candidates: 4 tiles; the
    # hub users have more exclusions than fit in shared memory (1024).
    ie = torch.randint(-2, 3, (20_000, 8), generator=g).to(dtype)
    erp, ecol = random_exclusions(U, ie.shape[0], 400, g)
    assert erp.diff().max() > 1024 and erp.diff().min() < 1024
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECLM_TOPK_TILE_MB", "1")
        got = topk_scores(ue.cuda(), ie.cuda(), 20, erp.cuda(), ecol.cuda())
    check_topk((got[0].cpu(), got[1].cpu()), ref_topk(ue, ie, 20, erp, ecol, None), True)
    op = torch.ops.reclm.topk_scores.default
    torch.library.opcheck(op, (ue.cuda().requires_grad_(), ie.cuda(), erp.cuda(), ecol.cuda(),
                               5, None))
