// ShuffleAttention, forward, channels_last (NHWC): the statistics of nhwc_stats.cuh (two launches;
// each channel keeps its Standardizer: StandardizerSink), then
//
//   shuffle_attention_nhwc_gate_kernel  a block per (batch item, chunk, window) (nhwc_windows.cuh):
//                                       per tile of pixels, x in and the spatial channels'
//                                       GroupNorm output staged; then each output channel of
//                                       each pixel, x s with s the channel branch's gate or the
//                                       spatial gate sigmoid(b2 + W2 y) of its pixel, written
//                                       as the contiguous run of the window's output channels
//
// Bytes moved: x read twice, out written once, per (item, chunk, channel) the statistics' partial,
// per (item, channel) the statistics and the Standardizer.
#pragma once

#include <ATen/OpMathType.h>

#include "nhwc_stats.cuh"
#include "nhwc_windows.cuh"

namespace sa_cuda::SA_GPU_NS {

// nhwc_stats_kernel's sink: a spatial channel's Standardizer (with the rest of its mean,
// center_lo, which the saved statistics do not carry). The channel branch's gate needs only the
// means, which the statistics kernel stores.
template <typename acc_t>
struct StandardizerSink {
  Standardizer<acc_t>* standardizers;

  SA_DEVICE void operator()(const ForwardParams&, const PlaneUnit& unit,
                            const Standardizer<acc_t>& st) const {
    if (unit.role.spatial) standardizers[unit.plane] = st;
  }
};

template <typename scalar_t>
SA_KERNEL_BOUNDS(kWindowThreads, kGroupMinBlocks)
void shuffle_attention_nhwc_gate_kernel(
    ForwardParams p, NhwcWindows w, const Standardizer<at::opmath_type<scalar_t>>* standardizers) {
  using acc_t = at::opmath_type<scalar_t>;
  SA_DYNAMIC_SHARED(acc_t, smem);
  const WindowBlock<acc_t> B(p, w, smem);
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  B.stage(p, [&](int64_t plane) { return standardizers[plane]; });
  B.template for_each_tile<false>(x, SaGradRead<scalar_t>{}, [&](int64_t p0, int n) {
    // Output channel o of the window (consecutive threads: consecutive values of the output row)
    // from window channel ch = shuffle_src(o, K).
    for_each_cell(n, B.win.K, [&](int pt, int o) {
      const int ch = (o % 2) * B.win.width + o / 2;  // shuffle_src(o, K) in 32 bits
      const int start = B.branch[ch];
      const acc_t v = B.xt[ch * B.ts + pt];
      const acc_t s = start < 0 ? B.gate[ch] : B.spatial_gate(ch, start, pt);
      const int64_t e = B.win.row(B.w, p0 + pt) + 2 * B.win.c0 + o;
      out[e] = static_cast<scalar_t>(with_identity<scalar_t>(p, e, v * s));
    });
  });
}

template <typename scalar_t>
void launch_shuffle_attention_nhwc_forward(const ForwardParams& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcWindows w = window_grid<acc_t>(f, false);
  const Workspace standardizers(sizeof(Standardizer<acc_t>) * w.grid.planes());
  launch_nhwc_stats<scalar_t>(f, StandardizerSink<acc_t>{standardizers.as<Standardizer<acc_t>>()});
  launch(&shuffle_attention_nhwc_gate_kernel<scalar_t>, w.blocks(), kWindowThreads,
         window_smem(w).values(false) * sizeof(acc_t), current_stream(), f, w,
         standardizers.as<const Standardizer<acc_t>>());
}

}  // namespace sa_cuda::SA_GPU_NS
