// Rotary position embedding (apply_rope), CUDA launcher interface.
//
// Plain C++ types only: raw pointers, int64 sizes and element strides, a dtype enum. Nothing
// from ATen / c10 / torch, so rope_cuda.cu compiles with nvcc alone and the binding
// (csrc/cuda_bindings.cpp) compiles against a CPU-only torch.
//
// Semantics: the RoPE kernel contract in vidgen_kernels/ops/rope.py. All sizes and strides are in
// elements, never bytes.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vidgen {
namespace rope {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RopeArgs {
  DType dtype = DType::kFloat32;   // T: x and out
  int64_t B = 0, S = 0, H = 0, D = 0;  // D even, >= 2
  const void* x = nullptr;         // [B, S, H, D], element [b, s, h, d] at b*sb + s*ss + h*sh + d*sd
  int64_t sb = 0, ss = 0, sh = 0, sd = 0;  // any (0 included)
  const float* cos = nullptr;      // [L, D/2] float32 contiguous (may be nullptr iff L == 0)
  const float* sin = nullptr;      // [L, D/2] float32 contiguous (may be nullptr iff L == 0)
  int64_t L = 0;                   // table rows; 0 <= offset, offset + L <= S
  int64_t offset = 0;              // first rotated position
  void* out = nullptr;             // [B, S, H, D] contiguous T, not overlapping x
  bool interleaved = true;         // pairs (2i, 2i+1) if true, else (i, i + D/2)
  bool conj = false;               // rotate by the negative angle (the backward)
};

// Enqueue the kernel on `stream`; no host synchronisation. Returns cudaErrorInvalidValue for
// arguments outside the contract (checked before any launch), otherwise cudaGetLastError() after
// the launch. An empty tensor launches nothing and returns cudaSuccess. The caller has made the
// tensors' device current.
cudaError_t rope_launch(const RopeArgs& args, cudaStream_t stream);

}  // namespace rope
}  // namespace vidgen
