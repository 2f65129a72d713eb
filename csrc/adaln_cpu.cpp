/*
 * Fused AdaLN modulation: C++ CPU backend (OpenMP through at::parallel_for).
 *
 * Implements the kernel contract documented at the top of vidgen_kernels/ops/adaln.py
 * (kernel_fwd_torch / kernel_bwd_torch there are the same contract in PyTorch):
 *
 *   adaln_fwd_cpu(x, y, gate, shift, scale, weight, bias, out, h, mean, rstd, eps, is_rms)
 *   adaln_bwd_cpu(dout, dh, hx, y, gate, scale, weight, bias, mean, rstd,
 *                 dx, dy, dgate, dshift, dscale, dweight, dbias,
 *                 tpr_gate, tpr_shift, tpr_scale, rows_per_chunk, is_rms)
 *
 * Layout and strategy
 * -------------------
 * - T is x's dtype (a template parameter); the compute type A is float, or double for float64
 *   (so that float64 gradcheck sees double-precision math). The row statistics mean / rstd and
 *   the partial parameter-gradient buffers are stored in A too (float32, float64 for float64
 *   inputs: the backward then normalises with the forward's very statistics).
 * - Inputs [B, N, C] are read in place through (pointer, strides); nothing is made contiguous.
 *   Row (b, n) is C elements with the last-dim stride s2 (any value, 0 included). A row is read
 *   from memory once: used in place when it already is contiguous A (the fast path), else
 *   converted into a thread-local buffer of A. Later passes over the row then hit L1/L2.
 * - Broadcast parameters shift/scale/gate are [Bp, F, C] in dtype T or float32: row (b, n)
 *   reads parameter row (Bp == B ? b : 0, n / (N / F)). Each thread caches the current
 *   parameter row as contiguous A and refreshes it only when that index changes.
 * - Outputs are contiguous and written row by row through write_row(): values are produced in
 *   blocks of kBlock elements and converted to the output dtype. When a call writes more than
 *   about a last-level cache (the outputs could not stay cached anyway), blocks go out with
 *   streaming stores: no read-for-ownership of the destination, so the kernel moves the same
 *   bytes as a copy.
 * - While a row is processed, the next row's contiguous inputs are prefetched (NextRow), so
 *   memory reads overlap the arithmetic and the writes, as in a copy.
 * - Row reductions use kLanes independent partial sums (vectorised, not latency-bound).
 * - Forward: at::parallel_for over the B*N rows; per row: (h = x + gate * y), mean and variance
 *   (two passes over the cached row), out through write_row.
 * - Backward: at::parallel_for over the B*NC (b, chunk) pairs, R = rows_per_chunk rows per
 *   chunk. A task walks its chunk's rows in order; per row, pass 1 computes the two row sums,
 *   pass 2 writes dx and adds the parameter-gradient partials to scratch rows of A, pass 3
 *   writes dy and the per-token parameter gradients. At the end of a chunk the scratch rows are
 *   written to its slots of the partial buffers of A ([B, NC, 2, C] for dgate/dshift/dscale,
 *   [B, NC, C] for dweight/dbias), zeros included.
 */
#include <torch/extension.h>

#include "cpu_common.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>


#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__SSE2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

using namespace vidgen_cpu;

using at::ScalarType;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kBlock = 64;  // elements per staged output block
constexpr int kLanes = 32;      // independent partial sums of a row reduction

template <typename T>
using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

template <typename A>
constexpr ScalarType acc_dtype() {
  return std::is_same<A, double>::value ? ScalarType::Double : ScalarType::Float;
}

// The dtype of the row statistics and of the partial gradient buffers for inputs of dtype T:
// acc_t<T>'s (float64 for float64, else float32).
inline ScalarType acc_dtype_of(ScalarType T) {
  return T == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// Calls f(T{}) with T the C++ type of dtype st (one of the four float dtypes).
template <typename F>
void dispatch_float(ScalarType st, const F& f) {
  switch (st) {
    case ScalarType::Float: return f(float{});
    case ScalarType::Double: return f(double{});
    case ScalarType::Half: return f(c10::Half{});
    case ScalarType::BFloat16: return f(c10::BFloat16{});
    default: TORCH_INTERNAL_ASSERT(false, "adaln_cpu: unexpected dtype ", st);
  }
}

// =============================================================================================
// Conversions: strided row of S -> contiguous A, contiguous A -> contiguous D
// =============================================================================================
template <typename A> inline A to_acc(float v) { return A(v); }
template <typename A> inline A to_acc(double v) { return A(v); }
template <typename A> inline A to_acc(c10::Half v) { return A(static_cast<float>(v)); }
template <typename A> inline A to_acc(c10::BFloat16 v) { return A(bf16_bits_to_float(v.x)); }

template <typename D, typename A> inline D from_acc(A v) { return D(v); }
template <> inline c10::Half from_acc<c10::Half, float>(float v) { return c10::Half(v); }
template <> inline c10::Half from_acc<c10::Half, double>(double v) { return c10::Half(float(v)); }
template <> inline c10::BFloat16 from_acc<c10::BFloat16, float>(float v) {
  return c10::BFloat16(float_to_bf16_bits(v), c10::BFloat16::from_bits());
}
template <> inline c10::BFloat16 from_acc<c10::BFloat16, double>(double v) {
  return from_acc<c10::BFloat16, float>(float(v));
}

template <typename A, typename S>
void load_typed(const S* src, int64_t stride, int64_t n, A* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_acc<A>(src[i]);
  } else {  // generic strided path (stride 0 included)
    for (int64_t i = 0; i < n; ++i) dst[i] = to_acc<A>(src[i * stride]);
  }
}

template <typename A, typename D>
void store_typed(const A* src, int64_t n, D* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_acc<D, A>(src[i]);
}

// bfloat16 <-> float on raw bits, so that the loops vectorise.
template <>
void load_typed<float, c10::BFloat16>(const c10::BFloat16* src, int64_t stride, int64_t n,
                                      float* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i * stride]);
  }
}

template <>
void store_typed<float, c10::BFloat16>(const float* src, int64_t n, c10::BFloat16* dst) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(src[i]);
}

