// ShuffleAttention, forward: one block per branch of one (batch item, group),
// i.e. m planes coupled by the m x m gate matrix.
//
// Bytes moved: x read twice (plane moments, then the gate; the second read hits L2, the unit is at
// most a few hundred KB), out written once at the shuffled channels. The moments stream the planes
// in packs of kVec elements (16-, 8- or 4-byte accesses, or scalars: launch_shuffle_attention picks
// the widest that N and every plane pointer allow), cut into pieces so that all 8 warps work
// whatever m is. The spatial gate needs all m channels of a pixel: pixels go through shared memory
// in tiles of m rows x tile pixels, rows tile + 1 values apart (a thread walking down a column
// meets a new bank on every row).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include "../sa_math.h"
#include "../sa_params.h"
#include "team.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kGroupThreads = 256;  // threads per block of the ShuffleAttention kernels
// Register budget: at least 2 blocks per SM, 65536 / (2 * 256) = 128 registers per thread. Given
// only the max block size, ptxas picks its own occupancy target and trades spills for it (it held
// the fp64 scalar-pack forward to 64 registers with 56 bytes of spill stores).
constexpr int kGroupMinBlocks = 2;
// The NCHW forward in float arithmetic: 4 blocks an SM (64 registers). ptxas's own choice was 68
// on sm_90 (the two-part centering, split_mean, took the last 4), 3 blocks an SM; the H200 timed
// 60.5 us for (8, 256, 56, 56) float32 against 51.8 us at 64 registers.
template <typename acc_t>
constexpr int kGroupForwardMinBlocks = sizeof(acc_t) == 4 ? 4 : kGroupMinBlocks;
constexpr int kGroupWarps = kGroupThreads / kWarpSize;
constexpr int kCellLoads = 4;  // cells a thread has in flight (for_each_cell_unrolled)

// Shared-memory layout of a ShuffleAttention block, in acc_t values. Per-channel vectors of m:
// the six of GroupStats (mean, rstd: the true statistics; the Standardizer's input_scale, center,
// center_lo, gate_rstd: sa_math.h), gate s (channel branch), scale = gw * gate_rstd, dz / T1, the
// input gradient's coefficients beta (channel branch) or d1 and d2 (sa_math.h: InputGradCoeffs),
// the statistics' rescale exponent, the GroupNorm weight gw; m x m: W2 (the spatial gate's
// parameters read per pixel, staged in acc_t). Then the tiles of m x stride() values (16-byte
// aligned): x (then xh in the backward), the GroupNorm output y, and for the backward grad_out,
// gate s, t; the statistics' per-piece partials use the same space before the first tile. Last,
// the backward's partials of A and T1 over its pixel slices.
struct GroupSmem {
  int64_t m, tile;
  SA_HOST_DEVICE int64_t stride() const { return tile + 1; }
  SA_HOST_DEVICE int64_t stats() const { return 0; }  // GroupStats: 6 m
  SA_HOST_DEVICE int64_t gate() const { return 6 * m; }
  SA_HOST_DEVICE int64_t scale() const { return 7 * m; }
  SA_HOST_DEVICE int64_t dz_or_t1() const { return 8 * m; }
  SA_HOST_DEVICE int64_t beta() const { return 9 * m; }
  SA_HOST_DEVICE int64_t d2() const { return 10 * m; }
  SA_HOST_DEVICE int64_t exponent() const { return 11 * m; }
  SA_HOST_DEVICE int64_t gn_weight() const { return 12 * m; }
  SA_HOST_DEVICE int64_t matrix() const { return 13 * m; }
  SA_HOST_DEVICE int64_t tile_x() const { return (matrix() + m * m + 3) / 4 * 4; }
  SA_HOST_DEVICE int64_t tile_y() const { return tile_x() + m * stride(); }
  SA_HOST_DEVICE int64_t tile_g() const { return tile_y() + m * stride(); }
  SA_HOST_DEVICE int64_t tile_s() const { return tile_g() + m * stride(); }
  SA_HOST_DEVICE int64_t tile_t() const { return tile_s() + m * stride(); }
  SA_HOST_DEVICE int64_t accum() const { return tile_t() + m * stride(); }
  // Pixel slices of the backward's A = sum_p t xh^T: (ceil(m / 2))^2 blocks of 2 x 2 entries, each
  // block's tile pixels split over `slices` threads so that the block's threads all work.
  SA_HOST_DEVICE int64_t slices() const {
    const int64_t half = (m + 1) / 2, per_block = kGroupThreads / (half * half);
    return per_block > 1 ? per_block : 1;
  }
  // Partials per slice: A [m, m] and T1 [m].
  SA_HOST_DEVICE int64_t accum_values() const { return slices() * m * (m + 1); }
  // The statistics' partials: at most kGroupWarps * m pieces of 3 acc_t and a double.
  SA_HOST_DEVICE int64_t piece_values() const { return kGroupWarps * m * 5; }
  SA_HOST_DEVICE int64_t values(bool backward) const {
    if (backward) return accum() + accum_values();
    const int64_t tiles = 2 * m * stride();
    return tile_x() + (tiles > piece_values() ? tiles : piece_values());
  }
};

