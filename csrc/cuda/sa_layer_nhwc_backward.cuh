// SALayer, backward, channels_last (NHWC): three kernels over the tiles of nhwc_tiles.cuh, then
// the parameter-gradient reduction (param_grad_reduce.cuh) as for NCHW.
//
//   sa_layer_nhwc_grad_sums_kernel  reads x and grad_out (at the shuffled channel) once: per
//                                   (batch item, chunk, channel) T1 = sum t and T2 = sum t xh
//   sa_layer_nhwc_grad_coeffs_kernel a FinishTeam per (batch item, channel): the chunks' sums
//                                   added in chunk order, stored into the channel's slot of the
//                                   partials and turned into its input-gradient coefficients
//   sa_layer_nhwc_input_grad_kernel reads x and grad_out again and writes grad_x
//
// The gate and every per-element formula are the NCHW kernel's (sa_layer_backward.cuh); only the
// order of the sums differs. Bytes moved: x and grad_out read twice, grad_x written once, per
// (item, chunk, channel) two acc_t partials, per (item, channel) the coefficients.
#pragma once

#include <ATen/OpMathType.h>

#include "nhwc_tiles.cuh"
#include "sa_layer_backward.cuh"

namespace sa_cuda::SA_GPU_NS {

// The gate of one channel of one batch item, from the saved statistics (what the NCHW backward
// rebuilds per plane).
template <typename acc_t>
struct ChannelGrad {
  PlaneUnit unit;
  PlaneParams<acc_t> w;
  Standardizer<acc_t> st;
  PlaneGate<acc_t> gate;

  SA_DEVICE ChannelGrad(const ForwardParams& f, int64_t plane)
      : unit(plane_unit(f, plane)),
        w(load_plane_params<acc_t>(f, unit.role.k)),
        st(saved_stats(static_cast<const acc_t*>(f.mean)[plane],
                       static_cast<const acc_t*>(f.rstd)[plane])),
        gate(w, unit.role.spatial, st) {}
};

// grad_out and x at one pixel of a thread's channel c (grad_out's at shuffle_dst(c)).
template <typename acc_t>
struct GradPair {
  acc_t x, gu;
};

template <typename scalar_t, typename acc_t>
SA_DEVICE void load_grad_pair(const BackwardParams& p, const NhwcGrid& grid, const NhwcThread& t,
                              int64_t c, int64_t pixel, GradPair<acc_t>& v) {
  v.x = static_cast<acc_t>(static_cast<const scalar_t*>(p.fwd.x)[t.at(grid, pixel, c)]);
  v.gu = static_cast<acc_t>(
      static_cast<const scalar_t*>(p.grad_out)[t.at(grid, pixel, shuffle_dst(c, grid.channels))]);
}

// A chunk's sums of one channel (plain data: it lives in shared memory).
template <typename acc_t>
struct ChunkSums {
  acc_t v[2];

  SA_DEVICE void merge(const ChunkSums& other) {
    v[0] += other.v[0];
    v[1] += other.v[1];
  }
  SA_DEVICE ChunkSums shuffled(int src, int width) const {
    return {{__shfl_sync(kFullMask, v[0], src, width), __shfl_sync(kFullMask, v[1], src, width)}};
  }
};

template <typename scalar_t>
SA_KERNEL_BOUNDS(kNhwcThreads)
void sa_layer_nhwc_grad_sums_kernel(BackwardParams p, ChunkSums<at::opmath_type<scalar_t>>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid(p.fwd);
  const NhwcThread t(grid);
  const int64_t c = t.active ? t.channel : grid.channels - 1;  // idle lanes read a valid channel
  const ChannelGrad<acc_t> g(p.fwd, t.item * grid.channels + c);
  ChunkSums<acc_t> own{{0, 0}};
  t.for_each_pixel<GradPair<acc_t>>(
      [&](int64_t pixel, GradPair<acc_t>& v) { load_grad_pair<scalar_t>(p, grid, t, c, pixel, v); },
      [&](int64_t, const GradPair<acc_t>& v) { add_grad_terms(g.gate, g.st, v.x, v.gu, own.v); });
  const ChunkSums<acc_t> total = combine_warps(own);
  if (t.warp == 0 && t.active) out[grid.partial(t.item, t.chunk, t.channel)] = total;
}

template <typename scalar_t>
SA_KERNEL_BOUNDS(kFinishThreads)
void sa_layer_nhwc_grad_coeffs_kernel(BackwardParams p,
                                      const ChunkSums<at::opmath_type<scalar_t>>* in,
                                      InputGradCoeffs<at::opmath_type<scalar_t>>* coeffs,
                                      int lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid(p.fwd);
  const FinishTeam team(grid, lanes);
  const ChunkSums<acc_t> total = combine_chunks(in, grid, team);
  if (!team.writer()) return;  // no collective below
  const PlaneUnit unit = plane_unit(p.fwd, team.plane);
  store_plane_sums(p, unit.slot(p.fwd), unit.role.spatial, total.v);
  coeffs[team.plane] =
      plane_grad_coeffs(load_plane_params<acc_t>(p.fwd, unit.role.k), unit.role.spatial,
                        static_cast<const acc_t*>(p.fwd.rstd)[team.plane], total.v, grid.pixels);
}

template <typename scalar_t>
SA_KERNEL_BOUNDS(kNhwcThreads)
void sa_layer_nhwc_input_grad_kernel(BackwardParams p,
                                     const InputGradCoeffs<at::opmath_type<scalar_t>>* coeffs) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid(p.fwd);
  const NhwcThread t(grid);
  if (!t.active) return;  // no collective in this kernel
  const int64_t plane = t.item * grid.channels + t.channel;
  const ChannelGrad<acc_t> g(p.fwd, plane);
  const InputGradCoeffs<acc_t> k = coeffs[plane];
  scalar_t* dx = static_cast<scalar_t*>(p.grad_x);
  t.for_each_pixel<GradPair<acc_t>>(
      [&](int64_t pixel, GradPair<acc_t>& v) {
        load_grad_pair<scalar_t>(p, grid, t, t.channel, pixel, v);
      },
      [&](int64_t pixel, const GradPair<acc_t>& v) {
        dx[t.at(grid, pixel, t.channel)] =
            static_cast<scalar_t>(plane_input_grad(g.gate, g.st, k, v.x, v.gu, g.gate(v.x)));
      });
}

template <typename scalar_t>
void launch_sa_layer_nhwc_backward(const BackwardParams& b) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid(b.fwd);
  const Workspace sums(sizeof(ChunkSums<acc_t>) * grid.partials());
  const Workspace coeffs(sizeof(InputGradCoeffs<acc_t>) * grid.planes());
  const Stream stream = current_stream();
  launch(&sa_layer_nhwc_grad_sums_kernel<scalar_t>, grid.blocks(), kNhwcThreads, 0, stream, b,
         sums.as<ChunkSums<acc_t>>());
  const int lanes = finish_lanes(grid.chunks);
  launch(&sa_layer_nhwc_grad_coeffs_kernel<scalar_t>, finish_blocks(grid, lanes), kFinishThreads, 0,
         stream, b, sums.as<const ChunkSums<acc_t>>(), coeffs.as<InputGradCoeffs<acc_t>>(), lanes);
  launch(&sa_layer_nhwc_input_grad_kernel<scalar_t>, grid.blocks(), kNhwcThreads, 0, stream, b,
         coeffs.as<const InputGradCoeffs<acc_t>>());
}

}  // namespace sa_cuda::SA_GPU_NS