#ifdef __F16C__
// float16 <-> float with F16C, 8 lanes at a time.
template <>
void load_typed<float, c10::Half>(const c10::Half* src, int64_t stride, int64_t n, float* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = _cvtsh_ss(s[i * stride]);
    return;
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
}

template <>
void store_typed<float, c10::Half>(const float* src, int64_t n, c10::Half* dst) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

// Row of runtime dtype st (the parameters, which are T or float32) -> contiguous A.
template <typename A>
void load_row(const void* src, ScalarType st, int64_t stride, int64_t n, A* dst) {
  dispatch_float(st, [&](auto tag) {
    using S = decltype(tag);
    load_typed<A>(static_cast<const S*>(src), stride, n, dst);
  });
}

// The row as contiguous A: in place when it already is (fast path), else converted into buf.
template <typename A, typename S>
const A* view_typed(const S* src, int64_t stride, int64_t n, A* buf) {
  if constexpr (std::is_same<S, A>::value) {
    if (stride == 1) return src;
  }
  load_typed<A>(src, stride, n, buf);
  return buf;
}

template <typename A>
const A* view_row(const void* src, ScalarType st, int64_t stride, int64_t n, A* buf) {
  if (st == acc_dtype<A>() && stride == 1) return static_cast<const A*>(src);
  load_row<A>(src, st, stride, n, buf);
  return buf;
}

