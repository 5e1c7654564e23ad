// reclm ops: schemas, argument checks shared with the CUDA file, CPU kernels.
// Python side (fake tensors, autograd, wrappers, docs) lives in csrc/ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <limits>
#include <vector>

namespace reclm {

using at::Tensor;

// ---------------------------------------------------------------- checks
// Metadata checks only (no data reads), so the CUDA file can reuse them.

static void check_index(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name,
              " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
}

static void check_same_device(const Tensor& ref, const Tensor& t, const char* op,
                              const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the other inputs are on ", ref.device());
}

void check_spmm_args(const Tensor& rowptr, const Tensor& col, const Tensor& val,
                     const Tensor& t_rowptr, const Tensor& t_col, const Tensor& t_val,
                     const Tensor& x) {
  const char* op = "reclm::spmm";
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [n_cols, d], got shape ", x.sizes());
  const Tensor* idx[] = {&rowptr, &col, &t_rowptr, &t_col};
  const char* idx_names[] = {"rowptr", "col", "t_rowptr", "t_col"};
  for (int i = 0; i < 4; ++i) {
    check_index(*idx[i], op, idx_names[i]);
    check_same_device(x, *idx[i], op, idx_names[i]);
  }
  const Tensor* vals[] = {&val, &t_val};
  const char* val_names[] = {"val", "t_val"};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(vals[i]->scalar_type() == x.scalar_type(), op, ": ", val_names[i],
                " must have the dtype of x (", x.scalar_type(), "), got ",
                vals[i]->scalar_type());
    TORCH_CHECK(vals[i]->dim() == 1, op, ": ", val_names[i], " must be 1-D");
    check_same_device(x, *vals[i], op, val_names[i]);
  }
  TORCH_CHECK(rowptr.numel() >= 1, op, ": rowptr must have n_rows+1 >= 1 entries");
  TORCH_CHECK(val.numel() == col.numel(), op, ": val has ", val.numel(),
              " entries but col has ", col.numel());
  TORCH_CHECK(t_rowptr.numel() == x.size(0) + 1, op, ": t_rowptr has ",
              t_rowptr.numel(), " entries but x has ", x.size(0),
              " rows (n_cols); expected n_cols+1 = ", x.size(0) + 1);
  TORCH_CHECK(t_col.numel() == col.numel() && t_val.numel() == col.numel(), op,
              ": t_col/t_val must have the same nnz as col (", col.numel(), "), got ",
              t_col.numel(), "/", t_val.numel());
}

void check_topk_args(const Tensor& user_emb, const Tensor& item_emb,
                     const Tensor& exclude_rowptr, const Tensor& exclude_col, int64_t k,
                     const c10::optional<Tensor>& item_subset) {
  const char* op = "reclm::topk_scores";
  TORCH_CHECK(user_emb.scalar_type() == at::kFloat || user_emb.scalar_type() == at::kDouble,
              op, ": user_emb must be float32 or float64, got ", user_emb.scalar_type());
  TORCH_CHECK(item_emb.scalar_type() == user_emb.scalar_type(), op,
              ": item_emb dtype ", item_emb.scalar_type(), " differs from user_emb dtype ",
              user_emb.scalar_type());
  TORCH_CHECK(user_emb.dim() == 2, op, ": user_emb must be 2-D, got ", user_emb.sizes());
  TORCH_CHECK(item_emb.dim() == 2, op, ": item_emb must be 2-D, got ", item_emb.sizes());
  TORCH_CHECK(user_emb.size(1) == item_emb.size(1), op, ": user_emb dim ",
              user_emb.size(1), " != item_emb dim ", item_emb.size(1));
  check_same_device(user_emb, item_emb, op, "item_emb");
  check_index(exclude_rowptr, op, "exclude_rowptr");
  check_index(exclude_col, op, "exclude_col");
  check_same_device(user_emb, exclude_rowptr, op, "exclude_rowptr");
  check_same_device(user_emb, exclude_col, op, "exclude_col");
  TORCH_CHECK(exclude_rowptr.numel() == user_emb.size(0) + 1, op, ": exclude_rowptr has ",
              exclude_rowptr.numel(), " entries, expected n_users+1 = ",
              user_emb.size(0) + 1);
  TORCH_CHECK(k >= 0, op, ": k must be >= 0, got ", k);
  if (item_subset.has_value()) {
    check_index(*item_subset, op, "item_subset");
    check_same_device(user_emb, *item_subset, op, "item_subset");
  }
}

