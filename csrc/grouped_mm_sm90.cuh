// Hopper grouped GEMMs: CUTLASS 3.x ptr-array kernels (TMA + warp-specialized cooperative
// WGMMA, 128x256x64 tiles, 2x1x1 clusters, fp32 accumulation), as torch._grouped_mm runs them.
//
// A small prepare kernel turns the device-side offsets into per-group problem shapes, pointers
// and leading dimensions in the caller's workspace; the GEMM then reads them on the device, so
// the host never sees the offsets. Included by one .cu file per dtype, which instantiates it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/util/packed_stride.hpp>

#include "cuda_check.h"
#include "cutlass_support.cuh"
#include "group_rows.cuh"
#include "grouped_mm.h"

namespace modekernels {

using namespace cutlass_support;

namespace sm90 {

// D_g (M_g x N_g, row-major) = A_g (M_g x K_g) @ B_g (K_g x N_g) for every group g.
template <typename Element, typename LayoutA, typename LayoutB>
struct GroupedGemm {
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int32_t, int32_t, int32_t>>;
  using Shape = typename ProblemShape::UnderlyingProblemShape;
  using Accumulator = float;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 16 / sizeof(Element);  // TMA: 16-byte aligned rows
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator,
      Element, LayoutD*, kAlignment, Element, LayoutD*, kAlignment,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, Accumulator>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment,
      Element, LayoutB*, kAlignment, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// Forward: A = x rows of the group (row-major), B = w[e] (RowMajor: (E, K, N) contiguous rows;
// ColumnMajor: the transposed view of an (E, N, K) tensor), D = y rows of the group.
template <typename Element, typename LayoutB>
using ForwardGemm = GroupedGemm<Element, cutlass::layout::RowMajor, LayoutB>;
// Weight gradient: A = x_e^T (column-major view of x's rows), B = dy_e (row-major), D = dw[e].
template <typename Element>
using WeightGradGemm = GroupedGemm<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

// The per-group arrays the GEMM reads, carved out of the workspace after CUTLASS's own part.
template <typename G, typename Element>
struct GroupArrays {
  typename G::Shape* shapes = nullptr;
  const Element** a = nullptr;
  const Element** b = nullptr;
  Element** d = nullptr;
  typename G::StrideA* stride_a = nullptr;
  typename G::StrideB* stride_b = nullptr;
  typename G::StrideD* stride_d = nullptr;

  static size_t bytes(int64_t E) {
    const size_t n = static_cast<size_t>(E);
    return align_up(n * sizeof(typename G::Shape)) + 3 * align_up(n * sizeof(void*)) +
           align_up(n * sizeof(typename G::StrideA)) + align_up(n * sizeof(typename G::StrideB)) +
           align_up(n * sizeof(typename G::StrideD));
  }