// Rounds a row of A to T's precision in place (the gated h is normalised after rounding).
// o[c] = x[c] + g[c] * y[c] with the product and the sum each rounded (no FMA contraction, which
// GCC applies by default): the gated h equals eager PyTorch's x + gate * y bit for bit. o may
// alias x. Not inlined (the attribute differs from the caller's); one call per row.
template <typename A>
#if defined(__clang__)
void add_product_row(A* o, const A* x, const A* g, const A* y, int64_t C) {
#pragma clang fp contract(off)
#elif defined(__GNUC__)
__attribute__((optimize("fp-contract=off"))) void add_product_row(A* o, const A* x, const A* g,
                                                                   const A* y, int64_t C) {
#else
void add_product_row(A* o, const A* x, const A* g, const A* y, int64_t C) {
#endif
  for (int64_t c = 0; c < C; ++c) o[c] = x[c] + g[c] * y[c];
}

template <typename T, typename A>
void round_to(A* v, int64_t n) {
  if constexpr (!std::is_same<T, A>::value && !std::is_same<T, float>::value) {
    T tb[kBlock];
    for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
      const int64_t len = std::min(kBlock, n - c0);
      store_typed<A, T>(v + c0, len, tb);
      load_typed<A, T>(tb, 1, len, v + c0);
    }
  }
}

// =============================================================================================
// Row writer and reductions
// =============================================================================================
// Inputs of the next row, prefetched block by block while the current row is processed, so
// that the memory reads of row r + 1 overlap the work and the (streamed) writes of row r.
// Contiguous rows only (a strided row spans too many cache lines to be worth it).
struct NextRow {
  static constexpr int kMax = 4;
  const char* p[kMax] = {};
  int64_t esz[kMax] = {};
  int count = 0;
  void add(const void* row, int64_t stride, int64_t elem_size) {
    if (stride != 1 || count == kMax) return;
    p[count] = static_cast<const char*>(row);
    esz[count++] = elem_size;
  }
  void block(int64_t c0, int64_t len) const {
    for (int i = 0; i < count; ++i)
      for (int64_t off = c0 * esz[i]; off < (c0 + len) * esz[i]; off += 64)
        __builtin_prefetch(p[i] + off, 0, 3);
  }
};

// Writes the contiguous row dst[0, C) of D. fill(o, c0, len) computes elements c0 .. c0+len-1
// into o[0, len) (type A). Without `stream` and with D == A the row is computed in place;
// otherwise it is staged in blocks of kBlock, converted to D and stored (streaming stores, with
// the blocks aligned to dst's cache lines, when `stream`), prefetching `next` as it goes.
template <typename D, typename A, typename Fill>
inline void write_row(D* dst, int64_t C, bool stream, const Fill& fill,
                      const NextRow* next = nullptr) {
  if constexpr (std::is_same<D, A>::value) {
    if (!stream) return fill(dst, 0, C);
  }
  alignas(64) A blk[kBlock];
  alignas(64) D tb[kBlock];
  int64_t c0 = 0;
  while (c0 < C) {
    int64_t len = std::min(kBlock, C - c0);
    if (stream && c0 == 0) {  // a first short block up to dst's next 64-byte boundary
      const int64_t mis = int64_t((-reinterpret_cast<uintptr_t>(dst)) & 63) / int64_t(sizeof(D));
      if (mis > 0) len = std::min(len, mis);
    }
    if (next) next->block(c0, len);
    if (len == kBlock) fill(blk, c0, kBlock);  // constant trip count: fully unrolled
    else fill(blk, c0, len);
    if (!stream) {  // (D != A here: D == A without streaming was computed in place above)
      store_typed<A, D>(blk, len, dst + c0);
    } else {
      const D* src;
      if constexpr (std::is_same<D, A>::value) {
        src = blk;
      } else {
        store_typed<A, D>(blk, len, tb);
        src = tb;
      }
      if (len == kBlock) stream_bytes(dst + c0, src, kBlock * sizeof(D));
      else stream_bytes(dst + c0, src, len * sizeof(D));
    }
    c0 += len;
  }
}

// write_row for an output whose dtype is only known at run time (per-token parameter grads).
template <typename A, typename Fill>
void write_row_any(void* dst, ScalarType st, int64_t C, bool stream, const Fill& fill) {
  dispatch_float(st, [&](auto tag) {
    using D = decltype(tag);
    write_row<D, A>(static_cast<D*>(dst), C, stream, fill);
  });
}

// sum_{c < n} f(c) with kLanes independent partial sums, so that the adds vectorise and pipeline.
template <typename A, typename F>
inline A row_sum(int64_t n, const F& f) {
  A part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += f(c + j);
  A s = 0;
  for (; c < n; ++c) s += f(c);
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

// float rows: sum of f(v[c]) over [0, n) with four 8-float vector accumulators and one
// horizontal sum at the end; f takes whole vectors (vf) and the scalar tail (float) alike.
// row_sum's kLanes scalar partials cost a serial chain of kLanes adds per sum, which dominated
// short rows (C = 64: the per-head QK norm).
template <typename F>
inline float vsum_f32(const float* v, int64_t n, const F& f) {
  vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t c = 0;
  for (; c + 4 * kW <= n; c += 4 * kW) {
    a0 += f(vload(v + c));
    a1 += f(vload(v + c + kW));
    a2 += f(vload(v + c + 2 * kW));
    a3 += f(vload(v + c + 3 * kW));
  }
  for (; c + kW <= n; c += kW) a0 += f(vload(v + c));
  float t = 0;
  for (; c < n; ++c) t += f(v[c]);
  return hsum((a0 + a1) + (a2 + a3)) + t;
}

// LayerNorm's statistics, two passes: m = mean(v), then var = mean((v - m)^2). Where the row is
// dominated by its mean (var < m^2 / 256), the rounding of m (a few ulp of |m|) is no longer
// small next to the spread: there a third pass sums the deviations s = sum(v - m) and corrects
// (Chan, Golub & LeVeque's corrected two-pass algorithm), mu = m + s / n, var -= (s / n)^2. A row
// of one value v then gives mu = v and var = 0 exactly (uncorrected, an m a few ulp off v came
// back amplified by 1 / sqrt(eps): 0.03 .. 1 in the output at C = 1152 .. 4097, where the
// reference gives 0). Other rows skip the pass (it cost 10-25 % of the forward when run on all).
constexpr float kMeanDominated = 1.f / 256.f;

// The caller has set mu = m; this corrects mu and var where the row is mean-dominated.
template <typename A, typename SumDev>
inline void correct_mean(A m, A inv_c, A& mu, A& var, const SumDev& sum_dev) {
  if (var < m * m * A(kMeanDominated)) {  // (false for a NaN / inf m)
    const A corr = sum_dev() * inv_c;
    mu = m + corr;
    var = std::max(var - corr * corr, A(0));
  }
}

// float rows: mean and variance (about mu; mu = 0 for RMS) of v[0, n).
inline void row_stats_f32(const float* v, int64_t n, bool is_rms, float inv_c, float& mu,
                          float& var) {
  const float m = is_rms ? 0.f : vsum_f32(v, n, [](auto x) { return x; }) * inv_c;
  var = vsum_f32(v, n, [m](auto x) {
    const auto d = x - m;
    return d * d;
  }) * inv_c;
  mu = m;
  if (!is_rms)
    correct_mean(m, inv_c, mu, var, [&] { return vsum_f32(v, n, [m](auto x) { return x - m; }); });
}

// =============================================================================================
// Tensor descriptors
// =============================================================================================
// A [B, N, C] tensor (or a [Bp, F, C] parameter) addressed row by row; `on` is false for None.
struct Rows {
  char* p = nullptr;
  ScalarType st = ScalarType::Float;
  int64_t esz = 0, s0 = 0, s1 = 0, s2 = 0;
  bool on = false;
  Rows() = default;
  explicit Rows(const at::Tensor& t)
      : p(static_cast<char*>(t.data_ptr())), st(t.scalar_type()), esz(t.element_size()),
        s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), on(true) {}
  explicit Rows(const OptTensor& t) : Rows() {
    if (t.has_value()) *this = Rows(*t);
  }
  void* row(int64_t b, int64_t n) const { return p + (b * s0 + n * s1) * esz; }
  template <typename T>
  T* row(int64_t b, int64_t n) const { return static_cast<T*>(row(b, n)); }
};

// A broadcast parameter [Bp, F, C]: token n of batch b reads row (Bp == B ? b : 0, n / tpr).
struct Param {
  Rows r;
  int64_t F = 1, tpr = 1;
  bool bcast_b = true;
  Param() = default;
  Param(const OptTensor& t, int64_t N) : r(t) {
    if (!r.on) return;
    F = t->size(1);
    tpr = N / F;
    bcast_b = t->size(0) == 1;
  }
  // (F == 1 and tpr == 1, the common forms, skip the division: short rows pay it per row)
  int64_t row_of(int64_t n) const { return F == 1 ? 0 : (tpr == 1 ? n : n / tpr); }
  int64_t index(int64_t b, int64_t n) const { return (bcast_b ? 0 : b) * F + row_of(n); }
};

// Thread-local cache of the current row of a Param as contiguous A.
template <typename A>
struct ParamCache {
  const Param* p;
  std::vector<A> buf;
  int64_t key = -1;
  const A* row = nullptr;
  ParamCache(const Param& prm, int64_t C) : p(&prm), buf(prm.r.on ? C : 0) {}
  // Points `row` at the parameter row of token (b, n); returns true when it changed.
  bool fetch(int64_t b, int64_t n) {
    const int64_t k = p->index(b, n);
    if (k == key) return false;
    key = k;
    const int64_t bb = p->bcast_b ? 0 : b, f = p->row_of(n);
    row = view_row<A>(p->r.row(bb, f), p->r.st, p->r.s2, int64_t(buf.size()), buf.data());
    return true;
  }
};

// weight / bias [C] (any stride, dtype T or float32) -> A vector; `fill` when absent.
template <typename A>
std::vector<A> affine_vector(const OptTensor& t, int64_t C, A fill) {
  std::vector<A> v(C, fill);
  if (t.has_value()) load_row<A>(t->data_ptr(), t->scalar_type(), t->stride(0), C, v.data());
  return v;
}

// =============================================================================================
// Forward
// =============================================================================================
struct FwdArgs {
  int64_t B, N, C;
  Rows x, y, out, h;
  Param gate, shift, scale;
  OptTensor weight, bias;
  void* mean;  // [B, N] contiguous acc_t<T>
  void* rstd;
  double eps;
  bool is_rms;
};

template <typename T>
void fwd_impl(const FwdArgs& a) {
  using A = acc_t<T>;
  const int64_t B = a.B, N = a.N, C = a.C;
  const bool gated = a.y.on;
  const std::vector<A> w = affine_vector<A>(a.weight, C, A(1));
  const std::vector<A> bv = affine_vector<A>(a.bias, C, A(0));
  const A eps = A(a.eps), inv_c = A(1) / A(C);
  A* const mean = static_cast<A*>(a.mean);
  A* const rstd = static_cast<A*>(a.rstd);
  const bool stream = (gated ? 2 : 1) * B * N * C * int64_t(sizeof(T)) >= stream_threshold_bytes();
  const int64_t grain = std::max<int64_t>(1, 16384 / C);

  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    // Thread-local rows: h (x, or x + gate * y), y, and the folded coefficients of the current
    // parameter rows ca = w * (1 + scale), cb = b * (1 + scale) + shift.
    std::vector<A> hbuf(C), ybuf(gated ? C : 0), ca(C), cb(C);
    ParamCache<A> scale(a.scale, C), shift(a.shift, C), gate(a.gate, C);
    A* hb = hbuf.data();
    A* cav = ca.data();
    A* cbv = cb.data();
    const A* wv = w.data();
    const A* bvv = bv.data();

    int64_t b = begin / N, n = begin % N;  // row r = b * N + n, advanced without divisions
    for (int64_t r = begin; r < end; ++r, n = (n + 1 == N) ? (++b, 0) : n + 1) {
      const A* hx = view_typed<A>(a.x.row<const T>(b, n), a.x.s2, C, hb);
      if (gated) {  // h = round_T(x + gate * y); the rounded h is what gets normalised
        const A* yv = view_typed<A>(a.y.row<const T>(b, n), a.y.s2, C, ybuf.data());
        gate.fetch(b, n);
        const A* g = gate.row;
        add_product_row<A>(hb, hx, g, yv, C);
        round_to<T, A>(hb, C);
        write_row<T, A>(a.h.row<T>(b, n), C, stream, [&](A* o, int64_t c0, int64_t len) {
          std::copy(hb + c0, hb + c0 + len, o);
        });
        hx = hb;
      }

      // Row statistics: two passes over the (cached) row.
      A mu, var;
      if constexpr (std::is_same<A, float>::value) {
        row_stats_f32(hx, C, a.is_rms, inv_c, mu, var);
      } else {
        const A m = a.is_rms ? A(0) : row_sum<A>(C, [&](int64_t c) { return hx[c]; }) * inv_c;
        var = row_sum<A>(C, [&](int64_t c) {
          const A d = hx[c] - m;
          return d * d;
        }) * inv_c;
        mu = m;
        if (!a.is_rms)
          correct_mean(m, inv_c, mu, var,
                       [&] { return row_sum<A>(C, [&](int64_t c) { return hx[c] - m; }); });
      }
      const A rs = A(1) / std::sqrt(var + eps);
      mean[r] = mu;
      rstd[r] = rs;

      // Coefficients, recomputed only when the scale or shift row changes.
      const bool new_scale = scale.fetch(b, n);
      const bool new_shift = shift.fetch(b, n);
      if (new_scale || new_shift) {
        const A* s = scale.row;
        const A* t = shift.row;
        for (int64_t c = 0; c < C; ++c) {
          const A s1 = A(1) + s[c];
          cav[c] = wv[c] * s1;
          cbv[c] = bvv[c] * s1 + t[c];
        }
      }

      NextRow next;
      if (r + 1 < end) {
        const int64_t b1 = n + 1 == N ? b + 1 : b, n1 = n + 1 == N ? 0 : n + 1;
        next.add(a.x.row(b1, n1), a.x.s2, a.x.esz);
        if (gated) next.add(a.y.row(b1, n1), a.y.s2, a.y.esz);
      }
      // out = ((h - mu) * rstd * w + b) * (1 + scale) + shift
      write_row<T, A>(a.out.row<T>(b, n), C, stream, [&](A* o, int64_t c0, int64_t len) {
        const A* hv = hx + c0;
        const A* p = cav + c0;
        const A* q = cbv + c0;
        for (int64_t j = 0; j < len; ++j) o[j] = (hv[j] - mu) * rs * p[j] + q[j];
      }, &next);
    }
    if (stream) stream_fence();
  });
}

