// CUDA kernels for the reclm ops (schemas and argument checks: reclm_ops.cpp, shared parts in reclm_ops.h).
#include "reclm_ops.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>

namespace reclm {

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
  TORCH_CHECK(!(f & 8), op, ": ", rp_name, " must start at 0 and end at nnz=", num(col.numel()));
  TORCH_CHECK(!(f & 1), op, ": ", rp_name, " must be non-decreasing");
  TORCH_CHECK(!(f & 2), op, ": ", col_name, " has indices outside [0, ", num(n_cols), ")");
  TORCH_CHECK(!(f & 4), op, ": ", col_name, " must be sorted within each row");
}

// ---------------------------------------------------------------- spmm
// Rows of a LightGCN graph follow a power law, so one warp per row leaves the
// hub rows (tens of thousands of entries) on one warp while the rest of the GPU
// idles (bench/RESULTS.md, section CUDA). Instead each warp
// takes a chunk of `chunk_nnz` consecutive entries, whatever rows they belong
// to. A row inside one chunk is written directly; a row cut by a chunk boundary
// is written as per-chunk partial sums (two slots per chunk: its first and its
// last row), which spmm_fixup_kernel adds up in chunk order, so the result is
// deterministic (no atomics). Lanes run over d, VEC columns per load (Q loads
// per lane per entry); the warp loads 32 (col, val) pairs at once, broadcasts
// them with shuffles and issues 8 gathers of x before it uses any, so the
// loads overlap instead of each waiting for the last.

// The row holding entry p: the largest r < n with rp[r] <= p (skips empty rows).
__device__ __forceinline__ int64_t row_of_entry(const int64_t* rp, int64_t n, int64_t p) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (rp[mid] <= p) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Packed { T v[N]; };

template <typename scalar_t, int VEC, int Q>
__global__ void spmm_chunk_kernel(const int64_t* __restrict__ rp, const int64_t* __restrict__ col,
                                  const scalar_t* __restrict__ val, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ y, scalar_t* __restrict__ part,
                                  int64_t n_rows, int64_t nnz, int64_t chunk_nnz, int64_t d,
                                  int64_t j0) {
  using P = Packed<scalar_t, VEC>;
  const int64_t chunk = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  const int64_t s = chunk * chunk_nnz;
  if (s >= nnz) return;  // whole warp leaves together
  const int64_t e = s + chunk_nnz < nnz ? s + chunk_nnz : nnz;
  const int64_t first_row = row_of_entry(rp, n_rows, s);
  int64_t row = first_row, row_start = rp[row], row_end = rp[row + 1];
  bool in[Q];  // this lane's columns j0 + (lane + 32q) * VEC .. + VEC - 1 exist
#pragma unroll
  for (int q = 0; q < Q; ++q) in[q] = j0 + (lane + 32 * q) * VEC < d;
  P acc[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q)
#pragma unroll
    for (int w = 0; w < VEC; ++w) acc[q].v[w] = 0;
  auto flush = [&]() {
    scalar_t* dst = (row_start >= s && row_end <= e)
                        ? y + row * d
                        : part + (chunk * 2 + (row == first_row ? 0 : 1)) * d;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      if (in[q]) *reinterpret_cast<P*>(dst + j0 + (lane + 32 * q) * VEC) = acc[q];
#pragma unroll
      for (int w = 0; w < VEC; ++w) acc[q].v[w] = 0;
    }
  };
  for (int64_t p0 = s; p0 < e; p0 += 32) {
    int c = 0;  // the host checks n_cols < 2^31: one shuffle per column index
    scalar_t v = 0;
    if (p0 + lane < e) { c = (int)col[p0 + lane]; v = val[p0 + lane]; }
    const int cnt = e - p0 < 32 ? (int)(e - p0) : 32;
    for (int t0 = 0; t0 < cnt; t0 += 8) {
      P g[8][Q];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int t = t0 + u;
        const int64_t ct = __shfl_sync(kFull, c, t & 31);
        const scalar_t vt = __shfl_sync(kFull, v, t & 31);
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          if (t < cnt && in[q])
            g[u][q] = *reinterpret_cast<const P*>(x + ct * d + j0 + (lane + 32 * q) * VEC);
          else
#pragma unroll
            for (int w = 0; w < VEC; ++w) g[u][q].v[w] = 0;
#pragma unroll
          for (int w = 0; w < VEC; ++w) g[u][q].v[w] *= vt;
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (t0 + u >= cnt) break;
        const int64_t p = p0 + t0 + u;
        while (p >= row_end) {  // uniform across the warp
          flush();
          ++row;
          row_start = row_end;
          row_end = rp[row + 1];
        }
#pragma unroll
        for (int q = 0; q < Q; ++q)
#pragma unroll
          for (int w = 0; w < VEC; ++w) acc[q].v[w] += g[u][q].v[w];
      }
    }
  }
  flush();
}

