// SALayer, forward, channels_last (NHWC): the statistics of nhwc_stats.cuh (two launches), with
// each channel's gate kept (GateSink: PlaneGate), then
//
//   sa_layer_nhwc_gate_kernel     reads x again and writes out: a lane per output channel, so a
//                                 warp writes 32 consecutive values of an output row and reads
//                                 16 + 16 consecutive values of the input row (channel_shuffle
//                                 interleaves the two halves)
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

template <typename scalar_t>
SA_KERNEL_BOUNDS(kNhwcThreads)
void sa_layer_nhwc_gate_kernel(ForwardParams p, const PlaneGate<at::opmath_type<scalar_t>>* gates) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid(p);
  const NhwcThread t(grid);  // t.channel: an output channel
  if (!t.active) return;      // no collective in this kernel
  const int64_t c = shuffle_src(t.channel, grid.channels);
  const PlaneGate<acc_t> gate = gates[t.item * grid.channels + c];
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  t.for_each_pixel<acc_t>(
      [&](int64_t pixel, acc_t& v) { v = static_cast<acc_t>(x[t.at(grid, pixel, c)]); },
      [&](int64_t pixel, const acc_t& v) {
        out[t.at(grid, pixel, t.channel)] = static_cast<scalar_t>(v * gate(v));
      });
}

template <typename scalar_t>
void launch_sa_layer_nhwc_forward(const ForwardParams& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid(f);
  const Workspace gates(sizeof(PlaneGate<acc_t>) * grid.planes());
  launch_nhwc_stats<scalar_t>(f, grid, GateSink<acc_t>{gates.as<PlaneGate<acc_t>>()});
  launch(&sa_layer_nhwc_gate_kernel<scalar_t>, grid.blocks(), kNhwcThreads, 0, current_stream(), f,
         gates.as<const PlaneGate<acc_t>>());
}

}  // namespace sa_cuda::SA_GPU_NS
