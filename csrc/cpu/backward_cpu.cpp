// Fused backward on the CPU. Bytes moved: x and grad_out (at the shuffled channel) are read once
// from memory, grad_x is written once; every other pass re-reads the unit from cache. With the
// residual epilogue, out is read and grad_identity written once too (BackwardTensors::sa_grad, or
// MaskedGradPlane in the body's first pass).
// channels_last tensors are read and written as they are: in float lanes by columns where m
// divides 8 or is 16 and C / 2 is a multiple of 2 max(8, m) (nhwc_columns.h,
// backward_nhwc_cpu.cpp), otherwise by tiles of channels (nhwc_tiles.h) that run the same unit
// bodies. Parameter gradients leave the kernels as per-(batch item, group) partials (sa_params.h),
// reduced at the end by reduce_param_grads (the math: sa_math.h).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../dispatch.h"
#include "../sa_math.h"
#include "kernels_cpu.h"
#include "nhwc_columns.h"
#include "nhwc_tiles.h"
#include "vec_loops.h"

namespace sa_cuda::cpu {
namespace {

constexpr int64_t kTaskElements = int64_t{1} << 14;  // elements per parallel_for task, at least

// SALayer, one plane: its N values of x and of the gradient of SA(x) (grad, from unit.out_plane:
// GradPlane or MaskedGradPlane, vec_loops.h) in acc_t to its N values of grad_x, stored by Store
// (ResultStore, vec_loops.h: streaming stores where grad_x is the streamed output itself); `gate`
// is N values of scratch. Not inlined: both loops call this one compiled body (forward_cpu.cpp,
// "One compiled body"). kN: the plane size compiled in, or 0 (with_plane_size).
template <int64_t kN, typename Store, typename Grad, typename scalar_t,
          typename acc_t = at::opmath_type<scalar_t>>
C10_NOINLINE void sa_layer_plane_backward(const BackwardTensors<scalar_t>& t,
                                          const ForwardParams& p, const PlaneUnit& unit,
                                          const acc_t* x, const Grad& grad, acc_t* dx,
                                          acc_t* gate) {
  const int64_t N = plane_size<kN>(p);
  const acc_t inv_n = acc_t(1) / acc_t(N);
  const ChannelRole& role = unit.role;
  const int64_t k = role.k, slot = unit.slot(p);
  const acc_t mu = t.fwd.mean[unit.plane], r = t.fwd.rstd[unit.plane];
  const ParamArrays<acc_t>& w = t.fwd.w;
  const Store store;

  if (!role.spatial) {
    // u = x * s with s = sigmoid(cw * mu + cb): dz = sum(gu * x) * s(1 - s), dmu = cw * dz.
    const acc_t s = sigmoid(w.cw[k] * mu + w.cb[k]);
    const acc_t gu_x = sum_over<acc_t>(N, [&](int64_t i, auto tag) {
      using V = decltype(tag);
      return grad.template read<V>(i) * load<V>(x + i);
    });
    const acc_t dz = gu_x * sigmoid_grad(s);
    t.gate_grad[slot] = dz;
    const acc_t beta = channel_grad_coeffs(w.cw[k] * dz, inv_n).beta;
    const acc_t* gu = grad.plane();
    for_each<acc_t>(N, [&](int64_t i, auto tag) {
      using V = decltype(tag);
      const V gu_i = load<V>(gu + i);
      store(dx, nullptr, i, channel_input_grad(gu_i, V(s), V(beta)));
      grad.template write<Store>(i, gu_i);
    });
    return;
  }
  const Standardizer<acc_t> st = saved_stats(mu, r);
  const SpatialGate<acc_t> ga = spatial_gate(w.sw[k], w.sb[k], w.gw[k], w.gb[k], st);
  // One pass: the gate s (kept for dx), T1 = sum t and T2 = sum t * xh.
  const auto [T1, T2] = sums_over<acc_t, 2>(N, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    const V xh = st.normalized(load<V>(x + i));
    const V s = sigmoid(ga.z(load<V>(x + i)));
    cpu::store(gate + i, s);
    const V t_i = gate_input_grad(grad.template read<V>(i), load<V>(x + i), s);
    return std::array<V, 2>{t_i, t_i * xh};
  });
  t.t_sum[slot] = T1;
  t.t_xh[slot] = T2;
  const InputGradCoeffs<acc_t> coeffs = spatial_grad_coeffs(w.gw[k] * r * w.sw[k], T1, T2, inv_n);
  const acc_t* gu = grad.plane();
  for_each<acc_t>(N, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    const V gu_i = load<V>(gu + i), x_i = load<V>(x + i), s = load<V>(gate + i);
    store(dx, nullptr, i,
          spatial_input_grad(gu_i, s, gate_input_grad(gu_i, x_i, s), st.normalized(x_i), coeffs));
    grad.template write<Store>(i, gu_i);
  });
}

