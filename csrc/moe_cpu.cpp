/*
 * Grouped-GEMM Mixture-of-Experts (moe_ffn): C++ CPU backend (OpenMP through at::parallel_for).
 *
 * Implements the MoE kernel contract written in vidgen_kernels/ops/moe.py (kernel_*_torch there
 * is the same contract in PyTorch):
 *
 *   moe_route_cpu(logits [N, E] f32 contiguous, top_k, normalize) -> (weights f32 [N, k],
 *                 idx i64 [N, k])   fused softmax / top-k (ties: lowest index) / renormalise
 *   moe_sort_cpu(idx [N, k] i64, E) -> (order [P], tok [P], pos [N, k], counts [E], offs [E])
 *                 stable counting sort of the P = N*k (token, slot) pairs by expert
 *   moe_gather_cpu(src [M, C] any strides, rows [P]) -> [P, C] contiguous   (permutation)
 *   moe_combine_cpu(y [P, C], pos [N, k], weights f32 [N, k] or None) -> [N, C]
 *                 out[n] = sum_j w[n, j] y[pos[n, j]], slot order, fp32 (fp64) accumulation
 *   moe_combine_wgrad_cpu(dout [N, C], y [P, C], pos [N, k]) -> f32 [N, k]
 *                 dw[n, j] = <dout[n], y[pos[n, j]]>
 *   moe_gmm_cpu(a [P, K], w [E, K, M] any strides, offs [E] i64 cumulative ends,
 *               bias [E, M] or None) -> [P, M]   a_e @ w[e] (+ bias[e])
 *                 one at::mm_out / addmm_out per non-empty expert segment (the loop over experts is here,
 *                 in C++, not in Python; each GEMM is BLAS-sized)
 *   moe_gmm_wgrad_cpu(a [P, K], dy [P, M], offs, E) -> [E, K, M]   a_e^T dy_e, zero if empty
 *   moe_act_gelu_cpu(pre [P, M] f32, gated) -> hid f32 [P, M] (gated: [P, M/2])
 *                 tanh-approximation GELU, gated: gelu(a) * b with a, b the two column halves
 *   moe_act_gelu_bwd_cpu(dhid [P, M or M/2] f32, pre [P, M] f32, gated, inplace) -> dpre [P, M]
 *                 dhid * gelu'(pre) (gated: [dhid * b * gelu'(a), dhid * gelu(a)]); inplace
 *                 (plain only): written over dhid
 *                 (PyTorch's CPU tanh is ~10x slower than a copy of the same bytes; these are
 *                 one vectorised pass each: gelu(x) = x * sigmoid(2u),
 *                 u = sqrt(2/pi)(x + 0.044715 x^3))
 *
 * Dtypes: float32, float16, bfloat16, float64 for the data tensors.
 */
#include <ATen/ThreadLocalState.h>
#include <torch/extension.h>

#include "cpu_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check_cpu(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ",
              t.device());
}

void check_index(const char* op, const char* name, const Tensor& t) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_data(const char* op, const char* name, const Tensor& t) {
  check_cpu(op, name, t);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", st);
}

std::tuple<Tensor, Tensor> moe_route_cpu(const Tensor& logits, int64_t top_k, bool normalize) {
  const char* op = "moe_route_cpu";
  check_cpu(op, "logits", logits);
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.dim() == 2,
              op, ": logits must be a contiguous float32 [N, E] tensor, got ", logits.sizes(),
              " ", logits.scalar_type());
  const int64_t N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, op, ": top_k must be in [1, E=", E, "], got ", top_k);
  Tensor w = at::empty({N, top_k}, logits.options());
  Tensor idx = at::empty({N, top_k}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, E)),
                   [&](int64_t begin, int64_t end) {
    std::vector<char> taken(E);
    for (int64_t n = begin; n < end; ++n) {
      const float* l = lp + n * E;
      float mx = -INFINITY;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += std::exp(l[e] - mx);
      std::fill(taken.begin(), taken.end(), 0);
      float ssel = 0.f;
      for (int64_t j = 0; j < top_k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
          if (taken[e]) continue;
          // strict: ties keep the lowest index; NaN above every number (torch.sort's order)
          const float a = l[e], b = l[best < 0 ? 0 : best];
          if (best < 0 || (a != a ? b == b : a > b)) best = e;
        }
        taken[best] = 1;
        const float p = std::exp(l[best] - mx) / sum;
        ip[n * top_k + j] = best;
        wp[n * top_k + j] = p;
        ssel += p;
      }
      if (normalize) {
        for (int64_t j = 0; j < top_k; ++j) wp[n * top_k + j] /= ssel;
      }
    }
  });
  return {w, idx};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_sort_cpu(const Tensor& idx, int64_t E) {
  const char* op = "moe_sort_cpu";
  check_index(op, "idx", idx);
  TORCH_CHECK(idx.dim() == 2, op, ": idx must be [N, k], got ", idx.sizes());
  TORCH_CHECK(E >= 1, op, ": E must be >= 1, got ", E);
  const int64_t N = idx.size(0), k = idx.size(1), P = N * k;
  auto opt = idx.options();
  Tensor order = at::empty({P}, opt), tok = at::empty({P}, opt), pos = at::empty({N, k}, opt);
  Tensor counts = at::zeros({E}, opt), offs = at::empty({E}, opt);
  const int64_t* ip = idx.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = ip[p];
    TORCH_CHECK(e >= 0 && e < E, op, ": expert index ", e, " out of range [0, ", E, ")");
    ++cp[e];
  }
  int64_t* of = offs.data_ptr<int64_t>();
  std::vector<int64_t> cursor(E);
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    cursor[e] = run;
    run += cp[e];
    of[e] = run;
  }
  int64_t* op_ = order.data_ptr<int64_t>();
  int64_t* tp = tok.data_ptr<int64_t>();
  int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {  // stable: pairs keep their (token, slot) order
    const int64_t r = cursor[ip[p]]++;
    op_[r] = p;
    tp[r] = p / k;
    pp[p] = r;
  }
  return {order, tok, pos, counts, offs};
}

