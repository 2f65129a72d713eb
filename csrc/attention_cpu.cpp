/*
 * RoPE-3D attention (rope3d_attention): C++ CPU backend (OpenMP through at::parallel_for).
 *
 * Implements the kernel contract documented at the top of vidgen_kernels/ops/rope3d_attention.py
 * (kernel_fwd_torch / kernel_bwd_torch there are the same contract in PyTorch):
 *
 *   rope3d_attn_fwd_cpu(q, k, v, cos, sin, out, lse, rope_offset, interleaved,
 *                       fc_start, fc_len, fc_block, scale, block_m)
 *   rope3d_attn_bwd_cpu(dout, q, k, v, cos, sin, out, lse, dq, dk, dv, rope_offset,
 *                       interleaved, fc_start, fc_len, fc_block, scale, block_m)
 *
 * Strategy: exact softmax over whole key rows, one block of query rows at a time
 * ------------------------------------------------------------------------------
 * CPU sequences are short enough (S_k up to a few thousand) that a block of block_m query rows
 * times ALL keys fits the L2 cache: the scores of a block are computed by one GEMM, the row
 * softmax is exact (no running max, no rescaling of the output accumulator: the passes that
 * make ATen's CPU flash backward run at a third of the GEMM rate), and every product of the
 * forward and the backward is one BLAS call on contiguous fp32 scratch.
 *
 * - A task is one (b, h) pair, or a chunk of its query rows when there are fewer (b, h) pairs
 *   than 2x the threads. It gathers the head's keys and values once into fp32 scratch [S_k, D]:
 *   k rotated (RoPE at positions rope_offset .. rope_offset + L - 1) and rounded to T as the
 *   contract says, v converted. q (rotated, rounded) and dout rows are gathered per block.
 *   q, k, v, dout are read in place through their strides (any strides); nothing is copied on
 *   the tensor level and no rotated tensor is made.
 * - Frame-causal mask: query i may see keys [0, lim(i)) and [V1, S) (V1 = fc_start + fc_len, the
 *   text suffix); lim(i) = fc_start for text queries, the end of its block for video queries.
 *   A block computes only the key columns [0, max lim) and [V1, S) (two GEMMs when the suffix is
 *   not empty), so fully masked key ranges cost nothing; the masked rest of a row gets p = 0.
 * - Forward per block: z = scale q k^T (BLAS), per row m = max, p = exp(z - m) (vectorised), l =
 *   sum p; out = (p v) / l (BLAS), lse = m + log l.
 * - Backward per block (FA2 math): p = exp(scale q k^T - lse) (0 where masked), dp = dout v^T,
 *   ds = p (dp - delta) with delta = <dout, out> (fp32; for fp16 / bf16 delta = sum_j p dp over
 *   the row the block holds, p renormalised over it: the rounded out's error came back in dq
 *   times the keys' common component); dv += p^T dout, dk += scale ds^T q,
 *   dq = scale ds k (all BLAS). dq rows are un-rotated (angle negated) and stored per block; dk /
 *   dv accumulate in fp32 scratch over the task's blocks and are stored (dk un-rotated) at the
 *   end. Chunked tasks accumulate into per-chunk fp32 partials that a second parallel pass sums.
 * - GEMMs: the BLAS that PyTorch links (sgemm_, MKL in the x86 wheels; called inside the
 *   parallel region it runs on the calling thread), resolved at load time as a weak symbol; if
 *   the torch build exports no sgemm_ (or VIDGEN_KERNELS_CPU_ATEN_GEMM=1), at::mm on views of
 *   the same scratch.
 * - Scratch per thread: 2 S_k D floats (k, v), block_m S_k (scores; 2 block_m S_k in the
 *   backward) and a few block_m D, plus 2 S_k D (dk, dv) in the backward. block_m = 0: 128 rows
 *   forward, 64 backward (fewer when a score block would pass 4 MiB).
 * - dtypes: float32, float16, bfloat16 (fp32 math; q / k rounded to T after rotation, outputs
 *   rounded once to T). Outputs out / dq / dk / dv are contiguous [B, S, H, D] T, lse [B, S, H]
 *   float32.
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
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace {

using namespace vidgen_cpu;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- GEMM -----------------------------------------------------------------------------------
bool use_blas() {
  static const bool b = [] {
    const char* env = std::getenv("VIDGEN_KERNELS_CPU_ATEN_GEMM");
    const bool force_aten = env && *env && std::string(env) != "0";
    return sgemm_ != nullptr && !force_aten;
  }();
  return b;
}

// Row-major C[M, N] = alpha op(A)[M, K] op(B)[K, N] + beta C (op: transpose when ta / tb; A is
// stored [M, K] (or [K, M] when ta) with row stride lda, likewise B, C with row stride ldc).
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  if (use_blas()) {
    // column-major view: C^T[N, M] = op(B)^T op(A)^T
    const char opa = tb ? 'T' : 'N', opb = ta ? 'T' : 'N';
    const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
    sgemm_(&opa, &opb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  Tensor a = ta ? at::from_blob(const_cast<float*>(A), {K, M}, {lda, 1}, opts).t()
                : at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  Tensor b = tb ? at::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, opts).t()
                : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == 0.f) {
    c.copy_(at::mm(a, b));
    if (alpha != 1.f) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// ---- rows: gather (rotate, round to T, widen to fp32) and store (un-rotate, round to T) -------
template <typename T>
inline float rnd(float x) {  // round to T and back (the contract's round_T)
  return static_cast<float>(static_cast<T>(x));
}

// The RoPE table rows of one position (both null where the position is not rotated).
struct Rot {
  const float* c = nullptr;
  const float* s = nullptr;
};

// Row x (D elements, element stride sd) -> fp32 o[0..D); rotated by rot if rot.c.
template <typename T>
inline void load_row(const T* x, int64_t sd, float* o, int64_t D, Rot rot, bool inter) {
  const float *c = rot.c, *s = rot.s;
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(x[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(x[d * sd]);
  }
  if (!c) return;
  const int64_t P = D / 2;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t ia = inter ? 2 * i : i, ib = inter ? 2 * i + 1 : i + P;
    const float a = o[ia], b = o[ib];
    o[ia] = rnd<T>(a * c[i] - b * s[i]);
    o[ib] = rnd<T>(b * c[i] + a * s[i]);
  }
}

// fp32 row r[0..D) -> o (contiguous T); rotated by the NEGATIVE angle of rot if rot.c.
template <typename T>
inline void store_row(const float* r, T* o, int64_t D, Rot rot, bool inter) {
  const float *c = rot.c, *s = rot.s;
  if (!c) {
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(r[d]);
    return;
  }
  const int64_t P = D / 2;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t ia = inter ? 2 * i : i, ib = inter ? 2 * i + 1 : i + P;
    const float a = r[ia], b = r[ib];
    o[ia] = static_cast<T>(a * c[i] + b * s[i]);
    o[ib] = static_cast<T>(b * c[i] - a * s[i]);
  }
}

// ---- problem description --------------------------------------------------------------------
struct Strides {
  int64_t b, s, h, d;
};
inline Strides strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

struct Problem {
  int64_t B, Sq, Sk, H, D;
  const float* cos = nullptr;  // [L, D/2] or null
  const float* sin = nullptr;
  int64_t L = 0, rope_offset = 0;
  bool inter = true;
  int64_t fc_start = 0, fc_len = 0, fc_block = 0;  // fc_block 0: no mask
  float scale = 1.f;
  int64_t block_m = 64;
  int64_t chunks = 1;  // query-row chunks per (b, h)

  // table rows of position i (null where i is not rotated)
  Rot rot_at(int64_t i) const {
    const int64_t j = i - rope_offset;
    if (!cos || j < 0 || j >= L) return {};
    return {cos + j * (D / 2), sin + j * (D / 2)};
  }
  // query i sees keys [0, lim(i)) and [suffix(), Sk)
  int64_t lim(int64_t i) const {
    if (!fc_block) return Sk;
    const int64_t v = i - fc_start;
    if (v < 0 || v >= fc_len) return fc_start;
    return std::min(fc_start + fc_len, fc_start + (v / fc_block + 1) * fc_block);
  }
  int64_t suffix() const { return fc_block ? fc_start + fc_len : Sk; }
  // query rows of chunk c: [row_begin(c), row_begin(c + 1)), whole blocks
  int64_t row_begin(int64_t c) const {
    const int64_t nblk = (Sq + block_m - 1) / block_m;
    return std::min(Sq, (nblk * c / chunks) * block_m);
  }
};

// Key columns of a query block [i0, i1): [0, n1) and [s2, Sk); ncols = n1 + (Sk - s2).
struct Cols {
  int64_t n1, s2, n2;
  int64_t ncols() const { return n1 + n2; }
};
inline Cols cols_of(const Problem& p, int64_t i0, int64_t i1) {
  int64_t n1 = 0;
  for (int64_t i = i0; i < i1; ++i) n1 = std::max(n1, p.lim(i));
  const int64_t s2 = p.suffix();
  return {n1, s2, p.Sk - s2};
}

// Gathers the (b, h) keys (rotated) and values to fp32 [Sk, D] scratch.
template <typename T>
void gather_kv(const Problem& p, const T* k, Strides sk, const T* v, Strides sv, int64_t b,
               int64_t h, float* ks, float* vs) {
  const T* kb = k + b * sk.b + h * sk.h;
  const T* vb = v + b * sv.b + h * sv.h;
  for (int64_t j = 0; j < p.Sk; ++j) {
    load_row<T>(kb + j * sk.s, sk.d, ks + j * p.D, p.D, p.rot_at(j), p.inter);
    load_row<T>(vb + j * sv.s, sv.d, vs + j * p.D, p.D, Rot{}, p.inter);
  }
}

// z[r, :ncols] = scale * qs[r] . keys (the block's two column ranges), r < m.
void scores(const Problem& p, const Cols& cl, int64_t m, const float* qs, const float* ks,
            float* z, float alpha) {
  const int64_t D = p.D, ld = cl.ncols();
  gemm(false, true, m, cl.n1, D, alpha, qs, D, ks, D, 0.f, z, ld);
  if (cl.n2) gemm(false, true, m, cl.n2, D, alpha, qs, D, ks + cl.s2 * D, D, 0.f, z + cl.n1, ld);
}

// C[m, D] = P[m, ncols] . rows (keys or values) of the two column ranges (+ beta C).
void times_rows(const Cols& cl, int64_t m, int64_t D, float alpha, const float* P,
                const float* rows, float* C, int64_t ldc) {
  const int64_t ld = cl.ncols();
  gemm(false, false, m, D, cl.n1, alpha, P, ld, rows, D, 0.f, C, ldc);
  if (cl.n2) gemm(false, false, m, D, cl.n2, alpha, P + cl.n1, ld, rows + cl.s2 * D, D, 1.f, C, ldc);
}

// f(begin, end) for the column ranges row r of a block sees: [0, seen) and [n1, ncols), where
// seen = min(lim(row), n1); the columns [seen, n1) are masked.
template <typename F>
inline void for_visible(int64_t seen, const Cols& cl, const F& f) {
  f(int64_t(0), seen);
  f(cl.n1, cl.ncols());
}

// acc[rows of the two column ranges, D] += alpha P^T[ncols, m] . X[m, D]
void acc_rows(const Cols& cl, int64_t m, int64_t D, float alpha, const float* P, const float* X,
              float* acc) {
  const int64_t ld = cl.ncols();
  gemm(true, false, cl.n1, D, m, alpha, P, ld, X, D, 1.f, acc, D);
  if (cl.n2) gemm(true, false, cl.n2, D, m, alpha, P + cl.n1, ld, X, D, 1.f, acc + cl.s2 * D, D);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- forward --------------------------------------------------------------------------------
template <typename T>
void fwd_impl(const Problem& p, const T* q, Strides sq, const T* k, Strides sk, const T* v,
              Strides sv, T* out, float* lse) {
  const int64_t D = p.D, H = p.H, BM = p.block_m;
  const int64_t ntask = p.B * H * p.chunks;
  at::parallel_for(0, ntask, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ks(p.Sk * D), vs(p.Sk * D), z(BM * p.Sk), qs(BM * D), os(BM * D),
        inv(BM);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / p.chunks, chunk = task % p.chunks;
      const int64_t b = bh / H, h = bh % H;
      gather_kv<T>(p, k, sk, v, sv, b, h, ks.data(), vs.data());
      const T* qb = q + b * sq.b + h * sq.h;
      for (int64_t i0 = p.row_begin(chunk); i0 < p.row_begin(chunk + 1); i0 += BM) {
        const int64_t i1 = std::min(i0 + BM, p.Sq), m = i1 - i0;
        for (int64_t i = i0; i < i1; ++i)
          load_row<T>(qb + i * sq.s, sq.d, qs.data() + (i - i0) * D, D, p.rot_at(i), p.inter);
        const Cols cl = cols_of(p, i0, i1);
        const int64_t nc = cl.ncols();
        scores(p, cl, m, qs.data(), ks.data(), z.data(), p.scale);
        for (int64_t r = 0; r < m; ++r) {
          float* zr = z.data() + r * nc;
          const int64_t seen = std::min(p.lim(i0 + r), cl.n1);
          // max over the visible columns, and whether the row has a NaN
          vf vm = vset1(kNegInf);
          vi vnan = vi{0, 0, 0, 0, 0, 0, 0, 0};
          float mx = kNegInf;
          bool nan = false;
          for_visible(seen, cl, [&](int64_t c, int64_t e) {
            for (; c + kW <= e; c += kW) {
              const vf x = vload(zr + c);
              vm = vmax(vm, x);
              vnan |= x != x;
            }
            for (; c < e; ++c) {
              nan |= zr[c] != zr[c];
              mx = std::max(mx, zr[c]);
            }
          });
          mx = std::max(mx, hmax(vm));
          for (int64_t l = 0; l < kW; ++l) nan |= vnan[l] != 0;
          std::fill(zr + seen, zr + cl.n1, 0.f);  // masked
          const int64_t lrow = (b * p.Sq + i0 + r) * H + h;
          // NaN in: NaN out. As in the reference's softmax, a +inf score (exp(inf - inf)) or a
          // row whose visible scores are all -inf (overflow of q.k: 0 / 0) gives NaN too;
          // vexp_nonpos would turn inf - inf into a finite weight. (Every row sees a key.)
          if (nan || mx == kNegInf || mx == -kNegInf) {
            const float fill = std::numeric_limits<float>::quiet_NaN();
            std::fill(zr, zr + nc, fill);
            inv[r] = 1.f;
            lse[lrow] = fill;
            continue;
          }
          // exp, sum
          vf vsum = vset1(0.f);
          float sum = 0.f;
          const vf vmx = vset1(mx);
          for_visible(seen, cl, [&](int64_t c, int64_t e) {
            for (; c + kW <= e; c += kW) {
              const vf x = vexp_nonpos(vload(zr + c) - vmx);
              vstore(zr + c, x);
              vsum += x;
            }
            for (; c < e; ++c) {
              zr[c] = std::exp(zr[c] - mx);
              sum += zr[c];
            }
          });
          sum += hsum(vsum);
          inv[r] = 1.f / sum;
          lse[lrow] = mx + std::log(sum);
        }
        times_rows(cl, m, D, 1.f, z.data(), vs.data(), os.data(), D);
        for (int64_t r = 0; r < m; ++r) {
          const float* orow = os.data() + r * D;
          T* dst = out + ((b * p.Sq + i0 + r) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(orow[d] * inv[r]);
        }
      }
    }
  });
}

// ---- backward -------------------------------------------------------------------------------
template <typename T>
void bwd_impl(const Problem& p, const T* dout, Strides sdo, const T* q, Strides sq, const T* k,
              Strides sk, const T* v, Strides sv, const T* out, Strides so, const float* lse,
              T* dq, T* dk, T* dv, float* partial) {
  const int64_t D = p.D, H = p.H, BM = p.block_m, Sk = p.Sk;
  const int64_t ntask = p.B * H * p.chunks;
  at::parallel_for(0, ntask, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> ks(Sk * D), vs(Sk * D), z(BM * Sk), dpz(BM * Sk), qs(BM * D),
        dos(BM * D), dqs(BM * D), delta(BM), own(partial ? 0 : 2 * Sk * D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / p.chunks, chunk = task % p.chunks;
      const int64_t b = bh / H, h = bh % H;
      float* dks = partial ? partial + task * 2 * Sk * D : own.data();
      float* dvs = dks + Sk * D;
      std::fill(dks, dks + 2 * Sk * D, 0.f);
      gather_kv<T>(p, k, sk, v, sv, b, h, ks.data(), vs.data());
      const T* qb = q + b * sq.b + h * sq.h;
      const T* dob = dout + b * sdo.b + h * sdo.h;
      const T* ob = out + b * so.b + h * so.h;
      for (int64_t i0 = p.row_begin(chunk); i0 < p.row_begin(chunk + 1); i0 += BM) {
        const int64_t i1 = std::min(i0 + BM, p.Sq), m = i1 - i0;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = i - i0;
          load_row<T>(qb + i * sq.s, sq.d, qs.data() + r * D, D, p.rot_at(i), p.inter);
          float* dr = dos.data() + r * D;
          load_row<T>(dob + i * sdo.s, sdo.d, dr, D, Rot{}, p.inter);
          if constexpr (std::is_same_v<T, float>) {  // (16 bits: from p, below)
            const T* orow = ob + i * so.s;
            float acc = 0.f;
            for (int64_t d = 0; d < D; ++d) acc += dr[d] * static_cast<float>(orow[d * so.d]);
            delta[r] = acc;
          }
        }
        const Cols cl = cols_of(p, i0, i1);
        const int64_t nc = cl.ncols();
        scores(p, cl, m, qs.data(), ks.data(), z.data(), p.scale);
        scores(p, cl, m, dos.data(), vs.data(), dpz.data(), 1.f);  // dp = dout v^T
        for (int64_t r = 0; r < m; ++r) {
          float* zr = z.data() + r * nc;
          float* dr = dpz.data() + r * nc;
          const float l = lse[(b * p.Sq + i0 + r) * H + h];
          const int64_t seen = std::min(p.lim(i0 + r), cl.n1);
          if (l == kNegInf) {
            std::fill(zr, zr + nc, 0.f);
            std::fill(dr, dr + nc, 0.f);
            continue;
          }
          if (l != l) {  // NaN in the forward: NaN gradients
            std::fill(zr, zr + nc, l);
            std::fill(dr, dr + nc, l);
            continue;
          }
          const vf vl = vset1(l);
          if constexpr (!std::is_same_v<T, float>) {
            // 16 bits: delta = sum_j p dp over the whole row this block holds, with p
            // renormalised over it, not <dout, out> of the rounded out (its error came back in
            // dq times the keys' common component: bf16 dq half of max |dq| at a key offset of
            // 300); then sum_j ds is 0 to fp32 rounding, as it is exactly
            vf ps{}, pd{};
            float pss = 0.f, pds = 0.f;
            for_visible(seen, cl, [&](int64_t c, int64_t e) {
              for (; c + kW <= e; c += kW) {
                const vf x = vexp_nonpos(vload(zr + c) - vl);
                vstore(zr + c, x);
                ps += x;
                pd += x * vload(dr + c);
              }
              for (; c < e; ++c) {
                zr[c] = std::exp(zr[c] - l);
                pss += zr[c];
                pds += zr[c] * dr[c];
              }
            });
            const float inv = 1.f / (hsum(ps) + pss);  // (> 0: the row's largest p is ~1 / n)
            delta[r] = (hsum(pd) + pds) * inv;
            const vf vi = vset1(inv), vd = vset1(delta[r]);
            for_visible(seen, cl, [&](int64_t c, int64_t e) {
              for (; c + kW <= e; c += kW) {
                const vf x = vload(zr + c) * vi;
                vstore(zr + c, x);
                vstore(dr + c, x * (vload(dr + c) - vd));
              }
              for (; c < e; ++c) {
                zr[c] *= inv;
                dr[c] = zr[c] * (dr[c] - delta[r]);
              }
            });
          } else {
            const vf vd = vset1(delta[r]);
            for_visible(seen, cl, [&](int64_t c, int64_t e) {
              for (; c + kW <= e; c += kW) {
                const vf x = vexp_nonpos(vload(zr + c) - vl);
                vstore(zr + c, x);
                vstore(dr + c, x * (vload(dr + c) - vd));
              }
              for (; c < e; ++c) {
                zr[c] = std::exp(zr[c] - l);
                dr[c] = zr[c] * (dr[c] - delta[r]);
              }
            });
          }
          std::fill(zr + seen, zr + cl.n1, 0.f);  // masked
          std::fill(dr + seen, dr + cl.n1, 0.f);
        }
        acc_rows(cl, m, D, 1.f, z.data(), dos.data(), dvs);             // dv += p^T dout
        acc_rows(cl, m, D, p.scale, dpz.data(), qs.data(), dks);        // dk += scale ds^T q
        times_rows(cl, m, D, p.scale, dpz.data(), ks.data(), dqs.data(), D);  // dq = scale ds k
        for (int64_t i = i0; i < i1; ++i)
          store_row<T>(dqs.data() + (i - i0) * D, dq + ((b * p.Sq + i) * H + h) * D, D,
                       p.rot_at(i), p.inter);
      }
      if (!partial) {
        for (int64_t j = 0; j < Sk; ++j) {
          store_row<T>(dks + j * D, dk + ((b * Sk + j) * H + h) * D, D, p.rot_at(j), p.inter);
          store_row<T>(dvs + j * D, dv + ((b * Sk + j) * H + h) * D, D, Rot{}, p.inter);
        }
      }
    }
  });
  if (!partial) return;
  // sum the chunks' partial dk / dv, un-rotate, store
  at::parallel_for(0, p.B * H * Sk, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(2 * D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / Sk, j = r % Sk, b = bh / H, h = bh % H;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = 0; c < p.chunks; ++c) {
        const float* src = partial + (bh * p.chunks + c) * 2 * Sk * D;
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += src[j * D + d];
          acc[D + d] += src[(Sk + j) * D + d];
        }
      }
      store_row<T>(acc.data(), dk + ((b * Sk + j) * H + h) * D, D, p.rot_at(j), p.inter);
      store_row<T>(acc.data() + D, dv + ((b * Sk + j) * H + h) * D, D, Rot{}, p.inter);
    }
  });
}

// f(T{}) for the dtype (float32, float16, bfloat16; check_qkv rejects the others)
template <typename F>
void dispatch(at::ScalarType st, F&& f) {
  if (st == at::kFloat) f(float{});
  else if (st == at::kHalf) f(c10::Half{});
  else f(c10::BFloat16{});
}

// ---- checks and setup -----------------------------------------------------------------------
void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  for (const Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": q, k, v must be CPU tensors, got one on ",
                t->device());
    TORCH_CHECK(t->dim() == 4, op, ": q, k, v must be [B, S, H, D], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": q, k, v must share a dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
  }
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v shapes differ: ", k.sizes(), " vs ",
              v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), op,
              ": k/v ", k.sizes(), " do not match q ", q.sizes(), " in B, H, D");
  TORCH_CHECK(q.size(1) < (int64_t(1) << 30) && k.size(1) < (int64_t(1) << 30) &&
                  q.size(3) < 4096,
              op, ": sequence length or head_dim out of range");
}

void check_out(const char* op, const char* name, const Tensor& t, at::IntArrayRef shape,
               at::ScalarType st) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == st && t.sizes() == shape &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous CPU tensor of shape ", shape, " and dtype ",
              st, ", got ", t.sizes(), " ", t.scalar_type());
}

Problem make_problem(const char* op, const Tensor& q, const Tensor& k, const OptTensor& cos,
                     const OptTensor& sin, int64_t rope_offset, bool interleaved,
                     int64_t fc_start, int64_t fc_len, int64_t fc_block, double scale,
                     int64_t block_m, bool backward) {
  Problem p;
  p.B = q.size(0);
  p.Sq = q.size(1);
  p.H = q.size(2);
  p.D = q.size(3);
  p.Sk = k.size(1);
  p.inter = interleaved;
  p.scale = float(scale);
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": give both cos and sin or neither");
  if (cos.has_value()) {
    const int64_t P = p.D / 2;
    for (const Tensor* t : {&*cos, &*sin}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 &&
                      t->size(1) == P && t->is_contiguous() && t->size(0) == cos->size(0),
                  op, ": cos/sin must be contiguous float32 CPU [L, D/2] = [L, ", P,
                  "] tables of one length, got ", t->sizes(), " ", t->scalar_type());
    }
    TORCH_CHECK(p.D % 2 == 0, op, ": RoPE needs an even head_dim, got ", p.D);
    p.L = cos->size(0);
    TORCH_CHECK(rope_offset >= 0 && rope_offset + p.L <= p.Sq && p.Sq == p.Sk, op,
                ": RoPE needs self-attention and 0 <= rope_offset, rope_offset + L <= S; got "
                "rope_offset=", rope_offset, ", L=", p.L, ", S_q=", p.Sq, ", S_k=", p.Sk);
    p.cos = cos->data_ptr<float>();
    p.sin = sin->data_ptr<float>();
    p.rope_offset = rope_offset;
  }
  if (fc_block) {
    TORCH_CHECK(fc_block > 0 && fc_start >= 0 && fc_len >= 0 && fc_start + fc_len <= p.Sq &&
                    p.Sq == p.Sk,
                op, ": bad frame-causal range: fc_start=", fc_start, ", fc_len=", fc_len,
                ", fc_block=", fc_block, ", S_q=", p.Sq, ", S_k=", p.Sk);
    p.fc_start = fc_start;
    p.fc_len = fc_len;
    p.fc_block = fc_block;
  }
  TORCH_CHECK(block_m >= 0, op, ": block_m must be >= 0 (0: automatic), got ", block_m);
  if (block_m == 0) {
    // Measured on a 2-core Zen VM (S = 256 .. 2064, D = 64): 128 rows forward, 64 backward
    // (two score blocks) are the fastest, past the L2 size; the L3 holds the rest. Fewer rows
    // where a score block would pass 4 MiB (S_k > 8192 forward).
    block_m = backward ? 64 : 128;
    const int64_t per_row = (backward ? 2 : 1) * p.Sk * int64_t(sizeof(float));
    while (block_m > 16 && block_m * per_row > (int64_t(4) << 20)) block_m /= 2;
  }
  p.block_m = std::max<int64_t>(1, std::min(block_m, std::max<int64_t>(p.Sq, 1)));
  // enough tasks for the threads: split each (b, h) into chunks of whole blocks
  const int64_t nthreads = at::get_num_threads();
  const int64_t nblk = (p.Sq + p.block_m - 1) / p.block_m;
  const int64_t want = (2 * nthreads + p.B * p.H - 1) / std::max<int64_t>(1, p.B * p.H);
  p.chunks = std::max<int64_t>(1, std::min(want, nblk));
  return p;
}

void rope3d_attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& cos,
                         const OptTensor& sin, const Tensor& out, const Tensor& lse,
                         int64_t rope_offset, bool interleaved, int64_t fc_start, int64_t fc_len,
                         int64_t fc_block, double scale, int64_t block_m) {
  const char* op = "rope3d_attn_fwd_cpu";
  check_qkv(op, q, k, v);
  check_out(op, "out", out, q.sizes(), q.scalar_type());
  check_out(op, "lse", lse, {q.size(0), q.size(1), q.size(2)}, at::kFloat);
  const Problem p = make_problem(op, q, k, cos, sin, rope_offset, interleaved, fc_start, fc_len,
                                 fc_block, scale, block_m, false);
  if (q.numel() == 0) return;
  if (p.Sk == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return;
  }
  dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    fwd_impl<scalar_t>(p, q.const_data_ptr<scalar_t>(), strides_of(q),
                       k.const_data_ptr<scalar_t>(), strides_of(k), v.const_data_ptr<scalar_t>(),
                       strides_of(v), out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
}

void rope3d_attn_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                         const OptTensor& cos, const OptTensor& sin, const Tensor& out,
                         const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                         int64_t rope_offset, bool interleaved, int64_t fc_start, int64_t fc_len,
                         int64_t fc_block, double scale, int64_t block_m) {
  const char* op = "rope3d_attn_bwd_cpu";
  check_qkv(op, q, k, v);
  for (const Tensor* t : {&dout, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == q.scalar_type() &&
                    t->sizes() == q.sizes(),
                op, ": dout and out must be CPU tensors of q's shape ", q.sizes(), " and dtype ",
                q.scalar_type(), ", got ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}) &&
                  lse.is_contiguous(),
              op, ": lse must be a contiguous float32 [B, S_q, H] CPU tensor, got ", lse.sizes());
  check_out(op, "dq", dq, q.sizes(), q.scalar_type());
  check_out(op, "dk", dk, k.sizes(), q.scalar_type());
  check_out(op, "dv", dv, v.sizes(), q.scalar_type());
  const Problem p = make_problem(op, q, k, cos, sin, rope_offset, interleaved, fc_start, fc_len,
                                 fc_block, scale, block_m, true);
  if (q.numel() == 0 || p.Sk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return;
  }
  Tensor partial;
  if (p.chunks > 1)
    partial = at::empty({p.B * p.H * p.chunks * 2 * p.Sk * p.D}, q.options().dtype(at::kFloat));
  dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    bwd_impl<scalar_t>(p, dout.const_data_ptr<scalar_t>(), strides_of(dout),
                       q.const_data_ptr<scalar_t>(), strides_of(q), k.const_data_ptr<scalar_t>(),
                       strides_of(k), v.const_data_ptr<scalar_t>(), strides_of(v),
                       out.const_data_ptr<scalar_t>(), strides_of(out), lse.const_data_ptr<float>(),
                       dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                       partial.defined() ? partial.data_ptr<float>() : nullptr);
  });
}

}  // namespace

void register_attention_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("attention_cpu_gemm", [] { return std::string(use_blas() ? "blas" : "aten"); },
        "Which GEMM the CPU attention kernel calls: 'blas' (the sgemm_ torch links) or 'aten'.");
  m.def("rope3d_attn_fwd_cpu", &rope3d_attn_fwd_cpu,
        "RoPE-3D attention forward on CPU (kernel contract in vidgen_kernels/ops/rope3d_attention.py).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("out"),
        py::arg("lse"), py::arg("rope_offset"), py::arg("interleaved"), py::arg("fc_start"),
        py::arg("fc_len"), py::arg("fc_block"), py::arg("scale"), py::arg("block_m") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("rope3d_attn_bwd_cpu", &rope3d_attn_bwd_cpu,
        "RoPE-3D attention backward on CPU (kernel contract in vidgen_kernels/ops/rope3d_attention.py).",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"),
        py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("rope_offset"), py::arg("interleaved"), py::arg("fc_start"), py::arg("fc_len"),
        py::arg("fc_block"), py::arg("scale"), py::arg("block_m") = 0,
        py::call_guard<py::gil_scoped_release>());
}
