// ShuffleAttention, backward: one block per branch of one (batch item, group).
//
// Bytes moved: x and grad_out (shuffled channels) read twice (sums, then dx; the second read hits
// L2, and is skipped by the spatial branch when the plane fits one tile), grad_x written once,
// saved mean/rstd and the per-unit partials (sa_params.h: dz for the channel branch, T1 and
// A = sum_p t xh^T for the spatial branch) reduced later by the host code. With the residual
// epilogue the first read of grad_out reads out too and writes grad_identity, and the second
// reads grad_identity (sa_grad.cuh).
#pragma once

#include "sa_grad.cuh"
#include "shuffle_attention_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

template <typename scalar_t, int kVec>
SA_KERNEL_BOUNDS(kGroupThreads, kGroupMinBlocks)
void shuffle_attention_backward_kernel(BackwardParams bp, int64_t tile) {
  using acc_t = at::opmath_type<scalar_t>;
  SA_DYNAMIC_SHARED(acc_t, smem);
  const ForwardParams& p = bp.fwd;
  // m is small (the launch checked its tiles against the shared memory): int tile indices.
  const int m = static_cast<int>(p.branch_channels);
  const int64_t N = p.plane_size;
  const GroupSmem L{m, tile};
  const BranchUnit unit = branch_unit(p, blockIdx.x);
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + unit.plane0 * N;
  const int64_t gu = unit.out_plane0 * N;  // the gradient's plane j from element gu + 2 j N
  const SaGradRead<scalar_t> first = sa_grad_first_read<scalar_t>(bp);
  const SaGradRead<scalar_t> reread = sa_grad_reread<scalar_t>(bp);
  scalar_t* dx = static_cast<scalar_t*>(bp.grad_x) + unit.plane0 * N;
  const GroupStats<acc_t> stats(smem + L.stats(), m);
  const acc_t* mean = stats.mean;
  const acc_t* rstd = stats.rstd;
  acc_t* gate = smem + L.gate();
  acc_t* sums = smem + L.dz_or_t1();
  acc_t* beta = smem + L.beta();
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    stats.set(j, saved_stats(static_cast<const acc_t*>(p.mean)[unit.plane0 + j],
                             static_cast<const acc_t*>(p.rstd)[unit.plane0 + j]));
  }
  __syncthreads();

  if (!unit.spatial) {
    // s = sigmoid(W1 mu + b1); dz_j = sum_p(gu_j x_j) s_j (1 - s_j); dmu = W1^T dz;
    // dx_j = gu_j s_j + dmu_j / N. sum_p(gu_j x_j) by pieces (GroupPieces), then in piece order.
    const ParamView<acc_t> w1 = param_view<acc_t>(p, kChannelWeight);
    const ParamView<acc_t> b1 = param_view<acc_t>(p, kChannelBias);
    const GroupPieces pieces(m, N / kVec);
    acc_t* dots = smem + L.tile_x();
    for (int j = threadIdx.x; j < m; j += blockDim.x)
      gate[j] = sigmoid(matvec_row(w1, mean, b1, m, j));
    pieces.for_warp([&](int k, int j, int64_t begin, int64_t end) {
      acc_t s = 0;
      const int64_t g0 = gu + 2 * j * N;
      // The gradient's first read. Half the statistics' steps per plane: as many values per step
      // for the two planes. A slot: x, the gradient, out (with the epilogue).
      unrolled_stream<group_unroll<kVec>() / 2, acc_t[3][kVec]>(
          begin + threadIdx.x % kWarpSize, kWarpSize, end,
          [&](int64_t q, acc_t(&v)[3][kVec]) {
            load_acc<scalar_t, acc_t, kVec>(x + j * N, q, v[0]);
            first.load(g0, q, v[1], v[2]);
          },
          [&](int64_t q, acc_t(&v)[3][kVec]) {
            first.mask(g0, q, v[1], v[2], true);
#pragma unroll
            for (int i = 0; i < kVec; ++i) s += v[1][i] * v[0][i];
          });
      s = warp_sum(s);
      if (threadIdx.x % kWarpSize == 0) dots[k] = s;
    });
    __syncthreads();
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
      acc_t s = 0;
      for (int k = j * pieces.per_plane; k < (j + 1) * pieces.per_plane; ++k) s += dots[k];
      sums[j] = s * sigmoid_grad(gate[j]);
      static_cast<acc_t*>(bp.gate_grad)[unit.slot0 + j] = sums[j];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < m; i += blockDim.x) {
      beta[i] = channel_grad_coeffs(matvec_t_row(w1, sums, m, i), acc_t(1) / acc_t(N)).beta;
    }
    __syncthreads();
    for_each_cell_unrolled<kCellLoads, acc_t[kVec]>(
        int64_t(m), N / kVec,
        [&](int64_t j, int64_t q, acc_t(&g)[kVec]) { reread.load(gu + 2 * j * N, q, g); },
        [&](int64_t j, int64_t q, acc_t(&g)[kVec]) {
          acc_t d[kVec];
#pragma unroll
          for (int i = 0; i < kVec; ++i) d[i] = channel_input_grad(g[i], gate[j], beta[j]);
          store_acc<scalar_t, acc_t, kVec>(dx + j * N, q, d);
        });
    return;
  }

  // The spatial branch's d1 = mean(dy) per channel in the channel branch's beta slot, d2 =
  // mean(dy xh) in its own.
  acc_t* dy_mean = beta;
  acc_t* dyxh_mean = smem + L.d2();
  const SpatialGateParams<acc_t> gp(p, smem, L);
  const acc_t* w2 = gp.w2;
  const acc_t* gw = gp.gw;
  acc_t* xt = smem + L.tile_x();
  acc_t* yt = smem + L.tile_y();
  acc_t* gt = smem + L.tile_g();
  acc_t* st = smem + L.tile_s();
  acc_t* tt = smem + L.tile_t();
  acc_t* accum = smem + L.accum();
  const int ts = static_cast<int>(L.stride());
  gp.stage(p, m, stats);
  for (int64_t idx = threadIdx.x; idx < L.accum_values(); idx += blockDim.x) accum[idx] = 0;

  // One tile of pixels [p0, p0 + n): x and the gradient (read through `grad`) in, gate s and
  // t = dL/dz = gu x s (1 - s) out; then the x tile is replaced by xh = (x - mu) r (each entry by
  // the thread that read it: nobody else reads xt in that loop).
  auto gate_tile = [&](const SaGradRead<scalar_t>& grad, int64_t p0, int n) {
    // The previous tile is consumed (the first time: the gate's parameters are staged and the
    // partials zeroed).
    __syncthreads();
    for_each_cell_unrolled<kCellLoads, acc_t[3]>(
        m, n,
        [&](int i, int pt, acc_t(&v)[3]) {
          v[0] = static_cast<acc_t>(x[i * N + p0 + pt]);
          grad.load_at(gu + 2 * i * N + p0 + pt, v[1], v[2]);
        },
        [&](int i, int pt, acc_t(&v)[3]) {
          grad.mask_at(gu + 2 * i * N + p0 + pt, v[1], v[2]);
          xt[i * ts + pt] = v[0];
          gt[i * ts + pt] = v[1];
          yt[i * ts + pt] = gp.group_norm_output(stats, i, i, v[0]);
        });
    __syncthreads();
    for_each_cell(m, n, [&](int j, int pt) {
      const int c = j * ts + pt;
      st[c] = sigmoid(gp.preactivation(m, m, ts, yt, j, pt));
      tt[c] = gate_input_grad(gt[c], xt[c], st[c]);
      xt[c] = stats.centered(j, xt[c]) * stats.gate_rstd[j];
    });
    __syncthreads();
  };

  // Pass 1: T1[j] = sum_p t_j, A[j, i] = sum_p t_j xh_i (xh first: t_j (x_i - mu_i) would be of
  // order |x|^2 and overflow first). Work item w = (block, slice) of the slices() x half^2 items
  // (half = ceil(m / 2)): block (jb, ib) holds the 2 x 2 entries j in {jb, jb + half},
  // i in {ib, ib + half} (a row past m stands in for itself and is not stored), its slice the
  // tile pixels slice, + slices, ... . The thread of an item adds its tile sums to the item's own
  // entries of the slice's partials (one writer each; T1 by the items with ib = 0), which are
  // reduced over the slices in slice order at the end: the same bits every run.
  const int half = (m + 1) / 2, slices = static_cast<int>(L.slices()), items = slices * half * half;
  const int64_t tiles = (N + tile - 1) / tile;
  for (int64_t p0 = 0; p0 < N; p0 += tile) {
    const int n = static_cast<int>(N - p0 < tile ? N - p0 : tile);
    gate_tile(first, p0, n);
    for (int w = threadIdx.x; w < items; w += blockDim.x) {
      const int block = w / slices, slice = w % slices, jb = block / half, ib = block % half;
      const bool j1_in = jb + half < m, i1_in = ib + half < m;
      const acc_t* t0 = tt + jb * ts;
      const acc_t* t1 = tt + (j1_in ? jb + half : jb) * ts;
      const acc_t* x0 = xt + ib * ts;
      const acc_t* x1 = xt + (i1_in ? ib + half : ib) * ts;
      acc_t a00 = 0, a01 = 0, a10 = 0, a11 = 0, s0 = 0, s1 = 0;
      for (int pt = slice; pt < n; pt += slices) {
        a00 += t0[pt] * x0[pt];
        a01 += t0[pt] * x1[pt];
        a10 += t1[pt] * x0[pt];
        a11 += t1[pt] * x1[pt];
        s0 += t0[pt];
        s1 += t1[pt];
      }
      acc_t* A = accum + slice * m * m;
      acc_t* T1 = accum + slices * m * m + slice * m;
      A[jb * m + ib] += a00;
      if (i1_in) A[jb * m + ib + half] += a01;
      if (j1_in) A[(jb + half) * m + ib] += a10;
      if (j1_in && i1_in) A[(jb + half) * m + ib + half] += a11;
      if (ib == 0) {
        T1[jb] += s0;
        if (j1_in) T1[jb + half] += s1;
      }
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    acc_t t1 = 0;
    for (int slice = 0; slice < slices; ++slice) t1 += accum[slices * m * m + slice * m + j];
    sums[j] = t1;
    static_cast<acc_t*>(bp.t_sum)[unit.slot0 + j] = t1;
  }
  __syncthreads();
  // Thread i reduces column i of A over the slices (into slice 0's entries of the column, which
  // only it reads) and stores it, then takes channel i's input-gradient coefficients through
  // dy = W2^T t (sa_math.h: shuffle_attention_spatial_coeffs; alpha = gw_i r_i is recomputed).
  for (int i = threadIdx.x; i < m; i += blockDim.x) {
    for (int j = 0; j < m; ++j) {
      acc_t A_ji = 0;
      for (int slice = 0; slice < slices; ++slice) A_ji += accum[slice * m * m + j * m + i];
      accum[j * m + i] = A_ji;
      static_cast<acc_t*>(bp.t_xh)[unit.slot0 * m + j * m + i] = A_ji;
    }
    const InputGradCoeffs<acc_t> k = shuffle_attention_spatial_coeffs(
        w2, sums, accum, m, i, gw[i] * rstd[i], acc_t(1) / acc_t(N));
    dy_mean[i] = k.d1;
    dyxh_mean[i] = k.d2;
  }
  __syncthreads();

  // Pass 2: dx_i = gu_i s_i + alpha_i (dy_i - d1_i - xh_i d2_i) (sa_math.h). A plane within
  // one tile still has it in shared memory from pass 1.
  for (int64_t p0 = 0; p0 < N; p0 += tile) {
    const int n = static_cast<int>(N - p0 < tile ? N - p0 : tile);
    if (tiles > 1) gate_tile(reread, p0, n);
    for_each_cell(m, n, [&](int i, int pt) {
      const acc_t dy = gp.output_grad(m, m, ts, tt, i, pt);
      const int c = i * ts + pt;
      const InputGradCoeffs<acc_t> k{gw[i] * rstd[i], acc_t(0), dy_mean[i], dyxh_mean[i]};
      dx[i * N + p0 + pt] = static_cast<scalar_t>(spatial_input_grad(gt[c], st[c], dy, xt[c], k));
    });
  }
}

}  // namespace sa_cuda::SA_GPU_NS
