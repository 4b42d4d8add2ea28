// SALayer, backward: one team per plane.
//
// Bytes moved: x and grad_out (at the shuffled channel) read once, grad_x written once, plus the
// saved mean/rstd and two acc_t partials per plane (sa_params.h), reduced later by the host code
// in a fixed order; with the residual epilogue out read and grad_identity written once as well
// (sa_grad.cuh). kPacks > 0 keeps x, grad_out and the gate in registers between the reduction
// and dx; kPacks == 0 streams the plane twice (sums, then dx), the second read from L2 (grad_out's
// from grad_identity with the epilogue), with kStreamLoads / 2 packs of each in flight per thread
// (kStreamLoads loads: as many as the forward's, in as many registers). The staged warp-team path
// (kVec == 1) stages x through shared memory as the forward does; grad_out's planes lie at
// shuffled channels (not one chunk) and are read per plane.
#pragma once

#include "sa_grad.cuh"
#include "sa_layer_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

// The per-element math of the SALayer backward, shared by the NCHW kernel below and the NHWC
// kernels (sa_layer_nhwc_backward.cuh), which differ only in the order of the sums.

// One element's t = dL/dz = gu * x * s (1 - s) added to its plane's sums: T1 = sum t and, on a
// spatial plane, T2 = sum t * xh. Returns the gate s, which the input gradient uses again.
template <typename acc_t>
SA_DEVICE acc_t add_grad_terms(const PlaneGate<acc_t>& gate, const Standardizer<acc_t>& st, acc_t x,
                               acc_t gu, acc_t (&sums)[2]) {
  const acc_t s = gate(x);
  const acc_t t = gate_input_grad(gu, x, s);
  sums[0] += t;
  if (gate.spatial) sums[1] += t * st.normalized(x);
  return s;
}

// A plane's complete sums into its slot of the partials: T1 and T2 on a spatial plane, dz = T1 on
// a channel plane (its gate is constant).
template <typename acc_t>
SA_DEVICE void store_plane_sums(const BackwardParams& p, int64_t slot, bool spatial,
                                const acc_t (&sums)[2]) {
  if (spatial) {
    static_cast<acc_t*>(p.t_sum)[slot] = sums[0];
    static_cast<acc_t*>(p.t_xh)[slot] = sums[1];
  } else {
    static_cast<acc_t*>(p.gate_grad)[slot] = sums[0];
  }
}

// The input gradient's coefficients of a plane of N elements from its complete sums.
template <typename acc_t>
SA_DEVICE InputGradCoeffs<acc_t> plane_grad_coeffs(const PlaneParams<acc_t>& w, bool spatial,
                                                   acc_t rstd, const acc_t (&sums)[2], int64_t N) {
  const acc_t inv_n = acc_t(1) / acc_t(N);
  return spatial ? spatial_grad_coeffs(w.gw * rstd * w.sw, sums[0], sums[1], inv_n)
                 : channel_grad_coeffs(w.cw * sums[0], inv_n);
}

// dx = gu * s + beta, + alpha * (t - d1 - xh * d2) on spatial planes (sa_math.h:
// spatial_input_grad, here with the spatial terms only where they apply).
template <typename acc_t>
SA_DEVICE acc_t plane_input_grad(const PlaneGate<acc_t>& gate, const Standardizer<acc_t>& st,
                                 const InputGradCoeffs<acc_t>& coeffs, acc_t x, acc_t gu, acc_t s) {
  acc_t d = channel_input_grad(gu, s, coeffs.beta);
  if (gate.spatial) d += spatial_grad_terms(gate_input_grad(gu, x, s), st.normalized(x), coeffs);
  return d;
}

