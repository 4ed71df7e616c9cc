// Ampere grouped GEMMs: CUTLASS 2.x grouped kernels (mma.sync tensor cores, cp.async multistage
// mainloop, 128x128x32 threadblock tiles, 64x64x32 warp tiles, 16x8x16 instructions, 4 stages,
// fp32 accumulation). Built for every listed arch: they run on sm_80 and newer, Hopper included.
//
// The kernel schedules its tiles on the device (GroupScheduleMode::kDeviceOnly) from per-group
// problem sizes, pointers and leading dimensions that a small prepare kernel writes into the
// caller's workspace from the device-side offsets, so the host never sees the offsets. An empty
// group gets M = 0: no tile is scheduled for it. Included by one .cu file per dtype, which
// instantiates it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/gemm.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/layout/matrix.h>
#include <cutlass/numeric_types.h>

#include "cuda_check.h"
#include "cutlass_support.cuh"
#include "group_rows.cuh"
#include "grouped_mm.h"

namespace modekernels {

using namespace cutlass_support;

namespace sm80 {

// D_g (M_g x N_g, row-major) = A_g (M_g x K_g) @ B_g (K_g x N_g) for every group g.
template <typename Element, typename LayoutA, typename LayoutB>
struct GroupedGemm {
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 16 / sizeof(Element);  // 128-bit global accesses
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, kAlignment,
      Element, LayoutB, cutlass::ComplexTransform::kNone, kAlignment,
      Element, LayoutD, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>,
      cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>, 4,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

// Forward: A = x rows of the group (row-major), B = w[e] (RowMajor: (E, K, N) contiguous rows;
// ColumnMajor: the transposed view of an (E, N, K) tensor), D = y rows of the group.
template <typename Element, typename LayoutB>
using ForwardGemm = GroupedGemm<Element, cutlass::layout::RowMajor, LayoutB>;
// Weight gradient: A = x_e^T (column-major view of x's rows), B = dy_e (row-major), D = dw[e].
template <typename Element>
using WeightGradGemm =
    GroupedGemm<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

// The per-group arrays the GEMM reads, carved out of the workspace (the kDeviceOnly schedule
// needs no workspace of CUTLASS's own). D doubles as the source C, which beta = 0 never reads.
template <typename Element>
struct GroupArrays {
  cutlass::gemm::GemmCoord* shapes = nullptr;
  Element** a = nullptr;
  Element** b = nullptr;
  Element** d = nullptr;
  int64_t* lda = nullptr;
  int64_t* ldb = nullptr;
  int64_t* ldd = nullptr;

  static size_t bytes(int64_t E) {
    const size_t n = static_cast<size_t>(E);
    return align_up(n * sizeof(cutlass::gemm::GemmCoord)) + 3 * align_up(n * sizeof(void*)) +
           3 * align_up(n * sizeof(int64_t));
  }

  static GroupArrays carve(char* base, int64_t E) {
    const size_t n = static_cast<size_t>(E);
    GroupArrays arrays;
    auto take = [&](auto*& field, size_t element_bytes) {
      field = reinterpret_cast<std::remove_reference_t<decltype(field)>>(base);
      base += align_up(n * element_bytes);
    };
    take(arrays.shapes, sizeof(cutlass::gemm::GemmCoord));
    take(arrays.a, sizeof(void*));
    take(arrays.b, sizeof(void*));
    take(arrays.d, sizeof(void*));
    take(arrays.lda, sizeof(int64_t));
    take(arrays.ldb, sizeof(int64_t));
    take(arrays.ldd, sizeof(int64_t));
    return arrays;
  }
};

template <typename Element>
__global__ void prepare_forward(GroupArrays<Element> arrays, const Element* x, const Element* w,
                                const int32_t* offs, Element* y, int64_t S, int64_t K, int64_t N,
                                int64_t E, int64_t ldx, int64_t w_stride_e, int64_t ldw) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int64_t start, end;
  group_rows(offs, e, S, start, end);
  arrays.shapes[e] = cutlass::gemm::GemmCoord(static_cast<int>(end - start), static_cast<int>(N),
                                              static_cast<int>(K));
  arrays.a[e] = const_cast<Element*>(x + start * ldx);
  arrays.b[e] = const_cast<Element*>(w + e * w_stride_e);
  arrays.d[e] = y + start * N;
  arrays.lda[e] = ldx;
  arrays.ldb[e] = ldw;
  arrays.ldd[e] = N;
}

// An empty group gets M = 0 (zero_empty_groups writes its zeros).
template <typename Element>
__global__ void prepare_weight_grad(GroupArrays<Element> arrays, const Element* x,
                                    const Element* dy, const int32_t* offs, Element* dw,
                                    int64_t S, int64_t K, int64_t N, int64_t E, int64_t ldx,
                                    int64_t ldy) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int64_t start, end;
  group_rows(offs, e, S, start, end);
  const int rows = static_cast<int>(end - start);
  arrays.shapes[e] = cutlass::gemm::GemmCoord(rows > 0 ? static_cast<int>(K) : 0,
                                              static_cast<int>(N), rows);
  arrays.a[e] = const_cast<Element*>(x + start * ldx);
  arrays.b[e] = const_cast<Element*>(dy + start * ldy);
  arrays.d[e] = dw + e * K * N;
  arrays.lda[e] = ldx;
  arrays.ldb[e] = ldy;
  arrays.ldd[e] = N;
}

// Checks and lays out the workspace, runs `prepare(arrays)` (which launches the zero fill and the
// prepare kernel), then the GEMM on one persistent wave: sm_count times the blocks that fit on
// one SM. Argument errors are raised before anything is launched.
template <typename G, typename Element, typename Prepare>
void run(int64_t E, int sm_count, void* workspace, size_t workspace_bytes, cudaStream_t stream,
         Prepare prepare) {
  require(E <= INT32_MAX, "grouped GEMM (sm80): too many groups");
  require(sm_count > 0, "grouped GEMM (sm80): sm_count must be positive");
  require(reinterpret_cast<uintptr_t>(workspace) % kWorkspaceAlignment == 0,
          "grouped GEMM (sm80): the workspace must be 128-byte aligned");
  require(workspace_bytes >= GroupArrays<Element>::bytes(E),
          "grouped GEMM (sm80): workspace too small (use the *_workspace_size function)");
  const auto arrays = GroupArrays<Element>::carve(static_cast<char*>(workspace), E);
  prepare(arrays);
  check_launch("grouped GEMM (sm80) prepare kernel");

  const int threadblocks = G::Gemm::sufficient(nullptr, 0, sm_count);
  if (threadblocks <= 0) check_cutlass("sm80", cutlass::Status::kErrorInternal, "occupancy query");
  typename G::Gemm::Arguments args(arrays.shapes, static_cast<int>(E), threadblocks, {1.0f, 0.0f},
                                   arrays.a, arrays.b, arrays.d, arrays.d, arrays.lda, arrays.ldb,
                                   arrays.ldd, arrays.ldd);
  typename G::Gemm gemm;
  check_cutlass("sm80", gemm.can_implement(args), "can_implement");
  check_cutlass("sm80", gemm.initialize(args, nullptr, stream), "initialize");
  check_cutlass("sm80", gemm.run(stream), "run");
  check_launch("grouped GEMM (sm80)");
}

}  // namespace sm80

