// The CUDA kernels' entry points (csrc/cuda/forward.cu, backward.cu), for the host code.
#pragma once

#include <c10/core/ScalarType.h>

#include "../sa_params.h"

namespace sa_cuda::gpu {

void forward(Variant variant, c10::ScalarType dtype, const ForwardParams& params);
void backward(Variant variant, c10::ScalarType dtype, const BackwardParams& params);

}  // namespace sa_cuda::gpu
