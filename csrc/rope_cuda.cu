// Rotary position embedding (apply_rope), CUDA kernel (contract: vidgen_kernels/ops/rope.py).
//
// No ATen / c10 / torch header here: this file compiles with nvcc alone.
//
// One block per token (b, s) (grid-stride over tokens); its threads walk the H * D/2 rotation
// pairs of the token (consecutive threads: consecutive pairs, so loads and stores coalesce).
// Interleaved pairs are read / written as one 2-element access when the host says the tensors
// allow it (x: unit last stride, even outer strides, aligned base; out: aligned base): PAIRVEC.
// Tokens outside offset .. offset + L - 1 are copied bit for bit. Math in fp32, one rounding to
// T. CONJ negates the sine (the backward). The table row is shared by all heads of a token and is
// read through the read-only cache.
#include "rope_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"

#include <cstdint>

namespace vidgen {
namespace rope {
namespace {

// Two consecutive elements as one access.
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T a, b;
};

template <typename T, bool INTER, bool CONJ, bool PAIRVEC>
__global__ void rope_kernel(const T* __restrict__ x, T* __restrict__ out,
                            const float* __restrict__ cos, const float* __restrict__ sin,
                            int64_t ntok, int64_t S, int64_t H, int64_t D, int64_t sb,
                            int64_t ss, int64_t sh, int64_t sd, int64_t L, int64_t offset) {
  const int64_t P = D / 2;
  const int64_t HP = H * P;
  for (int64_t tok = blockIdx.x; tok < ntok; tok += gridDim.x) {
    const int64_t b = tok / S;
    const int64_t s = tok - b * S;
    const int64_t j = s - offset;
    const bool inside = j >= 0 && j < L;
    const T* xr = x + b * sb + s * ss;
    T* orow = out + tok * H * D;
    const float* crow = cos + (inside ? j * P : 0);
    const float* srow = sin + (inside ? j * P : 0);
    for (int64_t q = threadIdx.x; q < HP; q += blockDim.x) {
      const int64_t h = q / P;
      const int64_t i = q - h * P;
      const int64_t ia = INTER ? 2 * i : i;
      const int64_t ib = INTER ? 2 * i + 1 : i + P;
      const T* xh = xr + h * sh;
      T* oh = orow + h * D;
      T va, vb;
      if (PAIRVEC) {
        const Pair<T> pr = *reinterpret_cast<const Pair<T>*>(xh + ia);
        va = pr.a;
        vb = pr.b;
      } else {
        va = xh[ia * sd];
        vb = xh[ib * sd];
      }
      if (inside) {
        const float c = __ldg(crow + i);
        const float sn = CONJ ? -__ldg(srow + i) : __ldg(srow + i);
        const float fa = Conv<T>::to_f(va);
        const float fb = Conv<T>::to_f(vb);
        // each product and the sum rounded (no FMA contraction): the contract's fp32 math,
        // bit for bit with torch's a * c - b * s
        va = Conv<T>::from_f(__fsub_rn(__fmul_rn(fa, c), __fmul_rn(fb, sn)));
        vb = Conv<T>::from_f(__fadd_rn(__fmul_rn(fb, c), __fmul_rn(fa, sn)));
      }
      if (PAIRVEC) {
        Pair<T> pr;
        pr.a = va;
        pr.b = vb;
        *reinterpret_cast<Pair<T>*>(oh + ia) = pr;  // out contiguous, D even, base aligned
      } else {
        oh[ia] = va;
        oh[ib] = vb;
      }
    }
  }
}

template <typename T, bool INTER, bool CONJ, bool PAIRVEC>
cudaError_t launch_t(const RopeArgs& a, cudaStream_t stream) {
  const int64_t ntok = a.B * a.S;
  const int64_t HP = a.H * (a.D / 2);
  int threads = static_cast<int>(((HP < 256 ? HP : 256) + 31) / 32 * 32);
  if (threads < 32) threads = 32;
  const int64_t max_grid = int64_t(1) << 24;
  const unsigned grid = static_cast<unsigned>(ntok < max_grid ? ntok : max_grid);
  rope_kernel<T, INTER, CONJ, PAIRVEC><<<grid, threads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<T*>(a.out), a.cos, a.sin, ntok, a.S, a.H, a.D,
      a.sb, a.ss, a.sh, a.sd, a.L, a.offset);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const RopeArgs& a, cudaStream_t stream) {
  const bool pairvec = a.interleaved && a.sd == 1 && a.sb % 2 == 0 && a.ss % 2 == 0 &&
                       a.sh % 2 == 0 &&
                       reinterpret_cast<uintptr_t>(a.x) % (2 * sizeof(T)) == 0 &&
                       reinterpret_cast<uintptr_t>(a.out) % (2 * sizeof(T)) == 0;
  if (a.interleaved) {
    if (pairvec)
      return a.conj ? launch_t<T, true, true, true>(a, stream)
                    : launch_t<T, true, false, true>(a, stream);
    return a.conj ? launch_t<T, true, true, false>(a, stream)
                  : launch_t<T, true, false, false>(a, stream);
  }
  return a.conj ? launch_t<T, false, true, false>(a, stream)
                : launch_t<T, false, false, false>(a, stream);
}

}  // namespace

cudaError_t rope_launch(const RopeArgs& a, cudaStream_t stream) {
  if (a.B < 0 || a.S < 0 || a.H < 0 || a.D < 2 || a.D % 2 != 0 || a.L < 0 || a.offset < 0 ||
      a.offset + a.L > a.S)
    return cudaErrorInvalidValue;
  if (a.B == 0 || a.S == 0 || a.H == 0) return cudaSuccess;
  if (a.x == nullptr || a.out == nullptr || (a.L > 0 && (a.cos == nullptr || a.sin == nullptr)))
    return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32:
      return launch_dtype<float>(a, stream);
    case DType::kFloat16:
      return launch_dtype<__half>(a, stream);
    case DType::kBFloat16:
      return launch_dtype<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rope
}  // namespace vidgen