template <Dtype D>
size_t sm80_workspace_size(int64_t E) {
  return sm80::GroupArrays<typename ElementOf<D>::type>::bytes(E);
}

// The 128-bit accesses are predicated per access, so besides the leading dimensions the
// contiguous extents (K of x and of a transposed w, N of w, y and dy) are multiples of 8.
template <Dtype D>
void grouped_mm_sm80(const GroupedMmArgs& p, int sm_count) {
  using Element = typename ElementOf<D>::type;
  if (p.S == 0 || p.N == 0) return;
  if (p.E == 0 || p.K == 0) {
    check_cuda(cudaMemsetAsync(p.y, 0, p.S * p.N * sizeof(Element), p.stream), "cudaMemsetAsync");
    return;
  }
  const bool b_row_major = p.w_stride_n == 1;
  const int64_t ldw = b_row_major ? p.w_stride_k : p.w_stride_n;
  require_forward_operands<Element>("sm80", p, ldw, /*aligned_k=*/true);

  const auto* x = static_cast<const Element*>(p.x);
  const auto* w = static_cast<const Element*>(p.w);
  auto* y = static_cast<Element*>(p.y);
  auto launch = [&](auto gemm_tag) {
    using G = decltype(gemm_tag);
    sm80::run<G, Element>(p.E, sm_count, p.workspace, p.workspace_bytes, p.stream,
                          [&](const sm80::GroupArrays<Element>& arrays) {
                            zero_rows_past_last_group(p.y, sizeof(Element), p.offs, p.E, p.S, p.N,
                                                      p.stream);
                            sm80::prepare_forward<Element>
                                <<<prepare_blocks(p.E), kPrepareThreads, 0, p.stream>>>(
                                    arrays, x, w, p.offs, y, p.S, p.K, p.N, p.E, p.x_stride_s,
                                    p.w_stride_e, ldw);
                          });
  };
  if (b_row_major) {
    launch(sm80::ForwardGemm<Element, cutlass::layout::RowMajor>{});
  } else {
    launch(sm80::ForwardGemm<Element, cutlass::layout::ColumnMajor>{});
  }
}

template <Dtype D>
void grouped_mm_weight_grad_sm80(const WeightGradArgs& p, int sm_count) {
  using Element = typename ElementOf<D>::type;
  if (p.E == 0 || p.K == 0 || p.N == 0) return;
  if (p.S == 0) {
    check_cuda(cudaMemsetAsync(p.dw, 0, p.E * p.K * p.N * sizeof(Element), p.stream),
               "cudaMemsetAsync");
    return;
  }
  require_weight_grad_operands<Element>("sm80", p, /*aligned_k=*/true);

  using G = sm80::WeightGradGemm<Element>;
  const auto* x = static_cast<const Element*>(p.x);
  const auto* dy = static_cast<const Element*>(p.dy);
  auto* dw = static_cast<Element*>(p.dw);
  sm80::run<G, Element>(p.E, sm_count, p.workspace, p.workspace_bytes, p.stream,
                        [&](const sm80::GroupArrays<Element>& arrays) {
                          zero_empty_groups(p.dw, sizeof(Element), p.offs, p.E, p.S, p.K, p.N,
                                            p.stream);
                          sm80::prepare_weight_grad<Element>
                              <<<prepare_blocks(p.E), kPrepareThreads, 0, p.stream>>>(
                                  arrays, x, dy, p.offs, dw, p.S, p.K, p.N, p.E, p.x_stride_s,
                                  p.dy_stride_s);
                        });
}

}  // namespace modekernels
