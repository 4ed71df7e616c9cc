// CUDA runtime errors as std::runtime_error and bad arguments as std::invalid_argument (which
// pybind11 raises as RuntimeError and ValueError).
#pragma once

#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

namespace modekernels {

inline void check_cuda(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
  }
}

// After a kernel launch: a bad configuration or a missing kernel image shows up here.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

}  // namespace modekernels
