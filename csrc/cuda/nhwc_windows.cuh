// channels_last (NHWC) on the GPU: the work decomposition of the ShuffleAttention NHWC kernels
// (shuffle_attention_nhwc_forward.cuh, shuffle_attention_nhwc_backward.cuh).
//
// ShuffleAttention's spatial gate mixes a branch's m channels at each pixel (z = b2 + W2 y), so a
// block must hold whole branches. A *window* is `width` channels of each half of the channels,
// [c0, c0 + width) and [C/2 + c0, C/2 + c0 + width), c0 and width multiples of m (so whole
// branches: C/2 = G m is one too): channel_shuffle sends exactly these 2 width channels to the
// contiguous output channels [2 c0, 2 c0 + 2 width), output 2 c0 + o from the window's channel
// shuffle_src(o, 2 width). width = 16 rounded down to a multiple of m (m <= 16), else m: a window
// of an m that divides 16 covers 32 output channels, a warp's row of them. The grid: a block of 256
// threads per (batch item, chunk of kNhwcChunkPixels pixels, window), window fastest (the blocks of
// one chunk read neighbouring bytes of the same rows). A block walks its chunk in *tiles* of `tile`
// pixels, staged in shared memory by channel as the NCHW kernels' tiles are ([channel][pixel], rows
// tile + 1 apart): consecutive threads take consecutive channels of a pixel (the row's two runs of
// width values, coalesced), then the per-pixel math of the NCHW kernels (SpatialGateParams) runs
// on the staged tiles unchanged.
#pragma once

#include <cstdint>

#include "nhwc_tiles.cuh"
#include "sa_grad.cuh"
#include "shuffle_attention_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kWindowThreads = 256;
constexpr int64_t kWindowHalfChannels = 16;
constexpr int64_t kWindowTileValues = 2048;  // channels x pixels of one staged tile, about

// The grid of the window kernels: filled by the host (window_grid) and passed to every kernel.
struct NhwcWindows {
  NhwcGrid grid;  // sizes, chunks, and the per-(batch item, chunk, channel) partials
  int64_t m, half, width, windows;
  int64_t tile;  // pixels of a staged tile (a power of two; window_grid)

  explicit NhwcWindows(const ForwardParams& f)
      : grid(f, 1, kNhwcChunkPixels), m(f.branch_channels), half(f.channels / 2) {
    width = m >= kWindowHalfChannels ? m : kWindowHalfChannels / m * m;
    if (width > half) width = half;
    windows = (half + width - 1) / width;
    tile = 1;
    while (tile < kNhwcChunkPixels && 2 * tile * channels() <= kWindowTileValues) tile *= 2;
  }

  SA_HOST_DEVICE int64_t channels() const { return 2 * width; }  // of a whole window
  SA_HOST_DEVICE int64_t blocks() const { return grid.batch * grid.chunks * windows; }
  // W2's rows in shared memory: m rounded up to odd, so that the lanes of a branch, which read
  // W2[j, i] for different j at once, meet different banks.
  SA_HOST_DEVICE int64_t matrix_row() const { return m | 1; }
};

// Shared-memory layout of a window block, in acc_t values, for K = the window's channels: the
// per-channel vectors (GroupStats' six; the GroupNorm scale gw * gate_rstd; the channel branch's
// gate s; the spatial branch's first window channel, or -1 for a channel-branch channel, as int;
// the backward's InputGradCoeffs, 4 values), W2 [m, m] (rows `w2_row` apart), then the tiles of K x
// stride() values (16-byte aligned): x (xh in the backward), the GroupNorm output y, and for the
// backward grad_out, gate s, t; last, the backward's sums over its pixel slices: per (channel,
// column) item, columns 0..m-1 A[j, i] and m T1[j] of a spatial channel j, column 0 sum gu x of a
// channel-branch one.
struct WindowSmem {
  int64_t K, m, w2_row, tile;
  SA_HOST_DEVICE int64_t stride() const { return tile + 1; }
  SA_HOST_DEVICE int64_t stats() const { return 0; }  // GroupStats: 6 K
  SA_HOST_DEVICE int64_t scale() const { return 6 * K; }
  SA_HOST_DEVICE int64_t gate() const { return 7 * K; }
  SA_HOST_DEVICE int64_t branch() const { return 8 * K; }
  SA_HOST_DEVICE int64_t coeffs() const { return 9 * K; }
  SA_HOST_DEVICE int64_t matrix() const { return 13 * K; }
  SA_HOST_DEVICE int64_t tile_x() const { return (matrix() + m * w2_row + 3) / 4 * 4; }
  SA_HOST_DEVICE int64_t tile_y() const { return tile_x() + K * stride(); }
  SA_HOST_DEVICE int64_t tile_g() const { return tile_y() + K * stride(); }
  SA_HOST_DEVICE int64_t tile_s() const { return tile_g() + K * stride(); }
  SA_HOST_DEVICE int64_t tile_t() const { return tile_s() + K * stride(); }
  SA_HOST_DEVICE int64_t accum() const { return tile_t() + K * stride(); }
  SA_HOST_DEVICE int64_t columns() const { return m + 1; }
  SA_HOST_DEVICE int64_t items() const { return K * columns(); }
  // Each item's tile pixels split over `slices` threads, so that the block's threads all work.
  SA_HOST_DEVICE int64_t slices() const {
    const int64_t per_item = kWindowThreads / items();
    return per_item > 1 ? per_item : 1;
  }
  SA_HOST_DEVICE int64_t values(bool backward) const {
    return backward ? accum() + items() * slices() : tile_g();
  }
};

