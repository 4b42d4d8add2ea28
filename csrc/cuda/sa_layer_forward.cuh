// SALayer, forward: one team per plane.
//
// Bytes moved: x read once, out written once at the shuffled channel, 2 * acc_t of statistics per
// plane. kPacks > 0: the plane is held in registers (kPacks packs of kVec per thread) between the
// reductions and the gate. kPacks == 0: the plane is too large for the team's registers and is
// streamed twice (moments, then gate), kStreamLoads packs in flight per thread; the second read
// comes from L2. A warp team with kVec == 1 (no per-plane pack wider than one element, e.g. 7x7)
// reads its block's planes as one chunk staged through shared memory (load_staged_plane).
#pragma once

#include <ATen/OpMathType.h>

#include "../sa_math.h"
#include "../sa_params.h"
#include "team.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kWarpTeamItems = 8;     // elements per lane of a warp team, held in registers
constexpr int kWarpTeamBlock = 256;   // threads per block of warp teams
constexpr int kMaxPlaneTeam = 512;    // threads of the streamed path's block team
constexpr int64_t kMaxRegisterPlane = 4096;  // the largest plane a block team holds in registers
constexpr int kStreamLoads = 4;       // loads in flight per thread on the streamed path

// Elements per thread of a block team holding its plane in registers (256 < N <= 4096). A block
// loads its plane, reduces it twice (barriers, no load in flight) and stores it, so an SM's
// bandwidth is set by the planes it holds at once and by the warps that hide each other's
// latencies, both bounded by registers. Measured on an H200 at (64, 256, 56, 56) (docs/gpu.md,
// section 9): 8 elements a thread everywhere (416 threads at 56x56) gave the bfloat16 passes the
// float32 passes' time for half the bytes; 64 bytes of x a thread in the forward (float32 16
// elements, 224 threads; 2-byte types 32, 128 threads) took the bfloat16 forward from 31% to 44%
// of the copy and the float32 one from 63% to 67% (73% with register_moments' one loop, 54
// registers: 5 blocks per SM). The backward holds x, grad_out and the gate
// (three registers an element): 32 bytes of x a thread (bfloat16 16 elements: 30% to 39%; float32
// 16 elements fell from 63% to 56%, 86 registers: float32 keeps 8). float64 keeps 8 in both.
// Packs narrower than 16 bytes carry an index and a bound check each: at most 8 packs a thread
// (more spill at the 128-register cap, e.g. 32 scalar bfloat16 packs).
template <typename scalar_t, bool kBackward, int kVec>
constexpr int block_team_packs() {
  constexpr int items = sizeof(scalar_t) == 8 ? 8 : (kBackward ? 32 : 64) / int(sizeof(scalar_t));
  return items / kVec < 8 ? items / kVec : 8;
}

// Low B * C (B = 1 inference, detection heads): fewer planes than about twice the SM count leave
// SMs idle on every block-per-plane path. Splitting a plane over several blocks would need a
// partial-statistics kernel, a workspace and a second launch, and a second read of x where the
// plane now stays in registers; but there (N <= 4096: under 2 * 132 planes of at most 16 KiB
// of fp32, 4 MiB in all) the whole launch takes a few microseconds, the cost of the extra
// launch. The streamed path's large
// planes are where the time goes, and there one block per SM with one load in flight per thread
// is latency-bound: it keeps kStreamLoads independent loads in flight per thread instead
// (unrolled_stream, team.cuh), in the same per-thread order, so the same bits.

// Register budget: min blocks per SM = kMaxPlaneTeam / block size, i.e. the register file (64 Ki)
// over 512 threads = 128 registers per thread for every SALayer kernel. Given only the max block
// size, ptxas picks its own occupancy target and trades spills for it (it held the fp64 kVec = 2
// kernels to 64 registers and spilled 56 and 8 bytes); the largest SALayer kernel (fp64 backward,
// kVec = 1) needs 100. A higher min-blocks, e.g. (512, 4), would be a 32-register budget: below
// what every fp32 kernel holds (the plane's values, the statistics, the parameters and the gate:
// 45-92 registers); compiled so, every SALayer kernel spills.
constexpr int plane_block_threads(bool warp_team) {
  return warp_team ? kWarpTeamBlock : kMaxPlaneTeam;
}
constexpr int plane_min_blocks(bool warp_team) {
  return kMaxPlaneTeam / plane_block_threads(warp_team);
}
#define SA_LAYER_KERNEL_BOUNDS(warp_team) \
  SA_KERNEL_BOUNDS(plane_block_threads(warp_team), plane_min_blocks(warp_team))

