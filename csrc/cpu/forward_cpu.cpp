// Fused forward on the CPU. Bytes moved: x is read once from memory (the plane or group is then
// re-read from cache for the statistics and the gate) and out is written once, at the shuffled
// channel; mean and rstd add 2 * acc_t per plane. channels_last tensors are read and written as
// they are: the float-lane forward by columns where m divides 8 or is 16 and C / 2 is a multiple
// of 2 max(8, m) (nhwc_columns.h, forward_nhwc_columns.cpp), by rows on other large planes
// (nhwc_rows.h, forward_nhwc_cpu.cpp), everything else by tiles of channels (nhwc_tiles.h) that
// run the same unit bodies.
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

constexpr int64_t kTaskElements = int64_t{1} << 15;  // elements per parallel_for task, at least

// One compiled body: the unit bodies (sa_layer_planes, shuffle_attention_branch) are compiled once
// and called by both loops, NCHW planes and NHWC tiles, so both layouts give the same bits by
// construction: inlined into each loop, the compiler may contract a * b + c into an FMA in one
// copy and not in the other (it did, for ShuffleAttention). A call per plane or branch costs
// about 1% of the instructions on 7x7 planes (callgrind). Their inner loops (vec_loops.h) are
// always inlined into them.

// SALayer's gate pass over one plane with its statistics st: its N values of x in acc_t to its N
// results, stored by store (ResultStore, vec_loops.h; identity: the plane at the result's position,
// read where the store fuses the residual epilogue in).
template <int64_t kN, typename Store, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void sa_layer_gate(const ForwardTensors<scalar_t>& t, const ForwardParams& p,
                                     const PlaneUnit& unit, const Standardizer<acc_t>& st,
                                     const acc_t* x, acc_t* result, const acc_t* identity,
                                     Store store) {
  const int64_t N = plane_size<kN>(p);
  const ChannelRole& role = unit.role;
  t.mean[unit.plane] = st.mean;
  t.rstd[unit.plane] = st.rstd;
  if (!role.spatial) {
    const acc_t s = sigmoid(t.w.cw[role.k] * st.mean + t.w.cb[role.k]);
    for_each<acc_t>(N, [&](int64_t i, auto tag) {
      using V = decltype(tag);
      store(result, identity, i, load<V>(x + i) * V(s));
    });
  } else {
    const int64_t k = role.k;
    const SpatialGate<acc_t> g = spatial_gate(t.w.sw[k], t.w.sb[k], t.w.gw[k], t.w.gb[k], st);
    for_each<acc_t>(N, [&](int64_t i, auto tag) {
      using V = decltype(tag);
      const V xv = load<V>(x + i);
      store(result, identity, i, xv * sigmoid(g.z(xv)));
    });
  }
}

// SALayer, kPlanes planes at once (planes_at_once, kernels_cpu.h): plane u's N values of x in
// acc_t, x[u], to its N results at result[u], stored by Store (with identity[u] where it fuses the
// residual epilogue in). The statistics of every plane come first, then the gates: on 7x7 planes
// one plane is a chain of dependent steps (the sums, their reduction across lanes, sqrt and divide,
// the gate, exp), and a second plane's chain runs in its latency. Every plane goes through the same
// expressions, so its bits do not depend on its slot or its partner. Not inlined ("One compiled
// body"): both loops (NCHW planes, NHWC tiles) call this one compiled body. kN: the plane size
// compiled in, or 0 (with_plane_size, kernels_cpu.h).
template <int64_t kN, typename Store, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
C10_NOINLINE void sa_layer_planes(const ForwardTensors<scalar_t>& t, const ForwardParams& p,
                                  const PlaneUnit* units, const acc_t* const* x,
                                  acc_t* const* result, const acc_t* const* identity) {
  constexpr int64_t kPlanes = planes_at_once(kN);
  const int64_t N = plane_size<kN>(p);
  const acc_t eps = static_cast<acc_t>(p.eps);
  if constexpr (kPlanes == 1) {
    // Written out: through the slots' array, the large planes' gate loop kept one more constant
    // on the stack (stage 1: 1.5% more instructions, 3% slower).
    const Standardizer<acc_t> st = plane_stats(x[0], N, eps, !units[0].role.spatial);
    sa_layer_gate<kN>(t, p, units[0], st, x[0], result[0], identity[0], Store{});
  } else {
    Standardizer<acc_t> st[kPlanes];
    for_each_slot<kPlanes>(
        [&](auto u) { st[u] = plane_stats(x[u], N, eps, !units[u].role.spatial); });
    for_each_slot<kPlanes>([&](auto u) {
      sa_layer_gate<kN>(t, p, units[u], st[u], x[u], result[u], identity[u], Store{});
    });
  }
}

