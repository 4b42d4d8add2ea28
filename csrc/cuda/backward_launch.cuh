// Defines SA_GPU_NS::backward (included once per build: backward.cu, and the emulation build).
#pragma once

#include "../dispatch.h"
#include "launch_common.cuh"
#include "param_grad_reduce.cuh"
#include "relu_grad.cuh"
#include "sa_layer_backward.cuh"
#include "sa_layer_nhwc_backward.cuh"
#include "shuffle_attention_backward.cuh"
#include "shuffle_attention_nhwc_backward.cuh"

namespace sa_cuda::SA_GPU_NS {

// Two launches: the backward kernel (grad_x and the per-(batch item, group) partials; none for
// an empty batch, which has no unit), then the reduction of the partials into the six parameter
// gradients. With the residual epilogue, relu's mask first (relu_grad.cuh): the backward kernel
// then reads the masked gradient, grad_identity, as its grad_out.
void backward(Variant variant, c10::ScalarType dtype, const BackwardParams& params) {
  SA_DISPATCH_FLOATING_TYPES(dtype, "sa_cuda_backward_cuda", [&] {
    BackwardParams b = params;
    if (b.out != nullptr && b.fwd.batch > 0) {
      launch_relu_grad<scalar_t>(b);
      b.grad_out = b.grad_identity;
    }
    if (b.fwd.batch > 0) {
      if (b.fwd.channels_last) {
        if (variant == Variant::kSALayer) {
          launch_sa_layer_nhwc_backward<scalar_t>(b);
        } else {
          launch_shuffle_attention_nhwc_backward<scalar_t>(b);
        }
      } else if (variant == Variant::kSALayer) {
        const int pack =
            plane_pack_elements<scalar_t>(b.fwd.plane_size, {b.fwd.x, b.grad_out, b.grad_x});
        launch_sa_layer<scalar_t, true>(b, b.fwd, pack, [](auto warp, auto vec, auto packs) {
          return &sa_layer_backward_kernel<scalar_t, decltype(warp)::value, decltype(vec)::value,
                                           decltype(packs)::value>;
        });
      } else {
        launch_shuffle_attention<scalar_t>(
            b, b.fwd, true, {b.fwd.x, b.grad_out, b.grad_x}, [](auto vec) {
              return &shuffle_attention_backward_kernel<scalar_t, decltype(vec)::value>;
            });
      }
    }
    launch_param_grad_reduce<at::opmath_type<scalar_t>>(variant, b);
  });
}

}  // namespace sa_cuda::SA_GPU_NS
