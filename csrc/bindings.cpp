// The Python module modekernels._C: build facts and the entry points of the grouped GEMM, routing,
// expert-MLP and gated-residue kernels.
//
// Functions take data pointers as integers, shapes and element strides, a dtype code
// (0 float32, 1 float16, 2 bfloat16), the CUDA stream as an integer, and for the CUTLASS kernels
// a workspace that the caller allocates (size from grouped_mm_sm90_workspace_size /
// grouped_mm_sm80_workspace_size). Importing
// this module does not touch the GPU. Bad arguments raise ValueError, CUDA and CUTLASS failures
// RuntimeError.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda_check.h"
#include "grouped_mm.h"
#include "moe_mlp.h"
#include "neutral_residue.h"
#include "routing.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace modekernels {
namespace {

#ifndef MODEKERNELS_ARCHS
#error "MODEKERNELS_ARCHS (the built architectures, ascending, comma separated) must be defined"
#endif
#ifdef MODEKERNELS_WITH_SM90
constexpr bool kWithSm90 = true;
#else
constexpr bool kWithSm90 = false;
#endif

std::vector<int> built_archs() { return {MODEKERNELS_ARCHS}; }

// The generic kernels exist for every built arch and, as PTX of the lowest, for newer ones.
bool supports_arch(int sm) { return sm >= built_archs().front(); }

Dtype dtype_from_code(int code, bool allow_float32) {
  switch (code) {
    case 0:
      if (!allow_float32) throw std::invalid_argument("this kernel has no float32 version");
      return Dtype::kFloat32;
    case 1:
      return Dtype::kFloat16;
    case 2:
      return Dtype::kBFloat16;
    default:
      throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                  std::to_string(code));
  }
}

template <typename T>
T* as_pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

GroupedMmArgs forward_args(std::uintptr_t x, std::uintptr_t w, std::uintptr_t offs,
                           std::uintptr_t y, int64_t S, int64_t K, int64_t N, int64_t E,
                           int64_t x_stride_s, int64_t x_stride_k, int64_t w_stride_e,
                           int64_t w_stride_k, int64_t w_stride_n, std::uintptr_t workspace,
                           size_t workspace_bytes, std::uintptr_t stream) {
  require(S >= 0 && K >= 0 && N >= 0 && E >= 0, "grouped_mm: negative size");
  return GroupedMmArgs{as_pointer<const void>(x), as_pointer<const void>(w),
                       as_pointer<const int32_t>(offs), as_pointer<void>(y), S, K, N, E,
                       x_stride_s, x_stride_k, w_stride_e, w_stride_k, w_stride_n,
                       as_pointer<void>(workspace), workspace_bytes, as_stream(stream)};
}

WeightGradArgs weight_grad_args(std::uintptr_t x, std::uintptr_t dy, std::uintptr_t offs,
                                std::uintptr_t dw, int64_t S, int64_t K, int64_t N, int64_t E,
                                int64_t x_stride_s, int64_t x_stride_k, int64_t dy_stride_s,
                                int64_t dy_stride_n, std::uintptr_t workspace,
                                size_t workspace_bytes, std::uintptr_t stream) {
  require(S >= 0 && K >= 0 && N >= 0 && E >= 0, "grouped_mm_weight_grad: negative size");
  return WeightGradArgs{as_pointer<const void>(x), as_pointer<const void>(dy),
                        as_pointer<const int32_t>(offs), as_pointer<void>(dw), S, K, N, E,
                        x_stride_s, x_stride_k, dy_stride_s, dy_stride_n,
                        as_pointer<void>(workspace), workspace_bytes, as_stream(stream)};
}

void grouped_mm_simt_py(std::uintptr_t x, std::uintptr_t w, std::uintptr_t offs,
                        std::uintptr_t y, int64_t S, int64_t K, int64_t N, int64_t E,
                        int64_t x_stride_s, int64_t x_stride_k, int64_t w_stride_e,
                        int64_t w_stride_k, int64_t w_stride_n, int dtype, std::uintptr_t stream) {
  const auto args = forward_args(x, w, offs, y, S, K, N, E, x_stride_s, x_stride_k, w_stride_e,
                                 w_stride_k, w_stride_n, 0, 0, stream);
  switch (dtype_from_code(dtype, true)) {
    case Dtype::kFloat32: return grouped_mm_simt<Dtype::kFloat32>(args);
    case Dtype::kFloat16: return grouped_mm_simt<Dtype::kFloat16>(args);
    case Dtype::kBFloat16: return grouped_mm_simt<Dtype::kBFloat16>(args);
  }
}

