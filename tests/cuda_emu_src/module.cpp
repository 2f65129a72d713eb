// Python module of the CPU emulation of the CUDA kernels (tests/cuda_emu.py): the bindings of
// csrc/cuda_bindings.cpp (compiled with VIDGEN_CUDA_EMU: they take CPU tensors) plus the
// emulator's controls.
#include <torch/extension.h>

#include "vidgen_cuda_emu.h"

void register_adaln_cuda(pybind11::module_& m);
void register_rope_cuda(pybind11::module_& m);
void register_moe_cuda(pybind11::module_& m);
namespace vidgen_selftest {
std::pair<std::string, std::vector<float>> run(const std::string& name);
}

namespace {

// fn applied to each element of a contiguous tensor of dtype `in` -> a new tensor of dtype `out`.
template <typename In, typename Out, typename Fn>
at::Tensor convert(const at::Tensor& t, at::ScalarType in, at::ScalarType out, const char* name,
                   Fn fn) {
  TORCH_CHECK(t.scalar_type() == in && t.is_contiguous(), name, ": expected a contiguous ", in,
              " tensor, got ", t.scalar_type());
  at::Tensor r = at::empty(t.sizes(), t.options().dtype(out));
  const In* p = t.data_ptr<In>();
  Out* o = r.data_ptr<Out>();
  for (int64_t i = 0; i < t.numel(); ++i) o[i] = static_cast<Out>(fn(p[i]));
  return r;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_adaln_cuda(m);
  register_rope_cuda(m);
  register_moe_cuda(m);
  m.def("selftest", &vidgen_selftest::run,
        "Run one scenario of tests/cuda_emu_src/selftest.cu: (cudaGetLastError name, output)",
        pybind11::arg("name"));
  m.def("half_bits", [](const at::Tensor& f) {
    return convert<float, int16_t>(f, at::kFloat, at::kShort, "half_bits",
                                   [](float v) { return vidgen_emu::f32_to_half_bits(v); });
  }, "The emulator's float32 -> float16 conversion (__float2half_rn), as int16 bits");
  m.def("half_to_float", [](const at::Tensor& h) {
    return convert<int16_t, float>(h, at::kShort, at::kFloat, "half_to_float", [](int16_t v) {
      return vidgen_emu::half_bits_to_f32(static_cast<uint16_t>(v));
    });
  }, "The emulator's float16 -> float32 conversion (__half2float) of int16 bits");
  m.def("bf16_bits", [](const at::Tensor& f) {
    return convert<float, int16_t>(f, at::kFloat, at::kShort, "bf16_bits",
                                   [](float v) { return vidgen_emu::f32_to_bf16_bits(v); });
  }, "The emulator's float32 -> bfloat16 conversion (__float2bfloat16_rn), as int16 bits");
  m.def("set_schedule", [](bool reverse) { vidgen_emu::state().reverse = reverse; },
        "Run the threads of a block in reverse index order (true) or in index order (false)",
        pybind11::arg("reverse"));
  m.def("set_optin_smem", [](int64_t bytes) { vidgen_emu::state().optin_smem = bytes; },
        "The device's opt-in shared memory per block (bytes; H100: 232448, A100: 166912)",
        pybind11::arg("bytes"));
  m.def("reset", []() {
    vidgen_emu::State& s = vidgen_emu::state();
    s.stats = vidgen_emu::Stats();
    s.max_dyn_smem.clear();
    s.last_error = cudaSuccess;
  }, "Zero the statistics, forget cudaFuncSetAttribute calls, clear the last error");
  m.def("stats", []() {
    const vidgen_emu::Stats& t = vidgen_emu::state().stats;
    return pybind11::dict(pybind11::arg("launches") = t.launches, pybind11::arg("blocks") = t.blocks,
                          pybind11::arg("threads") = t.threads,
                          pybind11::arg("barriers") = t.barriers,
                          pybind11::arg("shuffles") = t.shuffles,
                          pybind11::arg("max_dyn_smem") = t.max_dyn_smem);
  }, "Launches, blocks, threads, barrier releases, shuffles and the largest dynamic shared "
     "memory of a launch since the last reset");
}