// About 2048 tile values per block iteration whatever m is (m = 2 in SA-ResNet's first stage), at
// most the plane (rounded up to a warp's 32 pixels).
inline int64_t group_tile_pixels(int64_t m, int64_t N) {
  const int64_t p = (2048 / m) / kWarpSize * kWarpSize;
  const int64_t target = p < kWarpSize ? kWarpSize : (p > 1024 ? 1024 : p);
  const int64_t plane = (N + kWarpSize - 1) / kWarpSize * kWarpSize;
  return plane < target ? plane : target;
}

// A ShuffleAttention block's shared memory (m's tiles and matrices) against the device's: a clear
// error, not a failed launch.
inline void check_group_smem(int64_t m, int64_t bytes, bool backward) {
  TORCH_CHECK(bytes <= max_dynamic_shared_bytes(), "sa_cuda: m = C / (2 * groups) = ", m, " needs ",
              bytes, " bytes of shared memory per block in the CUDA ",
              backward ? "backward" : "forward", " of ShuffleAttention; the device allows ",
              max_dynamic_shared_bytes());
}

// The cells of a rows x cols grid that this thread owns: cells threadIdx.x, + blockDim.x, ... in
// row-major order, the row and column advanced by constant steps (no division per cell). A warp's
// 32 consecutive cells are consecutive columns (coalesced, conflict-free). Index: int for a tile
// (m x at most 1024 pixels), int64_t for whole planes.
template <typename Index>
struct CellWalk {
  Index rows, cols, step_r, step_c, r, c;

  SA_DEVICE CellWalk(Index rows_, Index cols_)
      : rows(rows_),
        cols(cols_),
        step_r(static_cast<Index>(blockDim.x) / cols_),
        step_c(static_cast<Index>(blockDim.x) % cols_),
        r(static_cast<Index>(threadIdx.x) / cols_),
        c(static_cast<Index>(threadIdx.x) % cols_) {}

  SA_DEVICE bool valid() const { return r < rows; }
  SA_DEVICE void next() {
    r += step_r;
    c += step_c;
    if (c >= cols) {
      c -= cols;
      ++r;
    }
  }
};

// Calls f(r, c) for this thread's cells of a rows x cols grid (CellWalk).
template <typename Index, typename F>
SA_DEVICE void for_each_cell(Index rows, Index cols, const F& f) {
  for (CellWalk<Index> cell(rows, cols); cell.valid(); cell.next()) f(cell.r, cell.c);
}

