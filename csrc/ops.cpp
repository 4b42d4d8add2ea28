// The sa_cuda op library: schemas, the CPU kernels' registration, build information.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/kernels_cpu.h"
#include "ops.h"

namespace sa_cuda {

TORCH_LIBRARY(sa_cuda, m) { define_ops(m); }

TORCH_LIBRARY_IMPL(sa_cuda, CPU, m) { register_backend<&cpu::forward, &cpu::backward>(m); }

}  // namespace sa_cuda
// Build information for `python -m sa_cuda` and the tests.
PYBIND11_MODULE(_C, module) {
  module.def("cpu_capability", [] {
#if defined(CPU_CAPABILITY_AVX2)
    return "AVX2";
#else
    return "DEFAULT";
#endif
  });
  module.def("cuda_built", [] {
#if defined(SA_CUDA_WITH_CUDA)
    return true;
#else
    return false;
#endif
  });
}
