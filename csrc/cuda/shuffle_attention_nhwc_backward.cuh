// ShuffleAttention, backward, channels_last (NHWC): four kernels, then the parameter-gradient
// reduction (param_grad_reduce.cuh) as for NCHW.
//
//   shuffle_attention_nhwc_grad_sums_kernel    a block per (batch item, chunk, window)
//                                              (nhwc_windows.cuh): per tile, x and grad_out in,
//                                              the spatial channels' gate s, t and xh; per chunk
//                                              and channel the sums A[j, i] = sum t_j xh_i and
//                                              T1[j] = sum t_j (spatial), sum gu x (channel)
//   shuffle_attention_nhwc_grad_finish_kernel  a thread per (batch item, channel): the chunks'
//                                              sums added in chunk order into the unit partials
//                                              (sa_params.h: gate_grad dz, t_sum, t_xh)
//   shuffle_attention_nhwc_grad_coeffs_kernel  a thread per (batch item, channel): its input-
//                                              gradient coefficients from its branch's partials
//                                              (dmu = W1^T dz; W2^T T1 and W2^T A)
//   shuffle_attention_nhwc_input_grad_kernel   per window and tile as the first, then grad_x
//
// Every per-element formula, and the gate, are the NCHW kernel's (shuffle_attention_backward.cuh);
// only the order of the sums differs. Bytes moved: x and grad_out read twice, grad_x written once,
// per (item, chunk, channel) m + 1 acc_t partials, per (item, channel) the coefficients; with the
// residual epilogue the first kernel reads out and writes grad_identity, the last reads
// grad_identity instead of grad_out (sa_grad.cuh).
#pragma once

#include <ATen/OpMathType.h>

#include "nhwc_windows.cuh"
#include "shuffle_attention_nhwc_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

// The saved statistics of a plane, as the backward uses them (saved_stats: unscaled, centered on
// the stored mean).
template <typename acc_t>
struct SavedStats {
  const acc_t *mean, *rstd;
  SA_DEVICE Standardizer<acc_t> operator()(int64_t plane) const {
    return saved_stats(mean[plane], rstd[plane]);
  }
};

template <typename acc_t>
SA_DEVICE SavedStats<acc_t> saved_stats_of(const ForwardParams& p) {
  return SavedStats<acc_t>{static_cast<const acc_t*>(p.mean), static_cast<const acc_t*>(p.rstd)};
}

// Slot of column `col` of channel c's sums of a chunk: WindowSmem's items, per (batch item, chunk,
// channel) of NhwcGrid's partials.
SA_DEVICE int64_t window_sum_slot(const NhwcWindows& w, int64_t item, int64_t chunk, int64_t c,
                                  int64_t col) {
  return w.grid.partial(item, chunk, c) * (w.m + 1) + col;
}

