// 1x1-conv variant (ShuffleAttention), forward: one block per branch of one (batch item, group),
// i.e. m planes coupled by the m x m gate matrix.
//
// Bytes moved: x read twice (plane moments, then the gate; the second read hits L2, the unit is at
// most a few hundred KB), out written once at the shuffled channels. The spatial gate needs all m
// channels of a pixel: pixels go through shared memory in tiles of m x tile_pixels values.
#pragma once

#include <ATen/OpMathType.h>

#include "../sa_math.h"
#include "../sa_params.h"
#include "team.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kGroupThreads = 256;  // threads per block of the group kernels

// Shared-memory layout of a group block, in acc_t values; the forward uses the part up to the
// end of tile_y(). Per-channel vectors of m: mean, rstd (the true statistics), gate s (channel
// branch), scale = gw * gate_rstd, dz / T1, dmu / D1, D2, and the Standardizer's input_scale,
// center, gate_rstd (sa_math.h); m x m: W2, the backward's A; tiles of m x tile pixels: x, the
// GroupNorm output y, grad_out, gate s, t.
struct GroupSmem {
  int64_t m, tile;
  SA_HOST_DEVICE int64_t mean() const { return 0; }
  SA_HOST_DEVICE int64_t rstd() const { return m; }
  SA_HOST_DEVICE int64_t gate() const { return 2 * m; }
  SA_HOST_DEVICE int64_t scale() const { return 3 * m; }
  SA_HOST_DEVICE int64_t dz_or_t1() const { return 4 * m; }
  SA_HOST_DEVICE int64_t dmu_or_d1() const { return 5 * m; }
  SA_HOST_DEVICE int64_t d2() const { return 6 * m; }
  SA_HOST_DEVICE int64_t input_scale() const { return 7 * m; }
  SA_HOST_DEVICE int64_t center() const { return 8 * m; }
  SA_HOST_DEVICE int64_t gate_rstd() const { return 9 * m; }
  SA_HOST_DEVICE int64_t matrix() const { return 10 * m; }
  SA_HOST_DEVICE int64_t tile_x() const { return matrix() + m * m; }
  SA_HOST_DEVICE int64_t tile_y() const { return tile_x() + m * tile; }
  SA_HOST_DEVICE int64_t accum() const { return tile_y() + m * tile; }
  SA_HOST_DEVICE int64_t tile_g() const { return accum() + m * m; }
  SA_HOST_DEVICE int64_t tile_s() const { return tile_g() + m * tile; }
  SA_HOST_DEVICE int64_t tile_t() const { return tile_s() + m * tile; }
  SA_HOST_DEVICE int64_t values(bool backward) const { return backward ? tile_t() + m * tile : accum(); }
};

// A Standardizer per channel in shared memory (the slots of GroupSmem).
template <typename acc_t>
struct GroupStats {
  acc_t *mean, *rstd, *input_scale, *center, *gate_rstd;

  SA_DEVICE GroupStats(acc_t* smem, const GroupSmem& L)
      : mean(smem + L.mean()),
        rstd(smem + L.rstd()),
        input_scale(smem + L.input_scale()),
        center(smem + L.center()),
        gate_rstd(smem + L.gate_rstd()) {}

  SA_DEVICE void set(int64_t j, const Standardizer<acc_t>& st) const {
    mean[j] = st.mean;
    rstd[j] = st.rstd;
    input_scale[j] = st.input_scale;
    center[j] = st.center;
    gate_rstd[j] = st.gate_rstd;
  }
};

// About 2048 tile values per block iteration whatever m is (m = 2 in SA-ResNet's first stage).
inline int64_t group_tile_pixels(int64_t m) {
  const int64_t p = (2048 / m) / kWarpSize * kWarpSize;
  return p < kWarpSize ? kWarpSize : (p > 1024 ? 1024 : p);
}

// Statistics of the unit's m planes: warp w takes planes w, w + warps, ... (a warp team streaming
// its plane, team.cuh); exact_mean for a channel-branch unit (its gate uses the means).
template <typename scalar_t, typename acc_t>
SA_DEVICE void group_plane_stats(const scalar_t* x, int64_t m, int64_t N, acc_t eps, bool exact_mean,
                                 const GroupStats<acc_t>& stats) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  for (int64_t j = warp; j < m; j += warps) {
    const scalar_t* plane = x + j * N;
    const Standardizer<acc_t> st = streamed_plane_stats<true>(
        [&](const auto& f) {
          for (int64_t q = lane; q < N; q += kWarpSize) {
            const acc_t v[1] = {static_cast<acc_t>(plane[q])};
            f(v);
          }
        },
        static_cast<acc_t>(plane[0]), N, eps, exact_mean, static_cast<acc_t*>(nullptr),
        static_cast<double*>(nullptr));
    if (lane == 0) stats.set(j, st);
  }
}

// Loads pixels [p0, p0 + tile) of m planes into tile[i * tile + p] (zero past the plane's end).
// plane_of(i) gives plane i's base pointer (the grad_out planes of a unit sit at shuffled channels).
template <typename scalar_t, typename acc_t, typename PlaneOf>
SA_DEVICE void load_tile(const PlaneOf& plane_of, int64_t m, int64_t N, int64_t p0, int64_t tile,
                         acc_t* out) {
  for (int64_t idx = threadIdx.x; idx < m * tile; idx += blockDim.x) {
    const int64_t i = idx / tile, p = p0 + idx % tile;
    out[idx] = p < N ? static_cast<acc_t>(plane_of(i)[p]) : acc_t(0);
  }
}

