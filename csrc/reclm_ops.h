// What reclm_ops.cpp (schemas, argument checks, CPU kernels) and reclm_ops_cuda.cu (CUDA kernels)
// share: the metadata checks and the validation memo, both defined in reclm_ops.cpp, and the
// formatting of numbers in error messages.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>

namespace reclm {

using at::Tensor;

// Numbers and shapes in error messages go through std::to_string, never c10::str's stream, because
// on one toolchain streaming an int64 there segfaulted instead of raising (bench/RESULTS.md, section CUDA).
inline std::string num(int64_t v) { return std::to_string(v); }

// Metadata checks of each op's arguments (dtypes, shapes, devices; no data reads).
void check_spmm_args(const Tensor& rowptr, const Tensor& col, const Tensor& val,
                     const Tensor& t_rowptr, const Tensor& t_col, const Tensor& t_val,
                     const Tensor& x);
void check_topk_args(const Tensor& user_emb, const Tensor& item_emb,
                     const Tensor& exclude_rowptr, const Tensor& exclude_col, int64_t k,
                     const c10::optional<Tensor>& item_subset);

// Data check of item_subset (in range, sorted, unique), with ATen ops: runs on either device.
void check_item_subset(const Tensor& s, int64_t n_items);

// Runs `check` unless it already passed for these (unchanged) tensors; `kind` keeps the checks of
// different argument pairs apart. See reclm_ops.cpp for what counts as unchanged.
void validate_once(int kind, const Tensor& a, const Tensor& b, int64_t n,
                   const std::function<void()>& check);
constexpr int kMemoExclusions = 1, kMemoSubset = 2, kMemoSpmm = 3;  // validate_once kinds

}  // namespace reclm