SA_HOST_DEVICE WindowSmem window_smem(const NhwcWindows& w) {
  return WindowSmem{w.channels(), w.m, w.matrix_row(), w.tile};
}

// The window grid of one kernel direction: tiles of 2048 / K pixels (at most a chunk), fewer where
// the block's shared memory would exceed the device's 227 KiB (a backward's sums and W2 grow as
// m^2: from m = 121 in float32, m = 81 in float64); an m that does not fit with one pixel a tile
// (a backward above m = 131 in float32, 90 in float64, as far as the NCHW kernels reach or
// further) is the NCHW kernels' error.
template <typename acc_t>
NhwcWindows window_grid(const ForwardParams& f, bool backward) {
  NhwcWindows w(f);
  const auto bytes = [&] { return window_smem(w).values(backward) * int64_t(sizeof(acc_t)); };
  while (w.tile > 1 && bytes() > max_dynamic_shared_bytes()) w.tile /= 2;
  check_group_smem(w.m, bytes(), backward);
  return w;
}

// This block's window: its batch item, chunk and channels. Window channel ch < width is input
// channel c0 + ch, the others C/2 + c0 + ch - width (the last window may be narrower).
struct NhwcWindow {
  int64_t item, chunk, c0, first_pixel, end_pixel;
  int width, K;

  SA_DEVICE explicit NhwcWindow(const NhwcWindows& w) {
    const int64_t block = blockIdx.x;
    const int64_t window = block % w.windows;
    chunk = block / w.windows % w.grid.chunks;
    item = block / (w.windows * w.grid.chunks);
    c0 = window * w.width;
    width = static_cast<int>(w.half - c0 < w.width ? w.half - c0 : w.width);
    K = 2 * width;
    first_pixel = chunk * kNhwcChunkPixels;
    end_pixel = first_pixel + kNhwcChunkPixels < w.grid.pixels ? first_pixel + kNhwcChunkPixels
                                                               : w.grid.pixels;
  }

  SA_DEVICE int64_t input_channel(const NhwcWindows& w, int ch) const {
    return ch < width ? c0 + ch : w.half + c0 + (ch - width);
  }
  // The output channel of window channel ch: 2 c0 + shuffle_dst(ch, K).
  SA_DEVICE int64_t output_channel(int ch) const {
    return 2 * c0 + (ch < width ? 2 * ch : 2 * (ch - width) + 1);
  }
  // Offset of pixel `pixel`'s row (channel 0) of this batch item in a [B, N, C] tensor.
  SA_DEVICE int64_t row(const NhwcWindows& w, int64_t pixel) const {
    return (item * w.grid.pixels + pixel) * w.grid.channels;
  }
};

// A window block: its grid, window and shared memory, typed.
template <typename acc_t>
struct WindowBlock {
  NhwcWindows w;
  NhwcWindow win;
  WindowSmem L;
  GroupStats<acc_t> stats;
  SpatialGateParams<acc_t> gp;
  acc_t *gate, *xt, *yt, *gt, *st, *tt;
  int* branch;
  InputGradCoeffs<acc_t>* coeffs;
  int m, w2_row, ts;  // m; the rows of W2 and of the tiles in shared memory

  SA_DEVICE WindowBlock(const ForwardParams& p, const NhwcWindows& w_, acc_t* smem)
      : w(w_),
        win(w),
        L(window_smem(w)),
        stats(smem + L.stats(), L.K),
        gp(p, smem + L.matrix(), nullptr, smem + L.scale()),
        gate(smem + L.gate()),
        xt(smem + L.tile_x()),
        yt(smem + L.tile_y()),
        gt(smem + L.tile_g()),
        st(smem + L.tile_s()),
        tt(smem + L.tile_t()),
        branch(reinterpret_cast<int*>(smem + L.branch())),
        coeffs(reinterpret_cast<InputGradCoeffs<acc_t>*>(smem + L.coeffs())),
        m(static_cast<int>(w.m)),
        w2_row(static_cast<int>(L.w2_row)),
        ts(static_cast<int>(L.stride())) {}

  // (batch item, channel) of window channel ch: its index in mean, rstd and the per-channel
  // workspaces.
  SA_DEVICE int64_t plane(int ch) const {
    return win.item * w.grid.channels + win.input_channel(w, ch);
  }