Tensor moe_gather_cpu(const Tensor& src, const Tensor& rows) {
  const char* op = "moe_gather_cpu";
  check_data(op, "src", src);
  check_index(op, "rows", rows);
  TORCH_CHECK(src.dim() == 2 && rows.dim() == 1, op, ": src must be [M, C] and rows [P], got ",
              src.sizes(), " and ", rows.sizes());
  const int64_t M = src.size(0), C = src.size(1), P = rows.size(0);
  Tensor out = at::empty({P, C}, src.options());
  if (P == 0 || C == 0) return out;
  const int64_t s0 = src.stride(0), s1 = src.stride(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "moe_gather_cpu", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t r = rp[p];
        TORCH_CHECK(r >= 0 && r < M, op, ": row ", r, " out of range [0, ", M, ")");
        const scalar_t* s = sp + r * s0;
        scalar_t* d = o + p * C;
        if (s1 == 1) {
          std::memcpy(d, s, sizeof(scalar_t) * C);
        } else {
          for (int64_t c = 0; c < C; ++c) d[c] = s[c * s1];
        }
      }
    });
  });
  return out;
}

Tensor moe_combine_cpu(const Tensor& y_, const Tensor& pos, const std::optional<Tensor>& weights) {
  const char* op = "moe_combine_cpu";
  check_data(op, "y", y_);
  check_index(op, "pos", pos);
  TORCH_CHECK(y_.dim() == 2 && pos.dim() == 2, op, ": y must be [P, C] and pos [N, k], got ",
              y_.sizes(), " and ", pos.sizes());
  const Tensor y = y_.contiguous();
  const int64_t P = y.size(0), C = y.size(1), N = pos.size(0), k = pos.size(1);
  const bool has_w = weights.has_value() && weights->defined();
  Tensor w;
  if (has_w) {
    check_cpu(op, "weights", *weights);
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->sizes() == pos.sizes(), op,
                ": weights must be float32 of pos's shape ", pos.sizes(), ", got ",
                weights->sizes(), " ", weights->scalar_type());
    w = weights->contiguous();
  }
  Tensor out = at::empty({N, C}, y.options());
  if (N == 0 || C == 0) return out;
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* wp = has_w ? w.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_combine_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, C * k)),
                     [&](int64_t b, int64_t e) {
      std::vector<A> acc(C);
      for (int64_t n = b; n < e; ++n) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = pp[n * k + j];
          TORCH_CHECK(r >= 0 && r < P, op, ": pos ", r, " out of range [0, ", P, ")");
          const A wj = has_w ? static_cast<A>(wp[n * k + j]) : A(1);
          const scalar_t* yr = yp + r * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += wj * static_cast<A>(yr[c]);
        }
        scalar_t* orow = o + n * C;
        for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

