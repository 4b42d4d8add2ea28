// The SALayer backward on channels_last rows (nhwc_rows.h), float lanes, for m = 1, 2, 4 (pairs of
// vectors split by role, as the rows forward does) and C / 2 a multiple of 2L. Bytes moved: x and
// grad_out are read from memory once (pass 1; pass 2 re-reads them from the L2 cache), grad_x is
// written once; the spatial lanes' gate is written and read back once, in cache.
//
// The work unit is a column: 2L channels of each half of one batch item, [c, c + 2L) and
// [C/2 + c, C/2 + c + 2L), whose grad_out is the 4L output channels from 2c (interleaved), over
// all N pixels: 4 x 64 bytes a row in float, about 800 KiB at SA-ResNet-50's stage 1, which the
// L2 keeps between the passes. Columns run in parallel; within one every sum goes in a fixed
// order (block after block), so the results do not depend on the thread count.
//   pass 1  by blocks of kBlockRows rows: sum(gu x) on channel lanes, T1 = sum t and
//           T2 = sum t xh on spatial lanes (t = gu x s (1 - s)), in registers over the block,
//           then added to the column's sums in double; the gate s is kept for pass 2;
//   finish  per channel: the partials of the parameter gradients and dx's coefficients;
//   pass 2  dx row by row from the kept gate.
// The per-element formulas are the NCHW kernel's (sa_math.h); only the order of the sums differs.
#include <ATen/OpMathType.h>

#include <memory>
#include <vector>