  // Stages W2 and, per window channel, its branch and: a spatial channel its Standardizer
  // (stats_of(plane)) and GroupNorm scale; a channel-branch channel its gate s = sigmoid(W1 mu +
  // b1) of its branch's means (the NCHW kernel's gate; the means are p.mean's). The caller
  // synchronizes before reading them.
  template <typename StatsOf>
  SA_DEVICE void stage(const ForwardParams& p, const StatsOf& stats_of) const {
    gp.stage_matrix(p, m, w2_row);
    const ParamView<acc_t> gw = param_view<acc_t>(p, kGnWeight);
    const ParamView<acc_t> w1 = param_view<acc_t>(p, kChannelWeight);
    const ParamView<acc_t> b1 = param_view<acc_t>(p, kChannelBias);
    const acc_t* means = static_cast<const acc_t*>(p.mean);
    for (int ch = threadIdx.x; ch < win.K; ch += blockDim.x) {
      const ChannelRole role = channel_role(win.input_channel(w, ch), m);
      branch[ch] = role.spatial ? ch - static_cast<int>(role.k) : -1;
      if (role.spatial) {
        const Standardizer<acc_t> s = stats_of(plane(ch));
        stats.set(ch, s);
        gp.scale[ch] = gw[role.k] * s.gate_rstd;
      } else {
        gate[ch] = sigmoid(matvec_row(w1, means + plane(ch) - role.k, b1, m, role.k));
      }
    }
  }

  // Walks the block's chunk in tiles of pixels [p0, p0 + n): per tile, after a barrier (the
  // staging, or the previous tile's reads, are done), load_tile, a barrier, with kGrad gate_tile
  // and a barrier, then f(p0, n). With kGrad the gradient is read through `grad` (sa_grad.cuh).
  template <bool kGrad, typename scalar_t, typename F>
  SA_DEVICE void for_each_tile(const scalar_t* x, const SaGradRead<scalar_t>& grad,
                               const F& f) const {
    for (int64_t p0 = win.first_pixel; p0 < win.end_pixel; p0 += w.tile) {
      const int n = static_cast<int>(win.end_pixel - p0 < w.tile ? win.end_pixel - p0 : w.tile);
      __syncthreads();
      load_tile<kGrad>(x, grad, p0, n);
      __syncthreads();
      if constexpr (kGrad) {
        gate_tile(n);
        __syncthreads();
      }
      f(p0, n);
    }
  }

  // Pixels [p0, p0 + n) into the tiles: x, the spatial channels' GroupNorm output y and, with
  // kGrad, the gradient (each channel's at its output channel; a slot's v[2]: out on the
  // gradient's first read with the epilogue). Consecutive threads take consecutive window
  // channels of a pixel.
  template <bool kGrad, typename scalar_t>
  SA_DEVICE void load_tile(const scalar_t* x, const SaGradRead<scalar_t>& grad, int64_t p0,
                           int n) const {
    for_each_cell_unrolled<kCellLoads, acc_t[kGrad ? 3 : 1]>(
        n, win.K,
        [&](int pt, int ch, acc_t(&v)[kGrad ? 3 : 1]) {
          const int64_t row = win.row(w, p0 + pt);
          v[0] = static_cast<acc_t>(x[row + win.input_channel(w, ch)]);
          if constexpr (kGrad) grad.load_at(row + win.output_channel(ch), v[1], v[2]);
        },
        [&](int pt, int ch, acc_t(&v)[kGrad ? 3 : 1]) {
          const int c = ch * ts + pt;
          xt[c] = v[0];
          if constexpr (kGrad) {
            grad.mask_at(win.row(w, p0 + pt) + win.output_channel(ch), v[1], v[2]);
            gt[c] = v[1];
          }
          const int start = branch[ch];
          if (start >= 0) yt[c] = gp.group_norm_output(stats, ch, ch - start, v[0]);
        });
  }

  // The spatial gate s = sigmoid(b2 + W2 y) of window channel ch (a spatial one, its branch
  // starting at `start`) at tile pixel pt.
  SA_DEVICE acc_t spatial_gate(int ch, int start, int pt) const {
    return sigmoid(gp.preactivation(m, w2_row, ts, yt + start * ts, ch - start, pt));
  }

  // The backward's tile after load_tile<true> (and a barrier): per spatial cell the gate s,
  // t = dL/dz = gu x s (1 - s), and x replaced by xh = (x - mu) r (each cell by the thread that
  // owns it: nobody reads another cell's x here).
  SA_DEVICE void gate_tile(int n) const {
    for_each_cell(n, win.K, [&](int pt, int ch) {
      const int start = branch[ch];
      if (start < 0) return;
      const int c = ch * ts + pt;
      st[c] = spatial_gate(ch, start, pt);
      tt[c] = gate_input_grad(gt[c], xt[c], st[c]);
      xt[c] = stats.centered(ch, xt[c]) * stats.gate_rstd[ch];
    });
  }
};

}  // namespace sa_cuda::SA_GPU_NS
