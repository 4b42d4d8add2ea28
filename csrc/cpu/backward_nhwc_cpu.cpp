// The backward of both variants by columns (nhwc_columns.h), float lanes. Bytes moved: x and
// grad_out are read from memory once (pass 1), grad_x is written once; pass 1 keeps 4 vectors a
// slice and row (KeptTerm: as many bytes as the column's x and grad_out) that pass 2 reads back
// from the L2 cache. A column's grad_out is the 2 width output channels from 2c (interleaved); x
// and grad_x its two runs of width.
//   pass 1  row by row (the gate's exp inlined, vec_exp.h): sum(gu x) on channel lanes, and the
//           spatial lanes' sums (SALayer: T1 = sum t and T2 = sum t xh; ShuffleAttention: T1 and
//           A[j, k] = sum t_j xh_k), in registers over blocks of kBlockRows rows, then added to
//           the column's sums in double; the kept terms for pass 2;
//   finish  per channel or branch: the partials of the parameter gradients and dx's coefficients;
//   pass 2  dx row by row from the kept terms.
// The per-element formulas are the NCHW kernels' (sa_math.h); only the order of the sums differs.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <memory>
#include <tuple>

#include "../sa_math.h"
#include "kernels_cpu.h"
#include "nhwc_columns.h"
#include "nhwc_rows.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {
namespace {

constexpr int64_t L = ColumnGeometry::L;
constexpr int64_t kMaxLanes = ColumnGeometry::kMaxLanes;
constexpr int64_t kBlockRows = ColumnGeometry::kBlockRows;

// Lane fields of a column: the channel branch's gate and beta, the spatial branch's saved
// statistics and parameters, and dx's coefficients (InputGradCoeffs). Those up to kBias are
// known before pass 1, the rest after it. Slice q of a column (nhwc_columns.h: q = h kSlices + s)
// holds its channel-branch channels at lanes 2 q L + l, its spatial ones at 2 q L + L + l
// (ColumnGeometry::channel says which).
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
  alignas(64) float field[kFields][kMaxLanes];

  ColumnLanes() { std::fill(&field[0][0], &field[0][0] + kFields * kMaxLanes, 0.0f); }
  FloatVec lanes(Field f, int64_t pos) const { return FloatVec::loadu(field[f] + pos); }
  static constexpr int64_t channel_lanes(int q) { return 2 * q * L; }
  static constexpr int64_t spatial_lanes(int q) { return 2 * q * L + L; }
};

// One pixel's values of the column at c: per half, x and grad_out as slices. grad_out's output
// channels from 2c hold the column's channels of both halves, interleaved.
template <int M>
struct ColumnValues {
  RoleSplit x[2][kSlices<M>], gu[2][kSlices<M>];
};

template <int M, typename scalar_t>
inline ColumnValues<M> column_values(const scalar_t* x_row, const scalar_t* gu_row, ColumnAt col) {
  constexpr int kVectors = 2 * kSlices<M>;  // of a half
  FloatVec by_half[2][kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const auto [lo, hi] = load_pair(gu_row + col.output(v));
    std::tie(by_half[0][v], by_half[1][v]) = at::vec::deinterleave2(lo, hi);
  }
  ColumnValues<M> values;
  for (int h = 0; h < 2; ++h) {
    column_x<M>(x_row, h, col, values.x[h]);
    split_half<M>(by_half[h], values.gu[h]);
  }
  return values;
}

// What pass 1 keeps of a row for pass 2, per slice: grad_out on the channel lanes; gu s
// (gated_grad), t = dL/dz and xh on the spatial lanes. Pass 2 reads these alone, 4 vectors a
// slice (as many bytes as the column's x and grad_out, from the L2 cache), instead of x and
// grad_out again (deinterleaved and split by role again) and the gate, with t formed again: about
// a third of the SALayer backward's instructions at stage 1 (callgrind).
enum KeptTerm { kKeptGrad, kKeptGated, kKeptT, kKeptXh, kKeptTerms };