// Data check for item_subset with ATen ops (works on both devices; eval-time op).
void check_item_subset(const Tensor& s, int64_t n_items) {
  if (s.numel() == 0) return;
  TORCH_CHECK(s.min().item<int64_t>() >= 0 && s.max().item<int64_t>() < n_items,
              "reclm::topk_scores: item_subset has ids outside [0, n_items=", n_items, ")");
  if (s.numel() > 1)
    TORCH_CHECK((s.slice(0, 1) > s.slice(0, 0, -1)).all().item<bool>(),
                "reclm::topk_scores: item_subset must be sorted and unique");
}

// CSR data check on CPU: rowptr monotone from 0 to nnz, col in range and
// non-decreasing within each row. Run before kernels so a bad rowptr can
// never send a kernel out of bounds.
static void check_csr_cpu(const Tensor& rowptr, const Tensor& col, int64_t n_cols,
                          const char* op, const char* rp_name, const char* col_name) {
  const int64_t n = rowptr.numel() - 1, nnz = col.numel();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[n] == nnz, op, ": ", rp_name, " must start at 0 and end at nnz=",
              nnz, " (", col_name, ".numel()), got ", rp[0], " and ", rp[n]);
  std::atomic<int> bad{0};  // 1: rowptr decreasing, 2: col out of range, 4: col unsorted
  at::parallel_for(0, n, 2048, [&](int64_t r0, int64_t r1) {
    int b = 0;
    for (int64_t r = r0; r < r1 && !b; ++r) {
      if (rp[r + 1] < rp[r]) { b |= 1; break; }
      for (int64_t p = rp[r]; p < rp[r + 1]; ++p) {
        if (c[p] < 0 || c[p] >= n_cols) b |= 2;
        if (p > rp[r] && c[p] < c[p - 1]) b |= 4;
      }
    }
    if (b) bad.fetch_or(b);
  });
  const int b = bad.load();
  TORCH_CHECK(!(b & 1), op, ": ", rp_name, " must be non-decreasing");
  TORCH_CHECK(!(b & 2), op, ": ", col_name, " has indices outside [0, ", n_cols, ")");
  TORCH_CHECK(!(b & 4), op, ": ", col_name, " must be sorted within each row");
}

// ---------------------------------------------------------------- spmm

// Row ranges of roughly equal nnz + rows: degrees are power-law, so an even
// split by rows would leave one thread with most of the work.
static std::vector<int64_t> balanced_chunks(const int64_t* rp, int64_t n, int64_t nchunks) {
  std::vector<int64_t> b(nchunks + 1, n);
  b[0] = 0;
  const double total = static_cast<double>(rp[n]) + n;
  for (int64_t c = 1; c < nchunks; ++c) {
    const double target = total * c / nchunks;
    int64_t lo = b[c - 1], hi = n;  // first r with rp[r] + r >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<double>(rp[mid]) + mid < target) lo = mid + 1; else hi = mid;
    }
    b[c] = lo;
  }
  return b;
}

template <typename scalar_t>
static void spmm_rows(const int64_t* rp, const int64_t* col, const scalar_t* val,
                      const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t d,
                      int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* __restrict__ yr = y + r * d;
    for (int64_t j = 0; j < d; ++j) yr[j] = 0;
    for (int64_t p = rp[r]; p < rp[r + 1]; ++p) {
      const scalar_t v = val[p];
      const scalar_t* __restrict__ xr = x + col[p] * d;
      for (int64_t j = 0; j < d; ++j) yr[j] += v * xr[j];  // vectorised over d
    }
  }
}

