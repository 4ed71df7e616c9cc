// Element types on the device: the C++ type of each Dtype, conversions to and from the float32
// the kernels compute in, and a host-side switch that runs a templated launch for a Dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dtype.h"

namespace modekernels {

template <Dtype D> struct ElementOf;
template <> struct ElementOf<Dtype::kFloat32> { using type = float; };
template <> struct ElementOf<Dtype::kFloat16> { using type = __half; };
template <> struct ElementOf<Dtype::kBFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// A type carried as a value, so that a generic lambda can name it.
template <typename T> struct TypeTag { using type = T; };

// launch(TypeTag<T>{}) with T the element type of `dtype`.
template <typename Launch>
void with_element_type(Dtype dtype, Launch&& launch) {
  switch (dtype) {
    case Dtype::kFloat32: return launch(TypeTag<float>{});
    case Dtype::kFloat16: return launch(TypeTag<__half>{});
    case Dtype::kBFloat16: return launch(TypeTag<__nv_bfloat16>{});
  }
}

}  // namespace modekernels
