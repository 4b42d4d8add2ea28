// The forward of both variants by columns (nhwc_columns.h), float lanes. Bytes moved: x is read
// from memory once (pass 1; pass 2 and the gating pass re-read the column from the L2 cache),
// out is written once, the column's 2 width output channels of a row at a
// time; mean and rstd add 2 floats per channel. While it gates a column, a thread asks the L2 cache
// for its next column's x (gate_column), so that memory is read and written at the same time.
//   stats   per channel the mean and the variance, in two passes over the column (column_stats:
//           pass 1 from memory, pass 2 from the L2 cache); a channel whose statistics overflow
//           float (|x| near float's largest values, or inf/NaN in it) takes gathered_stats
//           instead (rare);
//   finish  the statistics (stored to mean and rstd), then the gates' coefficients as lanes;
//   gating  by blocks of kBlockRows rows: the block's rows of x and the spatial gate's
//           pre-activation, then the gates, then the output rows. Loop by loop, not row by row:
//           with the exp inlined (vec_exp.h) one loop per row measured 1.5-1.6x the NCHW
//           forward's time at stage 1 in fp32 against 1.2-1.45x by blocks, in one A/B run (this
//           host's noise is of that order; the backward's pass 1 was clearly faster in one loop).
// The per-element formulas are the NCHW kernels' (sa_math.h); only the order of the sums differs.
#include <ATen/OpMathType.h>

#include <array>
#include <tuple>

#include "../sa_math.h"
#include "kernels_cpu.h"
#include "nhwc_columns.h"
#include "nhwc_rows.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {
namespace {

using VecD = at::vec::Vectorized<double>;
constexpr int64_t L = ColumnGeometry::L;
constexpr int64_t kMaxLanes = ColumnGeometry::kMaxLanes;
constexpr int64_t kBlockRows = ColumnGeometry::kBlockRows;

// Where pass 2 and the gating pass read a column's x in float: row p at `item + p at.C`, its half h
// from at.input(h).
struct ColumnSource {
  const float* item;
  ColumnAt at;
  const float* row(int64_t p) const { return at.row(item, p); }
  const float* half_row(int64_t p, int h) const { return row(p) + at.input(h); }
};

// A column's x in float for 16-bit x, which pass 1 converts once: N rows of the column's 2 width
// values, contiguous. Pass 2 and the gating pass read it from the L2 cache (401 KiB at stage 1)
// instead of converting x again in each, and in whole 64-byte lines (a row of a bfloat16 column is
// half a line of each half). Float x is its own source: no copy.
template <int M, typename scalar_t>
class ColumnCopy {
  static constexpr int64_t W = 2 * kColumnWidth<M>;
  static constexpr bool kCopied = !std::is_same_v<scalar_t, float>;

 public:
  explicit ColumnCopy(int64_t N) : values_(aligned_floats(kCopied ? N * W : 0)) {}
  ColumnSource source(const scalar_t* item, ColumnAt col) const {
    if constexpr (kCopied) {
      return ColumnSource{values_.get(), ColumnAt{W, W / 2, 0}};
    } else {
      return ColumnSource{item, col};
    }
  }
  // Where pass 1 converts row p's half h to (unused for float x: as_acc returns x itself).
  float* converted(int64_t p, int h) const {
    return kCopied ? values_.get() + p * W + h * (W / 2) : nullptr;
  }