// What an NCHW result plane (result_buffer's) still needs after its unit body, the output plane
// at `offset` in out: a converted dtype's is written by write_output with the residual epilogue;
// an output plane itself takes the epilogue in place, unless Store fused it into the gate.
template <typename Store, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void finish_plane(const ForwardTensors<scalar_t>& t, acc_t* result,
                                    int64_t offset, int64_t n, bool residual, bool streaming) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    write_output(result, residual ? t.identity + offset : nullptr, t.out + offset, n, streaming);
  } else if (!Store::kFusesResidual && residual) {
    add_identity_relu(result, t.identity + offset, n);
  }
}

// The channels_last forward by NHWC tiles, both variants: per task, the tile's x planes (input
// order) and output planes in acc_t and make_state()'s scratch; per tile, x gathered once,
// unit_bodies(tile, x, result, state) on its planes, the output planes scattered once (with the
// residual epilogue's identity).
template <typename scalar_t, typename acc_t, typename MakeState, typename UnitBodies>
void forward_tiles(const ForwardTensors<scalar_t>& t, const ForwardParams& p,
                   const ChannelTiling& tiling, const MakeState& make_state,
                   const UnitBodies& unit_bodies) {
  const int64_t N = p.plane_size, C = p.channels, tile_values = 2 * tiling.width * N;
  at::parallel_for(0, tiling.count(p.batch), grain_for(tile_values, kTaskElements),
                   [&](int64_t begin, int64_t end) {
                     std::vector<acc_t> planes(2 * tile_values);
                     acc_t* x = planes.data();
                     acc_t* result = x + tile_values;
                     auto state = make_state();
                     for (int64_t index = begin; index < end; ++index) {
                       const ChannelTile tile = tiling.tile(index);
                       gather_tile(t.x + tile.batch * N * C, tiling, tile, x);
                       unit_bodies(tile, x, result, state);
                       scatter_tile(result, tiling, tile, t.out + tile.batch * N * C,
                                    t.identity_item(tile.batch, N * C));
                     }
                   });
}

// Where the columns (by_columns) do not apply, the channels_last forward goes by rows (nhwc_rows.h)
// where a tile would be narrower than 32 channels (128 bytes of float per pixel and half): planes
// of more than 512 pixels (narrow tiles' strided reads are slow) and any C < 64. Wider tiles read
// about as fast, without the rows' separate statistics pass: at stages 3-4 the rows measured no
// faster than the tiles (docs/kernels.md). Float64 always takes the tiles. ShuffleAttention's
// tiles hold whole branches (`align` = m); its rows need m dividing 4 (half a vector of float
// lanes: the vectors split by role hold whole branches, forward_nhwc_cpu.cpp). For m = 8 the rows
// measured slower than the tiles (1.9-2.2x NCHW against 1.6-1.7x at (8, 64, 56, 56), fp32), so
// the other m keep the tiles.
bool forward_by_rows(const ForwardParams& p, Variant variant) {
  const int64_t m = p.branch_channels, lanes = at::vec::Vectorized<float>::size();
  if (variant == Variant::kSALayer) return ChannelTiling(p, 1).width < 32;
  return (lanes / 2) % m == 0 && ChannelTiling(p, m).width < 32;
}

