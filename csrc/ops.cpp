// The sa_cuda op library: the schemas and the CPU kernels' registration (csrc/module.cpp is the
// Python module).
#include <torch/library.h>

#include "cpu/kernels_cpu.h"
#include "ops.h"

namespace sa_cuda {

TORCH_LIBRARY(sa_cuda, m) { define_ops(m); }

TORCH_LIBRARY_IMPL(sa_cuda, CPU, m) { register_backend<&cpu::forward, &cpu::backward>(m); }

}  // namespace sa_cuda
