// Python bindings of the CUDA AdaLN kernels: adaln_fwd_cuda / adaln_bwd_cuda in vidgen_kernels._C.
//
// Arguments: those of the kernel contract (top of vidgen_kernels/ops/adaln.py), in its order,
// plus the raw cudaStream_t as an integer (the Python side passes
// torch.cuda.current_stream(device).cuda_stream). Every precondition is TORCH_CHECKed here;
// the tensors' data pointers, sizes and strides then go to the plain-C++ launchers of
// csrc/adaln_cuda.h.
//
// Only <torch/extension.h> and our header are included (no ATen/cuda or c10/cuda), so this file
// also compiles against a CPU-only torch. The device is made current with c10::DeviceGuard,
// which dispatches to the CUDA guard implementation registered at run time by a CUDA torch.
//
// Streams: the given stream must be the current stream of x's device (what the Python layer
// passes): weight / bias given in a dtype other than float32, or non-contiguous, are converted
// to float32 contiguous by ATen on the current stream, and those temporaries are only kept alive
// stream-ordered with respect to the current stream.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "adaln_cuda.h"
#include "moe_cuda.h"
#include "rope_cuda.h"

// The tensors the kernels may touch: CUDA tensors, or CPU tensors in the tests' CPU emulation of
// the kernels (tests/cuda_emu.py compiles this file with VIDGEN_CUDA_EMU).
static inline bool on_device(const at::Tensor& t) {
#ifdef VIDGEN_CUDA_EMU
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

namespace {

namespace va = vidgen::adaln;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool kernel_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

va::DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat:
      return va::DType::kFloat32;
    case at::kHalf:
      return va::DType::kFloat16;
    case at::kBFloat16:
      return va::DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "adaln cuda: unsupported dtype ", s);
  return va::DType::kFloat32;  // not reached
}

void check_device(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(on_device(t), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device(), "; all tensors must be on one device");
}

// [B, N, C] input of x's dtype, any strides.
va::RowTensor row_input(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  check_device(op, name, t, x);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.sizes() == x.sizes(), op, ": ", name, " must have shape ",
              x.sizes(), ", got ", t.sizes());
  va::RowTensor r;
  r.ptr = t.data_ptr();
  r.sb = t.stride(0);
  r.sn = t.stride(1);
  r.sc = t.stride(2);
  return r;
}

// [Bp, F, C] modulation parameter, Bp in {1, B}, F >= 1 dividing N, any strides.
va::ParamTensor param_input(const char* op, const char* name, const Tensor& p, const Tensor& x) {
  check_device(op, name, p, x);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(p.dim() == 3, op, ": ", name, " must be [Bp, F, C], got shape ", p.sizes());
  TORCH_CHECK(p.size(2) == C, op, ": ", name, " has ", p.size(2), " channels, x has C=", C);
  TORCH_CHECK(p.size(0) == 1 || p.size(0) == B, op, ": ", name, " has batch ", p.size(0),
              ", expected 1 or B=", B);
  TORCH_CHECK(p.size(1) >= 1 && N % p.size(1) == 0, op, ": ", name, " has ", p.size(1),
              " rows along the token axis, which does not divide N=", N);
  va::ParamTensor r;
  r.ptr = p.data_ptr();
  r.size_b = p.size(0);
  r.size_f = p.size(1);
  r.sb = p.stride(0);
  r.sf = p.stride(1);
  r.sc = p.stride(2);
  return r;
}

// weight / bias: [C], dtype x's or float32, any stride -> float32 contiguous (kept alive by the
// returned tensor; undefined when absent).
Tensor affine_input(const char* op, const char* name, const OptTensor& w, const Tensor& x) {
  if (!w.has_value() || !w->defined()) return Tensor();
  check_device(op, name, *w, x);
  TORCH_CHECK(w->scalar_type() == x.scalar_type() || w->scalar_type() == at::kFloat, op, ": ",
              name, " must have x's dtype (", x.scalar_type(), ") or float32, got ",
              w->scalar_type());
  TORCH_CHECK(w->dim() == 1 && w->size(0) == x.size(2), op, ": ", name, " must be [C] = [",
              x.size(2), "], got shape ", w->sizes());
  return w->to(at::kFloat).contiguous();
}

