// Per-channel variant (SALayer), backward: one team per plane.
//
// Bytes moved: x and grad_out (at the shuffled channel) read once, grad_x written once, plus the
// saved mean/rstd and two acc_t partials per plane (sa_params.h), reduced later by the host code
// in a fixed order. kPacks > 0 keeps x, grad_out and the gate in registers between the reduction
// and dx; kPacks == 0 streams the plane twice (sums, then dx), the second read from L2.
#pragma once

#include "plane_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

template <typename scalar_t, bool kWarpTeam, int kVec, int kPacks>
SA_KERNEL_BOUNDS(kWarpTeam ? kWarpTeamBlock : kMaxPlaneTeam) void plane_backward_kernel(BackwardParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  SA_SHARED_ARRAY(acc_t, scratch, 2 * kWarpSize);
  const ForwardParams& f = p.fwd;
  const PlaneTeam<kWarpTeam> team;
  if (kWarpTeam && team.plane >= f.batch * f.channels) return;

  const int64_t N = f.plane_size, packs = N / kVec, C = f.channels, m = f.branch_channels;
  const int64_t b = team.plane / C, c = team.plane % C;
  const ChannelRole role = channel_role(c, m);
  const scalar_t* x = static_cast<const scalar_t*>(f.x) + team.plane * N;
  const scalar_t* gu = static_cast<const scalar_t*>(p.grad_out) + (b * C + shuffle_dst(c, C)) * N;
  scalar_t* dx = static_cast<scalar_t*>(p.grad_x) + team.plane * N;
  const acc_t mean = static_cast<const acc_t*>(f.mean)[team.plane];
  const acc_t rstd = static_cast<const acc_t*>(f.rstd)[team.plane];
  const Standardizer<acc_t> st = saved_stats(mean, rstd);
  const PlaneGate<acc_t> gate(f, role, st);

  // Pass 1: T1 = sum t, T2 = sum t * xh with t = gu * x * s (1 - s) = dL/dz.
  acc_t xv[kPacks > 0 ? kPacks : 1][kVec], gv[kPacks > 0 ? kPacks : 1][kVec];
  acc_t sv[kPacks > 0 ? kPacks : 1][kVec];
  acc_t sums[2] = {0, 0};
  auto accumulate = [&](const acc_t(&x_)[kVec], const acc_t(&g_)[kVec], acc_t(&s_)[kVec]) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      s_[i] = gate(x_[i]);
      const acc_t t = gate_input_grad(g_[i], x_[i], s_[i]);
      sums[0] += t;
      if (role.spatial) sums[1] += t * st.normalized(x_[i]);
    }
  };
  if constexpr (kPacks > 0) {
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t q = team.rank + int64_t(k) * team.size;
      if (q < packs) {
        load_acc<scalar_t, acc_t, kVec>(x, q, xv[k]);
        load_acc<scalar_t, acc_t, kVec>(gu, q, gv[k]);
        accumulate(xv[k], gv[k], sv[k]);
      }
    }
  } else {
    for (int64_t q = team.rank; q < packs; q += team.size) {
      load_acc<scalar_t, acc_t, kVec>(x, q, xv[0]);
      load_acc<scalar_t, acc_t, kVec>(gu, q, gv[0]);
      accumulate(xv[0], gv[0], sv[0]);
    }
  }
  team_sum<kWarpTeam>(sums, scratch);

  const int64_t slot = (b * f.groups + role.group) * m + role.k;
  if (team.rank == 0) {
    if (role.spatial) {
      static_cast<acc_t*>(p.t_sum)[slot] = sums[0];
      static_cast<acc_t*>(p.t_xh)[slot] = sums[1];
    } else {
      static_cast<acc_t*>(p.gate_grad)[slot] = sums[0];  // = dz: the gate is constant
    }
  }
  const PlaneGradCoeffs<acc_t> k_ = plane_grad_coeffs(
      role.spatial, static_cast<const acc_t*>(f.channel_weight)[role.k],
      static_cast<const acc_t*>(f.spatial_weight)[role.k],
      static_cast<const acc_t*>(f.gn_weight)[role.k], rstd, sums[0], sums[1], acc_t(1) / acc_t(N));

  // Pass 2: dx = gu * s + beta, + alpha * t + gamma * xh on spatial planes (only there: a channel
  // plane's rstd may be inf, eps = 0 and a constant plane, and 0 * inf is NaN).
  auto write_dx = [&](int64_t q, const acc_t(&x_)[kVec], const acc_t(&g_)[kVec], const acc_t(&s_)[kVec]) {
    acc_t d[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      d[i] = g_[i] * s_[i] + k_.beta;
      if (role.spatial) {
        d[i] += k_.alpha * gate_input_grad(g_[i], x_[i], s_[i]) + k_.gamma * st.normalized(x_[i]);
      }
    }
    store_acc<scalar_t, acc_t, kVec>(dx, q, d);
  };
  if constexpr (kPacks > 0) {
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t q = team.rank + int64_t(k) * team.size;
      if (q < packs) write_dx(q, xv[k], gv[k], sv[k]);
    }
  } else {
    for (int64_t q = team.rank; q < packs; q += team.size) {
      load_acc<scalar_t, acc_t, kVec>(x, q, xv[0]);
      load_acc<scalar_t, acc_t, kVec>(gu, q, gv[0]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sv[0][i] = gate(xv[0][i]);
      write_dx(q, xv[0], gv[0], sv[0]);
    }
  }
}

}  // namespace sa_cuda::SA_GPU_NS