// Lanes of a warp team (N <= 256, 8 elements a lane): kSmallPlaneLanes for planes of at most
// kSmallPlaneLanes * 8 = 64 elements, else the warp. A 7x7 plane in 8 lanes: 4 planes share a warp
// and 32 a block, each reduction is 3 shuffle steps instead of 5, and a warp keeps 4 planes' loads
// in flight (a warp per plane: 2-4% of DRAM peak at 7x7 on the H200; 8 lanes: about 2x faster,
// docs/gpu.md section 9). The lane count is a template parameter: where teams are whole warps the
// kernel is the warp-per-plane one, with no runtime team arithmetic (measured: a runtime lane count
// cost 50 registers instead of 45 and a quarter of the 14x14 bandwidth).
constexpr int kSmallPlaneLanes = 8;

// The team of a plane: an aligned group of kLanes lanes of a warp, or the whole block (kLanes 0).
// The teams of the last block past the last plane work on it and store nothing (active false):
// every lane of a warp runs the teams' shuffles together.
template <int kLanes>
struct PlaneTeam {
  static constexpr bool kWarpTeam = kLanes > 0;
  // Teams share a warp: a branch around collectives must then be taken by every lane of it.
  static constexpr bool kSharesWarp = kWarpTeam && kLanes < kWarpSize;
  int size, rank;
  int64_t plane;
  bool active;

  SA_DEVICE explicit PlaneTeam(int64_t planes) {
    if constexpr (kWarpTeam) {
      size = kLanes;
      rank = static_cast<int>(threadIdx.x) % kLanes;
      const int64_t own =
          int64_t(blockIdx.x) * (kWarpTeamBlock / kLanes) + static_cast<int>(threadIdx.x) / kLanes;
      active = own < planes;
      plane = active ? own : planes - 1;
    } else {
      size = static_cast<int>(blockDim.x);
      rank = static_cast<int>(threadIdx.x);
      plane = int64_t(blockIdx.x);
      active = true;
    }
  }

  // Team reductions over this team (team.cuh): every thread of the warp (or block) calls them.
  template <int K, typename T>
  SA_DEVICE void sum(T (&v)[K], T* scratch) const {
    team_sum<kWarpTeam>(v, scratch, kWarpTeam ? kLanes : kWarpSize);
  }
  template <int K, typename T>
  SA_DEVICE void max(T (&v)[K], T* scratch) const {
    team_reduce<kWarpTeam>(v, scratch, MaxOp{}, kWarpTeam ? kLanes : kWarpSize);
  }
  // A branch taken by every team of the warp (or the block) when any takes it: the collectives
  // inside it then run on every lane.
  SA_DEVICE bool any(bool flag) const { return kSharesWarp ? warp_any(flag) : flag; }
};

// The SALayer parameters of branch index k, as acc_t. Read at the kernel's start, before the
// plane's reductions: they do not depend on the statistics, so their latency hides behind the
// plane's loads. Parameters stored in acc_t (float32 models, autocast) are read as plain arrays:
// a ParamView read is a branch per parameter, about 12 instructions against 2, which every thread
// pays once per plane (the float32 block-team backward has 8 elements a thread).
template <typename acc_t>
struct PlaneParams {
  acc_t cw, cb, sw, sb, gw, gb;
};

template <typename acc_t, typename Read>
SA_DEVICE PlaneParams<acc_t> read_plane_params(const Read& read) {
  return PlaneParams<acc_t>{read(kChannelWeight), read(kChannelBias), read(kSpatialWeight),
                            read(kSpatialBias),   read(kGnWeight),    read(kGnBias)};
}

template <typename acc_t>
SA_DEVICE PlaneParams<acc_t> load_plane_params(const ForwardParams& p, int64_t k) {
  if (params_are_acc<acc_t>(p)) {
    return read_plane_params<acc_t>(
        [&](int which) { return static_cast<const acc_t*>(p.params[which])[k]; });
  }
  return read_plane_params<acc_t>([&](int which) { return param_view<acc_t>(p, which)[k]; });
}

// Gate of one plane: u = x * gate(x). Channel branch: the constant sigmoid(cw * mu + cb);
// spatial branch: sigmoid(sw * (gw r (x - mu) + gb) + sb) through the plane's Standardizer
// (sa_math.h).
template <typename acc_t>
struct PlaneGate {
  bool spatial;
  acc_t s;
  SpatialGate<acc_t> g;

  PlaneGate() = default;  // plain data: kept in arrays, one per channel of a thread
  SA_DEVICE PlaneGate(const PlaneParams<acc_t>& w, bool spatial_, const Standardizer<acc_t>& st)
      : spatial(spatial_),
        s(sigmoid(w.cw * st.mean + w.cb)),
        g(spatial_gate(w.sw, w.sb, w.gw, w.gb, st)) {}

  SA_DEVICE acc_t operator()(acc_t x) const { return spatial ? sigmoid(g.z(x)) : s; }
};