template <typename scalar_t>
void forward_sa_layer(const ForwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const ForwardTensors<scalar_t> t(p, Variant::kSALayer);
  const int64_t N = p.plane_size, C = p.channels;

  if constexpr (std::is_same_v<acc_t, float>) {
    if (by_columns(p)) return forward_columns<scalar_t>(Variant::kSALayer, p);
    if (p.channels_last && forward_by_rows(p, Variant::kSALayer)) {
      return forward_sa_layer_rows<scalar_t>(p);
    }
  }
  if (p.channels_last) {
    with_plane_size(N, [&](auto size) {
      constexpr int64_t kN = decltype(size)::value, kPlanes = planes_at_once(kN);
      forward_tiles<scalar_t, acc_t>(
          t, p, ChannelTiling(p, 1), [] { return 0; },
          [&](const ChannelTile& tile, const acc_t* x, acc_t* result, int) {
            // 2 * width planes: a whole number of kPlanes (1 or 2).
            for (int64_t q = 0; q < 2 * tile.width; q += kPlanes) {
              PlaneUnit units[kPlanes];
              const acc_t* xs[kPlanes];
              acc_t* results[kPlanes];
              const acc_t* no_identity[kPlanes] = {};  // scatter_tile adds identity
              for (int64_t u = 0; u < kPlanes; ++u) {
                units[u] = plane_unit(p, tile.batch * C + tile.channel(q + u, C / 2));
                xs[u] = x + (q + u) * N;
                results[u] = result + (units[u].out_plane % C - 2 * tile.first) * N;
              }
              sa_layer_planes<kN, ResultStore<false, false>>(t, p, units, xs, results, no_identity);
            }
          });
    });
    return;
  }
  // NCHW: the planes in output order. Where the dtype is acc_t the gate writes the output planes
  // themselves (ResultStore: a streamed output with the residual epilogue fused in, else the
  // epilogue in place after the gate); converted dtypes compute into scratch, and write_output
  // converts with the epilogue.
  const bool residual = t.identity != nullptr;
  const bool streaming = stream_planes(p.batch * C, N * int64_t{sizeof(scalar_t)});
  with_plane_size(N, [&](auto size) {
    constexpr int64_t kN = decltype(size)::value, kPlanes = planes_at_once(kN);
    with_result_store<scalar_t>(residual, streaming, [&](auto store) {
      using Store = decltype(store);
      at::parallel_for(
          0, p.batch * C, grain_for(N, kTaskElements), [&](int64_t begin, int64_t end) {
            const int64_t n = plane_size<kN>(p);
            // Per plane in flight: x plane in acc_t, result plane.
            std::vector<acc_t> scratch(kConvert ? 2 * kPlanes * n : 0);
            for (int64_t index = begin; index < end; index += kPlanes) {
              PlaneUnit units[kPlanes];
              const acc_t* xs[kPlanes];
              acc_t* results[kPlanes];
              const acc_t* identities[kPlanes] = {};
              for (int64_t u = 0; u < kPlanes; ++u) {
                // An odd last plane of the task fills both slots: done twice, the same values to
                // the same place.
                units[u] = plane_unit_at_output(p, std::min(index + u, end - 1));
                acc_t* own = scratch.data() + 2 * u * n;
                xs[u] = as_acc(t.x + units[u].plane * n, n, own);
                results[u] =
                    result_buffer(t.out + units[u].out_plane * n, kConvert ? own + n : nullptr);
                if constexpr (Store::kFusesResidual) {
                  identities[u] = t.identity + units[u].out_plane * n;
                }
              }
              sa_layer_planes<kN, Store>(t, p, units, xs, results, identities);
              for (int64_t u = 0; u < kPlanes && index + u < end; ++u) {
                finish_plane<Store>(t, results[u], units[u].out_plane * n, n, residual, streaming);
              }
            }
            if (streaming) stream_fence();
          });
    });
  });
}

