// Helpers shared by the C++ CPU kernels (adaln_cpu.cpp, temporal_attention_cpu.cpp, ...):
// bf16 bit conversions, streaming (cache-bypassing) stores and their threshold, prefetch.
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

// Streaming stores pay off once a call writes more than the cache could keep: the last-level
// cache size, capped at 32 MiB. VIDGEN_KERNELS_CPU_STREAM_BYTES overrides it (0: always stream).
inline int64_t stream_threshold_bytes() {
  static const int64_t t = [] {
    if (const char* env = std::getenv("VIDGEN_KERNELS_CPU_STREAM_BYTES")) {
      if (*env) return int64_t(std::strtoll(env, nullptr, 10));
    }
    const int64_t cap = int64_t(32) << 20;
    long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? std::min(int64_t(l3), cap) : cap;
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

}  // namespace vidgen_cpu