// =============================================================================================
// Backward
// =============================================================================================
// A parameter-gradient output: None, per-token [B, N, C] (any float dtype), or partials of A
// [B, NC, slots, C] (slots = 2 for dgate/dshift/dscale, 1 for dweight/dbias).
struct GradOut {
  enum Kind { kNone, kPerToken, kPartial } kind = kNone;
  char* p = nullptr;
  ScalarType st = ScalarType::Float;
  int64_t esz = 0, tpr = 1, slots = 1;
  GradOut() = default;
  GradOut(const OptTensor& t, int64_t tpr_, int64_t slots_) : tpr(tpr_), slots(slots_) {
    if (!t.has_value()) return;
    p = static_cast<char*>(t->data_ptr());
    st = t->scalar_type();
    esz = t->element_size();
    kind = (t->dim() == 3 && slots_ == 2) ? kPerToken : kPartial;
  }
  bool on() const { return kind != kNone; }
  bool partial() const { return kind == kPartial; }
  bool per_token() const { return kind == kPerToken; }
};

struct BwdArgs {
  int64_t B, N, C, R, NC;
  Rows dout, dh, hx, y, dx, dy;
  Param gate, scale;
  OptTensor weight, bias;
  const void* mean;  // [B, N] acc_t<T>, any strides
  const void* rstd;
  int64_t ms0, ms1, rs0, rs1;  // strides of mean / rstd (read in place)
  GradOut dgate, dshift, dscale, dweight, dbias;
  bool is_rms;
};