// The kept terms of a column's N rows, pass 1 to pass 2 (written before they are read): row p,
// slice q (of Q), term k at ((p Q + q) kKeptTerms + k) L.
struct KeptTerms {
  float* values;
  int Q;

  float* at(int64_t p, int q, KeptTerm k) const {
    return values + ((p * Q + q) * kKeptTerms + k) * L;
  }
  void keep(int64_t p, int q, KeptTerm k, const FloatVec& v) const { v.store(at(p, q, k)); }
  FloatVec term(int64_t p, int q, KeptTerm k) const { return FloatVec::loadu(at(p, q, k)); }
};

// The columns of one variant through both passes. A Column (SALayerColumn,
// ShuffleAttentionColumn) is a ColumnLanes with
//   kSums                  pass 1's sums per lane: sum 0 is sum(gu x) on the channel lanes (taken
//                          here), the others are on the spatial lanes;
//   begin(b, c)            the lanes known before pass 1: kGate on the channel lanes, the spatial
//                          branch's statistics (standardizer(q)) and parameters;
//   z(x, h, z)             the spatial gate's pre-activation of the slices of half h, z[0 .. S),
//                          from the half's slices x;
//   accumulate(t, xh, h, acc)  a row's terms of sums 1 .. kSums - 1 on the slices of half h, from
//                          their t[0 .. S) and xh[0 .. S);
//   finish(b, c, sums, kept)  the partials of the parameter gradients, kBeta on the channel
//                          lanes, and what spatial_grad needs (kept: pass 1's KeptTerms);
//   spatial_grad(gated, t, xh, h, dx)  dx of a row on the spatial lanes of half h's slices.
// make_column() makes one per task range.
template <int M, typename scalar_t, typename MakeColumn>
void run_columns(const BackwardTensors<scalar_t>& t, const ColumnGeometry& geo, int64_t batch,
                 const MakeColumn& make_column) {
  constexpr int S = kSlices<M>, Q = 2 * S;
  constexpr int64_t kWidth = kColumnWidth<M>;
  TORCH_INTERNAL_ASSERT(
      geo.width == kWidth && geo.N >= 1,
      "run_columns: the column's width, or no rows (pass 1's first block sets the sums)");
  at::parallel_for(0, batch * geo.columns, 1, [&](int64_t begin, int64_t end) {
    // Locals, not the closure's references: those are read again after every vector store (which
    // may alias anything).
    const int64_t C = geo.C, N = geo.N;
    const bool streaming = stream_results(batch * N * C * int64_t{sizeof(scalar_t)});
    const AlignedFloats kept_values = aligned_floats(N * Q * kKeptTerms * L);
    const KeptTerms kept{kept_values.get(), Q};
    auto column = make_column();
    using Column = decltype(column);
    constexpr int kSums = Column::kSums;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / geo.columns, c = task % geo.columns * geo.width;
      const ColumnAt col = geo.at(c);
      column.begin(b, c);
      const scalar_t* x = t.fwd.x + b * N * C;
      const int64_t item = b * N * C;
      scalar_t* dx = t.grad_x + b * N * C;

      // Pass 1: by blocks of kBlockRows rows, the sums in registers over a block, then added to
      // the column's sums in double. The first block sets them: sum 0 on the channel lanes and
      // the others on the spatial lanes are all that finish() reads (zeroing the whole array, 9 KiB
      // for m = 16, was 0.3 of callgrind's 2.8 million instructions at stage 4).
      alignas(64) double sums[kSums][kMaxLanes];
      for (int64_t p0 = 0; p0 < N; p0 += kBlockRows) {
        const int64_t rows = std::min(kBlockRows, N - p0);
        FloatVec acc[kSums][Q];
        for (auto& row : acc) {
          for (auto& a : row) a = FloatVec(0);
        }
        for (int64_t p = p0; p < p0 + rows; ++p) {
          if (p + kPrefetchRows < N) {
            const scalar_t* x_ahead = col.row(x, p + kPrefetchRows);
            for (int h = 0; h < 2; ++h) prefetch_run<kWidth, kNonTemporal>(x_ahead, col.input(h));
            const int64_t ahead = item + (p + kPrefetchRows) * C;
            prefetch_run<2 * kWidth, kNonTemporal>(t.grad_out + ahead, col.output(0));
            if (t.out != nullptr) {  // the residual epilogue's: out read, grad_identity written
              prefetch_run<2 * kWidth, kNonTemporal>(t.out + ahead, col.output(0));
              prefetch_run<2 * kWidth, 3, true>(t.grad_identity + ahead, col.output(0));
            }
          }
          // The row's gradient of SA(x) at its 2 width output channels (with the residual
          // epilogue: masked, and written to grad_identity).
          const scalar_t* gu_row =
              t.sa_grad(item + p * C + col.output(0), 2 * kWidth) - col.output(0);
          const ColumnValues<M> v = column_values<M>(col.row(x, p), gu_row, col);
          for (int h = 0; h < 2; ++h) {
            FloatVec z[S], t_row[S], xh[S];
            column.z(v.x[h], h, z);
            for (int s = 0; s < S; ++s) {
              const int q = h * S + s;
              const FloatVec &xv = v.x[h][s].spatial, &gv = v.gu[h][s].spatial;
              const FloatVec gate = sigmoid(z[s]);
              acc[0][q] = acc[0][q] + v.gu[h][s].channel * v.x[h][s].channel;
              t_row[s] = gate_input_grad(gv, xv, gate);
              xh[s] = column.standardizer(q).normalized(xv);
              kept.keep(p, q, kKeptGrad, v.gu[h][s].channel);
              kept.keep(p, q, kKeptGated, gated_grad(gv, gate));
              kept.keep(p, q, kKeptT, t_row[s]);
              kept.keep(p, q, kKeptXh, xh[s]);
            }
            column.accumulate(t_row, xh, h, acc);
          }
        }
        for (int k = 0; k < kSums; ++k) {
          for (int q = 0; q < Q; ++q) {
            const int64_t pos =
                k == 0 ? ColumnLanes::channel_lanes(q) : ColumnLanes::spatial_lanes(q);
            add_wide(sums[k] + pos, acc[k][q], p0 == 0);
          }
        }
      }
      column.finish(b, c, sums, kept);
      // Pass 2: dx row by row from the kept terms, last row first: the rows pass 1 kept last are
      // the ones still in the L2 cache (a column's x, grad_out and kept terms are 1.6 MB at stage 1
      // in fp32).
      FloatVec gate[Q], beta[Q];
      for (int q = 0; q < Q; ++q) {
        gate[q] = column.lanes(kGate, ColumnLanes::channel_lanes(q));
        beta[q] = column.lanes(kBeta, ColumnLanes::channel_lanes(q));
      }
      for (int64_t p = N - 1; p >= 0; --p) {
        for (int h = 0; h < 2; ++h) {
          FloatVec gated[S], t_row[S], xh[S], spatial[S];
          for (int s = 0; s < S; ++s) {
            gated[s] = kept.term(p, h * S + s, kKeptGated);
            t_row[s] = kept.term(p, h * S + s, kKeptT);
            xh[s] = kept.term(p, h * S + s, kKeptXh);
          }
          column.spatial_grad(gated, t_row, xh, h, spatial);
          RoleSplit grads[S];
          for (int s = 0; s < S; ++s) {
            const int q = h * S + s;
            grads[s] = RoleSplit{channel_input_grad(kept.term(p, q, kKeptGrad), gate[q], beta[q]),
                                 spatial[s]};
          }
          FloatVec rows[Q];  // the half's vectors in row order
          merge_half<M>(grads, rows);
          for (int v = 0; v < Q; v += 2) {
            store_pair(col.row(dx, p) + col.input(h) + v * L, rows[v], rows[v + 1], streaming);
          }
        }
      }
    }
    stream_fence();
  });
}