// for_each_cell for loops that read global memory, as unrolled_stream (team.cuh) for a stream:
// load(r, c, slot) reads cell (r, c) into a Slot for kUnroll of this thread's cells, then use(r, c,
// slot) consumes each in the same order. A thread that stores each value to shared memory before
// its next load keeps one load in flight: 0.46 TB/s in ShuffleAttention's backward on an H200 at
// 16 warps an SM (ncu: the shared-memory store after each load waited on it). Each cell gets the
// same values and arithmetic as under for_each_cell; only the loads move earlier.
template <int kUnroll, typename Slot, typename Index, typename Load, typename Use>
SA_DEVICE void for_each_cell_unrolled(Index rows, Index cols, const Load& load, const Use& use) {
  CellWalk<Index> cell(rows, cols);
  while (cell.valid()) {
    CellWalk<Index> used = cell;
    Slot slot[kUnroll];
    int loaded = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (cell.valid()) {
        load(cell.r, cell.c, slot[u]);
        cell.next();
        ++loaded;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < loaded) {
        use(used.r, used.c, slot[u]);
        used.next();
      }
    }
  }
}

// The unit's m planes of `packs` packs cut into pieces for the warps: per_plane = 8 / gcd(m, 8)
// pieces per plane, so that the m * per_plane pieces are a multiple of the 8 warps and every warp
// streams the same amount (m = 2: each plane in 4 pieces; m a multiple of 8: whole planes). Warp w
// takes pieces w, w + 8, ...; piece k is part k % per_plane of plane k / per_plane, and piece
// j * per_plane (the start of plane j) is never empty.
struct GroupPieces {
  int per_plane, count;
  int64_t packs, packs_per_piece;

  SA_DEVICE GroupPieces(int m, int64_t packs_) : packs(packs_) {
    int common = kGroupWarps;  // gcd(m, 8): 8 is a power of two
    while (m % common != 0) common /= 2;
    per_plane = kGroupWarps / common;
    count = m * per_plane;
    packs_per_piece = (packs + per_plane - 1) / per_plane;
  }

  // f(k, j, begin, end): the calling warp's pieces, whole warps (warp-uniform arguments).
  template <typename F>
  SA_DEVICE void for_warp(const F& f) const {
    for (int k = static_cast<int>(threadIdx.x) / kWarpSize; k < count; k += kGroupWarps) {
      const int64_t begin = (k % per_plane) * packs_per_piece;
      const int64_t end = begin + packs_per_piece;
      f(k, k / per_plane, begin < packs ? begin : packs, end < packs ? end : packs);
    }
  }
};

