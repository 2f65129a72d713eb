// Helpers shared by the C++ CPU kernels (adaln_cpu.cpp, temporal_attention_cpu.cpp, ...):
// bf16 bit conversions, streaming (cache-bypassing) stores and their threshold, prefetch, 8-float
// vectors (GCC/Clang vector extensions) and vectorised exps.
// Header-only, everything inline in namespace vidgen_cpu.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <unistd.h>

#if defined(__SSE2__) || defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace vidgen_cpu {

inline float bf16_bits_to_float(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t r = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return f != f ? uint16_t(0x7fc0) : r;
}

// Copies bytes to memory with streaming (cache-bypassing) stores where the destination is
// 16-byte aligned: no read-for-ownership of the destination lines.
inline void stream_bytes(void* dst, const void* src, size_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  size_t i = 0;
#ifdef __SSE2__
  if ((reinterpret_cast<uintptr_t>(d) & 15) == 0) {
    for (; i + 16 <= bytes; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
#endif
  std::memcpy(d + i, s + i, bytes - i);
}

// Makes a thread's streaming stores visible (end of each parallel task).
inline void stream_fence() {
#ifdef __SSE2__
  _mm_sfence();
#endif
}

// Size in bytes of the level-2 or level-3 data cache as the C library reports it; 0 when unknown.
inline int64_t cache_bytes(int level) {
  long v = -1;
#if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
  v = sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
#endif
  return v > 0 ? int64_t(v) : 0;
}

// Streaming stores pay off once a call writes more than the cache could keep: the last-level
// cache size, capped at 32 MiB. VIDGEN_KERNELS_CPU_STREAM_BYTES overrides it (0: always stream).
inline int64_t stream_threshold_bytes() {
  static const int64_t t = [] {
    if (const char* env = std::getenv("VIDGEN_KERNELS_CPU_STREAM_BYTES")) {
      if (*env) return int64_t(std::strtoll(env, nullptr, 10));
    }
    const int64_t cap = int64_t(32) << 20;
    const int64_t l3 = cache_bytes(3);
    return l3 > 0 ? std::min(l3, cap) : cap;
  }();
  return t;
}

// Prefetches one cache line into L1. (GCC 12 deletes some loops made only of
// __builtin_prefetch calls as if they had no effect; an asm statement is never deleted.)
inline void prefetch_line(const void* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// 8-float vectors (GCC/Clang vector extensions: one AVX register with -mavx, two SSE registers
// or scalar code otherwise).
constexpr int64_t kW = 8;
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef float vfu __attribute__((vector_size(32), aligned(4), may_alias));

inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vf vset1(float s) { return vf{s, s, s, s, s, s, s, s}; }
inline vf vand(vi m, vf a) { return reinterpret_cast<vf>(m & reinterpret_cast<vi>(a)); }

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// Sum of the 8 lanes (3 dependent adds).
inline float hsum(vf v) {
#ifdef __AVX__
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
#else
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
#endif
}

// Maximum of the 8 lanes.
inline float hmax(vf v) {
#ifdef __AVX__
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
#else
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = std::max(m, v[i]);
  return m;
#endif
}

// exp(x) for -87 <= x <= 88.38 (Cephes expf: Cody-Waite range reduction + degree-5 polynomial,
// ~1 ulp); the callers below clamp to that range.
inline vf vexp_in_range(vf x) {
  vf fx = x * 1.44269504088896341f + 0.5f;
  const vf tr = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
  fx = tr > fx ? tr - 1.0f : tr;  // floor
  x = x - fx * 0.693359375f;
  x = x - fx * -2.12194440e-4f;
  const vf z = x * x;
  vf y = vset1(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const vi n = __builtin_convertvector(fx, vi);
  return y * reinterpret_cast<vf>((n + 127) << 23);
}

// exp(x) for x <= ~88 (~1 ulp); exactly 0 for x < -87 (exp(-87) = 1.6e-38, next to FLT_MIN)
// and -inf; NaN stays NaN. The clamp at -87 keeps every intermediate a normal float: a
// denormal product costs a microcode assist (x2.5 slower on masked entries).
inline vf vexp(vf x) {
  const vf x0 = x;
  const vi keep = x >= vset1(-87.0f);
  x = x < vset1(88.3762626647949f) ? x : vset1(88.3762626647949f);
  x = x > vset1(-87.0f) ? x : vset1(-87.0f);
  const vf r = vand(keep, vexp_in_range(x));
  return x0 != x0 ? x0 : r;
}

// exp(x) for x <= 0 (softmax arguments z - max, z - lse), without vexp's edge handling: -inf
// and x < -87 give exp(-87) = 1.6e-38 instead of 0 (callers zero masked entries themselves), x > 0
// gives 1, NaN an unspecified finite value (callers detect NaN rows themselves).
inline vf vexp_nonpos(vf x) {
  x = x > vset1(-87.0f) ? x : vset1(-87.0f);
  return vexp_in_range(x < vset1(0.0f) ? x : vset1(0.0f));
}

}  // namespace vidgen_cpu