// Output: given shape, dtype, contiguous.
void check_output(const char* op, const char* name, const Tensor& t, const Tensor& x,
                  at::IntArrayRef shape, at::ScalarType dtype) {
  check_device(op, name, t, x);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// [B, N] float32 statistics (input of the backward): any strides.
void check_stat_input(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  check_device(op, name, t, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), op, ": ", name,
              " must have shape [B, N] = [", x.size(0), ", ", x.size(1), "], got ", t.sizes());
}

// The kernels read inputs through the non-coherent cache and write outputs once: outputs must
// not share memory with inputs or with each other (checked where ATen can tell).
void check_no_overlap(const std::vector<const Tensor*>& outs,
                      const std::vector<const Tensor*>& ins) {
  for (size_t i = 0; i < outs.size(); ++i) {
    for (const Tensor* in : ins) at::assert_no_overlap(*outs[i], *in);
    for (size_t j = i + 1; j < outs.size(); ++j) at::assert_no_overlap(*outs[i], *outs[j]);
  }
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

const Tensor* opt_ptr(const OptTensor& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

void adaln_fwd_cuda(const Tensor& x, const OptTensor& y, const OptTensor& gate,
                    const Tensor& shift, const Tensor& scale, const OptTensor& weight,
                    const OptTensor& bias, const Tensor& out, const OptTensor& h,
                    const Tensor& mean, const Tensor& rstd, double eps, bool is_rms,
                    uint64_t stream) {
  const char* op = "adaln_fwd_cuda";
  TORCH_CHECK(on_device(x), op, ": x must be a CUDA tensor, got one on ", x.device());
  const c10::DeviceGuard guard(x.device());  // the weight / bias conversions and the launch
  TORCH_CHECK(kernel_dtype(x.scalar_type()), op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, N, C], got shape ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(C >= 1 && C <= va::kMaxChannels, op, ": C must be in [1, ", va::kMaxChannels,
              "], got ", C);
  const Tensor* yp = opt_ptr(y);
  const Tensor* gp = opt_ptr(gate);
  const Tensor* hp = opt_ptr(h);
  const bool gated = yp != nullptr;
  TORCH_CHECK(gated == (gp != nullptr) && gated == (hp != nullptr), op,
              ": y, gate and h must be given together (gated mode) or not at all");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);

  va::FwdArgs a;
  a.x_dtype = to_dtype(x.scalar_type());
  a.B = B;
  a.N = N;
  a.C = C;
  a.x = row_input(op, "x", x, x);
  a.shift = param_input(op, "shift", shift, x);
  a.scale = param_input(op, "scale", scale, x);
  const at::ScalarType pdt = shift.scalar_type();
  TORCH_CHECK(pdt == x.scalar_type() || pdt == at::kFloat, op,
              ": shift must have x's dtype (", x.scalar_type(), ") or float32, got ", pdt);
  TORCH_CHECK(scale.scalar_type() == pdt, op, ": scale must have shift's dtype ", pdt, ", got ",
              scale.scalar_type());
  a.param_dtype = to_dtype(pdt);
  if (gated) {
    a.y = row_input(op, "y", *yp, x);
    a.gate = param_input(op, "gate", *gp, x);
    TORCH_CHECK(gp->scalar_type() == pdt, op, ": gate must have shift's dtype ", pdt, ", got ",
                gp->scalar_type());
  }
  const Tensor w32 = affine_input(op, "weight", weight, x);
  const Tensor b32 = affine_input(op, "bias", bias, x);
  a.weight = w32.defined() ? w32.data_ptr<float>() : nullptr;
  a.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;

  check_output(op, "out", out, x, {B, N, C}, x.scalar_type());
  check_output(op, "mean", mean, x, {B, N}, at::kFloat);
  check_output(op, "rstd", rstd, x, {B, N}, at::kFloat);
  if (gated) check_output(op, "h", *hp, x, {B, N, C}, x.scalar_type());
  std::vector<const Tensor*> outs = {&out, &mean, &rstd};
  std::vector<const Tensor*> ins = {&x, &shift, &scale};
  if (gated) {
    outs.push_back(hp);
    ins.push_back(yp);
    ins.push_back(gp);
  }
  if (w32.defined()) ins.push_back(&w32);
  if (b32.defined()) ins.push_back(&b32);
  check_no_overlap(outs, ins);

  a.out = out.data_ptr();
  a.h = gated ? hp->data_ptr() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.eps = static_cast<float>(eps);
  a.is_rms = is_rms;
  if (B * N == 0) return;
  check_launch(op, va::adaln_fwd_launch(a, reinterpret_cast<cudaStream_t>(stream)));
}

// Parameter gradient buffer: None, per-token [B, N, C] contiguous (float32 / float16 /
// bfloat16), or partial [B, NC, 2, C] float32 contiguous (then R <= tpr).
va::ParamGrad grad_output(const char* op, const char* name, const OptTensor& g, const Tensor& x,
                          int64_t NC, int64_t tpr, int64_t R) {
  va::ParamGrad r;
  const Tensor* gp = opt_ptr(g);
  if (gp == nullptr) return r;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_device(op, name, *gp, x);
  TORCH_CHECK(gp->is_contiguous(), op, ": ", name, " must be contiguous");
  if (gp->dim() == 3) {
    TORCH_CHECK(gp->sizes() == at::IntArrayRef({B, N, C}), op, ": per-token ", name,
                " must have shape [B, N, C] = ", x.sizes(), ", got ", gp->sizes());
    TORCH_CHECK(kernel_dtype(gp->scalar_type()), op, ": per-token ", name,
                " must be float32, float16 or bfloat16, got ", gp->scalar_type());
    r.mode = va::GradMode::kPerToken;
    r.dtype = to_dtype(gp->scalar_type());
  } else {
    TORCH_CHECK(gp->dim() == 4 && gp->sizes() == at::IntArrayRef({B, NC, 2, C}), op, ": ", name,
                " must be a per-token [B, N, C] = [", B, ", ", N, ", ", C,
                "] or a partial [B, NC, 2, C] = [", B, ", ", NC, ", 2, ", C, "] buffer, got ",
                gp->sizes());
    TORCH_CHECK(gp->scalar_type() == at::kFloat, op, ": partial ", name,
                " must be float32, got ", gp->scalar_type());
    TORCH_CHECK(tpr >= R, op, ": tokens per parameter row for ", name, " (", tpr,
                ") must be >= rows_per_chunk (", R, ")");
    r.mode = va::GradMode::kPartial;
    r.dtype = va::DType::kFloat32;
    r.tpr = tpr;
  }
  r.ptr = gp->data_ptr();
  return r;
}

void adaln_bwd_cuda(const Tensor& dout, const OptTensor& dh, const Tensor& hx, const OptTensor& y,
                    const OptTensor& gate, const Tensor& scale, const OptTensor& weight,
                    const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                    const Tensor& dx, const OptTensor& dy, const OptTensor& dgate,
                    const OptTensor& dshift, const OptTensor& dscale, const OptTensor& dweight,
                    const OptTensor& dbias, int64_t tpr_gate, int64_t tpr_shift,
                    int64_t tpr_scale, int64_t rows_per_chunk, bool is_rms, uint64_t stream) {
  const char* op = "adaln_bwd_cuda";
  const Tensor& x = hx;  // the reference for shape, dtype and device
  TORCH_CHECK(on_device(x), op, ": hx must be a CUDA tensor, got one on ", x.device());
  const c10::DeviceGuard guard(x.device());  // the weight / bias conversions and the launch
  TORCH_CHECK(kernel_dtype(x.scalar_type()), op,
              ": hx must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": hx must be [B, N, C], got shape ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK(C >= 1 && C <= va::kMaxChannels, op, ": C must be in [1, ", va::kMaxChannels,
              "], got ", C);
  TORCH_CHECK(rows_per_chunk >= 1, op, ": rows_per_chunk must be >= 1, got ", rows_per_chunk);
  const int64_t R = rows_per_chunk;
  const int64_t NC = (N + R - 1) / R;
  const Tensor* dhp = opt_ptr(dh);
  const Tensor* yp = opt_ptr(y);
  const Tensor* gp = opt_ptr(gate);
  const Tensor* dyp = opt_ptr(dy);
  const Tensor* dwp = opt_ptr(dweight);
  const Tensor* dbp = opt_ptr(dbias);

  va::BwdArgs a;
  a.x_dtype = to_dtype(x.scalar_type());
  a.B = B;
  a.N = N;
  a.C = C;
  a.rows_per_chunk = R;
  a.is_rms = is_rms;
  a.hx = row_input(op, "hx", hx, x);
  a.dout = row_input(op, "dout", dout, x);
  if (dhp != nullptr) a.dh = row_input(op, "dh", *dhp, x);
  if (yp != nullptr) a.y = row_input(op, "y", *yp, x);
  a.scale = param_input(op, "scale", scale, x);
  const at::ScalarType pdt = scale.scalar_type();
  TORCH_CHECK(pdt == x.scalar_type() || pdt == at::kFloat, op,
              ": scale must have hx's dtype (", x.scalar_type(), ") or float32, got ", pdt);
  a.param_dtype = to_dtype(pdt);
  if (gp != nullptr) {
    a.gate = param_input(op, "gate", *gp, x);
    TORCH_CHECK(gp->scalar_type() == pdt, op, ": gate must have scale's dtype ", pdt, ", got ",
                gp->scalar_type());
  }
  const Tensor w32 = affine_input(op, "weight", weight, x);
  const Tensor b32 = affine_input(op, "bias", bias, x);
  a.weight = w32.defined() ? w32.data_ptr<float>() : nullptr;
  a.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
  check_stat_input(op, "mean", mean, x);
  check_stat_input(op, "rstd", rstd, x);
  a.mean = mean.data_ptr<float>();
  a.mean_sb = mean.stride(0);
  a.mean_sn = mean.stride(1);
  a.rstd = rstd.data_ptr<float>();
  a.rstd_sb = rstd.stride(0);
  a.rstd_sn = rstd.stride(1);

  check_output(op, "dx", dx, x, {B, N, C}, x.scalar_type());
  a.dx = dx.data_ptr();
  if (dyp != nullptr) {
    TORCH_CHECK(gp != nullptr, op, ": dy (= g * gate) needs gate");
    check_output(op, "dy", *dyp, x, {B, N, C}, x.scalar_type());
    a.dy = dyp->data_ptr();
  }
  TORCH_CHECK(tpr_gate >= 1 && tpr_shift >= 1 && tpr_scale >= 1, op,
              ": tokens per parameter row must be >= 1, got ", tpr_gate, ", ", tpr_shift, ", ",
              tpr_scale);
  a.dgate = grad_output(op, "dgate", dgate, x, NC, tpr_gate, R);
  a.dshift = grad_output(op, "dshift", dshift, x, NC, tpr_shift, R);
  a.dscale = grad_output(op, "dscale", dscale, x, NC, tpr_scale, R);
  TORCH_CHECK(a.dgate.mode == va::GradMode::kNone || yp != nullptr, op,
              ": dgate (= g * y) needs y");
  if (dwp != nullptr) {
    check_output(op, "dweight", *dwp, x, {B, NC, C}, at::kFloat);
    a.dweight = dwp->data_ptr<float>();
  }
  if (dbp != nullptr) {
    check_output(op, "dbias", *dbp, x, {B, NC, C}, at::kFloat);
    a.dbias = dbp->data_ptr<float>();
  }

  std::vector<const Tensor*> outs = {&dx};
  for (const OptTensor* o : {&dy, &dgate, &dshift, &dscale, &dweight, &dbias})
    if (const Tensor* p = opt_ptr(*o)) outs.push_back(p);
  std::vector<const Tensor*> ins = {&dout, &hx, &scale, &mean, &rstd};
  for (const Tensor* p : {dhp, yp, gp})
    if (p != nullptr) ins.push_back(p);
  if (w32.defined()) ins.push_back(&w32);
  if (b32.defined()) ins.push_back(&b32);
  check_no_overlap(outs, ins);
  if (B * N == 0) return;
  check_launch(op, va::adaln_bwd_launch(a, reinterpret_cast<cudaStream_t>(stream)));
}

}  // namespace

void register_adaln_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("adaln_fwd_cuda", &adaln_fwd_cuda,
        "Fused AdaLN forward (CUDA), kernel contract of vidgen_kernels.ops.adaln; fills out, h, "
        "mean, rstd on the given cudaStream_t",
        py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("shift"), py::arg("scale"),
        py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("h"), py::arg("mean"),
        py::arg("rstd"), py::arg("eps"), py::arg("is_rms"), py::arg("stream"));
  m.def("adaln_bwd_cuda", &adaln_bwd_cuda,
        "Fused AdaLN backward (CUDA), kernel contract of vidgen_kernels.ops.adaln; fills every "
        "given gradient buffer on the given cudaStream_t",
        py::arg("dout"), py::arg("dh"), py::arg("hx"), py::arg("y"), py::arg("gate"),
        py::arg("scale"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"),
        py::arg("dx"), py::arg("dy"), py::arg("dgate"), py::arg("dshift"), py::arg("dscale"),
        py::arg("dweight"), py::arg("dbias"), py::arg("tpr_gate"), py::arg("tpr_shift"),
        py::arg("tpr_scale"), py::arg("rows_per_chunk"), py::arg("is_rms"), py::arg("stream"));
}

// ---------------------------------------------------------------------------------------------
// RoPE (apply_rope): rope_cuda(x, cos, sin, out, offset, interleaved, conj, stream), the kernel
// contract of vidgen_kernels/ops/rope.py plus the raw cudaStream_t as an integer.
// ---------------------------------------------------------------------------------------------
namespace {

namespace vr = vidgen::rope;

void rope_check_table(const char* name, const at::Tensor& t, const at::Tensor& x) {
  const int64_t P = x.size(3) / 2;
  TORCH_CHECK(t.device() == x.device(), "rope_cuda: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "rope_cuda: ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == P, "rope_cuda: ", name, " must be [L, D/2] = [L, ", P,
              "], got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "rope_cuda: ", name, " must be contiguous");
}

void rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
               const at::Tensor& out, int64_t offset, bool interleaved, bool conj,
               uint64_t stream) {
  const char* op = "rope_cuda";
  TORCH_CHECK(on_device(x), op, ": x must be a CUDA tensor, got one on ", x.device());
  const c10::DeviceGuard guard(x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be [B, S, H, D], got shape ", x.sizes());
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(D >= 2 && D % 2 == 0, op, ": head dim D must be even and >= 2, got ", D);
  vr::DType dt = vr::DType::kFloat32;
  switch (x.scalar_type()) {
    case at::kFloat: dt = vr::DType::kFloat32; break;
    case at::kHalf: dt = vr::DType::kFloat16; break;
    case at::kBFloat16: dt = vr::DType::kBFloat16; break;
    default:
      TORCH_CHECK(false, op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  rope_check_table("cos", cos, x);
  rope_check_table("sin", sin, x);
  TORCH_CHECK(cos.size(0) == sin.size(0), op, ": cos has ", cos.size(0), " rows, sin ",
              sin.size(0));
  const int64_t L = cos.size(0);
  TORCH_CHECK(offset >= 0 && offset + L <= S, op, ": need 0 <= offset and offset + L <= S, got ",
              "offset=", offset, ", L=", L, ", S=", S);
  TORCH_CHECK(out.device() == x.device() && out.scalar_type() == x.scalar_type() &&
                  out.sizes() == x.sizes() && out.is_contiguous(),
              op, ": out must be a contiguous tensor on ", x.device(), " of x's shape ", x.sizes(),
              " and dtype ", x.scalar_type(), ", got ", out.sizes(), " ", out.scalar_type(),
              " on ", out.device());
  at::assert_no_overlap(out, x);
  vr::RopeArgs a;
  a.dtype = dt;
  a.B = B;
  a.S = S;
  a.H = H;
  a.D = D;
  a.x = x.data_ptr();
  a.sb = x.stride(0);
  a.ss = x.stride(1);
  a.sh = x.stride(2);
  a.sd = x.stride(3);
  a.cos = L > 0 ? cos.data_ptr<float>() : nullptr;
  a.sin = L > 0 ? sin.data_ptr<float>() : nullptr;
  a.L = L;
  a.offset = offset;
  a.out = out.data_ptr();
  a.interleaved = interleaved;
  a.conj = conj;
  if (x.numel() == 0) return;
  const cudaError_t err = vr::rope_launch(a, reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

}  // namespace

void register_rope_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("rope_cuda", &rope_cuda,
        "Rotary embedding (CUDA), out of place, kernel contract of vidgen_kernels.ops.rope; "
        "runs on the given cudaStream_t",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("offset"),
        py::arg("interleaved"), py::arg("conj"), py::arg("stream"));
}

// ---------------------------------------------------------------------------------------------
// MoE (moe_ffn) routing / permutation / weighted un-permutation: moe_route_cuda,
// moe_gather_cuda, moe_combine_cuda (contract: vidgen_kernels/ops/moe.py; launchers:
// csrc/moe_cuda.h). Outputs are allocated here on the inputs' device; `stream` is the current
// stream of that device as an integer.
// ---------------------------------------------------------------------------------------------

namespace {

namespace vm = vidgen::moe;

vm::DType moe_dtype(const char* op, at::ScalarType s) {
  switch (s) {
    case at::kFloat: return vm::DType::kFloat32;
    case at::kHalf: return vm::DType::kFloat16;
    case at::kBFloat16: return vm::DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", s);
  return vm::DType::kFloat32;  // not reached
}

void moe_check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(on_device(t) && t.device() == ref.device(), op, ": ", name, " must be on ",
              ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), op, ": ", name,
              " must be contiguous int64, got ", t.scalar_type());
}

void moe_check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits, int64_t top_k,
                                                  bool normalize, uint64_t stream) {
  const char* op = "moe_route_cuda";
  TORCH_CHECK(on_device(logits), op, ": logits must be a CUDA tensor, got one on ", logits.device());
  const c10::DeviceGuard guard(logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              op, ": logits must be a contiguous float32 [N, E] tensor, got ", logits.sizes(), " ",
              logits.scalar_type());
  const int64_t N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, op, ": top_k must be in [1, E=", E, "], got ", top_k);
  at::Tensor w = at::empty({N, top_k}, logits.options());
  at::Tensor idx = at::empty({N, top_k}, logits.options().dtype(at::kLong));
  moe_check_launch(op, vm::route_launch(logits.data_ptr<float>(), N, E, top_k, normalize,
                                        w.data_ptr<float>(), idx.data_ptr<int64_t>(),
                                        reinterpret_cast<cudaStream_t>(stream)));
  return {w, idx};
}

at::Tensor moe_gather_cuda(const at::Tensor& src, const at::Tensor& rows, uint64_t stream) {
  const char* op = "moe_gather_cuda";
  TORCH_CHECK(on_device(src), op, ": src must be a CUDA tensor, got one on ", src.device());
  const c10::DeviceGuard guard(src.device());
  TORCH_CHECK(src.dim() == 2, op, ": src must be [M, C], got ", src.sizes());
  moe_check_index(op, "rows", rows, src);
  TORCH_CHECK(rows.dim() == 1, op, ": rows must be [P], got ", rows.sizes());
  const vm::DType dt = moe_dtype(op, src.scalar_type());
  at::Tensor out = at::empty({rows.size(0), src.size(1)}, src.options());
  moe_check_launch(op, vm::gather_launch(dt, src.data_ptr(), src.size(0), src.size(1),
                                         src.stride(0), src.stride(1), rows.data_ptr<int64_t>(),
                                         rows.size(0), out.data_ptr(),
                                         reinterpret_cast<cudaStream_t>(stream)));
  return out;
}

at::Tensor moe_combine_cuda(const at::Tensor& y_, const at::Tensor& pos,
                            const std::optional<at::Tensor>& weights, uint64_t stream) {
  const char* op = "moe_combine_cuda";
  TORCH_CHECK(on_device(y_), op, ": y must be a CUDA tensor, got one on ", y_.device());
  const c10::DeviceGuard guard(y_.device());
  TORCH_CHECK(y_.dim() == 2, op, ": y must be [P, C], got ", y_.sizes());
  const at::Tensor y = y_.contiguous();
  moe_check_index(op, "pos", pos, y);
  TORCH_CHECK(pos.dim() == 2 && pos.size(1) >= 1, op, ": pos must be [N, k], got ", pos.sizes());
  const vm::DType dt = moe_dtype(op, y.scalar_type());
  const float* wp = nullptr;
  at::Tensor w;
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK(weights->device() == y.device() && weights->scalar_type() == at::kFloat &&
                    weights->sizes() == pos.sizes(),
                op, ": weights must be float32 of pos's shape ", pos.sizes(), " on ", y.device());
    w = weights->contiguous();
    wp = w.data_ptr<float>();
  }
  at::Tensor out = at::empty({pos.size(0), y.size(1)}, y.options());
  moe_check_launch(op, vm::combine_launch(dt, y.data_ptr(), y.size(0), y.size(1),
                                          pos.data_ptr<int64_t>(), wp, pos.size(0), pos.size(1),
                                          out.data_ptr(), reinterpret_cast<cudaStream_t>(stream)));
  return out;
}

// "" when this build's CUDA kernels can run on CUDA device `index`, else why (the CUDA error)
std::string cuda_kernel_image_error(int64_t index) {
#ifndef VIDGEN_CUDA_EMU
  const c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<int8_t>(index)));
#endif
  const cudaError_t err = vm::kernel_image_check();
  if (err == cudaSuccess) return "";
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

}  // namespace

void register_moe_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cuda_kernel_image_error", &cuda_kernel_image_error,
        "'' if the CUDA kernels of this build run on CUDA device `index`, else the CUDA error "
        "(e.g. no kernel image for the device's architecture)", py::arg("index"));
  m.def("moe_route_cuda", &moe_route_cuda, "MoE fused softmax/top-k/renormalise (CUDA)",
        py::arg("logits"), py::arg("top_k"), py::arg("normalize"), py::arg("stream"));
  m.def("moe_gather_cuda", &moe_gather_cuda, "MoE permutation: rows of src (CUDA)",
        py::arg("src"), py::arg("rows"), py::arg("stream"));
  m.def("moe_combine_cuda", &moe_combine_cuda, "MoE weighted un-permute (CUDA)", py::arg("y"),
        py::arg("pos"), py::arg("weights"), py::arg("stream"));
}
