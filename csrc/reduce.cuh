// Warp and block reductions and scans with a fixed combination order, so that a float result
// depends only on the inputs and the block size: deterministic from run to run. Block versions
// need blockDim.x a multiple of 32 (at most 1024), every thread of the block calling them, and
// `scratch` a __shared__ array of at least 33 elements; they may be called again right away.
#pragma once

#include <cstdint>

namespace modekernels {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The sum of v over the warp, the same bits in every lane (xor butterfly: each step adds the
// same two values in every lane pair, and float addition is commutative).
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// The sum of v over the block, returned to every thread.
template <typename V>
__device__ V block_sum(V v, V* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V total = lane < warps ? scratch[lane] : V(0);
    total = warp_sum(total);
    if (lane == 0) scratch[kWarpSize] = total;
  }
  __syncthreads();
  const V total = scratch[kWarpSize];
  __syncthreads();
  return total;
}

// The exclusive prefix sum of v over the threads of the block in thread order; `total` gets the
// block's sum.
__device__ inline int32_t block_exclusive_scan(int32_t v, int32_t* scratch, int32_t& total) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  int32_t inclusive = v;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int32_t before = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += before;
  }
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int32_t own = lane < warps ? scratch[lane] : 0;
    int32_t prefix = own;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int32_t before = __shfl_up_sync(kFullMask, prefix, offset);
      if (lane >= offset) prefix += before;
    }
    if (lane < warps) scratch[lane] = prefix - own;  // exclusive prefix of the warp totals
    if (lane == kWarpSize - 1) scratch[kWarpSize] = prefix;
  }
  __syncthreads();
  const int32_t result = scratch[warp] + inclusive - v;
  total = scratch[kWarpSize];
  __syncthreads();
  return result;
}

}  // namespace modekernels