template <typename scalar_t>
SA_KERNEL_BOUNDS(kWindowThreads, kGroupMinBlocks)
void shuffle_attention_nhwc_grad_sums_kernel(BackwardParams bp, NhwcWindows w,
                                             at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  SA_DYNAMIC_SHARED(acc_t, smem);
  const ForwardParams& p = bp.fwd;
  const WindowBlock<acc_t> B(p, w, smem);
  const int m = B.m, columns = m + 1, items = B.win.K * columns;
  const int slices = static_cast<int>(B.L.slices());
  acc_t* accum = smem + B.L.accum();
  B.stage(p, saved_stats_of<acc_t>(p));
  for (int idx = threadIdx.x; idx < items * slices; idx += blockDim.x) accum[idx] = 0;

  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  // The gradient's first read (sa_grad.cuh).
  const SaGradRead<scalar_t> gu = sa_grad_first_read<scalar_t>(bp);
  // Item (ch, col), slice: the tile pixels slice, + slices, ... (xh first in t_j xh_i: t_j
  // (x_i - mu_i) would be of order |x|^2 and overflow first). Entry idx = item * slices + slice of
  // the sums has one writer, the thread threadIdx.x = idx mod blockDim.x, on every tile.
  B.template for_each_tile<true>(x, gu, [&](int64_t, int n) {
    for (int idx = threadIdx.x; idx < items * slices; idx += blockDim.x) {
      const int item = idx / slices, slice = idx % slices;
      const int ch = item / columns, col = item % columns, start = B.branch[ch];
      const acc_t* own = (start < 0 ? B.gt : B.tt) + ch * B.ts;
      acc_t sum = 0;
      if (start < 0) {
        if (col != 0) continue;
        const acc_t* xs = B.xt + ch * B.ts;
        for (int pt = slice; pt < n; pt += slices) sum += own[pt] * xs[pt];  // gu x
      } else if (col < m) {
        const acc_t* xh = B.xt + (start + col) * B.ts;
        for (int pt = slice; pt < n; pt += slices) sum += own[pt] * xh[pt];  // t_j xh_i
      } else {
        for (int pt = slice; pt < n; pt += slices) sum += own[pt];  // t_j
      }
      accum[idx] += sum;
    }
  });
  __syncthreads();
  // The slices in slice order, per item.
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int ch = item / columns, col = item % columns;
    if (B.branch[ch] < 0 && col != 0) continue;
    acc_t total = 0;
    for (int slice = 0; slice < slices; ++slice) total += accum[item * slices + slice];
    sums[window_sum_slot(B.w, B.win.item, B.win.chunk, B.win.input_channel(B.w, ch), col)] = total;
  }
}

template <typename scalar_t>
SA_KERNEL_BOUNDS(kFinishThreads)
void shuffle_attention_nhwc_grad_finish_kernel(BackwardParams bp, NhwcWindows w,
                                               const at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const ForwardParams& p = bp.fwd;
  const int64_t plane = int64_t(blockIdx.x) * kFinishThreads + threadIdx.x;
  if (plane >= w.grid.planes()) return;
  const int64_t item = plane / w.grid.channels, c = plane % w.grid.channels, m = w.m;
  const PlaneUnit unit = plane_unit(p, plane);
  const int64_t slot = unit.slot(p), k = unit.role.k;
  auto total = [&](int64_t col) {
    acc_t s = sums[window_sum_slot(w, item, 0, c, col)];
    for (int64_t chunk = 1; chunk < w.grid.chunks; ++chunk)
      s += sums[window_sum_slot(w, item, chunk, c, col)];
    return s;
  };
  if (!unit.role.spatial) {
    // dz_k = sum_p(gu_k x_k) s_k (1 - s_k), s = sigmoid(W1 mu + b1) of the branch's means.
    const acc_t* means = static_cast<const acc_t*>(p.mean) + plane - k;
    const acc_t s = sigmoid(matvec_row(param_view<acc_t>(p, kChannelWeight), means,
                                       param_view<acc_t>(p, kChannelBias), m, k));
    static_cast<acc_t*>(bp.gate_grad)[slot] = total(0) * sigmoid_grad(s);
    return;
  }
  static_cast<acc_t*>(bp.t_sum)[slot] = total(m);
  for (int64_t i = 0; i < m; ++i) static_cast<acc_t*>(bp.t_xh)[slot * m + i] = total(i);
}

template <typename scalar_t>
SA_KERNEL_BOUNDS(kFinishThreads)
void shuffle_attention_nhwc_grad_coeffs_kernel(BackwardParams bp, NhwcWindows w,
                                               InputGradCoeffs<at::opmath_type<scalar_t>>* coeffs) {
  using acc_t = at::opmath_type<scalar_t>;
  const ForwardParams& p = bp.fwd;
  const int64_t plane = int64_t(blockIdx.x) * kFinishThreads + threadIdx.x;
  if (plane >= w.grid.planes()) return;
  const PlaneUnit unit = plane_unit(p, plane);
  const int64_t m = w.m, k = unit.role.k, slot0 = unit.slot(p) - k;  // the branch's first slot
  const acc_t inv_n = acc_t(1) / acc_t(w.grid.pixels);
  if (!unit.role.spatial) {
    const acc_t* dz = static_cast<const acc_t*>(bp.gate_grad) + slot0;
    coeffs[plane] =
        channel_grad_coeffs(matvec_t_row(param_view<acc_t>(p, kChannelWeight), dz, m, k), inv_n);
    return;
  }
  const acc_t coef = param_view<acc_t>(p, kGnWeight)[k] * static_cast<const acc_t*>(p.rstd)[plane];
  coeffs[plane] = shuffle_attention_spatial_coeffs(
      param_view<acc_t>(p, kSpatialWeight), static_cast<const acc_t*>(bp.t_sum) + slot0,
      static_cast<const acc_t*>(bp.t_xh) + slot0 * m, m, k, coef, inv_n);
}