#include "../sa_math.h"
#include "kernels_cpu.h"
#include "nhwc_rows.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {
namespace {

using VecD = at::vec::Vectorized<double>;
constexpr int64_t L = FloatVec::size();
constexpr int64_t kBlockRows = 16;

// Lane fields of a SALayer channel: the channel branch's gate and beta, the spatial branch's saved
// statistics and parameters, and dx's coefficients (InputGradCoeffs). Those up to kBias are
// known before pass 1, the rest after it.
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

// Pass 1's sums per lane: sum(gu x) on channel lanes, T1 and T2 on spatial lanes.
enum Sum { kSumGuX, kSumT, kSumTXh, kSums };

// The spatial branch's statistics and gate of a vector of spatial lanes.
struct SpatialLanes {
  Standardizer<FloatVec> st;
  SpatialGate<FloatVec> gate;
};

inline SpatialLanes spatial_lanes(float* const* f, int64_t pos) {
  const Standardizer<FloatVec> st =
      saved_stats(FloatVec::loadu(f[kMean] + pos), FloatVec::loadu(f[kRstd] + pos));
  return {st, spatial_gate(FloatVec::loadu(f[kWeight] + pos), FloatVec::loadu(f[kBias] + pos),
                           FloatVec::loadu(f[kNormWeight] + pos),
                           FloatVec::loadu(f[kNormBias] + pos), st)};
}

// One pixel's values of the column at c: per half, x and grad_out split by role. grad_out's 4L
// output channels from 2c hold the channels c .. c + 2L of both halves, interleaved.
struct ColumnValues {
  RoleSplit x[2], gu[2];
};

template <int M, typename scalar_t>
inline ColumnValues column_values(const scalar_t* x, const scalar_t* gu, int64_t c, int64_t half,
                                  const RowRoles& roles) {
  const auto [g0, g1] = load_pair(gu + 2 * c);
  const auto [g2, g3] = load_pair(gu + 2 * c + 2 * L);
  const auto [first0, second0] = at::vec::deinterleave2(g0, g1);
  const auto [first1, second1] = at::vec::deinterleave2(g2, g3);
  const FloatVec by_half[2][2] = {{first0, first1}, {second0, second1}};
  ColumnValues v;
  for (int h = 0; h < 2; ++h) {
    const auto [x0, x1] = load_pair(x + h * half + c);
    v.x[h] = split_roles<M>(x0, x1, roles.swapped[h]);
    v.gu[h] = split_roles<M>(by_half[h][0], by_half[h][1], roles.swapped[h]);
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

  // Rows [p0, p0 + count) of the column at c; channel_lanes(x, gu, h) gives channel[r][h]. The
  // gate: saved[(p * 2 + h) * L ...] of pixel p when kSaved, else sigmoid(z) (stored there).
  template <int M, bool kSaved, typename scalar_t, typename ChannelResult>
  void load(const scalar_t* x_rows, const scalar_t* gu_rows, int64_t C, int64_t half, int64_t c,
            int64_t p0, int64_t count, const RowRoles& roles, const SpatialLanes* lanes,
            float* saved, const ChannelResult& channel_lanes) {
    rows = count;
    for (int64_t r = 0; r < rows; ++r) {
      const ColumnValues v =
          column_values<M>(x_rows + (p0 + r) * C, gu_rows + (p0 + r) * C, c, half, roles);
      for (int h = 0; h < 2; ++h) {
        channel[r][h] = channel_lanes(v.x[h].channel, v.gu[h].channel, h);
        x[r][h] = v.x[h].spatial;
        gu[r][h] = v.gu[h].spatial;
        if constexpr (kSaved) {
          gate[r][h] = FloatVec::loadu(saved + ((p0 + r) * 2 + h) * L);
        } else {
          gate[r][h] = sigmoid_exp_arg(lanes[h].gate.z(v.x[h].spatial));
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

  // t = dL/dz and xh of row r, half h, as the NCHW kernel forms them.
  struct SpatialTerms {
    FloatVec t, xh;
  };
  SpatialTerms spatial(const SpatialLanes& lanes, int64_t r, int h) const {
    return {gate_input_grad(gu[r][h], x[r][h], gate[r][h]), lanes.st.normalized(x[r][h])};
  }
};

// sums[0 .. L) += v, in double.
inline void add_wide(double* sums, const FloatVec& v) {
  alignas(64) float lanes[L];
  v.store(lanes);
  for (int64_t l = 0; l < L; l += VecD::size()) {
    (VecD::loadu(sums + l) + load_wide(lanes + l)).store(sums + l);
  }
}

}  // namespace

template <typename scalar_t>
void backward_sa_layer_rows(const BackwardParams& p) {
  const BackwardTensors<scalar_t> t(p, Variant::kSALayer);
  const ForwardParams& f = p.fwd;
  const int64_t C = f.channels, half = C / 2, N = f.plane_size, m = f.branch_channels;
  const RowRoles roles(C, m);
  TORCH_CHECK(roles.split_end == half, "backward_sa_layer_rows: m must divide ", L / 2,
              " and C / 2 be a multiple of ", 2 * L);
  const std::vector<int64_t> lane_channel = roles.packed_channels();
  const ParamArrays<float>& w = t.fwd.w;
  const bool streaming = stream_results(f.batch * N * C * int64_t{sizeof(scalar_t)});
  const int64_t columns = half / (2 * L);
  constexpr int64_t W = 4 * L;  // lanes of a column: 2L of each half
  const float inv_n = 1.0f / static_cast<float>(N);

  dispatch_m(m, [&](auto M) {
    at::parallel_for(0, f.batch * columns, 1, [&](int64_t begin, int64_t end) {
      // The spatial lanes' gate, pass 1 to pass 2 (written before it is read: no initial values).
      const std::unique_ptr<float[]> saved_gate(new float[N * 2 * L]);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / columns, c = task % columns * 2 * L;
        // The column's lanes: position h * 2L + l is row position h * half + c + l.
        alignas(64) float field_data[kFields][W] = {};
        float* field[kFields];
        for (int k = 0; k < kFields; ++k) field[k] = field_data[k];
        auto channel_at = [&](int64_t lane) {
          return lane_channel[lane / (2 * L) * half + c + lane % (2 * L)];
        };
        for (int64_t lane = 0; lane < W; ++lane) {
          const int64_t ch = channel_at(lane), plane = b * C + ch;
          const ChannelRole role = channel_role(ch, m);
          const int64_t k = role.k;
          if (!role.spatial) {
            field[kGate][lane] = sigmoid(w.cw[k] * t.fwd.mean[plane] + w.cb[k]);
            continue;
          }
          const float values[] = {t.fwd.mean[plane], t.fwd.rstd[plane], w.gw[k],
                                  w.gb[k],           w.sw[k],           w.sb[k]};
          for (int v = 0; v < 6; ++v) field[kMean + v][lane] = values[v];
        }
        const scalar_t* x = t.fwd.x + b * N * C;
        const scalar_t* gu = t.grad_out + b * N * C;
        scalar_t* dx = t.grad_x + b * N * C;

        // Channel lanes at h 2L, spatial lanes at h 2L + L.
        const SpatialLanes lanes[2] = {spatial_lanes(field, L), spatial_lanes(field, 3 * L)};

        // Pass 1.
        alignas(64) double sums[kSums][W] = {};
        {
          ColumnBlock block;
          for (int64_t p0 = 0; p0 < N; p0 += kBlockRows) {
            FloatVec dot[2] = {FloatVec(0), FloatVec(0)}, t1[2] = {FloatVec(0), FloatVec(0)},
                     t2[2] = {FloatVec(0), FloatVec(0)};
            block.load<M(), false>(x, gu, C, half, c, p0, std::min(kBlockRows, N - p0), roles,
                                   lanes, saved_gate.get(),
                                   [&](const FloatVec& xv, const FloatVec& gv, int h) {
                                     dot[h] = dot[h] + gv * xv;
                                     return FloatVec(0);
                                   });
            for (int64_t r = 0; r < block.rows; ++r) {
              for (int h = 0; h < 2; ++h) {
                const auto s = block.spatial(lanes[h], r, h);
                t1[h] = t1[h] + s.t;
                t2[h] = t2[h] + s.t * s.xh;
              }
            }
            for (int h = 0; h < 2; ++h) {
              add_wide(sums[kSumGuX] + 2 * h * L, dot[h]);
              add_wide(sums[kSumT] + 2 * h * L + L, t1[h]);
              add_wide(sums[kSumTXh] + 2 * h * L + L, t2[h]);
            }
          }
        }
        // The partials and dx's coefficients.
        for (int64_t lane = 0; lane < W; ++lane) {
          const int64_t ch = channel_at(lane);
          const ChannelRole role = channel_role(ch, m);
          const int64_t k = role.k, slot = (b * f.groups + role.group) * m + k;
          if (!role.spatial) {
            const float dz =
                static_cast<float>(sums[kSumGuX][lane]) * sigmoid_grad(field[kGate][lane]);
            t.gate_grad[slot] = dz;
            field[kBeta][lane] = channel_grad_coeffs(w.cw[k] * dz, inv_n).beta;
            continue;
          }
          const float T1 = static_cast<float>(sums[kSumT][lane]);
          const float T2 = static_cast<float>(sums[kSumTXh][lane]);
          t.t_sum[slot] = T1;
          t.t_xh[slot] = T2;
          const InputGradCoeffs<float> coeffs =
              spatial_grad_coeffs(w.gw[k] * field[kRstd][lane] * w.sw[k], T1, T2, inv_n);
          field[kAlpha][lane] = coeffs.alpha;
          field[kD1][lane] = coeffs.d1;
          field[kD2][lane] = coeffs.d2;
        }
        // Pass 2.
        FloatVec gate[2], beta[2];
        InputGradCoeffs<FloatVec> coeffs[2];
        for (int h = 0; h < 2; ++h) {
          const int64_t ch = 2 * h * L, sp = ch + L;
          gate[h] = FloatVec::loadu(field[kGate] + ch);
          beta[h] = FloatVec::loadu(field[kBeta] + ch);
          coeffs[h] = {FloatVec::loadu(field[kAlpha] + sp), FloatVec(0),
                       FloatVec::loadu(field[kD1] + sp), FloatVec::loadu(field[kD2] + sp)};
        }
        ColumnBlock block;
        for (int64_t p0 = 0; p0 < N; p0 += kBlockRows) {
          block.load<M(), true>(x, gu, C, half, c, p0, std::min(kBlockRows, N - p0), roles, lanes,
                                saved_gate.get(),
                                [&](const FloatVec& xv, const FloatVec& gv, int h) {
                                  return channel_input_grad(gv, gate[h], beta[h]);
                                });
          for (int64_t r = 0; r < block.rows; ++r) {
            for (int h = 0; h < 2; ++h) {
              const auto s = block.spatial(lanes[h], r, h);
              const RoleSplit grads{
                  block.channel[r][h],
                  spatial_input_grad(block.gu[r][h], block.gate[r][h], s.t, s.xh, coeffs[h])};
              const auto [lo, hi] = merge_roles<M()>(grads, roles.swapped[h]);
              store_pair(dx + (p0 + r) * C + h * half + c, lo, hi, streaming);
            }
          }
        }
      }
      stream_fence();
    });
  });
}

template void backward_sa_layer_rows<float>(const BackwardParams&);
template void backward_sa_layer_rows<c10::BFloat16>(const BackwardParams&);
template void backward_sa_layer_rows<c10::Half>(const BackwardParams&);

}  // namespace sa_cuda::cpu