// Streams packs [begin, end) of the given planes over a warp: lane l takes packs begin + l, + 32,
// ... . kUnroll packs per plane at a time (that many loads in flight per lane), then one pack at a
// time for the rest; f(v) gets this lane's values as v[plane][i], acc_t[kPlanes][kUnroll * kVec]
// or acc_t[kPlanes][kVec].
template <int kUnroll, int kVec, typename acc_t, typename F, typename scalar_t, typename... More>
SA_DEVICE void warp_stream(int64_t begin, int64_t end, const F& f, const scalar_t* plane,
                           const More*... more) {
  constexpr int kPlanes = 1 + sizeof...(More);
  const scalar_t* planes[kPlanes] = {plane, more...};
  auto load = [&](auto& v, int64_t q, int slot) {
#pragma unroll
    for (int k = 0; k < kPlanes; ++k) {
      const Pack<scalar_t, kVec> raw = load_pack<scalar_t, kVec>(planes[k] + q * kVec);
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[k][slot * kVec + i] = static_cast<acc_t>(raw.val[i]);
    }
  };
  int64_t q = begin + threadIdx.x % kWarpSize;
  for (; q + (kUnroll - 1) * kWarpSize < end; q += kUnroll * kWarpSize) {
    acc_t v[kPlanes][kUnroll * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load(v, q + u * kWarpSize, u);
    f(v);
  }
  for (; q < end; q += kWarpSize) {
    acc_t v[kPlanes][kVec];
    load(v, q, 0);
    f(v);
  }
}

// Packs per streaming step: 2 of 4 or 8 elements, 4 narrower ones (Moments::add holds the step's
// values and deviations in registers).
template <int kVec>
constexpr int group_unroll() {
  return kVec >= 4 ? 2 : 4;
}

// A Standardizer per channel in shared memory: six vectors of `count` values from `base`.
template <typename acc_t>
struct GroupStats {
  acc_t *mean, *rstd, *input_scale, *center, *center_lo, *gate_rstd;

  SA_DEVICE GroupStats(acc_t* base, int64_t count)
      : mean(base),
        rstd(base + count),
        input_scale(base + 2 * count),
        center(base + 3 * count),
        center_lo(base + 4 * count),
        gate_rstd(base + 5 * count) {}

  SA_DEVICE void set(int64_t j, const Standardizer<acc_t>& st) const {
    mean[j] = st.mean;
    rstd[j] = st.rstd;
    input_scale[j] = st.input_scale;
    center[j] = st.center;
    center_lo[j] = st.center_lo;
    gate_rstd[j] = st.gate_rstd;
  }

  // Standardizer::centered of channel j: (x - mean) * input_scale.
  SA_DEVICE acc_t centered(int64_t j, acc_t x) const {
    return centered_value(x, input_scale[j], center[j], center_lo[j]);
  }
};

// Per-piece partials of the statistics, at the start of the tile space: the wide sum (double, for
// the channel branch's mean), and the piece's Moments (n, mean, m2; m2 holds max|x| in the
// rescale's max round).
template <typename acc_t>
struct PiecePartials {
  double* wide;
  acc_t *n, *mean, *m2;

  SA_DEVICE PiecePartials(acc_t* smem, const GroupSmem& L, int64_t count)
      : wide(reinterpret_cast<double*>(smem + L.tile_x())),
        n(reinterpret_cast<acc_t*>(wide + count)),
        mean(n + count),
        m2(mean + count) {}
};

// Statistics of the unit's m planes, streamed by pieces (GroupPieces): each lane's Moments over
// whole steps of kUnroll packs (Moments::add: the step's exact two-pass moments, then one merge: no
// divide per element), merged over the warp, then per plane over its pieces in piece order by
// thread j. The same semantics as streamed_plane_stats (team.cuh): moments of x - shift, shift
// the plane's first value; with exact_mean (a channel-branch unit: its gate uses the means) the
// wide mean; planes whose moments overflowed get max|x| and, when it is finite, their moments
// redone on x * 2^-e (sa_math.h: Standardizer). exponent[j] tracks plane j: 0 unscaled, -1
// overflowed (its max|x| pending), e > 0 rescaled by 2^-e. Ends with every plane's Standardizer
// written by its thread j (the caller synchronizes before reading them).
template <typename scalar_t, typename acc_t, int kVec>
SA_DEVICE void group_plane_stats(const scalar_t* x, int m, int64_t N, acc_t eps, bool exact_mean,
                                 acc_t* smem, const GroupSmem& L, const GroupStats<acc_t>& stats) {
  constexpr int kUnroll = group_unroll<kVec>();
  const GroupPieces pieces(m, N / kVec);
  const PiecePartials<acc_t> part(smem, L, pieces.count);
  acc_t* exponent = smem + L.exponent();
  const int lane = threadIdx.x % kWarpSize;
  auto scale_of = [&](int j) { return sa_ldexp(acc_t(1), -static_cast<int>(exponent[j])); };
  auto shift_of = [&](int j, acc_t scale) {
    return sum_shift(static_cast<acc_t>(x[j * N])) * scale;
  };

  // The moments of the pieces of the planes with selected(j), at each plane's scale.
  auto moments_round = [&](const auto& selected) {
    pieces.for_warp([&](int k, int j, int64_t begin, int64_t end) {
      if (!selected(j)) return;
      const acc_t scale = scale_of(j), shift = shift_of(j, scale);
      Moments<acc_t> mo;
      double wide = 0;
      warp_stream<kUnroll, kVec, acc_t>(
          begin, end,
          [&](const auto& v) {
            if (exact_mean) {
              for (const acc_t value : v[0]) wide += wide_term(value, scale);
            }
            mo.add(v[0], shift, scale);  // last use of v: its registers take the deviations
          },
          x + j * N);
      mo = warp_merge(mo);
      wide = warp_sum(wide);
      if (lane == 0) {
        part.n[k] = mo.n;
        part.mean[k] = mo.mean;
        part.m2[k] = mo.m2;
        part.wide[k] = wide;
      }
    });
    __syncthreads();
  };
  // Plane j's mean and variance from its pieces (empty ones skipped), merged in piece order.
  auto combine = [&](int j, SplitMean<acc_t>& mean, acc_t& var) {
    const int k0 = j * pieces.per_plane;
    Moments<acc_t> mo{part.n[k0], part.mean[k0], part.m2[k0]};
    double wide = part.wide[k0];
    for (int k = k0 + 1; k < k0 + pieces.per_plane; ++k) {
      if (part.n[k] == acc_t(0)) continue;
      mo.merge(part.n[k], part.mean[k], part.m2[k]);
      wide += part.wide[k];
    }
    mean = exact_mean ? SplitMean<acc_t>{wide_mean<acc_t>(wide, N), 0}
                      : split_mean(shift_of(j, scale_of(j)), mo.mean);
    var = mo.m2 / acc_t(N);
  };

  for (int j = threadIdx.x; j < m; j += blockDim.x) exponent[j] = 0;
  __syncthreads();
  moments_round([](int) { return true; });
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    SplitMean<acc_t> mean;
    acc_t var;
    combine(j, mean, var);
    stats.set(j, finish_stats(mean.mean, var, eps, 0, mean.lo));  // kept unless rescaled
    if (stats_overflowed(mean.mean, var)) exponent[j] = -1;
  }
  __syncthreads();
  int overflowed = 0;  // the same count in every warp: a uniform branch
  for (int j = lane; j < m; j += kWarpSize) overflowed += exponent[j] < acc_t(0);
  if (warp_sum(overflowed) == 0) return;

  pieces.for_warp([&](int k, int j, int64_t begin, int64_t end) {
    if (exponent[j] >= acc_t(0)) return;
    acc_t amax = 0;
    warp_stream<kUnroll, kVec, acc_t>(
        begin, end,
        [&](const auto& v) {
          for (const acc_t value : v[0]) amax = max_nan(amax, value < acc_t(0) ? -value : value);
        },
        x + j * N);
    amax = warp_max(amax);
    if (lane == 0) part.m2[k] = amax;
  });
  __syncthreads();
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    if (exponent[j] >= acc_t(0)) continue;
    acc_t amax = 0;
    for (int k = j * pieces.per_plane; k < (j + 1) * pieces.per_plane; ++k)
      amax = max_nan(amax, part.m2[k]);
    exponent[j] = static_cast<acc_t>(rescale_exponent(amax));  // 0: inf or NaN, keep the unscaled
  }
  __syncthreads();
  moments_round([&](int j) { return exponent[j] > acc_t(0); });
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    if (exponent[j] <= acc_t(0)) continue;
    SplitMean<acc_t> mean;
    acc_t var;
    combine(j, mean, var);
    stats.set(j, finish_stats(mean.mean, var, eps, static_cast<int>(exponent[j]), mean.lo));
  }
}

