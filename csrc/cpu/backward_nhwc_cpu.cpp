// The backward of both variants by columns (nhwc_columns.h), float lanes. Bytes moved: x and
// grad_out are read from memory once (pass 1; pass 2 re-reads the column from the L2 cache), grad_x
// is written once; the spatial lanes' gate is written and read back once, in cache. A column's
// grad_out is the 4L output channels from 2c (interleaved); x and grad_x its two runs of 2L.
//   pass 1  by blocks of kBlockRows rows: sum(gu x) on channel lanes, and the spatial lanes' sums
//           (SALayer: T1 = sum t and T2 = sum t xh; ShuffleAttention: T1 and A[j, k] =
//           sum t_j xh_k), in registers over the block, then added to the column's sums in
//           double; the gate s is kept for pass 2;
//   finish  per channel or branch: the partials of the parameter gradients and dx's coefficients;
//   pass 2  dx row by row from the kept gate.
// The per-element formulas are the NCHW kernels' (sa_math.h); only the order of the sums differs.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../sa_math.h"
#include "kernels_cpu.h"
#include "nhwc_columns.h"
#include "nhwc_rows.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {
namespace {

constexpr int64_t L = ColumnGeometry::L;
constexpr int64_t W = ColumnGeometry::kLanes;
constexpr int64_t kBlockRows = ColumnGeometry::kBlockRows;

// Lane fields of a column: the channel branch's gate and beta, the spatial branch's saved
// statistics and parameters, and dx's coefficients (InputGradCoeffs). Those up to kBias are
// known before pass 1, the rest after it. Lane h 2L + l holds a channel branch's channel,
// h 2L + L + l a spatial one (split_roles' order).
enum Field {
  kGate,
  kMean,
  kRstd,
  kNormWeight,
  kNormBias,
  kWeight,
  kBias,
  kBeta,
  kAlpha,
  kD1,
  kD2,
  kFields
};

// The lane fields of one column, filled per column by a variant's begin() and finish().
struct ColumnLanes {
  alignas(64) float field[kFields][W];

  ColumnLanes() { std::fill(&field[0][0], &field[0][0] + kFields * W, 0.0f); }
  FloatVec lanes(Field f, int64_t pos) const { return FloatVec::loadu(field[f] + pos); }
  static constexpr int64_t channel_lanes(int h) { return 2 * h * L; }
  static constexpr int64_t spatial_lanes(int h) { return 2 * h * L + L; }
};

// One pixel's values of the column at c: per half, x and grad_out split by role. grad_out's 4L
// output channels from 2c hold the channels c .. c + 2L of both halves, interleaved.
struct ColumnValues {
  RoleSplit x[2], gu[2];
};

template <int M, typename scalar_t>
inline ColumnValues column_values(const scalar_t* x_row, const scalar_t* gu_row, ColumnAt col) {
  const auto [g0, g1] = load_pair(gu_row + col.output(0));
  const auto [g2, g3] = load_pair(gu_row + col.output(1));
  const auto [first0, second0] = at::vec::deinterleave2(g0, g1);
  const auto [first1, second1] = at::vec::deinterleave2(g2, g3);
  const FloatVec by_half[2][2] = {{first0, first1}, {second0, second1}};
  ColumnValues v;
  for (int h = 0; h < 2; ++h) {
    v.x[h] = column_x<M>(x_row, h, col);
    v.gu[h] = split_roles<M>(by_half[h][0], by_half[h][1], col.swapped[h]);
  }
  return v;
}

// A block of rows of a column, per row and half: the spatial lanes' x, grad_out and gate, and a
// result of the channel lanes. Pass 1 takes the exp in a loop of its own (a call to the vector
// exp spills every live vector register: inside the loop that holds a column's coefficients and
// sums it cost about 60 instructions a call, callgrind) and keeps the gate for pass 2, which reads
// it back instead (as the NCHW kernel keeps its gate plane).
struct ColumnBlock {
  FloatVec x[kBlockRows][2], gu[kBlockRows][2], gate[kBlockRows][2], channel[kBlockRows][2];
  int64_t rows;

