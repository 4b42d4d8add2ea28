// Defines SA_GPU_NS::backward (included once per build: backward.cu, and the emulation build).
#pragma once

#include "../dispatch.h"
#include "group_backward.cuh"
#include "launch_common.cuh"
#include "plane_backward.cuh"

namespace sa_cuda::SA_GPU_NS {

void backward(Variant variant, c10::ScalarType dtype, const BackwardParams& b) {
  SA_DISPATCH_FLOATING_TYPES(dtype, "sa_cuda_backward_cuda", [&] {
    if (variant == Variant::kPerChannel) {
      const bool aligned = aligned16(b.fwd.x) && aligned16(b.grad_out) && aligned16(b.grad_x);
      launch_planes<scalar_t>(b, b.fwd, aligned, [](auto warp, auto vec, auto packs) {
        return &plane_backward_kernel<scalar_t, decltype(warp)::value, decltype(vec)::value,
                                      decltype(packs)::value>;
      });
    } else {
      launch_groups<scalar_t>(b, b.fwd, true, {b.fwd.x, b.grad_out, b.grad_x}, [](auto vec) {
        return &group_backward_kernel<scalar_t, decltype(vec)::value>;
      });
    }
  });
}

}  // namespace sa_cuda::SA_GPU_NS
