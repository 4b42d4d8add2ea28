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
constexpr int kPlanesPerWarpBlock = kWarpTeamBlock / kWarpSize;
constexpr int kMaxPlaneTeam = 512;    // threads of the streamed path's block team
constexpr int64_t kMaxRegisterPlane = 4096;  // the largest plane a block team holds in registers
constexpr int kStreamLoads = 4;       // loads in flight per thread on the streamed path

// Elements per thread of a block team holding its plane in registers (256 < N <= 4096). A block
// loads its plane, reduces it twice (barriers, no load in flight) and stores it: the time of a
// plane is a latency, so an SM's bandwidth is the bytes of the planes it holds at once, and those
// are bounded by registers, not by threads. The first GPU visit measured 8 elements per thread
// (416 threads at 56x56, 3 blocks per SM): the bfloat16 forward took as long as the float32 one
// for half the bytes (docs/gpu.md, section 8). Fewer threads per plane, each holding 64 bytes
// of x (float32: 16 elements, 224 threads at 56x56; 2-byte types: 32, 128 threads) let more
// planes share an SM for the same registers, and cut the warps each reduction waits for. The
// backward holds x, grad_out and the gate per element (three registers each): 16 elements, and
// float64 keeps 8 in both. Packs narrower than 16 bytes carry an index and a bound check each:
// at most 8 packs a thread (more spill at the 128-register cap, e.g. 32 scalar bfloat16 packs).
template <typename scalar_t, bool kBackward, int kVec>
constexpr int block_team_packs() {
  constexpr int items = sizeof(scalar_t) == 8 ? 8 : kBackward ? 16 : 64 / int(sizeof(scalar_t));
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
// kVec = 1) needs 96. A higher min-blocks, e.g. (512, 4) for 4 blocks of 416 threads per SM at
// 56x56, would be a 32-register budget: below what the fp32 kernels hold (8 values, the
// statistics, the parameters and the gate: 44-64 registers); compiled so, every SALayer kernel
// spills.
constexpr int plane_block_threads(bool warp_team) {
  return warp_team ? kWarpTeamBlock : kMaxPlaneTeam;
}
constexpr int plane_min_blocks(bool warp_team) {
  return kMaxPlaneTeam / plane_block_threads(warp_team);
}
#define SA_LAYER_KERNEL_BOUNDS(warp_team) \
  SA_KERNEL_BOUNDS(plane_block_threads(warp_team), plane_min_blocks(warp_team))

// The team of a plane: a warp (kWarpTeam: blockDim.x / 32 planes per block) or the whole block.
template <bool kWarpTeam>
struct PlaneTeam {
  int size, rank;
  int64_t plane;

  SA_DEVICE PlaneTeam()
      : size(kWarpTeam ? kWarpSize : static_cast<int>(blockDim.x)),
        rank(kWarpTeam ? static_cast<int>(threadIdx.x) % kWarpSize : static_cast<int>(threadIdx.x)),
        plane(kWarpTeam ? int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize
                        : int64_t(blockIdx.x)) {}
};

// The SALayer parameters of branch index k, as acc_t (each read in its own dtype: ParamView).
// Read at the kernel's start, before the plane's reductions: they do not depend on the
// statistics, so their latency hides behind the plane's loads.
template <typename acc_t>
struct PlaneParams {
  acc_t cw, cb, sw, sb, gw, gb;
};

template <typename acc_t>
SA_DEVICE PlaneParams<acc_t> load_plane_params(const ForwardParams& p, int64_t k) {
  return PlaneParams<acc_t>{param_view<acc_t>(p, kChannelWeight)[k],
                            param_view<acc_t>(p, kChannelBias)[k],
                            param_view<acc_t>(p, kSpatialWeight)[k],
                            param_view<acc_t>(p, kSpatialBias)[k],
                            param_view<acc_t>(p, kGnWeight)[k],
                            param_view<acc_t>(p, kGnBias)[k]};
}

// Gate of one plane: u = x * gate(x). Channel branch: the constant sigmoid(cw * mu + cb);
// spatial branch: sigmoid(sw * (gw r (x - mu) + gb) + sb) through the plane's Standardizer
// (sa_math.h).
template <typename acc_t>
struct PlaneGate {
  bool spatial;
  acc_t s;
  SpatialGate<acc_t> g;

  SA_DEVICE PlaneGate(const PlaneParams<acc_t>& w, bool spatial_, const Standardizer<acc_t>& st)
      : spatial(spatial_),
        s(sigmoid(w.cw * st.mean + w.cb)),
        g(spatial_gate(w.sw, w.sb, w.gw, w.gb, st)) {}

  SA_DEVICE acc_t operator()(acc_t x) const { return spatial ? sigmoid(g.z(x)) : s; }
};

// This thread's packs of a plane, q = rank + k * size (k < kPacks, q < packs), into registers.
template <typename scalar_t, bool kWarpTeam, int kVec, int kPacks, typename acc_t>
SA_DEVICE void load_plane_packs(const scalar_t* plane, const PlaneTeam<kWarpTeam>& team,
                                int64_t packs, acc_t (&v)[kPacks][kVec]) {
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int64_t q = team.rank + int64_t(k) * team.size;
    if (q < packs) load_acc<scalar_t, acc_t, kVec>(plane, q, v[k]);
  }
}

