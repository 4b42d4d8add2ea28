// Fused backward on the CPU. Bytes moved: x and grad_out (at the shuffled channel) are read once
// from memory, grad_x is written once; every other pass re-reads the unit from cache. Parameter
// gradients leave the kernels as per-(batch item, group) partials (sa_params.h), reduced at the
// end by param_grads.h's loop.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../dispatch.h"
#include "../param_grads.h"
#include "../sa_math.h"
#include "kernels_cpu.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {
namespace {

inline int64_t grain_for(int64_t unit_elements) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, unit_elements));
}

template <typename scalar_t>
struct Tensors {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* grad_out;
  scalar_t* grad_x;
  const acc_t* mean;
  const acc_t* rstd;
  const acc_t* cw;
  const acc_t* cb;
  const acc_t* sw;
  const acc_t* sb;
  const acc_t* gw;
  const acc_t* gb;
  acc_t* gate_grad;
  acc_t* t_sum;
  acc_t* t_xh;

  explicit Tensors(const BackwardParams& p)
      : x(static_cast<const scalar_t*>(p.fwd.x)),
        grad_out(static_cast<const scalar_t*>(p.grad_out)),
        grad_x(static_cast<scalar_t*>(p.grad_x)),
        mean(static_cast<const acc_t*>(p.fwd.mean)),
        rstd(static_cast<const acc_t*>(p.fwd.rstd)),
        cw(static_cast<const acc_t*>(p.fwd.channel_weight)),
        cb(static_cast<const acc_t*>(p.fwd.channel_bias)),
        sw(static_cast<const acc_t*>(p.fwd.spatial_weight)),
        sb(static_cast<const acc_t*>(p.fwd.spatial_bias)),
        gw(static_cast<const acc_t*>(p.fwd.gn_weight)),
        gb(static_cast<const acc_t*>(p.fwd.gn_bias)),
        gate_grad(static_cast<acc_t*>(p.gate_grad)),
        t_sum(static_cast<acc_t*>(p.t_sum)),
        t_xh(static_cast<acc_t*>(p.t_xh)) {}
};

// SALayer, one plane per work unit.
template <typename scalar_t>
void backward_sa_layer(const BackwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const Tensors<scalar_t> t(p);
  const int64_t C = p.fwd.channels, m = p.fwd.branch_channels, N = p.fwd.plane_size;
  const int64_t G = p.fwd.groups;
  const acc_t inv_n = acc_t(1) / acc_t(N);

  at::parallel_for(0, p.fwd.batch * C, grain_for(N), [&](int64_t begin, int64_t end) {
    // x, grad_out and grad_x planes in acc_t (when converting); the spatial gate s.
    std::vector<acc_t> scratch((kConvert ? 3 : 0) * N + N);
    acc_t* gate = scratch.data() + (kConvert ? 3 : 0) * N;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, c = plane % C;
      const ChannelRole role = channel_role(c, m);
      const int64_t k = role.k, slot = (b * G + role.group) * m + k;
      const acc_t* x = as_acc(t.x + plane * N, N, scratch.data());
      const acc_t* gu =
          as_acc(t.grad_out + (b * C + shuffle_dst(c, C)) * N, N, scratch.data() + N);
      acc_t* dx = result_buffer(t.grad_x + plane * N, kConvert ? scratch.data() + 2 * N : nullptr);
      const acc_t mu = t.mean[plane], r = t.rstd[plane];

      if (!role.spatial) {
        // u = x * s with s = sigmoid(cw * mu + cb): dz = sum(gu * x) * s(1 - s), dmu = cw * dz.
        const acc_t s = sigmoid(t.cw[k] * mu + t.cb[k]);
        const acc_t dz = dot(gu, x, N) * sigmoid_grad(s);
        t.gate_grad[slot] = dz;
        const acc_t dmu_n = t.cw[k] * dz * inv_n;
        for_each<acc_t>(N, [&](int64_t i, auto tag) {
          using V = decltype(tag);
          store(dx + i, load<V>(gu + i) * V(s) + V(dmu_n));
        });
      } else {
        const Standardizer<acc_t> st = saved_stats(mu, r);
        const SpatialGate<acc_t> ga = spatial_gate(t.sw[k], t.sb[k], t.gw[k], t.gb[k], st);
        auto xh_at = [&](int64_t i, auto tag) {
          using V = decltype(tag);
          return st.normalized(load<V>(x + i));
        };
        auto t_at = [&](int64_t i, auto tag) {
          using V = decltype(tag);
          return gate_input_grad(load<V>(gu + i), load<V>(x + i), load<V>(gate + i));
        };
        // One pass: the gate s (kept for dx), T1 = sum t and T2 = sum t * xh.
        const auto [T1, T2] = sums_over<acc_t, 2>(N, [&](int64_t i, auto tag) {
          using V = decltype(tag);
          const V xh = xh_at(i, tag);
          const V s = sigmoid(ga.z(load<V>(x + i)));
          store(gate + i, s);
          const V t_i = gate_input_grad(load<V>(gu + i), load<V>(x + i), s);
          return std::array<V, 2>{t_i, t_i * xh};
        });
        t.t_sum[slot] = T1;
        t.t_xh[slot] = T2;
        // dy = sw * t is the gradient at the GroupNorm output.
        const acc_t sw = t.sw[k], coef = t.gw[k] * r;
        const acc_t dy_mean = sw * T1 * inv_n, dyxh_mean = sw * T2 * inv_n;
        for_each<acc_t>(N, [&](int64_t i, auto tag) {
          using V = decltype(tag);
          store(dx + i, spatial_dx(load<V>(gu + i), load<V>(gate + i), V(sw) * t_at(i, tag),
                                   xh_at(i, tag), V(coef), V(dy_mean), V(dyxh_mean)));
        });
      }
      finish_store(dx, t.grad_x + plane * N, N);
    }
  });
}

