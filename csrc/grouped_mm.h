// Host entry points of the grouped GEMM kernels (no PyTorch: raw pointers, shapes, strides).
//
// Forward:      y[r] = x[r] @ w[e] for the rows r of group e, rows at or past offs[E-1] zeroed.
// Weight grad:  dw[e] = x_e^T @ dy_e, zero for an empty group.
// Group e holds rows [offs[e-1], offs[e]) (offs[-1] = 0); offs is int32 on the device and is
// never read by the host. Out-of-range offsets are clamped into [0, S] on the device.
// Strides are in elements. All launches go to `stream`; errors throw std::runtime_error.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace modekernels {

struct GroupedMmArgs {
  const void* x;       // (S, K), strides (x_stride_s, x_stride_k)
  const void* w;       // (E, K, N), strides (w_stride_e, w_stride_k, w_stride_n)
  const int32_t* offs; // (E,)
  void* y;             // (S, N) contiguous
  int64_t S, K, N;
  int64_t E;
  int64_t x_stride_s, x_stride_k;
  int64_t w_stride_e, w_stride_k, w_stride_n;
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
};

struct WeightGradArgs {
  const void* x;       // (S, K), strides (x_stride_s, x_stride_k)
  const void* dy;      // (S, N), strides (dy_stride_s, dy_stride_n)
  const int32_t* offs; // (E,)
  void* dw;            // (E, K, N) contiguous
  int64_t S, K, N;
  int64_t E;
  int64_t x_stride_s, x_stride_k;
  int64_t dy_stride_s, dy_stride_n;
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
};

// Generic tiled kernels (CUDA cores, fp32 accumulation, IEEE fp32 products): any dtype, any
// strides, any alignment; every arch >= 80.
template <Dtype D> void grouped_mm_simt(const GroupedMmArgs& args);
template <Dtype D> void grouped_mm_weight_grad_simt(const WeightGradArgs& args);

// Hopper CUTLASS ptr-array grouped GEMMs (sm_90a, bf16/fp16). Need x and dy with unit inner
// stride, w with w_stride_n == 1 or w_stride_k == 1, 16-byte aligned base pointers and all
// other strides multiples of 8 elements; a workspace of sm90_workspace_size bytes.
template <Dtype D> size_t sm90_workspace_size(int64_t E, int sm_count);
template <Dtype D> void grouped_mm_sm90(const GroupedMmArgs& args, int sm_count);
template <Dtype D> void grouped_mm_weight_grad_sm90(const WeightGradArgs& args, int sm_count);

// Ampere CUTLASS 2.x grouped GEMMs (mma.sync tensor cores, bf16/fp16; every arch >= 80, Hopper
// included). The sm90 requirements, and K and N multiples of 8 elements too; a workspace of
// sm80_workspace_size bytes. sm_count sizes the persistent grid.
template <Dtype D> size_t sm80_workspace_size(int64_t E);
template <Dtype D> void grouped_mm_sm80(const GroupedMmArgs& args, int sm_count);
template <Dtype D> void grouped_mm_weight_grad_sm80(const WeightGradArgs& args, int sm_count);

// Fill kernels shared by the paths.
// y[r, :] = 0 for offs[E-1] <= r < S (all rows when E == 0); y (S, N) contiguous.
void zero_rows_past_last_group(void* y, size_t element_bytes, const int32_t* offs, int64_t E,
                               int64_t S, int64_t N, cudaStream_t stream);
// dw[e] = 0 for each empty group e; dw (E, K, N) contiguous.
void zero_empty_groups(void* dw, size_t element_bytes, const int32_t* offs, int64_t E,
                       int64_t S, int64_t K, int64_t N, cudaStream_t stream);

}  // namespace modekernels