template <typename scalar_t, int kLanes, int kVec, int kPacks>
SA_LAYER_KERNEL_BOUNDS(kLanes > 0)
void sa_layer_backward_kernel(BackwardParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kWarpTeam = kLanes > 0;
  constexpr bool kStaged = kWarpTeam && kVec == 1;  // as in sa_layer_forward_kernel
  SA_SHARED_ARRAY(acc_t, scratch, 2 * kWarpSize);
  const ForwardParams& f = p.fwd;
  const int64_t planes = f.batch * f.channels, N = f.plane_size, packs = N / kVec;
  const PlaneTeam<kLanes> team(planes);
  const scalar_t* x_planes = static_cast<const scalar_t*>(f.x);
  acc_t xv[kPacks > 0 ? kPacks : 1][kVec], gv[kPacks > 0 ? kPacks : 1][kVec];
  acc_t sv[kPacks > 0 ? kPacks : 1][kVec];
  if constexpr (kStaged) load_staged_plane(x_planes, team, planes, N, xv);
  if (!PlaneTeam<kLanes>::kSharesWarp && !team.active) return;  // as in the forward

  const PlaneUnit unit = plane_unit(f, team.plane);
  const ChannelRole& role = unit.role;
  const PlaneParams<acc_t> w = load_plane_params<acc_t>(f, role.k);
  const acc_t mean = static_cast<const acc_t*>(f.mean)[team.plane];
  const acc_t rstd = static_cast<const acc_t*>(f.rstd)[team.plane];
  const scalar_t* x = x_planes + team.plane * N;
  const int64_t gu = unit.out_plane * N;  // the plane's gradient from element gu (sa_grad.cuh)
  scalar_t* dx = static_cast<scalar_t*>(p.grad_x) + team.plane * N;
  const Standardizer<acc_t> st = saved_stats(mean, rstd);
  const PlaneGate<acc_t> gate(w, role.spatial, st);
  // A streamed pack: x, the gradient and (on its first read with the residual epilogue) out.
  auto load_triple = [&](const SaGradRead<scalar_t>& grad, int64_t q, acc_t(&v)[3][kVec]) {
    load_acc<scalar_t, acc_t, kVec>(x, q, v[0]);
    grad.load(gu, q, v[1], v[2]);
  };

  // Pass 1: T1 = sum t, T2 = sum t * xh with t = gu * x * s (1 - s) = dL/dz. The gradient's
  // first read (a team past the last plane reads the last one's and stores nothing).
  const SaGradRead<scalar_t> first = sa_grad_first_read<scalar_t>(p);
  acc_t sums[2] = {0, 0};
  auto accumulate = [&](const acc_t(&x_)[kVec], const acc_t(&g_)[kVec], acc_t(&s_)[kVec]) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) s_[i] = add_grad_terms(gate, st, x_[i], g_[i], sums);
  };
  if constexpr (kPacks > 0) {
    if constexpr (!kStaged) load_plane_packs<scalar_t, kLanes, kVec, kPacks>(x, team, packs, xv);
    acc_t ov[kPacks][kVec];  // out, with the epilogue
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t q = team.rank + int64_t(k) * team.size;
      if (q < packs) first.load(gu, q, gv[k], ov[k]);
    }
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t q = team.rank + int64_t(k) * team.size;
      if (q < packs) {
        first.mask(gu, q, gv[k], ov[k], team.active);
        accumulate(xv[k], gv[k], sv[k]);
      }
    }
  } else {
    unrolled_stream<kStreamLoads / 2, acc_t[3][kVec]>(
        team.rank, team.size, packs,
        [&](int64_t q, acc_t(&v)[3][kVec]) { load_triple(first, q, v); },
        [&](int64_t q, acc_t(&v)[3][kVec]) {
          first.mask(gu, q, v[1], v[2], team.active);
          accumulate(v[0], v[1], sv[0]);
        });
  }
  team.sum(sums, scratch);

  if (team.rank == 0 && team.active) store_plane_sums(p, unit.slot(f), role.spatial, sums);
  const InputGradCoeffs<acc_t> coeffs = plane_grad_coeffs(w, role.spatial, rstd, sums, N);

  // Pass 2: dx.
  auto write_dx = [&](int64_t q, const acc_t(&x_)[kVec], const acc_t(&g_)[kVec],
                      const acc_t(&s_)[kVec]) {
    acc_t d[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) d[i] = plane_input_grad(gate, st, coeffs, x_[i], g_[i], s_[i]);
    if (team.active) store_acc<scalar_t, acc_t, kVec>(dx, q, d);
  };
  if constexpr (kPacks > 0) {
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t q = team.rank + int64_t(k) * team.size;
      if (q < packs) write_dx(q, xv[k], gv[k], sv[k]);
    }
  } else {
    auto recompute_dx = [&](int64_t q, const acc_t(&v)[3][kVec]) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) sv[0][i] = gate(v[0][i]);
      write_dx(q, v[0], v[1], sv[0]);
    };
    const SaGradRead<scalar_t> reread = sa_grad_reread<scalar_t>(p);
    unrolled_stream<kStreamLoads / 2, acc_t[3][kVec]>(
        team.rank, team.size, packs,
        [&](int64_t q, acc_t(&v)[3][kVec]) { load_triple(reread, q, v); }, recompute_dx);
  }
}

}  // namespace sa_cuda::SA_GPU_NS
