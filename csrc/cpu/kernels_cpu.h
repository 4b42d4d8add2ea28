// C++ CPU kernels: one fused pass per work unit (docs/design.md), at::parallel_for over
// units, at::vec inner loops, acc_t = at::opmath_type<scalar_t> (float; double for float64).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

#include "../sa_math.h"
#include "../sa_params.h"

namespace sa_cuda::cpu {

// The forward's tensors, typed: x and out in the input dtype, the rest in acc_t.
template <typename scalar_t>
struct ForwardTensors {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t* out;
  acc_t* mean;
  acc_t* rstd;
  ParamArrays<acc_t> w;

  explicit ForwardTensors(const ForwardParams& p)
      : x(static_cast<const scalar_t*>(p.x)),
        out(static_cast<scalar_t*>(p.out)),
        mean(static_cast<acc_t*>(p.mean)),
        rstd(static_cast<acc_t*>(p.rstd)),
        w(param_arrays<acc_t>(p)) {}
};

void forward(Variant variant, c10::ScalarType dtype, const ForwardParams& params);
void backward(Variant variant, c10::ScalarType dtype, const BackwardParams& params);

}  // namespace sa_cuda::cpu