// Pass 1 of a backward row. With xhat = (h - mu) * rstd, dn = dout * (1 + scale) and
// dxhat = dn * w (kAffine): stores dxhat and returns s1 = sum(dxhat), s2 = sum(dxhat * xhat)
// (kLanes / 2 partial sums each, so that they stay in registers), prefetching `next` as it goes.
// dxhat is stored so that dx uses the very values summed here (with C = 1 the layer-norm dx is
// then exactly 0); xhat is cheaper to recompute than to store and re-read.
template <typename A, bool kAffine>
void bwd_row_sums(int64_t C, const A* __restrict hv, const A* __restrict dov,
                  const A* __restrict s, const A* __restrict w, A mu, A rs, A* __restrict dxh,
                  const NextRow& next, A& s1, A& s2) {
  constexpr int L = kLanes / 2;
  A p1[L] = {}, p2[L] = {};
  auto body = [&](int64_t c, A& q1, A& q2) {
    const A xh = (hv[c] - mu) * rs;
    const A d = dov[c] * (A(1) + s[c]);
    const A e = kAffine ? d * w[c] : d;
    dxh[c] = e;
    q1 += e;
    q2 += e * xh;
  };
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    next.block(c, L);
    for (int j = 0; j < L; ++j) body(c + j, p1[j], p2[j]);
  }
  A t1 = 0, t2 = 0;
  for (; c < C; ++c) body(c, t1, t2);
  for (int j = 0; j < L; ++j) {
    t1 += p1[j];
    t2 += p2[j];
  }
  s1 = t1;
  s2 = t2;
}

// float rows: bwd_row_sums with 8-float vector accumulators (two per sum) and tree reductions.
template <bool kAffine>
void bwd_row_sums_f32(int64_t C, const float* __restrict hv, const float* __restrict dov,
                      const float* __restrict s, const float* __restrict w, float mu, float rs,
                      float* __restrict dxh, const NextRow& next, float& s1, float& s2) {
  const vf muv = vset1(mu), rsv = vset1(rs), one = vset1(1.f);
  vf p1a = {}, p1b = {}, p2a = {}, p2b = {};
  auto body = [&](int64_t c, vf& q1, vf& q2) {
    const vf xh = (vload(hv + c) - muv) * rsv;
    const vf d = vload(dov + c) * (one + vload(s + c));
    const vf e = kAffine ? d * vload(w + c) : d;
    vstore(dxh + c, e);
    q1 += e;
    q2 += e * xh;
  };
  int64_t c = 0;
  for (; c + 2 * kW <= C; c += 2 * kW) {
    next.block(c, 2 * kW);
    body(c, p1a, p2a);
    body(c + kW, p1b, p2b);
  }
  for (; c + kW <= C; c += kW) body(c, p1a, p2a);
  float t1 = 0, t2 = 0;
  for (; c < C; ++c) {
    const float xh = (hv[c] - mu) * rs;
    const float d = dov[c] * (1.f + s[c]);
    const float e = kAffine ? d * w[c] : d;
    dxh[c] = e;
    t1 += e;
    t2 += e * xh;
  }
  s1 = hsum(p1a + p1b) + t1;
  s2 = hsum(p2a + p2b) + t2;
}

