// reclm ops: schemas, argument checks shared with the CUDA file (declared in reclm_ops.h), CPU kernels.
// Python side (fake tensors, autograd, wrappers, docs) lives in csrc/ops.py.
#include "reclm_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <type_traits>
#include <limits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace reclm {

static std::string shape(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + num(s[i]);
  return out + "]";
}

// ---------------------------------------------------------------- checks
// Metadata checks only (no data reads), so the CUDA file can reuse them.

static void check_index(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name,
              " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", shape(t.sizes()));
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
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [n_cols, d], got shape ", shape(x.sizes()));
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
  TORCH_CHECK(val.numel() == col.numel(), op, ": val has ", num(val.numel()),
              " entries but col has ", num(col.numel()));
  TORCH_CHECK(t_rowptr.numel() == x.size(0) + 1, op, ": t_rowptr has ",
              num(t_rowptr.numel()), " entries but x has ", num(x.size(0)),
              " rows (n_cols); expected n_cols+1 = ", num(x.size(0) + 1));
  TORCH_CHECK(t_col.numel() == col.numel() && t_val.numel() == col.numel(), op,
              ": t_col/t_val must have the same nnz as col (", num(col.numel()), "), got ",
              num(t_col.numel()), "/", num(t_val.numel()));
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
  TORCH_CHECK(user_emb.dim() == 2, op, ": user_emb must be 2-D, got ", shape(user_emb.sizes()));
  TORCH_CHECK(item_emb.dim() == 2, op, ": item_emb must be 2-D, got ", shape(item_emb.sizes()));
  TORCH_CHECK(user_emb.size(1) == item_emb.size(1), op, ": user_emb dim ",
              num(user_emb.size(1)), " != item_emb dim ", num(item_emb.size(1)));
  check_same_device(user_emb, item_emb, op, "item_emb");
  check_index(exclude_rowptr, op, "exclude_rowptr");
  check_index(exclude_col, op, "exclude_col");
  check_same_device(user_emb, exclude_rowptr, op, "exclude_rowptr");
  check_same_device(user_emb, exclude_col, op, "exclude_col");
  TORCH_CHECK(exclude_rowptr.numel() == user_emb.size(0) + 1, op, ": exclude_rowptr has ",
              num(exclude_rowptr.numel()), " entries, expected n_users+1 = ",
              num(user_emb.size(0) + 1));
  TORCH_CHECK(k >= 0, op, ": k must be >= 0, got ", num(k));
  // The CPU kernel holds candidates by int32 position.
  TORCH_CHECK(item_emb.size(0) <= std::numeric_limits<int32_t>::max(), op,
              ": at most 2^31 - 1 items, got ", num(item_emb.size(0)));
  if (item_subset.has_value()) {
    check_index(*item_subset, op, "item_subset");
    check_same_device(user_emb, *item_subset, op, "item_subset");
  }
}

// Validation memo. A data check costs an O(nnz) pass and, on CUDA, a
// device->host sync per call; the same graph / exclusion lists are passed for
// thousands of calls, so a passed check is remembered per (kind, tensors, n)
// and skipped while the tensors are unchanged. An entry holds weak references
// to the TensorImpls (so their addresses cannot be reused by new tensors while
// the entry lives) and matches only the same live TensorImpl with the same
// data pointer, size and version counter: an in-place torch op bumps the
// version, so a modified tensor is checked again. Writes that bypass torch's
// version counter (a raw data pointer, DLPack) are not seen.
namespace {
struct MemoEntry {
  int kind;
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> a, b;
  const void* a_data;
  const void* b_data;
  int64_t a_numel, b_numel, n;
  int64_t a_ver, b_ver;
};
std::mutex g_memo_mu;
std::deque<MemoEntry> g_memo;
constexpr size_t kMemoSize = 32;

bool memo_match(const MemoEntry& e, int kind, const Tensor& a, const Tensor& b, int64_t n) {
  auto same = [](const c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>& w,
                 const Tensor& t, const void* data, int64_t numel, int64_t ver) {
    if (!t.defined()) return w._unsafe_get_target() == nullptr;
    return w._unsafe_get_target() == t.unsafeGetTensorImpl() && t.data_ptr() == data &&
           t.numel() == numel && t._version() == ver;
  };
  return e.kind == kind && e.n == n && same(e.a, a, e.a_data, e.a_numel, e.a_ver) &&
         same(e.b, b, e.b_data, e.b_numel, e.b_ver);
}
}  // namespace

// Runs `check` unless it already passed for these (unchanged) tensors.
void validate_once(int kind, const Tensor& a, const Tensor& b, int64_t n,
                   const std::function<void()>& check) {
  // Inference tensors have no version counter: always checked.
  if (a.is_inference() || (b.defined() && b.is_inference())) return check();
  {
    std::lock_guard<std::mutex> g(g_memo_mu);
    for (const auto& e : g_memo)
      if (memo_match(e, kind, a, b, n)) return;
  }
  check();  // throws on bad data; nothing is recorded then
  using W = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  auto weak = [](const Tensor& t) {
    return t.defined() ? W(t.getIntrusivePtr())
                       : W(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>());
  };
  MemoEntry e{kind, weak(a), weak(b), a.defined() ? a.data_ptr() : nullptr,
              b.defined() ? b.data_ptr() : nullptr, a.defined() ? a.numel() : 0,
              b.defined() ? b.numel() : 0, n, a.defined() ? a._version() : 0,
              b.defined() ? b._version() : 0};
  std::lock_guard<std::mutex> g(g_memo_mu);
  g_memo.push_back(std::move(e));
  if (g_memo.size() > kMemoSize) g_memo.pop_front();
}

// Data check for item_subset with ATen ops (works on both devices; eval-time op).
void check_item_subset(const Tensor& s, int64_t n_items) {
  if (s.numel() == 0) return;
  TORCH_CHECK(s.min().item<int64_t>() >= 0 && s.max().item<int64_t>() < n_items,
              "reclm::topk_scores: item_subset has ids outside [0, n_items=", num(n_items), ")");
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
              num(nnz), " (", col_name, ".numel()), got ", num(rp[0]), " and ", num(rp[n]));
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
  TORCH_CHECK(!(b & 2), op, ": ", col_name, " has indices outside [0, ", num(n_cols), ")");
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