  // Rows [p0, p0 + count) of the column; channel_lanes(x, gu, h) gives channel[r][h]. The
  // gate: saved[(p * 2 + h) * L ...] of pixel p when kSaved, else sigmoid(gate_z(x, h)) (stored
  // there).
  template <int M, bool kSaved, typename scalar_t, typename GateZ, typename ChannelResult>
  void load(const scalar_t* x_item, const scalar_t* gu_item, ColumnAt col, int64_t p0,
            int64_t count, float* saved, const GateZ& gate_z, const ChannelResult& channel_lanes) {
    rows = count;
    for (int64_t r = 0; r < rows; ++r) {
      const ColumnValues v =
          column_values<M>(col.row(x_item, p0 + r), col.row(gu_item, p0 + r), col);
      for (int h = 0; h < 2; ++h) {
        channel[r][h] = channel_lanes(v.x[h].channel, v.gu[h].channel, h);
        x[r][h] = v.x[h].spatial;
        gu[r][h] = v.gu[h].spatial;
        if constexpr (kSaved) {
          gate[r][h] = FloatVec::loadu(saved + ((p0 + r) * 2 + h) * L);
        } else {
          gate[r][h] = sigmoid_exp_arg(gate_z(v.x[h].spatial, h));
        }
      }
    }
    if constexpr (!kSaved) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int h = 0; h < 2; ++h) {
          gate[r][h] = sigmoid_of_exp(sa_exp(gate[r][h]));
          gate[r][h].store(saved + ((p0 + r) * 2 + h) * L);
        }
      }
    }
  }

  // t = dL/dz and xh of row r, half h, as the NCHW kernels form them.
  struct SpatialTerms {
    FloatVec t, xh;
  };
  SpatialTerms spatial(const Standardizer<FloatVec>& st, int64_t r, int h) const {
    return {gate_input_grad(gu[r][h], x[r][h], gate[r][h]), st.normalized(x[r][h])};
  }
};

// The columns of one variant through both passes. A Column (SALayerColumn,
// ShuffleAttentionColumn) is a ColumnLanes with
//   kSums                  pass 1's sums per lane: sum 0 is sum(gu x) on the channel lanes (taken
//                          here), the others are on the spatial lanes;
//   begin(b, c)            the lanes known before pass 1: kGate on the channel lanes, the spatial
//                          branch's statistics and parameters;
//   z(x, h)                the spatial gate's pre-activation of half h's spatial lanes x;
//   accumulate(block, r, h, sums)  row r's terms of sums 1 .. kSums - 1 on half h;
//   finish(b, c, sums)     the partials of the parameter gradients, kBeta on the channel lanes,
//                          and what spatial_grad needs;
//   spatial_grad(block, r, h)      dx of row r on half h's spatial lanes.
// make_column() makes one per task range.
template <int M, typename scalar_t, typename MakeColumn>
void run_columns(const BackwardTensors<scalar_t>& t, const ColumnGeometry& geo, int64_t batch,
                 const MakeColumn& make_column) {
  const int64_t C = geo.C, N = geo.N;
  const bool streaming = stream_results(batch * N * C * int64_t{sizeof(scalar_t)});
  at::parallel_for(0, batch * geo.columns, 1, [&](int64_t begin, int64_t end) {
    // The spatial lanes' gate, pass 1 to pass 2 (written before it is read: no initial values).
    const std::unique_ptr<float[]> saved_gate(new float[N * 2 * L]);
    auto column = make_column();
    using Column = decltype(column);
    constexpr int kSums = Column::kSums;
    auto gate_z = [&](const FloatVec& x, int h) { return column.z(x, h); };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / geo.columns, c = task % geo.columns * 2 * L;
      const ColumnAt col = geo.at(c);
      column.begin(b, c);
      const scalar_t* x = t.fwd.x + b * N * C;
      const scalar_t* gu = t.grad_out + b * N * C;
      scalar_t* dx = t.grad_x + b * N * C;

      // Pass 1.
      alignas(64) double sums[kSums][W] = {};
      {
        ColumnBlock block;
        for (int64_t p0 = 0; p0 < N; p0 += kBlockRows) {
          FloatVec acc[kSums][2];
          for (auto& pair : acc) pair[0] = pair[1] = FloatVec(0);
          block.load<M, false>(x, gu, col, p0, std::min(kBlockRows, N - p0), saved_gate.get(),
                               gate_z, [&](const FloatVec& xv, const FloatVec& gv, int h) {
                                 acc[0][h] = acc[0][h] + gv * xv;
                                 return FloatVec(0);
                               });
          for (int64_t r = 0; r < block.rows; ++r) {
            for (int h = 0; h < 2; ++h) column.accumulate(block, r, h, acc);
          }
          for (int k = 0; k < kSums; ++k) {
            for (int h = 0; h < 2; ++h) {
              const int64_t pos =
                  k == 0 ? ColumnLanes::channel_lanes(h) : ColumnLanes::spatial_lanes(h);
              add_wide(sums[k] + pos, acc[k][h]);
            }
          }
        }
      }
      column.finish(b, c, sums);
      // Pass 2.
      FloatVec gate[2], beta[2];
      for (int h = 0; h < 2; ++h) {
        gate[h] = column.lanes(kGate, ColumnLanes::channel_lanes(h));
        beta[h] = column.lanes(kBeta, ColumnLanes::channel_lanes(h));
      }
      ColumnBlock block;
      for (int64_t p0 = 0; p0 < N; p0 += kBlockRows) {
        block.load<M, true>(x, gu, col, p0, std::min(kBlockRows, N - p0), saved_gate.get(), gate_z,
                            [&](const FloatVec&, const FloatVec& gv, int h) {
                              return channel_input_grad(gv, gate[h], beta[h]);
                            });
        for (int64_t r = 0; r < block.rows; ++r) {
          for (int h = 0; h < 2; ++h) {
            const RoleSplit grads{block.channel[r][h], column.spatial_grad(block, r, h)};
            const auto [lo, hi] = merge_roles<M>(grads, col.swapped[h]);
            store_pair(col.row(dx, p0 + r) + col.input(h), lo, hi, streaming);
          }
        }
      }
    }
    stream_fence();
  });
}