// The planes of an NHWC tile for the backward, in acc_t: x and grad_x in input order, grad_out in
// output order (the tile's run of output channels), 2 * width planes each.
template <typename acc_t>
struct TilePlanes {
  std::vector<acc_t> buffer;
  acc_t *x, *gu, *dx;

  TilePlanes(int64_t tile_values, int64_t extra)
      : buffer(3 * tile_values + extra),
        x(buffer.data()),
        gu(x + tile_values),
        dx(gu + tile_values) {}
  acc_t* extra() { return dx + (gu - x); }
};

// Reads a tile's x and grad_out, runs `unit_bodies(tile, planes)`, writes its grad_x.
template <typename scalar_t, typename acc_t, typename Body>
void backward_tile(const BackwardTensors<scalar_t>& t, const ChannelTiling& tiling,
                   const ChannelTile& tile, TilePlanes<acc_t>& planes, const Body& unit_bodies) {
  const int64_t N = tiling.plane_size, C = tiling.channels, item = tile.batch * N * C;
  gather_tile(t.fwd.x + item, tiling, tile, planes.x);
  gather_planes(t.sa_grad(item + 2 * tile.first, 2 * tile.width, N, C), C, N, 2 * tile.width,
                planes.gu, N);
  unit_bodies(tile, planes);
  scatter_planes(planes.dx, N, N, tile.width, t.grad_x + item + tile.first, C);
  scatter_planes(planes.dx + tile.width * N, N, N, tile.width, t.grad_x + item + C / 2 + tile.first,
                 C);
}

// Runs the channels_last backward by columns (nhwc_columns.h, backward_nhwc_cpu.cpp) where it
// applies (float lanes, by_columns); false elsewhere.
template <typename scalar_t>
bool ran_by_columns(Variant variant, const BackwardParams& p) {
  if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
    if (by_columns(p.fwd)) {
      backward_columns<scalar_t>(variant, p);
      return true;
    }
  }
  return false;
}

// Whether SALayer's NCHW residual backward of a float or double plane of n values makes the masked
// gradient in the body's first pass (MaskedGradPlane) rather than in a pass of its own before the
// body (BackwardTensors::sa_grad). On large planes the pass of its own streams grad_out and out
// with nothing to hide them under (the residual backward about 0.92x the time in the body at
// stages 1-2 of SA-ResNet-50, batch 8, 0.95x at 14x14; docs/kernels.md). On 7x7 planes that pass
// is a few cache lines, and in the body the masked read took 73 more instructions a plane
// (callgrind) against 32 saved outside it: about 1.05x the time.
inline bool masks_in_body(int64_t n) { return n >= 128; }