Tensor spmm_cpu(const Tensor& rowptr_, const Tensor& col_, const Tensor& val_,
                const Tensor& t_rowptr, const Tensor& t_col, const Tensor& t_val,
                const Tensor& x_) {
  check_spmm_args(rowptr_, col_, val_, t_rowptr, t_col, t_val, x_);
  const Tensor rowptr = rowptr_.contiguous(), col = col_.contiguous(),
               val = val_.contiguous(), x = x_.contiguous();
  check_csr_cpu(rowptr, col, x.size(0), "reclm::spmm", "rowptr", "col");
  const int64_t n = rowptr.numel() - 1, d = x.size(1);
  Tensor y = at::empty({n, d}, x.options());
  if (n == 0 || d == 0) return y;
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const auto chunks = balanced_chunks(rp, n, std::max<int64_t>(1, at::get_num_threads()) * 8);
  const int64_t nchunks = static_cast<int64_t>(chunks.size()) - 1;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "reclm_spmm_cpu", [&] {
    const int64_t* c = col.data_ptr<int64_t>();
    const scalar_t* v = val.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch)
        spmm_rows<scalar_t>(rp, c, v, xp, yp, d, chunks[ch], chunks[ch + 1]);
    });
  });
  return y;
}

// ---------------------------------------------------------------- top-k

template <typename scalar_t>
struct Cand {
  scalar_t s;
  int64_t i;
};

// Total order used everywhere: higher score first, then lower item id.
template <typename scalar_t>
static inline bool better(const Cand<scalar_t>& a, const Cand<scalar_t>& b) {
  return a.s > b.s || (a.s == b.s && a.i < b.i);
}

constexpr int64_t kUserBlock = 64;
constexpr int64_t kItemTile = 2048;
constexpr int64_t kScanChunk = 16;

// Per-user candidate buffer, kept in increasing item-id order: items that
// beat the threshold are appended; when it is full, the k-th best score is
// found by nth_element on a scratch copy of the scores (plain floats: much
// cheaper than a heap update per accepted item) and a stable compaction keeps
// the best k, so among equal scores the lower ids (earlier) stay.
template <typename scalar_t>
struct TopkBuf {
  scalar_t* s;
  int64_t* i;
  int64_t n;
  scalar_t thr;  // k-th best kept score, valid once `full`
  bool full;
};

template <typename scalar_t>
static void shrink(TopkBuf<scalar_t>& b, int64_t k, scalar_t* tmp) {
  std::copy(b.s, b.s + b.n, tmp);
  std::nth_element(tmp, tmp + k - 1, tmp + b.n, std::greater<scalar_t>());
  const scalar_t t = tmp[k - 1];
  int64_t gt = 0;
  for (int64_t r = 0; r < b.n; ++r) gt += b.s[r] > t;
  int64_t eq_left = k - gt, w = 0;
  for (int64_t r = 0; r < b.n; ++r) {
    if (b.s[r] > t || (b.s[r] == t && eq_left-- > 0)) {
      b.s[w] = b.s[r];
      b.i[w++] = b.i[r];
    }
  }
  b.n = k;
  b.thr = t;  // a later item with score == t has a higher id, so it loses
  b.full = true;
}

