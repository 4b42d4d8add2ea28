// 1x1-conv variant (ShuffleAttention), backward: one block per branch of one (batch item, group).
//
// Bytes moved: x and grad_out (shuffled channels) read twice (sums, then dx; the second read hits
// L2), grad_x written once, saved mean/rstd and the per-unit partials (sa_params.h: dz for the
// channel branch, T1 and A = sum_p t xh^T for the spatial branch) reduced later by the host code.
#pragma once

#include "group_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

template <typename scalar_t>
SA_KERNEL_BOUNDS(kGroupThreads) void group_backward_kernel(BackwardParams bp, int64_t tile) {
  using acc_t = at::opmath_type<scalar_t>;
  SA_DYNAMIC_SHARED(acc_t, smem);
  const ForwardParams& p = bp.fwd;
  const int64_t m = p.branch_channels, N = p.plane_size, C = p.channels, G = p.groups;
  const GroupSmem L{m, tile};
  const int64_t unit = blockIdx.x;
  const int64_t b = unit / (2 * G), g = (unit / 2) % G;
  const bool spatial = unit % 2 == 1;
  const int64_t c0 = g * 2 * m + (spatial ? m : 0), plane0 = b * C + c0, slot0 = (b * G + g) * m;
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + plane0 * N;
  const scalar_t* grad_out = static_cast<const scalar_t*>(bp.grad_out);
  auto gu_plane = [&](int64_t j) { return grad_out + (b * C + shuffle_dst(c0 + j, C)) * N; };
  scalar_t* dx = static_cast<scalar_t*>(bp.grad_x) + plane0 * N;
  const GroupStats<acc_t> stats(smem, L);
  const acc_t* mean = stats.mean;
  const acc_t* rstd = stats.rstd;
  acc_t* gate = smem + L.gate();
  acc_t* sums = smem + L.dz_or_t1();
  acc_t* d1 = smem + L.dmu_or_d1();
  const acc_t inv_n = acc_t(1) / acc_t(N);
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    stats.set(j, saved_stats(static_cast<const acc_t*>(p.mean)[plane0 + j],
                             static_cast<const acc_t*>(p.rstd)[plane0 + j]));
  }
  __syncthreads();

  if (!spatial) {
    // s = sigmoid(W1 mu + b1); dz_j = sum_p(gu_j x_j) s_j (1 - s_j); dmu = W1^T dz;
    // dx_j = gu_j s_j + dmu_j / N.
    const acc_t* w1 = static_cast<const acc_t*>(p.channel_weight);
    const acc_t* b1 = static_cast<const acc_t*>(p.channel_bias);
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) gate[j] = sigmoid(matvec_row(w1, mean, b1, m, j));
    __syncthreads();
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    for (int64_t j = warp; j < m; j += warps) {
      const scalar_t* gj = gu_plane(j);
      acc_t s = 0;
      for (int64_t q = lane; q < N; q += kWarpSize) s += static_cast<acc_t>(gj[q]) * static_cast<acc_t>(x[j * N + q]);
      s = warp_sum(s);
      if (lane == 0) {
        sums[j] = s * sigmoid_grad(gate[j]);
        static_cast<acc_t*>(bp.gate_grad)[slot0 + j] = sums[j];
      }
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) d1[i] = matvec_t_row(w1, sums, m, i) * inv_n;
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < m * N; idx += blockDim.x) {
      const int64_t j = idx / N, q = idx % N;
      dx[idx] = static_cast<scalar_t>(static_cast<acc_t>(gu_plane(j)[q]) * gate[j] + d1[j]);
    }
    return;
  }

  const acc_t* gw = static_cast<const acc_t*>(p.gn_weight);
  acc_t* d2 = smem + L.d2();
  acc_t* w2 = smem + L.matrix();
  acc_t* scale = smem + L.scale();
  acc_t* A = smem + L.accum();
  acc_t* xt = smem + L.tile_x();
  acc_t* yt = smem + L.tile_y();
  acc_t* gt = smem + L.tile_g();
  acc_t* st = smem + L.tile_s();
  acc_t* tt = smem + L.tile_t();
  load_spatial_gate(p, m, stats, w2, scale);
  for (int64_t idx = threadIdx.x; idx < m * m; idx += blockDim.x) A[idx] = 0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) sums[j] = 0;

  // One tile of pixels: x and grad_out in, gate s and t = dL/dz = gu x s (1 - s) out (t = 0 on
  // pixels past the plane's end, where x and gu are loaded as 0); then the x tile is replaced by
  // xh = (x - mu) r (each entry by the thread that read it: nobody else reads xt in that loop).
  auto gate_tile = [&](int64_t p0) {
    __syncthreads();  // the previous tile is consumed (and W2, scale, A are initialized)
    load_tile<scalar_t, acc_t>([&](int64_t i) { return x + i * N; }, m, N, p0, tile, xt);
    load_tile<scalar_t, acc_t>(gu_plane, m, N, p0, tile, gt);
    __syncthreads();
    normalize_tile(p, m, tile, stats, scale, xt, yt);
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < m * tile; idx += blockDim.x) {
      const int64_t j = idx / tile, pt = idx % tile;
      st[idx] = sigmoid(gate_preactivation(p, m, tile, w2, yt, j, pt));
      tt[idx] = gate_input_grad(gt[idx], xt[idx], st[idx]);
      xt[idx] = sa_fma(xt[idx], stats.input_scale[j], -stats.center[j]) * stats.gate_rstd[j];
    }
    __syncthreads();
  };

  // Pass 1: T1[j] = sum_p t_j, A[j, i] = sum_p t_j xh_i (xh first: t_j (x_i - mu_i) would be of
  // order |x|^2 and overflow first); each entry owned by one thread.
  for (int64_t p0 = 0; p0 < N; p0 += tile) {
    gate_tile(p0);
    for (int64_t idx = threadIdx.x; idx < m * m; idx += blockDim.x) {
      const int64_t j = idx / m, i = idx % m;
      acc_t a = 0;
      for (int64_t pt = 0; pt < tile; ++pt) a += tt[j * tile + pt] * xt[i * tile + pt];
      A[idx] += a;
    }
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
      acc_t t1 = 0;
      for (int64_t pt = 0; pt < tile; ++pt) t1 += tt[j * tile + pt];
      sums[j] += t1;
    }
  }
  __syncthreads();
  // dy = W2^T t at the GroupNorm output: mean(dy_i) = D1_i, mean(dy_i xh_i) = D2_i.
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    acc_t a = 0, c = 0;
    for (int64_t j = 0; j < m; ++j) {
      a += w2[j * m + i] * sums[j];
      c += w2[j * m + i] * A[j * m + i];
    }
    d1[i] = a * inv_n;
    d2[i] = c * inv_n;
    static_cast<acc_t*>(bp.t_sum)[slot0 + i] = sums[i];
  }
  for (int64_t idx = threadIdx.x; idx < m * m; idx += blockDim.x) {
    static_cast<acc_t*>(bp.t_xh)[slot0 * m + idx] = A[idx];
  }

  // Pass 2: dx_i = gu_i s_i + gw_i r_i (dy_i - D1_i - xh_i D2_i).
  for (int64_t p0 = 0; p0 < N; p0 += tile) {
    gate_tile(p0);
    for (int64_t idx = threadIdx.x; idx < m * tile; idx += blockDim.x) {
      const int64_t i = idx / tile, pt = idx % tile;
      if (p0 + pt >= N) continue;
      acc_t dy = 0;
      for (int64_t j = 0; j < m; ++j) dy += w2[j * m + i] * tt[j * tile + pt];
      dx[i * N + p0 + pt] = static_cast<scalar_t>(
          spatial_dx(gt[idx], st[idx], dy, xt[idx], gw[i] * rstd[i], d1[i], d2[i]));
    }
  }
}

}  // namespace sa_cuda::SA_GPU_NS