template <typename scalar_t>
void backward_sa_layer(const BackwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const BackwardTensors<scalar_t> t(p, Variant::kSALayer);
  const int64_t N = p.fwd.plane_size, C = p.fwd.channels;

  if (ran_by_columns<scalar_t>(Variant::kSALayer, p)) return;
  if (p.fwd.channels_last) {
    const ChannelTiling tiling(p.fwd, 1);
    const int64_t tile_values = 2 * tiling.width * N;
    with_plane_size(N, [&](auto size) {
      at::parallel_for(
          0, tiling.count(p.fwd.batch), grain_for(tile_values, kTaskElements),
          [&](int64_t begin, int64_t end) {
            TilePlanes<acc_t> planes(tile_values, N);  // + the gate
            for (int64_t index = begin; index < end; ++index) {
              backward_tile(
                  t, tiling, tiling.tile(index), planes,
                  [&](const ChannelTile& tile, TilePlanes<acc_t>& tp) {
                    for (int64_t q = 0; q < 2 * tile.width; ++q) {
                      const PlaneUnit unit =
                          plane_unit(p.fwd, tile.batch * C + tile.channel(q, C / 2));
                      const int64_t out_q = unit.out_plane % C - 2 * tile.first;
                      sa_layer_plane_backward<decltype(size)::value, ResultStore<false, false>>(
                          t, p.fwd, unit, tp.x + q * N, GradPlane<acc_t>{tp.gu + out_q * N},
                          tp.dx + q * N, tp.extra());
                    }
                  });
            }
          });
    });
    return;
  }
  // NCHW: the planes in output order; grad_x (a converted dtype's by write_output) and
  // grad_identity by streaming stores where they are streamed (stream_planes). The residual
  // epilogue's masked gradient: in the body's first pass where the dtype is acc_t and the plane
  // large enough (masks_in_body), else in a pass of its own (sa_grad; converted dtypes as grad_out
  // is read for the conversion).
  const bool residual = t.out != nullptr;
  const bool streaming = stream_planes(p.fwd.batch * C, N * int64_t{sizeof(scalar_t)});
  with_plane_size(N, [&](auto size) {
    constexpr int64_t kN = decltype(size)::value;
    with_streaming_store<scalar_t>(streaming, [&](auto store) {
      using Store = decltype(store);
      // Whether grad_identity may be streamed by the pass of its own (sa_grad_streamed into
      // `masked`): float through Store, at compile time, which keeps the plane loop of cached
      // outputs as short as it was (7x7: 17 instructions a plane more otherwise); converted dtypes
      // at run time.
      constexpr bool kMayStream = Store::kStreams || kConvert;
      at::parallel_for(
          0, p.fwd.batch * C, grain_for(N, kTaskElements), [&](int64_t begin, int64_t end) {
            const int64_t n = plane_size<kN>(p.fwd);
            const bool in_body = !kConvert && residual && masks_in_body(n);
            // x, grad_out and grad_x planes in acc_t when converting, else the masked gradient
            // where it is made in the body; the spatial gate s.
            const int64_t planes = kConvert ? 3 : (in_body ? 1 : 0);
            std::vector<acc_t> scratch((planes + 1) * n);
            acc_t* gate = scratch.data() + planes * n;
            std::vector<scalar_t> masked(kMayStream && streaming && residual && !in_body ? n : 0);
            for (int64_t index = begin; index < end; ++index) {
              const PlaneUnit unit = plane_unit_at_output(p.fwd, index);
              const int64_t plane = unit.plane;
              const acc_t* x = as_acc(t.fwd.x + plane * n, n, scratch.data());
              const int64_t at = unit.out_plane * n;
              acc_t* dx =
                  result_buffer(t.grad_x + plane * n, kConvert ? scratch.data() + 2 * n : nullptr);
              auto body = [&](const auto& grad) {
                sa_layer_plane_backward<kN, Store>(t, p.fwd, unit, x, grad, dx, gate);
              };
              if constexpr (!kConvert) {
                if (in_body) {
                  body(MaskedGradPlane<acc_t>{t.grad_out + at, t.out + at, t.grad_identity + at,
                                              scratch.data()});
                  continue;
                }
              }
              const scalar_t* g = (kMayStream && !masked.empty())
                                      ? t.sa_grad_streamed(at, n, masked.data())
                                      : t.sa_grad(at, n);
              body(GradPlane<acc_t>{as_acc(g, n, scratch.data() + n)});
              if constexpr (kConvert) write_output(dx, nullptr, t.grad_x + plane * n, n, streaming);
            }
            if (streaming) stream_fence();
          });
    });
  });
}

// One ShuffleAttention work unit in acc_t: its m planes of x (contiguous), of grad_out (at the
// shuffled channels), of grad_x, with their saved statistics, and per-thread scratch.
template <typename acc_t>
struct BranchPlanes {
  const acc_t* x;
  std::vector<const acc_t*> gu;
  acc_t* dx;
  const acc_t* mu;
  const acc_t* r;
  int64_t slot0;
  // Spatial branch scratch planes [m, N]: xh = (x - mu) r, GroupNorm output y, gate s, t = dL/dz.
  acc_t *xh, *y, *gate, *tz;
  std::vector<acc_t> vec_a, vec_b, A;  // m, m, m * m
};

