// CUDA on the CPU, for the tests only (tests/cuda_emu.py builds it; tests/test_cuda_emu.py uses
// it): the csrc/*.cu kernels, rewritten by tests/cuda_emu.py (launch syntax, dynamic shared
// memory, __launch_bounds__) and compiled as C++ with this header in place of the CUDA headers,
// run on the host with one fiber (ucontext) per CUDA thread.
//
// What is emulated, and checked the way a GPU would fail:
//   * a block runs all its threads as fibers, block after block; a thread runs until it reaches
//     __syncthreads() or a warp shuffle and waits there for the others (a barrier releases when
//     every thread of the block that has not exited waits at it; a shuffle when all 32 lanes of
//     the warp wait at it). A barrier no thread can pass (a shuffle in divergent code, a lane
//     that exited before a shuffle, a __syncthreads() some threads skip while others wait at a
//     shuffle) is reported as a deadlock. The threads run in index order or, with
//     set_schedule(reverse=true), in reverse order: a read of shared memory that another thread
//     writes without a barrier in between sees a different value in one of the two orders.
//   * launch configuration: at most 1024 threads, grid limits, __launch_bounds__ (the rewrite
//     turns it into a check at kernel entry), dynamic shared memory above 48 KiB only after
//     cudaFuncSetAttribute(MaxDynamicSharedMemorySize) and never above the device's opt-in limit
//     (set_optin_smem; default: an H100's 227 KiB). A bad launch leaves cudaGetLastError() set
//     and runs nothing, as CUDA does.
//   * shared memory, static and dynamic, starts filled with 0xff bytes (NaN as float) in every
//     block; a guard zone after the dynamic part is checked at the end of each block.
//   * misaligned vector loads through __ldg fail; full-mask shuffles only.
// Not emulated: memory-model effects (everything is sequentially consistent here), timing,
// texture/constant memory, atomics (no kernel of this package uses them).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// ---- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one block at a time: a static local is the block's shared memory
                          // (the rewrite adds a shared_static() call to poison it per block)
#define __launch_bounds__(...)

// ---- vector types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- runtime API subset
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
};

namespace vidgen_emu {

enum class St { kRun, kBlockWait, kWarpWait, kDone };

struct Fiber {
  ucontext_t ctx;
  St st = St::kDone;
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  alignas(16) unsigned char xch[16];  // shuffle exchange slot
};

constexpr size_t kStack = 128 * 1024;
constexpr size_t kGuard = 256;  // guard bytes after the dynamic shared memory
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kStaticSmemEstimate = 1024;  // cudaFuncAttributes::sharedSizeBytes

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, shuffles = 0;
  uint64_t max_dyn_smem = 0;  // largest dynamic shared memory of a launch (bytes)
};

struct State {
  uint3 bid{0, 0, 0};
  dim3 bdim, gdim;
  std::vector<Fiber> fibers;
  std::unique_ptr<unsigned char[]> stacks;  // kStack bytes per thread, not touched until used
  size_t stack_threads = 0;
  ucontext_t sched;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> smem;
  size_t smem_bytes = 0;
  std::vector<const void*> static_smem;  // static __shared__ arrays poisoned in this block
  std::string error;
  bool reverse = false;
  bool in_kernel = false;
  cudaError_t last_error = cudaSuccess;
  size_t optin_smem = 232448;  // H100 / H200: 227 KiB per block with the opt-in
  std::map<const void*, size_t> max_dyn_smem;
  Stats stats;
};

inline State& state() {
  static thread_local State s;
  return s;
}

// Fail inside a kernel: record the message, end this thread, back to the scheduler.
[[noreturn]] inline void fail(const std::string& msg) {
  State& s = state();
  if (!s.in_kernel) throw std::runtime_error("cuda emu: " + msg);
  if (s.error.empty()) {
    s.error = msg + " (block (" + std::to_string(s.bid.x) + "," + std::to_string(s.bid.y) + "," +
              std::to_string(s.bid.z) + "), thread " + std::to_string(s.cur->linear) + ")";
  }
  s.cur->st = St::kDone;
  swapcontext(&s.cur->ctx, &s.sched);
  std::abort();  // never resumed
}

inline void wait(St why) {
  State& s = state();
  s.cur->st = why;
  swapcontext(&s.cur->ctx, &s.sched);
}

inline void fiber_entry() {
  State& s = state();
  (*s.body)();
  s.cur->st = St::kDone;
  swapcontext(&s.cur->ctx, &s.sched);
  std::abort();
}

inline void* dynamic_smem() { return state().smem.data(); }

