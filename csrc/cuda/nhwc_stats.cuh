// channels_last (NHWC) on the GPU: the per-channel statistics of both variants, in two kernels
// over the tiles of nhwc_tiles.cuh. The statistics are per channel over the H * W pixels, the
// same for SALayer and ShuffleAttention; only what a channel keeps from them differs (the Sink).
//
//   nhwc_moments_kernel  reads x once: per (batch item, chunk, channel) the moments of x - shift
//                        (Welford/Chan, as the streamed NCHW path) and the channel-branch mean's
//                        sum in double (sa_math.h: wide_term)
//   nhwc_stats_kernel    a team of lanes per (batch item, channel) (FinishTeam: one lane per
//                        chunk, up to a warp): the chunks' moments merged in chunk order into the
//                        statistics, stored (mean, rstd) and handed to the Sink; a channel whose
//                        statistics overflow is read again, strided, by the whole warp
//                        (streamed_plane_stats: the rescale; rare)
//
// Bytes moved: x read once, per (item, chunk, channel) one partial of 3 acc_t and a double, per
// (item, channel) the statistics and what the Sink stores.
#pragma once

#include <ATen/OpMathType.h>

#include "nhwc_tiles.cuh"

namespace sa_cuda::SA_GPU_NS {

// A chunk's moments of one channel: Moments<acc_t> (of x - shift) and the sum of x in double.
// Plain data: it lives in shared memory, where no constructor may run.
template <typename acc_t>
struct ChunkMoments {
  acc_t n, mean, m2;
  double wide;