 private:
  AlignedFloats values_;
};

// The statistics of the column at c of an item, in row order (position h width + l: channel
// h half + c + l), stored to mean and rstd (the item's C values each), in two passes:
//   pass 1  the sums of x in double (every term exact for float x, no overflow: the mean is
//           correctly rounded but for near-ties, and the rest of its rounding is the
//           Standardizer's center_lo); for 16-bit x it also fills the copy;
//   pass 2  from the L2 cache, the sums of (x - mean)^2 in float over blocks of kBlockRows rows,
//           block totals in double: the variance from centered values, never E[x^2] - mean^2,
//           as the NCHW kernels' plane_stats, less what centering on the float mean added,
//           (mean - float mean)^2 (without it a spread below the mean's float spacing, such as
//           1e6 + 0.01 N(0, 1), read 2% off in rstd).
// One pass of shifted sums in double (the rows' chunk_moments) measured no faster: at stage 1
// (SALayer, fp32, batch 8, a 401 KiB column) the statistics took 1.3-1.45 ms against 1.6-2.1,
// but the gating pass took that much longer (our reading: pass 2 had brought back into L2 the
// part of the column the gating pass then found in L3), and the forward took 3.3-3.8 ms either
// way; at stage 2 (a 100 KiB column, in L2) its three double operations
// per 4 values made the forward 1.25-1.3x slower. A channel whose statistics overflow float (|x|
// near float's largest values, or inf/NaN in it) takes gathered_stats instead (moment_stats;
// rare).
template <int M, typename scalar_t>
void column_stats(const scalar_t* item, int64_t c, const ColumnGeometry& geo, float eps,
                  const ColumnCopy<M, scalar_t>& copy, Standardizer<float>* st, float* mean,
                  float* rstd) {
  constexpr int64_t kWidth = kColumnWidth<M>, W = 2 * kWidth, kWide = VecD::size();
  const int64_t C = geo.C, N = geo.N;
  const ColumnAt col = geo.at(c);
  const ColumnSource source = copy.source(item, col);
  // Pass 1.
  VecD sum[W / kWide];
  for (auto& s : sum) s = VecD(0);
  for (int64_t p = 0; p < N; ++p) {
    for (int h = 0; h < 2; ++h) {
      const float* x = as_acc(col.row(item, p) + col.input(h), kWidth, copy.converted(p, h));
      for (int64_t q = 0; q < kWidth / kWide; ++q) {
        VecD& s = sum[h * kWidth / kWide + q];
        s = s + load_wide(x + q * kWide);
      }
    }
  }
  alignas(64) double sums[W], squares[W], mean_d[W];
  alignas(64) float means[W];
  for (int64_t q = 0; q < W / kWide; ++q) sum[q].store(sums + q * kWide);
  for (int64_t pos = 0; pos < W; ++pos) {
    mean_d[pos] = sums[pos] / static_cast<double>(N);
    means[pos] = static_cast<float>(mean_d[pos]);
  }
  // Pass 2.
  for (int64_t p0 = 0; p0 < N; p0 += kBlockRows) {
    FloatVec acc[W / L];
    for (auto& a : acc) a = FloatVec(0);
    for (int64_t p = p0; p < std::min(N, p0 + kBlockRows); ++p) {
      for (int h = 0; h < 2; ++h) {
        const float* x = source.half_row(p, h);
        for (int64_t v = 0; v < kWidth / L; ++v) {
          const int64_t pos = h * kWidth + v * L;
          const FloatVec d = FloatVec::loadu(x + v * L) - FloatVec::loadu(means + pos);
          acc[pos / L] = at::vec::fmadd(d, d, acc[pos / L]);
        }
      }
    }
    for (int64_t k = 0; k < W / L; ++k) add_wide(squares + k * L, acc[k], p0 == 0);
  }
  for (int64_t pos = 0; pos < W; ++pos) {
    const int64_t h = pos / kWidth, ch = h * geo.half + c + pos % kWidth;
    const double rounding = mean_d[pos] - static_cast<double>(means[pos]);
    const double var = squares[pos] / static_cast<double>(N) - rounding * rounding;
    st[pos] = moment_stats(item, C, N, mean_d[pos], var, ch, eps, channel_role(ch, geo.m).spatial);
    mean[ch] = st[pos].mean;
    rstd[ch] = st[pos].rstd;
  }
}

// The gates of a column as lanes (ColumnGeometry's order), from its statistics (row order); slice
// q = h kSlices + s (nhwc_columns.h).
//   begin(c, st)        the lanes of the column at c;
//   channel_gate(q)     slice q's channel-branch gate (constant over the pixels);
//   z(x, h, z)          the spatial gate's pre-activation of the slices of half h, z[0 .. kSlices),
//                       from the half's slices x[0 .. kSlices).
// SALayer: sigmoid(cw mu + cb) and the SpatialGate (sa_math.h), per channel.
template <int M, typename scalar_t>
class SALayerGates {
  static constexpr int S = kSlices<M>;

 public:
  SALayerGates(const ForwardTensors<scalar_t>& t, const ColumnGeometry& geo) : t_(t), geo_(geo) {}
  SALayerGates(const SALayerGates&) = delete;  // fields_ points into field_

  void begin(int64_t c, const Standardizer<float>* st) {
    for (int64_t lane = 0; lane < 4 * L * S; ++lane) {
      const int64_t ch = geo_.channel(c, lane);
      set_sa_layer_lanes(fields_.data(), lane, ch, geo_.m, st[geo_.position(c, ch)], t_.w);
    }
    for (int q = 0; q < 2 * S; ++q) {
      channel_gate_[q] = FloatVec::loadu(field_[kConstantGate] + 2 * q * L);
      gate_[q] = spatial_gate_at<FloatVec>(fields_.data(), 2 * q * L + L);
    }
  }
  FloatVec channel_gate(int q) const { return channel_gate_[q]; }
  void z(const RoleSplit* x, int h, FloatVec* z) const {
    for (int s = 0; s < S; ++s) z[s] = gate_[h * S + s].z(x[s].spatial);
  }