// ShuffleAttention, one branch of one (batch item, group) per work unit.
template <typename scalar_t>
void backward_shuffle_attention(const BackwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const Tensors<scalar_t> t(p);
  const int64_t C = p.fwd.channels, G = p.fwd.groups, m = p.fwd.branch_channels;
  const int64_t N = p.fwd.plane_size, mN = m * N;
  const acc_t inv_n = acc_t(1) / acc_t(N);

  at::parallel_for(0, p.fwd.batch * G * 2, grain_for(mN), [&](int64_t begin, int64_t end) {
    // Scratch planes: x, gu, grad_x in acc_t (when converting); xh = (x - mu) r, GroupNorm
    // output y, gate s, t = dL/dz.
    std::vector<acc_t> scratch((kConvert ? 7 : 4) * mN);
    acc_t* xh = scratch.data();
    acc_t* y = xh + mN;
    acc_t* gate = y + mN;
    acc_t* tz = gate + mN;
    acc_t* x_buf = kConvert ? tz + mN : nullptr;
    acc_t* gu_buf = kConvert ? x_buf + mN : nullptr;
    acc_t* dx_buf = kConvert ? gu_buf + mN : nullptr;
    std::vector<const acc_t*> gu(m);  // grad_out planes of the unit sit at shuffled channels
    std::vector<acc_t> z(m), dz(m), dmu(m), A(m * m), T1(m), D1(m), D2(m);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / (2 * G), g = (unit / 2) % G;
      const bool spatial = unit % 2 == 1;
      const int64_t c0 = g * 2 * m + (spatial ? m : 0);
      const int64_t plane0 = b * C + c0, slot0 = (b * G + g) * m;
      const acc_t* x = as_acc(t.x + plane0 * N, mN, x_buf);
      for (int64_t j = 0; j < m; ++j) {
        gu[j] = as_acc(t.grad_out + (b * C + shuffle_dst(c0 + j, C)) * N, N,
                       kConvert ? gu_buf + j * N : nullptr);
      }
      acc_t* dx = result_buffer(t.grad_x + plane0 * N, dx_buf);
      const acc_t* mu = t.mean + plane0;
      const acc_t* r = t.rstd + plane0;

      if (!spatial) {
        // z = W1 mu + b1; dz_j = sum(gu_j x_j) s_j (1 - s_j); dmu = W1^T dz.
        matvec(t.cw, mu, t.cb, m, z.data());
        for (int64_t j = 0; j < m; ++j) {
          z[j] = sigmoid(z[j]);
          dz[j] = dot(gu[j], x + j * N, N) * sigmoid_grad(z[j]);
          t.gate_grad[slot0 + j] = dz[j];
        }
        matvec_t(t.cw, dz.data(), m, dmu.data());
        for (int64_t j = 0; j < m; ++j) {
          const acc_t s = z[j], dmu_n = dmu[j] * inv_n;
          const acc_t* gj = gu[j];
          acc_t* dxj = dx + j * N;
          for_each<acc_t>(N, [&](int64_t i, auto tag) {
            using V = decltype(tag);
            store(dxj + i, load<V>(gj + i) * V(s) + V(dmu_n));
          });
        }
      } else {
        for (int64_t i = 0; i < m; ++i) {
          const acc_t* xi = x + i * N;
          const Standardizer<acc_t> st = saved_stats(mu[i], r[i]);
          const acc_t scale = t.gw[i] * st.gate_rstd;
          for_each<acc_t>(N, [&](int64_t q, auto tag) {
            using V = decltype(tag);
            const V centered = st.centered(load<V>(xi + q));
            store(xh + i * N + q, centered * V(st.gate_rstd));
            store(y + i * N + q, V(scale) * centered + V(t.gb[i]));
          });
        }
        // Gate s_j(p) = sigmoid(z_j(p)), z(p) = W2 y(p) + b2, and t_j(p) = gu_j x_j s_j (1 - s_j).
        for_each<acc_t>(N, [&](int64_t q, auto tag) {
          using V = decltype(tag);
          for (int64_t j = 0; j < m; ++j) {
            V zj(t.sb[j]);
            for (int64_t i = 0; i < m; ++i) zj = zj + V(t.sw[j * m + i]) * load<V>(y + i * N + q);
            const V s = sigmoid(zj);
            store(gate + j * N + q, s);
            store(tz + j * N + q, gate_input_grad(load<V>(gu[j] + q), load<V>(x + j * N + q), s));
          }
        });
        // A[j, i] = sum_p t_j xh_i (xh first: t_j (x_i - mu_i) would be of order |x|^2 and overflow
        // first), T1[j] = sum_p t_j; the gradient at the GroupNorm output is
        // dy(p) = W2^T t(p), so mean(dy_i) = sum_j W2[j, i] T1[j] / N and
        // mean(dy_i xh_i) = sum_j W2[j, i] A[j, i] / N.
        for (int64_t j = 0; j < m; ++j) {
          T1[j] = sum_over<acc_t>(N, [&](int64_t q, auto tag) { return load<decltype(tag)>(tz + j * N + q); });
          for (int64_t i = 0; i < m; ++i) A[j * m + i] = dot(tz + j * N, xh + i * N, N);
          t.t_sum[slot0 + j] = T1[j];
        }
        std::copy(A.begin(), A.end(), t.t_xh + slot0 * m);
        for (int64_t i = 0; i < m; ++i) {
          acc_t d1 = 0, d2 = 0;
          for (int64_t j = 0; j < m; ++j) {
            d1 += t.sw[j * m + i] * T1[j];
            d2 += t.sw[j * m + i] * A[j * m + i];
          }
          D1[i] = d1 * inv_n;
          D2[i] = d2 * inv_n;
        }
        for_each<acc_t>(N, [&](int64_t q, auto tag) {
          using V = decltype(tag);
          for (int64_t i = 0; i < m; ++i) {
            V dy(0);
            for (int64_t j = 0; j < m; ++j) dy = dy + V(t.sw[j * m + i]) * load<V>(tz + j * N + q);
            store(dx + i * N + q,
                  spatial_dx(load<V>(gu[i] + q), load<V>(gate + i * N + q), dy,
                             load<V>(xh + i * N + q), V(t.gw[i] * r[i]), V(D1[i]), V(D2[i])));
          }
        });
      }
      finish_store(dx, t.grad_x + plane0 * N, mN);
    }
  });
}

