/*
 * Causal temporal attention: C++ CPU backend (OpenMP through at::parallel_for).
 *
 * Implements the kernel contract documented at the top of vidgen_kernels/ops/temporal_attention.py
 * (kernel_fwd_torch / kernel_bwd_torch there are the same contract in PyTorch):
 *
 *   temporal_attn_fwd_cpu(q, k, v, cos, sin, out, lse, causal, interleaved, q_offset, scale)
 *   temporal_attn_bwd_cpu(dout, q, k, v, cos, sin, out, lse, dq, dk, dv,
 *                         causal, interleaved, q_offset, scale)
 *
 * Layout and strategy
 * -------------------
 * - q/k/v/dout are [B, T, S, H, D] of dtype T (float32, float16 or bfloat16; fp32 math), read in
 *   place through their strides: sequence n = (b, s, h) is the T rows x[b, :, s, h, :] of D
 *   elements (any last stride; stride 1 is the fast path). Nothing is permuted or copied on
 *   the tensor level.
 * - at::parallel_for over the B*S*H sequences in (b, s, h) order; a task owns a contiguous
 *   range and walks it in blocks of up to 64 consecutive sequences (as many as fit 3x the L2 in
 *   scratch in the forward, 2x in the backward; see block_size). Consecutive sequences are
 *   neighbouring heads/positions, so frame t of a block is one contiguous stretch of memory in
 *   the usual layouts: a block is gathered frame by frame (long runs through few pages, good
 *   for the TLB and the hardware prefetchers), and the next block's rows are
 *   software-prefetched, spread over the current block's sequences.
 * - Gathering converts to small contiguous fp32 scratch matrices: q rotated and rounded to T
 *   (the contract), k rotated and rounded, v, dout; rows padded with zeros to Dp (a multiple of
 *   8 floats), row counts padded to tile multiples. Each sequence is then computed from L1/L2
 *   with 8-float vectors (GCC/Clang vector extensions: AVX2 + FMA under -march=native, SSE or
 *   scalar code elsewhere):
 *     * gemm_nt (C = A B^T: the scores z = q k^T and dp = dout v^T): 2x4 register tiles of dot
 *       products whose inner loop runs over D contiguous floats of both operands, reduced by a
 *       4-way transposing horizontal add; causal rows stop at their last visible key.
 *     * softmax: masked row maxima, exponentials (Cephes-style polynomial, vectorised), sums,
 *       normalisation, each as a pass over all rows so that the rows' exp chains overlap.
 *     * gemm_nn (C = A B: out = p v, dv = p^T dout, dq = ds k, dk = ds^T q): 4 rows x 16 floats
 *       register tiles, the inner loop broadcasting one A value and streaming a B row (D
 *       contiguous floats); a transposed A is read in place (A(r..r+3, k) are 4 contiguous
 *       floats of row k), so nothing is transposed. Causal bands bound each tile's k range.
 * - Forward per sequence: z -> masked softmax -> out = p v, lse = m + log(sum).
 * - Backward per sequence, one pass, no atomics (each sequence owns its dq, dk, dv rows):
 *   p = exp(z - lse) (0 where masked) renormalised over its row, dp = dout v^T, delta =
 *   rowsum(p * dp) (equal to rowsum(dout * out) since out = p v; computed so, `out` is not read,
 *   and consistent with p: sum_j ds is 0 to rounding, which dq needs where the keys share a
 *   large component), ds = scale p (dp - delta), dv = p^T dout, dq = ds k, dk = ds^T q; dq/dk rotated back
 *   (angles -(q_offset + i) and -j).
 * - Outputs (out, dq, dk, dv: contiguous T) are written block by block, frame by frame, with
 *   streaming stores when a call writes more than the last-level cache (as in adaln_cpu.cpp;
 *   VIDGEN_KERNELS_CPU_STREAM_BYTES overrides the threshold). lse is float32 [B, S, H, Tq].
 * - RoPE: cos/sin [>= Tk, D/2] float32; rotation of pair (a, b) by angle t:
 *   (a cos t - b sin t, b cos t + a sin t), pairs (2i, 2i+1) (interleaved) or (i, i + D/2)
 *   (half-split), as in ops/rope.py.
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
#include <limits>
#include <optional>
#include <type_traits>

#if defined(__SSE2__) || defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

using namespace vidgen_cpu;

using at::ScalarType;
using OptTensor = std::optional<at::Tensor>;

// =============================================================================================
// 8-float vectors: vf / vi / kW / vload / vstore / vset1 / vand / vmax / hsum / hmax / vexp:
// cpu_common.h.
// Scratch rows are padded to multiples of kW, so there are no tails.
// =============================================================================================
inline vf viota(float base) { return vf{0, 1, 2, 3, 4, 5, 6, 7} + base; }

// o[0..3] = scale * (hsum(a), hsum(b), hsum(c), hsum(d)).
inline void hsum4(vf a, vf b, vf c, vf d, float scale, float* o) {
#ifdef __AVX__
  const __m256 t0 = _mm256_hadd_ps(a, b), t1 = _mm256_hadd_ps(c, d);
  const __m256 t2 = _mm256_hadd_ps(t0, t1);
  const __m128 r = _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1));
  _mm_storeu_ps(o, _mm_mul_ps(r, _mm_set1_ps(scale)));
#else
  o[0] = scale * hsum(a);
  o[1] = scale * hsum(b);
  o[2] = scale * hsum(c);
  o[3] = scale * hsum(d);
#endif
}

// =============================================================================================
// Conversions: row of T (any stride) <-> contiguous float
// =============================================================================================
template <typename T>
void load_row(const T* src, int64_t stride, int64_t n, float* dst);

// Inline vector copy (a libc memcpy call costs as much as the copy for rows this short).
inline void copy_floats(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vstore(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

template <>
void load_row<float>(const float* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    copy_floats(src, n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
  }
}

template <>
void load_row<c10::BFloat16>(const c10::BFloat16* src, int64_t stride, int64_t n, float* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i * stride]);
  }
}

template <>
void load_row<c10::Half>(const c10::Half* src, int64_t stride, int64_t n, float* dst) {
#ifdef __F16C__
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  if (stride != 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = _cvtsh_ss(s[i * stride]);
    return;
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
#endif
}

template <typename T>
void store_row(const float* src, int64_t n, T* dst);

template <>
void store_row<float>(const float* src, int64_t n, float* dst) {
  copy_floats(src, n, dst);
}

template <>
void store_row<c10::BFloat16>(const float* src, int64_t n, c10::BFloat16* dst) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16_bits(src[i]);
}

template <>
void store_row<c10::Half>(const float* src, int64_t n, c10::Half* dst) {
#ifdef __F16C__
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
#endif
}

// Rounds a float row to T's precision in place (no-op for float).
template <typename T>
void round_row(float* x, int64_t n) {
  if constexpr (!std::is_same<T, float>::value) {
    constexpr int64_t kBlk = 64;
    T tb[kBlk];
    for (int64_t c0 = 0; c0 < n; c0 += kBlk) {
      const int64_t len = std::min(kBlk, n - c0);
      store_row<T>(x + c0, len, tb);
      load_row<T>(tb, 1, len, x + c0);
    }
  }
}


// dst[0, n) = src[0, n) converted to T; through tb (n elements of T) when streaming.
template <typename T>
inline void store_out(const float* src, int64_t n, T* dst, bool stream, T* tb) {
  if (!stream) return store_row<T>(src, n, dst);
  const void* from = src;
  if constexpr (!std::is_same<T, float>::value) {
    store_row<T>(src, n, tb);
    from = tb;
  }
  stream_bytes(dst, from, size_t(n) * sizeof(T));
}

// =============================================================================================
// RoPE on a float row: y = rot(x, angle) (kNeg: rotation by -angle), tables c, s of D/2 floats.
// =============================================================================================
template <bool kNeg>
inline void rotate_row(const float* x, float* y, int64_t D, const float* c, const float* s,
                       bool interleaved) {
  const int64_t h = D / 2;
  if (interleaved) {
    for (int64_t m = 0; m < h; ++m) {
      const float a = x[2 * m], b = x[2 * m + 1], sn = kNeg ? -s[m] : s[m];
      y[2 * m] = a * c[m] - b * sn;
      y[2 * m + 1] = b * c[m] + a * sn;
    }
  } else {
    const float* xa = x;
    const float* xb = x + h;
    float* ya = y;
    float* yb = y + h;
    for (int64_t m = 0; m < h; ++m) {
      const float sn = kNeg ? -s[m] : s[m];
      ya[m] = xa[m] * c[m] - xb[m] * sn;
      yb[m] = xb[m] * c[m] + xa[m] * sn;
    }
  }
}

// =============================================================================================
// Tensor descriptors and problem geometry
// =============================================================================================
// A [B, T, S, H, D] tensor addressed by (sequence, frame); strides in elements.
struct Seq5 {
  const char* p = nullptr;
  int64_t esz = 0, s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  Seq5() = default;
  explicit Seq5(const at::Tensor& t)
      : p(static_cast<const char*>(t.data_ptr())), esz(t.element_size()), s0(t.stride(0)),
        s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)), s4(t.stride(4)) {}
  int64_t base(int64_t b, int64_t s, int64_t h) const { return b * s0 + s * s2 + h * s3; }
  template <typename T>
  const T* row(int64_t base_, int64_t t) const {
    return reinterpret_cast<const T*>(p) + base_ + t * s1;
  }
  template <typename T>
  T* mrow(int64_t base_, int64_t t) const {
    return const_cast<T*>(row<T>(base_, t));
  }
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Geo {
  int64_t B, Tq, Tk, S, H, D;
  int64_t Dp;   // D rounded up to kW
  int64_t Tqp;  // Tq rounded up to 4 (gemm_nn row tiles)
  int64_t Tkp;  // Tk rounded up to kW (score row length, key rows)
  int64_t q_offset;
  bool causal;
  float scale;
  Geo(int64_t B_, int64_t Tq_, int64_t Tk_, int64_t S_, int64_t H_, int64_t D_, int64_t off,
      bool causal_, double scale_)
      : B(B_), Tq(Tq_), Tk(Tk_), S(S_), H(H_), D(D_), Dp(round_up(D_, kW)),
        Tqp(round_up(Tq_, 4)), Tkp(round_up(Tk_, kW)), q_offset(off), causal(causal_),
        scale(float(scale_)) {}
  // Number of keys visible to query row i (>= 1).
  int64_t klim(int64_t i) const { return causal ? std::min(Tk, q_offset + i + 1) : Tk; }
  int64_t nseq() const { return B * S * H; }
};

struct Rope {
  const float* cos = nullptr;  // [Tk, D/2]
  const float* sin = nullptr;
  int64_t ld = 0;
  bool interleaved = true;
  bool on() const { return cos != nullptr; }
};

// Per-task scratch: one 64-byte aligned, zero-initialised block carved into matrices.
class Scratch {
 public:
  explicit Scratch(int64_t floats) {
    const size_t bytes = size_t(round_up(std::max<int64_t>(floats, 16), 16)) * sizeof(float);
    p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p_ != nullptr, "temporal_attention_cpu: out of memory (", bytes, " bytes scratch)");
    std::memset(p_, 0, bytes);
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* take(int64_t floats) {
    float* r = p_ + used_;
    used_ += round_up(floats, 16);
    return r;
  }
  static int64_t size(std::initializer_list<int64_t> parts) {
    int64_t n = 0;
    for (int64_t x : parts) n += round_up(x, 16);
    return n;
  }

 private:
  float* p_ = nullptr;
  int64_t used_ = 0;
};

// =============================================================================================
// Micro-kernels on the fp32 scratch
// =============================================================================================
// C[i][j] = scale * <A_i, B_j> for rows i < M and columns j < ncols(i) (rounded up to a
// multiple of 4: the extra columns are garbage the caller masks). A, B rows are Dp floats
// (Dp % kW == 0); B must have rows up to the rounded column count; C rows are ldc floats.
template <typename NCols>
void gemm_nt(const float* A, int64_t M, const float* B, int64_t Dp, float* C, int64_t ldc,
             float scale, const NCols& ncols) {
  int64_t i = 0;
  for (; i + 2 <= M; i += 2) {
    const float* a0 = A + i * Dp;
    const float* a1 = a0 + Dp;
    float* c0 = C + i * ldc;
    float* c1 = c0 + ldc;
    const int64_t n = round_up(std::max(ncols(i), ncols(i + 1)), 4);
    for (int64_t j = 0; j < n; j += 4) {
      const float* b = B + j * Dp;
      vf s00{}, s01{}, s02{}, s03{}, s10{}, s11{}, s12{}, s13{};
      for (int64_t d = 0; d < Dp; d += kW) {
        const vf x0 = vload(a0 + d), x1 = vload(a1 + d);
        vf y = vload(b + d);
        s00 += x0 * y;
        s10 += x1 * y;
        y = vload(b + Dp + d);
        s01 += x0 * y;
        s11 += x1 * y;
        y = vload(b + 2 * Dp + d);
        s02 += x0 * y;
        s12 += x1 * y;
        y = vload(b + 3 * Dp + d);
        s03 += x0 * y;
        s13 += x1 * y;
      }
      hsum4(s00, s01, s02, s03, scale, c0 + j);
      hsum4(s10, s11, s12, s13, scale, c1 + j);
    }
  }
  if (i < M) {
    const float* a0 = A + i * Dp;
    float* c0 = C + i * ldc;
    const int64_t n = round_up(ncols(i), 4);
    for (int64_t j = 0; j < n; j += 4) {
      const float* b = B + j * Dp;
      vf s00{}, s01{}, s02{}, s03{};
      for (int64_t d = 0; d < Dp; d += kW) {
        const vf x0 = vload(a0 + d);
        s00 += x0 * vload(b + d);
        s01 += x0 * vload(b + Dp + d);
        s02 += x0 * vload(b + 2 * Dp + d);
        s03 += x0 * vload(b + 3 * Dp + d);
      }
      hsum4(s00, s01, s02, s03, scale, c0 + j);
    }
  }
}

// C[r][:] = sum_{k in krange(r)} A(r, k) B[k][:] for rows r < M (M % 4 == 0), C and B rows of
// Dp floats. A(r, k) = A[r * lda + k], or A[k * lda + r] when kTransA. krange(r0) returns the
// [k0, k1) range for rows r0 .. r0 + 3 (A is zero outside each row's own range).
template <bool kTransA, typename KRange>
void gemm_nn(const float* A, int64_t lda, int64_t M, const float* B, int64_t Dp, float* C,
             const KRange& krange) {
  for (int64_t r = 0; r < M; r += 4) {
    int64_t k0, k1;
    krange(r, k0, k1);
    const int64_t ai = kTransA ? 1 : lda;  // step between the 4 rows
    const int64_t ak = kTransA ? lda : 1;  // step along k
    const float* a = kTransA ? A + r : A + r * lda;
    float* c = C + r * Dp;
    int64_t col = 0;
    for (; col + 2 * kW <= Dp; col += 2 * kW) {
      vf c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{};
      // Unrolled by 2 (two k steps' loads in flight per iteration): 5-9 % faster backward at
      // T = 13..32, 5 % faster forward at T = 32 (interleaved pairs; 4 and 8 gained less).
#pragma GCC unroll 2
      for (int64_t k = k0; k < k1; ++k) {
        const float* bk = B + k * Dp + col;
        const vf b0 = vload(bk), b1 = vload(bk + kW);
        const float* ak_ = a + k * ak;
        vf x = vset1(ak_[0]);
        c00 += x * b0;
        c01 += x * b1;
        x = vset1(ak_[ai]);
        c10 += x * b0;
        c11 += x * b1;
        x = vset1(ak_[2 * ai]);
        c20 += x * b0;
        c21 += x * b1;
        x = vset1(ak_[3 * ai]);
        c30 += x * b0;
        c31 += x * b1;
      }
      vstore(c + col, c00);
      vstore(c + col + kW, c01);
      vstore(c + Dp + col, c10);
      vstore(c + Dp + col + kW, c11);
      vstore(c + 2 * Dp + col, c20);
      vstore(c + 2 * Dp + col + kW, c21);
      vstore(c + 3 * Dp + col, c30);
      vstore(c + 3 * Dp + col + kW, c31);
    }
    if (col < Dp) {  // one last block of kW columns
      vf c00{}, c10{}, c20{}, c30{};
      for (int64_t k = k0; k < k1; ++k) {
        const vf b0 = vload(B + k * Dp + col);
        const float* ak_ = a + k * ak;
        c00 += vset1(ak_[0]) * b0;
        c10 += vset1(ak_[ai]) * b0;
        c20 += vset1(ak_[2 * ai]) * b0;
        c30 += vset1(ak_[3 * ai]) * b0;
      }
      vstore(c + col, c00);
      vstore(c + Dp + col, c10);
      vstore(c + 2 * Dp + col, c20);
      vstore(c + 3 * Dp + col, c30);
    }
  }
}

// Masked softmax of the score rows i < Tq of P (rows of Tkp floats): p_ij = exp(z_ij - m_i) /
// sum_i for j < klim(i), 0 for the other columns; lse_i = m_i + log(sum_i). Done in passes
// over all rows (maxima, exponentials, normalisation) with the same trip count for every row,
// so that the rows' exp chains overlap and the loop branches stay predictable.
inline void softmax_rows(const Geo& g, float* P, float* rowm, float* rows, float* lse) {
  const int64_t Tq = g.Tq, Tkp = g.Tkp;
  const vf ninf = vset1(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < Tq; ++i) {
    float* row = P + i * Tkp;
    const vf lv = vset1(float(g.klim(i)));
    vf m = ninf;
    for (int64_t j = 0; j < Tkp; j += kW) {
      const vf z = viota(float(j)) < lv ? vload(row + j) : ninf;
      vstore(row + j, z);
      m = vmax(m, z);
    }
    rowm[i] = hmax(m);
  }
  for (int64_t i = 0; i < Tq; ++i) {
    float* row = P + i * Tkp;
    const vf mv = vset1(rowm[i]);
    vf sum{};
    for (int64_t j = 0; j < Tkp; j += kW) {
      const vf e = vexp(vload(row + j) - mv);  // exp(-inf) = 0 where masked
      sum += e;
      vstore(row + j, e);
    }
    rows[i] = hsum(sum);
  }
  for (int64_t i = 0; i < Tq; ++i) {
    float* row = P + i * Tkp;
    const vf inv = vset1(1.0f / rows[i]);
    for (int64_t j = 0; j < Tkp; j += kW) vstore(row + j, vload(row + j) * inv);
    lse[i] = rowm[i] + std::log(rows[i]);
  }
}

// =============================================================================================
// Blocks of sequences: gathering into scratch, storing from it, prefetching
// =============================================================================================
// A task walks its sequences in blocks of up to kMaxG consecutive ones (consecutive heads, then
// positions: for the usual layouts the rows of one frame of a block are one contiguous stretch
// of memory, up to 64 rows). Rows are copied frame by frame across the block, so memory is read
// and written in long runs through few pages (TLB- and prefetcher-friendly); the block's scratch
// (one to a few MB) is then computed sequence by sequence from the L2/L3.
constexpr int64_t kMaxG = 64;

struct Block {
  int64_t n0 = 0, cnt = 0;
  int64_t b[kMaxG], s[kMaxG], h[kMaxG];
  void set(const Geo& g, int64_t n0_, int64_t cnt_) {
    n0 = n0_;
    cnt = cnt_;
    for (int64_t i = 0; i < cnt; ++i) {
      const int64_t n = n0 + i;
      b[i] = n / (g.S * g.H);
      s[i] = (n / g.H) % g.S;
      h[i] = n % g.H;
    }
  }
  void bases(const Seq5& x, int64_t* out) const {
    for (int64_t i = 0; i < cnt; ++i) out[i] = x.base(b[i], s[i], h[i]);
  }
};

// Sequences per block: as many as fit `l2s` times the L2 in scratch (per_seq_floats each), at
// most kMaxG, and within half of each thread's share of the L3. Longer blocks mean longer
// contiguous runs per frame (the gather / scatter bandwidth grows with them: a run of 16 rows of
// 64 floats is one 4 KB page, and every page starts its prefetch stream cold), while the
// compute, a few FLOPs per scratch byte, hardly notices that its scratch spilled from the L2 to
// the L3. Measured in interleaved pairs against the earlier budget (3/4 and 1/2 of the L2, at
// most 16 sequences) on a 2-core EPYC (1 MB L2, 32 MB L3): the forward at 3x the L2 is 3-10 %
// faster, the backward at 2x 7-12 %, on all three benchmark shapes; at 8x the forward was 8 %
// slower than before.
int64_t block_size(int64_t per_seq_floats, int64_t l2s) {
  static const int64_t l2 = std::min<int64_t>(
      cache_bytes(2) > 0 ? cache_bytes(2) : int64_t(512) << 10, int64_t(2) << 20);
  static const int64_t l3 = cache_bytes(3);
  int64_t budget = l2s * l2;
  if (l3 > 0) budget = std::min<int64_t>(budget, l3 / (2 * std::max(1, at::get_num_threads())));
  budget = std::max<int64_t>(budget, int64_t(128) << 10);
  return std::max<int64_t>(1, std::min<int64_t>(kMaxG, budget / (per_seq_floats * 4)));
}

// dst + i * ld + r * Dp (Dp floats, the padding stays zero) = row r < T_ of block sequence i,
// rotated at position pos0 + r (when RoPE is on and `rot`) and rounded to T.
template <typename T>
void gather_block(const Seq5& x, const Block& blk, int64_t T_, int64_t D, int64_t Dp, float* dst,
                  int64_t ld, float* tmp, const Rope& rope, bool rot, int64_t pos0) {
  const bool do_rot = rot && rope.on();
  int64_t base[kMaxG];
  blk.bases(x, base);
  for (int64_t r = 0; r < T_; ++r) {
    const float* c = do_rot ? rope.cos + (pos0 + r) * rope.ld : nullptr;
    const float* sn = do_rot ? rope.sin + (pos0 + r) * rope.ld : nullptr;
    for (int64_t i = 0; i < blk.cnt; ++i) {
      float* d = dst + i * ld + r * Dp;
      const T* src = x.row<T>(base[i], r);
      if (!do_rot) {
        load_row<T>(src, x.s4, D, d);
      } else {
        load_row<T>(src, x.s4, D, tmp);
        rotate_row<false>(tmp, d, D, c, sn, rope.interleaved);
        round_row<T>(d, D);
      }
    }
  }
}

// Row r < T_ of block sequence i of the contiguous-row tensor y = src + i * ld + r * Dp,
// rotated back by -(pos0 + r) when `rot` and RoPE is on, converted to T.
template <typename T>
void scatter_block(const float* src, int64_t ld, const Block& blk, int64_t T_, int64_t D,
                   int64_t Dp, const Seq5& y, float* tmp, const Rope& rope, bool rot,
                   int64_t pos0, bool stream) {
  const bool do_rot = rot && rope.on();
  int64_t base[kMaxG];
  blk.bases(y, base);
  T* tb = reinterpret_cast<T*>(tmp + Dp);
  for (int64_t r = 0; r < T_; ++r) {
    const float* c = do_rot ? rope.cos + (pos0 + r) * rope.ld : nullptr;
    const float* sn = do_rot ? rope.sin + (pos0 + r) * rope.ld : nullptr;
    for (int64_t i = 0; i < blk.cnt; ++i) {
      const float* s = src + i * ld + r * Dp;
      if (do_rot) {
        rotate_row<true>(s, tmp, D, c, sn, rope.interleaved);
        s = tmp;
      }
      store_out<T>(s, D, y.mrow<T>(base[i], r), stream, tb);
    }
  }
}

// Software prefetch of the next block's input rows, spread over the current block's sequences:
// the (tensor, frame) chunks (one chunk = that frame's rows of every sequence of the block) are
// dealt out evenly, so the loads of block k + 1 overlap the arithmetic of block k.
struct NextBlock {
  static constexpr int kMaxT = 5;
  const Seq5* x[kMaxT];
  int64_t T[kMaxT];
  int nt = 0;
  int64_t D = 0, nch = 0, cnt = 0;
  int64_t base[kMaxT][kMaxG];

  void add(const Seq5& t, int64_t frames) {
    if (t.s4 != 1) return;  // rows of contiguous elements only
    x[nt] = &t;
    T[nt++] = frames;
  }
  void set(const Block& next) {
    cnt = next.cnt;
    nch = 0;
    for (int j = 0; j < nt; ++j) {
      next.bases(*x[j], base[j]);
      nch += T[j];
    }
  }
  // Chunks of the i-th of `of` sequences of the current block.
  void run(int64_t i, int64_t of) const {
    if (cnt == 0) return;
    const int64_t c0 = i * nch / of, c1 = (i + 1) * nch / of;
    for (int64_t c = c0; c < c1; ++c) {
      int j = 0;
      int64_t t = c;
      while (t >= T[j]) t -= T[j++];
      const Seq5& s = *x[j];
      const int64_t bytes = D * s.esz;
      for (int64_t q = 0; q < cnt; ++q) {
        const char* r = s.p + (base[j][q] + t * s.s1) * s.esz;
        for (int64_t off = 0; off < bytes; off += 64) prefetch_line(r + off);
      }
    }
  }
};

int64_t grain_for(const Geo& g, int64_t passes) {
  // About 64k multiply-adds per task at least, so that tiny problems stay on one thread.
  const int64_t work = std::max<int64_t>(1, passes * g.Tq * g.Tk * g.Dp);
  return std::max<int64_t>(1, (int64_t(1) << 16) / work);
}

// =============================================================================================
// Forward
// =============================================================================================
struct FwdArgs {
  Geo g;
  Seq5 q, k, v, out;
  float* lse;  // [B, S, H, Tq] contiguous
  Rope rope;
};

template <typename T>
void fwd_impl(const FwdArgs& a) {
  const Geo& g = a.g;
  const int64_t Tq = g.Tq, Tk = g.Tk, D = g.D, Dp = g.Dp, Tqp = g.Tqp, Tkp = g.Tkp;
  const int64_t N = g.nseq();
  const bool stream = N * Tq * D * int64_t(sizeof(T)) >= stream_threshold_bytes();
  const int64_t ldq = Tqp * Dp, ldk = Tkp * Dp;  // scratch floats per sequence
  const int64_t G = block_size(2 * ldq + 2 * ldk, 3);  // 3x the L2

  at::parallel_for(0, N, grain_for(g, 2), [&](int64_t begin, int64_t end) {
    Scratch sc(Scratch::size({G * ldq, G * ldk, G * ldk, G * ldq, Tqp * Tkp, 2 * Dp, Tq, Tq}));
    float* Qb = sc.take(G * ldq);
    float* Kb = sc.take(G * ldk);
    float* Vb = sc.take(G * ldk);
    float* Ob = sc.take(G * ldq);
    float* P = sc.take(Tqp * Tkp);
    float* tmp = sc.take(2 * Dp);  // a row, then a row of T for streaming stores
    float* rowm = sc.take(Tq);
    float* rows = sc.take(Tq);
    const auto ncols = [&](int64_t i) { return g.klim(i); };
    const auto krange = [&](int64_t r, int64_t& k0, int64_t& k1) {
      k0 = 0;
      k1 = g.klim(std::min(r + 3, Tq - 1));
    };
    NextBlock pf;
    pf.D = D;
    pf.add(a.q, Tq);
    pf.add(a.k, Tk);
    pf.add(a.v, Tk);

    Block blk, nxt;
    blk.set(g, begin, std::min(G, end - begin));
    for (; blk.cnt > 0; blk = nxt) {
      const int64_t n1 = blk.n0 + blk.cnt;
      nxt.set(g, n1, std::min(G, end - n1));
      pf.set(nxt);
      gather_block<T>(a.q, blk, Tq, D, Dp, Qb, ldq, tmp, a.rope, true, g.q_offset);
      gather_block<T>(a.k, blk, Tk, D, Dp, Kb, ldk, tmp, a.rope, true, 0);
      gather_block<T>(a.v, blk, Tk, D, Dp, Vb, ldk, tmp, a.rope, false, 0);
      for (int64_t i = 0; i < blk.cnt; ++i) {
        pf.run(i, blk.cnt);
        gemm_nt(Qb + i * ldq, Tq, Kb + i * ldk, Dp, P, Tkp, g.scale, ncols);
        softmax_rows(g, P, rowm, rows, a.lse + (blk.n0 + i) * Tq);
        gemm_nn<false>(P, Tkp, Tqp, Vb + i * ldk, Dp, Ob + i * ldq, krange);
      }
      scatter_block<T>(Ob, ldq, blk, Tq, D, Dp, a.out, tmp, a.rope, false, 0, stream);
    }
    if (stream) stream_fence();
  });
}

// =============================================================================================
// Backward
// =============================================================================================
struct BwdArgs {
  Geo g;
  Seq5 dout, q, k, v, out, dq, dk, dv;
  const float* lse;
  int64_t l0, l1, l2, l3;  // lse strides [B, S, H, Tq]
  Rope rope;
};

template <typename T>
void bwd_impl(const BwdArgs& a) {
  const Geo& g = a.g;
  const int64_t Tq = g.Tq, Tk = g.Tk, D = g.D, Dp = g.Dp, Tqp = g.Tqp, Tkp = g.Tkp;
  const int64_t N = g.nseq();
  const bool stream = N * (Tq + 2 * Tk) * D * int64_t(sizeof(T)) >= stream_threshold_bytes();
  const int64_t ldq = Tqp * Dp, ldk = Tkp * Dp;  // scratch floats per sequence
  const int64_t G = block_size(3 * ldq + 4 * ldk, 2);  // 2x the L2

  at::parallel_for(0, N, grain_for(g, 5), [&](int64_t begin, int64_t end) {
    Scratch sc(Scratch::size({G * ldq, G * ldk, G * ldk, G * ldq, G * ldq, G * ldk, G * ldk,
                              Tqp * Tkp, Tqp * Tkp, 2 * Dp}));
    float* Qb = sc.take(G * ldq);
    float* Kb = sc.take(G * ldk);
    float* Vb = sc.take(G * ldk);
    float* dOb = sc.take(G * ldq);
    float* dQb = sc.take(G * ldq);
    float* dKb = sc.take(G * ldk);
    float* dVb = sc.take(G * ldk);
    float* P = sc.take(Tqp * Tkp);
    float* dS = sc.take(Tqp * Tkp);
    float* tmp = sc.take(2 * Dp);  // a row, then a row of T for streaming stores
    const auto ncols = [&](int64_t i) { return g.klim(i); };
    const auto krange_q = [&](int64_t r, int64_t& k0, int64_t& k1) {  // rows = queries
      k0 = 0;
      k1 = g.klim(std::min(r + 3, Tq - 1));
    };
    const auto krange_k = [&](int64_t r, int64_t& k0, int64_t& k1) {  // rows = keys
      k0 = g.causal ? std::min(Tq, std::max<int64_t>(0, r - g.q_offset)) : 0;
      k1 = Tq;
    };
    NextBlock pf;
    pf.D = D;
    pf.add(a.q, Tq);
    pf.add(a.k, Tk);
    pf.add(a.v, Tk);
    pf.add(a.dout, Tq);

    Block blk, nxt;
    blk.set(g, begin, std::min(G, end - begin));
    for (; blk.cnt > 0; blk = nxt) {
      const int64_t n1 = blk.n0 + blk.cnt;
      nxt.set(g, n1, std::min(G, end - n1));
      pf.set(nxt);
      gather_block<T>(a.q, blk, Tq, D, Dp, Qb, ldq, tmp, a.rope, true, g.q_offset);
      gather_block<T>(a.k, blk, Tk, D, Dp, Kb, ldk, tmp, a.rope, true, 0);
      gather_block<T>(a.v, blk, Tk, D, Dp, Vb, ldk, tmp, a.rope, false, 0);
      gather_block<T>(a.dout, blk, Tq, D, Dp, dOb, ldq, tmp, a.rope, false, 0);
      for (int64_t i = 0; i < blk.cnt; ++i) {
        pf.run(i, blk.cnt);
        const float* Q = Qb + i * ldq;
        const float* K = Kb + i * ldk;
        const float* V = Vb + i * ldk;
        const float* dO = dOb + i * ldq;
        gemm_nt(Q, Tq, K, Dp, P, Tkp, g.scale, ncols);  // z
        gemm_nt(dO, Tq, V, Dp, dS, Tkp, 1.0f, ncols);   // dp

        // p = exp(z - lse) (0 where masked), renormalised over its row: the fp32 lse is exact
        // to its last bit only, so sum_j p drifts from 1 by up to |z| * 2^-24, and then
        // sum_j ds (0 exactly) does not vanish: dq kept scale * delta * (sum_j p - 1) times the
        // keys' common component (22 % of dq at a common key offset of 3000 in fp32). delta =
        // sum_j p dp with the same p (= <dout, out>, which is not read: in 16 bits its rounding
        // does the same), ds = scale * p * (dp - delta).
        const float* lse = a.lse + blk.b[i] * a.l0 + blk.s[i] * a.l1 + blk.h[i] * a.l2;
        for (int64_t r = 0; r < Tq; ++r) {
          float* pr = P + r * Tkp;
          float* dr = dS + r * Tkp;
          const vf lv = vset1(lse[r * a.l3]);
          const int64_t L = g.klim(r), Lv = round_up(L, kW);
          const vf Lf = vset1(float(L));
          // Columns past L hold what gemm_nt left there (up to round_up(L, 4)) or an earlier
          // sequence's ds: both p and dp are masked, or a NaN there (0 * NaN) would leak into
          // this sequence's delta / ds, and ds must be 0 past L (dq reads up to klim(r + 3)).
          vf dacc{}, pacc{};
          for (int64_t j = 0; j < Lv; j += kW) {
            const vi keep = viota(float(j)) < Lf;
            const vf p = vand(keep, vexp(vload(pr + j) - lv));
            vstore(pr + j, p);
            pacc += p;
            dacc += p * vand(keep, vload(dr + j));
          }
          // (L >= 1 and the row's largest p >= 1 / L: the sum is > 0; a NaN stays a NaN)
          const float inv = 1.0f / hsum(pacc);
          const vf vinv = vset1(inv);
          const vf dl = vset1(hsum(dacc) * inv);
          for (int64_t j = 0; j < Lv; j += kW) {
            const vi keep = viota(float(j)) < Lf;
            const vf p = vand(keep, vload(pr + j) * vinv);
            vstore(pr + j, p);
            vstore(dr + j, vand(keep, (p * g.scale) * (vload(dr + j) - dl)));
          }
          for (int64_t j = Lv; j < Tkp; j += kW) {
            vstore(pr + j, vf{});
            vstore(dr + j, vf{});
          }
        }

        gemm_nn<true>(P, Tkp, Tkp, dO, Dp, dVb + i * ldk, krange_k);   // dv = p^T dout
        gemm_nn<false>(dS, Tkp, Tqp, K, Dp, dQb + i * ldq, krange_q);  // dq = ds k
        gemm_nn<true>(dS, Tkp, Tkp, Q, Dp, dKb + i * ldk, krange_k);   // dk = ds^T q
      }
      scatter_block<T>(dQb, ldq, blk, Tq, D, Dp, a.dq, tmp, a.rope, true, g.q_offset, stream);
      scatter_block<T>(dKb, ldk, blk, Tk, D, Dp, a.dk, tmp, a.rope, true, 0, stream);
      scatter_block<T>(dVb, ldk, blk, Tk, D, Dp, a.dv, tmp, a.rope, false, 0, stream);
    }
    if (stream) stream_fence();
  });
}

// =============================================================================================
// Argument checks (cheap: devices, ranks, shapes, dtypes, output contiguity)
// =============================================================================================
template <typename F>
void dispatch(ScalarType st, const F& f) {
  switch (st) {
    case ScalarType::Float: return f(float{});
    case ScalarType::Half: return f(c10::Half{});
    case ScalarType::BFloat16: return f(c10::BFloat16{});
    default: TORCH_INTERNAL_ASSERT(false, "temporal_attention_cpu: unexpected dtype ", st);
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "temporal_attention_cpu: ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "temporal_attention_cpu: ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, "temporal_attention_cpu: ", name,
              " must be a strided tensor");
}

void check_5d(const at::Tensor& t, const char* name, int64_t B, int64_t T, int64_t S, int64_t H,
              int64_t D, ScalarType dt, bool contiguous) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 5 && t.size(0) == B && t.size(1) == T && t.size(2) == S &&
                  t.size(3) == H && t.size(4) == D,
              "temporal_attention_cpu: ", name, " must be [", B, ", ", T, ", ", S, ", ", H, ", ",
              D, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "temporal_attention_cpu: ", name, " must have dtype ", dt,
              ", got ", t.scalar_type());
  TORCH_CHECK(!contiguous || t.is_contiguous(), "temporal_attention_cpu: ", name,
              " must be contiguous");
}

void check_lse(const at::Tensor& t, int64_t B, int64_t S, int64_t H, int64_t Tq,
               bool contiguous) {
  check_cpu(t, "lse");
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == S && t.size(2) == H &&
                  t.size(3) == Tq,
              "temporal_attention_cpu: lse must be [", B, ", ", S, ", ", H, ", ", Tq, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ScalarType::Float,
              "temporal_attention_cpu: lse must be float32, got ", t.scalar_type());
  TORCH_CHECK(!contiguous || t.is_contiguous(), "temporal_attention_cpu: lse must be contiguous");
}

// Checks q, k, v, the tables and the scalars; returns the geometry.
Geo check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& cos,
              const OptTensor& sin, int64_t q_offset, double scale, bool causal) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 5, "temporal_attention_cpu: q must be [B, T, S, H, D], got ", q.sizes());
  const ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16,
              "temporal_attention_cpu: q must be float32, float16 or bfloat16, got ", dt);
  const int64_t B = q.size(0), Tq = q.size(1), S = q.size(2), H = q.size(3), D = q.size(4);
  TORCH_CHECK(Tq >= 1 && D >= 1, "temporal_attention_cpu: q must have T >= 1 and D >= 1, got ",
              q.sizes());
  TORCH_CHECK(q_offset >= 0, "temporal_attention_cpu: q_offset must be >= 0, got ", q_offset);
  const int64_t Tk = q_offset + Tq;
  check_5d(k, "k", B, Tk, S, H, D, dt, false);
  check_5d(v, "v", B, Tk, S, H, D, dt, false);
  TORCH_CHECK(std::isfinite(scale), "temporal_attention_cpu: scale must be finite, got ", scale);
  TORCH_CHECK(cos.has_value() == sin.has_value(),
              "temporal_attention_cpu: cos and sin must both be tensors or both be None");
  if (cos.has_value()) {
    TORCH_CHECK(D % 2 == 0, "temporal_attention_cpu: RoPE needs an even D, got ", D);
    const auto check_table = [&](const at::Tensor& t, const char* name) {
      check_cpu(t, name);
      TORCH_CHECK(t.dim() == 2 && t.size(0) >= Tk && t.size(1) == D / 2,
                  "temporal_attention_cpu: ", name, " must be [T_k, D/2] = [", Tk, ", ", D / 2,
                  "] (or have more rows), got ", t.sizes());
      TORCH_CHECK(t.scalar_type() == ScalarType::Float && t.is_contiguous(),
                  "temporal_attention_cpu: ", name, " must be a contiguous float32 tensor");
    };
    check_table(*cos, "cos");
    check_table(*sin, "sin");
  }
  return Geo(B, Tq, Tk, S, H, D, q_offset, causal, scale);
}

Rope make_rope(const OptTensor& cos, const OptTensor& sin, int64_t D, bool interleaved) {
  Rope r;
  if (cos.has_value()) {
    r.cos = cos->data_ptr<float>();
    r.sin = sin->data_ptr<float>();
    r.ld = D / 2;
    r.interleaved = interleaved;
  }
  return r;
}

// =============================================================================================
// Entry points
// =============================================================================================
void temporal_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const OptTensor& cos, const OptTensor& sin, const at::Tensor& out,
                           const at::Tensor& lse, bool causal, bool interleaved, int64_t q_offset,
                           double scale) {
  const Geo g = check_qkv(q, k, v, cos, sin, q_offset, scale, causal);
  check_5d(out, "out", g.B, g.Tq, g.S, g.H, g.D, q.scalar_type(), true);
  check_lse(lse, g.B, g.S, g.H, g.Tq, true);
  if (g.nseq() == 0) return;
  const FwdArgs a{g, Seq5(q), Seq5(k), Seq5(v), Seq5(out), lse.data_ptr<float>(),
                  make_rope(cos, sin, g.D, interleaved)};
  dispatch(q.scalar_type(), [&](auto tag) { fwd_impl<decltype(tag)>(a); });
}

void temporal_attn_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const OptTensor& cos, const OptTensor& sin,
                           const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq,
                           const at::Tensor& dk, const at::Tensor& dv, bool causal,
                           bool interleaved, int64_t q_offset, double scale) {
  const Geo g = check_qkv(q, k, v, cos, sin, q_offset, scale, causal);
  const ScalarType dt = q.scalar_type();
  check_5d(dout, "dout", g.B, g.Tq, g.S, g.H, g.D, dt, false);
  check_5d(out, "out", g.B, g.Tq, g.S, g.H, g.D, dt, false);
  check_lse(lse, g.B, g.S, g.H, g.Tq, false);
  check_5d(dq, "dq", g.B, g.Tq, g.S, g.H, g.D, dt, true);
  check_5d(dk, "dk", g.B, g.Tk, g.S, g.H, g.D, dt, true);
  check_5d(dv, "dv", g.B, g.Tk, g.S, g.H, g.D, dt, true);
  if (g.nseq() == 0) return;
  const BwdArgs a{g,
                  Seq5(dout), Seq5(q), Seq5(k), Seq5(v), Seq5(out), Seq5(dq), Seq5(dk), Seq5(dv),
                  lse.data_ptr<float>(), lse.stride(0), lse.stride(1), lse.stride(2),
                  lse.stride(3), make_rope(cos, sin, g.D, interleaved)};
  dispatch(dt, [&](auto tag) { bwd_impl<decltype(tag)>(a); });
}

}  // namespace

void register_temporal_attention_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("temporal_attn_fwd_cpu", &temporal_attn_fwd_cpu,
        "Temporal attention forward on CPU (kernel contract in "
        "vidgen_kernels/ops/temporal_attention.py).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("out"),
        py::arg("lse"), py::arg("causal"), py::arg("interleaved"), py::arg("q_offset"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("temporal_attn_bwd_cpu", &temporal_attn_bwd_cpu,
        "Temporal attention backward on CPU (kernel contract in "
        "vidgen_kernels/ops/temporal_attention.py).",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"),
        py::arg("sin"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("causal"), py::arg("interleaved"), py::arg("q_offset"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
}