template <typename scalar_t>
static void scan_row(TopkBuf<scalar_t>& b, const scalar_t* row, int64_t nt, const int64_t* ids,
                     int64_t t0, int64_t k, int64_t cap, scalar_t* tmp) {
  int64_t j = 0;
  for (; j < nt && !b.full; ++j) {  // until k candidates: take every non-NaN
    const scalar_t v = row[j];
    if (v == v) {
      b.s[b.n] = v;
      b.i[b.n++] = ids ? ids[j] : t0 + j;
      if (b.n == k) shrink(b, k, tmp);
    }
  }
  for (; j + kScanChunk <= nt; j += kScanChunk) {
    const scalar_t thr = b.thr;
    int any = 0;  // fixed trip count: vectorised; NaN never passes
    for (int64_t q = 0; q < kScanChunk; ++q) any |= row[j + q] > thr;
    if (!any) continue;
    // Branch-free append (cap leaves kScanChunk slots of slack).
    int64_t n = b.n;
    for (int64_t q = 0; q < kScanChunk; ++q) {
      b.s[n] = row[j + q];
      b.i[n] = ids ? ids[j + q] : t0 + j + q;
      n += row[j + q] > thr;
    }
    b.n = n;
    if (n > cap - kScanChunk) shrink(b, k, tmp);
  }
  for (; j < nt; ++j) {
    const scalar_t v = row[j];
    if (v > b.thr) {
      b.s[b.n] = v;
      b.i[b.n++] = ids ? ids[j] : t0 + j;
      if (b.n > cap - kScanChunk) shrink(b, k, tmp);
    }
  }
}

