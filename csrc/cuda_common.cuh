// Device helpers shared by the CUDA kernels (rope_cuda.cu, moe_cuda.cu, ...). Free of ATen/c10
// headers, like every .cu file of this package.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vidgen {

// Conv<T>::to_f / from_f: a storage type <-> float (round to nearest even on the way back).
template <typename T>
struct Conv;

template <>
struct Conv<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};

template <>
struct Conv<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};

template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace vidgen