  static GroupArrays carve(char* base, int64_t E) {
    const size_t n = static_cast<size_t>(E);
    GroupArrays arrays;
    auto take = [&](auto*& field, size_t element_bytes) {
      field = reinterpret_cast<std::remove_reference_t<decltype(field)>>(base);
      base += align_up(n * element_bytes);
    };
    take(arrays.shapes, sizeof(typename G::Shape));
    take(arrays.a, sizeof(void*));
    take(arrays.b, sizeof(void*));
    take(arrays.d, sizeof(void*));
    take(arrays.stride_a, sizeof(typename G::StrideA));
    take(arrays.stride_b, sizeof(typename G::StrideB));
    take(arrays.stride_d, sizeof(typename G::StrideD));
    return arrays;
  }
};

// A CuTe stride with its one dynamic entry (the leading dimension) set to ld.
template <typename Stride>
__device__ __forceinline__ Stride leading_stride(int64_t ld) {
  const int ld32 = static_cast<int>(ld);
  return cutlass::make_cute_packed_stride(Stride{}, cute::make_shape(ld32, ld32, 1));
}

template <typename G, typename Element>
__global__ void prepare_forward(GroupArrays<G, Element> arrays, const Element* x,
                                const Element* w, const int32_t* offs, Element* y, int64_t S,
                                int64_t K, int64_t N, int64_t E, int64_t ldx, int64_t w_stride_e,
                                int64_t ldw) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int64_t start, end;
  group_rows(offs, e, S, start, end);
  arrays.shapes[e] = typename G::Shape(static_cast<int32_t>(end - start), static_cast<int32_t>(N),
                                       static_cast<int32_t>(K));
  arrays.a[e] = x + start * ldx;
  arrays.b[e] = w + e * w_stride_e;
  arrays.d[e] = y + start * N;
  arrays.stride_a[e] = leading_stride<typename G::StrideA>(ldx);
  arrays.stride_b[e] = leading_stride<typename G::StrideB>(ldw);
  arrays.stride_d[e] = leading_stride<typename G::StrideD>(N);
}

// An empty group gets the shape (0, N, 0): no tile is scheduled for it (zero_empty_groups
// writes its zeros), because a tile with no k step would store uninitialised accumulators.
template <typename G, typename Element>
__global__ void prepare_weight_grad(GroupArrays<G, Element> arrays, const Element* x,
                                    const Element* dy, const int32_t* offs, Element* dw,
                                    int64_t S, int64_t K, int64_t N, int64_t E, int64_t ldx,
                                    int64_t ldy) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int64_t start, end;
  group_rows(offs, e, S, start, end);
  const int32_t rows = static_cast<int32_t>(end - start);
  arrays.shapes[e] = typename G::Shape(rows > 0 ? static_cast<int32_t>(K) : 0,
                                       static_cast<int32_t>(N), rows);
  arrays.a[e] = x + start * ldx;
  arrays.b[e] = dy + start * ldy;
  arrays.d[e] = dw + e * K * N;
  arrays.stride_a[e] = leading_stride<typename G::StrideA>(ldx);
  arrays.stride_b[e] = leading_stride<typename G::StrideB>(ldy);
  arrays.stride_d[e] = leading_stride<typename G::StrideD>(N);
}

template <typename G, typename Element>
typename G::Gemm::Arguments gemm_arguments(const GroupArrays<G, Element>& arrays, int64_t E,
                                           int sm_count, int device) {
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {static_cast<int>(E), arrays.shapes, nullptr},
      {arrays.a, arrays.stride_a, arrays.b, arrays.stride_b},
      {{}, const_cast<const Element**>(arrays.d), arrays.stride_d, arrays.d, arrays.stride_d}};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.thread.dAlpha = {cute::_0{}, cute::_0{}, 0};
  args.epilogue.thread.dBeta = {cute::_0{}, cute::_0{}, 0};
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;
  return args;
}

template <typename G, typename Element>
size_t workspace_size(int64_t E, int sm_count) {
  const GroupArrays<G, Element> no_arrays;
  const size_t cutlass_bytes =
      G::Gemm::get_workspace_size(gemm_arguments(no_arrays, E, sm_count, /*device=*/0));
  return align_up(cutlass_bytes) + GroupArrays<G, Element>::bytes(E);
}

// Checks and lays out the workspace, runs `prepare(arrays)` (which launches the zero fill and the
// prepare kernel), then the GEMM. Argument errors are raised before anything is launched.
template <typename G, typename Element, typename Prepare>
void run(int64_t E, int sm_count, void* workspace, size_t workspace_bytes, cudaStream_t stream,
         Prepare prepare) {
  require(E <= INT32_MAX, "grouped GEMM (sm90): too many groups");
  require(reinterpret_cast<uintptr_t>(workspace) % kWorkspaceAlignment == 0,
          "grouped GEMM (sm90): the workspace must be 128-byte aligned");
  require(workspace_bytes >= workspace_size<G, Element>(E, sm_count),
          "grouped GEMM (sm90): workspace too small (use the *_workspace_size function)");
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const GroupArrays<G, Element> no_arrays;
  const size_t cutlass_bytes =
      align_up(G::Gemm::get_workspace_size(gemm_arguments(no_arrays, E, sm_count, device)));
  const auto arrays = GroupArrays<G, Element>::carve(static_cast<char*>(workspace) + cutlass_bytes, E);
  prepare(arrays);
  check_launch("grouped GEMM (sm90) prepare kernel");

  const auto args = gemm_arguments(arrays, E, sm_count, device);
  typename G::Gemm gemm;
  check_cutlass("sm90", gemm.can_implement(args), "can_implement");
  check_cutlass("sm90", gemm.initialize(args, workspace, stream), "initialize");
  check_cutlass("sm90", gemm.run(stream), "run");
  check_launch("grouped GEMM (sm90)");
}

}  // namespace sm90