template <typename scalar_t>
static void topk_cpu_impl(const Tensor& ue, const Tensor& ie, const int64_t* ex_rp,
                          const int64_t* ex, int64_t k, const Tensor& subset, bool has_subset,
                          Tensor& out_s, Tensor& out_i) {
  const int64_t U = ue.size(0), D = ue.size(1);
  const int64_t n_cand = has_subset ? subset.numel() : ie.size(0);
  const int64_t* sub = has_subset ? subset.data_ptr<int64_t>() : nullptr;
  scalar_t* os = out_s.data_ptr<scalar_t>();
  int64_t* oi = out_i.data_ptr<int64_t>();
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t n_blocks = (U + kUserBlock - 1) / kUserBlock;
  const int64_t cap = 4 * k + 2 * kScanChunk;  // > k + kScanChunk: room for a chunk
  using C = Cand<scalar_t>;

  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    // Thread-local buffers: this is all the extra memory the op uses per thread.
    Tensor scores_buf = at::empty({kUserBlock * kItemTile}, ue.options());
    Tensor item_buf = has_subset ? at::empty({kItemTile, D}, ie.options()) : Tensor();
    std::vector<scalar_t> cand_s(kUserBlock * cap), tmp(cap);
    std::vector<int64_t> cand_i(kUserBlock * cap);
    std::vector<C> fin(k);
    std::vector<TopkBuf<scalar_t>> bufs(kUserBlock);
    std::vector<int64_t> ex_pos(kUserBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t u0 = blk * kUserBlock, nu = std::min(kUserBlock, U - u0);
      const Tensor ublk = ue.narrow(0, u0, nu);
      for (int64_t r = 0; r < nu; ++r) {
        bufs[r] = TopkBuf<scalar_t>{cand_s.data() + r * cap, cand_i.data() + r * cap, 0, ninf, false};
        ex_pos[r] = ex_rp[u0 + r];
      }
      for (int64_t t0 = 0; t0 < n_cand; t0 += kItemTile) {
        const int64_t nt = std::min(kItemTile, n_cand - t0);
        Tensor itile;
        if (has_subset) {
          itile = item_buf.narrow(0, 0, nt);
          at::index_select_out(itile, ie, 0, subset.narrow(0, t0, nt));
        } else {
          itile = ie.narrow(0, t0, nt);
        }
        Tensor sc = scores_buf.narrow(0, 0, nu * nt).view({nu, nt});
        at::mm_out(sc, ublk, itile.t());
        scalar_t* sp = sc.data_ptr<scalar_t>();
        const int64_t* ids = has_subset ? sub + t0 : nullptr;
        const int64_t first = has_subset ? ids[0] : t0, last = has_subset ? ids[nt - 1] : t0 + nt - 1;
        for (int64_t r = 0; r < nu; ++r) {
          scalar_t* row = sp + r * nt;
          // Excluded items become NaN, which the scan never keeps.
          int64_t& ep = ex_pos[r];
          const int64_t ee = ex_rp[u0 + r + 1];
          for (; ep < ee && ex[ep] <= last; ++ep) {
            if (ex[ep] < first) continue;
            if (!has_subset) {
              row[ex[ep] - t0] = nan;
            } else {
              const int64_t* f = std::lower_bound(ids, ids + nt, ex[ep]);
              if (f != ids + nt && *f == ex[ep]) row[f - ids] = nan;
            }
          }
          scan_row(bufs[r], row, nt, ids, t0, k, cap, tmp.data());
        }
      }
      for (int64_t r = 0; r < nu; ++r) {
        TopkBuf<scalar_t>& b = bufs[r];
        if (b.n > k) shrink(b, k, tmp.data());
        for (int64_t j = 0; j < b.n; ++j) fin[j] = C{b.s[j], b.i[j]};
        std::sort(fin.begin(), fin.begin() + b.n, [](const C& x, const C& y) { return better(x, y); });
        scalar_t* srow = os + (u0 + r) * k;
        int64_t* irow = oi + (u0 + r) * k;
        for (int64_t j = 0; j < k; ++j) {
          const bool ok = j < b.n;
          srow[j] = ok ? fin[j].s : ninf;
          irow[j] = ok ? fin[j].i : -1;
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> topk_scores_cpu(const Tensor& user_emb, const Tensor& item_emb,
                                           const Tensor& exclude_rowptr,
                                           const Tensor& exclude_col, int64_t k,
                                           const c10::optional<Tensor>& item_subset) {
  check_topk_args(user_emb, item_emb, exclude_rowptr, exclude_col, k, item_subset);
  const Tensor ue = user_emb.contiguous(), ie = item_emb.contiguous();
  const Tensor erp = exclude_rowptr.contiguous(), ecol = exclude_col.contiguous();
  check_csr_cpu(erp, ecol, ie.size(0), "reclm::topk_scores", "exclude_rowptr", "exclude_col");
  const bool has_subset = item_subset.has_value();
  const Tensor subset = has_subset ? item_subset->contiguous() : Tensor();
  if (has_subset) check_item_subset(subset, ie.size(0));
  const int64_t U = ue.size(0);
  Tensor out_s = at::empty({U, k}, ue.options());
  Tensor out_i = at::empty({U, k}, ue.options().dtype(at::kLong));
  if (U == 0 || k == 0) return {out_s, out_i};
  AT_DISPATCH_FLOATING_TYPES(ue.scalar_type(), "reclm_topk_cpu", [&] {
    topk_cpu_impl<scalar_t>(ue, ie, erp.data_ptr<int64_t>(), ecol.data_ptr<int64_t>(), k,
                            subset, has_subset, out_s, out_i);
  });
  return {out_s, out_i};
}

// topk_scores is not differentiable: this Autograd kernel only drops below
// autograd and re-dispatches, so outputs never require grad (and the ATen
// calls inside the backend kernels never record a graph).
std::tuple<Tensor, Tensor> topk_scores_autograd(const Tensor& user_emb, const Tensor& item_emb,
                                                const Tensor& exclude_rowptr,
                                                const Tensor& exclude_col, int64_t k,
                                                const c10::optional<Tensor>& item_subset) {
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("reclm::topk_scores", "")
                       .typed<decltype(topk_scores_autograd)>();
  return op.call(user_emb, item_emb, exclude_rowptr, exclude_col, k, item_subset);
}

}  // namespace reclm

TORCH_LIBRARY(reclm, m) {
  m.def("spmm(Tensor rowptr, Tensor col, Tensor val, Tensor t_rowptr, Tensor t_col, "
        "Tensor t_val, Tensor x) -> Tensor");
  m.def("topk_scores(Tensor user_emb, Tensor item_emb, Tensor exclude_rowptr, "
        "Tensor exclude_col, int k, Tensor? item_subset) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reclm, CPU, m) {
  m.impl("spmm", &reclm::spmm_cpu);
  m.impl("topk_scores", &reclm::topk_scores_cpu);
}

TORCH_LIBRARY_IMPL(reclm, Autograd, m) {
  m.impl("topk_scores", &reclm::topk_scores_autograd);
}