// Per-thread scratch of the ShuffleAttention forward.
template <typename acc_t>
struct BranchScratch {
  std::vector<acc_t> normed;  // [m, N]: the GroupNorm output of a spatial unit
  std::vector<Standardizer<acc_t>> st;
  std::vector<acc_t> mu, z;

  BranchScratch(int64_t m, int64_t N) : normed(m * N), st(m), mu(m), z(m) {}
};

// ShuffleAttention, one branch of one (batch item, group): its m planes of x in acc_t (contiguous,
// [m, N]) to its m result planes, plane j at result0 + j * result_stride, stored by Store (with
// the identity plane at identity0 + j * result_stride where the residual epilogue is fused in).
// Not inlined ("One compiled body"). kM, kN: the branch size and the plane size compiled in, or 0
// (with_branch_shape).
template <int64_t kM, int64_t kN, typename Store, typename scalar_t,
          typename acc_t = at::opmath_type<scalar_t>>
C10_NOINLINE void shuffle_attention_branch(const ForwardTensors<scalar_t>& t,
                                           const ForwardParams& p, const BranchUnit& u,
                                           const acc_t* x, acc_t* result0, const acc_t* identity0,
                                           int64_t result_stride, BranchScratch<acc_t>& scratch) {
  const int64_t m = branch_size<kM>(p.branch_channels), N = plane_size<kN>(p);
  const Store store;
  auto result = [&](int64_t j) { return result0 + j * result_stride; };
  auto identity = [&](int64_t j) -> const acc_t* {
    if constexpr (Store::kFusesResidual) return identity0 + j * result_stride;
    return nullptr;
  };
  std::vector<Standardizer<acc_t>>& st = scratch.st;
  for (int64_t j = 0; j < m; ++j) {
    st[j] = plane_stats(x + j * N, N, static_cast<acc_t>(p.eps), !u.spatial);
    t.mean[u.plane0 + j] = scratch.mu[j] = st[j].mean;
    t.rstd[u.plane0 + j] = st[j].rstd;
  }
  if (!u.spatial) {
    matvec(t.w.cw, scratch.mu.data(), t.w.cb, m, scratch.z.data());
    for (int64_t j = 0; j < m; ++j) {
      const acc_t s = sigmoid(scratch.z[j]);
      const acc_t* xj = x + j * N;
      acc_t* res = result(j);
      const acc_t* id = identity(j);
      for_each<acc_t>(N, [&](int64_t i, auto tag) {
        using V = decltype(tag);
        store(res, id, i, load<V>(xj + i) * V(s));
      });
    }
    return;
  }
  // y_k(p) = gw_k r_k (x_k(p) - mu_k) + gb_k, z(p) = W2 y(p) + b2: the reference's math (sa_math.h
  // says why it is not folded), r_k (x_k - mu_k) through the plane's Standardizer.
  acc_t* y = scratch.normed.data();
  for (int64_t k = 0; k < m; ++k) {
    const Standardizer<acc_t>& sk = st[k];
    const acc_t scale = t.w.gw[k] * sk.gate_rstd;
    for_each<acc_t>(N, [&](int64_t i, auto tag) {
      using V = decltype(tag);
      cpu::store(y + k * N + i, V(scale) * sk.centered(load<V>(x + k * N + i)) + V(t.w.gb[k]));
    });
  }
  // kRows rows of z at a time (matrix_rows, kernels_cpu.h; matrix_product_rows, vec_loops.h).
  constexpr int64_t kRows = matrix_rows(kM);
  for_each<acc_t>(N, [&](int64_t i, auto tag) {
    using V = decltype(tag);
    for (int64_t j0 = 0; j0 < m; j0 += kRows) {
      const std::array<V, kRows> z =
          matrix_product_rows<kRows, V>(t.w.sw, m, 1, t.w.sb, y, N, m, j0, i);
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t j = j0 + r;
        store(result(j), identity(j), i, load<V>(x + j * N + i) * sigmoid(z[r]));
      }
    }
  });
}