// The spatial gate's parameters in shared memory: W2 (read m times per pixel) and the GroupNorm
// scale gw * gate_rstd per channel.
template <typename acc_t>
SA_DEVICE void load_spatial_gate(const ForwardParams& p, int64_t m, const GroupStats<acc_t>& stats,
                                 acc_t* w2, acc_t* scale) {
  const acc_t* w = static_cast<const acc_t*>(p.spatial_weight);
  const acc_t* gw = static_cast<const acc_t*>(p.gn_weight);
  for (int64_t idx = threadIdx.x; idx < m * m; idx += blockDim.x) w2[idx] = w[idx];
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) scale[i] = gw[i] * stats.gate_rstd[i];
}

// After a tile of x is loaded: the GroupNorm output y_i(p) = scale_i xc_i(p) + gb_i of the tile,
// xc = (x - mu) * input_scale (the Standardizer's fma), then the gate's pre-activation
// z_j(p) = b2_j + sum_i W2[j, i] y_i(p) is gate_preactivation(j, pt). Unfolded like the reference
// (sa_math.h: centered, and +-inf weights stay +-inf, not NaN).
template <typename acc_t>
SA_DEVICE void normalize_tile(const ForwardParams& p, int64_t m, int64_t tile, const GroupStats<acc_t>& stats,
                              const acc_t* scale, const acc_t* xt, acc_t* yt) {
  const acc_t* gb = static_cast<const acc_t*>(p.gn_bias);
  for (int64_t idx = threadIdx.x; idx < m * tile; idx += blockDim.x) {
    const int64_t i = idx / tile;
    yt[idx] = scale[i] * sa_fma(xt[idx], stats.input_scale[i], -stats.center[i]) + gb[i];
  }
}

template <typename acc_t>
SA_DEVICE acc_t gate_preactivation(const ForwardParams& p, int64_t m, int64_t tile, const acc_t* w2,
                                   const acc_t* yt, int64_t j, int64_t pt) {
  acc_t z = static_cast<const acc_t*>(p.spatial_bias)[j];
  for (int64_t i = 0; i < m; ++i) z += w2[j * m + i] * yt[i * tile + pt];
  return z;
}

template <typename scalar_t>
SA_KERNEL_BOUNDS(kGroupThreads) void group_forward_kernel(ForwardParams p, int64_t tile) {
  using acc_t = at::opmath_type<scalar_t>;
  SA_DYNAMIC_SHARED(acc_t, smem);
  const int64_t m = p.branch_channels, N = p.plane_size, C = p.channels, G = p.groups;
  const GroupSmem L{m, tile};
  const int64_t unit = blockIdx.x;
  const int64_t b = unit / (2 * G), g = (unit / 2) % G;
  const bool spatial = unit % 2 == 1;
  const int64_t c0 = g * 2 * m + (spatial ? m : 0), plane0 = b * C + c0;
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + plane0 * N;
  scalar_t* out = static_cast<scalar_t*>(p.out);
  auto out_plane = [&](int64_t j) { return out + (b * C + shuffle_dst(c0 + j, C)) * N; };
  const GroupStats<acc_t> stats(smem, L);
  const acc_t* mean = stats.mean;
  acc_t* gate = smem + L.gate();

  group_plane_stats<scalar_t, acc_t>(x, m, N, static_cast<acc_t>(p.eps), !spatial, stats);
  __syncthreads();
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    static_cast<acc_t*>(p.mean)[plane0 + j] = stats.mean[j];
    static_cast<acc_t*>(p.rstd)[plane0 + j] = stats.rstd[j];
  }

  if (!spatial) {
    // s = sigmoid(W1 mu + b1), one scalar per plane.
    const acc_t* w1 = static_cast<const acc_t*>(p.channel_weight);
    const acc_t* b1 = static_cast<const acc_t*>(p.channel_bias);
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) gate[j] = sigmoid(matvec_row(w1, mean, b1, m, j));
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < m * N; idx += blockDim.x) {
      const int64_t j = idx / N, q = idx % N;
      out_plane(j)[q] = static_cast<scalar_t>(static_cast<acc_t>(x[idx]) * gate[j]);
    }
    return;
  }

  acc_t* w2 = smem + L.matrix();
  acc_t* scale = smem + L.scale();
  acc_t* xt = smem + L.tile_x();
  acc_t* yt = smem + L.tile_y();
  load_spatial_gate(p, m, stats, w2, scale);
  for (int64_t p0 = 0; p0 < N; p0 += tile) {
    __syncthreads();  // W2 and scale are written; the previous tile is consumed
    load_tile<scalar_t, acc_t>([&](int64_t i) { return x + i * N; }, m, N, p0, tile, xt);
    __syncthreads();
    normalize_tile(p, m, tile, stats, scale, xt, yt);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < m * tile; idx += blockDim.x) {
      const int64_t j = idx / tile, pt = idx % tile;
      if (p0 + pt >= N) continue;
      const acc_t z = gate_preactivation(p, m, tile, w2, yt, j, pt);
      out_plane(j)[p0 + pt] = static_cast<scalar_t>(xt[j * tile + pt] * sigmoid(z));
    }
  }
}

}  // namespace sa_cuda::SA_GPU_NS