template <typename T>
void bwd_impl(const BwdArgs& a) {
  using A = acc_t<T>;
  const int64_t B = a.B, N = a.N, C = a.C, R = a.R, NC = a.NC;
  const bool affine = a.weight.has_value();
  const std::vector<A> w = affine_vector<A>(a.weight, C, A(1));
  const std::vector<A> bv = affine_vector<A>(a.bias, C, A(0));
  const A inv_c = A(1) / A(C);
  const A* const mean = static_cast<const A*>(a.mean);
  const A* const rstd = static_cast<const A*>(a.rstd);
  const bool keep_g = a.dy.on || a.dgate.per_token();  // g kept in a row for pass 3
  int64_t written = (a.dy.on ? 2 : 1) * int64_t(sizeof(T));
  for (const GradOut* g : {&a.dgate, &a.dshift, &a.dscale})
    if (g->per_token()) written += g->esz;
  const bool stream = B * N * C * written >= stream_threshold_bytes();

  // Small calls run on the calling thread: waking the pool costs more than their work.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, R * C));
  at::parallel_for(0, B * NC, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> hbuf(C), dobuf(C), dxhbuf(C), gbuf(keep_g ? C : 0), ybuf(C), dhbuf(C);
    // Partial-sum scratch rows, flushed to the partial buffers (of A) at each chunk's end.
    const GradOut* gouts[] = {&a.dgate, &a.dshift, &a.dscale, &a.dweight, &a.dbias};
    std::vector<A> accs[5];
    for (int i = 0; i < 5; ++i) accs[i].resize(gouts[i]->partial() ? gouts[i]->slots * C : 0);
    ParamCache<A> scale(a.scale, C), gate(a.gate, C);
    const A* wv = w.data();
    const A* bvv = bv.data();
    A* dxhv = dxhbuf.data();
    A* gb = gbuf.data();

    // The scratch row that row n (of the chunk starting at n0) adds to, for partial i.
    auto slot = [&](int i, int64_t n, int64_t n0) -> A* {
      if (!gouts[i]->partial()) return nullptr;
      const int64_t tpr = gouts[i]->tpr;
      return accs[i].data() + (gouts[i]->slots == 2 ? (n / tpr - n0 / tpr) * C : 0);
    };
    auto per_token_row = [&](const GradOut& g, int64_t b, int64_t n) {
      return static_cast<void*>(g.p + ((b * N + n) * C) * g.esz);
    };

    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / NC, chunk = t % NC;
      const int64_t n0 = chunk * R, n1 = std::min(n0 + R, N);
      for (auto& acc : accs) std::fill(acc.begin(), acc.end(), A(0));

      for (int64_t n = n0; n < n1; ++n) {
        const A mu = mean[b * a.ms0 + n * a.ms1];
        const A rs = rstd[b * a.rs0 + n * a.rs1];
        const A* hv = view_typed<A>(a.hx.row<const T>(b, n), a.hx.s2, C, hbuf.data());
        const A* dov = view_typed<A>(a.dout.row<const T>(b, n), a.dout.s2, C, dobuf.data());
        scale.fetch(b, n);
        const A* s = scale.row;
        if (a.dy.on || a.dgate.on()) gate.fetch(b, n);
        const A* yv = a.dgate.on()
            ? view_typed<A>(a.y.row<const T>(b, n), a.y.s2, C, ybuf.data()) : nullptr;
        const A* dhv = a.dh.on
            ? view_typed<A>(a.dh.row<const T>(b, n), a.dh.s2, C, dhbuf.data()) : nullptr;

        // The next row in (b, n) order (this chunk's, or the next task's first) is prefetched
        // while this one is processed: hx and dh during pass 1, dout and y during pass 2.
        NextRow next1, next2;
        if (b * N + n + 1 < B * N) {
          const int64_t b1 = n + 1 == N ? b + 1 : b, nn = n + 1 == N ? 0 : n + 1;
          for (const Rows* in : {&a.hx, &a.dh})
            if (in->on) next1.add(in->row(b1, nn), in->s2, in->esz);
          for (const Rows* in : {&a.dout, a.dgate.on() ? &a.y : nullptr})
            if (in && in->on) next2.add(in->row(b1, nn), in->s2, in->esz);
        }

        // Pass 1: dxhat and the two row sums.
        A s1, s2;
        if constexpr (std::is_same<A, float>::value) {
          if (affine) bwd_row_sums_f32<true>(C, hv, dov, s, wv, mu, rs, dxhv, next1, s1, s2);
          else bwd_row_sums_f32<false>(C, hv, dov, s, wv, mu, rs, dxhv, next1, s1, s2);
        } else {
          if (affine) bwd_row_sums<A, true>(C, hv, dov, s, wv, mu, rs, dxhv, next1, s1, s2);
          else bwd_row_sums<A, false>(C, hv, dov, s, wv, mu, rs, dxhv, next1, s1, s2);
        }
        const A m1 = a.is_rms ? A(0) : s1 * inv_c, m2 = s2 * inv_c;

        // Pass 2, block by block: g = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        // (+ dh) -> dx, and the partial sums (while the block's inputs are in L1; this pass
        // mostly waits on memory, so the arithmetic comes almost free).
        A* p_gate = slot(0, n, n0);
        A* p_shift = slot(1, n, n0);
        A* p_scale = slot(2, n, n0);
        A* p_w = slot(3, n, n0);
        A* p_b = slot(4, n, n0);
        write_row<T, A>(a.dx.row<T>(b, n), C, stream, [&](A* o_, int64_t c0, int64_t len) {
          // Locals (not the closure's references): a store through an A* could alias a captured
          // A such as mu or rs, which would keep these loops scalar, reloading them per element.
          const A mu_ = mu, rs_ = rs, m1_ = m1, m2_ = m2;
          A* __restrict o = o_;
          const A* __restrict h = hv + c0;
          const A* __restrict e = dxhv + c0;
          const A* __restrict d = dov + c0;
          const A* __restrict sc = s + c0;
          for (int64_t j = 0; j < len; ++j) o[j] = rs_ * (e[j] - m1_ - (h[j] - mu_) * rs_ * m2_);
          if (dhv) {
            const A* __restrict dhp = dhv + c0;
            for (int64_t j = 0; j < len; ++j) o[j] += dhp[j];
          }
          if (keep_g) std::copy(o, o + len, gb + c0);
          if (p_gate) {  // dgate += g * y
            A* __restrict pg = p_gate + c0;
            const A* __restrict yp = yv + c0;
            for (int64_t j = 0; j < len; ++j) pg[j] += o[j] * yp[j];
          }
          if (p_shift) {  // dshift += dout
            A* __restrict ps = p_shift + c0;
            for (int64_t j = 0; j < len; ++j) ps[j] += d[j];
          }
          if (p_scale) {  // dscale += dout * (xhat * w + b)
            A* __restrict pc = p_scale + c0;
            const A* __restrict wp = wv + c0;
            const A* __restrict bp = bvv + c0;
            for (int64_t j = 0; j < len; ++j) pc[j] += d[j] * ((h[j] - mu_) * rs_ * wp[j] + bp[j]);
          }
          if (p_w && p_b) {  // both in one pass over d, sc and h
            A* __restrict pw = p_w + c0;
            A* __restrict pb = p_b + c0;
            for (int64_t j = 0; j < len; ++j) {
              const A dn = d[j] * (A(1) + sc[j]);
              pw[j] += dn * ((h[j] - mu_) * rs_);
              pb[j] += dn;
            }
          } else if (p_w) {  // dweight += dn * xhat
            A* __restrict pw = p_w + c0;
            for (int64_t j = 0; j < len; ++j) pw[j] += d[j] * (A(1) + sc[j]) * ((h[j] - mu_) * rs_);
          } else if (p_b) {  // dbias += dn
            A* __restrict pb = p_b + c0;
            for (int64_t j = 0; j < len; ++j) pb[j] += d[j] * (A(1) + sc[j]);
          }
        }, &next2);

        // Pass 3 (as needed): dy and the per-token parameter gradients.
        if (a.dy.on) {  // dy = g * gate
          const A* gv = gate.row;
          write_row<T, A>(a.dy.row<T>(b, n), C, stream, [&](A* o, int64_t c0, int64_t len) {
            for (int64_t j = 0; j < len; ++j) o[j] = gb[c0 + j] * gv[c0 + j];
          });
        }
        if (a.dgate.per_token()) {  // dgate = g * y
          write_row_any<A>(per_token_row(a.dgate, b, n), a.dgate.st, C, stream,
                           [&](A* o, int64_t c0, int64_t len) {
                             for (int64_t j = 0; j < len; ++j) o[j] = gb[c0 + j] * yv[c0 + j];
                           });
        }
        if (a.dshift.per_token()) {  // dshift = dout
          write_row_any<A>(per_token_row(a.dshift, b, n), a.dshift.st, C, stream,
                           [&](A* o, int64_t c0, int64_t len) {
                             std::copy(dov + c0, dov + c0 + len, o);
                           });
        }
        if (a.dscale.per_token()) {  // dscale = dout * (xhat * w + b)
          write_row_any<A>(per_token_row(a.dscale, b, n), a.dscale.st, C, stream,
                           [&](A* o, int64_t c0, int64_t len) {
                             for (int64_t j = 0; j < len; ++j) {
                               const int64_t c = c0 + j;
                               o[j] = dov[c] * ((hv[c] - mu) * rs * wv[c] + bvv[c]);
                             }
                           });
        }
      }

      // Flush this (b, chunk)'s partial slots (every slot, zeros included).
      for (int i = 0; i < 5; ++i) {
        if (!gouts[i]->partial()) continue;
        const int64_t len = gouts[i]->slots * C;
        A* dst = reinterpret_cast<A*>(gouts[i]->p) + (b * NC + chunk) * len;
        std::copy(accs[i].begin(), accs[i].end(), dst);
      }
    }
    if (stream) stream_fence();
  });
}

