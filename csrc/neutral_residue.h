// Host entry points of the gated residue block's elementwise kernels; its two GEMMs are the
// grouped GEMM with one group (grouped_mm.h). No PyTorch: raw pointers, shapes, element strides;
// biases contiguous; launches go to `stream`. Formulas: modekernels.reference.neutral_residue.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace modekernels {

// g (T,) float32 = gate(x·w_gate + b_gate) (activation.cuh gate codes; relu or sigmoid).
struct NeutralGateArgs {
  const void* x;  // (T, d), element strides
  int64_t T, d, x_stride_t, x_stride_d;
  const void* w_gate;  // (d,), element stride
  int64_t w_gate_stride;
  const void* b_gate;  // () or null
  int gate;
  float* g;
  Dtype dtype;
  cudaStream_t stream;
};

void neutral_residue_gate(const NeutralGateArgs& args);

// pre (T, d_a or 2·d_a) contiguous holds [x·W_inᵀ | x·W_gluᵀ]; h (T, d_a) = act(u) ⊙ v
// with u, v the biased halves (act(u) without GLU). With keep the biases are added to pre in place.
// skip_gate (T,) float32 or null: rows where it is 0 get h = 0 without the activation.
struct NeutralProjectEpilogueArgs {
  void* pre;
  int64_t T, d_a;
  bool glu;
  const void* b_in;   // (d_a,) or null
  const void* b_glu;  // (d_a,) or null
  int activation;
  bool keep;
  const float* skip_gate;
  void* h;
  Dtype dtype;
  cudaStream_t stream;
};

void neutral_residue_project_epilogue(const NeutralProjectEpilogueArgs& args);

// y_a = g·(a + b_out), exactly 0 where g == 0; y (T, d) contiguous = residual + y_a (exactly
// the residual where g == 0; y_a alone without a residual); l1 (T,) = Σ |y_a| per row, a
// fixed-order block sum. g null: g = 1.
struct NeutralOutputEpilogueArgs {
  const void* a;  // (T, d) contiguous: h·W_outᵀ
  int64_t T, d;
  const void* b_out;  // (d,) or null
  const float* g;
  const void* residual;  // (T, d) with element strides, or null
  int64_t residual_stride_t, residual_stride_d;
  void* y;
  float* l1;
  Dtype dtype;
  cudaStream_t stream;
};

void neutral_residue_output_epilogue(const NeutralOutputEpilogueArgs& args);

// The elementwise step of the backward (reference.glu_backward): gh (T, d_a) = g·h and
// dpre (T, n_pre + [gate]) = [du | dv | dz], contiguous, with dz = (Σ dh·h + extra)·gate'(g).
// Also the expert MLP's activation backward: no row gate (g null), no gh, no dz.
struct NeutralGluBackwardArgs {
  const void* pre;  // (T, n_pre), element strides
  int64_t pre_stride_t, pre_stride_a;
  const void* dh;  // (T, d_a), element strides
  int64_t dh_stride_t, dh_stride_a;
  const float* g;      // (T,), or null: a unit row gate
  const float* extra;  // (T,), read only when gate is not none
  int64_t T, d_a;
  bool glu;
  int activation;
  int gate;
  void* gh;            // (T, d_a) contiguous, or null: not stored
  void* dpre;          // (T, n_pre + [1 when gated]) contiguous
  Dtype dtype;
  cudaStream_t stream;
};

void neutral_residue_glu_backward(const NeutralGluBackwardArgs& args);

}  // namespace modekernels
