/*
 * Rotary position embedding (apply_rope): C++ CPU backend (OpenMP through at::parallel_for).
 *
 * Implements the RoPE kernel contract written in vidgen_kernels/ops/rope.py
 * (rope_kernel_torch there is the same contract in PyTorch):
 *
 *   rope_cpu(x, cos, sin, out, offset, interleaved, conj)
 *
 * - x [B, S, H, D] any strides (read in place, never copied), dtype T in {float32, float16,
 *   bfloat16, float64}; cos / sin [L, D/2] float32 contiguous (float64 x: float32 or float64,
 *   math in double either way); out [B, S, H, D] T, dense and
 *   non-overlapping with a unit last stride (contiguous, or e.g. a [B, H, S, D] buffer transposed).
 * - Token (b, s) with offset <= s < offset + L: each head row's pairs (x[2i], x[2i+1])
 *   (interleaved) or (x[i], x[i + D/2]) are rotated by the angle of table row s - offset
 *   (negated when conj), math in float (double for float64), rounded once to T. Other tokens
 *   are copied bit for bit.
 * - at::parallel_for over the B*S tokens. Built with AVX2 + F16C (setup.py's -march=native), rows
 *   with a unit last stride take explicit vector loops with the scalar loop's roundings: float16 /
 *   bfloat16 / float32 converted to float and back exactly as c10 converts, 16 pairs a step
 *   with AVX-512 (bfloat16 rows, half-split float16 rows), then 8 pairs a step; float64 4 pairs
 *   a step. Other strides, a row's last pairs (fewer than a step) and builds without AVX2 +
 *   F16C take the scalar loop (which the compiler may vectorise, float types).
 */
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define VIDGEN_ROPE_AVX2 1
#endif

// The contract's math: each product and the sum rounded (a c - b s as torch computes it), bit for
// bit on every backend; GCC would contract them into FMAs (1 ulp apart in fp32). RoPE is
// memory-bound: the FMA saved nothing. (After the includes: torch's own code keeps its flags.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace {

using at::Tensor;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// table element type: double for double x (fp64 tables kept exact), float otherwise
template <typename T>
using tab_t = acc_t<T>;

// A product as rounded by itself, kept apart from the sum: GCC 12's vectorizer fuses a double
// pair's a*c -/+ b*s into vfmaddsub (its addsub pattern ignores fp-contract=off: fp64
// interleaved rows were 1 ulp off the oracle), so double scalar rows stay scalar (an asm operand
// cannot be vectorised). Float rows were checked fused-free in the object code.
template <typename A>
inline A product(A v) {
#if defined(__GNUC__) && defined(__FMA__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (std::is_same_v<A, double>) __asm__("" : "+x"(v));
#endif
  return v;
}

// pairs i0 .. P-1 of one head row
template <typename T, bool INTER, bool CONJ, bool UNIT>
inline void rotate_row(const T* __restrict x, int64_t sd, T* __restrict o,
                       const tab_t<T>* __restrict c, const tab_t<T>* __restrict s, int64_t P,
                       int64_t i0 = 0) {
  using A = acc_t<T>;
  for (int64_t i = i0; i < P; ++i) {
    const int64_t ia = INTER ? 2 * i : i;
    const int64_t ib = INTER ? 2 * i + 1 : i + P;
    const A a = static_cast<A>(UNIT ? x[ia] : x[ia * sd]);
    const A b = static_cast<A>(UNIT ? x[ib] : x[ib * sd]);
    const A cc = static_cast<A>(c[i]);
    const A ss = CONJ ? -static_cast<A>(s[i]) : static_cast<A>(s[i]);
    o[ia] = static_cast<T>(product(a * cc) - product(b * ss));
    o[ib] = static_cast<T>(product(b * cc) + product(a * ss));
  }
}

