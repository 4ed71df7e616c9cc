// The Python module modekernels._C: build facts and the grouped GEMM entry points.
//
// Functions take data pointers as integers, shapes and element strides, a dtype code
// (0 float32, 1 float16, 2 bfloat16), the CUDA stream as an integer, and for the Hopper kernels
// a workspace that the caller allocates (size from grouped_mm_sm90_workspace_size). Importing
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

#ifdef MODEKERNELS_WITH_SM90
size_t grouped_mm_sm90_workspace_size_py(int64_t E, int dtype, int sm_count) {
  require(E >= 0 && sm_count > 0, "grouped_mm_sm90_workspace_size: E >= 0 and sm_count > 0");
  if (dtype_from_code(dtype, false) == Dtype::kFloat16) {
    return sm90_workspace_size<Dtype::kFloat16>(E, sm_count);
  }
  return sm90_workspace_size<Dtype::kBFloat16>(E, sm_count);
}

void grouped_mm_sm90_py(std::uintptr_t x, std::uintptr_t w, std::uintptr_t offs, std::uintptr_t y,
                        int64_t S, int64_t K, int64_t N, int64_t E, int64_t x_stride_s,
                        int64_t x_stride_k, int64_t w_stride_e, int64_t w_stride_k,
                        int64_t w_stride_n, int dtype, std::uintptr_t workspace,
                        size_t workspace_bytes, int sm_count, std::uintptr_t stream) {
  const auto args = forward_args(x, w, offs, y, S, K, N, E, x_stride_s, x_stride_k, w_stride_e,
                                 w_stride_k, w_stride_n, workspace, workspace_bytes, stream);
  if (dtype_from_code(dtype, false) == Dtype::kFloat16) {
    grouped_mm_sm90<Dtype::kFloat16>(args, sm_count);
  } else {
    grouped_mm_sm90<Dtype::kBFloat16>(args, sm_count);
  }
}

void grouped_mm_weight_grad_sm90_py(std::uintptr_t x, std::uintptr_t dy, std::uintptr_t offs,
                                    std::uintptr_t dw, int64_t S, int64_t K, int64_t N,
                                    int64_t E, int64_t x_stride_s, int64_t x_stride_k,
                                    int64_t dy_stride_s, int64_t dy_stride_n, int dtype,
                                    std::uintptr_t workspace, size_t workspace_bytes,
                                    int sm_count, std::uintptr_t stream) {
  const auto args = weight_grad_args(x, dy, offs, dw, S, K, N, E, x_stride_s, x_stride_k,
                                     dy_stride_s, dy_stride_n, workspace, workspace_bytes, stream);
  if (dtype_from_code(dtype, false) == Dtype::kFloat16) {
    grouped_mm_weight_grad_sm90<Dtype::kFloat16>(args, sm_count);
  } else {
    grouped_mm_weight_grad_sm90<Dtype::kBFloat16>(args, sm_count);
  }
}
#else
[[noreturn]] void require_sm90_kernels() {
  throw std::runtime_error(
      "modekernels._C was built without the Hopper kernels (MODEKERNELS_CUDA_ARCHS lacks 90a)");
}

size_t grouped_mm_sm90_workspace_size_py(int64_t, int, int) {
  require_sm90_kernels();
}

void grouped_mm_sm90_py(std::uintptr_t, std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t,
                        int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        int, std::uintptr_t, size_t, int, std::uintptr_t) {
  require_sm90_kernels();
}

void grouped_mm_weight_grad_sm90_py(std::uintptr_t, std::uintptr_t, std::uintptr_t,
                                    std::uintptr_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                    int64_t, int64_t, int64_t, int, std::uintptr_t, size_t, int,
                                    std::uintptr_t) {
  require_sm90_kernels();
}
#endif

}  // namespace
}  // namespace modekernels

PYBIND11_MODULE(_C, m) {
  using namespace modekernels;
  m.doc() = "modekernels CUDA kernels (pybind11, no PyTorch): grouped GEMMs";
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
  m.def("grouped_mm_sm90", &grouped_mm_sm90_py, release_gil, "x"_a, "w"_a, "offs"_a, "y"_a,
        "S"_a, "K"_a, "N"_a, "E"_a, "x_stride_s"_a, "x_stride_k"_a, "w_stride_e"_a,
        "w_stride_k"_a, "w_stride_n"_a, "dtype"_a, "workspace"_a, "workspace_bytes"_a,
        "sm_count"_a, "stream"_a,
        "y = grouped x @ w with the Hopper CUTLASS kernel (fp16/bf16, 16-byte aligned).");
  m.def("grouped_mm_weight_grad_sm90", &grouped_mm_weight_grad_sm90_py, release_gil, "x"_a,
        "dy"_a, "offs"_a, "dw"_a, "S"_a, "K"_a, "N"_a, "E"_a, "x_stride_s"_a, "x_stride_k"_a,
        "dy_stride_s"_a, "dy_stride_n"_a, "dtype"_a, "workspace"_a, "workspace_bytes"_a,
        "sm_count"_a, "stream"_a,
        "dw = grouped x^T @ dy with the Hopper CUTLASS kernel (fp16/bf16, 16-byte aligned).");
}
