// Zero fills of the grouped GEMM outputs that no GEMM tile writes.
#include <algorithm>
#include <cstdint>

#include "cuda_check.h"
#include "group_rows.cuh"
#include "grouped_mm.h"

namespace modekernels {
namespace {

constexpr int kThreads = 256;

// Word: an unsigned integer as wide as one element (all-zero bits are 0.0 in every float type).
template <typename Word>
__global__ void zero_rows_kernel(Word* y, const int32_t* offs, int64_t E, int64_t S, int64_t N) {
  int64_t first_row = S, unused;
  if (E == 0) {
    first_row = 0;
  } else {
    group_rows(offs, E - 1, S, unused, first_row);
  }
  const int64_t total = S * N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = first_row * N + blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
    y[i] = Word(0);
  }
}

// blockIdx.x: the group; blockIdx.y: a slice of its (K, N) matrix.
template <typename Word>
__global__ void zero_empty_groups_kernel(Word* dw, const int32_t* offs, int64_t S, int64_t KN) {
  int64_t start, end;
  group_rows(offs, blockIdx.x, S, start, end);
  if (end > start) return;
  Word* group = dw + static_cast<int64_t>(blockIdx.x) * KN;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t i = blockIdx.y * blockDim.x + threadIdx.x; i < KN; i += step) group[i] = Word(0);
}

int64_t blocks_for(int64_t elements, int64_t cap) {
  return std::max<int64_t>(1, std::min<int64_t>((elements + kThreads - 1) / kThreads, cap));
}

template <typename Word>
void zero_rows(void* y, const int32_t* offs, int64_t E, int64_t S, int64_t N, cudaStream_t stream) {
  zero_rows_kernel<Word><<<blocks_for(S * N, 1024), kThreads, 0, stream>>>(
      static_cast<Word*>(y), offs, E, S, N);
  check_launch("zero_rows_past_last_group");
}

template <typename Word>
void zero_groups(void* dw, const int32_t* offs, int64_t E, int64_t S, int64_t KN,
                 cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(E), static_cast<unsigned>(blocks_for(KN, 64)));
  zero_empty_groups_kernel<Word><<<grid, kThreads, 0, stream>>>(static_cast<Word*>(dw), offs, S, KN);
  check_launch("zero_empty_groups");
}

}  // namespace

void zero_rows_past_last_group(void* y, size_t element_bytes, const int32_t* offs, int64_t E,
                               int64_t S, int64_t N, cudaStream_t stream) {
  if (S == 0 || N == 0) return;
  require(element_bytes == 2 || element_bytes == 4, "zero_rows_past_last_group: element size");
  if (element_bytes == 2) {
    zero_rows<uint16_t>(y, offs, E, S, N, stream);
  } else {
    zero_rows<uint32_t>(y, offs, E, S, N, stream);
  }
}

void zero_empty_groups(void* dw, size_t element_bytes, const int32_t* offs, int64_t E,
                       int64_t S, int64_t K, int64_t N, cudaStream_t stream) {
  if (E == 0 || K == 0 || N == 0) return;
  require(element_bytes == 2 || element_bytes == 4, "zero_empty_groups: element size");
  require(E <= INT32_MAX, "zero_empty_groups: too many groups");
  if (element_bytes == 2) {
    zero_groups<uint16_t>(dw, offs, E, S, K * N, stream);
  } else {
    zero_groups<uint32_t>(dw, offs, E, S, K * N, stream);
  }
}

}  // namespace modekernels