  SA_DEVICE Moments<acc_t> moments() const {
    Moments<acc_t> mo;
    mo.n = n;
    mo.mean = mean;
    mo.m2 = m2;
    return mo;
  }
  SA_DEVICE void merge(const ChunkMoments& other) {
    Moments<acc_t> mo = moments();
    mo.merge(other.n, other.mean, other.m2);
    n = mo.n;
    mean = mo.mean;
    m2 = mo.m2;
    wide += other.wide;
  }
  SA_DEVICE ChunkMoments shuffled(int src, int width) const {
    return {__shfl_sync(kFullMask, n, src, width), __shfl_sync(kFullMask, mean, src, width),
            __shfl_sync(kFullMask, m2, src, width), __shfl_sync(kFullMask, wide, src, width)};
  }
};

// The shift a channel's values are summed relative to: its first value in the batch item
// (sum_shift), the same for every chunk.
template <typename scalar_t, typename acc_t>
SA_DEVICE acc_t channel_shift(const scalar_t* x, const NhwcGrid& grid, int64_t item, int64_t c) {
  return sum_shift(static_cast<acc_t>(x[item * grid.pixels * grid.channels + c]));
}

template <typename scalar_t, int kVec>
SA_KERNEL_BOUNDS(kNhwcThreads)
void nhwc_moments_kernel(ForwardParams p, ChunkMoments<at::opmath_type<scalar_t>>* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid = nhwc_grid<scalar_t>(p, NhwcPass::kForward, kVec);
  const NhwcThread<kVec> t(grid);
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t c0 = t.readable_channel(grid);
  acc_t shift[kVec];
  bool exact_mean[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    shift[j] = channel_shift<scalar_t, acc_t>(x, grid, t.item, c0 + j);
    exact_mean[j] = !channel_role(c0 + j, p.branch_channels).spatial;
  }

  // kNhwcLoads pixels at a time as one pack of Moments::add per channel (a two-pass pack, then one
  // merge).
  Moments<acc_t> mo[kVec];
  double wide[kVec] = {};
  for (int64_t base = t.first_pixel; base < t.end_pixel; base += kNhwcLoads * kNhwcWarps) {
    acc_t v[kVec][kNhwcLoads];
    int count = 0;
#pragma unroll
    for (int u = 0; u < kNhwcLoads; ++u) {
      const int64_t pixel = base + int64_t(u) * kNhwcWarps;
      if (pixel < t.end_pixel) {
        acc_t pack[kVec];
        load_acc<scalar_t, acc_t, kVec>(t.row(x, grid, pixel) + c0, 0, pack);
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[j][u] = pack[j];
        ++count;
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (count == kNhwcLoads) {
        mo[j].add(v[j], shift[j]);
      } else {
        for (int u = 0; u < count; ++u) {
          const acc_t one[1] = {v[j][u]};
          mo[j].add(one, shift[j]);
        }
      }
      if (exact_mean[j]) {
        for (int u = 0; u < count; ++u) wide[j] += wide_term(v[j][u], acc_t(1));
      }
    }
  }
  ChunkMoments<acc_t> own[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) own[j] = {mo[j].n, mo[j].mean, mo[j].m2, wide[j]};
  combine_warps(own);
  if (t.warp != 0 || !t.active) return;
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[grid.partial(t.item, t.chunk, t.channel + j)] = own[j];
}

// The statistics of a channel whose moments overflow (stats_overflowed): the NCHW streamed path's,
// with its rescale (team.cuh), the warp reading the channel's values, C apart. Every lane of the
// warp calls it and returns lane 0's result: the warp's merges leave the lanes' copies different
// in the last bits, and the channel's statistics must not depend on the lane its team sits on.
template <typename scalar_t, typename acc_t>
SA_DEVICE Standardizer<acc_t> restreamed_stats(const ForwardParams& p, const NhwcGrid& grid,
                                               int64_t plane) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t item = plane / grid.channels, c = plane % grid.channels;
  const scalar_t* channel =
      static_cast<const scalar_t*>(p.x) + item * grid.pixels * grid.channels + c;
  auto load = [&](int64_t pixel, acc_t(&v)[1]) {
    v[0] = static_cast<acc_t>(channel[pixel * grid.channels]);
  };
  const Standardizer<acc_t> st = streamed_plane_stats<true>(
      [&](const auto& f) {
        unrolled_stream<kNhwcLoads, acc_t[1]>(lane, kWarpSize, grid.pixels, load,
                                              [&](int64_t, const acc_t(&v)[1]) { f(v); });
      },
      static_cast<acc_t>(channel[0]), grid.pixels, static_cast<acc_t>(p.eps),
      !plane_unit(p, plane).role.spatial, static_cast<acc_t*>(nullptr),
      static_cast<double*>(nullptr));
  auto lane0 = [](acc_t v) { return __shfl_sync(kFullMask, v, 0); };
  return {lane0(st.mean),   lane0(st.rstd),      lane0(st.input_scale),
          lane0(st.center), lane0(st.center_lo), lane0(st.gate_rstd)};
}

// A FinishTeam of `lanes` per (batch item, channel). Its writer stores mean and rstd and calls
// sink(p, unit, st) with the channel's Standardizer (sink: plain data, a kernel argument).
template <typename scalar_t, typename Sink>
SA_KERNEL_BOUNDS(kFinishThreads)
void nhwc_stats_kernel(ForwardParams p, const ChunkMoments<at::opmath_type<scalar_t>>* in,
                       Sink sink, int lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcGrid grid = nhwc_grid<scalar_t>(p, NhwcPass::kForward, 1);
  const FinishTeam team(grid, lanes);
  const ChunkMoments<acc_t> total = combine_chunks(in, grid, team);
  const SplitMean<acc_t> mean =
      !plane_unit(p, team.plane).role.spatial
          ? SplitMean<acc_t>{wide_mean<acc_t>(total.wide, grid.pixels), 0}
          : split_mean(channel_shift<scalar_t, acc_t>(static_cast<const scalar_t*>(p.x), grid,
                                                      team.item, team.channel),
                       total.mean);
  const acc_t var = total.m2 / acc_t(grid.pixels);

  auto store = [&](const Standardizer<acc_t>& st) {
    static_cast<acc_t*>(p.mean)[team.plane] = st.mean;
    static_cast<acc_t*>(p.rstd)[team.plane] = st.rstd;
    sink(p, plane_unit(p, team.plane), st);
  };
  const bool overflowed = team.active && stats_overflowed(mean.mean, var);
  if (team.writer() && !overflowed)
    store(finish_stats(mean.mean, var, static_cast<acc_t>(p.eps), 0, mean.lo));

  // Rare: the warp reads each channel that overflowed again, one at a time (every branch around a
  // collective below is the same for the whole warp), and the channel's writer stores the result.
  // Nothing else is kept across this loop, whose inlined streaming would otherwise push values to
  // local memory.
  if (!warp_any(overflowed)) return;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t warp_thread = int64_t(blockIdx.x) * kFinishThreads + threadIdx.x - lane;
  for (int leader = 0; leader < kWarpSize; leader += lanes) {
    if (__shfl_sync(kFullMask, static_cast<int>(overflowed), leader) == 0) continue;
    const Standardizer<acc_t> restreamed =
        restreamed_stats<scalar_t, acc_t>(p, grid, (warp_thread + leader) / lanes);
    if (lane == leader) store(restreamed);
  }
}

// The first two launches of a channels_last forward: the statistics into p.mean and p.rstd, and
// what sink keeps per (batch item, channel).
template <typename scalar_t, typename Sink>
void launch_nhwc_stats(const ForwardParams& f, const Sink& sink) {
  using acc_t = at::opmath_type<scalar_t>;
  // Its chunks and partials, every kVec's.
  const NhwcGrid grid = nhwc_grid<scalar_t>(f, NhwcPass::kForward, 1);
  const Workspace moments(sizeof(ChunkMoments<acc_t>) * grid.partials());
  const int lanes = finish_lanes(grid.chunks);
  const Stream stream = current_stream();
  with_lane_channels<scalar_t>(f, NhwcPass::kForward, {f.x}, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    launch(&nhwc_moments_kernel<scalar_t, kVec>,
           nhwc_grid<scalar_t>(f, NhwcPass::kForward, kVec).blocks(), kNhwcThreads, 0, stream, f,
           moments.as<ChunkMoments<acc_t>>());
  });
  launch(&nhwc_stats_kernel<scalar_t, Sink>, finish_blocks(grid, lanes), kFinishThreads, 0, stream,
         f, moments.as<const ChunkMoments<acc_t>>(), sink, lanes);
}

}  // namespace sa_cuda::SA_GPU_NS