// ShuffleAttention: the work unit is one branch of one (batch item, group) (NCHW), or a tile of
// whole branches (NHWC). The m output planes of a branch are 2 planes apart (shuffle).
template <typename scalar_t>
void forward_shuffle_attention(const ForwardParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const ForwardTensors<scalar_t> t(p, Variant::kShuffleAttention);
  const int64_t m = p.branch_channels, N = p.plane_size, C = p.channels;

  if constexpr (std::is_same_v<acc_t, float>) {
    if (by_columns(p)) return forward_columns<scalar_t>(Variant::kShuffleAttention, p);
    if (p.channels_last && forward_by_rows(p, Variant::kShuffleAttention)) {
      return forward_shuffle_attention_rows<scalar_t>(p);
    }
  }
  if (p.channels_last) {
    with_branch_shape(m, N, [&](auto branch, auto size) {
      constexpr int64_t kM = decltype(branch)::value, kN = decltype(size)::value;
      forward_tiles<scalar_t, acc_t>(
          t, p, ChannelTiling(p, m), [&] { return BranchScratch<acc_t>(m, N); },
          [&](const ChannelTile& tile, const acc_t* x, acc_t* out, BranchScratch<acc_t>& scratch) {
            for (int64_t q = 0; q < 2 * tile.width; q += m) {
              const int64_t c0 = tile.channel(q, C / 2);  // the branch's first channel
              const BranchUnit u = branch_unit(p, tile.batch * 2 * p.groups + c0 / m);
              acc_t* out0 = out + (shuffle_dst(c0, C) - 2 * tile.first) * N;
              const acc_t* no_identity = nullptr;  // scatter_tile adds identity
              shuffle_attention_branch<kM, kN, ResultStore<false, false>>(
                  t, p, u, x + q * N, out0, no_identity, 2 * N, scratch);
            }
          });
    });
    return;
  }
  // NCHW: the branches in output order, their result planes and epilogue as in SALayer's.
  const bool residual = t.identity != nullptr;
  const bool streaming = stream_planes(p.batch * C, N * int64_t{sizeof(scalar_t)});
  with_branch_shape(m, N, [&](auto branch, auto size) {
    constexpr int64_t kM = decltype(branch)::value, kN = decltype(size)::value;
    with_result_store<scalar_t>(residual, streaming, [&](auto store) {
      using Store = decltype(store);
      at::parallel_for(
          0, p.batch * p.groups * 2, grain_for(m * N, kTaskElements),
          [&](int64_t begin, int64_t end) {
            const int64_t n = plane_size<kN>(p);
            std::vector<acc_t> converted(kConvert ? 2 * m * n : 0);  // x planes, result planes
            BranchScratch<acc_t> scratch(m, n);
            for (int64_t index = begin; index < end; ++index) {
              const BranchUnit u = branch_unit_at_output(p, index);
              const acc_t* x = as_acc(t.x + u.plane0 * n, m * n, converted.data());
              // The output planes themselves (2 n apart), or converted ones (n apart).
              auto dst = [&](int64_t j) { return (u.out_plane0 + 2 * j) * n; };  // an offset
              acc_t* result0 =
                  result_buffer(t.out + dst(0), kConvert ? converted.data() + m * n : nullptr);
              const int64_t result_stride = kConvert ? n : 2 * n;
              const acc_t* identity0 = nullptr;
              if constexpr (Store::kFusesResidual) identity0 = t.identity + dst(0);
              shuffle_attention_branch<kM, kN, Store>(t, p, u, x, result0, identity0, result_stride,
                                                      scratch);
              for (int64_t j = 0; j < m; ++j) {
                finish_plane<Store>(t, result0 + j * result_stride, dst(j), n, residual, streaming);
              }
            }
            if (streaming) stream_fence();
          });
    });
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
