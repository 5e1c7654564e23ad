// CUDA kernels for the reclm ops (schemas and argument checks: reclm_ops.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <functional>
#include <limits>

namespace reclm {

using at::Tensor;

// Defined in reclm_ops.cpp (metadata checks shared by both backends).
void check_spmm_args(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                     const Tensor&, const Tensor&, const Tensor&);
void check_topk_args(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                     const c10::optional<Tensor>&);
void check_item_subset(const Tensor&, int64_t);
void validate_once(int kind, const Tensor& a, const Tensor& b, int64_t n,
                   const std::function<void()>& check);
constexpr int kMemoExclusions = 1, kMemoSubset = 2, kMemoSpmm = 3;  // as in reclm_ops.cpp

constexpr unsigned kFull = 0xffffffffu;

// One thread per row; flags: 1 rowptr decreasing, 2 col out of range,
// 4 col unsorted, 8 rowptr does not span [0, nnz].
__global__ void check_csr_kernel(const int64_t* rp, int64_t n, const int64_t* col, int64_t nnz,
                                 int64_t n_cols, int* flag) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (r == 0 && (rp[0] != 0 || rp[n] != nnz)) atomicOr(flag, 8);
  if (r >= n) return;
  const int64_t a = rp[r], b = rp[r + 1];
  if (b < a || a < 0 || b > nnz) { atomicOr(flag, 1); return; }
  int f = 0;
  for (int64_t p = a; p < b; ++p) {
    if (col[p] < 0 || col[p] >= n_cols) f |= 2;
    if (p > a && col[p] < col[p - 1]) f |= 4;
  }
  if (f) atomicOr(flag, f);
}

// Costs one device->host sync; it keeps a bad index from reaching a kernel.
// Callers go through validate_once, so a graph is checked (and synced) once,
// not on every call.
static void check_csr_cuda(const Tensor& rp, const Tensor& col, int64_t n_cols, const char* op,
                           const char* rp_name, const char* col_name) {
  const int64_t n = rp.numel() - 1;
  Tensor flag = at::zeros({1}, rp.options().dtype(at::kInt));
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(1, (n + threads - 1) / threads);
  check_csr_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      rp.data_ptr<int64_t>(), n, col.data_ptr<int64_t>(), col.numel(), n_cols,
      flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int f = flag.item<int>();
  TORCH_CHECK(!(f & 8), op, ": ", rp_name, " must start at 0 and end at nnz=", col.numel());
  TORCH_CHECK(!(f & 1), op, ": ", rp_name, " must be non-decreasing");
  TORCH_CHECK(!(f & 2), op, ": ", col_name, " has indices outside [0, ", n_cols, ")");
  TORCH_CHECK(!(f & 4), op, ": ", col_name, " must be sorted within each row");
}

// ---------------------------------------------------------------- spmm
// One warp per row, lanes over d. The warp loads 32 (col, val) pairs at once
// and broadcasts them with shuffles; each output element has one writer, so
// no atomics (the backward uses the explicit transpose instead of scattering).
template <typename scalar_t>
__global__ void spmm_kernel(const int64_t* __restrict__ rp, const int64_t* __restrict__ col,
                            const scalar_t* __restrict__ val, const scalar_t* __restrict__ x,
                            scalar_t* __restrict__ y, int64_t n_rows, int64_t d) {
  const int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (row >= n_rows) return;  // whole warp leaves together
  const int64_t a = rp[row], b = rp[row + 1];
  for (int64_t j0 = 0; j0 < d; j0 += 32) {
    const int64_t j = j0 + lane;
    scalar_t acc = 0;
    for (int64_t p = a; p < b; p += 32) {
      int64_t c = 0;
      scalar_t v = 0;
      if (p + lane < b) { c = col[p + lane]; v = val[p + lane]; }
      const int cnt = b - p < 32 ? (int)(b - p) : 32;
      for (int t = 0; t < cnt; ++t) {
        const long long ct = __shfl_sync(kFull, (long long)c, t);
        const scalar_t vt = __shfl_sync(kFull, v, t);
        if (j < d) acc += vt * __ldg(x + ct * d + j);
      }
    }
    if (j < d) y[row * d + j] = acc;
  }
}

