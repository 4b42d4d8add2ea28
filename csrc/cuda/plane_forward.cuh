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

constexpr int kPlaneItems = 8;       // elements per thread held in registers
constexpr int kWarpTeamBlock = 256;  // threads per block of warp teams
constexpr int kMaxPlaneTeam = 512;   // threads of the largest block team

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
// spatial branch: sigmoid(sw * (gw r (x - mu) + gb) + sb) through the plane's Standardizer
// (sa_math.h).
template <typename acc_t>
struct PlaneGate {
  bool spatial;
  acc_t s;
  SpatialGate<acc_t> g;

  SA_DEVICE PlaneGate(const ForwardParams& p, const ChannelRole& role, const Standardizer<acc_t>& st) {
    const acc_t* cw = static_cast<const acc_t*>(p.channel_weight);
    const acc_t* cb = static_cast<const acc_t*>(p.channel_bias);
    const acc_t* sw = static_cast<const acc_t*>(p.spatial_weight);
    const acc_t* sb = static_cast<const acc_t*>(p.spatial_bias);
    const acc_t* gw = static_cast<const acc_t*>(p.gn_weight);
    const acc_t* gb = static_cast<const acc_t*>(p.gn_bias);
    const int64_t k = role.k;
    spatial = role.spatial;
    s = sigmoid(cw[k] * st.mean + cb[k]);
    g = spatial_gate(sw[k], sb[k], gw[k], gb[k], st);
  }

  SA_DEVICE acc_t operator()(acc_t x) const { return spatial ? sigmoid(g.z(x)) : s; }
};

// Mean and variance of the values v * scale (scale a power of two, 1 for the values themselves)
// of a plane held in registers: centered two-pass over the registers, the mean summed relative to
// `shift` (the plane's first value, times scale: robust to |mean| >> std), or with exact_mean (a
// channel-branch plane) the wide mean (sa_math.h; wide_scratch: 32 doubles of shared memory).
template <bool kWarpTeam, int kPacks, int kVec, typename acc_t>
SA_DEVICE void register_moments(const acc_t (&v)[kPacks][kVec], const PlaneTeam<kWarpTeam>& team,
                                int64_t packs, int64_t n, acc_t shift, acc_t scale, bool exact_mean,
                                acc_t* scratch, double* wide_scratch, acc_t& mean, acc_t& var) {
  if (exact_mean) {
    double sum[1] = {0};
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum[0] += wide_term(v[k][i], scale);
      }
    }
    team_sum<kWarpTeam>(sum, wide_scratch);
    mean = wide_mean<acc_t>(sum[0], n);
  } else {
    acc_t sum[1] = {0};
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum[0] += sa_fma(v[k][i], scale, -shift);
      }
    }
    team_sum<kWarpTeam>(sum, scratch);
    mean = shift + sum[0] / acc_t(n);
  }
  acc_t sq[1] = {0};
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const acc_t d = sa_fma(v[k][i], scale, -mean);
        sq[0] += d * d;
      }
    }
  }
  team_sum<kWarpTeam>(sq, scratch);
  var = sq[0] / acc_t(n);
}

// The Standardizer of a plane held in registers: its moments, redone scaled by 2^-e (e from
// max|x|) when they overflowed. team_sum gives every thread the same totals, so the branch is
// uniform over the team (and exact_mean is: one plane per team).
template <bool kWarpTeam, int kPacks, int kVec, typename acc_t>
SA_DEVICE Standardizer<acc_t> register_plane_stats(const acc_t (&v)[kPacks][kVec],
                                                   const PlaneTeam<kWarpTeam>& team, int64_t packs,
                                                   int64_t n, acc_t first, acc_t eps, bool exact_mean,
                                                   acc_t* scratch, double* wide_scratch) {
  const acc_t shift = sum_shift(first);
  acc_t mean, var;
  register_moments<kWarpTeam, kPacks, kVec>(v, team, packs, n, shift, acc_t(1), exact_mean, scratch,
                                            wide_scratch, mean, var);
  int e = 0;
  if (stats_overflowed(mean, var)) {
    acc_t amax[1] = {0};
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) amax[0] = max_nan(amax[0], v[k][i] < acc_t(0) ? -v[k][i] : v[k][i]);
      }
    }
    team_reduce<kWarpTeam>(amax, scratch, MaxOp{});
    e = rescale_exponent(amax[0]);
    if (e != 0) {
      const acc_t scale = sa_ldexp(acc_t(1), -e);
      register_moments<kWarpTeam, kPacks, kVec>(v, team, packs, n, shift * scale, scale, exact_mean,
                                                scratch, wide_scratch, mean, var);
    }
  }
  return finish_stats(mean, var, eps, e);
}

template <typename scalar_t, bool kWarpTeam, int kVec, int kPacks>
SA_KERNEL_BOUNDS(kWarpTeam ? kWarpTeamBlock : kMaxPlaneTeam) void plane_forward_kernel(ForwardParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  SA_SHARED_ARRAY(acc_t, scratch, 3 * kWarpSize);
  SA_SHARED_ARRAY(double, wide_scratch, kWarpSize);
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
  Standardizer<acc_t> st;
  if constexpr (kPacks > 0) {
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t q = team.rank + int64_t(k) * team.size;
      if (q < packs) load_acc<scalar_t, acc_t, kVec>(x, q, v[k]);
    }
    st = register_plane_stats<kWarpTeam, kPacks, kVec>(v, team, packs, N, static_cast<acc_t>(x[0]), eps,
                                                       !role.spatial, scratch, wide_scratch);
  } else {
    st = streamed_plane_stats<kWarpTeam>(
        [&](const auto& f) {
          for (int64_t q = team.rank; q < packs; q += team.size) {
            load_acc<scalar_t, acc_t, kVec>(x, q, v[0]);
            f(v[0]);
          }
        },
        static_cast<acc_t>(x[0]), N, eps, !role.spatial, scratch, wide_scratch);
  }
  if (team.rank == 0) {
    static_cast<acc_t*>(p.mean)[team.plane] = st.mean;
    static_cast<acc_t*>(p.rstd)[team.plane] = st.rstd;
  }

  const PlaneGate<acc_t> gate(p, role, st);
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
