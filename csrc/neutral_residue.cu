// The elementwise kernels of the gated residue block's cuda path (the GEMMs are the grouped
// GEMM): the gate (one warp per row, a fixed-order dot product), the projection epilogue and
// the output epilogue (one block per row; the row's ℓ1 a fixed-order block sum), and the fused
// elementwise step of the backward (one block per row). Row loops stride by the grid.
#include <algorithm>
#include <cstdint>

#include "activation.cuh"
#include "cuda_check.h"
#include "elements.cuh"
#include "launch_shape.h"
#include "neutral_residue.h"
#include "reduce.cuh"

namespace modekernels {
namespace {

constexpr int kGateThreads = 256;

template <typename T>
__global__ void gate_kernel(const T* x, int64_t num_rows, int64_t d, int64_t x_stride_t,
                            int64_t x_stride_d, const T* w_gate, int64_t w_gate_stride,
                            const T* b_gate, int gate, float* g) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
       row < num_rows; row += warps) {
    const T* x_row = x + row * x_stride_t;
    float z = 0.0f;
    for (int64_t c = lane; c < d; c += kWarpSize) {
      z = fmaf(to_float(x_row[c * x_stride_d]), to_float(w_gate[c * w_gate_stride]), z);
    }
    z = warp_sum(z);
    if (b_gate != nullptr) z += to_float(*b_gate);
    if (lane == 0) g[row] = apply_gate(z, gate);
  }
}

template <typename T>
__global__ void project_epilogue_kernel(T* pre, int64_t num_rows, int64_t d_a, bool glu,
                                        const T* b_in, const T* b_glu, int activation, bool keep,
                                        const float* skip_gate, T* h) {
  const int64_t n_pre = glu ? 2 * d_a : d_a;
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const bool skip = skip_gate != nullptr && skip_gate[row] == 0.0f;
    T* u_row = pre + row * n_pre;
    T* v_row = u_row + d_a;
    T* h_row = h + row * d_a;
    for (int64_t c = threadIdx.x; c < d_a; c += blockDim.x) {
      float u = to_float(u_row[c]);
      if (b_in != nullptr) u += to_float(b_in[c]);
      float v = 1.0f;
      if (glu) {
        v = to_float(v_row[c]);
        if (b_glu != nullptr) v += to_float(b_glu[c]);
      }
      if (keep) {
        if (b_in != nullptr) u_row[c] = from_float<T>(u);
        if (glu && b_glu != nullptr) v_row[c] = from_float<T>(v);
      }
      const float hv = skip ? 0.0f : activate(u, activation) * v;  // v = 1 without GLU
      h_row[c] = from_float<T>(hv);
    }
  }
}

template <typename T>
__global__ void output_epilogue_kernel(const T* a, int64_t num_rows, int64_t d, const T* b_out,
                                       const float* g, const T* residual,
                                       int64_t residual_stride_t, int64_t residual_stride_d,
                                       T* y, float* l1) {
  __shared__ float scratch[kWarpSize + 1];
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const float gv = g != nullptr ? g[row] : 1.0f;
    const bool off = g != nullptr && gv == 0.0f;
    const T* a_row = a + row * d;
    T* y_row = y + row * d;
    float l1_part = 0.0f;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      float y_a = 0.0f;
      if (!off) {
        float value = to_float(a_row[c]);
        if (b_out != nullptr) value += to_float(b_out[c]);
        y_a = gv * value;
      }
      float out = y_a;
      if (residual != nullptr) {
        const float r = to_float(residual[row * residual_stride_t + c * residual_stride_d]);
        out = off ? r : r + y_a;
      }
      y_row[c] = from_float<T>(out);
      l1_part += fabsf(y_a);
    }
    const float total = block_sum(l1_part, scratch);
    if (threadIdx.x == 0) l1[row] = total;
  }
}

template <typename T>
__global__ void glu_backward_kernel(const T* pre, int64_t pre_stride_t, int64_t pre_stride_a,
                                    const T* dh, int64_t dh_stride_t, int64_t dh_stride_a,
                                    const float* g, const float* extra, int64_t num_rows,
                                    int64_t d_a, bool glu, int activation, int gate, T* gh,
                                    T* dpre) {
  __shared__ float scratch[kWarpSize + 1];
  const int64_t n_pre = glu ? 2 * d_a : d_a;
  const int64_t dpre_cols = n_pre + (gate != kGateNone ? 1 : 0);
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const float gv = g != nullptr ? g[row] : 1.0f;
    const T* pre_row = pre + row * pre_stride_t;
    const T* dh_row = dh + row * dh_stride_t;
    T* dpre_row = dpre + row * dpre_cols;
    float dot = 0.0f;  // Σ dh·h
    for (int64_t c = threadIdx.x; c < d_a; c += blockDim.x) {
      const float u = to_float(pre_row[c * pre_stride_a]);
      const float dhv = to_float(dh_row[c * dh_stride_a]);
      const float act = activate(u, activation);
      float du = gv * dhv * activation_derivative(u, activation);
      float hv = act;
      if (glu) {
        const float v = to_float(pre_row[(d_a + c) * pre_stride_a]);
        hv = act * v;
        du *= v;
        dpre_row[d_a + c] = from_float<T>(gv * dhv * act);
      }
      dot += dhv * hv;
      if (gh != nullptr) gh[row * d_a + c] = from_float<T>(gv * hv);
      dpre_row[c] = from_float<T>(du);
    }
    if (gate != kGateNone) {
      const float total = block_sum(dot, scratch);
      if (threadIdx.x == 0) {
        dpre_row[n_pre] = from_float<T>((total + extra[row]) * gate_derivative(gv, gate));
      }
    }
  }
}