// =============================================================================================
// Argument checks (cheap: devices, ranks, shapes, dtypes, output contiguity)
// =============================================================================================
bool is_float_dtype(ScalarType st) {
  return st == ScalarType::Float || st == ScalarType::Double || st == ScalarType::Half ||
         st == ScalarType::BFloat16;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "adaln_cpu: ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "adaln_cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, "adaln_cpu: ", name, " must be a strided tensor");
}

// [B, N, C] of dtype T (any strides unless `contiguous`).
void check_bnc(const at::Tensor& t, const char* name, int64_t B, int64_t N, int64_t C,
               ScalarType T, bool contiguous) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == N && t.size(2) == C, "adaln_cpu: ",
              name, " must be [", B, ", ", N, ", ", C, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == T, "adaln_cpu: ", name, " must have dtype ", T, ", got ",
              t.scalar_type());
  TORCH_CHECK(!contiguous || t.is_contiguous(), "adaln_cpu: ", name, " must be contiguous");
}

// [Bp, F, C] with Bp in {1, B}, F dividing N, dtype T or float32.
void check_param(const at::Tensor& t, const char* name, int64_t B, int64_t N, int64_t C,
                 ScalarType T) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 3 && (t.size(0) == 1 || t.size(0) == B) && t.size(1) >= 1 &&
                  N % t.size(1) == 0 && t.size(2) == C,
              "adaln_cpu: ", name, " must be [Bp, F, C] with Bp in {1, ", B, "}, F dividing ", N,
              ", C = ", C, "; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == T || t.scalar_type() == ScalarType::Float, "adaln_cpu: ", name,
              " must have dtype ", T, " or float32, got ", t.scalar_type());
}

void check_affine(const OptTensor& t, const char* name, int64_t C, ScalarType T) {
  if (!t.has_value()) return;
  check_cpu(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "adaln_cpu: ", name, " must be [", C, "], got ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == T || t->scalar_type() == ScalarType::Float, "adaln_cpu: ",
              name, " must have dtype ", T, " or float32, got ", t->scalar_type());
}

// mean / rstd: [B, N] of acc_dtype_of(T) (float64 for float64 inputs, else float32).
void check_stats(const at::Tensor& t, const char* name, int64_t B, int64_t N, ScalarType T,
                 bool contiguous) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == N, "adaln_cpu: ", name, " must be [",
              B, ", ", N, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc_dtype_of(T), "adaln_cpu: ", name, " must be ",
              acc_dtype_of(T), " for inputs of dtype ", T, ", got ", t.scalar_type());
  TORCH_CHECK(!contiguous || t.is_contiguous(), "adaln_cpu: ", name, " must be contiguous");
}

// A dgate / dshift / dscale buffer: per-token [B, N, C] contiguous (any float dtype) or partial
// [B, NC, 2, C] contiguous acc_dtype_of(T) with rows_per_chunk <= tpr.
void check_param_grad(const OptTensor& t, const char* name, int64_t B, int64_t N, int64_t C,
                      int64_t NC, int64_t R, int64_t tpr, ScalarType T) {
  if (!t.has_value()) return;
  check_cpu(*t, name);
  TORCH_CHECK(t->is_contiguous(), "adaln_cpu: ", name, " must be contiguous");
  if (t->dim() == 3) {
    TORCH_CHECK(t->size(0) == B && t->size(1) == N && t->size(2) == C, "adaln_cpu: ", name,
                " (per-token) must be [", B, ", ", N, ", ", C, "], got ", t->sizes());
    TORCH_CHECK(is_float_dtype(t->scalar_type()), "adaln_cpu: ", name,
                " must be a floating tensor, got ", t->scalar_type());
  } else {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == NC && t->size(2) == 2 &&
                    t->size(3) == C,
                "adaln_cpu: ", name, " (partial) must be [", B, ", ", NC, ", 2, ", C, "], got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == acc_dtype_of(T), "adaln_cpu: ", name, " (partial) must be ",
                acc_dtype_of(T), " for inputs of dtype ", T, ", got ", t->scalar_type());
    TORCH_CHECK(tpr >= R, "adaln_cpu: ", name, ": rows_per_chunk (", R,
                ") must not exceed its tokens per parameter row (", tpr, ")");
  }
}

// A dweight / dbias partial buffer: [B, NC, C] contiguous acc_dtype_of(T).
void check_weight_grad(const OptTensor& t, const char* name, int64_t B, int64_t NC, int64_t C,
                       ScalarType T) {
  if (!t.has_value()) return;
  check_cpu(*t, name);
  TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == NC && t->size(2) == C,
              "adaln_cpu: ", name, " must be [", B, ", ", NC, ", ", C, "], got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == acc_dtype_of(T) && t->is_contiguous(), "adaln_cpu: ", name,
              " must be a contiguous ", acc_dtype_of(T), " tensor for inputs of dtype ", T,
              ", got ", t->scalar_type());
}