// The row kernel. Each row is summed in registers (one store per row) when d
// is a compiled width (16/32/64/128): the accumulators are GCC vector types of
// VB bytes, so the loop over d is fully unrolled SIMD. Other widths sum into
// the output row (in L1) with the same vectors plus a scalar tail. The CSR is
// validated here, fused with the gathers (no separate O(nnz) pass): a row
// whose bounds leave [0, nnz] or an entry whose column is out of range is
// skipped (never read) and flagged; the caller raises after the kernel.
// Flags: 1 rowptr decreasing / out of range, 2 col out of range, 4 col unsorted.
//
// always_inline: instantiated only inside the target-specific wrappers below,
// so each copy is compiled for that wrapper's ISA (AVX-512, AVX2, baseline).
constexpr int64_t kPrefetch = 16;  // gathered rows prefetched this many entries ahead

// GCC vector types of VB bytes (aligned(sizeof(T)): loads/stores may be unaligned).
template <typename T, int VB> struct Vec;
#define RECLM_VEC(T, VB) \
  template <> struct Vec<T, VB> { typedef T type __attribute__((vector_size(VB), aligned(sizeof(T)))); };
RECLM_VEC(float, 16) RECLM_VEC(float, 32) RECLM_VEC(float, 64)
RECLM_VEC(double, 16) RECLM_VEC(double, 32) RECLM_VEC(double, 64)
#undef RECLM_VEC
template <typename T, int VB>
using vec_t = typename Vec<T, VB>::type;

template <typename T, int VB, int D, bool PF>
__attribute__((always_inline)) static inline int spmm_rows_fixed(
    const int64_t* __restrict__ rp, const int64_t* __restrict__ col, const T* __restrict__ val,
    const T* __restrict__ x, T* __restrict__ y, int64_t nnz, int64_t n_cols, int64_t r0,
    int64_t r1) {
  using V = vec_t<T, VB>;
  constexpr int W = VB / static_cast<int>(sizeof(T));
  constexpr int NV = D / W;
  static_assert(D % W == 0, "width must be a multiple of the vector");
  const uint64_t ncols = static_cast<uint64_t>(n_cols);
  int bad = 0;
  // One entry: prefetch the row kPrefetch entries ahead, validate, accumulate.
#define RECLM_SPMM_STEP(ACC, P)                                                       \
  {                                                                                   \
    if (PF && (P) + kPrefetch < nnz) {                                                \
      const uint64_t cf = static_cast<uint64_t>(col[(P) + kPrefetch]);                \
      if (cf < ncols) {                                                               \
        const char* xf = reinterpret_cast<const char*>(x + cf * D);                   \
        for (int q = 0; q < D * static_cast<int>(sizeof(T)); q += 64)                 \
          __builtin_prefetch(xf + q, 0, 3);                                           \
      }                                                                               \
    }                                                                                 \
    const int64_t c = col[P];                                                         \
    if (static_cast<uint64_t>(c) < ncols) {                                           \
      bad |= c < prev ? 4 : 0;                                                        \
      prev = c;                                                                       \
      const V v = V{} + val[P];                                                       \
      const V* xr = reinterpret_cast<const V*>(x + c * D);                            \
      for (int k = 0; k < NV; ++k) ACC[k] += v * xr[k];                               \
    } else {                                                                          \
      bad |= 2;                                                                       \
    }                                                                                 \
  }
  for (int64_t r = r0; r < r1; ++r) {
    // Two accumulator sets (even/odd entries): FMA latency, not throughput,
    // bounds a single chain when d is only one or two vectors wide.
    V acc[NV], acc2[NV];
    for (int k = 0; k < NV; ++k) acc[k] = acc2[k] = V{};
    const int64_t a = rp[r], b = rp[r + 1];
    if (a < 0 || b < a || b > nnz) {
      bad |= 1;
    } else {
      int64_t prev = 0;  // col >= 0 once validated, so the first entry passes
      int64_t p = a;
      for (; p + 1 < b; p += 2) {
        RECLM_SPMM_STEP(acc, p)
        RECLM_SPMM_STEP(acc2, p + 1)
      }
      for (; p < b; ++p) RECLM_SPMM_STEP(acc, p)
    }
#undef RECLM_SPMM_STEP
    V* yr = reinterpret_cast<V*>(y + r * D);
    for (int k = 0; k < NV; ++k) yr[k] = acc[k] + acc2[k];
  }
  return bad;
}

template <typename T, int VB>
__attribute__((always_inline)) static inline int spmm_rows_any(
    const int64_t* __restrict__ rp, const int64_t* __restrict__ col, const T* __restrict__ val,
    const T* __restrict__ x, T* __restrict__ y, int64_t d, int64_t nnz, int64_t n_cols,
    int64_t r0, int64_t r1) {
  using V = vec_t<T, VB>;
  constexpr int W = VB / static_cast<int>(sizeof(T));
  const int64_t dv = d - d % W;
  int bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict__ yr = y + r * d;
    for (int64_t j = 0; j < d; ++j) yr[j] = 0;
    const int64_t a = rp[r], b = rp[r + 1];
    if (a < 0 || b < a || b > nnz) { bad |= 1; continue; }
    int64_t prev = 0;
    for (int64_t p = a; p < b; ++p) {
      const int64_t c = col[p];
      if (static_cast<uint64_t>(c) >= static_cast<uint64_t>(n_cols)) { bad |= 2; continue; }
      bad |= (p > a && c < prev) ? 4 : 0;
      prev = c;
      const T s = val[p];
      const V v = V{} + s;
      const T* __restrict__ xr = x + c * d;
      int64_t j = 0;
      for (; j < dv; j += W)
        *reinterpret_cast<V*>(yr + j) += v * *reinterpret_cast<const V*>(xr + j);
      for (; j < d; ++j) yr[j] += s * xr[j];
    }
  }
  return bad;
}