// z = W1 mu + b1, s = sigmoid(z); dz_j = sum(gu_j x_j) s_j (1 - s_j); dmu = W1^T dz. grad_x
// stored by Store (ResultStore), as in spatial_branch_backward.
template <int64_t kM, int64_t kN, typename Store, typename acc_t>
void channel_branch_backward(const ParamArrays<acc_t>& w, acc_t* gate_grad, int64_t m_, int64_t N_,
                             BranchPlanes<acc_t>& u) {
  const int64_t m = branch_size<kM>(m_), N = kN > 0 ? kN : N_;
  std::vector<acc_t>& s = u.vec_a;
  std::vector<acc_t>& dz = u.vec_b;
  matvec(w.cw, u.mu, w.cb, m, s.data());
  for (int64_t j = 0; j < m; ++j) {
    s[j] = sigmoid(s[j]);
    dz[j] = dot(u.gu[j], u.x + j * N, N) * sigmoid_grad(s[j]);
    gate_grad[u.slot0 + j] = dz[j];
  }
  const acc_t inv_n = acc_t(1) / acc_t(N);
  for (int64_t j = 0; j < m; ++j) {
    const acc_t beta = channel_grad_coeffs(matvec_t_row(w.cw, dz.data(), m, j), inv_n).beta;
    const acc_t* gj = u.gu[j];
    acc_t* dxj = u.dx + j * N;
    for_each<acc_t>(N, [&](int64_t i, auto tag) {
      using V = decltype(tag);
      Store{}(dxj, nullptr, i, channel_input_grad(load<V>(gj + i), V(s[j]), V(beta)));
    });
  }
}

// The spatial branch's forward again (xh, y, the gate s) and t = dL/dz, per pixel.
template <int64_t kM, int64_t kN, typename acc_t>
void spatial_branch_gate(const ParamArrays<acc_t>& w, int64_t m_, int64_t N_,
                         BranchPlanes<acc_t>& u) {
  const int64_t m = branch_size<kM>(m_), N = kN > 0 ? kN : N_;
  for (int64_t i = 0; i < m; ++i) {
    const acc_t* xi = u.x + i * N;
    const Standardizer<acc_t> st = saved_stats(u.mu[i], u.r[i]);
    const acc_t scale = w.gw[i] * st.gate_rstd;
    for_each<acc_t>(N, [&](int64_t q, auto tag) {
      using V = decltype(tag);
      const V centered = st.centered(load<V>(xi + q));
      store(u.xh + i * N + q, centered * V(st.gate_rstd));
      store(u.y + i * N + q, V(scale) * centered + V(w.gb[i]));
    });
  }
  // Gate s_j(p) = sigmoid(z_j(p)), z(p) = W2 y(p) + b2, and t_j(p) = gu_j x_j s_j (1 - s_j);
  // kRows rows of z at a time (matrix_rows).
  constexpr int64_t kRows = matrix_rows(kM);
  for_each<acc_t>(N, [&](int64_t q, auto tag) {
    using V = decltype(tag);
    for (int64_t j0 = 0; j0 < m; j0 += kRows) {
      const std::array<V, kRows> z =
          matrix_product_rows<kRows, V>(w.sw, m, 1, w.sb, u.y, N, m, j0, q);
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t j = j0 + r;
        const V s = sigmoid(z[r]);
        store(u.gate + j * N + q, s);
        store(u.tz + j * N + q, gate_input_grad(load<V>(u.gu[j] + q), load<V>(u.x + j * N + q), s));
      }
    }
  });
}