void check_x(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  TORCH_CHECK(x.dim() == 3, "adaln_cpu: ", name, " must be [B, N, C], got ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "adaln_cpu: ", name,
              " must be float16/bfloat16/float32/float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) >= 1, "adaln_cpu: ", name, " must have C >= 1, got ", x.sizes());
}

// =============================================================================================
// Entry points
// =============================================================================================
void adaln_fwd_cpu(const at::Tensor& x, const OptTensor& y, const OptTensor& gate,
                   const at::Tensor& shift, const at::Tensor& scale, const OptTensor& weight,
                   const OptTensor& bias, const at::Tensor& out, const OptTensor& h,
                   const at::Tensor& mean, const at::Tensor& rstd, double eps, bool is_rms) {
  check_x(x, "x");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const ScalarType T = x.scalar_type();
  const bool gated = y.has_value();
  TORCH_CHECK(gate.has_value() == gated && h.has_value() == gated,
              "adaln_cpu: y, gate and h must be given together (gated mode) or all be None");
  check_param(shift, "shift", B, N, C, T);
  check_param(scale, "scale", B, N, C, T);
  TORCH_CHECK(shift.scalar_type() == scale.scalar_type(),
              "adaln_cpu: shift and scale must share one dtype");
  if (gated) {
    check_bnc(*y, "y", B, N, C, T, false);
    check_param(*gate, "gate", B, N, C, T);
    TORCH_CHECK(gate->scalar_type() == scale.scalar_type(),
                "adaln_cpu: gate must have the dtype of shift and scale");
    check_bnc(*h, "h", B, N, C, T, true);
  }
  check_affine(weight, "weight", C, T);
  check_affine(bias, "bias", C, T);
  check_bnc(out, "out", B, N, C, T, true);
  check_stats(mean, "mean", B, N, T, true);
  check_stats(rstd, "rstd", B, N, T, true);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "adaln_cpu: eps must be finite and >= 0");
  if (B * N == 0) return;

  const FwdArgs a{B, N, C, Rows(x), Rows(y), Rows(out), Rows(h), Param(gate, N),
                  Param(shift, N), Param(scale, N), weight, bias, mean.data_ptr(),
                  rstd.data_ptr(), eps, is_rms};
  dispatch_float(T, [&](auto tag) { fwd_impl<decltype(tag)>(a); });
}

void adaln_bwd_cpu(const at::Tensor& dout, const OptTensor& dh, const at::Tensor& hx,
                   const OptTensor& y, const OptTensor& gate, const at::Tensor& scale,
                   const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
                   const at::Tensor& rstd, const at::Tensor& dx, const OptTensor& dy,
                   const OptTensor& dgate, const OptTensor& dshift, const OptTensor& dscale,
                   const OptTensor& dweight, const OptTensor& dbias, int64_t tpr_gate,
                   int64_t tpr_shift, int64_t tpr_scale, int64_t rows_per_chunk, bool is_rms) {
  check_x(hx, "hx");
  const int64_t B = hx.size(0), N = hx.size(1), C = hx.size(2);
  const ScalarType T = hx.scalar_type();
  const int64_t R = rows_per_chunk;
  TORCH_CHECK(R >= 1, "adaln_cpu: rows_per_chunk must be >= 1, got ", R);
  const int64_t NC = (N + R - 1) / R;
  check_bnc(dout, "dout", B, N, C, T, false);
  if (dh.has_value()) check_bnc(*dh, "dh", B, N, C, T, false);
  check_param(scale, "scale", B, N, C, T);
  if (y.has_value()) check_bnc(*y, "y", B, N, C, T, false);
  if (gate.has_value()) {
    check_param(*gate, "gate", B, N, C, T);
    TORCH_CHECK(gate->scalar_type() == scale.scalar_type(),
                "adaln_cpu: gate must have the dtype of scale");
  }
  check_affine(weight, "weight", C, T);
  check_affine(bias, "bias", C, T);
  check_stats(mean, "mean", B, N, T, false);
  check_stats(rstd, "rstd", B, N, T, false);
  check_bnc(dx, "dx", B, N, C, T, true);
  if (dy.has_value()) {
    check_bnc(*dy, "dy", B, N, C, T, true);
    TORCH_CHECK(gate.has_value(), "adaln_cpu: dy needs gate");
  }
  TORCH_CHECK(!dgate.has_value() || (gate.has_value() && y.has_value()),
              "adaln_cpu: dgate needs gate and y");
  check_param_grad(dgate, "dgate", B, N, C, NC, R, tpr_gate, T);
  check_param_grad(dshift, "dshift", B, N, C, NC, R, tpr_shift, T);
  check_param_grad(dscale, "dscale", B, N, C, NC, R, tpr_scale, T);
  check_weight_grad(dweight, "dweight", B, NC, C, T);
  check_weight_grad(dbias, "dbias", B, NC, C, T);
  if (B * N == 0) return;

  const BwdArgs a{B, N, C, R, NC,
                  Rows(dout), Rows(dh), Rows(hx), Rows(y), Rows(dx), Rows(dy),
                  Param(gate, N), Param(scale, N), weight, bias,
                  mean.data_ptr(), rstd.data_ptr(),
                  mean.stride(0), mean.stride(1), rstd.stride(0), rstd.stride(1),
                  GradOut(dgate, tpr_gate, 2), GradOut(dshift, tpr_shift, 2),
                  GradOut(dscale, tpr_scale, 2), GradOut(dweight, 1, 1), GradOut(dbias, 1, 1),
                  is_rms};
  dispatch_float(T, [&](auto tag) { bwd_impl<decltype(tag)>(a); });
}

}  // namespace

void register_adaln_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("adaln_fwd_cpu", &adaln_fwd_cpu,
        "Fused AdaLN forward on CPU (kernel contract in vidgen_kernels/ops/adaln.py).",
        py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("shift"), py::arg("scale"),
        py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("h"), py::arg("mean"),
        py::arg("rstd"), py::arg("eps"), py::arg("is_rms"),
        py::call_guard<py::gil_scoped_release>());
  m.def("adaln_bwd_cpu", &adaln_bwd_cpu,
        "Fused AdaLN backward on CPU (kernel contract in vidgen_kernels/ops/adaln.py).",
        py::arg("dout"), py::arg("dh"), py::arg("hx"), py::arg("y"), py::arg("gate"),
        py::arg("scale"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"),
        py::arg("dx"), py::arg("dy"), py::arg("dgate"), py::arg("dshift"), py::arg("dscale"),
        py::arg("dweight"), py::arg("dbias"), py::arg("tpr_gate"), py::arg("tpr_shift"),
        py::arg("tpr_scale"), py::arg("rows_per_chunk"), py::arg("is_rms"),
        py::call_guard<py::gil_scoped_release>());
}
