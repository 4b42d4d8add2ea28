// The forward of both variants on channels_last rows (nhwc_rows.h), float lanes. Bytes moved: x is
// read from memory once (pass 1; pass 2 re-reads the wave from cache), out is written once, each
// row at its shuffled channels; mean and rstd add 2 floats per channel.
#include <ATen/OpMathType.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "../sa_math.h"
#include "kernels_cpu.h"
#include "nhwc_rows.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {
namespace {

using VecD = at::vec::Vectorized<double>;

// The mean and the variance, in double, of N values from their shifted sums s1 = sum (x - shift)
// and s2 = sum (x - shift)^2 in double, shift = sum_shift(x_0): for float x each term is rounded
// at most once (exact unless x and the shift lie more than 2^29 apart in magnitude) and nothing
// overflows, and the variance S2 / n - (S1 / n)^2 cancels at most a factor n:
// (x_0 - mu)^2 <= n var.
inline std::pair<double, double> shifted_moments(double s1, double s2, double shift, int64_t N) {
  const double dm = s1 / static_cast<double>(N);
  return {shift + dm, s2 / static_cast<double>(N) - dm * dm};
}

// Pass 1 of one chunk: sums[c] = sum_p (x[p, c] - shift[c]) and sums[C + c] of the squares, in
// double, shift[c] the item's first value (shifted_moments says why).
template <typename scalar_t>
void chunk_moments(const scalar_t* item, int64_t C, const RowChunks::Chunk& chunk,
                   const double* shift, double* sums, float* row_scratch) {
  double* s1 = sums;
  double* s2 = sums + C;
  std::fill(sums, sums + 2 * C, 0.0);
  constexpr int64_t L = VecD::size();
  for (int64_t p = chunk.begin; p < chunk.end; ++p) {
    const float* x = as_acc(item + p * C, C, row_scratch);
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const VecD d = load_wide(x + c) - VecD::loadu(shift + c);
      (VecD::loadu(s1 + c) + d).store(s1 + c);
      at::vec::fmadd(d, d, VecD::loadu(s2 + c)).store(s2 + c);
    }
    for (; c < C; ++c) {
      const double d = static_cast<double>(x[c]) - shift[c];
      s1[c] += d;
      s2[c] = std::fma(d, d, s2[c]);
    }
  }
}

// The rows forward of either variant: pass 1 and the statistics of every channel (stored to mean
// and rstd), set_lanes(fields, stats, c) for every channel of an item (in parallel; stats: the
// item's C Standardizers), the lanes packed by role, then pass 2: gate_row(fields, x, y, scratch)
// turns each row x (C floats) into its output row y, which is stored at out's row.
//   kFields: lane fields per channel; kRowScratch: floats of scratch per gate_row call, in units of
//   C.
template <int kFields, int kRowScratch, typename scalar_t, typename SetLanes, typename GateRow>
void forward_rows(const ForwardParams& p, const ForwardTensors<scalar_t>& t, const RowRoles& roles,
                  const SetLanes& set_lanes, const GateRow& gate_row) {
  const int64_t C = p.channels, N = p.plane_size, m = p.branch_channels;
  const RowChunks rows(p, sizeof(scalar_t));
  const float eps = static_cast<float>(p.eps);
  auto item_x = [&](int64_t item) { return t.x + item * N * C; };

  // A wave: the sum shifts (each item's first row), the chunks' sums, the statistics, then the
  // gate lanes.
  struct Wave {
    int64_t first, items;
    std::vector<double> shift, sums;
    std::vector<Standardizer<float>> stats;
    ChannelLanes<kFields> lanes;
  };
  auto make_wave = [&](int64_t first, int64_t items) {
    Wave w{first,
           items,
           std::vector<double>(items * C),
           std::vector<double>(items * rows.per_item * 2 * C),
           std::vector<Standardizer<float>>(items * C),
           ChannelLanes<kFields>(items, C)};
    for (int64_t i = 0; i < items; ++i) {
      for (int64_t c = 0; c < C; ++c)
        w.shift[i * C + c] = sum_shift(static_cast<float>(item_x(first + i)[c]));
    }
    return w;
  };
  auto pass1 = [&](Wave& w, const RowChunks::Chunk& chunk, float* scratch) {
    const int64_t i = chunk.item - w.first;
    chunk_moments(item_x(chunk.item), C, chunk, w.shift.data() + i * C,
                  w.sums.data() + (i * rows.per_item + chunk.index) * 2 * C, scratch);
  };
  auto finish = [&](Wave& w) {
    std::vector<double> totals(w.items * 2 * C);
    chunk_totals(w.sums.data(), w.items, rows.per_item, 2 * C, totals.data());
    for_each_channel(w.items, C, [&](int64_t i, int64_t c) {
      const double* total = totals.data() + i * 2 * C;
      const auto [mean_d, var_d] = shifted_moments(total[c], total[C + c], w.shift[i * C + c], N);
      const Standardizer<float> st = moment_stats(item_x(w.first + i), C, N, mean_d, var_d, c, eps,
                                                  channel_role(c, m).spatial);
      t.mean[(w.first + i) * C + c] = st.mean;
      t.rstd[(w.first + i) * C + c] = st.rstd;
      w.stats[i * C + c] = st;
    });
    for_each_channel(w.items, C, [&](int64_t i, int64_t c) {
      set_lanes(w.lanes.fields(i).data(), w.stats.data() + i * C, c);
    });
    for (int64_t i = 0; i < w.items; ++i) {
      for (float* field : w.lanes.fields(i)) roles.pack(field);
    }
  };
  const bool streaming = stream_results(p.batch * N * C * int64_t{sizeof(scalar_t)});
  auto pass2 = [&](Wave& w, const RowChunks::Chunk& chunk, float* scratch) {
    const auto field = w.lanes.fields(chunk.item - w.first);
    for (int64_t px = chunk.begin; px < chunk.end; ++px) {
      const float* x = as_acc(item_x(chunk.item) + px * C, C, scratch);
      float* y = scratch + C;
      gate_row(field.data(), x, y, scratch + 2 * C);
      const int64_t row = (chunk.item * N + px) * C;
      write_output(y, t.identity == nullptr ? nullptr : t.identity + row, t.out + row, C,
                   streaming);
    }
  };
  run_waves(rows, (2 + kRowScratch) * C, make_wave, pass1, finish, pass2);
}

}  // namespace

