// Per-channel variant (SALayer), forward: one team per plane.
//
// Bytes moved: x read once, out written once at the shuffled channel, 2 * acc_t of statistics per
// plane. kPacks > 0: the plane is held in registers (kPacks packs of kVec per thread) between the
// reductions and the gate. kPacks == 0: the plane is too large for the team's registers and is
// streamed twice (moments, then gate); the second read comes from L2.
#pragma once

#include <ATen/OpMathType.h>

#include "../sa_math.h"
#include "../sa_params.h"
#include "team.cuh"

namespace sa_cuda::SA_GPU_NS {

// The team of a plane: a warp (kWarpTeam: blockDim.x / 32 planes per block) or the whole block.
template <bool kWarpTeam>
struct PlaneTeam {
  int size, rank;
  int64_t plane;

  SA_DEVICE PlaneTeam()
      : size(kWarpTeam ? kWarpSize : static_cast<int>(blockDim.x)),
        rank(kWarpTeam ? static_cast<int>(threadIdx.x) % kWarpSize : static_cast<int>(threadIdx.x)),
        plane(kWarpTeam ? int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize
                        : int64_t(blockIdx.x)) {}
};

// Gate of one plane: u = x * gate(x). Channel branch: the constant sigmoid(cw * mu + cb);
// spatial branch: sigmoid(sw * (gw r (x - mu) + gb) + sb) (sa_math.h).
template <typename acc_t>
struct PlaneGate {
  bool spatial;
  acc_t s, mean;
  SpatialGate<acc_t> g;

  SA_DEVICE PlaneGate(const ForwardParams& p, const ChannelRole& role, acc_t mean, acc_t rstd) {
    const acc_t* cw = static_cast<const acc_t*>(p.channel_weight);
    const acc_t* cb = static_cast<const acc_t*>(p.channel_bias);
    const acc_t* sw = static_cast<const acc_t*>(p.spatial_weight);
    const acc_t* sb = static_cast<const acc_t*>(p.spatial_bias);
    const acc_t* gw = static_cast<const acc_t*>(p.gn_weight);
    const acc_t* gb = static_cast<const acc_t*>(p.gn_bias);
    const int64_t k = role.k;
    spatial = role.spatial;
    this->mean = mean;
    s = sigmoid(cw[k] * mean + cb[k]);
    g = spatial_gate(sw[k], sb[k], gw[k], gb[k], rstd);
  }

  SA_DEVICE acc_t operator()(acc_t x) const { return spatial ? sigmoid(g.z(x - mean)) : s; }
};

// Mean and rstd of a plane held in registers: centered two-pass over the registers, the mean
// summed relative to the plane's first value `shift` (robust to |mean| >> std).
template <bool kWarpTeam, int kPacks, int kVec, typename acc_t>
SA_DEVICE void register_plane_stats(const acc_t (&v)[kPacks][kVec], const PlaneTeam<kWarpTeam>& team,
                                    int64_t packs, int64_t n, acc_t shift, acc_t eps, acc_t* scratch,
                                    acc_t& mean, acc_t& rstd) {
  acc_t sum[1] = {0};
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum[0] += v[k][i] - shift;
    }
  }
  team_sum<kWarpTeam>(sum, scratch);
  mean = shift + sum[0] / acc_t(n);
  acc_t sq[1] = {0};
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) sq[0] += (v[k][i] - mean) * (v[k][i] - mean);
    }
  }
  team_sum<kWarpTeam>(sq, scratch);
  rstd = rstd_from_var(sq[0] / acc_t(n), eps);
}

template <typename scalar_t, bool kWarpTeam, int kVec, int kPacks>
SA_KERNEL void plane_forward_kernel(ForwardParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[3 * kWarpSize];
  const PlaneTeam<kWarpTeam> team;
  // A warp team past the last plane leaves as a whole; warp teams never synchronize the block.
  if (kWarpTeam && team.plane >= p.batch * p.channels) return;

  const int64_t N = p.plane_size, packs = N / kVec, C = p.channels;
  const int64_t b = team.plane / C, c = team.plane % C;
  const ChannelRole role = channel_role(c, p.branch_channels);
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + team.plane * N;
  scalar_t* out = static_cast<scalar_t*>(p.out) + (b * C + shuffle_dst(c, C)) * N;
  const acc_t eps = static_cast<acc_t>(p.eps);

  acc_t v[kPacks > 0 ? kPacks : 1][kVec];
  acc_t mean, rstd;
  if constexpr (kPacks > 0) {
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t q = team.rank + int64_t(k) * team.size;
      if (q < packs) load_acc<scalar_t, acc_t, kVec>(x, q, v[k]);
    }
    register_plane_stats<kWarpTeam, kPacks, kVec>(v, team, packs, N, sum_shift(static_cast<acc_t>(x[0])),
                                                  eps, scratch, mean, rstd);
  } else {
    const acc_t shift = sum_shift(static_cast<acc_t>(x[0]));
    Moments<acc_t> moments;
    for (int64_t q = team.rank; q < packs; q += team.size) {
      load_acc<scalar_t, acc_t, kVec>(x, q, v[0]);
      moments.add(v[0], shift);
    }
    moments = team_merge<kWarpTeam>(moments, scratch);
    mean = shift + moments.mean;
    rstd = rstd_from_var(moments.m2 / acc_t(N), eps);
  }
  if (team.rank == 0) {
    static_cast<acc_t*>(p.mean)[team.plane] = mean;
    static_cast<acc_t*>(p.rstd)[team.plane] = rstd;
  }

  const PlaneGate<acc_t> gate(p, role, mean, rstd);
  auto apply = [&](int64_t q, const acc_t(&xv)[kVec]) {
    acc_t u[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) u[i] = xv[i] * gate(xv[i]);
    store_acc<scalar_t, acc_t, kVec>(out, q, u);
  };
  if constexpr (kPacks > 0) {
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t q = team.rank + int64_t(k) * team.size;
      if (q < packs) apply(q, v[k]);
    }
  } else {
    for (int64_t q = team.rank; q < packs; q += team.size) {
      load_acc<scalar_t, acc_t, kVec>(x, q, v[0]);
      apply(q, v[0]);
    }
  }
}

}  // namespace sa_cuda::SA_GPU_NS