#ifdef VIDGEN_ROPE_AVX2
// Vector "ISAs": W floats per register, with the loads / stores of T converting exactly as
// static_cast<float> / static_cast<T> do: c10::Half converts with _cvtsh_ss / _cvtss_sh(round to
// nearest even) under F16C (the vector forms give the same bits, NaN included); c10::BFloat16
// (c10::detail::round_to_nearest_even) adds 0x7FFF plus the kept lsb and keeps the high half,
// every NaN becoming 0x7FC0. (x86 is little-endian: a bfloat16 pair is one 32-bit lane, a low.)
struct Avx2 {
  using F = __m256;
  static constexpr int W = 8;
  static inline F load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static inline F load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline void store(c10::Half* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline F load(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // v rounded to bfloat16 in the high 16 bits of each lane (the low bits are left over)
  static inline __m256i bf16_high(F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
  }
  static inline void store(c10::BFloat16* p, F v) {
    const __m256i r = _mm256_srli_epi32(bf16_high(v), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  // bfloat16 pairs (a, b) are 32-bit lanes (a low, b high): W pairs <-> W a's and W b's
  static inline void load_pairs(const c10::BFloat16* p, F& a, F& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
  }
  static inline void store_pairs(c10::BFloat16* p, F a, F b) {
    const __m256i lo = _mm256_srli_epi32(bf16_high(a), 16);
    const __m256i hi = _mm256_and_si256(bf16_high(b), _mm256_set1_epi32(int32_t(0xFFFF0000u)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_or_si256(lo, hi));
  }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static inline F addsub(F a, F b) { return _mm256_addsub_ps(a, b); }  // even a - b, odd a + b
  static inline F swap_pairs(F a) { return _mm256_permute_ps(a, 0xB1); }
  // (c0 c0 c1 c1 ...) from the first / second half of c
  static inline F dup_lo(F c) {
    return _mm256_permutevar8x32_ps(c, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  }
  static inline F dup_hi(F c) {
    return _mm256_permutevar8x32_ps(c, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
  }
};

// float64 rows (float64 tables): 4 pairs a step
struct Avx2d {
  using F = __m256d;
  static constexpr int W = 4;
  static inline F load(const double* p) { return _mm256_loadu_pd(p); }
  static inline void store(double* p, F v) { _mm256_storeu_pd(p, v); }
  static inline F mul(F a, F b) { return _mm256_mul_pd(a, b); }
  static inline F add(F a, F b) { return _mm256_add_pd(a, b); }
  static inline F sub(F a, F b) { return _mm256_sub_pd(a, b); }
  static inline F neg(F a) { return _mm256_xor_pd(a, _mm256_set1_pd(-0.0)); }
  static inline F addsub(F a, F b) { return _mm256_addsub_pd(a, b); }  // even a - b, odd a + b
  static inline F swap_pairs(F a) { return _mm256_permute_pd(a, 0x5); }
  static inline F dup_lo(F c) { return _mm256_permute4x64_pd(c, 0x50); }  // c0 c0 c1 c1
  static inline F dup_hi(F c) { return _mm256_permute4x64_pd(c, 0xFA); }  // c2 c2 c3 c3
};

#ifdef __AVX512F__
#define VIDGEN_ROPE_AVX512 1
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsics (their _mm512_undefined_* sources) warn falsely under -Wall
// (GCC PR 105593); the warning fires where they are inlined, below.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
struct Avx512 {
  using F = __m512;
  static constexpr int W = 16;
  static inline F load(const float* p) { return _mm512_loadu_ps(p); }
  static inline F load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void store(c10::Half* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline F load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline __m512i bf16_high(F v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                 _mm512_set1_epi32(0x7FC00000));
  }
  static inline void store(c10::BFloat16* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high(v), 16)));
  }
  static inline void load_pairs(const c10::BFloat16* p, F& a, F& b) {
    const __m512i v = _mm512_loadu_si512(p);
    a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
  }
  static inline void store_pairs(c10::BFloat16* p, F a, F b) {
    const __m512i lo = _mm512_srli_epi32(bf16_high(a), 16);
    const __m512i hi = _mm512_and_si512(bf16_high(b), _mm512_set1_epi32(int32_t(0xFFFF0000u)));
    _mm512_storeu_si512(p, _mm512_or_si512(lo, hi));
  }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static inline F neg(F a) {
    return _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
  }
};
#endif

// Pairs i, i+1, ... of a unit-stride head row, W per step while W remain; returns the next pair.
// Per pair the same roundings as rotate_row: a*c and b*s each rounded to acc_t, then the sum or
// difference (separate mul / add / sub / addsub: nothing fused, and the pragma keeps the compiler
// from fusing), then one rounding to T.
template <typename I, typename T, bool INTER, bool CONJ>
inline int64_t rotate_steps(const T* __restrict x, T* __restrict o, const tab_t<T>* __restrict c,
                            const tab_t<T>* __restrict s, int64_t P, int64_t i) {
  using F = typename I::F;
  constexpr int W = I::W;
  for (; i + W <= P; i += W) {
    const F cc = I::load(c + i);
    F ss = I::load(s + i);
    if (CONJ) ss = I::neg(ss);  // -s, as the scalar loop negates
    if constexpr (INTER && std::is_same_v<T, c10::BFloat16>) {
      // a bfloat16 pair is one 32-bit lane: a, b split by a shift and a mask, no shuffles
      F a, b;
      I::load_pairs(x + 2 * i, a, b);
      I::store_pairs(o + 2 * i, I::sub(I::mul(a, cc), I::mul(b, ss)),
                     I::add(I::mul(b, cc), I::mul(a, ss)));
    } else if constexpr (INTER) {
      // x[2i .. 2i+2W-1] = (a0 b0 a1 b1 ...): lanes (a, b) times (c, c), swapped lanes (b, a)
      // times (s, s); addsub: even lanes a c - b s, odd lanes b c + a s
      const F x0 = I::load(x + 2 * i), x1 = I::load(x + 2 * i + W);
      const F p0 = I::mul(x0, I::dup_lo(cc)), q0 = I::mul(I::swap_pairs(x0), I::dup_lo(ss));
      const F p1 = I::mul(x1, I::dup_hi(cc)), q1 = I::mul(I::swap_pairs(x1), I::dup_hi(ss));
      I::store(o + 2 * i, I::addsub(p0, q0));
      I::store(o + 2 * i + W, I::addsub(p1, q1));
    } else {
      const F a = I::load(x + i), b = I::load(x + i + P);
      I::store(o + i, I::sub(I::mul(a, cc), I::mul(b, ss)));
      I::store(o + i + P, I::add(I::mul(b, cc), I::mul(a, ss)));
    }
  }
  return i;
}

// A unit-stride head row: 16 pairs a step with AVX-512 (16-bit types), then 8 (4 for float64),
// then the scalar loop.
template <typename T, bool INTER, bool CONJ>
inline void rotate_row_vec(const T* __restrict x, T* __restrict o, const tab_t<T>* __restrict c,
                           const tab_t<T>* __restrict s, int64_t P) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, double>) {
    i = rotate_steps<Avx2d, T, INTER, CONJ>(x, o, c, s, P, i);
  } else {
#ifdef VIDGEN_ROPE_AVX512
    // 512-bit steps where the 16-bit conversions are the work (measured on a Zen 4: bfloat16
    // 10-25 % faster than 256-bit; float32 rows and interleaved float16 rows, whose pairs take
    // shuffles, no faster or slower)
    if constexpr (std::is_same_v<T, c10::BFloat16> || (!INTER && std::is_same_v<T, c10::Half>))
      i = rotate_steps<Avx512, T, INTER, CONJ>(x, o, c, s, P, i);
#endif
    i = rotate_steps<Avx2, T, INTER, CONJ>(x, o, c, s, P, i);
  }
  if (i < P) rotate_row<T, INTER, CONJ, true>(x, 1, o, c, s, P, i);
}
#endif

template <typename T>
inline void copy_row(const T* x, int64_t sd, T* o, int64_t D) {
  if (sd == 1) {
    std::memcpy(o, x, sizeof(T) * D);
  } else {
    for (int64_t d = 0; d < D; ++d) o[d] = x[d * sd];
  }
}

template <typename T, bool INTER, bool CONJ>
void rope_impl(const Tensor& x, const tab_t<T>* cos, const tab_t<T>* sin, T* out,
               at::IntArrayRef out_strides, int64_t L, int64_t offset) {
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t sb = x.stride(0), ss = x.stride(1), sh = x.stride(2), sd = x.stride(3);
  const int64_t P = D / 2;
  const T* xp = static_cast<const T*>(x.data_ptr());
  const int64_t ob = out_strides[0], os = out_strides[1], oh = out_strides[2];
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * D));
  at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tok = begin; tok < end; ++tok) {
      const int64_t b = tok / S, s = tok - b * S;
      const T* xr = xp + b * sb + s * ss;
      T* orow = out + b * ob + s * os;
      const int64_t j = s - offset;
      if (j < 0 || j >= L) {
        for (int64_t h = 0; h < H; ++h) copy_row(xr + h * sh, sd, orow + h * oh, D);
        continue;
      }
      const tab_t<T>* c = cos + j * P;
      const tab_t<T>* sn = sin + j * P;
      for (int64_t h = 0; h < H; ++h) {
        if (sd == 1) {
#ifdef VIDGEN_ROPE_AVX2
          rotate_row_vec<T, INTER, CONJ>(xr + h * sh, orow + h * oh, c, sn, P);
#else
          rotate_row<T, INTER, CONJ, true>(xr + h * sh, 1, orow + h * oh, c, sn, P);
#endif
        } else
          rotate_row<T, INTER, CONJ, false>(xr + h * sh, sd, orow + h * oh, c, sn, P);
      }
    }
  });
}

