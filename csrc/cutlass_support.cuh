// Pieces both CUTLASS grouped GEMM families (grouped_mm_sm80.cuh, grouped_mm_sm90.cuh) use: the
// CUTLASS element type of a dtype, workspace alignment, status and argument checks, the size of
// the prepare kernels' grid. `family` ("sm80", "sm90") names the kernels in error messages.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include "cuda_check.h"
#include "dtype.h"
#include "grouped_mm.h"

namespace modekernels {
namespace cutlass_support {

template <Dtype D> struct ElementOf;
template <> struct ElementOf<Dtype::kFloat16> { using type = cutlass::half_t; };
template <> struct ElementOf<Dtype::kBFloat16> { using type = cutlass::bfloat16_t; };

// Every array carved out of a workspace starts on this boundary.
constexpr size_t kWorkspaceAlignment = 128;

inline size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
}

inline void check_cutlass(const char* family, cutlass::Status status, const char* step) {
  if (status != cutlass::Status::kSuccess) {
    std::string message = std::string("CUTLASS grouped GEMM (") + family + ") " + step +
                          " failed: " + cutlassGetStatusString(status);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) message += std::string(" (") + cudaGetErrorString(error) + ")";
    throw std::runtime_error(message);
  }
}

// Threads per block of the prepare kernels (one thread per group).
constexpr int kPrepareThreads = 128;

inline unsigned prepare_blocks(int64_t E) {
  return static_cast<unsigned>((E + kPrepareThreads - 1) / kPrepareThreads);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A multiple of the elements in 16 bytes (one TMA row step, one 128-bit access).
template <typename Element>
bool aligned_extent(int64_t n) {
  return n % (16 / static_cast<int64_t>(sizeof(Element))) == 0;
}

inline void require_32bit(const char* family, int64_t value, const char* name) {
  require(value <= INT32_MAX,
          std::string("grouped GEMM (") + family + "): " + name + " exceeds 2^31 - 1");
}

// The operand requirements of both families' forward: x with unit column stride, w with a unit
// stride in K or N (leading dimension `ldw`), 16-byte aligned pointers, 16-byte multiples for
// x's row stride, w's batch and leading strides and N, and K too where the kernels need it
// (`aligned_k`: the sm80 kernels predicate each 128-bit access by its first element), every
// size and leading dimension below 2^31.
template <typename Element>
void require_forward_operands(const char* family, const GroupedMmArgs& p, int64_t ldw,
                              bool aligned_k) {
  const std::string name = std::string("grouped_mm_") + family;
  require(p.w_stride_n == 1 || p.w_stride_k == 1,
          name + ": w needs a unit stride in its K or N dimension");
  require(p.x_stride_k == 1, name + ": x needs unit column stride");
  require(aligned16(p.x) && aligned16(p.w) && aligned16(p.y),
          name + ": x, w and y must be 16-byte aligned");
  require(aligned_extent<Element>(p.x_stride_s) && aligned_extent<Element>(p.w_stride_e) &&
              aligned_extent<Element>(ldw) && aligned_extent<Element>(p.N) &&
              (!aligned_k || aligned_extent<Element>(p.K)),
          name + ": strides of x and w, N" + (aligned_k ? " and K" : "") +
              " must be multiples of 16 bytes");
  require_32bit(family, p.S, "S");
  require_32bit(family, p.K, "K");
  require_32bit(family, p.N, "N");
  require_32bit(family, std::max(p.x_stride_s, ldw), "a leading dimension");
}

// The same for the weight gradient: x and dy with unit column strides, their row strides and N
// (and K where `aligned_k`) 16-byte multiples.
template <typename Element>
void require_weight_grad_operands(const char* family, const WeightGradArgs& p, bool aligned_k) {
  const std::string name = std::string("grouped_mm_weight_grad_") + family;
  require(p.x_stride_k == 1 && p.dy_stride_n == 1, name + ": x and dy need unit column strides");
  require(aligned16(p.x) && aligned16(p.dy) && aligned16(p.dw),
          name + ": x, dy and dw must be 16-byte aligned");
  require(aligned_extent<Element>(p.x_stride_s) && aligned_extent<Element>(p.dy_stride_s) &&
              aligned_extent<Element>(p.N) && (!aligned_k || aligned_extent<Element>(p.K)),
          name + ": row strides of x and dy, N" + (aligned_k ? " and K" : "") +
              " must be multiples of 16 bytes");
  require_32bit(family, p.S, "S");
  require_32bit(family, p.K, "K");
  require_32bit(family, p.N, "N");
  require_32bit(family, std::max(p.x_stride_s, p.dy_stride_s), "a leading dimension");
}

}  // namespace cutlass_support
}  // namespace modekernels