Tensor spmm_cuda(const Tensor& rowptr_, const Tensor& col_, const Tensor& val_,
                 const Tensor& t_rowptr, const Tensor& t_col, const Tensor& t_val,
                 const Tensor& x_) {
  check_spmm_args(rowptr_, col_, val_, t_rowptr, t_col, t_val, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor rowptr = rowptr_.contiguous(), col = col_.contiguous(),
               val = val_.contiguous(), x = x_.contiguous();
  validate_once(kMemoSpmm, rowptr, col, x.size(0), [&] {
    check_csr_cuda(rowptr, col, x.size(0), "reclm::spmm", "rowptr", "col");
  });
  const int64_t n = rowptr.numel() - 1, d = x.size(1);
  Tensor y = at::empty({n, d}, x.options());
  if (n == 0 || d == 0) return y;
  const int threads = 256;  // 8 rows per block
  const int64_t blocks = (n * 32 + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "reclm_spmm_cuda", [&] {
    spmm_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), val.data_ptr<scalar_t>(),
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, d);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// ---------------------------------------------------------------- top-k
// One block per user. Threads score a chunk of blockDim items; candidates
// that beat the current k-th score (and are not excluded) are appended to a
// shared buffer; when the buffer could overflow, a bitonic sort keeps the
// best k. Extra memory: the outputs plus `cap` candidates in shared memory.

template <typename scalar_t>
__device__ __forceinline__ bool better(scalar_t sa, int64_t ia, scalar_t sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

template <typename scalar_t>
__device__ void merge_topk(scalar_t* bs, int64_t* bi, int cap, int count) {
  for (int t = count + threadIdx.x; t < cap; t += blockDim.x) {
    bs[t] = -std::numeric_limits<scalar_t>::infinity();
    bi[t] = std::numeric_limits<int64_t>::max();  // sorts after any real item
  }
  __syncthreads();
  for (int size = 2; size <= cap; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < cap / 2; t += blockDim.x) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool asc = (i & size) == 0;  // "ascending" = best first
        const bool swap = asc ? better(bs[j], bi[j], bs[i], bi[i])
                              : better(bs[i], bi[i], bs[j], bi[j]);
        if (swap) {
          const scalar_t ts = bs[i]; bs[i] = bs[j]; bs[j] = ts;
          const int64_t ti = bi[i]; bi[i] = bi[j]; bi[j] = ti;
        }
      }
      __syncthreads();
    }
  }
}

// Scores of the warp's 32 items (lane l: item slot wbase + l) with coalesced
// reads: for each 32-wide slice of the dims, lane l reads dim c + l of all 32
// items (one 128-byte row segment per load), keeping 32 partial sums; a
// reduce-scatter over the lanes (16 + 8 + 4 + 2 + 1 shuffles) then leaves in
// lane l the full dot product of item l. All lanes must call it (no early exit).
template <typename scalar_t>
__device__ __forceinline__ scalar_t warp_scores(const scalar_t* __restrict__ ie, int64_t D,
                                                const scalar_t* su, int64_t item, int64_t wbase,
                                                int64_t n_cand, int lane) {
  scalar_t v[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) v[i] = 0;
  for (int64_t c = 0; c < D; c += 32) {
    const int64_t dim = c + lane;
    const scalar_t w = dim < D ? su[dim] : scalar_t(0);
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const long long it = __shfl_sync(kFull, (long long)item, i);
      if (dim < D && wbase + i < n_cand) v[i] += w * __ldg(ie + it * D + dim);
    }
  }
#pragma unroll
  for (int sh = 16; sh >= 1; sh >>= 1) {
    const bool upper = lane & sh;  // upper lanes keep items [sh, 2sh), lower [0, sh)
#pragma unroll
    for (int i = 0; i < sh; ++i) {
      const scalar_t send = upper ? v[i] : v[i + sh];
      const scalar_t keep = upper ? v[i + sh] : v[i];
      v[i] = keep + __shfl_xor_sync(kFull, send, sh);
    }
  }
  return v[0];
}