template <typename T, int VB>
__attribute__((always_inline)) static inline int spmm_rows_dispatch(
    const int64_t* rp, const int64_t* col, const T* val, const T* x, T* y, int64_t d,
    int64_t nnz, int64_t n_cols, int64_t r0, int64_t r1) {
  // Prefetching pays only when x does not sit in L2, so it is on only for x over 1 MB (bench/RESULTS.md,
  // section What the spmm kernel does, and what bounds it).
  const bool pf = n_cols * d * static_cast<int64_t>(sizeof(T)) > (int64_t(1) << 20);
#define RECLM_CASE(D)                                                                   \
  case D:                                                                               \
    return pf ? spmm_rows_fixed<T, VB, D, true>(rp, col, val, x, y, nnz, n_cols, r0, r1) \
              : spmm_rows_fixed<T, VB, D, false>(rp, col, val, x, y, nnz, n_cols, r0, r1);
  switch (d) {
    RECLM_CASE(16) RECLM_CASE(32) RECLM_CASE(64) RECLM_CASE(128)
    default: break;
  }
#undef RECLM_CASE
  return spmm_rows_any<T, VB>(rp, col, val, x, y, d, nnz, n_cols, r0, r1);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define RECLM_X86_DISPATCH 1
template <typename T>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) static int spmm_rows_avx512(
    const int64_t* rp, const int64_t* col, const T* val, const T* x, T* y, int64_t d,
    int64_t nnz, int64_t n_cols, int64_t r0, int64_t r1) {
  return spmm_rows_dispatch<T, 64>(rp, col, val, x, y, d, nnz, n_cols, r0, r1);
}
template <typename T>
__attribute__((target("avx2,fma"))) static int spmm_rows_avx2(
    const int64_t* rp, const int64_t* col, const T* val, const T* x, T* y, int64_t d,
    int64_t nnz, int64_t n_cols, int64_t r0, int64_t r1) {
  return spmm_rows_dispatch<T, 32>(rp, col, val, x, y, d, nnz, n_cols, r0, r1);
}
#endif
template <typename T>
static int spmm_rows_base(const int64_t* rp, const int64_t* col, const T* val, const T* x, T* y,
                          int64_t d, int64_t nnz, int64_t n_cols, int64_t r0, int64_t r1) {
  return spmm_rows_dispatch<T, 16>(rp, col, val, x, y, d, nnz, n_cols, r0, r1);
}

// 2: AVX-512, 1: AVX2+FMA, 0: baseline; RECLM_ISA=avx2|base caps it (tests, benches).
static int cpu_isa() {
  static const int isa = [] {
    int best = 0;
#ifdef RECLM_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
    if (best == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      best = 2;
#endif
    const char* cap = std::getenv("RECLM_ISA");
    if (cap && std::string(cap) == "avx2") best = std::min(best, 1);
    if (cap && std::string(cap) == "base") best = 0;
    return best;
  }();
  return isa;
}

template <typename T>
static int spmm_rows(const int64_t* rp, const int64_t* col, const T* val, const T* x, T* y,
                     int64_t d, int64_t nnz, int64_t n_cols, int64_t r0, int64_t r1) {
#ifdef RECLM_X86_DISPATCH
  switch (cpu_isa()) {
    case 2: return spmm_rows_avx512<T>(rp, col, val, x, y, d, nnz, n_cols, r0, r1);
    case 1: return spmm_rows_avx2<T>(rp, col, val, x, y, d, nnz, n_cols, r0, r1);
    default: break;
  }
#endif
  return spmm_rows_base<T>(rp, col, val, x, y, d, nnz, n_cols, r0, r1);
}

// A fresh output of tens of MB is a new mmap whose every page the kernel zeroes on first write (huge pages or
// not), and a LightGCN step propagates into several such outputs and frees them again, so outputs of at least
// kPoolMinBytes come from a small pool: a freed output's pages stay mapped (and huge, where THP allows) for the
// next one of about its size, which then takes no page faults (bench/RESULTS.md, section Ops, "Pooled spmm
// outputs"). At most kPoolBlocks free blocks are kept (older ones are freed; the OS takes the rest at exit).
// Smaller outputs come from torch's allocator (malloc reuses those already).
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kPoolMinBytes = size_t(16) << 20;
constexpr size_t kPoolBlocks = 4;

struct OutputPool {
  std::mutex m;
  std::vector<std::pair<void*, size_t>> free_blocks;  // (pointer, bytes), most recently freed last
};

static OutputPool& output_pool() {
  static OutputPool* pool = new OutputPool();  // leaked on purpose: deleters may run during static destruction
  return *pool;
}

// (pointer, its block's bytes) for an output of `bytes` (a multiple of kHugePage).
static std::pair<void*, size_t> take_block(size_t bytes) {
  OutputPool& pool = output_pool();
  {
    std::lock_guard<std::mutex> g(pool.m);
    auto& fb = pool.free_blocks;
    for (size_t j = fb.size(); j-- > 0;) {  // newest first; a block at most 2x the request (no large waste)
      if (fb[j].second >= bytes && fb[j].second <= 2 * bytes) {
        const auto block = fb[j];
        fb.erase(fb.begin() + j);
        return block;
      }
    }
  }
  void* p = std::aligned_alloc(kHugePage, bytes);
#ifdef MADV_HUGEPAGE
  if (p) madvise(p, bytes, MADV_HUGEPAGE);  // a hint only: where THP is off nothing changes
#endif
  return {p, bytes};
}

static void give_back(void* p, size_t bytes) {
  OutputPool& pool = output_pool();
  void* drop = nullptr;
  {
    std::lock_guard<std::mutex> g(pool.m);
    auto& fb = pool.free_blocks;
    fb.emplace_back(p, bytes);
    if (fb.size() > kPoolBlocks) {  // release the least recently freed
      drop = fb.front().first;
      fb.erase(fb.begin());
    }
  }
  std::free(drop);
}

static Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * opts.dtype().itemsize();
  if (bytes < kPoolMinBytes) return at::empty(sizes, opts);
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  const auto block = take_block(rounded);
  TORCH_CHECK(block.first, "reclm: could not allocate ", num(static_cast<int64_t>(rounded)), " bytes for an output");
  const size_t block_bytes = block.second;
  return at::from_blob(block.first, sizes, [block_bytes](void* q) { give_back(q, block_bytes); }, opts);
}

