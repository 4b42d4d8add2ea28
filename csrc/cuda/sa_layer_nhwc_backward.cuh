// SALayer, backward, channels_last (NHWC): three kernels over the tiles of nhwc_tiles.cuh, then
// the parameter-gradient reduction (param_grad_reduce.cuh) as for NCHW.
//
//   sa_layer_nhwc_grad_sums_kernel  reads x and grad_out once (a lane per kVec output channels:
//                                   a pack of grad_out, two half packs of x): per (batch item,
//                                   chunk, channel) T1 = sum t and T2 = sum t xh; with the
//                                   residual epilogue it reads out too and writes grad_identity
//                                   (sa_grad.cuh: the gradient's first read)
//   sa_layer_nhwc_grad_coeffs_kernel a FinishTeam per (batch item, channel): the chunks' sums
//                                   added in chunk order, stored into the channel's slot of the
//                                   partials and turned into its input-gradient coefficients
//   sa_layer_nhwc_input_grad_kernel reads x and grad_out (grad_identity with the epilogue) again
//                                   and writes grad_x
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
  PlaneGate<acc_t> gate;
  Standardizer<acc_t> st;

  ChannelGrad() = default;  // plain data: kept in arrays, one per channel of a thread
  SA_DEVICE ChannelGrad(const ForwardParams& f, int64_t plane) {
    const PlaneUnit unit = plane_unit(f, plane);
    st = saved_stats(static_cast<const acc_t*>(f.mean)[plane],
                     static_cast<const acc_t*>(f.rstd)[plane]);
    gate = PlaneGate<acc_t>(load_plane_params<acc_t>(f, unit.role.k), unit.role.spatial, st);
  }
};

// The backward's kernels give a lane kVec output channels o0 + j (one pack of grad_out), which
// come from the pre-shuffle channels shuffle_src(o0 + j) (two half packs of x and grad_x:
// load_unshuffled).
template <typename acc_t, int kVec>
struct GradPacks {
  acc_t x[kVec], gu[kVec];  // x at shuffle_src(o0 + j), the gradient at o0 + j
  acc_t out[kVec];          // out at o0 + j, on the gradient's first read with the epilogue
};

template <typename scalar_t, typename acc_t, int kVec>
SA_DEVICE void load_grad_packs(const BackwardParams& p, const SaGradRead<scalar_t>& grad,
                               const NhwcGrid& grid, const NhwcThread<kVec>& t, int64_t o0,
                               int64_t pixel, GradPacks<acc_t, kVec>& v) {
  load_unshuffled<scalar_t>(t.row(static_cast<const scalar_t*>(p.fwd.x), grid, pixel),
                            grid.channels, o0, v.x);
  grad.load(t.row_start(grid, pixel) + o0, 0, v.gu, v.out);
}