Tensor moe_combine_wgrad_cpu(const Tensor& dout_, const Tensor& y_, const Tensor& pos) {
  const char* op = "moe_combine_wgrad_cpu";
  check_data(op, "dout", dout_);
  check_data(op, "y", y_);
  check_index(op, "pos", pos);
  TORCH_CHECK(dout_.scalar_type() == y_.scalar_type(), op, ": dout and y must share a dtype");
  const Tensor dout = dout_.contiguous(), y = y_.contiguous();
  const int64_t P = y.size(0), C = y.size(1), N = pos.size(0), k = pos.size(1);
  TORCH_CHECK(dout.dim() == 2 && dout.size(0) == N && dout.size(1) == C, op,
              ": dout must be [N, C] = [", N, ", ", C, "], got ", dout.sizes());
  Tensor dw = at::empty({N, k}, y.options().dtype(at::kFloat));
  if (N == 0) return dw;
  const int64_t* pp = pos.data_ptr<int64_t>();
  float* dwp = dw.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_combine_wgrad_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* dp = dout.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, C * k)),
                     [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const scalar_t* d = dp + n * C;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = pp[n * k + j];
          TORCH_CHECK(r >= 0 && r < P, op, ": pos ", r, " out of range [0, ", P, ")");
          const scalar_t* yr = yp + r * C;
          A s = 0;
          for (int64_t c = 0; c < C; ++c) s += static_cast<A>(d[c]) * static_cast<A>(yr[c]);
          dwp[n * k + j] = static_cast<float>(s);
        }
      }
    });
  });
  return dw;
}

std::vector<int64_t> host_offsets(const char* op, const Tensor& offs, int64_t E, int64_t P) {
  check_index(op, "offs", offs);
  TORCH_CHECK(offs.dim() == 1 && offs.size(0) == E, op, ": offs must be [E] = [", E, "], got ",
              offs.sizes());
  std::vector<int64_t> v(offs.data_ptr<int64_t>(), offs.data_ptr<int64_t>() + E);
  int64_t prev = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(v[e] >= prev && v[e] <= P, op, ": offs must be non-decreasing in [0, P=", P,
                "], got offs[", e, "]=", v[e]);
    prev = v[e];
  }
  return v;
}

// Runs fn(e, start, rows) once for every expert e (rows = its segment length, 0 if empty).
// Few large segments: one after the other, each GEMM using every thread (BLAS threads it).
// Many small ones (E >= 2 threads and under kSmallSegment rows on average): BLAS gains little
// from a second thread on a GEMM of 64-256 rows (2-core EPYC, K=256, M=512: 87 GFLOP/s on
// one thread, 89 on two at 64 rows), so the experts are split across threads instead, in
// contiguous runs of about P / threads rows each, each GEMM on its thread alone (BLAS inside
// a parallel region runs single-threaded). Measured on that machine: E=64 x 64 rows
// 78-115 -> 115-138 GFLOP/s, E=64 x 256 rows 85-96 -> 107-117; at 1024-2048 rows BLAS's own
// threading is faster (115-119 vs 131-138), at 512 they tie.
constexpr int64_t kSmallSegment = 512;

template <typename Fn>
void for_each_expert(const std::vector<int64_t>& ends, int64_t P, const Fn& fn) {
  const int64_t E = static_cast<int64_t>(ends.size());
  const int64_t T = at::get_num_threads();
  if (T < 2 || E < 2 * T || P >= kSmallSegment * E) {
    int64_t start = 0;
    for (int64_t e = 0; e < E; ++e) {
      fn(e, start, ends[e] - start);
      start = ends[e];
    }
    return;
  }
  // task t owns the experts whose segment starts in [t * P / T, (t + 1) * P / T) (the last
  // task also those starting at P: empty experts at the end). The worker threads get the
  // caller's thread-local state (grad mode off inside an autograd.Function, inference mode,
  // dispatch keys): without it, the out= GEMMs of a worker see grad mode on and raise.
  const at::ThreadLocalState tls;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard guard(tls);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = t * P / T, hi = t + 1 == T ? P + 1 : (t + 1) * P / T;
      int64_t start = 0;
      for (int64_t e = 0; e < E; ++e) {
        if (start >= lo && start < hi) fn(e, start, ends[e] - start);
        start = ends[e];
      }
    }
  });
}

