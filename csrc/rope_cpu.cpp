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
 * - at::parallel_for over the B*S tokens; rows with a unit last stride take a loop the compiler
 *   vectorises, other strides a scalar loop.
 */
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

template <typename T, bool INTER, bool CONJ, bool UNIT>
inline void rotate_row(const T* __restrict x, int64_t sd, T* __restrict o,
                       const tab_t<T>* __restrict c, const tab_t<T>* __restrict s, int64_t P) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t ia = INTER ? 2 * i : i;
    const int64_t ib = INTER ? 2 * i + 1 : i + P;
    const A a = static_cast<A>(UNIT ? x[ia] : x[ia * sd]);
    const A b = static_cast<A>(UNIT ? x[ib] : x[ib * sd]);
    const A cc = static_cast<A>(c[i]);
    const A ss = CONJ ? -static_cast<A>(s[i]) : static_cast<A>(s[i]);
    o[ia] = static_cast<T>(a * cc - b * ss);
    o[ib] = static_cast<T>(b * cc + a * ss);
  }
}

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
        if (sd == 1)
          rotate_row<T, INTER, CONJ, true>(xr + h * sh, 1, orow + h * oh, c, sn, P);
        else
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