// What both variants' columns share: the tensors, the spatial lanes' saved statistics, pass 1's
// T1 = sum t and sum t xh, and dx's coefficients on the spatial lanes.
template <typename scalar_t>
class ColumnBase : public ColumnLanes {
 public:
  // Row r's terms of sums 1 and 2 on half h; returns its t and xh for a variant's further sums.
  ColumnBlock::SpatialTerms accumulate(const ColumnBlock& block, int64_t r, int h,
                                       FloatVec (*acc)[2]) const {
    const auto s = block.spatial(st_[h], r, h);
    acc[1][h] = acc[1][h] + s.t;
    acc[2][h] = acc[2][h] + s.t * s.xh;
    return s;
  }

 protected:
  ColumnBase(const BackwardTensors<scalar_t>& t, const ColumnGeometry& geo) : t_(t), geo_(geo) {}

  // st_ from the saved statistics in kMean and kRstd.
  void load_stats() {
    for (int h = 0; h < 2; ++h) {
      st_[h] = saved_stats(lanes(kMean, spatial_lanes(h)), lanes(kRstd, spatial_lanes(h)));
    }
  }
  // coeffs_ from kAlpha, kD1 and kD2.
  void load_coeffs() {
    for (int h = 0; h < 2; ++h) {
      const int64_t pos = spatial_lanes(h);
      coeffs_[h] = {lanes(kAlpha, pos), FloatVec(0), lanes(kD1, pos), lanes(kD2, pos)};
    }
  }

  const BackwardTensors<scalar_t>& t_;
  const ColumnGeometry& geo_;
  Standardizer<FloatVec> st_[2];
  InputGradCoeffs<FloatVec> coeffs_[2];
};

// SALayer: per channel, u = x sigmoid(cw mu + cb) or x sigmoid(sw y + sb) (SpatialGate).
template <typename scalar_t>
class SALayerColumn : public ColumnBase<scalar_t> {
  using Base = ColumnBase<scalar_t>;
  using Base::coeffs_, Base::geo_, Base::st_, Base::t_;

 public:
  using Base::field, Base::lanes;
  static constexpr int kSums = 3;  // sum(gu x); T1 = sum t, T2 = sum t xh

  SALayerColumn(const BackwardTensors<scalar_t>& t, const ColumnGeometry& geo) : Base(t, geo) {}

  void begin(int64_t b, int64_t c) {
    const ParamArrays<float>& w = t_.fwd.w;
    for (int64_t lane = 0; lane < W; ++lane) {
      const int64_t ch = geo_.channel(c, lane), plane = b * geo_.C + ch;
      const ChannelRole role = channel_role(ch, geo_.m);
      const int64_t k = role.k;
      if (!role.spatial) {
        field[kGate][lane] = sigmoid(w.cw[k] * t_.fwd.mean[plane] + w.cb[k]);
        continue;
      }
      const float values[] = {
          t_.fwd.mean[plane], t_.fwd.rstd[plane], w.gw[k], w.gb[k], w.sw[k], w.sb[k]};
      for (int v = 0; v < 6; ++v) field[kMean + v][lane] = values[v];
    }
    Base::load_stats();
    for (int h = 0; h < 2; ++h) {
      const int64_t pos = Base::spatial_lanes(h);
      gate_[h] = spatial_gate(lanes(kWeight, pos), lanes(kBias, pos), lanes(kNormWeight, pos),
                              lanes(kNormBias, pos), st_[h]);
    }
  }