Tensor moe_gmm_cpu(const Tensor& a, const Tensor& w, const Tensor& offs,
                   const std::optional<Tensor>& bias) {
  const char* op = "moe_gmm_cpu";
  check_data(op, "a", a);
  check_data(op, "w", w);
  TORCH_CHECK(a.scalar_type() == w.scalar_type(), op, ": a and w must share a dtype, got ",
              a.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(a.dim() == 2 && w.dim() == 3 && w.size(1) == a.size(1), op,
              ": a must be [P, K] and w [E, K, M], got ", a.sizes(), " and ", w.sizes());
  const int64_t P = a.size(0), E = w.size(0), M = w.size(2);
  const auto ends = host_offsets(op, offs, E, P);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cpu(op, "bias", *bias);
    TORCH_CHECK(bias->scalar_type() == a.scalar_type() && bias->dim() == 2 &&
                    bias->size(0) == E && bias->size(1) == M,
                op, ": bias must be [E, M] = [", E, ", ", M, "] of a's dtype, got ", bias->sizes(),
                " ", bias->scalar_type());
  }
  Tensor out = at::empty({P, M}, a.options());
  for_each_expert(ends, P, [&](int64_t e, int64_t start, int64_t n) {
    if (n == 0) return;
    Tensor o = out.narrow(0, start, n);
    if (has_bias) {  // bias in the GEMM's epilogue (beta * bias broadcast over the rows)
      at::addmm_out(o, bias->select(0, e).unsqueeze(0), a.narrow(0, start, n), w.select(0, e));
    } else {
      at::mm_out(o, a.narrow(0, start, n), w.select(0, e));
    }
  });
  const int64_t start = E > 0 ? ends[E - 1] : 0;
  if (start < P) out.narrow(0, start, P - start).zero_();  // rows past the last expert
  return out;
}

Tensor moe_gmm_wgrad_cpu(const Tensor& a, const Tensor& dy, const Tensor& offs, int64_t E) {
  const char* op = "moe_gmm_wgrad_cpu";
  check_data(op, "a", a);
  check_data(op, "dy", dy);
  TORCH_CHECK(a.scalar_type() == dy.scalar_type(), op, ": a and dy must share a dtype");
  TORCH_CHECK(a.dim() == 2 && dy.dim() == 2 && a.size(0) == dy.size(0), op,
              ": a must be [P, K] and dy [P, M], got ", a.sizes(), " and ", dy.sizes());
  const int64_t P = a.size(0), K = a.size(1), M = dy.size(1);
  const auto ends = host_offsets(op, offs, E, P);
  Tensor out = at::empty({E, K, M}, a.options());
  for_each_expert(ends, P, [&](int64_t e, int64_t start, int64_t n) {
    Tensor o = out.select(0, e);
    if (n > 0) {
      at::mm_out(o, a.narrow(0, start, n).t(), dy.narrow(0, start, n));
    } else {
      o.zero_();
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// tanh-approximation GELU and its derivative (fp32): gelu(x) = 0.5 x (1 + tanh(u)) = x s with
// s = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); gelu'(x) = s + x s (1 - s) 2u'(x).
// ---------------------------------------------------------------------------------------------
using vidgen_cpu::kW;
using vidgen_cpu::vf;
using vidgen_cpu::vload;
using vidgen_cpu::vset1;
using vidgen_cpu::vstore;

constexpr float kGeluC0 = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluC1 = 0.044715f;

inline vf gelu_sig(vf x) {  // sigmoid(2u(x))
  const vf m2u = x * (vset1(-2.0f * kGeluC0) + (-2.0f * kGeluC0 * kGeluC1) * (x * x));
  return 1.0f / (1.0f + vidgen_cpu::vexp(m2u));
}
inline float gelu_sig(float x) {
  const float m2u = x * (-2.0f * kGeluC0 - 2.0f * kGeluC0 * kGeluC1 * x * x);
  return 1.0f / (1.0f + std::exp(std::min(m2u, 88.0f)));
}
// gelu'(x) from s = gelu_sig(x) (vf or float): s + x s (1 - s) 2u'(x)
template <typename V>
inline V gelu_grad(V x, V s) {
  return s + x * s * (1.0f - s) * (2.0f * kGeluC0 + (2.0f * kGeluC0 * 3.0f * kGeluC1) * (x * x));
}

void check_act_2d(const char* op, const char* name, const Tensor& t) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [P, M], got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have unit column stride, got strides ", t.strides());
}

int64_t act_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

Tensor moe_act_gelu_cpu(const Tensor& pre, bool gated) {
  const char* op = "moe_act_gelu_cpu";
  check_act_2d(op, "pre", pre);
  const int64_t P = pre.size(0), M = pre.size(1);
  TORCH_CHECK(!gated || M % 2 == 0, op, ": gated activations need an even column count, got ", M);
  const int64_t F = gated ? M / 2 : M;
  Tensor out = at::empty({P, F}, pre.options());
  const float* src = pre.data_ptr<float>();
  const int64_t ld = pre.stride(0);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P, act_grain(F), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = src + r * ld;
      const float* b = a + F;
      float* o = dst + r * F;
      int64_t j = 0;
      for (; j + kW <= F; j += kW) {
        const vf x = vload(a + j), h = x * gelu_sig(x);
        vstore(o + j, gated ? h * vload(b + j) : h);
      }
      for (; j < F; ++j) {
        const float h = a[j] * gelu_sig(a[j]);
        o[j] = gated ? h * b[j] : h;
      }
    }
  });
  return out;
}

