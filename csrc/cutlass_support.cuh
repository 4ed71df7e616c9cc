// Pieces both CUTLASS grouped GEMM families (grouped_mm_sm80.cuh, grouped_mm_sm90.cuh) use: the
// CUTLASS element type of a dtype, workspace alignment, status and argument checks, the size of
// the prepare kernels' grid. `family` ("sm80", "sm90") names the kernels in error messages.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>

#include "cuda_check.h"
#include "dtype.h"

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

}  // namespace cutlass_support
}  // namespace modekernels
