// Device helpers shared by the CUDA kernels (rope_cuda.cu, moe_cuda.cu, ...). Free of ATen/c10
// headers, like every .cu file of this package.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// VIDGEN_DEVICE_ASSERT(cond, msg): a device-side assert that stays on in release builds (as
// torch's CUDA_KERNEL_ASSERT): the kernel stops, CUDA prints msg with the file, line, block and
// thread, and the host sees "device-side assert triggered". The CPU emulation of the kernels
// (tests/cuda_emu.py) turns it into a failed launch.
#if defined(VIDGEN_CUDA_EMU)
#define VIDGEN_DEVICE_ASSERT(cond, msg) \
  do {                                  \
    if (!(cond)) __trap();              \
  } while (0)
#else
extern "C" {
__host__ __device__ void __assert_fail(const char* assertion, const char* file,
                                       unsigned int line, const char* function) noexcept
    __attribute__((__noreturn__));
}
#define VIDGEN_DEVICE_ASSERT(cond, msg)                                              \
  do {                                                                              \
    if (!(cond)) __assert_fail(msg, __FILE__, static_cast<unsigned int>(__LINE__), __func__); \
  } while (0)
#endif

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
