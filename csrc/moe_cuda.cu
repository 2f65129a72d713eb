// Grouped-GEMM MoE: CUDA routing, permutation and weighted un-permutation kernels
// (contract: vidgen_kernels/ops/moe.py; interface: moe_cuda.h). No ATen / c10 / torch header.
//
// * route: one thread per token. The j-th expert is the largest logit strictly after the
//   (j-1)-th in the order (logit descending, index ascending), so ties go to the lowest index
//   and no per-thread array is needed for any E. Softmax in fp32 (expf).
// * gather: one block per row (grid-stride over rows), threads over the C columns.
// * combine: one block per token, threads over C; the k slots are summed in slot order in
//   fp32: deterministic, no atomics.
// * gather / combine check every index against the rows of their source on the device: an
//   index outside [0, rows) is a device-side assert (as in torch's own index kernels), never an
//   out-of-bounds read. One compare per row, no host sync.
#include "moe_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"

#include <cstdint>

namespace vidgen {
namespace moe {
namespace {

// a above b in torch.sort's descending order: NaN above every number
__device__ __forceinline__ bool above(float a, float b) { return a != a ? b == b : a > b; }

// expert a (logit la) is picked before expert b: larger logit first, ties (NaN with NaN too) to
// the lower index; a total order, so the k picks are k distinct experts whatever the logits
__device__ __forceinline__ bool before(float la, int64_t a, float lb, int64_t b) {
  return above(la, lb) || (!above(lb, la) && a < b);
}

__global__ void route_kernel(const float* __restrict__ logits, int64_t N, int64_t E, int64_t k,
                             bool normalize, float* __restrict__ weights,
                             int64_t* __restrict__ idx) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N;
       n += int64_t(gridDim.x) * blockDim.x) {
    const float* l = logits + n * E;
    float mx = -INFINITY;
    for (int64_t e = 0; e < E; ++e) mx = fmaxf(mx, l[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += expf(l[e] - mx);
    float prev_l = INFINITY;
    int64_t prev = -1;
    float ssel = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      float bl = 0.f;
      for (int64_t e = 0; e < E; ++e) {
        const float le = l[e];
        if (prev >= 0 && !before(prev_l, prev, le, e)) continue;  // not after the previous pick
        if (best < 0 || before(le, e, bl, best)) {
          best = e;
          bl = le;
        }
      }
      if (best < 0) best = 0;  // unreachable (k <= E): a guard for the index below
      const float p = expf(l[best] - mx) / sum;
      idx[n * k + j] = best;
      weights[n * k + j] = p;
      ssel += p;
      prev = best;
      prev_l = l[best];
    }
    if (normalize) {
      for (int64_t j = 0; j < k; ++j) weights[n * k + j] /= ssel;
    }
  }
}

// device-side bounds check of a gathered row index (see the header comment)
__device__ __forceinline__ void check_row(int64_t r, int64_t rows) {
  VIDGEN_DEVICE_ASSERT(r >= 0 && r < rows, "moe gather / combine: row index outside [0, rows)");
}

template <typename T>
__global__ void gather_kernel(const T* __restrict__ src, int64_t M, int64_t C, int64_t s0,
                              int64_t s1, const int64_t* __restrict__ rows, int64_t P,
                              T* __restrict__ out) {
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    const int64_t r = rows[p];
    check_row(r, M);
    const T* s = src + r * s0;
    T* d = out + p * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) d[c] = s[c * s1];
  }
}

template <typename T>
__global__ void combine_kernel(const T* __restrict__ y, int64_t Py, int64_t C,
                               const int64_t* __restrict__ pos, const float* __restrict__ w,
                               int64_t N, int64_t k, T* __restrict__ out) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    for (int64_t j = 0; j < k; ++j) check_row(pos[n * k + j], Py);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const float wj = w != nullptr ? w[n * k + j] : 1.f;
        acc += wj * Conv<T>::to_f(y[pos[n * k + j] * C + c]);
      }
      out[n * C + c] = Conv<T>::from_f(acc);
    }
  }
}

int grid_for(int64_t items) {
  const int64_t cap = 65535 * 8;
  return static_cast<int>(items < cap ? (items > 0 ? items : 1) : cap);
}

int threads_for(int64_t C) {
  int t = 32;
  while (t < 256 && t < C) t *= 2;
  return t;
}

}  // namespace

cudaError_t route_launch(const float* logits, int64_t N, int64_t E, int64_t k, bool normalize,
                         float* weights, int64_t* idx, cudaStream_t stream) {
  if (N < 0 || E < 1 || k < 1 || k > E) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  if (logits == nullptr || weights == nullptr || idx == nullptr) return cudaErrorInvalidValue;
  const int threads = 128;
  const int64_t blocks = (N + threads - 1) / threads;
  route_kernel<<<grid_for(blocks), threads, 0, stream>>>(logits, N, E, k, normalize, weights,
                                                         idx);
  return cudaGetLastError();
}

cudaError_t gather_launch(DType dtype, const void* src, int64_t M, int64_t C, int64_t s0,
                          int64_t s1, const int64_t* rows, int64_t P, void* out,
                          cudaStream_t stream) {
  if (M < 0 || C < 0 || P < 0) return cudaErrorInvalidValue;
  if (C == 0 || P == 0) return cudaSuccess;
  if (src == nullptr || rows == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const int g = grid_for(P), t = threads_for(C);
  switch (dtype) {
    case DType::kFloat32:
      gather_kernel<float><<<g, t, 0, stream>>>(static_cast<const float*>(src), M, C, s0, s1, rows,
                                                P, static_cast<float*>(out));
      break;
    case DType::kFloat16:
      gather_kernel<__half><<<g, t, 0, stream>>>(static_cast<const __half*>(src), M, C, s0, s1,
                                                 rows, P, static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      gather_kernel<__nv_bfloat16><<<g, t, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(src), M, C, s0, s1, rows, P,
          static_cast<__nv_bfloat16*>(out));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t combine_launch(DType dtype, const void* y, int64_t Py, int64_t C, const int64_t* pos,
                           const float* w, int64_t N, int64_t k, void* out, cudaStream_t stream) {
  if (Py < 0 || C < 0 || N < 0 || k < 1) return cudaErrorInvalidValue;
  if (C == 0 || N == 0) return cudaSuccess;
  if (y == nullptr || pos == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const int g = grid_for(N), t = threads_for(C);
  switch (dtype) {
    case DType::kFloat32:
      combine_kernel<float><<<g, t, 0, stream>>>(static_cast<const float*>(y), Py, C, pos, w, N, k,
                                                 static_cast<float*>(out));
      break;
    case DType::kFloat16:
      combine_kernel<__half><<<g, t, 0, stream>>>(static_cast<const __half*>(y), Py, C, pos, w, N,
                                                  k, static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      combine_kernel<__nv_bfloat16><<<g, t, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(y), Py, C, pos, w, N, k,
          static_cast<__nv_bfloat16*>(out));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t kernel_image_check() {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, route_kernel);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky; leave no error behind
  return err;
}

}  // namespace moe
}  // namespace vidgen