// First thread of the block to reach a static __shared__ declaration fills it with 0xff bytes:
// shared memory starts undefined on a GPU, not zeroed, and not holding the previous block's data.
inline void shared_static(void* p, size_t bytes) {
  State& s = state();
  for (const void* q : s.static_smem)
    if (q == p) return;
  s.static_smem.push_back(p);
  std::memset(p, 0xff, bytes);
}

inline void run_block(State& s) {
  const unsigned n = s.bdim.x * s.bdim.y * s.bdim.z;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks.get() + static_cast<size_t>(i) * kStack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
    f.st = St::kRun;
    f.linear = i;
    f.tid = {i % s.bdim.x, (i / s.bdim.x) % s.bdim.y, i / (s.bdim.x * s.bdim.y)};
  }
  std::memset(s.smem.data(), 0xff, s.smem.size());
  s.static_smem.clear();
  for (;;) {
    for (unsigned k = 0; k < n; ++k) {
      Fiber& f = s.fibers[s.reverse ? n - 1 - k : k];
      if (f.st != St::kRun) continue;
      s.cur = &f;
      swapcontext(&s.sched, &f.ctx);
      if (!s.error.empty()) return;
    }
    // every thread now waits or is done: release what can be released
    bool released = false, any_block = false, any_left = false;
    for (unsigned w = 0; w * 32 < n; ++w) {
      const unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
      unsigned warp_wait = 0;
      for (unsigned i = lo; i < hi; ++i) warp_wait += s.fibers[i].st == St::kWarpWait;
      if (warp_wait == 0) continue;
      if (warp_wait != 32) {
        s.error = "deadlock: " + std::to_string(warp_wait) + " lanes of warp " +
                  std::to_string(w) + " wait at a full-mask shuffle, the other " +
                  std::to_string(hi - lo - warp_wait) +
                  " lanes of the warp exited, wait at __syncthreads() or do not exist "
                  "(blockDim " + std::to_string(n) + ")";
        return;
      }
      for (unsigned i = lo; i < hi; ++i) s.fibers[i].st = St::kRun;
      released = true;
    }
    if (released) continue;
    for (unsigned i = 0; i < n; ++i) {
      any_block |= s.fibers[i].st == St::kBlockWait;
      any_left |= s.fibers[i].st != St::kDone;
    }
    if (!any_left) break;
    if (any_block) {  // every thread left waits at the barrier
      for (unsigned i = 0; i < n; ++i)
        if (s.fibers[i].st == St::kBlockWait) s.fibers[i].st = St::kRun;
      ++s.stats.barriers;
      continue;
    }
    s.error = "deadlock: no thread can run";
    return;
  }
  for (size_t i = s.smem_bytes; i < s.smem.size(); ++i) {
    if (s.smem[i] != 0xff) {
      s.error = "write past the end of the " + std::to_string(s.smem_bytes) +
                " bytes of dynamic shared memory (byte " + std::to_string(i) + ")";
      return;
    }
  }
}

struct Cfg {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};

inline Cfg cfg(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  return {grid, block, smem, stream};
}

template <typename R, typename... A>
const void* fn_id(R (*f)(A...)) {
  return reinterpret_cast<const void*>(f);
}

inline void launch(const Cfg& c, const void* fn, const std::function<void()>& body) {
  State& s = state();
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (threads < 1 || threads > 1024 || c.block.z > 64 || c.grid.x < 1 || c.grid.y < 1 ||
      c.grid.z < 1 || c.grid.x > 2147483647u || c.grid.y > 65535 || c.grid.z > 65535) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  size_t allowed = kDefaultSmem;
  const auto it = s.max_dyn_smem.find(fn);
  if (it != s.max_dyn_smem.end() && it->second > allowed) allowed = it->second;
  if (c.smem > allowed) {
    s.last_error = cudaErrorInvalidValue;
    return;
  }
  s.bdim = c.block;
  s.gdim = c.grid;
  s.body = &body;
  s.smem_bytes = c.smem;
  s.smem.assign(c.smem + kGuard, 0xff);
  s.fibers.assign(threads, Fiber());
  if (s.stack_threads < threads) {
    s.stacks.reset(new unsigned char[threads * kStack]);
    s.stack_threads = threads;
  }
  s.error.clear();
  ++s.stats.launches;
  if (c.smem > s.stats.max_dyn_smem) s.stats.max_dyn_smem = c.smem;
  s.in_kernel = true;
  for (unsigned z = 0; z < c.grid.z; ++z)
    for (unsigned y = 0; y < c.grid.y; ++y)
      for (unsigned x = 0; x < c.grid.x; ++x) {
        s.bid = {x, y, z};
        ++s.stats.blocks;
        s.stats.threads += threads;
        run_block(s);
        if (!s.error.empty()) {
          s.in_kernel = false;
          s.last_error = cudaErrorLaunchFailure;
          throw std::runtime_error("cuda emu: kernel failed: " + s.error);
        }
      }
  s.in_kernel = false;
}