void grouped_mm_weight_grad_simt_py(std::uintptr_t x, std::uintptr_t dy, std::uintptr_t offs,
                                    std::uintptr_t dw, int64_t S, int64_t K, int64_t N,
                                    int64_t E, int64_t x_stride_s, int64_t x_stride_k,
                                    int64_t dy_stride_s, int64_t dy_stride_n, int dtype,
                                    std::uintptr_t stream) {
  const auto args = weight_grad_args(x, dy, offs, dw, S, K, N, E, x_stride_s, x_stride_k,
                                     dy_stride_s, dy_stride_n, 0, 0, stream);
  switch (dtype_from_code(dtype, true)) {
    case Dtype::kFloat32: return grouped_mm_weight_grad_simt<Dtype::kFloat32>(args);
    case Dtype::kFloat16: return grouped_mm_weight_grad_simt<Dtype::kFloat16>(args);
    case Dtype::kBFloat16: return grouped_mm_weight_grad_simt<Dtype::kBFloat16>(args);
  }
}

size_t grouped_mm_sm80_workspace_size_py(int64_t E, int dtype) {
  require(E >= 0, "grouped_mm_sm80_workspace_size: E >= 0");
  if (dtype_from_code(dtype, false) == Dtype::kFloat16) {
    return sm80_workspace_size<Dtype::kFloat16>(E);
  }
  return sm80_workspace_size<Dtype::kBFloat16>(E);
}

// The Python entry points of a CUTLASS family (float16 or bfloat16 by `dtype`, with a workspace
// and the SM count), one template each for the forward and the weight gradient.
using TensorCoreForward = void (*)(const GroupedMmArgs&, int);
using TensorCoreWeightGrad = void (*)(const WeightGradArgs&, int);

template <TensorCoreForward kHalf, TensorCoreForward kBFloat16>
void tensor_core_forward_py(std::uintptr_t x, std::uintptr_t w, std::uintptr_t offs,
                            std::uintptr_t y, int64_t S, int64_t K, int64_t N, int64_t E,
                            int64_t x_stride_s, int64_t x_stride_k, int64_t w_stride_e,
                            int64_t w_stride_k, int64_t w_stride_n, int dtype,
                            std::uintptr_t workspace, size_t workspace_bytes, int sm_count,
                            std::uintptr_t stream) {
  const auto args = forward_args(x, w, offs, y, S, K, N, E, x_stride_s, x_stride_k, w_stride_e,
                                 w_stride_k, w_stride_n, workspace, workspace_bytes, stream);
  (dtype_from_code(dtype, false) == Dtype::kFloat16 ? kHalf : kBFloat16)(args, sm_count);
}

template <TensorCoreWeightGrad kHalf, TensorCoreWeightGrad kBFloat16>
void tensor_core_weight_grad_py(std::uintptr_t x, std::uintptr_t dy, std::uintptr_t offs,
                                std::uintptr_t dw, int64_t S, int64_t K, int64_t N, int64_t E,
                                int64_t x_stride_s, int64_t x_stride_k, int64_t dy_stride_s,
                                int64_t dy_stride_n, int dtype, std::uintptr_t workspace,
                                size_t workspace_bytes, int sm_count, std::uintptr_t stream) {
  const auto args = weight_grad_args(x, dy, offs, dw, S, K, N, E, x_stride_s, x_stride_k,
                                     dy_stride_s, dy_stride_n, workspace, workspace_bytes, stream);
  (dtype_from_code(dtype, false) == Dtype::kFloat16 ? kHalf : kBFloat16)(args, sm_count);
}