template <typename scalar_t>
void forward_sa_layer_rows(const ForwardParams& p) {
  const ForwardTensors<scalar_t> t(p, Variant::kSALayer);
  const int64_t C = p.channels, half = C / 2, m = p.branch_channels;
  const RowRoles roles(C, m);
  auto set_lanes = [&](float* const* field, const Standardizer<float>* stats, int64_t c) {
    set_sa_layer_lanes(field, c, c, m, stats[c], t.w);
  };
  // y holds y(c) at 2c and y(C/2 + c) at 2c + 1.
  auto gate_row = [&](float* const* field, const float* x, float* y, float*) {
    // The two gates on x's lanes xv of the channels from c (in the lanes' order).
    auto channel_y = [&](const auto& xv, int64_t c) {
      using V = std::decay_t<decltype(xv)>;
      return xv * load<V>(field[kConstantGate] + c);
    };
    auto spatial_y = [&](const auto& xv, int64_t c) {
      using V = std::decay_t<decltype(xv)>;
      return xv * sigmoid(spatial_gate_at<V>(field, c).z(xv));
    };
    constexpr int64_t L = FloatVec::size();
    for_each_row_block(
        roles,
        [&](int64_t c) {  // 2L channels of each half: 4L output channels from 2c
          FloatVec half_y[2][2];
          for (int h = 0; h < 2; ++h) {
            const int64_t ch = h * half + c;
            const RoleSplit xs = split_roles(FloatVec::loadu(x + ch), FloatVec::loadu(x + ch + L),
                                             m, roles.swapped[h]);
            const RoleSplit ys{channel_y(xs.channel, ch), spatial_y(xs.spatial, ch + L)};
            std::tie(half_y[h][0], half_y[h][1]) = merge_roles(ys, m, roles.swapped[h]);
          }
          for (int v = 0; v < 2; ++v) {
            const auto [lo, hi] = at::vec::interleave2(half_y[0][v], half_y[1][v]);
            lo.store(y + 2 * (c + v * L));
            hi.store(y + 2 * (c + v * L) + L);
          }
        },
        [&](int64_t c, auto tag) {
          using V = decltype(tag);
          auto gated = [&](int64_t ch) {
            const V xv = load<V>(x + ch);
            return by_role<V>(
                roles, ch, [&] { return channel_y(xv, ch); }, [&] { return spatial_y(xv, ch); });
          };
          const V a = gated(c), b = gated(half + c);
          if constexpr (is_vec<V>::value) {
            const auto [lo, hi] = at::vec::interleave2(a, b);
            lo.store(y + 2 * c);
            hi.store(y + 2 * c + L);
          } else {
            y[2 * c] = a;
            y[2 * c + 1] = b;
          }
        });
  };
  forward_rows<kSALayerFields, 0>(p, t, roles, set_lanes, gate_row);
}

