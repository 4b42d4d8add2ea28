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

// Shared-memory layout of a group block, in acc_t values; the forward uses the part up to the
// end of tile_y(). Per-channel vectors of m: mean, rstd, gate s (channel branch), scale = gw * r,
// dz / T1, dmu / D1, D2; m x m: W2, the backward's A; tiles of m x tile pixels: x, the GroupNorm
// output y, grad_out, gate s, t.
struct GroupSmem {
  int64_t m, tile;
  SA_HOST_DEVICE int64_t mean() const { return 0; }
  SA_HOST_DEVICE int64_t rstd() const { return m; }
  SA_HOST_DEVICE int64_t gate() const { return 2 * m; }
  SA_HOST_DEVICE int64_t scale() const { return 3 * m; }
  SA_HOST_DEVICE int64_t dz_or_t1() const { return 4 * m; }
  SA_HOST_DEVICE int64_t dmu_or_d1() const { return 5 * m; }
  SA_HOST_DEVICE int64_t d2() const { return 6 * m; }
  SA_HOST_DEVICE int64_t matrix() const { return 7 * m; }
  SA_HOST_DEVICE int64_t tile_x() const { return matrix() + m * m; }
  SA_HOST_DEVICE int64_t tile_y() const { return tile_x() + m * tile; }
  SA_HOST_DEVICE int64_t accum() const { return tile_y() + m * tile; }
  SA_HOST_DEVICE int64_t tile_g() const { return accum() + m * m; }
  SA_HOST_DEVICE int64_t tile_s() const { return tile_g() + m * tile; }
  SA_HOST_DEVICE int64_t tile_t() const { return tile_s() + m * tile; }
  SA_HOST_DEVICE int64_t values(bool backward) const { return backward ? tile_t() + m * tile : accum(); }
};

// About 2048 tile values per block iteration whatever m is (m = 2 in SA-ResNet's first stage).
inline int64_t group_tile_pixels(int64_t m) {
  const int64_t p = (2048 / m) / kWarpSize * kWarpSize;
  return p < kWarpSize ? kWarpSize : (p > 1024 ? 1024 : p);
}

// Plane moments of the unit's m planes: warp w takes planes w, w + warps, ...
template <typename scalar_t, typename acc_t>
SA_DEVICE void group_plane_stats(const scalar_t* x, int64_t m, int64_t N, acc_t eps, acc_t* mean,
                                 acc_t* rstd) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  for (int64_t j = warp; j < m; j += warps) {
    const acc_t shift = sum_shift(static_cast<acc_t>(x[j * N]));
    Moments<acc_t> mo;
    for (int64_t q = lane; q < N; q += kWarpSize) {
      const acc_t v[1] = {static_cast<acc_t>(x[j * N + q])};
      mo.add(v, shift);
    }
    mo = warp_merge(mo);
    if (lane == 0) {
      mean[j] = shift + mo.mean;
      rstd[j] = rstd_from_var(mo.m2 / acc_t(N), eps);
    }
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
// scale gw * r per channel.
template <typename acc_t>
SA_DEVICE void load_spatial_gate(const ForwardParams& p, int64_t m, const acc_t* rstd, acc_t* w2,
                                 acc_t* scale) {
  const acc_t* w = static_cast<const acc_t*>(p.spatial_weight);
  const acc_t* gw = static_cast<const acc_t*>(p.gn_weight);
  for (int64_t idx = threadIdx.x; idx < m * m; idx += blockDim.x) w2[idx] = w[idx];
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) scale[i] = gw[i] * rstd[i];
}

// After a tile of x is loaded: the GroupNorm output y_i(p) = scale_i (x_i(p) - mu_i) + gb_i of the
// tile, then the gate's pre-activation z_j(p) = b2_j + sum_i W2[j, i] y_i(p) is z_at(j, pt).
// Unfolded like the reference (sa_math.h: centered, and +-inf weights stay +-inf, not NaN).
template <typename acc_t>
SA_DEVICE void normalize_tile(const ForwardParams& p, int64_t m, int64_t tile, const acc_t* mean,
                              const acc_t* scale, const acc_t* xt, acc_t* yt) {
  const acc_t* gb = static_cast<const acc_t*>(p.gn_bias);
  for (int64_t idx = threadIdx.x; idx < m * tile; idx += blockDim.x) {
    const int64_t i = idx / tile;
    yt[idx] = scale[i] * (xt[idx] - mean[i]) + gb[i];
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
SA_KERNEL void group_forward_kernel(ForwardParams p, int64_t tile) {
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
  acc_t* mean = smem + L.mean();
  acc_t* rstd = smem + L.rstd();
  acc_t* gate = smem + L.gate();

  group_plane_stats<scalar_t, acc_t>(x, m, N, static_cast<acc_t>(p.eps), mean, rstd);
  __syncthreads();
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    static_cast<acc_t*>(p.mean)[plane0 + j] = mean[j];
    static_cast<acc_t*>(p.rstd)[plane0 + j] = rstd[j];
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
  load_spatial_gate(p, m, rstd, w2, scale);
  for (int64_t p0 = 0; p0 < N; p0 += tile) {
    __syncthreads();  // W2 and scale are written; the previous tile is consumed
    load_tile<scalar_t, acc_t>([&](int64_t i) { return x + i * N; }, m, N, p0, tile, xt);
    __syncthreads();
    normalize_tile(p, m, tile, mean, scale, xt, yt);
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