// This thread's packs of a plane, q = rank + k * size (k < kPacks, q < packs), into registers.
template <typename scalar_t, int kLanes, int kVec, int kPacks, typename acc_t>
SA_DEVICE void load_plane_packs(const scalar_t* plane, const PlaneTeam<kLanes>& team, int64_t packs,
                                acc_t (&v)[kPacks][kVec]) {
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t q = team.rank + int64_t(k) * team.size;
    if (q < packs) load_acc<scalar_t, acc_t, kVec>(plane, q, v[k]);
  }
}

// The staged warp-team path: the block's 256 / lanes planes (fewer in the last block) are
// consecutive in x, one chunk of at most 8 * 256 values, which the whole block copies to shared
// memory with 16-byte loads (stage_chunk) however the planes lie against 16 bytes; then each team
// reads its own plane's values (element q = rank + lanes k) from there. Every thread of the block
// calls it (a barrier), also the teams past the last plane.
template <typename scalar_t, int kLanes, typename acc_t>
SA_DEVICE void load_staged_plane(const scalar_t* x, const PlaneTeam<kLanes>& team, int64_t planes,
                                 int64_t N, acc_t (&v)[kWarpTeamItems][1]) {
  using ChunkPack = Pack<scalar_t, kChunkVec<scalar_t>>;
  SA_SHARED_ARRAY(ChunkPack, chunk, chunk_packs<scalar_t>(kWarpTeamBlock * kWarpTeamItems));
  constexpr int64_t per_block = kWarpTeamBlock / kLanes;
  const int64_t first = int64_t(blockIdx.x) * per_block;
  const int64_t count = (planes - first < per_block ? planes - first : per_block) * N;
  const int lead = stage_chunk(x + first * N, count, chunk);
  __syncthreads();
  const scalar_t* plane =
      reinterpret_cast<const scalar_t*>(chunk) + lead + (team.plane - first) * N;
#pragma unroll
  for (int k = 0; k < kWarpTeamItems; ++k) {
    const int64_t q = team.rank + int64_t(k) * team.size;
    if (q < N) v[k][0] = static_cast<acc_t>(plane[q]);
  }
}

// Mean and variance of the values v * scale (scale a power of two, 1 for the values themselves)
// of a plane held in registers: centered two-pass over the registers, the mean summed relative to
// `shift` (the plane's first value, times scale: robust to |mean| >> std; split_mean), or with
// exact_mean (a channel-branch plane) the wide mean (sa_math.h; wide_scratch: 32 doubles of shared
// memory).
template <int kLanes, int kPacks, int kVec, typename acc_t>
SA_DEVICE void register_moments(const acc_t (&v)[kPacks][kVec], const PlaneTeam<kLanes>& team,
                                int64_t packs, int64_t n, acc_t shift, acc_t scale, bool exact_mean,
                                acc_t* scratch, double* wide_scratch, SplitMean<acc_t>& mean,
                                acc_t& var) {
  // One pass over the values for either sum; the team sums only the one its plane needs, unless
  // teams share the warp (exact_mean then differs between them: every lane runs both shuffles).
  // Measured on the H200, this one loop holds the float32 block team in 54 registers (59 with a
  // loop per sum): 5 blocks per SM instead of 4, 73% of the copy at 56x56 instead of 67%.
  constexpr bool kBoth = PlaneTeam<kLanes>::kSharesWarp;
  double wide[1] = {0};
  acc_t sum[1] = {0};
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (exact_mean) {
          wide[0] += wide_term(v[k][i], scale);
        } else {
          sum[0] += sa_fma(v[k][i], scale, -shift);
        }
      }
    }
  }
  if (kBoth || exact_mean) team.sum(wide, wide_scratch);
  if (kBoth || !exact_mean) team.sum(sum, scratch);
  mean = exact_mean ? SplitMean<acc_t>{wide_mean<acc_t>(wide[0], n), 0}
                    : split_mean(shift, sum[0] / acc_t(n));
  acc_t sq[1] = {0};
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const acc_t d = sa_fma(v[k][i], scale, -mean.mean);
        sq[0] += d * d;
      }
    }
  }
  team.sum(sq, scratch);
  var = sq[0] / acc_t(n);
}