void require_gate(int gate, bool allow_none, const char* what) {
  require((allow_none && gate == kGateNone) || gate == kGateRelu || gate == kGateSigmoid,
          std::string(what) + ": unknown gate code");
}

void require_activation(int activation, const char* what) {
  require(activation >= kIdentity && activation <= kRelu,
          std::string(what) + ": unknown activation code");
}

}  // namespace

void neutral_residue_gate(const NeutralGateArgs& a) {
  require(a.T >= 0 && a.d >= 0, "neutral_residue_gate: bad sizes");
  require_gate(a.gate, false, "neutral_residue_gate");
  if (a.T == 0) return;
  const int64_t rows_per_block = kGateThreads / kWarpSize;
  const int64_t blocks = std::min<int64_t>(ceil_div(a.T, rows_per_block), kMaxRowBlocks);
  with_element_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gate_kernel<T><<<static_cast<unsigned>(blocks), kGateThreads, 0, a.stream>>>(
        static_cast<const T*>(a.x), a.T, a.d, a.x_stride_t, a.x_stride_d,
        static_cast<const T*>(a.w_gate), a.w_gate_stride, static_cast<const T*>(a.b_gate),
        a.gate, a.g);
  });
  check_launch("neutral_residue gate_kernel");
}

void neutral_residue_project_epilogue(const NeutralProjectEpilogueArgs& a) {
  require(a.T >= 0 && a.d_a >= 0, "neutral_residue_project_epilogue: bad sizes");
  require_activation(a.activation, "neutral_residue_project_epilogue");
  if (a.T == 0 || a.d_a == 0) return;
  with_element_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    project_epilogue_kernel<T><<<row_blocks(a.T), column_threads(a.d_a), 0, a.stream>>>(
        static_cast<T*>(a.pre), a.T, a.d_a, a.glu, static_cast<const T*>(a.b_in),
        static_cast<const T*>(a.b_glu), a.activation, a.keep, a.skip_gate, static_cast<T*>(a.h));
  });
  check_launch("neutral_residue project_epilogue_kernel");
}

void neutral_residue_output_epilogue(const NeutralOutputEpilogueArgs& a) {
  require(a.T >= 0 && a.d >= 0, "neutral_residue_output_epilogue: bad sizes");
  if (a.T == 0) return;
  with_element_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    output_epilogue_kernel<T><<<row_blocks(a.T), column_threads(a.d), 0, a.stream>>>(
        static_cast<const T*>(a.a), a.T, a.d, static_cast<const T*>(a.b_out), a.g,
        static_cast<const T*>(a.residual), a.residual_stride_t, a.residual_stride_d,
        static_cast<T*>(a.y), a.l1);
  });
  check_launch("neutral_residue output_epilogue_kernel");
}

void neutral_residue_glu_backward(const NeutralGluBackwardArgs& a) {
  require(a.T >= 0 && a.d_a >= 0, "neutral_residue_glu_backward: bad sizes");
  require_activation(a.activation, "neutral_residue_glu_backward");
  require_gate(a.gate, true, "neutral_residue_glu_backward");
  require(a.gate == kGateNone || (a.g != nullptr && a.extra != nullptr),
          "neutral_residue_glu_backward: a gated block needs g and extra");
  if (a.T == 0) return;
  with_element_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    glu_backward_kernel<T><<<row_blocks(a.T), column_threads(a.d_a), 0, a.stream>>>(
        static_cast<const T*>(a.pre), a.pre_stride_t, a.pre_stride_a, static_cast<const T*>(a.dh),
        a.dh_stride_t, a.dh_stride_a, a.g, a.extra, a.T, a.d_a, a.glu, a.activation, a.gate,
        static_cast<T*>(a.gh), static_cast<T*>(a.dpre));
  });
  check_launch("neutral_residue glu_backward_kernel");
}

}  // namespace modekernels