// The parameter gradients (param_grads.h). A plain slot sum (no mean factor) is a column total of
// one partial array: the totals are taken once, slot after slot along the rows (the order
// slot_sum takes, so the same bits), and looked up; ShuffleAttention's d_sw, d_sb, d_gw and d_gb share
// the totals of A and T1 instead of re-summing them per entry. Only d_cw's sums of dz * mu are
// taken per entry, in runs of up to 64 consecutive entries so that each slot's row is read along
// the row. The whole reduction reads the partials a few times: tens of microseconds, serial (a
// parallel region would cost more).
template <typename acc_t>
void reduce_param_grads(Variant variant, const BackwardParams& p) {
  constexpr size_t kRun = 64;
  const int64_t slots = p.fwd.batch * p.fwd.groups, m = p.fwd.branch_channels;
  struct ColumnTotals {
    const acc_t* values;
    std::vector<double> total;
  };
  auto column_totals = [&](const void* partials, int64_t width) {
    ColumnTotals c{static_cast<const acc_t*>(partials), std::vector<double>(width, 0.0)};
    for (int64_t slot = 0; slot < slots; ++slot) {
      const acc_t* row = c.values + slot * width;
      for (int64_t w = 0; w < width; ++w) c.total[w] += static_cast<double>(row[w]);
    }
    return c;
  };
  const ColumnTotals columns[] = {
      column_totals(p.gate_grad, m), column_totals(p.t_sum, m),
      column_totals(p.t_xh, variant == Variant::kShuffleAttention ? m * m : m)};
  auto plain_sum = [&](const SlotTerm<acc_t>& term) {
    const ColumnTotals& c = term.values == columns[0].values   ? columns[0]
                            : term.values == columns[1].values ? columns[1]
                                                               : columns[2];
    TORCH_INTERNAL_ASSERT(term.values == c.values && term.mu == nullptr);
    return c.total[term.offset];
  };

  const int64_t entries = param_grad_entries(variant, m);
  std::vector<ParamGradEntry<acc_t>> run;
  std::vector<SlotTerm<acc_t>> mean_terms;
  std::vector<double> mean_sums;
  for (int64_t e = 0; e < entries;) {
    run.clear();
    run.push_back(param_grad_entry<acc_t>(p, variant, e++));
    while (e < entries && run.size() < kRun) {
      const ParamGradEntry<acc_t> next = param_grad_entry<acc_t>(p, variant, e);
      if (next.which != run[0].which) break;
      run.push_back(next);
      ++e;
    }
    if (run[0].term(0).mu == nullptr) {
      for (const auto& entry : run) {
        double total = 0;
        for (int k = 0; k < entry.terms; ++k) total = entry.accumulate(total, k, plain_sum(entry.term(k)));
        entry.store(total);
      }
      continue;
    }
    // d_cw: one term per entry, sum_s dz * mu, the run's entries side by side.
    mean_terms.clear();
    for (const auto& entry : run) mean_terms.push_back(entry.term(0));
    mean_sums.assign(run.size(), 0.0);
    for (int64_t slot = 0; slot < slots; ++slot) {
      for (size_t r = 0; r < run.size(); ++r) mean_sums[r] += mean_terms[r](slot);
    }
    for (size_t r = 0; r < run.size(); ++r) run[r].store(run[r].accumulate(0.0, 0, mean_sums[r]));
  }
}

}  // namespace

// An empty batch (B = 0) runs no kernel unit (empty parallel_for) and gets zero gradients.
void backward(Variant variant, c10::ScalarType dtype, const BackwardParams& params) {
  SA_DISPATCH_FLOATING_TYPES(dtype, "sa_cuda_backward_cpu", [&] {
    if (variant == Variant::kSALayer) {
      backward_sa_layer<scalar_t>(params);
    } else {
      backward_shuffle_attention<scalar_t>(params);
    }
    reduce_param_grads<at::opmath_type<scalar_t>>(variant, params);
  });
}

}  // namespace sa_cuda::cpu