template <Dtype D>
size_t sm90_workspace_size(int64_t E, int sm_count) {
  using Element = typename ElementOf<D>::type;
  return std::max({sm90::workspace_size<sm90::ForwardGemm<Element, cutlass::layout::RowMajor>, Element>(E, sm_count),
                   sm90::workspace_size<sm90::ForwardGemm<Element, cutlass::layout::ColumnMajor>, Element>(E, sm_count),
                   sm90::workspace_size<sm90::WeightGradGemm<Element>, Element>(E, sm_count)});
}

template <Dtype D>
void grouped_mm_sm90(const GroupedMmArgs& p, int sm_count) {
  using Element = typename ElementOf<D>::type;
  if (p.S == 0 || p.N == 0) return;
  if (p.E == 0 || p.K == 0) {
    check_cuda(cudaMemsetAsync(p.y, 0, p.S * p.N * sizeof(Element), p.stream), "cudaMemsetAsync");
    return;
  }
  const bool b_row_major = p.w_stride_n == 1;
  const int64_t ldw = b_row_major ? p.w_stride_k : p.w_stride_n;
  require_forward_operands<Element>("sm90", p, ldw, /*aligned_k=*/false);

  const auto* x = static_cast<const Element*>(p.x);
  const auto* w = static_cast<const Element*>(p.w);
  auto* y = static_cast<Element*>(p.y);
  auto launch = [&](auto gemm_tag) {
    using G = decltype(gemm_tag);
    sm90::run<G, Element>(p.E, sm_count, p.workspace, p.workspace_bytes, p.stream,
                          [&](const sm90::GroupArrays<G, Element>& arrays) {
                            zero_rows_past_last_group(p.y, sizeof(Element), p.offs, p.E, p.S, p.N,
                                                      p.stream);
                            sm90::prepare_forward<G, Element>
                                <<<prepare_blocks(p.E), kPrepareThreads, 0, p.stream>>>(
                                    arrays, x, w, p.offs, y, p.S, p.K, p.N, p.E, p.x_stride_s,
                                    p.w_stride_e, ldw);
                          });
  };
  if (b_row_major) {
    launch(sm90::ForwardGemm<Element, cutlass::layout::RowMajor>{});
  } else {
    launch(sm90::ForwardGemm<Element, cutlass::layout::ColumnMajor>{});
  }
}

template <Dtype D>
void grouped_mm_weight_grad_sm90(const WeightGradArgs& p, int sm_count) {
  using Element = typename ElementOf<D>::type;
  if (p.E == 0 || p.K == 0 || p.N == 0) return;
  if (p.S == 0) {
    check_cuda(cudaMemsetAsync(p.dw, 0, p.E * p.K * p.N * sizeof(Element), p.stream),
               "cudaMemsetAsync");
    return;
  }
  require_weight_grad_operands<Element>("sm90", p, /*aligned_k=*/false);

  using G = sm90::WeightGradGemm<Element>;
  const auto* x = static_cast<const Element*>(p.x);
  const auto* dy = static_cast<const Element*>(p.dy);
  auto* dw = static_cast<Element*>(p.dw);
  sm90::run<G, Element>(p.E, sm_count, p.workspace, p.workspace_bytes, p.stream,
                        [&](const sm90::GroupArrays<G, Element>& arrays) {
                          zero_empty_groups(p.dw, sizeof(Element), p.offs, p.E, p.S, p.K, p.N,
                                            p.stream);
                          sm90::prepare_weight_grad<G, Element>
                              <<<prepare_blocks(p.E), kPrepareThreads, 0, p.stream>>>(
                                  arrays, x, dy, p.offs, dw, p.S, p.K, p.N, p.E, p.x_stride_s,
                                  p.dy_stride_s);
                        });
}

}  // namespace modekernels