  FloatVec z(const FloatVec& x, int h) const { return gate_[h].z(x); }

  void finish(int64_t b, int64_t c, const double (*sums)[W]) {
    const ParamArrays<float>& w = t_.fwd.w;
    for (int64_t lane = 0; lane < W; ++lane) {
      const int64_t ch = geo_.channel(c, lane);
      const ChannelRole role = channel_role(ch, geo_.m);
      const int64_t k = role.k, slot = geo_.slot0(b, ch) + k;
      if (!role.spatial) {
        const float dz = static_cast<float>(sums[0][lane]) * sigmoid_grad(field[kGate][lane]);
        t_.gate_grad[slot] = dz;
        field[kBeta][lane] = channel_grad_coeffs(w.cw[k] * dz, geo_.inv_n).beta;
        continue;
      }
      const float T1 = static_cast<float>(sums[1][lane]);
      const float T2 = static_cast<float>(sums[2][lane]);
      t_.t_sum[slot] = T1;
      t_.t_xh[slot] = T2;
      const InputGradCoeffs<float> coeffs =
          spatial_grad_coeffs(w.gw[k] * field[kRstd][lane] * w.sw[k], T1, T2, geo_.inv_n);
      field[kAlpha][lane] = coeffs.alpha;
      field[kD1][lane] = coeffs.d1;
      field[kD2][lane] = coeffs.d2;
    }
    Base::load_coeffs();
  }

  // dy = sw t: the factor sw is in alpha (spatial_grad_coeffs above).
  FloatVec spatial_grad(const ColumnBlock& block, int64_t r, int h) const {
    const auto s = block.spatial(st_[h], r, h);
    return spatial_input_grad(block.gu[r][h], block.gate[r][h], s.t, s.xh, coeffs_[h]);
  }

 private:
  SpatialGate<FloatVec> gate_[2];
};

// ShuffleAttention: per branch, u = x sigmoid(W1 mu + b1) (channel) or x sigmoid(W2 y + b2) with
// the GroupNorm output y (spatial). A vector of spatial lanes holds L / M whole branches, each in
// M aligned lanes in channel order (split_roles): the m x m products go by lane rotations
// (BranchMixer), z = W2 y + b2 and dy = W2^T t, and lane j of sum t * rot_d(xh) is
// A[j, (j + d) mod M].
template <int M, typename scalar_t>
class ShuffleAttentionColumn : public ColumnBase<scalar_t> {
  using Base = ColumnBase<scalar_t>;
  using Base::coeffs_, Base::geo_, Base::st_, Base::t_;

 public:
  using Base::field, Base::lanes;
  static constexpr int kSums = 2 + M;  // sum(gu x); T1 = sum t; sum t rot_d(xh), d < M

  ShuffleAttentionColumn(const BackwardTensors<scalar_t>& t, const ColumnGeometry& geo,
                         const BranchMixer& gate_mixer, const BranchMixer& grad_mixer)
      : Base(t, geo), gate_mixer_(gate_mixer), grad_mixer_(grad_mixer) {}

  void begin(int64_t b, int64_t c) {
    const ParamArrays<float>& w = t_.fwd.w;
    for (int64_t lane = 0; lane < W; ++lane) {
      const int64_t ch = geo_.channel(c, lane), plane = b * geo_.C + ch;
      const ChannelRole role = channel_role(ch, M);
      const int64_t k = role.k;
      if (!role.spatial) {  // sigmoid(W1 mu + b1)[k] over the branch's means
        const float* mu = t_.fwd.mean + plane - k;
        field[kGate][lane] = sigmoid(matvec_row(w.cw, mu, w.cb, M, k));
        continue;
      }
      const float values[] = {t_.fwd.mean[plane], t_.fwd.rstd[plane], w.gw[k], w.gb[k]};
      for (int v = 0; v < 4; ++v) field[kMean + v][lane] = values[v];
    }
    Base::load_stats();
    for (int h = 0; h < 2; ++h) {
      const int64_t pos = Base::spatial_lanes(h);
      norm_scale_[h] = lanes(kNormWeight, pos) * st_[h].gate_rstd;
      norm_shift_[h] = lanes(kNormBias, pos);
    }
  }

