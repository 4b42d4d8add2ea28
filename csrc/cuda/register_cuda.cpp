// Registers the CUDA kernels for the sa_cuda ops (built only when the CUDA extension is).
#include <torch/library.h>

#include "../ops.h"
#include "kernels_cuda.h"

namespace sa_cuda {

SA_REGISTER_BACKEND(sa_cuda, CUDA, &gpu::forward, &gpu::backward)

}  // namespace sa_cuda