Tensor spmm_cpu(const Tensor& rowptr_, const Tensor& col_, const Tensor& val_,
                const Tensor& t_rowptr, const Tensor& t_col, const Tensor& t_val,
                const Tensor& x_) {
  const char* op = "reclm::spmm";
  check_spmm_args(rowptr_, col_, val_, t_rowptr, t_col, t_val, x_);
  const Tensor rowptr = rowptr_.contiguous(), col = col_.contiguous(),
               val = val_.contiguous(), x = x_.contiguous();
  const int64_t n = rowptr.numel() - 1, d = x.size(1), nnz = col.numel(), n_cols = x.size(0);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[n] == nnz, op, ": rowptr must start at 0 and end at nnz=", num(nnz),
              " (col.numel()), got ", num(rp[0]), " and ", num(rp[n]));
  Tensor y = empty_output({n, d}, x.options());
  if (n == 0) return y;
  // Equal-work chunks (nnz + rows), several per thread so a hub row costs
  // little imbalance; d == 0 still runs the (fused) validation.
  const auto chunks = balanced_chunks(rp, n, std::max<int64_t>(1, at::get_num_threads()) * 8);
  const int64_t nchunks = static_cast<int64_t>(chunks.size()) - 1;
  std::atomic<int> bad{0};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "reclm_spmm_cpu", [&] {
    const int64_t* c = col.data_ptr<int64_t>();
    const scalar_t* v = val.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      int b = 0;
      for (int64_t ch = c0; ch < c1; ++ch)
        b |= spmm_rows<scalar_t>(rp, c, v, xp, yp, d, nnz, n_cols, chunks[ch], chunks[ch + 1]);
      if (b) bad.fetch_or(b);
    });
  });
  const int b = bad.load();
  TORCH_CHECK(!(b & 1), op, ": rowptr must be non-decreasing");
  TORCH_CHECK(!(b & 2), op, ": col has indices outside [0, ", num(n_cols), ")");
  TORCH_CHECK(!(b & 4), op, ": col must be sorted within each row");
  return y;
}

// ---------------------------------------------------------------- top-k

// Tile shapes of the CPU top-K: users per GEMM x items per GEMM. Each user
// block reads the whole candidate matrix once; when that matrix is larger than
// kStreamBytes it comes from L3 or memory every time, and a block 4x larger
// reads it 4x less often (bench/RESULTS.md, section Ops, "Top-K tile shape").
// Smaller candidate sets stay cache-resident, and 64-user blocks keep per-user
// buffers in L2 and balance threads when users are few.
// bench/bench_ops.py's topk_tile mirrors this rule for its GEMM floor.
struct TopkTile {
  int64_t users, items;
};
constexpr int64_t kStreamBytes = 8 << 20;
static inline TopkTile topk_tile(int64_t n_cand, int64_t d, int64_t elem) {
  return n_cand * d * elem > kStreamBytes ? TopkTile{256, 1024} : TopkTile{64, 2048};
}
constexpr int64_t kScanChunk = 16;  // >= the widest vector (16 floats)
constexpr int64_t kMaxGroups = 1024;  // row_bound scratch

// Scores as unsigned integers with the same order (NaN never gets here; -0.0
// is mapped to +0.0 first, so keys are equal exactly when the scores are).
static inline uint32_t order_key(float f) {
  f += 0.0f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
static inline uint64_t order_key(double f) {
  f += 0.0;
  uint64_t u;
  std::memcpy(&u, &f, 8);
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
template <typename T> struct KeyOf;
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

// Per-user candidate buffer, kept in increasing item-id order: items that
// beat the threshold are appended; when it is full, `shrink` keeps the best k.
// Items are held by their candidate position (the item id, or its index in
// item_subset, which is sorted: the same order), as int32 to halve the traffic.
template <typename scalar_t>
struct TopkBuf {
  scalar_t* s;
  int32_t* i;
  int64_t n;
  scalar_t thr;  // k-th best kept score, valid once `full`
  bool full;
};

// The k-th best of the n > k buffered candidates (kth_key: its order key;
// kth_score: the score), and shrink: keep the best k, stably (among equal
// scores the lower ids, which come first, stay). The k-th best is found
// by bisection on the order keys: each step counts keys >= mid over the
// buffer, a branch-free loop the compiler vectorises, because nth_element's
// data-dependent branches mispredict on such buffers (bench/RESULTS.md, section
// What the top-K kernel does, and what bounds it). It stops as soon as
// exactly k keys are >= mid: the k-th best is then the least of them. The keys
// are padded with zeros (below every score's key: 0 is a NaN's) to whole
// blocks of kKeyBlock, so each count runs on whole vectors with no scalar
// remainder. The step is written with masks because GCC made a select of it
// into a branch, taken at random half the time.
constexpr int64_t kKeyBlock = 16;
template <typename scalar_t>
__attribute__((always_inline)) static inline typename KeyOf<scalar_t>::type kth_key_generic(
    const TopkBuf<scalar_t>& b, int64_t k, typename KeyOf<scalar_t>::type* key) {
  using K = typename KeyOf<scalar_t>::type;
  const int64_t n = b.n;
  K lo = std::numeric_limits<K>::max(), hi = 0;
  for (int64_t r = 0; r < n; ++r) {
    const K q = order_key(b.s[r]);
    key[r] = q;
    lo = q < lo ? q : lo;
    hi = q > hi ? q : hi;
  }
  const int64_t padded = (n + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  for (int64_t r = n; r < padded; ++r) key[r] = 0;
  // Largest t with #(key >= t) >= k: the key of the k-th best score.
  while (lo < hi) {
    const K mid = lo + (hi - lo) / 2 + 1;  // lo < mid <= hi, no overflow
    int32_t cnt = 0;
    for (int64_t r = 0; r < padded; r += kKeyBlock)
      for (int64_t q = 0; q < kKeyBlock; ++q) cnt += key[r + q] >= mid;
    if (cnt == k) {  // mid fell between the k-th and (k+1)-th keys: the k-th is the least >= mid
      K least = std::numeric_limits<K>::max();
      for (int64_t r = 0; r < n; ++r) least = key[r] >= mid && key[r] < least ? key[r] : least;
      return least;
    }
    const K up = K(0) - K(cnt >= k);  // all ones: the k-th best is >= mid
    lo ^= (lo ^ mid) & up;
    hi ^= (hi ^ (mid - 1)) & ~up;
  }
  return lo;
}

#ifdef RECLM_X86_DISPATCH
// The same for float on AVX-512: each bisection step counts with one compare
// into a lane mask and a popcount per 16 keys, where GCC's vectorised count
// ends every step in a horizontal add of a vector accumulator; the steps form
// one dependent chain, so its latency is the cost (bench/RESULTS.md, section
// Ops, "The top-K selection").
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma,popcnt"), noinline)) static uint32_t
kth_key_avx512(const float* s, int64_t n, int64_t k, uint32_t* key) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  __m512i vmin = _mm512_set1_epi32(-1), vmax = _mm512_setzero_si512();
  for (int64_t r = 0; r < n; r += 16) {
    const __mmask16 valid = n - r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - r)) - 1);
    const __m512i u = _mm512_castps_si512(_mm512_add_ps(_mm512_maskz_loadu_ps(valid, s + r),
                                                        _mm512_setzero_ps()));  // -0 -> +0
    const __mmask16 neg = _mm512_movepi32_mask(u);
    const __m512i q = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), neg, u, _mm512_set1_epi32(-1));
    _mm512_storeu_si512(key + r, _mm512_maskz_mov_epi32(valid, q));  // padding: key 0
    vmin = _mm512_mask_min_epu32(vmin, valid, vmin, q);
    vmax = _mm512_mask_max_epu32(vmax, valid, vmax, q);
  }
  uint32_t lo = _mm512_reduce_min_epu32(vmin), hi = _mm512_reduce_max_epu32(vmax);
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2 + 1;
    const __m512i mv = _mm512_set1_epi32(static_cast<int32_t>(mid));
    int64_t cnt = 0;
    for (int64_t r = 0; r < n; r += 16)
      cnt += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + r), mv));
    if (cnt == k) {  // mid fell between the k-th and (k+1)-th keys: the k-th is the least >= mid
      __m512i m = _mm512_set1_epi32(-1);
      for (int64_t r = 0; r < n; r += 16) {
        const __m512i kv = _mm512_loadu_si512(key + r);
        m = _mm512_mask_min_epu32(m, _mm512_cmpge_epu32_mask(kv, mv), m, kv);
      }
      return _mm512_reduce_min_epu32(m);
    }
    const uint32_t up = 0u - uint32_t(cnt >= k);
    lo ^= (lo ^ mid) & up;
    hi ^= (hi ^ (mid - 1)) & ~up;
  }
  return lo;
}
#endif