// The spatial gate's parameters: W2 (read m times per pixel) and the GroupNorm scale
// gw * gate_rstd per channel staged in shared memory in acc_t (once per block, the caller
// synchronizes before reading them); b2 and gb read in their own dtypes (ParamView, a uniform
// branch) where used: their addresses come from the kernel's parameters, not registers, which
// the backward kernel has none to spare for. The NCHW kernels index the per-channel vectors by the
// branch's k and also stage gw (stage()); the NHWC kernels (shuffle_attention_nhwc_*.cuh) index
// scale by the window's channel and stage it themselves (gw = nullptr).
template <typename acc_t>
struct SpatialGateParams {
  acc_t *w2, *gw, *scale;
  ParamView<acc_t> b2, gb;

  SA_DEVICE SpatialGateParams(const ForwardParams& p, acc_t* w2_, acc_t* gw_, acc_t* scale_)
      : w2(w2_),
        gw(gw_),
        scale(scale_),
        b2(param_view<acc_t>(p, kSpatialBias)),
        gb(param_view<acc_t>(p, kGnBias)) {}
  SA_DEVICE SpatialGateParams(const ForwardParams& p, acc_t* smem, const GroupSmem& L)
      : SpatialGateParams(p, smem + L.matrix(), smem + L.gn_weight(), smem + L.scale()) {}

