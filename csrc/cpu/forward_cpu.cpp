// Fused forward on the CPU. Bytes moved: x is read once from memory (the plane or group is then
// re-read from cache for the statistics and the gate) and out is written once, at the shuffled
// channel; mean and rstd add 2 * acc_t per plane.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../dispatch.h"
#include "../sa_math.h"
#include "kernels_cpu.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {
namespace {

constexpr int64_t kTaskElements = int64_t{1} << 15;  // elements per parallel_for task, at least

// SALayer: the work unit is one plane (batch item b, channel c).
template <typename scalar_t>
void forward_sa_layer(const ForwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const ForwardTensors<scalar_t> t(p, Variant::kSALayer);
  const int64_t N = p.plane_size;
  const acc_t eps = static_cast<acc_t>(p.eps);

  at::parallel_for(
      0, p.batch * p.channels, grain_for(N, kTaskElements), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(kConvert ? 2 * N : 0);  // x plane in acc_t, result plane
        for (int64_t plane = begin; plane < end; ++plane) {
          const PlaneUnit unit = plane_unit(p, plane);
          const ChannelRole& role = unit.role;
          const acc_t* x = as_acc(t.x + plane * N, N, scratch.data());
          scalar_t* dst = t.out + unit.out_plane * N;
          acc_t* result = result_buffer(dst, kConvert ? scratch.data() + N : nullptr);

          const Standardizer<acc_t> st = plane_stats(x, N, eps, !role.spatial);
          t.mean[plane] = st.mean;
          t.rstd[plane] = st.rstd;
          if (!role.spatial) {
            const acc_t s = sigmoid(t.w.cw[role.k] * st.mean + t.w.cb[role.k]);
            for_each<acc_t>(N, [&](int64_t i, auto tag) {
              using V = decltype(tag);
              store(result + i, load<V>(x + i) * V(s));
            });
          } else {
            const int64_t k = role.k;
            const SpatialGate<acc_t> g =
                spatial_gate(t.w.sw[k], t.w.sb[k], t.w.gw[k], t.w.gb[k], st);
            for_each<acc_t>(N, [&](int64_t i, auto tag) {
              using V = decltype(tag);
              const V xv = load<V>(x + i);
              store(result + i, xv * sigmoid(g.z(xv)));
            });
          }
          finish_store(result, dst, N);
        }
      });
}

// ShuffleAttention: the work unit is one branch of one (batch item, group): m planes coupled by the
// 1x1 convolution. The m input planes are contiguous; the m output planes are not (shuffle).
template <typename scalar_t>
void forward_shuffle_attention(const ForwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const ForwardTensors<scalar_t> t(p, Variant::kShuffleAttention);
  const int64_t m = p.branch_channels, N = p.plane_size;
  const acc_t eps = static_cast<acc_t>(p.eps);

  at::parallel_for(
      0, p.batch * p.groups * 2, grain_for(m * N, kTaskElements), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(kConvert ? 2 * m * N : 0);  // x planes in acc_t, result planes
        std::vector<acc_t> normed(m * N);  // GroupNorm output of a spatial unit
        std::vector<Standardizer<acc_t>> st(m);
        std::vector<acc_t> mu(m), z(m);
        for (int64_t unit = begin; unit < end; ++unit) {
          const BranchUnit u = branch_unit(p, unit);
          const bool spatial = u.spatial;
          const int64_t plane0 = u.plane0;
          const acc_t* x = as_acc(t.x + plane0 * N, m * N, scratch.data());
          acc_t* result0 = kConvert ? scratch.data() + m * N : nullptr;
          auto dst = [&](int64_t j) { return t.out + (u.out_plane0 + 2 * j) * N; };
          auto result = [&](int64_t j) {
            return result_buffer(dst(j), kConvert ? result0 + j * N : nullptr);
          };

          for (int64_t j = 0; j < m; ++j) {
            st[j] = plane_stats(x + j * N, N, eps, !spatial);
            t.mean[plane0 + j] = mu[j] = st[j].mean;
            t.rstd[plane0 + j] = st[j].rstd;
          }
          if (!spatial) {
            matvec(t.w.cw, mu.data(), t.w.cb, m, z.data());
            for (int64_t j = 0; j < m; ++j) {
              const acc_t s = sigmoid(z[j]);
              const acc_t* xj = x + j * N;
              acc_t* res = result(j);
              for_each<acc_t>(N, [&](int64_t i, auto tag) {
                using V = decltype(tag);
                store(res + i, load<V>(xj + i) * V(s));
              });
            }
          } else {
            // y_k(p) = gw_k r_k (x_k(p) - mu_k) + gb_k, z(p) = W2 y(p) + b2: the reference's math
            // (sa_math.h says why it is not folded), r_k (x_k - mu_k) through the plane's
            // Standardizer.
            acc_t* y = normed.data();
            for (int64_t k = 0; k < m; ++k) {
              const Standardizer<acc_t>& sk = st[k];
              const acc_t scale = t.w.gw[k] * sk.gate_rstd;
              for_each<acc_t>(N, [&](int64_t i, auto tag) {
                using V = decltype(tag);
                store(y + k * N + i, V(scale) * sk.centered(load<V>(x + k * N + i)) + V(t.w.gb[k]));
              });
            }
            for_each<acc_t>(N, [&](int64_t i, auto tag) {
              using V = decltype(tag);
              for (int64_t j = 0; j < m; ++j) {
                V zj(t.w.sb[j]);
                for (int64_t k = 0; k < m; ++k)
                  zj = zj + V(t.w.sw[j * m + k]) * load<V>(y + k * N + i);
                store(result(j) + i, load<V>(x + j * N + i) * sigmoid(zj));
              }
            });
          }
          if constexpr (kConvert) {
            for (int64_t j = 0; j < m; ++j) finish_store(result(j), dst(j), N);
          }
        }
      });
}

}  // namespace

void forward(Variant variant, c10::ScalarType dtype, const ForwardParams& params) {
  SA_DISPATCH_FLOATING_TYPES(dtype, "sa_cuda_forward_cpu", [&] {
    if (variant == Variant::kSALayer) {
      forward_sa_layer<scalar_t>(params);
    } else {
      forward_shuffle_attention<scalar_t>(params);
    }
  });
}

}  // namespace sa_cuda::cpu