// One warp per chunk: if the chunk's last row starts in this chunk and runs on
// past it, add the row's partial sums over the chunks it spans, in order.
template <typename scalar_t>
__global__ void spmm_fixup_kernel(const int64_t* __restrict__ rp, const scalar_t* __restrict__ part,
                                  scalar_t* __restrict__ y, int64_t n_rows, int64_t nnz,
                                  int64_t chunk_nnz, int64_t d) {
  const int64_t chunk = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  const int64_t s = chunk * chunk_nnz;
  if (s >= nnz) return;
  const int64_t e = s + chunk_nnz < nnz ? s + chunk_nnz : nnz;
  const int64_t row = row_of_entry(rp, n_rows, e - 1);
  const int64_t a = rp[row], b = rp[row + 1];
  if (!(a >= s && b > e)) return;  // not cut here, or another chunk's to finish
  const int64_t last_chunk = (b - 1) / chunk_nnz;
  const int slot = a == s ? 0 : 1;  // this chunk's first row or its last
  for (int64_t j = lane; j < d; j += 32) {
    scalar_t sum = part[(chunk * 2 + slot) * d + j];
    for (int64_t c = chunk + 1; c <= last_chunk; ++c) sum += part[(c * 2) * d + j];
    y[row * d + j] = sum;
  }
}