  // W2 [m, m] into rows `row` values apart (row >= m).
  SA_DEVICE void stage_matrix(const ForwardParams& p, int64_t m, int64_t row) const {
    const ParamView<acc_t> w = param_view<acc_t>(p, kSpatialWeight);
    for_each_cell(m, m, [&](int64_t j, int64_t i) { w2[j * row + i] = w[j * m + i]; });
  }

  SA_DEVICE void stage(const ForwardParams& p, int64_t m, const GroupStats<acc_t>& stats) const {
    stage_matrix(p, m, m);
    const ParamView<acc_t> gn_weight = param_view<acc_t>(p, kGnWeight);
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      gw[i] = gn_weight[i];
      scale[i] = gw[i] * stats.gate_rstd[i];
    }
  }

  // The GroupNorm output y = scale_i xc + gb_k of a value x of channel i (its parameter index k),
  // xc = (x - mu) * input_scale (the Standardizer's). Unfolded like the reference (sa_math.h:
  // centered, and +-inf weights stay +-inf, not NaN).
  SA_DEVICE acc_t group_norm_output(const GroupStats<acc_t>& stats, int64_t i, int64_t k,
                                    acc_t x) const {
    return scale[i] * stats.centered(i, x) + gb[k];
  }

  // The gate's pre-activation at tile pixel pt: z_j = b2_j + sum_i W2[j, i] y_i (W2 staged in
  // rows `row` values apart; yt: the tile of y, rows `stride` apart).
  SA_DEVICE acc_t preactivation(int m, int row, int stride, const acc_t* yt, int j, int pt) const {
    acc_t z = b2[j];
    for (int i = 0; i < m; ++i) z += w2[j * row + i] * yt[i * stride + pt];
    return z;
  }

  // The backward's dy_i = sum_j W2[j, i] t_j at tile pixel pt (W2^T t, the transpose of
  // preactivation's product; tt: the tile of t, rows `stride` apart).
  SA_DEVICE acc_t output_grad(int m, int row, int stride, const acc_t* tt, int i, int pt) const {
    acc_t dy = 0;
    for (int j = 0; j < m; ++j) dy += w2[j * row + i] * tt[j * stride + pt];
    return dy;
  }
};