template <typename scalar_t, int VB>
__attribute__((always_inline)) static inline typename KeyOf<scalar_t>::type kth_key(
    const TopkBuf<scalar_t>& b, int64_t k, typename KeyOf<scalar_t>::type* key) {
#ifdef RECLM_X86_DISPATCH
  if constexpr (VB == 64 && std::is_same<scalar_t, float>::value) return kth_key_avx512(b.s, b.n, k, key);
#endif
  return kth_key_generic(b, k, key);
}

template <typename scalar_t, int VB>
__attribute__((always_inline)) static inline scalar_t kth_score(
    const TopkBuf<scalar_t>& b, int64_t k, typename KeyOf<scalar_t>::type* key) {
  const auto t = kth_key<scalar_t, VB>(b, k, key);
  scalar_t ts = 0;
  for (int64_t r = 0; r < b.n; ++r) ts = key[r] == t ? b.s[r] : ts;
  return ts;
}

#ifdef RECLM_X86_DISPATCH
// shrink for float on AVX-512: the kept lanes of 16 candidates at a time
// packed with vcompressps/vpcompressd (the scalar compaction is ~8 dependent
// instructions per candidate). Of the ties at the k-th key, the lowest ids
// (the lowest lanes, first vectors) are kept.
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma,popcnt"), noinline)) static void
shrink_avx512(TopkBuf<float>& b, int64_t k, uint32_t* key) {
  const int64_t n = b.n;
  const uint32_t t = kth_key_avx512(b.s, n, k, key);  // keys padded with 0 (< t) to 16
  const __m512i tv = _mm512_set1_epi32(static_cast<int32_t>(t));
  int64_t gt = 0;
  for (int64_t r = 0; r < n; r += 16)
    gt += __builtin_popcount(_mm512_cmpgt_epu32_mask(_mm512_loadu_si512(key + r), tv));
  int64_t eq_left = k - gt, w = 0;
  for (int64_t r = 0; r < n; r += 16) {  // stores at w <= r: only lanes already loaded
    const __mmask16 valid = n - r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - r)) - 1);
    const __m512i kv = _mm512_loadu_si512(key + r);
    uint32_t eq = _mm512_cmpeq_epu32_mask(kv, tv);
    while (__builtin_popcount(eq) > eq_left) eq &= ~(0x80000000u >> __builtin_clz(eq));
    eq_left -= __builtin_popcount(eq);
    const __mmask16 keep = static_cast<__mmask16>(_mm512_cmpgt_epu32_mask(kv, tv) | eq);
    const __m512 sv = _mm512_maskz_loadu_ps(valid, b.s + r);  // no read past the buffer
    const __m512i pv = _mm512_maskz_loadu_epi32(valid, b.i + r);
    _mm512_storeu_ps(b.s + w, _mm512_maskz_compress_ps(keep, sv));
    _mm512_storeu_si512(b.i + w, _mm512_maskz_compress_epi32(keep, pv));
    w += __builtin_popcount(keep);
  }
  const uint32_t u = (t & 0x80000000u) ? (t & 0x7FFFFFFFu) : ~t;  // order_key's inverse
  std::memcpy(&b.thr, &u, 4);
  b.n = k;
  b.full = true;
}
#endif

template <typename scalar_t, int VB>
__attribute__((always_inline)) static inline void shrink(TopkBuf<scalar_t>& b, int64_t k,
                                                        typename KeyOf<scalar_t>::type* key) {
#ifdef RECLM_X86_DISPATCH
  if constexpr (VB == 64 && std::is_same<scalar_t, float>::value) return shrink_avx512(b, k, key);
#endif
  const int64_t n = b.n;
  const auto t = kth_key<scalar_t, VB>(b, k, key);
  int64_t gt = 0;
  for (int64_t r = 0; r < n; ++r) gt += key[r] > t;
  int64_t eq_left = k - gt, w = 0;
  scalar_t ts = 0;
  for (int64_t r = 0; r < n; ++r) {  // branch-free stable compaction
    const bool eq = key[r] == t;
    const bool keep = key[r] > t || (eq && eq_left > 0);
    eq_left -= eq;
    ts = eq ? b.s[r] : ts;
    b.s[w] = b.s[r];
    b.i[w] = b.i[r];
    w += keep;
  }
  b.n = k;
  b.thr = ts;  // a later item with score == thr has a higher id, so it loses
  b.full = true;
}