// A[j, i] = sum_p t_j xh_i (xh first: t_j (x_i - mu_i) would be of order |x|^2 and overflow
// first), T1[j] = sum_p t_j; then dx through dy(p) = W2^T t(p) (sa_math.h), stored by Store.
template <int64_t kM, int64_t kN, typename Store, typename acc_t>
void spatial_branch_backward(const ParamArrays<acc_t>& w, acc_t* t_sum, acc_t* t_xh, int64_t m_,
                             int64_t N_, BranchPlanes<acc_t>& u) {
  const int64_t m = branch_size<kM>(m_), N = kN > 0 ? kN : N_;
  spatial_branch_gate<kM, kN>(w, m, N, u);
  std::vector<acc_t>& T1 = u.vec_a;
  // Row j of A kDots entries at a time (dots: t_j's vectors loaded once for them).
  constexpr int kDots = static_cast<int>(matrix_rows(kM));
  for (int64_t j = 0; j < m; ++j) {
    T1[j] = sum_over<acc_t>(
        N, [&](int64_t q, auto tag) { return load<decltype(tag)>(u.tz + j * N + q); });
    for (int64_t i = 0; i < m; i += kDots) {
      const std::array<acc_t, kDots> row = dots<kDots>(u.tz + j * N, u.xh + i * N, N, N);
      std::copy(row.begin(), row.end(), u.A.begin() + j * m + i);
    }
    t_sum[u.slot0 + j] = T1[j];
  }
  std::copy(u.A.begin(), u.A.end(), t_xh + u.slot0 * m);
  const acc_t inv_n = acc_t(1) / acc_t(N);
  std::vector<InputGradCoeffs<acc_t>> coeffs(m);
  for (int64_t i = 0; i < m; ++i) {
    coeffs[i] = shuffle_attention_spatial_coeffs(w.sw, T1.data(), u.A.data(), m, i,
                                                 w.gw[i] * u.r[i], inv_n);
  }
  // dy(p) = W2^T t(p), kRows entries at a time (matrix_rows).
  constexpr int64_t kRows = matrix_rows(kM);
  for_each<acc_t>(N, [&](int64_t q, auto tag) {
    using V = decltype(tag);
    for (int64_t i0 = 0; i0 < m; i0 += kRows) {
      const std::array<V, kRows> dy =
          matrix_product_rows<kRows, V>(w.sw, 1, m, nullptr, u.tz, N, m, i0, q);
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t i = i0 + r;
        Store{}(u.dx + i * N, nullptr, q,
                spatial_input_grad(load<V>(u.gu[i] + q), load<V>(u.gate + i * N + q), dy[r],
                                   load<V>(u.xh + i * N + q), coeffs[i]));
      }
    }
  });
}

// The scratch of one ShuffleAttention unit: planes xh, y, gate, t (4 m N values).
template <typename acc_t>
BranchPlanes<acc_t> branch_planes(int64_t m, acc_t* scratch, int64_t N) {
  const int64_t mN = m * N;
  return BranchPlanes<acc_t>{nullptr,
                             std::vector<const acc_t*>(m),
                             nullptr,
                             nullptr,
                             nullptr,
                             0,
                             scratch,
                             scratch + mN,
                             scratch + 2 * mN,
                             scratch + 3 * mN,
                             std::vector<acc_t>(m),
                             std::vector<acc_t>(m),
                             std::vector<acc_t>(m * m)};
}

// One branch of one (batch item, group), its planes set in u (x, gu, dx, saved statistics), grad_x
// stored by Store (ResultStore). Not inlined: both loops call this one compiled body
// (forward_cpu.cpp, "One compiled body").
template <int64_t kM, int64_t kN, typename Store, typename scalar_t, typename acc_t>
C10_NOINLINE void shuffle_attention_branch_backward(const BackwardTensors<scalar_t>& t,
                                                    const BranchUnit& b, int64_t m, int64_t N,
                                                    BranchPlanes<acc_t>& u) {
  u.mu = t.fwd.mean + b.plane0;
  u.r = t.fwd.rstd + b.plane0;
  u.slot0 = b.slot0;
  if (b.spatial) {
    spatial_branch_backward<kM, kN, Store>(t.fwd.w, t.t_sum, t.t_xh, m, N, u);
  } else {
    channel_branch_backward<kM, kN, Store>(t.fwd.w, t.gate_grad, m, N, u);
  }
}