// The staged warp-team path: the block's kPlanesPerWarpBlock planes (fewer in the last block) are
// consecutive in x, one chunk of at most 8 * 256 values, which the whole block copies to shared
// memory with 16-byte loads (stage_chunk) however the planes lie against 16 bytes; then each warp
// reads its own plane's values (element q = rank + 32 k) from there. Every thread of the block
// calls it (a barrier), also the warps past the last plane.
template <typename scalar_t, typename acc_t>
SA_DEVICE void load_staged_plane(const scalar_t* x, const PlaneTeam<true>& team, int64_t planes,
                                 int64_t N, acc_t (&v)[kWarpTeamItems][1]) {
  using ChunkPack = Pack<scalar_t, kChunkVec<scalar_t>>;
  SA_SHARED_ARRAY(ChunkPack, chunk,
                  chunk_packs<scalar_t>(kPlanesPerWarpBlock * kWarpSize * kWarpTeamItems));
  const int64_t first = int64_t(blockIdx.x) * kPlanesPerWarpBlock;
  const int64_t count =
      (planes - first < kPlanesPerWarpBlock ? planes - first : kPlanesPerWarpBlock) * N;
  const int lead = stage_chunk(x + first * N, count, chunk);
  __syncthreads();
  if (team.plane >= planes) return;
  const scalar_t* plane =
      reinterpret_cast<const scalar_t*>(chunk) + lead + (team.plane - first) * N;
#pragma unroll
  for (int k = 0; k < kWarpTeamItems; ++k) {
    const int64_t q = team.rank + int64_t(k) * kWarpSize;
    if (q < N) v[k][0] = static_cast<acc_t>(plane[q]);
  }
}

// Mean and variance of the values v * scale (scale a power of two, 1 for the values themselves)
// of a plane held in registers: centered two-pass over the registers, the mean summed relative to
// `shift` (the plane's first value, times scale: robust to |mean| >> std), or with exact_mean (a
// channel-branch plane) the wide mean (sa_math.h; wide_scratch: 32 doubles of shared memory).
template <bool kWarpTeam, int kPacks, int kVec, typename acc_t>
SA_DEVICE void register_moments(const acc_t (&v)[kPacks][kVec], const PlaneTeam<kWarpTeam>& team,
                                int64_t packs, int64_t n, acc_t shift, acc_t scale, bool exact_mean,
                                acc_t* scratch, double* wide_scratch, acc_t& mean, acc_t& var) {
  if (exact_mean) {
    double sum[1] = {0};
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum[0] += wide_term(v[k][i], scale);
      }
    }
    team_sum<kWarpTeam>(sum, wide_scratch);
    mean = wide_mean<acc_t>(sum[0], n);
  } else {
    acc_t sum[1] = {0};
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) sum[0] += sa_fma(v[k][i], scale, -shift);
      }
    }
    team_sum<kWarpTeam>(sum, scratch);
    mean = shift + sum[0] / acc_t(n);
  }
  acc_t sq[1] = {0};
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const acc_t d = sa_fma(v[k][i], scale, -mean);
        sq[0] += d * d;
      }
    }
  }
  team_sum<kWarpTeam>(sq, scratch);
  var = sq[0] / acc_t(n);
}