// Does any lane of the W scores at p compare true? A GCC vector compare, its
// lane mask narrowed to one byte per lane (vpmovdb on AVX-512), then tested as
// at most two 64-bit words: no per-lane branches.
template <int W> struct ByteVec;
#define RECLM_BYTEVEC(W) \
  template <> struct ByteVec<W> { typedef int8_t type __attribute__((vector_size(W))); };
RECLM_BYTEVEC(2) RECLM_BYTEVEC(4) RECLM_BYTEVEC(8) RECLM_BYTEVEC(16)
#undef RECLM_BYTEVEC

template <typename T, int VB, bool GE>
__attribute__((always_inline)) static inline bool any_pass(const T* p, const vec_t<T, VB>& thr) {
  using V = vec_t<T, VB>;
  constexpr int W = VB / static_cast<int>(sizeof(T));
  const V v = *reinterpret_cast<const V*>(p);
  const auto m = GE ? (v >= thr) : (v > thr);
  const auto bm = __builtin_convertvector(m, typename ByteVec<W>::type);
  uint64_t w[2] = {0, 0};
  std::memcpy(w, &bm, W);
  return (w[0] | w[1]) != 0;
}

// A lower bound on the k-th best score of a row, from one vectorised pass: the
// row's vectors are split into `runs` runs; the lane-wise maxima of a run are
// W groups' maxima, runs * W >= 2k of them in all, each a distinct item's
// score, so at least k items score at or above the k-th largest of them.
// Returns -inf (no bound) when the row is too short for a group per lane of
// every run, or 2k groups would not fit the scratch.
template <typename T, int VB>
__attribute__((always_inline)) static inline T row_bound(const T* row, int64_t nt, int64_t k,
                                                        T* gmax, typename KeyOf<T>::type* key) {
  using V = vec_t<T, VB>;
  constexpr int W = VB / static_cast<int>(sizeof(T));
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t nvec = nt / W, runs = (2 * k + W - 1) / W;  // groups = runs * W >= 2k
  if (k < 1 || runs * W > kMaxGroups || nvec < 2 * runs) return ninf;
  const int64_t per = nvec / runs;  // >= 2 vectors per run
  for (int64_t g = 0; g < runs; ++g) {
    V m = V{} + ninf;
    const V* v = reinterpret_cast<const V*>(row + g * per * W);
    for (int64_t q = 0; q < per; ++q) m = v[q] > m ? v[q] : m;  // NaN (excluded) skipped
    *reinterpret_cast<V*>(gmax + g * W) = m;
  }
  const int64_t ng = runs * W;
  TopkBuf<T> tb{gmax, nullptr, ng, ninf, false};
  return kth_score<T, VB>(tb, k, key);
}

// Scan row[j, nt) whole vectors at a time into the buffer (t0: the row's
// first candidate position); the scalar tail is left to the caller. GE (before
// the first shrink): thr is a lower bound, ties with it are kept, and the scan
// stops after the shrink that sets the exact threshold. Otherwise thr is
// b.thr, raised by every shrink. Returns where it stopped. Appends are
// branch-free: every lane is written (the buffer keeps kScanChunk >= W slots
// of slack) and n advances past the lanes that pass.
template <typename T, int VB, bool GE>
__attribute__((always_inline)) static inline int64_t scan_vectors_generic(
    TopkBuf<T>& b, T thr, const T* row, int64_t j, int64_t nt, int64_t t0, int64_t k,
    int64_t fill, typename KeyOf<T>::type* key) {
  using V = vec_t<T, VB>;
  constexpr int W = VB / static_cast<int>(sizeof(T));
  for (; j + W <= nt; j += W) {
    if (!any_pass<T, VB, GE>(row + j, V{} + thr)) continue;
    int64_t n = b.n;
    for (int q = 0; q < W; ++q) {
      b.s[n] = row[j + q];
      b.i[n] = static_cast<int32_t>(t0 + j + q);
      n += GE ? row[j + q] >= thr : row[j + q] > thr;
    }
    b.n = n;
    if (n > fill) {
      shrink<T, VB>(b, k, key);
      if (GE) return j + W;
      thr = b.thr;
    }
  }
  return j;
}

#ifdef RECLM_X86_DISPATCH
// The same for float on AVX-512: one compare into a lane mask per 16 scores,
// the passing scores and positions packed with vcompressps/vpcompressd into
// registers and stored whole (the memory form of compress is microcoded on AMD
// Zen 4), n advanced by the mask's popcount. SKIP = false: no branch per
// vector; early in a user's candidates about a quarter of the vectors hold a
// passing lane, too many for a branch to predict. SKIP = true: vectors with
// none are skipped by a branch, cheaper once few pass (scan_vectors picks;
// bench/RESULTS.md, section Ops, "The top-K selection" and the industrial
// top-K run of the skip rule). Not inlined: these intrinsics compile only
// inside a function built for AVX-512, and scan_row is a plain template; one
// call per row of a tile.
template <bool GE, bool SKIP>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"), noinline)) static int64_t
scan_vectors_avx512(TopkBuf<float>& b, float thr, const float* row, int64_t j, int64_t nt,
                    int64_t t0, int64_t k, int64_t fill, uint32_t* key) {
  float* s = b.s;  // locals: the stores below cannot then be taken to alias b
  int32_t* pos = b.i;
  int64_t n = b.n;
  __m512 tv = _mm512_set1_ps(thr);
  __m512i pv = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(t0 + j)),
                                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
  const __m512i step = _mm512_set1_epi32(16);
  for (; j + 16 <= nt; j += 16, pv = _mm512_add_epi32(pv, step)) {
    const __m512 v = _mm512_loadu_ps(row + j);
    const __mmask16 m = _mm512_cmp_ps_mask(v, tv, GE ? _CMP_GE_OQ : _CMP_GT_OQ);  // NaN fails
    if (SKIP && !m) continue;
    _mm512_storeu_ps(s + n, _mm512_maskz_compress_ps(m, v));
    _mm512_storeu_si512(pos + n, _mm512_maskz_compress_epi32(m, pv));
    n += __builtin_popcount(m);
    if (n > fill) {
      b.n = n;
      shrink<float, 64>(b, k, key);
      n = b.n;
      if (GE) return j + 16;
      tv = _mm512_set1_ps(b.thr);
    }
  }
  b.n = n;
  return j;
}
#endif

