// Python module vidgen_kernels._C: each kernel family registers its functions here.
// CPU kernels are always compiled; CUDA ones only when setup.py defines VIDGEN_WITH_CUDA.
#include <torch/extension.h>

void register_adaln_cpu(pybind11::module_& m);
void register_temporal_attention_cpu(pybind11::module_& m);
void register_rope_cpu(pybind11::module_& m);
void register_moe_cpu(pybind11::module_& m);
void register_attention_cpu(pybind11::module_& m);
#ifdef VIDGEN_WITH_CUDA
void register_adaln_cuda(pybind11::module_& m);
void register_rope_cuda(pybind11::module_& m);
void register_moe_cuda(pybind11::module_& m);
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vidgen-kernels compiled kernels";
#ifdef _OPENMP  // at::parallel_for runs on torch's threads only in code compiled with OpenMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
#ifdef VIDGEN_WITH_CUDA
  m.attr("with_cuda") = true;
  register_adaln_cuda(m);
  register_rope_cuda(m);
  register_moe_cuda(m);
#else
  m.attr("with_cuda") = false;
#endif
  register_adaln_cpu(m);
  register_temporal_attention_cpu(m);
  register_rope_cpu(m);
  register_moe_cpu(m);
  register_attention_cpu(m);
}