Tensor moe_act_gelu_bwd_cpu(const Tensor& dhid, const Tensor& pre, bool gated, bool inplace) {
  const char* op = "moe_act_gelu_bwd_cpu";
  check_act_2d(op, "pre", pre);
  check_act_2d(op, "dhid", dhid);
  const int64_t P = pre.size(0), M = pre.size(1);
  TORCH_CHECK(!gated || M % 2 == 0, op, ": gated activations need an even column count, got ", M);
  const int64_t F = gated ? M / 2 : M;
  TORCH_CHECK(dhid.size(0) == P && dhid.size(1) == F, op, ": dhid must be [", P, ", ", F,
              "], got ", dhid.sizes());
  TORCH_CHECK(!inplace || !gated, op, ": inplace needs a plain (not gated) activation");
  Tensor out = inplace ? dhid : at::empty({P, M}, pre.options());
  const float* z = pre.data_ptr<float>();
  const float* g = dhid.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t ldz = pre.stride(0), ldg = dhid.stride(0), ldo = out.stride(0);
  at::parallel_for(0, P, act_grain(M), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = z + r * ldz;
      const float* b = a + F;
      const float* gr = g + r * ldg;
      float* o = dst + r * ldo;
      int64_t j = 0;
      if (!gated) {
        for (; j + kW <= F; j += kW) {
          const vf x = vload(a + j);
          vstore(o + j, vload(gr + j) * gelu_grad(x, gelu_sig(x)));
        }
        for (; j < F; ++j) o[j] = gr[j] * gelu_grad(a[j], gelu_sig(a[j]));
        continue;
      }
      for (; j + kW <= F; j += kW) {
        const vf x = vload(a + j), gv = vload(gr + j), s = gelu_sig(x);
        vstore(o + j, gv * vload(b + j) * gelu_grad(x, s));
        vstore(o + F + j, gv * (x * s));
      }
      for (; j < F; ++j) {
        const float s = gelu_sig(a[j]);
        o[j] = gr[j] * b[j] * gelu_grad(a[j], s);
        o[F + j] = gr[j] * (a[j] * s);
      }
    }
  });
  return out;
}

}  // namespace

void register_moe_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  const auto rel = py::call_guard<py::gil_scoped_release>();
  m.def("moe_route_cpu", &moe_route_cpu, "MoE fused softmax/top-k/renormalise (CPU)",
        py::arg("logits"), py::arg("top_k"), py::arg("normalize"), rel);
  m.def("moe_sort_cpu", &moe_sort_cpu, "MoE counting sort of (token, slot) pairs by expert (CPU)",
        py::arg("idx"), py::arg("num_experts"), rel);
  m.def("moe_gather_cpu", &moe_gather_cpu, "MoE permutation: rows of src (CPU)", py::arg("src"),
        py::arg("rows"), rel);
  m.def("moe_combine_cpu", &moe_combine_cpu, "MoE weighted un-permute (CPU)", py::arg("y"),
        py::arg("pos"), py::arg("weights"), rel);
  m.def("moe_combine_wgrad_cpu", &moe_combine_wgrad_cpu,
        "MoE gradient of the combine weights (CPU)", py::arg("dout"), py::arg("y"),
        py::arg("pos"), rel);
  m.def("moe_gmm_cpu", &moe_gmm_cpu, "MoE grouped GEMM over expert segments (CPU)", py::arg("a"),
        py::arg("w"), py::arg("offs"), py::arg("bias"), rel);
  m.def("moe_gmm_wgrad_cpu", &moe_gmm_wgrad_cpu,
        "MoE grouped weight-gradient GEMM a_e^T dy_e (CPU)", py::arg("a"), py::arg("dy"),
        py::arg("offs"), py::arg("num_experts"), rel);
  m.def("moe_act_gelu_cpu", &moe_act_gelu_cpu,
        "MoE tanh-GELU (gated: gelu(a) * b) of the pre-activation (CPU, fp32)", py::arg("pre"),
        py::arg("gated"), rel);
  m.def("moe_act_gelu_bwd_cpu", &moe_act_gelu_bwd_cpu,
        "MoE gradient of the tanh-GELU w.r.t. the pre-activation (CPU, fp32)", py::arg("dhid"),
        py::arg("pre"), py::arg("gated"), py::arg("inplace"), rel);
}