// Past m = kSkipFrom * k candidates of a user, a new score beats the k-th best
// so far with probability about k / m when scores come in no particular order
// (the kept threshold lags a little: it rises at each shrink), so about 1 in 8
// vectors of 16 or fewer holds a passing lane, and a branch that skips the
// others is well predicted (bench/RESULTS.md, section Ops, the industrial
// top-K run of the skip rule).
constexpr int64_t kSkipFrom = 128;
template <typename T, int VB, bool GE>
__attribute__((always_inline)) static inline int64_t scan_vectors(
    TopkBuf<T>& b, T thr, const T* row, int64_t j, int64_t nt, int64_t t0, int64_t k,
    int64_t fill, typename KeyOf<T>::type* key) {
#ifdef RECLM_X86_DISPATCH
  if constexpr (VB == 64 && std::is_same<T, float>::value) {
    if (!GE && t0 >= kSkipFrom * k)
      return scan_vectors_avx512<false, true>(b, thr, row, j, nt, t0, k, fill, key);
    return scan_vectors_avx512<GE, false>(b, thr, row, j, nt, t0, k, fill, key);
  }
#endif
  return scan_vectors_generic<T, VB, GE>(b, thr, row, j, nt, t0, k, fill, key);
}

// Stream a row of scores into the user's buffer. Before the first shrink the
// threshold is a lower bound from row_bound (ties with it are kept: they may
// make the top k); after it, `thr` is the exact k-th best so far and a later
// item (higher id) must beat it strictly.
template <typename scalar_t, int VB>
__attribute__((always_inline)) static inline void scan_row(
    TopkBuf<scalar_t>& b, const scalar_t* row, int64_t nt, int64_t t0, int64_t k, int64_t cap,
    typename KeyOf<scalar_t>::type* key, scalar_t* gmax) {
  const int64_t fill = cap - kScanChunk;
  int64_t j = 0;
  if (!b.full) {
    const scalar_t lb = b.n == 0 ? row_bound<scalar_t, VB>(row, nt, k, gmax, key)
                                 : -std::numeric_limits<scalar_t>::infinity();
    if (lb > -std::numeric_limits<scalar_t>::infinity()) {
      j = scan_vectors<scalar_t, VB, true>(b, lb, row, j, nt, t0, k, fill, key);
      for (; j < nt && !b.full; ++j) {
        const scalar_t v = row[j];
        if (v >= lb) {
          b.s[b.n] = v;
          b.i[b.n++] = static_cast<int32_t>(t0 + j);
          if (b.n > fill) shrink<scalar_t, VB>(b, k, key);
        }
      }
      if (!b.full) shrink<scalar_t, VB>(b, k, key);  // >= k items reached lb: exact threshold now
    } else {
      // Short row or first rows of a user: take every non-NaN until the buffer fills.
      for (; j < nt && !b.full; ++j) {
        const scalar_t v = row[j];
        if (v == v) {
          b.s[b.n] = v;
          b.i[b.n++] = static_cast<int32_t>(t0 + j);
          if (b.n == fill) shrink<scalar_t, VB>(b, k, key);
        }
      }
    }
  }
  j = scan_vectors<scalar_t, VB, false>(b, b.thr, row, j, nt, t0, k, fill, key);
  for (; j < nt; ++j) {
    const scalar_t v = row[j];
    if (v > b.thr) {
      b.s[b.n] = v;
      b.i[b.n++] = static_cast<int32_t>(t0 + j);
      if (b.n > fill) shrink<scalar_t, VB>(b, k, key);
    }
  }
}