 private:
  const ForwardTensors<scalar_t>& t_;
  const ColumnGeometry& geo_;
  alignas(64) float field_[kSALayerFields][kMaxLanes] = {};
  std::array<float*, kSALayerFields> fields_ = lane_fields(field_);
  FloatVec channel_gate_[2 * S];
  SpatialGate<FloatVec> gate_[2 * S];
};

// ShuffleAttention: sigmoid(W1 mu + b1) over a channel branch's means (channel_mixer: a half's
// channel lanes hold whole branches, as its spatial lanes); z = W2 y + b2 with the GroupNorm
// output y of the spatial branch's channels (mixer).
template <int M, typename scalar_t>
class ShuffleAttentionGates {
  static constexpr int S = kSlices<M>;

 public:
  ShuffleAttentionGates(const ForwardTensors<scalar_t>& t, const ColumnGeometry& geo,
                        const BranchMixer& mixer, const BranchMixer& channel_mixer)
      : t_(t), geo_(geo), mixer_(mixer), channel_mixer_(channel_mixer) {}
  ShuffleAttentionGates(const ShuffleAttentionGates&) = delete;  // fields_ points into field_

  void begin(int64_t c, const Standardizer<float>* st) {
    alignas(64) float mu[kMaxLanes] = {};  // the channel lanes' means
    for (int64_t lane = 0; lane < 4 * L * S; ++lane) {
      const int64_t ch = geo_.channel(c, lane);
      const Standardizer<float>& channel = st[geo_.position(c, ch)];
      const ChannelRole role = channel_role(ch, M);
      if (role.spatial) {
        set_group_norm_output(fields_.data(), lane, t_.w.gw[role.k], t_.w.gb[role.k], channel);
      } else {
        mu[lane] = channel.mean;
      }
    }
    for (int h = 0; h < 2; ++h) {
      channel_gates<M>(channel_mixer_, mu, h, channel_gate_ + h * S);
    }
  }
  FloatVec channel_gate(int q) const { return channel_gate_[q]; }
  void z(const RoleSplit* x, int h, FloatVec* z) const {
    FloatVec y[S];
    for (int s = 0; s < S; ++s) {
      y[s] = group_norm_output_at(fields_.data(), x[s].spatial, 2 * (h * S + s) * L + L);
    }
    mixer_.mix<M>(y, z);
  }

