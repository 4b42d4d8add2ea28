// Defines SA_GPU_NS::backward (included once per build: backward.cu, and the emulation build).
#pragma once

#include "../dispatch.h"
#include "launch_common.cuh"
#include "param_grad_reduce.cuh"
#include "sa_layer_backward.cuh"
#include "sa_layer_nhwc_backward.cuh"
#include "shuffle_attention_backward.cuh"
#include "shuffle_attention_nhwc_backward.cuh"

namespace sa_cuda::SA_GPU_NS {

// Two launches: the backward kernel (grad_x and the per-(batch item, group) partials; none for
// an empty batch, which has no unit), then the reduction of the partials into the six parameter
// gradients. With the residual epilogue the backward kernels mask grad_out as they first read it
// and write grad_identity on the way (sa_grad.cuh), so out and grad_identity are among the
// tensors the pack width is chosen for.
void backward(Variant variant, c10::ScalarType dtype, const BackwardParams& b) {
  SA_DISPATCH_FLOATING_TYPES(dtype, "sa_cuda_backward_cuda", [&] {
    if (b.fwd.batch > 0) {
      if (b.fwd.channels_last) {
        if (variant == Variant::kSALayer) {
          launch_sa_layer_nhwc_backward<scalar_t>(b);
        } else {
          launch_shuffle_attention_nhwc_backward<scalar_t>(b);
        }
      } else if (variant == Variant::kSALayer) {
        const int pack = plane_pack_elements<scalar_t>(
            b.fwd.plane_size, {b.fwd.x, b.grad_out, b.grad_x, b.out, b.grad_identity});
        launch_sa_layer<scalar_t, true>(b, b.fwd, pack, [](auto warp, auto vec, auto packs) {
          return &sa_layer_backward_kernel<scalar_t, decltype(warp)::value, decltype(vec)::value,
                                           decltype(packs)::value>;
        });
      } else {
        launch_shuffle_attention<scalar_t>(
            b, b.fwd, true, {b.fwd.x, b.grad_out, b.grad_x, b.out, b.grad_identity}, [](auto vec) {
              return &shuffle_attention_backward_kernel<scalar_t, decltype(vec)::value>;
            });
      }
    }
    launch_param_grad_reduce<at::opmath_type<scalar_t>>(variant, b);
  });
}

}  // namespace sa_cuda::SA_GPU_NS