template <typename scalar_t>
__global__ void topk_kernel(const scalar_t* __restrict__ ue, const scalar_t* __restrict__ ie,
                            int64_t D, int64_t n_cand, const int64_t* __restrict__ subset,
                            const int64_t* __restrict__ ex_rp, const int64_t* __restrict__ ex,
                            int64_t k, int cap, scalar_t* out_s, int64_t* out_i) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* bi = reinterpret_cast<int64_t*>(smem);
  scalar_t* bs = reinterpret_cast<scalar_t*>(bi + cap);
  scalar_t* su = bs + cap;
  __shared__ int count;
  __shared__ scalar_t thr;
  __shared__ bool full;
  const int64_t u = blockIdx.x;
  for (int64_t t = threadIdx.x; t < D; t += blockDim.x) su[t] = ue[u * D + t];
  if (threadIdx.x == 0) { count = 0; full = false; thr = 0; }
  __syncthreads();
  const int64_t e0 = ex_rp[u], e1 = ex_rp[u + 1];
  const int lane = threadIdx.x & 31;
  for (int64_t base = 0; base < n_cand; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const int64_t wbase = j - lane;  // this warp's first item slot
    const int64_t item = j < n_cand ? (subset ? subset[j] : j) : 0;
    const scalar_t s = warp_scores(ie, D, su, item, wbase, n_cand, lane);
    if (j < n_cand) {
      // NaN never kept; an equal score loses to the earlier (lower id) item.
      bool keep = (s == s) && (!full || s > thr);
      if (keep) {
        int64_t lo = e0, hi = e1;  // exclusion: binary search in the sorted list
        while (lo < hi) {
          const int64_t mid = (lo + hi) / 2;
          if (ex[mid] < item) lo = mid + 1; else hi = mid;
        }
        keep = !(lo < e1 && ex[lo] == item);
      }
      if (keep) {
        const int pos = atomicAdd(&count, 1);
        bs[pos] = s;
        bi[pos] = item;
      }
    }
    __syncthreads();
    const bool merge = count > cap - (int)blockDim.x || base + blockDim.x >= n_cand;
    __syncthreads();  // everyone has read count before anyone appends again
    if (merge) {
      merge_topk(bs, bi, cap, count);
      if (threadIdx.x == 0) {
        if (count > k) count = (int)k;
        if (count == k && k > 0) { full = true; thr = bs[k - 1]; }
      }
      __syncthreads();
    }
  }
  const int n_kept = n_cand > 0 ? count : 0;
  for (int64_t t = threadIdx.x; t < k; t += blockDim.x) {
    const bool ok = t < n_kept;
    out_s[u * k + t] = ok ? bs[t] : -std::numeric_limits<scalar_t>::infinity();
    out_i[u * k + t] = ok ? bi[t] : -1;
  }
}

std::tuple<Tensor, Tensor> topk_scores_cuda(const Tensor& user_emb, const Tensor& item_emb,
                                            const Tensor& exclude_rowptr,
                                            const Tensor& exclude_col, int64_t k,
                                            const c10::optional<Tensor>& item_subset) {
  check_topk_args(user_emb, item_emb, exclude_rowptr, exclude_col, k, item_subset);
  const c10::cuda::CUDAGuard guard(user_emb.device());
  const Tensor ue = user_emb.contiguous(), ie = item_emb.contiguous();
  const Tensor erp = exclude_rowptr.contiguous(), ecol = exclude_col.contiguous();
  validate_once(kMemoExclusions, erp, ecol, ie.size(0), [&] {
    check_csr_cuda(erp, ecol, ie.size(0), "reclm::topk_scores", "exclude_rowptr", "exclude_col");
  });
  const bool has_subset = item_subset.has_value();
  const Tensor subset = has_subset ? item_subset->contiguous() : Tensor();
  if (has_subset)
    validate_once(kMemoSubset, subset, Tensor(), ie.size(0),
                  [&] { check_item_subset(subset, ie.size(0)); });
  const int64_t U = ue.size(0), D = ue.size(1);
  Tensor out_s = at::empty({U, k}, ue.options());
  Tensor out_i = at::empty({U, k}, ue.options().dtype(at::kLong));
  if (U == 0 || k == 0) return {out_s, out_i};
  const int threads = 256;
  int cap = 512;
  while (cap < k + threads) cap <<= 1;
  const size_t smem = (size_t)cap * sizeof(int64_t) + (size_t)(cap + D) * ue.element_size();
  TORCH_CHECK(smem <= 48 * 1024, "reclm::topk_scores: k=", k, " with dim=", D,
              " needs ", smem, " bytes of shared memory on CUDA (max 49152); use a smaller k");
  const int64_t n_cand = has_subset ? subset.numel() : ie.size(0);
  AT_DISPATCH_FLOATING_TYPES(ue.scalar_type(), "reclm_topk_cuda", [&] {
    topk_kernel<scalar_t><<<U, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        ue.data_ptr<scalar_t>(), ie.data_ptr<scalar_t>(), D, n_cand,
        has_subset ? subset.data_ptr<int64_t>() : nullptr, erp.data_ptr<int64_t>(),
        ecol.data_ptr<int64_t>(), k, cap, out_s.data_ptr<scalar_t>(),
        out_i.data_ptr<int64_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_s, out_i};
}

}  // namespace reclm

TORCH_LIBRARY_IMPL(reclm, CUDA, m) {
  m.impl("spmm", &reclm::spmm_cuda);
  m.impl("topk_scores", &reclm::topk_scores_cuda);
}
