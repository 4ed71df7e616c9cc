// Generic grouped GEMM on CUDA cores: any dtype (fp32 products are IEEE fp32), any strides, any
// alignment, fp32 accumulation. The fallback of the tensor-core paths and the fp32 path.
//
// Each 256-thread block computes one 64x64 tile of one group's output with 16-deep k steps
// through shared memory; each thread owns a 4x4 register tile (rows ty + 16 i, columns
// tx + 16 j, so shared-memory reads are broadcasts or consecutive).
#include <cstdint>

#include "cuda_check.h"
#include "elements.cuh"
#include "group_rows.cuh"
#include "grouped_mm.h"

namespace modekernels {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;
constexpr int kThreadsPerRow = 16;                      // kThreads = 16 x 16
constexpr int kLoadsPerThread = kTileM * kTileK / kThreads;  // also kTileK * kTileN / kThreads
static_assert(kTileM * kTileK == kThreads * kLoadsPerThread, "A tile load split");
static_assert(kTileK * kTileN == kThreads * kLoadsPerThread, "B tile load split");

// One group's C (M x N, row stride c_sm, unit column stride) = A (M x K) @ B (K x N), A and B
// seen through element strides.
template <typename T>
struct GroupGemm {
  const T* a;
  int64_t a_sm, a_sk;
  const T* b;
  int64_t b_sk, b_sn;
  T* c;
  int64_t c_sm;
  int64_t M, N, K;
};

// The tile of C with top-left corner (m0, n0).
template <typename T>
__device__ void gemm_tile(const GroupGemm<T>& g, int64_t m0, int64_t n0) {
  // One float of padding per row keeps the transposing tile stores free of bank conflicts.
  __shared__ float a_tile[kTileK][kTileM + 1];
  __shared__ float b_tile[kTileK][kTileN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % kThreadsPerRow;
  const int ty = tid / kThreadsPerRow;
  // Load order follows the contiguous dimension of each operand so that loads coalesce.
  const bool a_k_contiguous = g.a_sk == 1;
  const bool b_n_contiguous = g.b_sn == 1;
  float acc[4][4] = {};

  for (int64_t k0 = 0; k0 < g.K; k0 += kTileK) {
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int idx = tid + l * kThreads;
      const int mm = a_k_contiguous ? idx / kTileK : idx % kTileM;
      const int kk = a_k_contiguous ? idx % kTileK : idx / kTileM;
      const int64_t m = m0 + mm;
      const int64_t k = k0 + kk;
      a_tile[kk][mm] = (m < g.M && k < g.K) ? to_float(g.a[m * g.a_sm + k * g.a_sk]) : 0.0f;
    }
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int idx = tid + l * kThreads;
      const int nn = b_n_contiguous ? idx % kTileN : idx / kTileK;
      const int kk = b_n_contiguous ? idx / kTileN : idx % kTileK;
      const int64_t n = n0 + nn;
      const int64_t k = k0 + kk;
      b_tile[kk][nn] = (n < g.N && k < g.K) ? to_float(g.b[k * g.b_sk + n * g.b_sn]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = a_tile[kk][ty + kThreadsPerRow * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = b_tile[kk][tx + kThreadsPerRow * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + kThreadsPerRow * i;
    if (m >= g.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + kThreadsPerRow * j;
      if (n < g.N) g.c[m * g.c_sm + n] = from_float<T>(acc[i][j]);
    }
  }
}

template <typename T>
struct ForwardParams {
  const T* x;
  const T* w;
  const int32_t* offs;
  T* y;
  int64_t S, K, N, E;
  int64_t x_stride_s, x_stride_k, w_stride_e, w_stride_k, w_stride_n;
};

// blockIdx.x enumerates the (group, 64-row tile) pairs in group order, blockIdx.y the column
// tiles. The grid covers ceil(S / 64) + E row tiles, at least the sum over groups of
// ceil(rows / 64); blocks past the last tile return.
template <typename T>
__global__ void __launch_bounds__(kThreads) grouped_mm_kernel(ForwardParams<T> p) {
  int64_t tile = blockIdx.x;
  int64_t e = 0, start = 0, end = 0, previous_end = 0;
  for (; e < p.E; ++e) {
    group_rows(p.offs, e, p.S, start, end);
    // Each group starts where the previous one ended (as the Triton scheduler chains them):
    // the same rows for valid offsets, and for decreasing ones that a device-side caller can
    // pass unchecked no overlapping groups, which would need more tiles than the grid holds.
    start = previous_end;
    end = end < start ? start : end;
    previous_end = end;
    const int64_t tiles = (end - start + kTileM - 1) / kTileM;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (e == p.E) return;
  GroupGemm<T> g;
  g.a = p.x + start * p.x_stride_s;
  g.a_sm = p.x_stride_s;
  g.a_sk = p.x_stride_k;
  g.b = p.w + e * p.w_stride_e;
  g.b_sk = p.w_stride_k;
  g.b_sn = p.w_stride_n;
  g.c = p.y + start * p.N;
  g.c_sm = p.N;
  g.M = end - start;
  g.N = p.N;
  g.K = p.K;
  gemm_tile(g, tile * kTileM, static_cast<int64_t>(blockIdx.y) * kTileN);
}

template <typename T>
struct WeightGradParams {
  const T* x;
  const T* dy;
  const int32_t* offs;
  T* dw;
  int64_t S, K, N, E;
  int64_t x_stride_s, x_stride_k, dy_stride_s, dy_stride_n;
};

// blockIdx.z: the group; (blockIdx.y, blockIdx.x): the (K, N) tile of dw[e] = x_e^T dy_e. An
// empty group runs no k step and stores zeros.
template <typename T>
__global__ void __launch_bounds__(kThreads) grouped_mm_weight_grad_kernel(WeightGradParams<T> p) {
  const int64_t e = blockIdx.z;
  int64_t start, end;
  group_rows(p.offs, e, p.S, start, end);
  GroupGemm<T> g;
  g.a = p.x + start * p.x_stride_s;  // A = x_e^T: (K, rows)
  g.a_sm = p.x_stride_k;
  g.a_sk = p.x_stride_s;
  g.b = p.dy + start * p.dy_stride_s;  // B = dy_e: (rows, N)
  g.b_sk = p.dy_stride_s;
  g.b_sn = p.dy_stride_n;
  g.c = p.dw + e * p.K * p.N;
  g.c_sm = p.N;
  g.M = p.K;
  g.N = p.N;
  g.K = end - start;
  gemm_tile(g, static_cast<int64_t>(blockIdx.y) * kTileM, static_cast<int64_t>(blockIdx.x) * kTileN);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxGridYZ = 65535;

}  // namespace

template <Dtype D>
void grouped_mm_simt(const GroupedMmArgs& args) {
  using T = typename ElementOf<D>::type;
  if (args.S == 0 || args.N == 0) return;
  zero_rows_past_last_group(args.y, sizeof(T), args.offs, args.E, args.S, args.N, args.stream);
  if (args.E == 0) return;
  const int64_t row_tiles = ceil_div(args.S, kTileM) + args.E;
  const int64_t column_tiles = ceil_div(args.N, kTileN);
  require(row_tiles <= INT32_MAX, "grouped_mm_simt: too many rows and groups");
  require(column_tiles <= kMaxGridYZ, "grouped_mm_simt: N too large");
  ForwardParams<T> p{static_cast<const T*>(args.x), static_cast<const T*>(args.w), args.offs,
                     static_cast<T*>(args.y), args.S, args.K, args.N, args.E,
                     args.x_stride_s, args.x_stride_k, args.w_stride_e, args.w_stride_k,
                     args.w_stride_n};
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(column_tiles));
  grouped_mm_kernel<T><<<grid, kThreads, 0, args.stream>>>(p);
  check_launch("grouped_mm_simt");
}

template <Dtype D>
void grouped_mm_weight_grad_simt(const WeightGradArgs& args) {
  using T = typename ElementOf<D>::type;
  if (args.E == 0 || args.K == 0 || args.N == 0) return;
  const int64_t column_tiles = ceil_div(args.N, kTileN);
  const int64_t row_tiles = ceil_div(args.K, kTileM);
  require(column_tiles <= INT32_MAX, "grouped_mm_weight_grad_simt: N too large");
  require(row_tiles <= kMaxGridYZ, "grouped_mm_weight_grad_simt: K too large");
  require(args.E <= kMaxGridYZ, "grouped_mm_weight_grad_simt: more than 65535 groups");
  WeightGradParams<T> p{static_cast<const T*>(args.x), static_cast<const T*>(args.dy), args.offs,
                        static_cast<T*>(args.dw), args.S, args.K, args.N, args.E,
                        args.x_stride_s, args.x_stride_k, args.dy_stride_s, args.dy_stride_n};
  const dim3 grid(static_cast<unsigned>(column_tiles), static_cast<unsigned>(row_tiles),
                  static_cast<unsigned>(args.E));
  grouped_mm_weight_grad_kernel<T><<<grid, kThreads, 0, args.stream>>>(p);
  check_launch("grouped_mm_weight_grad_simt");
}

template void grouped_mm_simt<Dtype::kFloat32>(const GroupedMmArgs&);
template void grouped_mm_simt<Dtype::kFloat16>(const GroupedMmArgs&);
template void grouped_mm_simt<Dtype::kBFloat16>(const GroupedMmArgs&);
template void grouped_mm_weight_grad_simt<Dtype::kFloat32>(const WeightGradArgs&);
template void grouped_mm_weight_grad_simt<Dtype::kFloat16>(const WeightGradArgs&);
template void grouped_mm_weight_grad_simt<Dtype::kBFloat16>(const WeightGradArgs&);

}  // namespace modekernels