// The per-channel state of a thread's kVec channels: channel j is shuffle_src(o0 + j).
template <typename acc_t, int kVec>
SA_DEVICE void load_channel_grads(const ForwardParams& f, const NhwcGrid& grid, int64_t item,
                                  int64_t o0, ChannelGrad<acc_t> (&g)[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    g[j] = ChannelGrad<acc_t>(f, item * grid.channels + shuffle_src(o0 + j, grid.channels));
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

template <typename scalar_t, int kVec>
SA_KERNEL_BOUNDS(kNhwcThreads)
void sa_layer_nhwc_grad_sums_kernel(BackwardParams p, ChunkSums<at::opmath_type<scalar_t>>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid = nhwc_grid<scalar_t>(p.fwd, NhwcPass::kBackward, kVec);
  const NhwcThread<kVec> t(grid);
  const int64_t o0 = t.readable_channel(grid);
  ChannelGrad<acc_t> g[kVec];
  load_channel_grads(p.fwd, grid, t.item, o0, g);
  ChunkSums<acc_t> own[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) own[j] = {{0, 0}};
  // The gradient's first read; an idle thread reads the last channels again and stores nothing.
  const SaGradRead<scalar_t> first = sa_grad_first_read<scalar_t>(p);
  t.template for_each_pixel<GradPacks<acc_t, kVec>>(
      [&](int64_t pixel, GradPacks<acc_t, kVec>& v) {
        load_grad_packs<scalar_t>(p, first, grid, t, o0, pixel, v);
      },
      [&](int64_t pixel, GradPacks<acc_t, kVec>& v) {
        first.mask(t.row_start(grid, pixel) + o0, 0, v.gu, v.out, t.active);
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          add_grad_terms(g[j].gate, g[j].st, v.x[j], v.gu[j], own[j].v);
      });
  combine_warps(own);
  if (t.warp != 0 || !t.active) return;
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    out[grid.partial(t.item, t.chunk, shuffle_src(o0 + j, grid.channels))] = own[j];
}

template <typename scalar_t>
SA_KERNEL_BOUNDS(kFinishThreads)
void sa_layer_nhwc_grad_coeffs_kernel(BackwardParams p,
                                      const ChunkSums<at::opmath_type<scalar_t>>* in,
                                      InputGradCoeffs<at::opmath_type<scalar_t>>* coeffs,
                                      int lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid = nhwc_grid<scalar_t>(p.fwd, NhwcPass::kBackward, 1);
  const FinishTeam team(grid, lanes);
  const ChunkSums<acc_t> total = combine_chunks(in, grid, team);
  if (!team.writer()) return;  // no collective below
  const PlaneUnit unit = plane_unit(p.fwd, team.plane);
  store_plane_sums(p, unit.slot(p.fwd), unit.role.spatial, total.v);
  coeffs[team.plane] =
      plane_grad_coeffs(load_plane_params<acc_t>(p.fwd, unit.role.k), unit.role.spatial,
                        static_cast<const acc_t*>(p.fwd.rstd)[team.plane], total.v, grid.pixels);
}

template <typename scalar_t, int kVec>
SA_KERNEL_BOUNDS(kNhwcThreads)
void sa_layer_nhwc_input_grad_kernel(BackwardParams p,
                                     const InputGradCoeffs<at::opmath_type<scalar_t>>* coeffs) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid = nhwc_grid<scalar_t>(p.fwd, NhwcPass::kBackward, kVec);
  const NhwcThread<kVec> t(grid);
  if (!t.active) return;  // no collective in this kernel
  const int64_t o0 = t.channel;
  ChannelGrad<acc_t> g[kVec];
  load_channel_grads(p.fwd, grid, t.item, o0, g);
  InputGradCoeffs<acc_t> k[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    k[j] = coeffs[t.item * grid.channels + shuffle_src(o0 + j, grid.channels)];
  scalar_t* dx = static_cast<scalar_t*>(p.grad_x);
  const SaGradRead<scalar_t> reread = sa_grad_reread<scalar_t>(p);
  t.template for_each_pixel<GradPacks<acc_t, kVec>>(
      [&](int64_t pixel, GradPacks<acc_t, kVec>& v) {
        load_grad_packs<scalar_t>(p, reread, grid, t, o0, pixel, v);
      },
      [&](int64_t pixel, const GradPacks<acc_t, kVec>& v) {
        acc_t d[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          d[j] = plane_input_grad(g[j].gate, g[j].st, k[j], v.x[j], v.gu[j], g[j].gate(v.x[j]));
        store_unshuffled<scalar_t>(t.row(dx, grid, pixel), grid.channels, o0, d);
      });
}

template <typename scalar_t>
void launch_sa_layer_nhwc_backward(const BackwardParams& b) {
  using acc_t = at::opmath_type<scalar_t>;
  // Its chunks and partials, every kVec's.
  const NhwcGrid grid = nhwc_grid<scalar_t>(b.fwd, NhwcPass::kBackward, 1);
  const Workspace sums(sizeof(ChunkSums<acc_t>) * grid.partials());
  const Workspace coeffs(sizeof(InputGradCoeffs<acc_t>) * grid.planes());
  const Stream stream = current_stream();
  with_lane_channels<scalar_t>(
      b.fwd, NhwcPass::kBackward, {b.fwd.x, b.grad_out, b.grad_x, b.out, b.grad_identity},
      [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        const int64_t blocks = nhwc_grid<scalar_t>(b.fwd, NhwcPass::kBackward, kVec).blocks();
        launch(&sa_layer_nhwc_grad_sums_kernel<scalar_t, kVec>, blocks, kNhwcThreads, 0, stream, b,
               sums.as<ChunkSums<acc_t>>());
        const int lanes = finish_lanes(grid.chunks);
        launch(&sa_layer_nhwc_grad_coeffs_kernel<scalar_t>, finish_blocks(grid, lanes),
               kFinishThreads, 0, stream, b, sums.as<const ChunkSums<acc_t>>(),
               coeffs.as<InputGradCoeffs<acc_t>>(), lanes);
        launch(&sa_layer_nhwc_input_grad_kernel<scalar_t, kVec>, blocks, kNhwcThreads, 0, stream, b,
               coeffs.as<const InputGradCoeffs<acc_t>>());
      });
}

}  // namespace sa_cuda::SA_GPU_NS