// What both variants' columns share: the tensors, the spatial lanes' saved statistics, pass 1's
// T1 = sum t and sum t xh, and dx's coefficients on the spatial lanes.
template <int M, typename scalar_t>
class ColumnBase : public ColumnLanes {
 protected:
  static constexpr int S = kSlices<M>, Q = 2 * S;

 public:
  const Standardizer<FloatVec>& standardizer(int q) const { return st_[q]; }

  // A row's terms of sum 1 (T1 = sum t), and of sum 2 (sum t xh) unless `t_only`, on the slices of
  // half h.
  template <bool t_only = false>
  void accumulate(const FloatVec* t, const FloatVec* xh, int h, FloatVec (*acc)[Q]) const {
    for (int s = 0; s < S; ++s) {
      const int q = h * S + s;
      acc[1][q] = acc[1][q] + t[s];
      if constexpr (!t_only) acc[2][q] = acc[2][q] + t[s] * xh[s];
    }
  }

 protected:
  ColumnBase(const BackwardTensors<scalar_t>& t, const ColumnGeometry& geo) : t_(t), geo_(geo) {}

  // st_ from the saved statistics in kMean and kRstd.
  void load_stats() {
    for (int q = 0; q < Q; ++q) {
      st_[q] = saved_stats(lanes(kMean, spatial_lanes(q)), lanes(kRstd, spatial_lanes(q)));
    }
  }
  // coeffs_ from kAlpha, kD1 and kD2.
  void load_coeffs() {
    for (int q = 0; q < Q; ++q) {
      const int64_t pos = spatial_lanes(q);
      coeffs_[q] = {lanes(kAlpha, pos), FloatVec(0), lanes(kD1, pos), lanes(kD2, pos)};
    }
  }