#ifdef MODEKERNELS_WITH_SM90
size_t grouped_mm_sm90_workspace_size_py(int64_t E, int dtype, int sm_count) {
  require(E >= 0 && sm_count > 0, "grouped_mm_sm90_workspace_size: E >= 0 and sm_count > 0");
  if (dtype_from_code(dtype, false) == Dtype::kFloat16) {
    return sm90_workspace_size<Dtype::kFloat16>(E, sm_count);
  }
  return sm90_workspace_size<Dtype::kBFloat16>(E, sm_count);
}

#else
[[noreturn]] void require_sm90_kernels() {
  throw std::runtime_error(
      "modekernels._C was built without the Hopper kernels (MODEKERNELS_CUDA_ARCHS lacks 90a)");
}

size_t grouped_mm_sm90_workspace_size_py(int64_t, int, int) {
  require_sm90_kernels();
}

}  // namespace

// Without 90a the Hopper entry points exist and say why they cannot run.
template <Dtype D> void grouped_mm_sm90(const GroupedMmArgs&, int) { require_sm90_kernels(); }
template <Dtype D> void grouped_mm_weight_grad_sm90(const WeightGradArgs&, int) {
  require_sm90_kernels();
}

namespace {
#endif

// Routing (routing.h).
void route_top1_py(std::uintptr_t logits, int64_t T, int64_t E, int64_t stride_t,
                   int64_t stride_e, int dtype, int64_t capacity, int64_t rows_per_chunk,
                   std::uintptr_t gate, std::uintptr_t aux_loss, std::uintptr_t z_loss,
                   std::uintptr_t lse, std::uintptr_t expert_idx, std::uintptr_t perm,
                   std::uintptr_t offs, std::uintptr_t tokens_per_expert, std::uintptr_t dropped,
                   std::uintptr_t routed, std::uintptr_t workspace, size_t workspace_bytes,
                   std::uintptr_t stream) {
  route_top1(RouteTop1Args{
      as_pointer<const void>(logits), T, E, stride_t, stride_e, dtype_from_code(dtype, true),
      capacity, rows_per_chunk, as_pointer<void>(gate), as_pointer<float>(aux_loss),
      as_pointer<float>(z_loss), as_pointer<float>(lse), as_pointer<int64_t>(expert_idx),
      as_pointer<int64_t>(perm), as_pointer<int32_t>(offs), as_pointer<int32_t>(tokens_per_expert),
      as_pointer<uint8_t>(dropped), as_pointer<int32_t>(routed), as_pointer<void>(workspace),
      workspace_bytes, as_stream(stream)});
}

void sort_by_expert_py(std::uintptr_t idx, bool idx_is_int64, int64_t n, int64_t E,
                       int64_t rows_per_chunk, std::uintptr_t perm, std::uintptr_t offs,
                       std::uintptr_t workspace, size_t workspace_bytes, std::uintptr_t stream) {
  sort_by_expert(as_pointer<const void>(idx), idx_is_int64, n, E, rows_per_chunk,
                 as_pointer<int64_t>(perm), as_pointer<int32_t>(offs), as_pointer<void>(workspace),
                 workspace_bytes, as_stream(stream));
}

void route_top1_backward_py(std::uintptr_t logits, int64_t T, int64_t E, int64_t stride_t,
                            int64_t stride_e, int dtype, std::uintptr_t lse,
                            std::uintptr_t expert_idx, std::uintptr_t dropped,
                            std::uintptr_t routed, std::uintptr_t grad_gate,
                            std::uintptr_t grad_aux, std::uintptr_t grad_z, std::uintptr_t grad,
                            std::uintptr_t stream) {
  route_top1_backward(RouteTop1BackwardArgs{
      as_pointer<const void>(logits), T, E, stride_t, stride_e, dtype_from_code(dtype, true),
      as_pointer<const float>(lse), as_pointer<const int64_t>(expert_idx),
      as_pointer<const uint8_t>(dropped), as_pointer<const int32_t>(routed),
      as_pointer<const float>(grad_gate), as_pointer<const float>(grad_aux),
      as_pointer<const float>(grad_z), as_pointer<void>(grad), as_stream(stream)});
}

// Expert MLP (moe_mlp.h).
void gather_rows_py(std::uintptr_t x, int64_t T, int64_t K, int64_t x_stride_t,
                    int64_t x_stride_k, std::uintptr_t perm, int64_t S, int64_t top_k,
                    std::uintptr_t dst, size_t element_bytes, std::uintptr_t stream) {
  gather_rows(as_pointer<const void>(x), T, K, x_stride_t, x_stride_k,
              as_pointer<const int64_t>(perm), S, top_k, as_pointer<void>(dst), element_bytes,
              as_stream(stream));
}

void moe_mlp_up_epilogue_py(std::uintptr_t pre, std::uintptr_t bias, int64_t bias_stride_e,
                            int64_t bias_stride_n, std::uintptr_t offs, int64_t S, int64_t E,
                            int64_t I, bool gated, int activation, bool keep, std::uintptr_t h,
                            int dtype, std::uintptr_t stream) {
  moe_mlp_up_epilogue(MoeUpEpilogueArgs{
      as_pointer<void>(pre), as_pointer<const void>(bias), bias_stride_e, bias_stride_n,
      as_pointer<const int32_t>(offs), S, E, I, gated, activation, keep, as_pointer<void>(h),
      dtype_from_code(dtype, true), as_stream(stream)});
}

void moe_mlp_down_combine_py(std::uintptr_t out, std::uintptr_t perm, std::uintptr_t offs,
                             int64_t S, int64_t E, int64_t N, int64_t T, int64_t top_k,
                             std::uintptr_t bias, int64_t bias_stride_e, int64_t bias_stride_n,
                             std::uintptr_t gate, std::uintptr_t slot_row,
                             std::uintptr_t slot_expert, std::uintptr_t y, int dtype,
                             std::uintptr_t stream) {
  moe_mlp_down_combine(MoeDownCombineArgs{
      as_pointer<const void>(out), as_pointer<const int64_t>(perm), as_pointer<const int32_t>(offs),
      S, E, N, T, top_k, as_pointer<const void>(bias), bias_stride_e, bias_stride_n,
      as_pointer<const float>(gate), as_pointer<int64_t>(slot_row),
      as_pointer<int32_t>(slot_expert), as_pointer<void>(y), dtype_from_code(dtype, true),
      as_stream(stream)});
}

void moe_mlp_gate_backward_py(std::uintptr_t a, int64_t a_stride_s, int64_t a_stride_i,
                              std::uintptr_t h, int64_t h_stride_s, int64_t h_stride_i,
                              std::uintptr_t scale, int64_t S, int64_t I, std::uintptr_t dh,
                              std::uintptr_t dot, int dtype, std::uintptr_t stream) {
  moe_mlp_gate_backward(MoeGateBackwardArgs{
      as_pointer<const void>(a), a_stride_s, a_stride_i, as_pointer<const void>(h), h_stride_s,
      h_stride_i, as_pointer<const float>(scale), S, I, as_pointer<void>(dh),
      as_pointer<float>(dot), dtype_from_code(dtype, true), as_stream(stream)});
}

// Gated residue block (neutral_residue.h).
void neutral_residue_gate_py(std::uintptr_t x, int64_t T, int64_t d, int64_t x_stride_t,
                             int64_t x_stride_d, std::uintptr_t w_gate, int64_t w_gate_stride,
                             std::uintptr_t b_gate, int gate, std::uintptr_t g, int dtype,
                             std::uintptr_t stream) {
  neutral_residue_gate(NeutralGateArgs{
      as_pointer<const void>(x), T, d, x_stride_t, x_stride_d, as_pointer<const void>(w_gate),
      w_gate_stride, as_pointer<const void>(b_gate), gate, as_pointer<float>(g),
      dtype_from_code(dtype, true), as_stream(stream)});
}

void neutral_residue_project_epilogue_py(std::uintptr_t pre, int64_t T, int64_t d_a, bool glu,
                                         std::uintptr_t b_in, std::uintptr_t b_glu,
                                         int activation, bool keep, std::uintptr_t skip_gate,
                                         std::uintptr_t h, int dtype, std::uintptr_t stream) {
  neutral_residue_project_epilogue(NeutralProjectEpilogueArgs{
      as_pointer<void>(pre), T, d_a, glu, as_pointer<const void>(b_in),
      as_pointer<const void>(b_glu), activation, keep, as_pointer<const float>(skip_gate),
      as_pointer<void>(h), dtype_from_code(dtype, true), as_stream(stream)});
}

void neutral_residue_output_epilogue_py(std::uintptr_t a, int64_t T, int64_t d,
                                        std::uintptr_t b_out, std::uintptr_t g,
                                        std::uintptr_t residual, int64_t residual_stride_t,
                                        int64_t residual_stride_d, std::uintptr_t y,
                                        std::uintptr_t l1, int dtype, std::uintptr_t stream) {
  neutral_residue_output_epilogue(NeutralOutputEpilogueArgs{
      as_pointer<const void>(a), T, d, as_pointer<const void>(b_out), as_pointer<const float>(g),
      as_pointer<const void>(residual), residual_stride_t, residual_stride_d, as_pointer<void>(y),
      as_pointer<float>(l1), dtype_from_code(dtype, true), as_stream(stream)});
}

void neutral_residue_glu_backward_py(std::uintptr_t pre, int64_t pre_stride_t,
                                     int64_t pre_stride_a, std::uintptr_t dh, int64_t dh_stride_t,
                                     int64_t dh_stride_a, std::uintptr_t g, std::uintptr_t extra,
                                     int64_t T, int64_t d_a, bool glu, int activation, int gate,
                                     std::uintptr_t gh, std::uintptr_t dpre, int dtype,
                                     std::uintptr_t stream) {
  neutral_residue_glu_backward(NeutralGluBackwardArgs{
      as_pointer<const void>(pre), pre_stride_t, pre_stride_a, as_pointer<const void>(dh),
      dh_stride_t, dh_stride_a, as_pointer<const float>(g), as_pointer<const float>(extra), T,
      d_a, glu, activation, gate, as_pointer<void>(gh), as_pointer<void>(dpre),
      dtype_from_code(dtype, true), as_stream(stream)});
}

}  // namespace
}  // namespace modekernels