 private:
  const ForwardTensors<scalar_t>& t_;
  const ColumnGeometry& geo_;
  const BranchMixer& mixer_;
  const BranchMixer& channel_mixer_;
  alignas(64) float field_[kShuffleAttentionFields][kMaxLanes] = {};
  std::array<float*, kShuffleAttentionFields> fields_ = lane_fields(field_);
  FloatVec channel_gate_[2 * S];
};

// The thread's next column, which the gating pass asks the L2 cache for (null item: none).
template <typename scalar_t>
struct NextColumn {
  const scalar_t* item;
  ColumnAt at;
};

// The gating pass of the column at c of an item: its output rows (the 2 width output channels from
// 2c), from x in float (source). Row by row it also asks for the same row of the thread's next
// column (prefetch_run into L2), so that the next column's pass 1 finds it there: the passes of a
// column otherwise take turns, pass 1 only reading memory and the gating pass only writing it, and
// the two threads, given equal columns, take those turns together. At stage 1 (SALayer, fp32,
// batch 8, 2 threads, 400 KiB of x a column: the L2 cache holds this column and the next) the
// forward went from 1.21-1.52x the NCHW forward's time to 1.01-1.14x (lower quartiles of 60
// calls, 3 alternating runs); SALayer's stage 2 gained 5-10% and ShuffleAttention's stage 4
// 10-15%, stage 3 and SALayer's bfloat16 stage 4 measured the same within noise.
// With the residual epilogue's identity (out's item of it, else null), each output row is
// relu(y + identity) (sa_math.h), identity read at the row's output channels.
template <int M, typename scalar_t, typename Gates>
void gate_column(ColumnSource source, scalar_t* out, const scalar_t* identity, ColumnAt col,
                 int64_t N, const Gates& gates, bool streaming, NextColumn<scalar_t> next) {
  constexpr int64_t kWidth = kColumnWidth<M>;
  constexpr int S = kSlices<M>, Q = 2 * S;
  FloatVec channel_gate[Q];
  for (int q = 0; q < Q; ++q) channel_gate[q] = gates.channel_gate(q);
  RoleSplit x[kBlockRows][Q];
  FloatVec gate[kBlockRows][Q];
  for (int64_t p0 = 0; p0 < N; p0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, N - p0);
    for (int64_t r = 0; r < rows; ++r) {
      if (next.item != nullptr) {
        const scalar_t* ahead = next.at.row(next.item, p0 + r);
        for (int h = 0; h < 2; ++h) prefetch_run<kWidth, kIntoL2>(ahead, next.at.input(h));
      }
      // identity's rows come C values apart, which the hardware prefetchers follow badly: asked
      // for kPrefetchRows ahead (without, the residual forward took 2.2x the plain one's time
      // at stage 2, fp32, against 1.8x for the plain forward followed by add and relu).
      if (identity != nullptr && p0 + r + kPrefetchRows < N) {
        prefetch_run<2 * kWidth, kNonTemporal>(col.row(identity, p0 + r + kPrefetchRows),
                                               col.output(0));
      }
      for (int h = 0; h < 2; ++h) {
        column_x<M>(source.row(p0 + r), h, source.at, x[r] + h * S);
        gates.z(x[r] + h * S, h, gate[r] + h * S);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (auto& g : gate[r]) g = sigmoid(g);
    }
    for (int64_t r = 0; r < rows; ++r) {
      FloatVec half_y[2][Q];  // each half's vectors in row order
      for (int h = 0; h < 2; ++h) {
        RoleSplit y[S];
        for (int s = 0; s < S; ++s) {
          const int q = h * S + s;
          y[s] = RoleSplit{x[r][q].channel * channel_gate[q], x[r][q].spatial * gate[r][q]};
        }
        merge_half<M>(y, half_y[h]);
      }
      for (int v = 0; v < Q; ++v) {  // both halves' vectors v: 2L output channels
        auto [lo, hi] = at::vec::interleave2(half_y[0][v], half_y[1][v]);
        if (identity != nullptr) {
          const auto [id_lo, id_hi] = load_pair(col.row(identity, p0 + r) + col.output(v));
          lo = residual_relu(lo, id_lo);
          hi = residual_relu(hi, id_hi);
        }
        store_pair(col.row(out, p0 + r) + col.output(v), lo, hi, streaming);
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
void forward_columns(Variant variant, const ForwardParams& p) {
  const ForwardTensors<scalar_t> t(p, variant);
  const ColumnGeometry geo(p);
  const int64_t C = geo.C, N = geo.N;
  const float eps = static_cast<float>(p.eps);
  const bool streaming = stream_results(p.batch * N * C * int64_t{sizeof(scalar_t)});
  dispatch_m(geo.m, [&](auto M) {
    auto run = [&](const auto& make_gates) {
      at::parallel_for(0, p.batch * geo.columns, 1, [&](int64_t begin, int64_t end) {
        auto gates = make_gates();
        const ColumnCopy<M(), scalar_t> copy(N);
        Standardizer<float> st[kMaxLanes];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / geo.columns, c = task % geo.columns * geo.width;
          const scalar_t* item = t.x + b * N * C;
          column_stats<M()>(item, c, geo, eps, copy, st, t.mean + b * C, t.rstd + b * C);
          gates.begin(c, st);
          const int64_t next_b = (task + 1) / geo.columns;
          const NextColumn<scalar_t> next{task + 1 < end ? t.x + next_b * N * C : nullptr,
                                          geo.at((task + 1) % geo.columns * geo.width)};
          gate_column<M()>(copy.source(item, geo.at(c)), t.out + b * N * C,
                           t.identity_item(b, N * C), geo.at(c), N, gates, streaming, next);
        }
        stream_fence();
      });
    };
    if (variant == Variant::kSALayer) {
      run([&] { return SALayerGates<M(), scalar_t>(t, geo); });
      return;
    }
    const BranchMixer mixer(t.w.sw, t.w.sb, M()), channel_mixer(t.w.cw, t.w.cb, M());
    run([&] { return ShuffleAttentionGates<M(), scalar_t>(t, geo, mixer, channel_mixer); });
  });
}

template void forward_columns<float>(Variant, const ForwardParams&);
template void forward_columns<c10::BFloat16>(Variant, const ForwardParams&);
template void forward_columns<c10::Half>(Variant, const ForwardParams&);

}  // namespace sa_cuda::cpu