// ShuffleAttention goes by rows where m divides L / 2 (forward_by_rows in forward_cpu.cpp): pairs
// of vectors are split by role, and a vector of spatial lanes holds whole branches.
template <typename scalar_t>
void forward_shuffle_attention_rows(const ForwardParams& p) {
  const ForwardTensors<scalar_t> t(p, Variant::kShuffleAttention);
  const int64_t C = p.channels, half = C / 2, m = p.branch_channels;
  constexpr int64_t L = FloatVec::size();
  constexpr int64_t kMaxM = L / 2;
  TORCH_CHECK(kMaxM % m == 0, "forward_shuffle_attention_rows: m must divide ", kMaxM);
  const RowRoles roles(C, m);
  const BranchMixer mixer(t.w.sw, t.w.sb, m);
  auto set_lanes = [&](float* const* field, const Standardizer<float>* stats, int64_t c) {
    const int64_t first = c - channel_role(c, m).k;  // of the channel's branch
    set_shuffle_attention_lanes(
        field, c, c, m, stats[c], [&](int64_t i) { return stats[first + i].mean; }, t.w);
  };
  // The results to res in x's channel order, one half at a time, then interleaved into y
  // (channel_shuffle: c and C/2 + c to 2c and 2c + 1). Both halves at once, as SALayer's rows
  // do, measured about 10% slower at stage 2 (fp32 and bf16): twice the live vectors.
  auto gate_row = [&](float* const* field, const float* x, float* y, float* res) {
    for (int h = 0; h < 2; ++h) {
      const int64_t first = h * half;
      // 2L channels from ch, split by role (L lanes each).
      for (int64_t ch = first; ch < first + roles.split_end; ch += 2 * L) {
        const RoleSplit xs =
            split_roles(FloatVec::loadu(x + ch), FloatVec::loadu(x + ch + L), m, roles.swapped[h]);
        const FloatVec yn = group_norm_output_at(field, xs.spatial, ch + L);
        const RoleSplit ys{xs.channel * FloatVec::loadu(field[kChannelGate] + ch),
                           xs.spatial * sigmoid(mixer.mix(yn))};
        const auto [lo, hi] = merge_roles(ys, m, roles.swapped[h]);
        lo.store(res + ch);
        hi.store(res + ch + L);
      }
      // The rest of the half (whole branches) one value at a time.
      for (int64_t ch = first + roles.split_end; ch < first + half; ch += m) {
        if (!channel_role(ch, m).spatial) {
          for (int64_t j = ch; j < ch + m; ++j) res[j] = x[j] * field[kChannelGate][j];
          continue;
        }
        float yn[kMaxM];
        for (int64_t j = 0; j < m; ++j) yn[j] = group_norm_output_at(field, x[ch + j], ch + j);
        for (int64_t j = 0; j < m; ++j)
          res[ch + j] = x[ch + j] * sigmoid(matvec_row(t.w.sw, yn, t.w.sb, m, j));
      }
    }
    int64_t c = 0;
    for (; c + L <= half; c += L) {
      const auto [lo, hi] =
          at::vec::interleave2(FloatVec::loadu(res + c), FloatVec::loadu(res + half + c));
      lo.store(y + 2 * c);
      hi.store(y + 2 * c + L);
    }
    for (; c < half; ++c) {
      y[2 * c] = res[c];
      y[2 * c + 1] = res[half + c];
    }
  };
  forward_rows<kShuffleAttentionFields, 1>(p, t, roles, set_lanes, gate_row);
}

template void forward_sa_layer_rows<float>(const ForwardParams&);
template void forward_sa_layer_rows<c10::BFloat16>(const ForwardParams&);
template void forward_sa_layer_rows<c10::Half>(const ForwardParams&);
template void forward_shuffle_attention_rows<float>(const ForwardParams&);
template void forward_shuffle_attention_rows<c10::BFloat16>(const ForwardParams&);
template void forward_shuffle_attention_rows<c10::Half>(const ForwardParams&);

}  // namespace sa_cuda::cpu