// Write the buffer's n <= k candidates to a user's output row in the op's
// order (higher score first, then lower id), then -inf / -1 fill. Up to
// kRankSortMax candidates, each one's place is the number of candidates before
// it in that order: n^2 branch-free comparisons that vectorise, because
// std::sort's data-dependent branches mispredict (bench/RESULTS.md, section Ops,
// "The top-K selection"). Keys are padded with zeros, as in kth_key (pos there
// is read but cannot matter).
// Larger k: std::sort, n log n.
constexpr int64_t kRankSortMax = 128;
template <typename scalar_t>
__attribute__((always_inline)) static inline void write_sorted(
    const TopkBuf<scalar_t>& b, int64_t k, typename KeyOf<scalar_t>::type* key, const int64_t* sub,
    scalar_t* srow, int64_t* irow) {
  using K = typename KeyOf<scalar_t>::type;
  const int64_t n = b.n;
  const int32_t* pos = b.i;
  const int64_t padded = (n + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  for (int64_t r = 0; r < n; ++r) key[r] = order_key(b.s[r]);
  for (int64_t r = n; r < padded; ++r) key[r] = 0;
  const auto put = [&](int64_t place, int64_t r) {
    srow[place] = b.s[r];
    irow[place] = sub ? sub[pos[r]] : pos[r];
  };
  if (n <= kRankSortMax) {
    for (int64_t r = 0; r < n; ++r) {
      const K kr = key[r];
      const int32_t pr = pos[r];
      int32_t place = 0;
      for (int64_t q0 = 0; q0 < padded; q0 += kKeyBlock)
        for (int64_t q = q0; q < q0 + kKeyBlock; ++q)
          place += (key[q] > kr) | ((key[q] == kr) & (pos[q] < pr));
      put(place, r);
    }
  } else {
    std::vector<int64_t> order(n);
    for (int64_t r = 0; r < n; ++r) order[r] = r;
    std::sort(order.begin(), order.end(), [&](int64_t q, int64_t r) {
      return key[q] > key[r] || (key[q] == key[r] && pos[q] < pos[r]);
    });
    for (int64_t j = 0; j < n; ++j) put(j, order[j]);
  }
  for (int64_t j = n; j < k; ++j) {
    srow[j] = -std::numeric_limits<scalar_t>::infinity();
    irow[j] = -1;
  }
}

template <typename scalar_t>
struct TopkArgs {
  const Tensor& ue;
  const Tensor& ie;
  const int64_t* ex_rp;
  const int64_t* ex;
  int64_t k;
  const Tensor& subset;
  bool has_subset;
  scalar_t* os;
  int64_t* oi;
  TopkTile tile;
};

// User blocks [blk0, blk1) of A.tile.users users: one thread's share. Scores
// an A.tile.users x A.tile.items tile with one GEMM (0.5-1 MB: it stays in cache),
// then scans each user's row of it. always_inline: compiled once per ISA wrapper below.
template <typename scalar_t, int VB>
__attribute__((always_inline)) static inline void topk_blocks(const TopkArgs<scalar_t>& A,
                                                             int64_t blk0, int64_t blk1) {
  using K = typename KeyOf<scalar_t>::type;
  const Tensor& ue = A.ue;
  const Tensor& ie = A.ie;
  const int64_t U = ue.size(0), D = ue.size(1), k = A.k;
  const bool has_subset = A.has_subset;
  const int64_t n_cand = has_subset ? A.subset.numel() : ie.size(0);
  const int64_t* sub = has_subset ? A.subset.template data_ptr<int64_t>() : nullptr;
  const int64_t* ex_rp = A.ex_rp;
  const int64_t* ex = A.ex;
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  const scalar_t ninf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t user_block = A.tile.users, item_tile = A.tile.items;
  const int64_t cap = 4 * k + 2 * kScanChunk;  // fill = cap - kScanChunk > k
  // Thread-local buffers: this is all the extra memory the op uses per thread.
  Tensor scores_buf = at::empty({user_block * item_tile}, ue.options());
  Tensor item_buf = has_subset ? at::empty({item_tile, D}, ie.options()) : Tensor();
  std::vector<scalar_t> cand_s(user_block * cap);
  std::vector<K> keys(std::max<int64_t>(cap, kMaxGroups) + kKeyBlock);  // + kth_key's padding
  std::vector<scalar_t> gmax(kMaxGroups);
  std::vector<int32_t> cand_i(user_block * cap);
  std::vector<TopkBuf<scalar_t>> bufs(user_block);
  std::vector<int64_t> ex_pos(user_block);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t u0 = blk * user_block, nu = std::min(user_block, U - u0);
    const Tensor ublk = ue.narrow(0, u0, nu);
    for (int64_t r = 0; r < nu; ++r) {
      bufs[r] = TopkBuf<scalar_t>{cand_s.data() + r * cap, cand_i.data() + r * cap, 0, ninf, false};
      ex_pos[r] = ex_rp[u0 + r];
    }
    for (int64_t t0 = 0; t0 < n_cand; t0 += item_tile) {
      const int64_t nt = std::min(item_tile, n_cand - t0);
      Tensor itile;
      if (has_subset) {
        itile = item_buf.narrow(0, 0, nt);
        at::index_select_out(itile, ie, 0, A.subset.narrow(0, t0, nt));
      } else {
        itile = ie.narrow(0, t0, nt);
      }
      Tensor sc = scores_buf.narrow(0, 0, nu * nt).view({nu, nt});
      at::mm_out(sc, ublk, itile.t());
      scalar_t* sp = sc.template data_ptr<scalar_t>();
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
        scan_row<scalar_t, VB>(bufs[r], row, nt, t0, k, cap, keys.data(), gmax.data());
      }
    }
    for (int64_t r = 0; r < nu; ++r) {
      TopkBuf<scalar_t>& b = bufs[r];
      if (b.n > k) shrink<scalar_t, VB>(b, k, keys.data());
      write_sorted(b, k, keys.data(), sub, A.os + (u0 + r) * k, A.oi + (u0 + r) * k);
    }
  }
}

#ifdef RECLM_X86_DISPATCH
template <typename T>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) static void topk_blocks_avx512(
    const TopkArgs<T>& A, int64_t b0, int64_t b1) {
  topk_blocks<T, 64>(A, b0, b1);
}
template <typename T>
__attribute__((target("avx2,fma"))) static void topk_blocks_avx2(const TopkArgs<T>& A,
                                                                int64_t b0, int64_t b1) {
  topk_blocks<T, 32>(A, b0, b1);
}
#endif
template <typename T>
static void topk_blocks_base(const TopkArgs<T>& A, int64_t b0, int64_t b1) {
  topk_blocks<T, 16>(A, b0, b1);
}

template <typename scalar_t>
static void topk_cpu_impl(const Tensor& ue, const Tensor& ie, const int64_t* ex_rp,
                          const int64_t* ex, int64_t k, const Tensor& subset, bool has_subset,
                          Tensor& out_s, Tensor& out_i) {
  const int64_t n_cand = has_subset ? subset.numel() : ie.size(0);
  const TopkTile tile = topk_tile(n_cand, ie.size(1), ie.element_size());
  const TopkArgs<scalar_t> A{ue, ie, ex_rp, ex, k, subset, has_subset,
                             out_s.data_ptr<scalar_t>(), out_i.data_ptr<int64_t>(), tile};
  const int64_t n_blocks = (ue.size(0) + tile.users - 1) / tile.users;
  const int isa = cpu_isa();
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
#ifdef RECLM_X86_DISPATCH
    if (isa == 2) return topk_blocks_avx512<scalar_t>(A, b0, b1);
    if (isa == 1) return topk_blocks_avx2<scalar_t>(A, b0, b1);
#endif
    (void)isa;
    topk_blocks_base<scalar_t>(A, b0, b1);
  });
}

std::tuple<Tensor, Tensor> topk_scores_cpu(const Tensor& user_emb, const Tensor& item_emb,
                                           const Tensor& exclude_rowptr,
                                           const Tensor& exclude_col, int64_t k,
                                           const c10::optional<Tensor>& item_subset) {
  check_topk_args(user_emb, item_emb, exclude_rowptr, exclude_col, k, item_subset);
  const Tensor ue = user_emb.contiguous(), ie = item_emb.contiguous();
  const Tensor erp = exclude_rowptr.contiguous(), ecol = exclude_col.contiguous();
  validate_once(kMemoExclusions, erp, ecol, ie.size(0), [&] {
    check_csr_cpu(erp, ecol, ie.size(0), "reclm::topk_scores", "exclude_rowptr", "exclude_col");
  });
  const bool has_subset = item_subset.has_value();
  const Tensor subset = has_subset ? item_subset->contiguous() : Tensor();
  if (has_subset)
    validate_once(kMemoSubset, subset, Tensor(), ie.size(0),
                  [&] { check_item_subset(subset, ie.size(0)); });
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
