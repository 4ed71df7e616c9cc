// The elementwise kernels of the expert MLP's cuda path (the GEMMs are the grouped GEMM):
//
// - gather_rows_kernel: the rows of x in expert order (the CUTLASS grouped GEMM reads its A
//   operand by group, not through a row index, so the cuda path makes this sorted copy).
// - up_epilogue_kernel: one block per sorted row: its expert by a binary search of offs, then
//   bias, activation and GLU in float32 (pre kept with its bias in place when asked).
// - slot_rows_kernel + combine_kernel: the inverse of perm (slot -> sorted row and expert), then
//   one block per token: y[t] = Σ_j gate[t·k + j]·(out[row] + b2[e]) summed over j in order in
//   float32 (deterministic: no atomics).
// - gate_backward_kernel: one block per sorted row of the backward: dh = gate·a and Σ a·h.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "activation.cuh"
#include "cuda_check.h"
#include "elements.cuh"
#include "group_rows.cuh"
#include "launch_shape.h"
#include "moe_mlp.h"
#include "reduce.cuh"

namespace modekernels {
namespace {

constexpr int kSlotThreads = 256;

// Word: an unsigned integer as wide as one element (a copy needs no conversion).
template <typename Word>
__global__ void gather_rows_kernel(const Word* x, int64_t T, int64_t K, int64_t x_stride_t,
                                   int64_t x_stride_k, const int64_t* perm, int64_t S,
                                   int64_t top_k, Word* dst) {
  for (int64_t row = blockIdx.x; row < S; row += gridDim.x) {
    const int64_t slot = perm[row];
    const int64_t token = slot >= 0 ? slot / top_k : -1;
    Word* out = dst + row * K;
    if (token < 0 || token >= T) {
      for (int64_t c = threadIdx.x; c < K; c += blockDim.x) out[c] = Word(0);
      continue;
    }
    const Word* in = x + token * x_stride_t;
    for (int64_t c = threadIdx.x; c < K; c += blockDim.x) out[c] = in[c * x_stride_k];
  }
}

template <typename T>
__global__ void up_epilogue_kernel(T* pre, const T* bias, int64_t bias_stride_e,
                                   int64_t bias_stride_n, const int32_t* offs, int64_t S,
                                   int64_t E, int64_t I, bool gated, int activation, bool keep,
                                   T* h) {
  const int64_t n1 = gated ? 2 * I : I;
  for (int64_t row = blockIdx.x; row < S; row += gridDim.x) {
    const int64_t e = group_of_row(offs, E, S, row);
    T* h_row = h + row * I;
    if (e == E) {  // no expert: the GEMM left pre zero, and h is zero
      for (int64_t c = threadIdx.x; c < I; c += blockDim.x) h_row[c] = from_float<T>(0.0f);
      continue;
    }
    T* p = pre + row * n1;
    const T* b = bias != nullptr ? bias + e * bias_stride_e : nullptr;
    for (int64_t c = threadIdx.x; c < I; c += blockDim.x) {
      float u = to_float(p[c]);
      if (b != nullptr) u += to_float(b[c * bias_stride_n]);
      if (keep && b != nullptr) p[c] = from_float<T>(u);
      float out = activate(u, activation);
      if (gated) {
        float v = to_float(p[I + c]);
        if (b != nullptr) v += to_float(b[(I + c) * bias_stride_n]);
        if (keep && b != nullptr) p[I + c] = from_float<T>(v);
        out *= v;
      }
      h_row[c] = from_float<T>(out);
    }
  }
}

// slot_row[perm[r]] = r and slot_expert[perm[r]] = the expert of row r (E: none); slots that no
// row names keep slot_row -1 (set before).
__global__ void slot_rows_kernel(const int64_t* perm, const int32_t* offs, int64_t S, int64_t E,
                                 int64_t* slot_row, int32_t* slot_expert) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < S; r += step) {
    const int64_t slot = perm[r];
    if (slot < 0 || slot >= S) continue;
    slot_row[slot] = r;
    slot_expert[slot] = static_cast<int32_t>(group_of_row(offs, E, S, r));
  }
}

template <typename T>
__global__ void combine_kernel(const T* out, const int64_t* slot_row, const int32_t* slot_expert,
                               int64_t E, int64_t S, int64_t N, int64_t num_tokens, int64_t top_k,
                               const T* bias, int64_t bias_stride_e, int64_t bias_stride_n,
                               const float* gate, T* y) {
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      float acc = 0.0f;
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t slot = t * top_k + j;
        const int64_t r = slot_row[slot];
        const int64_t e = slot_expert[slot];
        if (r < 0 || r >= S || e < 0 || e >= E) continue;  // held by no expert: contributes 0
        float o = to_float(out[r * N + c]);
        if (bias != nullptr) o += to_float(bias[e * bias_stride_e + c * bias_stride_n]);
        acc += gate[slot] * o;
      }
      y[t * N + c] = from_float<T>(acc);
    }
  }
}