// ShuffleAttention: one branch of one (batch item, group) per work unit (NCHW), or a tile of whole
// branches (NHWC).
template <typename scalar_t>
void backward_shuffle_attention(const BackwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const BackwardTensors<scalar_t> t(p, Variant::kShuffleAttention);
  const int64_t m = p.fwd.branch_channels, N = p.fwd.plane_size, mN = m * N, C = p.fwd.channels;

  if (ran_by_columns<scalar_t>(Variant::kShuffleAttention, p)) return;
  if (p.fwd.channels_last) {
    const ChannelTiling tiling(p.fwd, m);
    const int64_t tile_values = 2 * tiling.width * N;
    with_backward_branch_shape(m, N, [&](auto branch, auto size) {
      constexpr int64_t kM = decltype(branch)::value, kN = decltype(size)::value;
      at::parallel_for(
          0, tiling.count(p.fwd.batch), grain_for(tile_values, kTaskElements),
          [&](int64_t begin, int64_t end) {
            TilePlanes<acc_t> planes(tile_values, 4 * mN);
            BranchPlanes<acc_t> u = branch_planes(m, planes.extra(), N);
            for (int64_t index = begin; index < end; ++index) {
              backward_tile(
                  t, tiling, tiling.tile(index), planes,
                  [&](const ChannelTile& tile, TilePlanes<acc_t>& tp) {
                    for (int64_t q = 0; q < 2 * tile.width; q += m) {
                      const int64_t c0 = tile.channel(q, C / 2);
                      const int64_t out_q = shuffle_dst(c0, C) - 2 * tile.first;
                      u.x = tp.x + q * N;
                      for (int64_t j = 0; j < m; ++j) u.gu[j] = tp.gu + (out_q + 2 * j) * N;
                      u.dx = tp.dx + q * N;
                      shuffle_attention_branch_backward<kM, kN, ResultStore<false, false>>(
                          t, branch_unit(p.fwd, tile.batch * 2 * p.fwd.groups + c0 / m), m, N, u);
                    }
                  });
            }
          });
    });
    return;
  }
  // NCHW: the branches in output order, grad_x and grad_identity stored as in SALayer's NCHW loop.
  const bool residual = t.out != nullptr;
  const bool streaming = stream_planes(p.fwd.batch * C, N * int64_t{sizeof(scalar_t)});
  with_backward_branch_shape(m, N, [&](auto branch, auto size) {
    with_streaming_store<scalar_t>(streaming, [&](auto store) {
      constexpr int64_t kM = decltype(branch)::value, kN = decltype(size)::value;
      using Store = decltype(store);
      constexpr bool kMayStream = Store::kStreams || kConvert;  // as in SALayer's NCHW loop
      at::parallel_for(0, p.fwd.batch * p.fwd.groups * 2, grain_for(mN, kTaskElements),
                       [&](int64_t begin, int64_t end) {
                         // Scratch planes: xh, y, gate, t; x, gu, grad_x in acc_t (when
                         // converting).
                         std::vector<acc_t> scratch((kConvert ? 7 : 4) * mN);
                         acc_t* x_buf = kConvert ? scratch.data() + 4 * mN : nullptr;
                         acc_t* gu_buf = kConvert ? x_buf + mN : nullptr;
                         acc_t* dx_buf = kConvert ? gu_buf + mN : nullptr;
                         BranchPlanes<acc_t> u = branch_planes(m, scratch.data(), N);
                         // sa_grad_streamed's copies
                         std::vector<scalar_t> masked(kMayStream && streaming && residual ? mN : 0);
                         for (int64_t index = begin; index < end; ++index) {
                           const BranchUnit b = branch_unit_at_output(p.fwd, index);
                           u.x = as_acc(t.fwd.x + b.plane0 * N, mN, x_buf);
                           for (int64_t j = 0; j < m; ++j) {
                             const int64_t at = (b.out_plane0 + 2 * j) * N;
                             const scalar_t* g =
                                 (kMayStream && !masked.empty())
                                     ? t.sa_grad_streamed(at, N, masked.data() + j * N)
                                     : t.sa_grad(at, N);
                             u.gu[j] = as_acc(g, N, kConvert ? gu_buf + j * N : nullptr);
                           }
                           u.dx = result_buffer(t.grad_x + b.plane0 * N, dx_buf);
                           shuffle_attention_branch_backward<kM, kN, Store>(t, b, m, N, u);
                           if constexpr (kConvert)
                             write_output(u.dx, nullptr, t.grad_x + b.plane0 * N, mN, streaming);
                         }
                         if (streaming) stream_fence();
                       });
    });
  });
}