PYBIND11_MODULE(_C, m) {
  using namespace modekernels;
  m.doc() = "modekernels CUDA kernels (pybind11, no PyTorch): grouped GEMMs, routing, expert MLP "
            "and gated residue epilogues";
  m.def("built_with_cuda", [] { return true; }, "Whether the CUDA kernels were compiled in.");
  m.def("built_archs", &built_archs,
        "The compute capabilities compiled for, as integers (e.g. [80, 90]).");
  m.def("supports_arch", &supports_arch, "sm"_a,
        "Whether a GPU of compute capability `sm` (e.g. 90) can run the kernels.");
  m.def("has_sm90_kernels", [] { return kWithSm90; },
        "Whether the Hopper (sm_90a) CUTLASS kernels were compiled in.");

  const auto release_gil = py::call_guard<py::gil_scoped_release>();
  m.def("grouped_mm_simt", &grouped_mm_simt_py, release_gil, "x"_a, "w"_a, "offs"_a, "y"_a,
        "S"_a, "K"_a, "N"_a, "E"_a, "x_stride_s"_a, "x_stride_k"_a, "w_stride_e"_a,
        "w_stride_k"_a, "w_stride_n"_a, "dtype"_a, "stream"_a,
        "y (S, N contiguous) = grouped x @ w on CUDA cores; any strides, every arch.");
  m.def("grouped_mm_weight_grad_simt", &grouped_mm_weight_grad_simt_py, release_gil, "x"_a,
        "dy"_a, "offs"_a, "dw"_a, "S"_a, "K"_a, "N"_a, "E"_a, "x_stride_s"_a, "x_stride_k"_a,
        "dy_stride_s"_a, "dy_stride_n"_a, "dtype"_a, "stream"_a,
        "dw (E, K, N contiguous) = grouped x^T @ dy on CUDA cores; any strides, every arch.");
  m.def("grouped_mm_sm90_workspace_size", &grouped_mm_sm90_workspace_size_py, "E"_a, "dtype"_a,
        "sm_count"_a, "Bytes of workspace the sm90 grouped GEMMs need for E groups.");
  // The CUTLASS families' forward and weight gradient take the same arguments.
  const auto def_tensor_core = [&](const std::string& family, auto forward, auto weight_grad,
                                   const std::string& what) {
    m.def(("grouped_mm_" + family).c_str(), forward, release_gil, "x"_a, "w"_a, "offs"_a, "y"_a,
          "S"_a, "K"_a, "N"_a, "E"_a, "x_stride_s"_a, "x_stride_k"_a, "w_stride_e"_a,
          "w_stride_k"_a, "w_stride_n"_a, "dtype"_a, "workspace"_a, "workspace_bytes"_a,
          "sm_count"_a, "stream"_a, ("y = grouped x @ w with " + what).c_str());
    m.def(("grouped_mm_weight_grad_" + family).c_str(), weight_grad, release_gil, "x"_a, "dy"_a,
          "offs"_a, "dw"_a, "S"_a, "K"_a, "N"_a, "E"_a, "x_stride_s"_a, "x_stride_k"_a,
          "dy_stride_s"_a, "dy_stride_n"_a, "dtype"_a, "workspace"_a, "workspace_bytes"_a,
          "sm_count"_a, "stream"_a, ("dw = grouped x^T @ dy with " + what).c_str());
  };
  def_tensor_core(
      "sm90",
      &tensor_core_forward_py<grouped_mm_sm90<Dtype::kFloat16>, grouped_mm_sm90<Dtype::kBFloat16>>,
      &tensor_core_weight_grad_py<grouped_mm_weight_grad_sm90<Dtype::kFloat16>,
                                  grouped_mm_weight_grad_sm90<Dtype::kBFloat16>>,
      "the Hopper CUTLASS kernel (fp16/bf16, 16-byte aligned).");
  m.def("grouped_mm_sm80_workspace_size", &grouped_mm_sm80_workspace_size_py, "E"_a, "dtype"_a,
        "Bytes of workspace the sm80 grouped GEMMs need for E groups.");
  def_tensor_core(
      "sm80",
      &tensor_core_forward_py<grouped_mm_sm80<Dtype::kFloat16>, grouped_mm_sm80<Dtype::kBFloat16>>,
      &tensor_core_weight_grad_py<grouped_mm_weight_grad_sm80<Dtype::kFloat16>,
                                  grouped_mm_weight_grad_sm80<Dtype::kBFloat16>>,
      "the Ampere CUTLASS kernel (fp16/bf16, 16-byte aligned, K and N multiples of 8; sm_80 and "
      "newer).");
  m.def("routing_rows_per_chunk", &routing_rows_per_chunk, "entries"_a,
        "The routing kernels' default chunk length for this many entries.");
  m.def("routing_workspace_size", &routing_workspace_size, "entries"_a, "E"_a,
        "rows_per_chunk"_a, "Bytes of workspace route_top1 / sort_by_expert need.");
  m.def("routing_max_experts", &routing_max_experts,
        "The most experts the routing kernels take.");
  m.def("route_top1", &route_top1_py, release_gil, "logits"_a, "T"_a, "E"_a, "stride_t"_a,
        "stride_e"_a, "dtype"_a, "capacity"_a, "rows_per_chunk"_a, "gate"_a, "aux_loss"_a,
        "z_loss"_a, "lse"_a, "expert_idx"_a, "perm"_a, "offs"_a, "tokens_per_expert"_a,
        "dropped"_a, "routed"_a, "workspace"_a, "workspace_bytes"_a, "stream"_a,
        "Top-1 routing with capacity (outputs of modekernels.reference.routing.route_top1).");
  m.def("sort_by_expert", &sort_by_expert_py, release_gil, "idx"_a, "idx_is_int64"_a, "n"_a,
        "E"_a, "rows_per_chunk"_a, "perm"_a, "offs"_a, "workspace"_a, "workspace_bytes"_a,
        "stream"_a, "Stable counting sort of n int32/int64 indices by expert.");
  m.def("route_top1_backward", &route_top1_backward_py, release_gil, "logits"_a, "T"_a, "E"_a,
        "stride_t"_a, "stride_e"_a, "dtype"_a, "lse"_a, "expert_idx"_a, "dropped"_a, "routed"_a,
        "grad_gate"_a, "grad_aux"_a, "grad_z"_a, "grad"_a, "stream"_a,
        "d loss / d logits (T, E contiguous) of route_top1.");

  m.def("gather_rows", &gather_rows_py, release_gil, "x"_a, "T"_a, "K"_a, "x_stride_t"_a,
        "x_stride_k"_a, "perm"_a, "S"_a, "top_k"_a, "dst"_a, "element_bytes"_a, "stream"_a,
        "dst (S, K contiguous)[r] = x[perm[r] // top_k].");
  m.def("moe_mlp_up_epilogue", &moe_mlp_up_epilogue_py, release_gil, "pre"_a, "bias"_a,
        "bias_stride_e"_a, "bias_stride_n"_a, "offs"_a, "S"_a, "E"_a, "I"_a, "gated"_a,
        "activation"_a, "keep"_a, "h"_a, "dtype"_a, "stream"_a,
        "h = act(pre + b1[e]) (or the GLU) per sorted row; with keep, the bias added to pre.");
  m.def("moe_mlp_down_combine", &moe_mlp_down_combine_py, release_gil, "out"_a, "perm"_a,
        "offs"_a, "S"_a, "E"_a, "N"_a, "T"_a, "top_k"_a, "bias"_a, "bias_stride_e"_a,
        "bias_stride_n"_a, "gate"_a, "slot_row"_a, "slot_expert"_a, "y"_a, "dtype"_a, "stream"_a,
        "y[t] = sum over j in order of gate[t*k+j] * (out[row] + b2[e]).");
  m.def("moe_mlp_gate_backward", &moe_mlp_gate_backward_py, release_gil, "a"_a, "a_stride_s"_a,
        "a_stride_i"_a, "h"_a, "h_stride_s"_a, "h_stride_i"_a, "scale"_a, "S"_a, "I"_a, "dh"_a,
        "dot"_a, "dtype"_a, "stream"_a,
        "dh (S, I contiguous) = scale[r] * a[r]; dot (S,) float32 = sum over c of a[r, c] * h[r, c].");

  m.def("neutral_residue_gate", &neutral_residue_gate_py, release_gil, "x"_a, "T"_a, "d"_a,
        "x_stride_t"_a, "x_stride_d"_a, "w_gate"_a, "w_gate_stride"_a, "b_gate"_a, "gate"_a,
        "g"_a, "dtype"_a, "stream"_a, "g (T,) float32 = gate(x . w_gate + b_gate).");
  m.def("neutral_residue_project_epilogue", &neutral_residue_project_epilogue_py, release_gil,
        "pre"_a, "T"_a, "d_a"_a, "glu"_a, "b_in"_a, "b_glu"_a, "activation"_a, "keep"_a,
        "skip_gate"_a, "h"_a, "dtype"_a, "stream"_a,
        "h = act(u + b_in) * (v + b_glu) from pre = [u | v]; with keep, biases added to pre.");
  m.def("neutral_residue_output_epilogue", &neutral_residue_output_epilogue_py, release_gil,
        "a"_a, "T"_a, "d"_a, "b_out"_a, "g"_a, "residual"_a, "residual_stride_t"_a,
        "residual_stride_d"_a, "y"_a, "l1"_a, "dtype"_a, "stream"_a,
        "y = residual + g * (a + b_out) (exactly the residual where g == 0) and l1 per row.");
  m.def("neutral_residue_glu_backward", &neutral_residue_glu_backward_py, release_gil, "pre"_a,
        "pre_stride_t"_a, "pre_stride_a"_a, "dh"_a, "dh_stride_t"_a, "dh_stride_a"_a, "g"_a,
        "extra"_a, "T"_a, "d_a"_a, "glu"_a, "activation"_a, "gate"_a, "gh"_a, "dpre"_a,
        "dtype"_a, "stream"_a, "gh = g * h and dpre = [du | dv | dz] of the gated residue block.");
}
