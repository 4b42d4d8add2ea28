// C++ CPU kernels: one fused pass per work unit (docs/design.md), at::parallel_for over
// units, at::vec inner loops, acc_t = at::opmath_type<scalar_t> (float; double for float64).
#pragma once

#include <c10/core/ScalarType.h>

#include "../sa_params.h"

namespace sa_cuda::cpu {

void forward(Variant variant, c10::ScalarType dtype, const ForwardParams& params);
void backward(Variant variant, c10::ScalarType dtype, const BackwardParams& params);

}  // namespace sa_cuda::cpu