// The Standardizer of a plane held in registers: its moments, redone scaled by 2^-e (e from
// max|x|) when they overflowed. team_sum gives every thread of a team the same totals; the teams
// sharing a warp take the branch together (team.any), and a team whose moments did not overflow
// redoes them unscaled (e = 0), the same bits.
template <int kLanes, int kPacks, int kVec, typename acc_t>
SA_DEVICE Standardizer<acc_t> register_plane_stats(const acc_t (&v)[kPacks][kVec],
                                                   const PlaneTeam<kLanes>& team, int64_t packs,
                                                   int64_t n, acc_t first, acc_t eps,
                                                   bool exact_mean, acc_t* scratch,
                                                   double* wide_scratch) {
  const acc_t shift = sum_shift(first);
  SplitMean<acc_t> mean;
  acc_t var;
  register_moments<kLanes, kPacks, kVec>(v, team, packs, n, shift, acc_t(1), exact_mean, scratch,
                                         wide_scratch, mean, var);
  int e = 0;
  const bool overflowed = stats_overflowed(mean.mean, var);
  if (team.any(overflowed)) {
    acc_t amax[1] = {0};
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
        for (int i = 0; i < kVec; ++i)
          amax[0] = max_nan(amax[0], v[k][i] < acc_t(0) ? -v[k][i] : v[k][i]);
      }
    }
    team.max(amax, scratch);
    e = overflowed ? rescale_exponent(amax[0]) : 0;
    if (team.any(e != 0)) {
      const acc_t scale = sa_ldexp(acc_t(1), -e);
      register_moments<kLanes, kPacks, kVec>(v, team, packs, n, shift * scale, scale, exact_mean,
                                             scratch, wide_scratch, mean, var);
    }
  }
  return finish_stats(mean.mean, var, eps, e, mean.lo);
}

// kLanes: the lanes of a warp team, 0 for a block team (launch_common.cuh).
template <typename scalar_t, int kLanes, int kVec, int kPacks>
SA_LAYER_KERNEL_BOUNDS(kLanes > 0)
void sa_layer_forward_kernel(ForwardParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kWarpTeam = kLanes > 0;
  constexpr bool kStaged = kWarpTeam && kVec == 1;  // launch_common.cuh picks it for such planes
  SA_SHARED_ARRAY(acc_t, scratch, 3 * kWarpSize);
  SA_SHARED_ARRAY(double, wide_scratch, kWarpSize);
  const int64_t planes = p.batch * p.channels, N = p.plane_size, packs = N / kVec;
  const PlaneTeam<kLanes> team(planes);
  const scalar_t* x_planes = static_cast<const scalar_t*>(p.x);
  acc_t v[kPacks > 0 ? kPacks : 1][kVec];
  if constexpr (kStaged) load_staged_plane(x_planes, team, planes, N, v);
  // A whole-warp team past the last plane leaves (warp teams synchronize the block only around
  // the staging above); teams sharing a warp stay for its shuffles.
  if (!PlaneTeam<kLanes>::kSharesWarp && !team.active) return;

  const PlaneUnit unit = plane_unit(p, team.plane);
  const ChannelRole& role = unit.role;
  const PlaneParams<acc_t> w = load_plane_params<acc_t>(p, role.k);
  const scalar_t* x = x_planes + team.plane * N;
  const acc_t eps = static_cast<acc_t>(p.eps);
  auto load_x = [&](int64_t q, acc_t(&xv)[kVec]) { load_acc<scalar_t, acc_t, kVec>(x, q, xv); };

  Standardizer<acc_t> st;
  if constexpr (kPacks > 0) {
    if constexpr (!kStaged) load_plane_packs<scalar_t, kLanes, kVec, kPacks>(x, team, packs, v);
    st = register_plane_stats<kLanes, kPacks, kVec>(v, team, packs, N, static_cast<acc_t>(x[0]),
                                                    eps, !role.spatial, scratch, wide_scratch);
  } else {
    st = streamed_plane_stats<kWarpTeam>(
        [&](const auto& f) {
          unrolled_stream<kStreamLoads, acc_t[kVec]>(
              team.rank, team.size, packs, load_x, [&](int64_t, const acc_t(&xv)[kVec]) { f(xv); });
        },
        static_cast<acc_t>(x[0]), N, eps, !role.spatial, scratch, wide_scratch);
  }

  const PlaneGate<acc_t> gate(w, role.spatial, st);
  auto apply = [&](int64_t q, const acc_t(&xv)[kVec]) {
    acc_t u[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) u[i] = xv[i] * gate(xv[i]);
    if (team.active) store_out<scalar_t, acc_t, kVec>(p, unit.out_plane * N, q, u);
  };
  if constexpr (kPacks > 0) {
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t q = team.rank + int64_t(k) * team.size;
      if (q < packs) apply(q, v[k]);
    }
  } else {
    unrolled_stream<kStreamLoads, acc_t[kVec]>(team.rank, team.size, packs, load_x, apply);
  }
  if (team.rank == 0 && team.active) {
    static_cast<acc_t*>(p.mean)[team.plane] = st.mean;
    static_cast<acc_t*>(p.rstd)[team.plane] = st.rstd;
  }
}

}  // namespace sa_cuda::SA_GPU_NS
