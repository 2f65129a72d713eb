// Launchers of the fused AdaLN modulation CUDA kernels (csrc/adaln_cuda.cu).
//
// Plain C++: raw pointers, int64 sizes and element strides, dtype enums. Nothing from
// ATen / c10 / torch, so that the .cu file compiles with nvcc alone (no torch headers) and the
// binding (csrc/cuda_bindings.cpp) compiles against a CPU-only torch.
//
// The semantics are the kernel contract at the top of vidgen_kernels/ops/adaln.py; the names
// below follow it. All sizes and strides are in elements, never bytes.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vidgen {
namespace adaln {

// Largest channel count the kernels take (the row lives in registers).
constexpr int64_t kMaxChannels = 16384;

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A [B, N, C] tensor of the x dtype T: element [b, n, c] at ptr + b*sb + n*sn + c*sc.
// Any strides (0 included). ptr == nullptr: the tensor is absent.
struct RowTensor {
  const void* ptr = nullptr;
  int64_t sb = 0, sn = 0, sc = 0;
};

// A [Bp, F, C] modulation parameter (shift, scale, gate) of the parameter dtype P, any strides;
// Bp in {1, B}, F >= 1 divides N. Token n of batch b reads row [b if Bp == B else 0, n / (N / F)].
struct ParamTensor {
  const void* ptr = nullptr;
  int64_t size_b = 1, size_f = 1;
  int64_t sb = 0, sf = 0, sc = 0;
};

struct FwdArgs {
  DType x_dtype = DType::kFloat32;      // T: x, y, out, h
  DType param_dtype = DType::kFloat32;  // P: shift, scale, gate (T or kFloat32)
  int64_t B = 0, N = 0, C = 0;
  RowTensor x;
  RowTensor y;                          // y.ptr == nullptr: not gated
  ParamTensor gate;                     // given iff gated
  ParamTensor shift, scale;             // always given
  const float* weight = nullptr;        // [C] float32 contiguous, or nullptr (w = 1)
  const float* bias = nullptr;          // [C] float32 contiguous, or nullptr (b = 0)
  void* out = nullptr;                  // [B, N, C] contiguous T
  void* h = nullptr;                    // [B, N, C] contiguous T, given iff gated
  float* mean = nullptr;                // [B, N] contiguous float32 (0 for rms)
  float* rstd = nullptr;                // [B, N] contiguous float32
  float eps = 0.f;
  bool is_rms = false;
};

// How a parameter gradient (dgate / dshift / dscale) is written.
enum class GradMode : int32_t {
  kNone = 0,      // not asked for
  kPerToken = 1,  // [B, N, C] contiguous, dtype `dtype`, element [b, n, c]
  kPartial = 2,   // [B, NC, 2, C] float32 contiguous, NC = ceil(N / R), two slots per chunk
};

struct ParamGrad {
  void* ptr = nullptr;
  GradMode mode = GradMode::kNone;
  DType dtype = DType::kFloat32;  // kPerToken only (kPartial is always float32)
  int64_t tpr = 1;                // tokens per parameter row (kPartial; R <= tpr)
};

struct BwdArgs {
  DType x_dtype = DType::kFloat32;      // T: dout, dh, hx, y, dx, dy
  DType param_dtype = DType::kFloat32;  // P: scale, gate
  int64_t B = 0, N = 0, C = 0;
  RowTensor dout;                       // always given
  RowTensor dh;                         // optional
  RowTensor hx;                         // the normalised tensor (x, or h when gated)
  RowTensor y;                          // needed iff dgate is asked for
  ParamTensor gate;                     // needed iff dy is asked for
  ParamTensor scale;                    // always given
  const float* weight = nullptr;        // [C] float32 contiguous or nullptr
  const float* bias = nullptr;          // [C] float32 contiguous or nullptr
  const float* mean = nullptr;          // [B, N] float32: element [b, n] at b*mean_sb + n*mean_sn
  int64_t mean_sb = 0, mean_sn = 0;
  const float* rstd = nullptr;          // [B, N] float32, likewise
  int64_t rstd_sb = 0, rstd_sn = 0;
  void* dx = nullptr;                   // [B, N, C] contiguous T, always given
  void* dy = nullptr;                   // [B, N, C] contiguous T or nullptr
  ParamGrad dgate, dshift, dscale;
  float* dweight = nullptr;             // [B, NC, C] float32 contiguous or nullptr
  float* dbias = nullptr;               // [B, NC, C] float32 contiguous or nullptr
  int64_t rows_per_chunk = 1;           // R >= 1
  bool is_rms = false;
};

// Enqueue the kernel on `stream`; no host synchronisation. Returns cudaErrorInvalidValue for
// arguments outside the contract (checked before any launch), otherwise cudaGetLastError() after
// the launch. B * N == 0 launches nothing and returns cudaSuccess. The caller has made the
// tensors' device current.
cudaError_t adaln_fwd_launch(const FwdArgs& args, cudaStream_t stream);
cudaError_t adaln_bwd_launch(const BwdArgs& args, cudaStream_t stream);

}  // namespace adaln
}  // namespace vidgen
