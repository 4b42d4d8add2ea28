// Registers the CUDA kernels for the sa_cuda ops (built only when the CUDA extension is).
#include <torch/library.h>

#include "../ops.h"
#include "kernels_cuda.h"

namespace sa_cuda {

TORCH_LIBRARY_IMPL(sa_cuda, CUDA, m) { register_backend<&gpu::forward, &gpu::backward>(m); }

}  // namespace sa_cuda
