// SALayer, forward, channels_last (NHWC): the statistics of nhwc_stats.cuh (two launches), with
// each channel's gate kept (GateSink: PlaneGate), then
//
//   sa_layer_nhwc_gate_kernel     reads x again and writes out: a lane per kVec output channels
//                                 (one pack), so a warp writes 32 kVec consecutive values of an
//                                 output row and reads 16 kVec + 16 kVec consecutive values of the
//                                 input row (channel_shuffle interleaves the two halves:
//                                 load_unshuffled)
//
// Bytes moved: x read twice, out written once, per (item, chunk, channel) the statistics' partial,
// per (item, channel) the statistics and the gate.
#pragma once

#include <ATen/OpMathType.h>

#include "nhwc_stats.cuh"
#include "sa_layer_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

// nhwc_stats_kernel's sink: the channel's PlaneGate.
template <typename acc_t>
struct GateSink {
  PlaneGate<acc_t>* gates;

  SA_DEVICE void operator()(const ForwardParams& p, const PlaneUnit& unit,
                            const Standardizer<acc_t>& st) const {
    gates[unit.plane] =
        PlaneGate<acc_t>(load_plane_params<acc_t>(p, unit.role.k), unit.role.spatial, st);
  }
};

template <typename scalar_t, int kVec>
SA_KERNEL_BOUNDS(kNhwcThreads)
void sa_layer_nhwc_gate_kernel(ForwardParams p, const PlaneGate<at::opmath_type<scalar_t>>* gates) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid = nhwc_grid<scalar_t>(p, NhwcPass::kForward, kVec);
  const NhwcThread<kVec> t(grid);  // t.channel: the first of kVec output channels
  if (!t.active) return;            // no collective in this kernel
  PlaneGate<acc_t> gate[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    gate[j] = gates[t.item * grid.channels + shuffle_src(t.channel + j, grid.channels)];
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  t.template for_each_pixel<acc_t[kVec]>(
      [&](int64_t pixel, acc_t(&v)[kVec]) {
        load_unshuffled<scalar_t>(t.row(x, grid, pixel), grid.channels, t.channel, v);
      },
      [&](int64_t pixel, const acc_t(&v)[kVec]) {
        acc_t u[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) u[j] = v[j] * gate[j](v[j]);
        store_out<scalar_t, acc_t, kVec>(p, (t.row(out, grid, pixel) - out) + t.channel, 0, u);
      });
}

template <typename scalar_t>
void launch_sa_layer_nhwc_forward(const ForwardParams& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const Workspace gates(sizeof(PlaneGate<acc_t>) * f.batch * f.channels);
  launch_nhwc_stats<scalar_t>(f, GateSink<acc_t>{gates.as<PlaneGate<acc_t>>()});
  with_lane_channels<scalar_t>(f, NhwcPass::kForward, {f.x, f.out, f.identity}, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    launch(&sa_layer_nhwc_gate_kernel<scalar_t, kVec>,
           nhwc_grid<scalar_t>(f, NhwcPass::kForward, kVec).blocks(), kNhwcThreads, 0,
           current_stream(), f, gates.as<const PlaneGate<acc_t>>());
  });
}

}  // namespace sa_cuda::SA_GPU_NS