template <typename scalar_t, int kVec>
SA_KERNEL_BOUNDS(kGroupThreads, kGroupForwardMinBlocks<at::opmath_type<scalar_t>>)
void shuffle_attention_forward_kernel(ForwardParams p, int64_t tile) {
  using acc_t = at::opmath_type<scalar_t>;
  SA_DYNAMIC_SHARED(acc_t, smem);
  // m is small (the launch checked its tiles against the shared memory): int tile indices.
  const int m = static_cast<int>(p.branch_channels);
  const int64_t N = p.plane_size;
  const GroupSmem L{m, tile};
  const BranchUnit unit = branch_unit(p, blockIdx.x);
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + unit.plane0 * N;
  const int64_t out0 = unit.out_plane0 * N;  // out's plane j from element out0 + 2 j N
  const GroupStats<acc_t> stats(smem + L.stats(), m);
  acc_t* gate = smem + L.gate();

  group_plane_stats<scalar_t, acc_t, kVec>(x, m, N, static_cast<acc_t>(p.eps), !unit.spatial, smem,
                                           L, stats);
  __syncthreads();
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    static_cast<acc_t*>(p.mean)[unit.plane0 + j] = stats.mean[j];
    static_cast<acc_t*>(p.rstd)[unit.plane0 + j] = stats.rstd[j];
  }

  if (!unit.spatial) {
    // s = sigmoid(W1 mu + b1), one scalar per plane.
    const ParamView<acc_t> w1 = param_view<acc_t>(p, kChannelWeight);
    const ParamView<acc_t> b1 = param_view<acc_t>(p, kChannelBias);
    for (int j = threadIdx.x; j < m; j += blockDim.x)
      gate[j] = sigmoid(matvec_row(w1, stats.mean, b1, m, j));
    __syncthreads();
    scalar_t* out = static_cast<scalar_t*>(p.out) + out0;  // plane j at out + 2 j N
    if (p.identity == nullptr) {
      for_each_cell_unrolled<kCellLoads, acc_t[kVec]>(
          int64_t(m), N / kVec,
          [&](int64_t j, int64_t q, acc_t(&v)[kVec]) {
            load_acc<scalar_t, acc_t, kVec>(x + j * N, q, v);
          },
          [&](int64_t j, int64_t q, acc_t(&v)[kVec]) {
#pragma unroll
            for (int i = 0; i < kVec; ++i) v[i] *= gate[j];
            store_acc<scalar_t, acc_t, kVec>(out + 2 * j * N, q, v);
          });
      return;
    }
    // The residual epilogue: a cell is two loads (x, and identity at out's position), one cell at
    // a time. With identity read at the store, or two cells in flight (as acc_t or as loaded), the
    // 16-bit kVec = 8 kernels spilled on sm_90 (64 registers).
    const scalar_t* identity = static_cast<const scalar_t*>(p.identity) + out0;
    for_each_cell_unrolled<1, acc_t[2][kVec]>(
        int64_t(m), N / kVec,
        [&](int64_t j, int64_t q, acc_t(&v)[2][kVec]) {
          load_acc<scalar_t, acc_t, kVec>(x + j * N, q, v[0]);
          load_acc<scalar_t, acc_t, kVec>(identity + 2 * j * N, q, v[1]);
        },
        [&](int64_t j, int64_t q, acc_t(&v)[2][kVec]) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) v[0][i] = residual_relu(v[0][i] * gate[j], v[1][i]);
          store_acc<scalar_t, acc_t, kVec>(out + 2 * j * N, q, v[0]);
        });
    return;
  }

  const SpatialGateParams<acc_t> gp(p, smem, L);
  acc_t* xt = smem + L.tile_x();
  acc_t* yt = smem + L.tile_y();
  const int ts = static_cast<int>(L.stride());
  gp.stage(p, m, stats);
  for (int64_t p0 = 0; p0 < N; p0 += tile) {
    const int n = static_cast<int>(N - p0 < tile ? N - p0 : tile);
    __syncthreads();  // the gate's parameters are staged; the previous tile is consumed
    for_each_cell_unrolled<kCellLoads, acc_t>(
        m, n, [&](int i, int pt, acc_t& v) { v = static_cast<acc_t>(x[i * N + p0 + pt]); },
        [&](int i, int pt, acc_t& v) {
          xt[i * ts + pt] = v;
          yt[i * ts + pt] = gp.group_norm_output(stats, i, i, v);
        });
    __syncthreads();
    for_each_cell(m, n, [&](int j, int pt) {
      const acc_t z = gp.preactivation(m, m, ts, yt, j, pt);
      const int64_t e = out0 + 2 * j * N + p0 + pt;
      static_cast<scalar_t*>(p.out)[e] =
          static_cast<scalar_t>(with_identity<scalar_t>(p, e, xt[j * ts + pt] * sigmoid(z)));
    });
  }
}

}  // namespace sa_cuda::SA_GPU_NS