template <typename scalar_t, int VEC, int Q>
static void launch_spmm_chunks(const Tensor& rp, const Tensor& col, const Tensor& val,
                               const Tensor& x, Tensor& y, Tensor& part, int64_t n_chunks,
                               int64_t chunk_nnz, cudaStream_t stream) {
  const int threads = 256;  // 8 chunks per block
  const int64_t blocks = (n_chunks * 32 + threads - 1) / threads;
  const int64_t d = x.size(1);
  for (int64_t j0 = 0; j0 < d; j0 += 32 * Q * VEC) {
    spmm_chunk_kernel<scalar_t, VEC, Q><<<blocks, threads, 0, stream>>>(
        rp.data_ptr<int64_t>(), col.data_ptr<int64_t>(), val.data_ptr<scalar_t>(),
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), part.data_ptr<scalar_t>(),
        rp.numel() - 1, col.numel(), chunk_nnz, d, j0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The widest aligned load that divides d (16 bytes: 4 floats or 2 doubles,
// when it can), and up to 128 columns per pass.
template <typename scalar_t>
static void launch_spmm_widths(const Tensor& rp, const Tensor& col, const Tensor& val,
                               const Tensor& x, Tensor& y, Tensor& part, int64_t n_chunks,
                               int64_t chunk_nnz, cudaStream_t stream) {
  const int64_t d = x.size(1);
  auto fits = [&](int64_t vec) {
    return vec * (int64_t)sizeof(scalar_t) <= 16 && d % vec == 0 &&
           reinterpret_cast<uintptr_t>(x.data_ptr()) % (vec * sizeof(scalar_t)) == 0;
  };
  if (d > 64 && fits(4))
    launch_spmm_chunks<scalar_t, 4, 1>(rp, col, val, x, y, part, n_chunks, chunk_nnz, stream);
  else if (d > 64 && fits(2))
    launch_spmm_chunks<scalar_t, 2, 2>(rp, col, val, x, y, part, n_chunks, chunk_nnz, stream);
  else if (d > 64)
    launch_spmm_chunks<scalar_t, 1, 4>(rp, col, val, x, y, part, n_chunks, chunk_nnz, stream);
  else if (d > 32 && fits(2))
    launch_spmm_chunks<scalar_t, 2, 1>(rp, col, val, x, y, part, n_chunks, chunk_nnz, stream);
  else if (d > 32)
    launch_spmm_chunks<scalar_t, 1, 2>(rp, col, val, x, y, part, n_chunks, chunk_nnz, stream);
  else
    launch_spmm_chunks<scalar_t, 1, 1>(rp, col, val, x, y, part, n_chunks, chunk_nnz, stream);
}

Tensor spmm_cuda(const Tensor& rowptr_, const Tensor& col_, const Tensor& val_,
                 const Tensor& t_rowptr, const Tensor& t_col, const Tensor& t_val,
                 const Tensor& x_) {
  check_spmm_args(rowptr_, col_, val_, t_rowptr, t_col, t_val, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor rowptr = rowptr_.contiguous(), col = col_.contiguous(),
               val = val_.contiguous(), x = x_.contiguous();
  TORCH_CHECK(x.size(0) <= std::numeric_limits<int>::max(), "reclm::spmm: x has ", num(x.size(0)),
              " rows; the CUDA kernel takes at most 2^31 - 1");
  validate_once(kMemoSpmm, rowptr, col, x.size(0), [&] {
    check_csr_cuda(rowptr, col, x.size(0), "reclm::spmm", "rowptr", "col");
  });
  const int64_t n = rowptr.numel() - 1, d = x.size(1), nnz = col.numel();
  Tensor y = at::zeros({n, d}, x.options());  // empty rows are never visited
  if (n == 0 || d == 0 || nnz == 0) return y;
  // Chunks of 32-256 entries: enough warps to fill the GPU (about 48 per SM)
  // on a small graph, few partial rows on a large one.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int64_t chunk_nnz = std::min<int64_t>(256, std::max<int64_t>(32, nnz / (sms * 48LL)) / 32 * 32);
  const int64_t n_chunks = (nnz + chunk_nnz - 1) / chunk_nnz;
  Tensor part = at::empty({n_chunks * 2, d}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "reclm_spmm_cuda", [&] {
    launch_spmm_widths<scalar_t>(rowptr, col, val, x, y, part, n_chunks, chunk_nnz, stream);
    const int threads = 256;
    spmm_fixup_kernel<scalar_t><<<(n_chunks * 32 + threads - 1) / threads, threads, 0, stream>>>(
        rowptr.data_ptr<int64_t>(), part.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, nnz,
        chunk_nnz, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// ---------------------------------------------------------------- top-k
// Scores come from cuBLAS, a tile of users x all candidates at a time (the
// GEMM is what the GPU is built for; a per-user dot-product kernel re-read the
// whole item table once per user). Then one block per user scans its row of
// the tile: candidates that beat the current k-th score (and are not
// excluded) are appended to a shared buffer; when the buffer could overflow, a
// bitonic sort keeps the best k. Extra memory: the score tile (at most
// topk_tile_bytes()) plus `cap` candidates in shared memory per block. A user's
// exclusions sit in shared memory too when there are at most kSharedExcl (the
// binary search for each candidate then costs no global-memory round trips).
// Score tile: 1 GiB by default (enough users per tile to fill the GPU);
// RECLM_TOPK_TILE_MB sets another budget (read on every call).
static int64_t topk_tile_bytes() {
  const char* mb = std::getenv("RECLM_TOPK_TILE_MB");
  const int64_t v = mb ? std::atoll(mb) : 0;
  return (v > 0 ? v : 1024) << 20;
}
constexpr int kSharedExcl = 1024;
constexpr int kPrefetch = 8;  // scores in flight per thread in the scan

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

template <typename scalar_t>
__global__ void select_topk_kernel(const scalar_t* __restrict__ scores, int64_t n_cand,
                                   const int64_t* __restrict__ subset,
                                   const int64_t* __restrict__ ex_rp,
                                   const int64_t* __restrict__ ex, int64_t u0, int64_t k, int cap,
                                   scalar_t* out_s, int64_t* out_i) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* bi = reinterpret_cast<int64_t*>(smem);
  scalar_t* bs = reinterpret_cast<scalar_t*>(bi + cap);
  __shared__ int count;
  __shared__ scalar_t thr;
  __shared__ bool full;
  const int64_t u = u0 + blockIdx.x;
  const scalar_t* row = scores + blockIdx.x * n_cand;
  if (threadIdx.x == 0) { count = 0; full = false; thr = 0; }
  __syncthreads();
  __shared__ int64_t ex_shared[kSharedExcl];
  const int64_t n_ex = ex_rp[u + 1] - ex_rp[u];
  const int64_t* exl = ex + ex_rp[u];
  if (n_ex <= kSharedExcl) {
    for (int64_t t = threadIdx.x; t < n_ex; t += blockDim.x) ex_shared[t] = exl[t];
    exl = ex_shared;
  }
  __syncthreads();
  // The row is read kPrefetch * blockDim scores at a time, all loads issued
  // before any is used, because a scan that waits on one load per step is bound
  // by memory latency, not bandwidth.
  for (int64_t base0 = 0; base0 < n_cand; base0 += kPrefetch * blockDim.x) {
    scalar_t pre[kPrefetch];
#pragma unroll
    for (int r = 0; r < kPrefetch; ++r) {
      const int64_t j = base0 + r * blockDim.x + threadIdx.x;
      pre[r] = j < n_cand ? row[j] : scalar_t(0);
    }
#pragma unroll
    for (int r = 0; r < kPrefetch; ++r) {
      const int64_t base = base0 + r * blockDim.x;
      if (base >= n_cand) break;  // uniform
      const int64_t j = base + threadIdx.x;
      if (j < n_cand) {
        const scalar_t s = pre[r];
        const int64_t item = subset ? subset[j] : j;
        // NaN never kept; an equal score loses to the earlier (lower id) item.
        bool keep = (s == s) && (!full || s > thr);
        if (keep) {
          int64_t lo = 0, hi = n_ex;  // exclusion: binary search in the sorted list
          while (lo < hi) {
            const int64_t mid = (lo + hi) / 2;
            if (exl[mid] < item) lo = mid + 1; else hi = mid;
          }
          keep = !(lo < n_ex && exl[lo] == item);
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
  }
  for (int64_t t = threadIdx.x; t < k; t += blockDim.x) {
    const bool ok = t < count;
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
  const int64_t U = ue.size(0);
  Tensor out_s = at::empty({U, k}, ue.options());
  Tensor out_i = at::empty({U, k}, ue.options().dtype(at::kLong));
  const int64_t n_cand = has_subset ? subset.numel() : ie.size(0);
  if (U == 0 || k == 0) return {out_s, out_i};
  if (n_cand == 0) {
    out_s.fill_(-std::numeric_limits<double>::infinity());
    out_i.fill_(-1);
    return {out_s, out_i};
  }
  const int threads = 256;
  int cap = 512;
  while (cap < k + threads) cap <<= 1;
  const size_t smem = (size_t)cap * (sizeof(int64_t) + ue.element_size());
  TORCH_CHECK(smem <= 48 * 1024, "reclm::topk_scores: k=", num(k), " needs ", num(smem),
              " bytes of shared memory on CUDA (max 49152); use a smaller k");
  const Tensor cand = has_subset ? ie.index_select(0, subset) : ie;
  const Tensor cand_t = cand.t();
  const int64_t tile =
      std::max<int64_t>(1, std::min<int64_t>(U, topk_tile_bytes() / (n_cand * ue.element_size())));
  Tensor buf = at::empty({tile, n_cand}, ue.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t u0 = 0; u0 < U; u0 += tile) {
    const int64_t ub = std::min(tile, U - u0);
    Tensor sc = buf.narrow(0, 0, ub);
    at::mm_out(sc, ue.narrow(0, u0, ub), cand_t);
    AT_DISPATCH_FLOATING_TYPES(ue.scalar_type(), "reclm_topk_cuda", [&] {
      select_topk_kernel<scalar_t><<<ub, threads, smem, stream>>>(
          sc.data_ptr<scalar_t>(), n_cand, has_subset ? subset.data_ptr<int64_t>() : nullptr,
          erp.data_ptr<int64_t>(), ecol.data_ptr<int64_t>(), u0, k, cap,
          out_s.data_ptr<scalar_t>(), out_i.data_ptr<int64_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out_s, out_i};
}

}  // namespace reclm

TORCH_LIBRARY_IMPL(reclm, CUDA, m) {
  m.impl("spmm", &reclm::spmm_cuda);
  m.impl("topk_scores", &reclm::topk_scores_cuda);
}