// The Standardizer of a plane held in registers: its moments, redone scaled by 2^-e (e from
// max|x|) when they overflowed. team_sum gives every thread the same totals, so the branch is
// uniform over the team (and exact_mean is: one plane per team).
template <bool kWarpTeam, int kPacks, int kVec, typename acc_t>
SA_DEVICE Standardizer<acc_t> register_plane_stats(const acc_t (&v)[kPacks][kVec],
                                                   const PlaneTeam<kWarpTeam>& team, int64_t packs,
                                                   int64_t n, acc_t first, acc_t eps,
                                                   bool exact_mean, acc_t* scratch,
                                                   double* wide_scratch) {
  const acc_t shift = sum_shift(first);
  acc_t mean, var;
  register_moments<kWarpTeam, kPacks, kVec>(v, team, packs, n, shift, acc_t(1), exact_mean, scratch,
                                            wide_scratch, mean, var);
  int e = 0;
  if (stats_overflowed(mean, var)) {
    acc_t amax[1] = {0};
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (team.rank + int64_t(k) * team.size < packs) {
#pragma unroll
        for (int i = 0; i < kVec; ++i)
          amax[0] = max_nan(amax[0], v[k][i] < acc_t(0) ? -v[k][i] : v[k][i]);
      }
    }
    team_reduce<kWarpTeam>(amax, scratch, MaxOp{});
    e = rescale_exponent(amax[0]);
    if (e != 0) {
      const acc_t scale = sa_ldexp(acc_t(1), -e);
      register_moments<kWarpTeam, kPacks, kVec>(v, team, packs, n, shift * scale, scale, exact_mean,
                                                scratch, wide_scratch, mean, var);
    }
  }
  return finish_stats(mean, var, eps, e);
}

template <typename scalar_t, bool kWarpTeam, int kVec, int kPacks>
SA_LAYER_KERNEL_BOUNDS(kWarpTeam)
void sa_layer_forward_kernel(ForwardParams p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kStaged = kWarpTeam && kVec == 1;  // launch_common.cuh picks it for such planes
  SA_SHARED_ARRAY(acc_t, scratch, 3 * kWarpSize);
  SA_SHARED_ARRAY(double, wide_scratch, kWarpSize);
  const PlaneTeam<kWarpTeam> team;
  const int64_t planes = p.batch * p.channels, N = p.plane_size, packs = N / kVec;
  const scalar_t* x_planes = static_cast<const scalar_t*>(p.x);
  acc_t v[kPacks > 0 ? kPacks : 1][kVec];
  if constexpr (kStaged) load_staged_plane(x_planes, team, planes, N, v);
  // A warp team past the last plane leaves as a whole; warp teams never synchronize the block
  // (but for the staging above).
  if (kWarpTeam && team.plane >= planes) return;

  const PlaneUnit unit = plane_unit(p, team.plane);
  const ChannelRole& role = unit.role;
  const PlaneParams<acc_t> w = load_plane_params<acc_t>(p, role.k);
  const scalar_t* x = x_planes + team.plane * N;
  scalar_t* out = static_cast<scalar_t*>(p.out) + unit.out_plane * N;
  const acc_t eps = static_cast<acc_t>(p.eps);
  auto load_x = [&](int64_t q, acc_t(&xv)[kVec]) { load_acc<scalar_t, acc_t, kVec>(x, q, xv); };

  Standardizer<acc_t> st;
  if constexpr (kPacks > 0) {
    if constexpr (!kStaged) load_plane_packs<scalar_t, kWarpTeam, kVec, kPacks>(x, team, packs, v);
    st = register_plane_stats<kWarpTeam, kPacks, kVec>(v, team, packs, N, static_cast<acc_t>(x[0]),
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
    store_acc<scalar_t, acc_t, kVec>(out, q, u);
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
  if (team.rank == 0) {
    static_cast<acc_t*>(p.mean)[team.plane] = st.mean;
    static_cast<acc_t*>(p.rstd)[team.plane] = st.rstd;
  }
}

}  // namespace sa_cuda::SA_GPU_NS