inline void launch_bounds_check(unsigned bound) {
  const State& s = state();
  const unsigned n = s.bdim.x * s.bdim.y * s.bdim.z;
  if (n > bound)
    fail("launched with " + std::to_string(n) + " threads per block, __launch_bounds__ " +
         std::to_string(bound));
}

// ---- half / bfloat16 bit conversions (round to nearest even)
inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
// Software conversions (no _Float16: any C++17 compiler), bit-exact with IEEE binary16.
inline float half_bits_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return bits_to_f32(f32_to_bits(v) | sign);
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // inf / NaN
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}
inline uint16_t f32_to_half_bits(float f) {  // round to nearest even
  const uint32_t x = f32_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // qNaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 (or inf): inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal (or zero); 1024 lands on the smallest normal
    const float v = bits_to_f32(ax) * 16777216.0f;  // in units of 2^-24, exact
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(v)));
  }
  const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u;  // round at bit 13, rebias
  return static_cast<uint16_t>(sign | (r >> 13));
}
inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t x = f32_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // qNaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

}  // namespace vidgen_emu

#define threadIdx (::vidgen_emu::state().cur->tid)
#define blockIdx (::vidgen_emu::state().bid)
#define blockDim (::vidgen_emu::state().bdim)
#define gridDim (::vidgen_emu::state().gdim)
#define VIDGEN_EMU_LAUNCH_BOUNDS(n) ::vidgen_emu::launch_bounds_check(static_cast<unsigned>(n))

inline void __syncthreads() {
  ++::vidgen_emu::state().stats.barriers;
  ::vidgen_emu::wait(::vidgen_emu::St::kBlockWait);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  using namespace vidgen_emu;
  State& s = state();
  if (mask != 0xffffffffu || width != 32) fail("only full-mask, width-32 shuffles are emulated");
  ++s.stats.shuffles;
  Fiber* f = s.cur;
  std::memcpy(f->xch, &v, sizeof(T));
  wait(St::kWarpWait);  // every lane has published
  const unsigned lane = f->linear & 31u;
  const unsigned src = (f->linear - lane) + ((lane ^ static_cast<unsigned>(lane_mask)) & 31u);
  T r;
  std::memcpy(&r, s.fibers[src].xch, sizeof(T));
  wait(St::kWarpWait);  // every lane has read before any overwrites its slot
  return r;
}

// a device-side abort: the launch fails (the emulator raises), as CUDA ends the kernel
[[noreturn]] inline void __trap() { ::vidgen_emu::fail("__trap() (device-side abort)"); }

template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
    ::vidgen_emu::fail("misaligned __ldg of " + std::to_string(sizeof(T)) + " bytes at " +
                       std::to_string(reinterpret_cast<uintptr_t>(p)));
  return *p;
}

inline float __uint_as_float(unsigned b) { return ::vidgen_emu::bits_to_f32(b); }
inline unsigned __float_as_uint(float f) { return ::vidgen_emu::f32_to_bits(f); }
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;  // no contraction into an fma
  return r;
}
inline float __fsub_rn(float a, float b) {
  volatile float r = a - b;
  return r;
}
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

inline cudaError_t cudaGetLastError() {
  ::vidgen_emu::State& s = ::vidgen_emu::state();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *v = static_cast<int>(::vidgen_emu::state().optin_smem);
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  a->sharedSizeBytes = ::vidgen_emu::kStaticSmemEstimate;
  a->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute attr, int value) {
  ::vidgen_emu::State& s = ::vidgen_emu::state();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) + ::vidgen_emu::kStaticSmemEstimate > s.optin_smem)
    return cudaErrorInvalidValue;
  s.max_dyn_smem[::vidgen_emu::fn_id(f)] = static_cast<size_t>(value);
  return cudaSuccess;
}

// ---- cuda_fp16.h / cuda_bf16.h subset: storage types and the conversions the kernels use
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
inline float __half2float(__half h) { return ::vidgen_emu::half_bits_to_f32(h.__x); }
inline __half __float2half_rn(float f) { return {::vidgen_emu::f32_to_half_bits(f)}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline float __bfloat162float(__nv_bfloat16 h) {
  return ::vidgen_emu::bits_to_f32(static_cast<uint32_t>(h.__x) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {::vidgen_emu::f32_to_bf16_bits(f)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
