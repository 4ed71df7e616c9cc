// Host entry points of the expert MLP's elementwise kernels; its two GEMMs are the grouped GEMM
// (grouped_mm.h). No PyTorch: raw pointers, shapes, element strides; launches go to `stream`.
//
// Slots: token t's j-th expert choice is slot t·k + j of the S = T·k slots; perm (S,) lists the
// slots sorted by expert and offs (E,) int32 the experts' cumulative ends in that order. Sorted
// rows at or past offs[E-1] belong to no expert.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace modekernels {

// dst (S, K) contiguous: dst[r] = x[perm[r] / top_k], a zero row where that token is outside
// [0, T). x (T, K) with element strides; element_bytes 2 or 4.
void gather_rows(const void* x, int64_t T, int64_t K, int64_t x_stride_t, int64_t x_stride_k,
                 const int64_t* perm, int64_t S, int64_t top_k, void* dst, size_t element_bytes,
                 cudaStream_t stream);

struct MoeUpEpilogueArgs {
  void* pre;           // (S, N1) contiguous: the up GEMM's output, rows past offs[E-1] zero;
                       // with keep, the bias is added in place (it becomes pre of the op)
  const void* bias;    // (E, N1) with element strides, or null
  int64_t bias_stride_e, bias_stride_n;
  const int32_t* offs;  // (E,)
  int64_t S, E, I;     // N1 = 2·I when gated, else I
  bool gated;
  int activation;      // activation.cuh codes
  bool keep;
  void* h;             // (S, I) contiguous: act(u) or act(u)·v; zero rows past offs[E-1]
  Dtype dtype;
  cudaStream_t stream;
};

void moe_mlp_up_epilogue(const MoeUpEpilogueArgs& args);

struct MoeDownCombineArgs {
  const void* out;     // (S, N) contiguous: the down GEMM's output in sorted order
  const int64_t* perm;  // (S,)
  const int32_t* offs;  // (E,)
  int64_t S, E, N, T, top_k;  // S = T·top_k
  const void* bias;    // (E, N) with element strides, or null
  int64_t bias_stride_e, bias_stride_n;
  const float* gate;   // (S,) contiguous, by slot
  int64_t* slot_row;   // (S,) workspace: the sorted row holding each slot
  int32_t* slot_expert;  // (S,) workspace: that row's expert (E: none)
  void* y;             // (T, N) contiguous: y[t] = Σ_j gate·(out[row] + bias[e]) over j in order
  Dtype dtype;
  cudaStream_t stream;
};

void moe_mlp_down_combine(const MoeDownCombineArgs& args);

// The backward's gate step, per sorted row r: dh[r] = scale[r]·a[r] (rounded to the element
// type) and dot[r] = Σ_c a[r, c]·h[r, c] in float32 (a block sum: deterministic).
struct MoeGateBackwardArgs {
  const void* a;       // (S, I) with element strides: dy[token]·w2[e]^T
  int64_t a_stride_s, a_stride_i;
  const void* h;       // (S, I) with element strides
  int64_t h_stride_s, h_stride_i;
  const float* scale;  // (S,): each row's gate
  int64_t S, I;
  void* dh;            // (S, I) contiguous
  float* dot;          // (S,)
  Dtype dtype;
  cudaStream_t stream;
};

void moe_mlp_gate_backward(const MoeGateBackwardArgs& args);

}  // namespace modekernels
