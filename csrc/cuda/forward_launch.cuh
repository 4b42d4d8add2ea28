// Defines SA_GPU_NS::forward (included once per build: forward.cu, and the emulation build).
#pragma once

#include "../dispatch.h"
#include "launch_common.cuh"
#include "sa_layer_forward.cuh"
#include "sa_layer_nhwc_forward.cuh"
#include "shuffle_attention_nhwc_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

void forward(Variant variant, c10::ScalarType dtype, const ForwardParams& f) {
  SA_DISPATCH_FLOATING_TYPES(dtype, "sa_cuda_forward_cuda", [&] {
    if (f.channels_last) {
      if (variant == Variant::kSALayer) {
        launch_sa_layer_nhwc_forward<scalar_t>(f);
      } else {
        launch_shuffle_attention_nhwc_forward<scalar_t>(f);
      }
    } else if (variant == Variant::kSALayer) {
      const int pack = plane_pack_elements<scalar_t>(f.plane_size, {f.x, f.out, f.identity});
      launch_sa_layer<scalar_t, false>(f, f, pack, [](auto warp, auto vec, auto packs) {
        return &sa_layer_forward_kernel<scalar_t, decltype(warp)::value, decltype(vec)::value,
                                        decltype(packs)::value>;
      });
    } else {
      launch_shuffle_attention<scalar_t>(f, f, false, {f.x, f.out, f.identity}, [](auto vec) {
        return &shuffle_attention_forward_kernel<scalar_t, decltype(vec)::value>;
      });
    }
  });
}

}  // namespace sa_cuda::SA_GPU_NS