  const BackwardTensors<scalar_t>& t_;
  const ColumnGeometry& geo_;
  Standardizer<FloatVec> st_[Q];
  InputGradCoeffs<FloatVec> coeffs_[Q];
};

// SALayer: per channel, u = x sigmoid(cw mu + cb) or x sigmoid(sw y + sb) (SpatialGate).
template <int M, typename scalar_t>
class SALayerColumn : public ColumnBase<M, scalar_t> {
  using Base = ColumnBase<M, scalar_t>;
  using Base::coeffs_, Base::geo_, Base::st_, Base::t_, Base::S, Base::Q;

 public:
  using Base::field, Base::lanes;
  static constexpr int kSums = 3;  // sum(gu x); T1 = sum t, T2 = sum t xh

  SALayerColumn(const BackwardTensors<scalar_t>& t, const ColumnGeometry& geo) : Base(t, geo) {}

  void begin(int64_t b, int64_t c) {
    const ParamArrays<float>& w = t_.fwd.w;
    for (int64_t lane = 0; lane < geo_.lanes; ++lane) {
      const int64_t ch = geo_.channel(c, lane), plane = b * geo_.C + ch;
      const ChannelRole role = channel_role(ch, M);
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
    for (int q = 0; q < Q; ++q) {
      const int64_t pos = Base::spatial_lanes(q);
      gate_[q] = spatial_gate(lanes(kWeight, pos), lanes(kBias, pos), lanes(kNormWeight, pos),
                              lanes(kNormBias, pos), st_[q]);
    }
  }

  void z(const RoleSplit* x, int h, FloatVec* z) const {
    for (int s = 0; s < S; ++s) z[s] = gate_[h * S + s].z(x[s].spatial);
  }

  void finish(int64_t b, int64_t c, const double (*sums)[kMaxLanes], const KeptTerms&) {
    const ParamArrays<float>& w = t_.fwd.w;
    for (int64_t lane = 0; lane < geo_.lanes; ++lane) {
      const int64_t ch = geo_.channel(c, lane);
      const ChannelRole role = channel_role(ch, M);
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
  void spatial_grad(const FloatVec* gated, const FloatVec* t, const FloatVec* xh, int h,
                    FloatVec* dx) const {
    for (int s = 0; s < S; ++s)
      dx[s] = spatial_input_grad_gated(gated[s], t[s], xh[s], coeffs_[h * S + s]);
  }

 private:
  SpatialGate<FloatVec> gate_[Q];
};

// ShuffleAttention: per branch, u = x sigmoid(W1 mu + b1) (channel) or x sigmoid(W2 y + b2) with
// the GroupNorm output y (spatial). A half's spatial lanes hold whole branches in channel order,
// in runs of r = min(M, L) lanes (nhwc_columns.h, BranchMixer): the m x m products of the gate go
// by lane rotations, z = W2 y + b2 and dy = W2^T t. A[j, k] = sum_p t_j xh_k is taken
//   - for M < L (several branches to a vector) in pass 1, by rotations: on slice s the sum of
//     t * rot_d(xh) of slice s + delta (mod S) is A[j, k] with j = s r + l mod r,
//     k = ((s + delta) mod S) r + (l mod r + d) mod r: sum 2 + delta r + d;
//   - for M >= L (a half's spatial lanes are one branch, kWholeBranch) after pass 1, as the
//     product of the kept t and xh (product_sums): pass 1 then keeps 2 sums a lane instead of
//     2 + M. At M = 16 the rotations' 72 accumulator vectors did not fit in the registers, and
//     the M^2 sums had to be gathered from their diagonals: the kernel took 1.74 million
//     instructions a call at stage 4 (batch 1) against 1.48 now; with reduce_param_grads in
//     float64 lanes, the raw backward took 1.47 ms against 1.18 at batch 8 (fp32; bf16 1.37
//     against 0.95; medians of 5 alternating runs). At M = 8 both ways execute about the same.
template <int M, typename scalar_t>
class ShuffleAttentionColumn : public ColumnBase<M, scalar_t> {
  using Base = ColumnBase<M, scalar_t>;
  using Base::coeffs_, Base::geo_, Base::st_, Base::t_, Base::S, Base::Q;
  static constexpr int kRun = M < L ? M : L;
  static constexpr bool kWholeBranch = M >= L;
  // Rows of A in registers at a time in product_sums: kRowsA S accumulators.
  static constexpr int kRowsA = 8 / S;
  static_assert(!kWholeBranch || (L % kRowsA == 0 && M % kRowsA == 0));

 public:
  using Base::field, Base::lanes;
  // sum(gu x); T1 = sum t; for M < L the M sums of A's rows.
  static constexpr int kSums = kWholeBranch ? 2 : 2 + M;

  ShuffleAttentionColumn(const BackwardTensors<scalar_t>& t, const ColumnGeometry& geo,
                         const BranchMixer& channel_mixer, const BranchMixer& gate_mixer,
                         const BranchMixer& grad_mixer)
      : Base(t, geo),
        channel_mixer_(channel_mixer),
        gate_mixer_(gate_mixer),
        grad_mixer_(grad_mixer) {}

  void begin(int64_t b, int64_t c) {
    const ParamArrays<float>& w = t_.fwd.w;
    for (int64_t lane = 0; lane < geo_.lanes; ++lane) {
      const int64_t ch = geo_.channel(c, lane), plane = b * geo_.C + ch;
      const ChannelRole role = channel_role(ch, M);
      const int64_t k = role.k;
      field[kMean][lane] = t_.fwd.mean[plane];  // on the channel lanes for their gate
      if (!role.spatial) continue;
      const float values[] = {t_.fwd.rstd[plane], w.gw[k], w.gb[k]};
      for (int v = 0; v < 3; ++v) field[kRstd + v][lane] = values[v];
    }
    // sigmoid(W1 mu + b1) over the branches' means, on the channel lanes (as the forward).
    for (int h = 0; h < 2; ++h) {
      FloatVec gate[S];
      channel_gates<M>(channel_mixer_, field[kMean], h, gate);
      for (int s = 0; s < S; ++s) gate[s].store(field[kGate] + Base::channel_lanes(h * S + s));
    }
    Base::load_stats();
    for (int q = 0; q < Q; ++q) {
      const int64_t pos = Base::spatial_lanes(q);
      norm_scale_[q] = lanes(kNormWeight, pos) * st_[q].gate_rstd;
      norm_shift_[q] = lanes(kNormBias, pos);
    }
  }

  // z = W2 y + b2, y = gw r (x - mu) + gb as the NCHW kernel forms it.
  void z(const RoleSplit* x, int h, FloatVec* z) const {
    FloatVec y[S];
    for (int s = 0; s < S; ++s) {
      const int q = h * S + s;
      y[s] = norm_scale_[q] * st_[q].centered(x[s].spatial) + norm_shift_[q];
    }
    gate_mixer_.mix<M>(y, z);
  }

  // T1, and for M < L A's diagonal (delta = d = 0) as SALayer's sums, then the rotations: each
  // rotation of a slice's xh serves every slice's t.
  void accumulate(const FloatVec* t, const FloatVec* xh, int h, FloatVec (*acc)[Q]) const {
    if constexpr (kWholeBranch) {
      Base::template accumulate<true>(t, xh, h, acc);
    } else {
      Base::accumulate(t, xh, h, acc);
      for (int s2 = 0; s2 < S; ++s2) {
        for_each_rotation<kRun>(xh[s2], [&](auto d, const FloatVec& rotated) {
          for (int s = 0; s < S; ++s) {
            const int delta = (s2 - s + S) % S;
            if (delta == 0 && d() == 0) continue;  // the diagonal, above
            FloatVec& a = acc[2 + delta * kRun + d()][h * S + s];
            a = a + t[s] * rotated;
          }
        });
      }
    }
  }

  void finish(int64_t b, int64_t c, const double (*sums)[kMaxLanes], const KeptTerms& kept) {
    const ParamArrays<float>& w = t_.fwd.w;
    // The lanes of a half's branches: L S / M of them, channel j of branch n at channel lane
    // 2 L (h S + j / L) + n M + j mod L (the spatial lane: L further).
    for (int h = 0; h < 2; ++h) {
      if constexpr (kWholeBranch) product_sums(kept, h);
      for (int n = 0; n < L * S / M; ++n) {
        int64_t lane[M];
        for (int j = 0; j < M; ++j) lane[j] = 2 * L * (h * S + j / L) + n * M + j % L;
        const int64_t slot0 = geo_.slot0(b, geo_.channel(c, lane[0]));
        // Channel branch: dz_j = sum(gu_j x_j) s_j (1 - s_j), beta_j = (W1^T dz)_j / N.
        float dz[M];
        for (int j = 0; j < M; ++j) {
          dz[j] = static_cast<float>(sums[0][lane[j]]) * sigmoid_grad(field[kGate][lane[j]]);
          t_.gate_grad[slot0 + j] = dz[j];
        }
        for (int j = 0; j < M; ++j) {
          field[kBeta][lane[j]] =
              channel_grad_coeffs(matvec_t_row(w.cw, dz, M, j), geo_.inv_n).beta;
        }
        // Spatial branch: T1 and A (the slot's partials), then dx's coefficients.
        float T1[M];
        float* A = t_.t_xh + slot0 * M;
        for (int j = 0; j < M; ++j) {
          T1[j] = static_cast<float>(sums[1][lane[j] + L]);
          t_.t_sum[slot0 + j] = T1[j];
        }
        if constexpr (kWholeBranch) {
          for (int jk = 0; jk < M * M; ++jk) A[jk] = static_cast<float>(a_sums_[jk]);
        } else {
          for (int j = 0; j < M; ++j) {
            const int s = j / kRun, l = j % kRun;
            for (int delta = 0; delta < S; ++delta) {
              for (int d = 0; d < kRun; ++d) {
                const int k = (s + delta) % S * kRun + (l + d) % kRun;
                A[j * M + k] = static_cast<float>(sums[2 + delta * kRun + d][lane[j] + L]);
              }
            }
          }
        }
        for (int i = 0; i < M; ++i) {
          const int64_t pos = lane[i] + L;
          const InputGradCoeffs<float> coeffs = shuffle_attention_spatial_coeffs(
              w.sw, T1, A, M, i, w.gw[i] * field[kRstd][pos], geo_.inv_n);
          field[kAlpha][pos] = coeffs.alpha;
          field[kD1][pos] = coeffs.d1;
          field[kD2][pos] = coeffs.d2;
        }
      }
    }
    Base::load_coeffs();
  }

  // dy = W2^T t over the half's slices.
  void spatial_grad(const FloatVec* gated, const FloatVec* t, const FloatVec* xh, int h,
                    FloatVec* dx) const {
    FloatVec dy[S];
    grad_mixer_.mix<M>(t, dy);
    for (int s = 0; s < S; ++s)
      dx[s] = spatial_input_grad_gated(gated[s], dy[s], xh[s], coeffs_[h * S + s]);
  }

 private:
  // a_sums_[j M + k] = A[j, k] of half h's branch (kWholeBranch), from the kept t and xh: row j of
  // A is S vectors along k, kRowsA rows of it in registers at a time (t_j broadcast from the kept
  // row), summed in float over blocks of kBlockRows rows and added in double, as pass 1's sums.
  void product_sums(const KeptTerms& kept, int h) {
    const int64_t N = geo_.N;
    for (int64_t p0 = 0; p0 < N; p0 += kBlockRows) {
      const int64_t p1 = std::min(N, p0 + kBlockRows);
      for (int j0 = 0; j0 < M; j0 += kRowsA) {
        FloatVec acc[kRowsA][S];
        for (auto& row : acc) {
          for (auto& a : row) a = FloatVec(0);
        }
        for (int64_t p = p0; p < p1; ++p) {
          FloatVec xh[S];
          for (int s = 0; s < S; ++s) xh[s] = kept.term(p, h * S + s, kKeptXh);
          const float* t = kept.at(p, h * S + j0 / L, kKeptT) + j0 % L;
          for (int j = 0; j < kRowsA; ++j) {
            const FloatVec t_j(t[j]);
            for (int s = 0; s < S; ++s) acc[j][s] = acc[j][s] + t_j * xh[s];
          }
        }
        for (int j = 0; j < kRowsA; ++j) {
          for (int s = 0; s < S; ++s) add_wide(a_sums_ + (j0 + j) * M + s * L, acc[j][s], p0 == 0);
        }
      }
    }
  }

  const BranchMixer& channel_mixer_;
  const BranchMixer& gate_mixer_;
  const BranchMixer& grad_mixer_;
  FloatVec norm_scale_[Q], norm_shift_[Q];
  double a_sums_[kWholeBranch ? M * M : 1];
};

}  // namespace

template <typename scalar_t>
void backward_columns(Variant variant, const BackwardParams& p) {
  const BackwardTensors<scalar_t> t(p, variant);
  const ColumnGeometry geo(p.fwd);
  const ParamArrays<float>& w = t.fwd.w;
  dispatch_m(geo.m, [&](auto M) {
    if (variant == Variant::kSALayer) {
      run_columns<M()>(t, geo, p.fwd.batch, [&] { return SALayerColumn<M(), scalar_t>(t, geo); });
      return;
    }
    const BranchMixer channel_mixer(w.cw, w.cb, M()), gate_mixer(w.sw, w.sb, M()),
        grad_mixer(w.sw, nullptr, M(), true);
    run_columns<M()>(t, geo, p.fwd.batch, [&] {
      return ShuffleAttentionColumn<M(), scalar_t>(t, geo, channel_mixer, gate_mixer, grad_mixer);
    });
  });
}

template void backward_columns<float>(Variant, const BackwardParams&);
template void backward_columns<c10::BFloat16>(Variant, const BackwardParams&);
template void backward_columns<c10::Half>(Variant, const BackwardParams&);

}  // namespace sa_cuda::cpu