// The parameter gradients (sa_math.h) from the kernels' per-slot partials, serially, in double
// lanes, every sum slot after slot (slot_sum's order: the same bits as one scalar sum per entry).
// A plain slot sum (no mean factor) is a column total of one partial array: the totals are taken
// once, along the rows, and looked up; ShuffleAttention's d_sw, d_sb, d_gw and d_gb share the
// totals of A and T1 instead of re-summing them per entry. d_cw's sums of dz * mu are taken all at
// once too (mean_products). The whole reduction reads each partial once: for ShuffleAttention at
// m = 16 and B G = 512 slots (stage 4, batch 8), 150 K floats in about 0.7 million instructions
// (callgrind). In scalar loops, one entry's sum of dz * mu at a time, it took 2.1 million, against
// the kernel's 13.9 million over two threads: a fifth of the backward's time, on one thread.
template <typename acc_t>
void reduce_param_grads(Variant variant, const BackwardParams& p) {
  using VecD = at::vec::Vectorized<double>;
  constexpr int64_t kD = VecD::size();
  const int64_t slots = p.fwd.batch * p.fwd.groups, m = p.fwd.branch_channels;
  // total[w] += weight * row[w] for w < width, in double lanes (the product exact for float
  // partials; a weight of 1 changes no bit).
  auto add_row = [](double* total, double weight, const acc_t* row, int64_t width) {
    int64_t w = 0;
    for (; w + kD <= width; w += kD)
      (VecD::loadu(total + w) + VecD(weight) * load_wide(row + w)).store(total + w);
    for (; w < width; ++w) total[w] += weight * static_cast<double>(row[w]);
  };
  struct ColumnTotals {
    const acc_t* values;
    std::vector<double> total;
  };
  auto column_totals = [&](const void* partials, int64_t width) {
    ColumnTotals c{static_cast<const acc_t*>(partials), std::vector<double>(width, 0.0)};
    for (int64_t slot = 0; slot < slots; ++slot)
      add_row(c.total.data(), 1.0, c.values + slot * width, width);
    return c;
  };
  const ColumnTotals columns[] = {column_totals(p.gate_grad, m), column_totals(p.t_sum, m),
                                  column_totals(p.t_xh, t_xh_width(variant, m))};
  auto plain_sum = [&](const SlotTerm<acc_t>& term) {
    const ColumnTotals& c = term.values == columns[0].values   ? columns[0]
                            : term.values == columns[1].values ? columns[1]
                                                               : columns[2];
    TORCH_INTERNAL_ASSERT(term.values == c.values && term.mu == nullptr);
    return c.total[term.offset];
  };
  // mean_products: d_cw's sums of dz_j mu_i over the slots (dz = gate_grad [slots, m], mu the
  // channel-branch means, m of them at slot s * 2m). ShuffleAttention needs every [j, i] (an
  // outer product per slot, m x m: row j is mu times dz_j), SALayer the diagonal [k, k] (one
  // product of rows per slot).
  const auto* dz = static_cast<const acc_t*>(p.gate_grad);
  const auto* mean = static_cast<const acc_t*>(p.fwd.mean);
  const bool outer = variant == Variant::kShuffleAttention;
  std::vector<double> mean_products(outer ? m * m : m, 0.0);
  for (int64_t slot = 0; slot < slots; ++slot) {
    const acc_t* dz_s = dz + slot * m;
    const acc_t* mu_s = mean + slot * 2 * m;
    if (outer) {
      for (int64_t j = 0; j < m; ++j)
        add_row(mean_products.data() + j * m, static_cast<double>(dz_s[j]), mu_s, m);
      continue;
    }
    for (int64_t k = 0; k < m; ++k)
      mean_products[k] += static_cast<double>(dz_s[k]) * static_cast<double>(mu_s[k]);
  }
  auto mean_sum = [&](const SlotTerm<acc_t>& term) {
    TORCH_INTERNAL_ASSERT(term.values == dz && term.mu == mean && term.stride == m &&
                          term.mu_stride == 2 * m && (outer || term.offset == term.mu_offset));
    return mean_products[outer ? term.offset * m + term.mu_offset : term.offset];
  };

  for (int64_t e = 0; e < param_grad_entries(variant, m); ++e) {
    const ParamGradEntry<acc_t> entry = param_grad_entry<acc_t>(p, variant, e);
    double total = 0;
    for (int k = 0; k < entry.terms; ++k) {
      const SlotTerm<acc_t> term = entry.term(k);
      total = entry.accumulate(total, k, term, term.mu ? mean_sum(term) : plain_sum(term));
    }
    entry.store(total);
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