void check_table(const char* name, const Tensor& t, const Tensor& x) {
  const int64_t P = x.size(3) / 2;
  TORCH_CHECK(t.device() == x.device(), "rope_cpu: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat ||
                  (t.scalar_type() == at::kDouble && x.scalar_type() == at::kDouble),
              "rope_cpu: ", name, " must be float32 (or float64 with float64 x), got ",
              t.scalar_type(), " with x ", x.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == P, "rope_cpu: ", name, " must be [L, D/2] = [L, ", P,
              "], got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "rope_cpu: ", name, " must be contiguous");
}

void rope_cpu(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& out,
              int64_t offset, bool interleaved, bool conj) {
  TORCH_CHECK(x.device().is_cpu(), "rope_cpu: x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4, "rope_cpu: x must be [B, S, H, D], got shape ", x.sizes());
  const int64_t S = x.size(1), D = x.size(3);
  TORCH_CHECK(D >= 2 && D % 2 == 0, "rope_cpu: head dim D must be even and >= 2, got ", D);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "rope_cpu: x must be float32, float16, bfloat16 or float64, got ", st);
  check_table("cos", cos, x);
  check_table("sin", sin, x);
  TORCH_CHECK(cos.size(0) == sin.size(0), "rope_cpu: cos has ", cos.size(0), " rows, sin ",
              sin.size(0));
  const int64_t L = cos.size(0);
  TORCH_CHECK(offset >= 0 && offset + L <= S, "rope_cpu: need 0 <= offset and offset + L <= S, got ",
              "offset=", offset, ", L=", L, ", S=", S);
  const bool out_layout_ok = out.is_non_overlapping_and_dense() && out.stride(3) == 1;
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == st && out.sizes() == x.sizes() &&
                  out_layout_ok,
              "rope_cpu: out must be a dense, non-overlapping CPU tensor with a unit last stride ",
              "(e.g. contiguous [B, S, H, D], or a [B, H, S, D] buffer transposed) of x's shape ",
              x.sizes(), " and dtype ", st, ", got ", out.sizes(), " ", out.scalar_type(),
              " strides ", out.strides());
  at::assert_no_overlap(out, x);
  if (x.numel() == 0) return;
  // float64 x rotates with double tables (a float32 table is widened: L x D/2 values)
  const at::ScalarType tt = st == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor ct = cos.to(tt), stab = sin.to(tt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "rope_cpu", [&] {
    using TT = tab_t<scalar_t>;
    const TT* c = static_cast<const TT*>(ct.data_ptr());
    const TT* s = static_cast<const TT*>(stab.data_ptr());
    scalar_t* o = static_cast<scalar_t*>(out.data_ptr());
    const at::IntArrayRef os_ = out.strides();
    if (interleaved) {
      if (conj) rope_impl<scalar_t, true, true>(x, c, s, o, os_, L, offset);
      else rope_impl<scalar_t, true, false>(x, c, s, o, os_, L, offset);
    } else {
      if (conj) rope_impl<scalar_t, false, true>(x, c, s, o, os_, L, offset);
      else rope_impl<scalar_t, false, false>(x, c, s, o, os_, L, offset);
    }
  });
}

}  // namespace

void register_rope_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("rope_cpu", &rope_cpu,
        "Rotary embedding on CPU, out of place (kernel contract in vidgen_kernels/ops/rope.py).",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("offset"),
        py::arg("interleaved"), py::arg("conj"), py::call_guard<py::gil_scoped_release>());
}