template <typename T>
__global__ void gate_backward_kernel(const T* a, int64_t a_stride_s, int64_t a_stride_i,
                                     const T* h, int64_t h_stride_s, int64_t h_stride_i,
                                     const float* scale, int64_t S, int64_t I, T* dh,
                                     float* dot) {
  __shared__ float scratch[kWarpSize + 1];
  for (int64_t row = blockIdx.x; row < S; row += gridDim.x) {
    const float gate = scale[row];
    float sum = 0.0f;
    for (int64_t c = threadIdx.x; c < I; c += blockDim.x) {
      const float av = to_float(a[row * a_stride_s + c * a_stride_i]);
      sum += av * to_float(h[row * h_stride_s + c * h_stride_i]);
      dh[row * I + c] = from_float<T>(gate * av);
    }
    const float total = block_sum(sum, scratch);
    if (threadIdx.x == 0) dot[row] = total;
  }
}

}  // namespace

void gather_rows(const void* x, int64_t T, int64_t K, int64_t x_stride_t, int64_t x_stride_k,
                 const int64_t* perm, int64_t S, int64_t top_k, void* dst, size_t element_bytes,
                 cudaStream_t stream) {
  require(T >= 0 && K >= 0 && S >= 0 && top_k >= 1, "gather_rows: bad sizes");
  require(element_bytes == 2 || element_bytes == 4, "gather_rows: element size must be 2 or 4");
  if (S == 0 || K == 0) return;
  auto launch = [&](auto* typed_x) {
    using Word = std::remove_const_t<std::remove_pointer_t<decltype(typed_x)>>;
    gather_rows_kernel<Word><<<row_blocks(S), column_threads(K), 0, stream>>>(
        typed_x, T, K, x_stride_t, x_stride_k, perm, S, top_k, static_cast<Word*>(dst));
  };
  if (element_bytes == 2) {
    launch(static_cast<const uint16_t*>(x));
  } else {
    launch(static_cast<const uint32_t*>(x));
  }
  check_launch("gather_rows_kernel");
}

void moe_mlp_up_epilogue(const MoeUpEpilogueArgs& a) {
  require(a.S >= 0 && a.E >= 0 && a.I >= 0, "moe_mlp_up_epilogue: bad sizes");
  require(a.activation >= kIdentity && a.activation <= kRelu,
          "moe_mlp_up_epilogue: unknown activation code");
  if (a.S == 0 || a.I == 0) return;
  with_element_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    up_epilogue_kernel<T><<<row_blocks(a.S), column_threads(a.I), 0, a.stream>>>(
        static_cast<T*>(a.pre), static_cast<const T*>(a.bias), a.bias_stride_e, a.bias_stride_n,
        a.offs, a.S, a.E, a.I, a.gated, a.activation, a.keep, static_cast<T*>(a.h));
  });
  check_launch("moe_mlp up_epilogue_kernel");
}

void moe_mlp_down_combine(const MoeDownCombineArgs& a) {
  require(a.S >= 0 && a.E >= 0 && a.N >= 0 && a.T >= 0 && a.top_k >= 1 && a.S == a.T * a.top_k,
          "moe_mlp_down_combine: bad sizes (S must be T·top_k)");
  if (a.T == 0 || a.N == 0) return;
  check_cuda(cudaMemsetAsync(a.slot_row, 0xff, a.S * sizeof(int64_t), a.stream),
             "cudaMemsetAsync");  // all bits set: -1
  const int64_t slot_blocks = std::min<int64_t>(ceil_div(a.S, kSlotThreads), kMaxRowBlocks);
  slot_rows_kernel<<<static_cast<unsigned>(slot_blocks), kSlotThreads, 0, a.stream>>>(
      a.perm, a.offs, a.S, a.E, a.slot_row, a.slot_expert);
  check_launch("moe_mlp slot_rows_kernel");
  with_element_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    combine_kernel<T><<<row_blocks(a.T), column_threads(a.N), 0, a.stream>>>(
        static_cast<const T*>(a.out), a.slot_row, a.slot_expert, a.E, a.S, a.N, a.T, a.top_k,
        static_cast<const T*>(a.bias), a.bias_stride_e, a.bias_stride_n, a.gate,
        static_cast<T*>(a.y));
  });
  check_launch("moe_mlp combine_kernel");
}

void moe_mlp_gate_backward(const MoeGateBackwardArgs& a) {
  require(a.S >= 0 && a.I >= 0, "moe_mlp_gate_backward: bad sizes");
  if (a.S == 0) return;
  with_element_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gate_backward_kernel<T><<<row_blocks(a.S), column_threads(a.I), 0, a.stream>>>(
        static_cast<const T*>(a.a), a.a_stride_s, a.a_stride_i, static_cast<const T*>(a.h),
        a.h_stride_s, a.h_stride_i, a.scale, a.S, a.I, static_cast<T*>(a.dh), a.dot);
  });
  check_launch("moe_mlp gate_backward_kernel");
}

}  // namespace modekernels