template <typename scalar_t>
SA_KERNEL_BOUNDS(kWindowThreads, kGroupMinBlocks)
void shuffle_attention_nhwc_input_grad_kernel(
    BackwardParams bp, NhwcWindows w, const InputGradCoeffs<at::opmath_type<scalar_t>>* coeffs) {
  using acc_t = at::opmath_type<scalar_t>;
  SA_DYNAMIC_SHARED(acc_t, smem);
  const ForwardParams& p = bp.fwd;
  const WindowBlock<acc_t> B(p, w, smem);
  scalar_t* dx = static_cast<scalar_t*>(bp.grad_x);
  B.stage(p, saved_stats_of<acc_t>(p));
  for (int ch = threadIdx.x; ch < B.win.K; ch += blockDim.x) B.coeffs[ch] = coeffs[B.plane(ch)];

  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const SaGradRead<scalar_t> gu = sa_grad_reread<scalar_t>(bp);
  // dx = gu s + beta (channel), gu s + alpha (dy - d1 - xh d2) with dy_i = sum_j W2[j, i] t_j
  // (spatial), written as the window's two runs of each input row.
  B.template for_each_tile<true>(x, gu, [&](int64_t p0, int n) {
    for_each_cell(n, B.win.K, [&](int pt, int ch) {
      const int c = ch * B.ts + pt, start = B.branch[ch];
      const InputGradCoeffs<acc_t> k = B.coeffs[ch];
      acc_t d;
      if (start < 0) {
        d = channel_input_grad(B.gt[c], B.gate[ch], k.beta);
      } else {
        const acc_t dy = B.gp.output_grad(B.m, B.w2_row, B.ts, B.tt + start * B.ts, ch - start, pt);
        d = spatial_input_grad(B.gt[c], B.st[c], dy, B.xt[c], k);
      }
      dx[B.win.row(B.w, p0 + pt) + B.win.input_channel(B.w, ch)] = static_cast<scalar_t>(d);
    });
  });
}

template <typename scalar_t>
void launch_shuffle_attention_nhwc_backward(const BackwardParams& b) {
  using acc_t = at::opmath_type<scalar_t>;
  const NhwcWindows w = window_grid<acc_t>(b.fwd, true);
  const size_t smem = window_smem(w).values(true) * sizeof(acc_t);
  const Workspace sums(sizeof(acc_t) * w.grid.partials() * (w.m + 1));
  const Workspace coeffs(sizeof(InputGradCoeffs<acc_t>) * w.grid.planes());
  const int64_t finish_grid = finish_blocks(w.grid, 1);  // a thread per (batch item, channel)
  const Stream stream = current_stream();
  launch(&shuffle_attention_nhwc_grad_sums_kernel<scalar_t>, w.blocks(), kWindowThreads, smem,
         stream, b, w, sums.as<acc_t>());
  launch(&shuffle_attention_nhwc_grad_finish_kernel<scalar_t>, finish_grid, kFinishThreads, 0,
         stream, b, w, sums.as<const acc_t>());
  launch(&shuffle_attention_nhwc_grad_coeffs_kernel<scalar_t>, finish_grid, kFinishThreads, 0,
         stream, b, w, coeffs.as<InputGradCoeffs<acc_t>>());
  launch(&shuffle_attention_nhwc_input_grad_kernel<scalar_t>, w.blocks(), kWindowThreads, smem,
         stream, b, w, coeffs.as<const InputGradCoeffs<acc_t>>());
}

}  // namespace sa_cuda::SA_GPU_NS