  // z = W2 y + b2, y = gw r (x - mu) + gb as the NCHW kernel forms it.
  FloatVec z(const FloatVec& x, int h) const {
    return gate_mixer_.mix<M>(norm_scale_[h] * st_[h].centered(x) + norm_shift_[h]);
  }

  // T1 and A's diagonal (d = 0) as SALayer's sums, then the rotations.
  void accumulate(const ColumnBlock& block, int64_t r, int h, FloatVec (*acc)[2]) const {
    const auto s = Base::accumulate(block, r, h, acc);
    for (int d = 1; d < M; ++d) acc[2 + d][h] = acc[2 + d][h] + s.t * grad_mixer_.rotate(s.xh, d);
  }

  void finish(int64_t b, int64_t c, const double (*sums)[W]) {
    const ParamArrays<float>& w = t_.fwd.w;
    for (int h = 0; h < 2; ++h) {
      // Channel branches: dz_j = sum(gu_j x_j) s_j (1 - s_j), beta_j = (W1^T dz)_j / N.
      for (int64_t q = Base::channel_lanes(h); q < Base::channel_lanes(h) + L; q += M) {
        const int64_t slot0 = geo_.slot0(b, geo_.channel(c, q));
        float dz[M];
        for (int j = 0; j < M; ++j) {
          dz[j] = static_cast<float>(sums[0][q + j]) * sigmoid_grad(field[kGate][q + j]);
          t_.gate_grad[slot0 + j] = dz[j];
        }
        for (int j = 0; j < M; ++j) {
          field[kBeta][q + j] = channel_grad_coeffs(matvec_t_row(w.cw, dz, M, j), geo_.inv_n).beta;
        }
      }
      // Spatial branches: T1 and A, then dx's coefficients.
      for (int64_t q = Base::spatial_lanes(h); q < Base::spatial_lanes(h) + L; q += M) {
        const int64_t slot0 = geo_.slot0(b, geo_.channel(c, q));
        float T1[M], A[M * M];
        for (int j = 0; j < M; ++j) {
          T1[j] = static_cast<float>(sums[1][q + j]);
          for (int d = 0; d < M; ++d)
            A[j * M + (j + d) % M] = static_cast<float>(sums[2 + d][q + j]);
          t_.t_sum[slot0 + j] = T1[j];
        }
        std::copy(A, A + M * M, t_.t_xh + slot0 * M);
        for (int i = 0; i < M; ++i) {
          const InputGradCoeffs<float> coeffs = shuffle_attention_spatial_coeffs(
              w.sw, T1, A, M, i, w.gw[i] * field[kRstd][q + i], geo_.inv_n);
          field[kAlpha][q + i] = coeffs.alpha;
          field[kD1][q + i] = coeffs.d1;
          field[kD2][q + i] = coeffs.d2;
        }
      }
    }
    Base::load_coeffs();
  }

  FloatVec spatial_grad(const ColumnBlock& block, int64_t r, int h) const {
    const auto s = block.spatial(st_[h], r, h);
    const FloatVec dy = grad_mixer_.mix<M>(s.t);
    return spatial_input_grad(block.gu[r][h], block.gate[r][h], dy, s.xh, coeffs_[h]);
  }

 private:
  const BranchMixer& gate_mixer_;
  const BranchMixer& grad_mixer_;
  FloatVec norm_scale_[2], norm_shift_[2];
};

}  // namespace

template <typename scalar_t>
void backward_columns(Variant variant, const BackwardParams& p) {
  const BackwardTensors<scalar_t> t(p, variant);
  const ColumnGeometry geo(p.fwd);
  const ParamArrays<float>& w = t.fwd.w;
  dispatch_m(geo.m, [&](auto M) {
    if (variant == Variant::kSALayer) {
      run_columns<M()>(t, geo, p.fwd.batch, [&] { return SALayerColumn<scalar_t>(t, geo); });
      return;
    }
    const BranchMixer gate_mixer(w.sw, w.sb, M()), grad_mixer(w.sw, nullptr, M(), true);
    run_columns<M()>(t, geo, p.fwd.batch, [&] {
      return ShuffleAttentionColumn<M(), scalar_t>(t, geo, gate_mixer, grad_mixer);
    });
  });
}

template void backward_columns<float>(Variant, const BackwardParams&);
template void backward_columns<c10::BFloat16>(Variant, const BackwardParams&);
template void backward_columns<c10::Half>(Variant, const BackwardParams&);

}  // namespace sa_cuda::cpu
