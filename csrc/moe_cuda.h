// Grouped-GEMM MoE (moe_ffn): CUDA launcher interface of the routing, permutation and weighted
// un-permutation kernels (the expert GEMMs of the `cuda` backend are Triton's grouped GEMMs).
//
// Plain C++ types only: raw pointers, int64 sizes and element strides, a dtype enum. Nothing
// from ATen / c10 / torch, so moe_cuda.cu compiles with nvcc alone and the binding
// (csrc/cuda_bindings.cpp) compiles against a CPU-only torch.
//
// Semantics: the MoE kernel contract in vidgen_kernels/ops/moe.py (route, gather, combine).
// Every launcher enqueues on `stream` without host synchronisation and returns
// cudaErrorInvalidValue for arguments outside the contract (checked before any launch),
// otherwise cudaGetLastError() after the launch; empty problems launch nothing.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vidgen {
namespace moe {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// logits [N, E] float32 contiguous -> weights [N, k] float32, idx [N, k] int64 (contiguous):
// softmax over E, the k largest logits in decreasing order (ties: lowest index first),
// weights = their probabilities, divided by their sum when `normalize`. 1 <= k <= E.
cudaError_t route_launch(const float* logits, int64_t N, int64_t E, int64_t k, bool normalize,
                         float* weights, int64_t* idx, cudaStream_t stream);

// out[p, c] = src[rows[p], c]: src [M, C] with element strides (s0, s1), out [P, C]
// contiguous. A rows[p] outside [0, M) is a device-side assert (no out-of-bounds read).
cudaError_t gather_launch(DType dtype, const void* src, int64_t M, int64_t C, int64_t s0,
                          int64_t s1, const int64_t* rows, int64_t P, void* out,
                          cudaStream_t stream);

// out[n, c] = sum_{j < k} w[n, j] * y[pos[n, j], c] (fp32 accumulation in slot order, one
// rounding): y [Py, C] contiguous, pos [N, k] int64 contiguous (a pos outside [0, Py) is a
// device-side assert), w [N, k] float32 contiguous or nullptr (all ones), out [N, C] contiguous, not
// overlapping y.
cudaError_t combine_launch(DType dtype, const void* y, int64_t Py, int64_t C, const int64_t* pos,
                           const float* w, int64_t N, int64_t k, void* out, cudaStream_t stream);

// cudaSuccess when this build has a kernel image (SASS for the device's architecture, or PTX it
// can JIT) for the current device; cudaErrorNoKernelImageForDevice (or another error) when not,
// e.g. an sm_80/sm_90 build on a V100 or T4. Launches nothing.
cudaError_t kernel_image_check();

}  // namespace moe
}  // namespace vidgen
