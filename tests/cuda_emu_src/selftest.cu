// Kernels with the bugs the emulator must catch (tests/test_cuda_emu.py::test_emulator_*), and
// their fixed twins. Compiled only into the emulation module, through the same rewrite as csrc/.
#include <cuda_runtime.h>

#include <string>
#include <vector>

namespace vidgen_selftest {
namespace {

// Every thread publishes its index in shared memory and reads its neighbour's.
template <bool SYNC>
__global__ void neighbour_kernel(int* out) {
  extern __shared__ int buf[];
  const int t = threadIdx.x, n = blockDim.x;
  buf[t] = t;
  if (SYNC) __syncthreads();
  out[blockIdx.x * n + t] = buf[(t + 1) % n];
}

// Half a warp shuffles: a deadlock on a GPU (undefined behaviour with a full mask).
__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void butterfly_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

__global__ void __launch_bounds__(128) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

__global__ void smem_overflow_kernel(int* out, int n) {
  extern __shared__ int buf[];
  buf[threadIdx.x] = 1;  // blockDim.x ints, n of them allocated
  out[threadIdx.x] = n;
}

// Reads a static shared array no thread wrote (the second block also must not see the first's).
__global__ void uninit_static_smem_kernel(float* out, int write_first) {
  __shared__ float s[64];
  if (write_first && blockIdx.x == 0) s[threadIdx.x] = 1.f;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

__global__ void misaligned_kernel(const float* p, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p + 1));
  out[0] = v.x;
}

}  // namespace

// (error name, output) of one scenario; a kernel failure surfaces as an exception.
std::pair<std::string, std::vector<float>> run(const std::string& name) {
  cudaGetLastError();
  std::vector<float> res;
  if (name == "race" || name == "no_race") {
    const int n = 64, blocks = 2;
    std::vector<int> out(blocks * n, 0);
    if (name == "race")
      neighbour_kernel<false><<<blocks, n, n * sizeof(int)>>>(out.data());
    else
      neighbour_kernel<true><<<blocks, n, n * sizeof(int)>>>(out.data());
    res.assign(out.begin(), out.end());
  } else if (name == "divergent_shuffle" || name == "butterfly") {
    std::vector<float> out(32, 0.f);
    if (name == "butterfly")
      butterfly_kernel<<<1, 32>>>(out.data());
    else
      divergent_shuffle_kernel<<<1, 32>>>(out.data());
    res = out;
  } else if (name == "partial_warp_shuffle") {
    std::vector<float> out(48, 0.f);
    butterfly_kernel<<<1, 48>>>(out.data());
    res = out;
  } else if (name == "too_many_threads") {
    std::vector<int> out(2048, 0);
    bounded_kernel<<<1, 2048>>>(out.data());
  } else if (name == "launch_bounds") {
    std::vector<int> out(256, 0);
    bounded_kernel<<<1, 256>>>(out.data());
  } else if (name == "smem_without_optin" || name == "smem_with_optin") {
    std::vector<int> out(32, 0);
    const int bytes = 64 * 1024;
    if (name == "smem_with_optin")
      cudaFuncSetAttribute(smem_overflow_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    smem_overflow_kernel<<<1, 32, bytes>>>(out.data(), bytes / 4);
    res.assign(out.begin(), out.end());
  } else if (name == "smem_overflow") {
    std::vector<int> out(64, 0);
    smem_overflow_kernel<<<1, 64, 32 * sizeof(int)>>>(out.data(), 32);
  } else if (name == "uninit_static_smem") {
    std::vector<float> out(128, 0.f);
    uninit_static_smem_kernel<<<2, 64>>>(out.data(), 1);
    res = out;
  } else if (name == "misaligned_ldg") {
    std::vector<float> in(16, 1.f), out(1, 0.f);
    misaligned_kernel<<<1, 1>>>(in.data(), out.data());
  } else {
    throw std::runtime_error("unknown selftest " + name);
  }
  return {cudaGetErrorName(cudaGetLastError()), res};
}

}  // namespace vidgen_selftest
