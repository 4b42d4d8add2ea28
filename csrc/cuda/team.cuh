// Cooperative building blocks of the CUDA kernels: a "team" of threads owns one work unit (a warp
// for small planes, the whole block otherwise); its threads reduce with warp shuffles and, for a
// block team, one round through shared memory. Written in the portable subset (portable.cuh).
#pragma once

#include "../sa_math.h"
#include "portable.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kWarpSize = 32;

// The sum over each aligned group of `width` lanes (a power of two, at most the warp): every lane
// of the warp calls it with the same width, and every lane gets its group's sum, bit for bit the
// same within the group (a butterfly). Width 32: the whole warp.
template <typename T>
SA_DEVICE T warp_sum(T v, int width = kWarpSize) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    if (offset < width) v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// max over each group of `width` lanes (propagating NaN), as warp_sum.
template <typename T>
SA_DEVICE T warp_max(T v, int width = kWarpSize) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    if (offset < width) v = max_nan(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// Whether the flag is set on any lane of the warp; every lane gets the answer. Lets teams that
// share a warp take a branch with collectives in it together.
SA_DEVICE bool warp_any(bool flag) { return warp_sum(flag ? 1 : 0) != 0; }

struct SumOp {
  template <typename T>
  SA_DEVICE T warp(T v, int width) const {
    return warp_sum(v, width);
  }
};
struct MaxOp {  // of values >= 0 (0 is its identity)
  template <typename T>
  SA_DEVICE T warp(T v, int width) const {
    return warp_max(v, width);
  }
};

// Reduces K values over the team (Op: SumOp or MaxOp); every thread of the team gets the results,
// bit for bit the same (a butterfly of commutative operations). A warp team is an aligned group of
// `lanes` lanes (a power of two <= 32); every lane of the warp must call it with the same lanes. A
// block team needs blockDim.x % 32 == 0 and `scratch` of 32 * K values in shared memory, and every
// thread of the block must call it (it synchronizes the block).
template <bool kWarpTeam, int K, typename T, typename Op>
SA_DEVICE void team_reduce(T (&v)[K], T* scratch, Op op, int lanes = kWarpSize) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = op.warp(v[k], kWarpTeam ? lanes : kWarpSize);
  if constexpr (!kWarpTeam) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    __syncthreads();  // a previous team reduction may still be reading scratch
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) scratch[k * kWarpSize + warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k)
      v[k] = op.warp(lane < warps ? scratch[k * kWarpSize + lane] : T(0), kWarpSize);
  }
}

template <bool kWarpTeam, int K, typename T>
SA_DEVICE void team_sum(T (&v)[K], T* scratch, int lanes = kWarpSize) {
  team_reduce<kWarpTeam>(v, scratch, SumOp{}, lanes);
}

// Running mean / M2 (Welford, merged with Chan's formula): the statistics of a plane that is
// streamed instead of held on chip, without the cancellation of E[x^2] - mean^2. Callers feed
// values minus a shift (the plane's first value) and add the shift back to the mean: a running
// mean stored at the magnitude of a large common offset would lose the small deviations.
template <typename T>
struct Moments {
  T n = 0, mean = 0, m2 = 0;

  SA_DEVICE void merge(T nb, T mean_b, T m2_b) {
    const T total = n + nb;
    if (total == T(0)) return;
    const T delta = mean_b - mean;
    if (!(delta - delta == T(0))) {
      // An infinite (or NaN) value on either side: the mean is the sum's limit (+-inf, or NaN
      // for inf - inf, as a plain sum gives), the variance is not finite.
      mean = mean + mean_b;
      m2 = m2 + m2_b + delta * delta;
      n = total;
      return;
    }
    mean += delta * (nb / total);
    m2 += m2_b + delta * delta * (n * nb / total);
    n = total;
  }

  // Adds a pack of values v * scale - shift (scale a power of two, 1 for the values themselves;
  // fma: rounded once, so v - shift exactly as a subtraction gives it for scale = 1): its own
  // exact two-pass moments, then one merge.
  template <int N>
  SA_DEVICE void add(const T (&v)[N], T shift, T scale = T(1)) {
    T d[N];
    T s = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      d[i] = sa_fma(v[i], scale, -shift);
      s += d[i];
    }
    const T pack_mean = s / T(N);
    T q = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) q += (d[i] - pack_mean) * (d[i] - pack_mean);
    merge(T(N), pack_mean, q);
  }
};

template <typename T>
SA_DEVICE Moments<T> warp_merge(Moments<T> a) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T n = __shfl_xor_sync(kFullMask, a.n, offset);
    const T mean = __shfl_xor_sync(kFullMask, a.mean, offset);
    const T m2 = __shfl_xor_sync(kFullMask, a.m2, offset);
    a.merge(n, mean, m2);
  }
  return a;
}

// Merges the team's moments; every thread gets the result. Same contract as team_sum
// (scratch: 3 * 32 values).
template <bool kWarpTeam, typename T>
SA_DEVICE Moments<T> team_merge(Moments<T> a, T* scratch) {
  a = warp_merge(a);
  if constexpr (!kWarpTeam) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    __syncthreads();
    if (lane == 0) {
      scratch[warp] = a.n;
      scratch[kWarpSize + warp] = a.mean;
      scratch[2 * kWarpSize + warp] = a.m2;
    }
    __syncthreads();
    Moments<T> b;
    if (lane < warps) {
      b.n = scratch[lane];
      b.mean = scratch[kWarpSize + lane];
      b.m2 = scratch[2 * kWarpSize + lane];
    }
    a = warp_merge(b);
  }
  return a;
}

// A decision every thread of the team takes the same way, whatever the thread computed: lane 0's
// (in a block team every warp's lane 0 holds the same value after team_merge or team_reduce: each
// warp reduces the same scratch values in the same order). Team collectives inside a branch on it
// are then safe. Moments merges are not symmetric (lanes may differ in the last bits), hence this.
SA_DEVICE bool team_uniform(bool flag) {
  return __shfl_sync(kFullMask, static_cast<int>(flag), 0) != 0;
}

// The Standardizer of a plane that the team streams instead of holding on chip.
// for_each_pack(f) calls f(v) with this thread's packs of values (acc_t[kVec]), the same packs in
// every call. Moments of x - shift (shift: `first`, the plane's first value), and with exact_mean
// (a channel-branch plane) the wide mean (sa_math.h) in the same pass; when they overflow
// (sa_math.h: Standardizer), max|x| and the moments of x * 2^-e - shift * 2^-e, two more passes.
// wide_scratch: 32 doubles of shared memory for a block team.
template <bool kWarpTeam, typename acc_t, typename ForEachPack>
SA_DEVICE Standardizer<acc_t> streamed_plane_stats(const ForEachPack& for_each_pack, acc_t first,
                                                   int64_t n, acc_t eps, bool exact_mean,
                                                   acc_t* scratch, double* wide_scratch) {
  const acc_t shift = sum_shift(first);
  SplitMean<acc_t> mean;
  acc_t var;
  auto moments = [&](acc_t scale) {
    Moments<acc_t> mo;
    double wide[1] = {0};
    for_each_pack([&](const auto& v) {
      mo.add(v, shift * scale, scale);
      if (exact_mean) {
        for (const acc_t value : v) wide[0] += wide_term(value, scale);
      }
    });
    mo = team_merge<kWarpTeam>(mo, scratch);
    mean = split_mean(shift * scale, mo.mean);
    var = mo.m2 / acc_t(n);
    if (exact_mean) {
      team_sum<kWarpTeam>(wide, wide_scratch);
      mean = SplitMean<acc_t>{wide_mean<acc_t>(wide[0], n), 0};
    }
  };
  moments(acc_t(1));
  int e = 0;
  if (team_uniform(stats_overflowed(mean.mean, var))) {
    acc_t amax[1] = {0};
    for_each_pack([&](const auto& v) {
      for (const acc_t value : v) amax[0] = max_nan(amax[0], value < acc_t(0) ? -value : value);
    });
    team_reduce<kWarpTeam>(amax, scratch, MaxOp{});
    e = rescale_exponent(amax[0]);
    if (e != 0) moments(sa_ldexp(acc_t(1), -e));
  }
  return finish_stats(mean.mean, var, eps, e, mean.lo);
}

// A plane of N elements, moved in packs of kVec elements (one 16-, 8- or 4-byte access; the host
// picks the widest that N and every plane pointer allow, kVec = 1 when none does). Thread `rank`
// of a team of `team` threads owns packs rank, rank + team, rank + 2 * team, ... (coalesced).
template <typename scalar_t, typename acc_t, int kVec>
SA_DEVICE void load_acc(const scalar_t* plane, int64_t pack, acc_t (&v)[kVec]) {
  const Pack<scalar_t, kVec> raw = load_pack<scalar_t, kVec>(plane + pack * kVec);
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] = static_cast<acc_t>(raw.val[i]);
}

template <typename scalar_t, typename acc_t, int kVec>
SA_DEVICE void store_acc(scalar_t* plane, int64_t pack, const acc_t (&v)[kVec]) {
  Pack<scalar_t, kVec> raw;
#pragma unroll
  for (int i = 0; i < kVec; ++i) raw.val[i] = static_cast<scalar_t>(v[i]);
  store_pack<scalar_t, kVec>(plane + pack * kVec, raw);
}

// The residual epilogue at out's element e (sa_params.h, sa_math.h): relu(v + identity[e]), or v
// without an identity.
template <typename scalar_t, typename acc_t>
SA_DEVICE acc_t with_identity(const ForwardParams& p, int64_t e, acc_t v) {
  if (p.identity == nullptr) return v;
  return residual_relu(v, static_cast<acc_t>(static_cast<const scalar_t*>(p.identity)[e]));
}

// store_acc of pack `pack` of the run of out from element `offset`, with the residual epilogue:
// identity read as the same pack (its pointer is among those the pack width was chosen for).
template <typename scalar_t, typename acc_t, int kVec>
SA_DEVICE void store_out(const ForwardParams& p, int64_t offset, int64_t pack, acc_t (&v)[kVec]) {
  if (p.identity != nullptr) {
    const Pack<scalar_t, kVec> identity =
        load_pack<scalar_t, kVec>(static_cast<const scalar_t*>(p.identity) + offset + pack * kVec);
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = residual_relu(v[i], static_cast<acc_t>(identity.val[i]));
  }
  store_acc<scalar_t, acc_t, kVec>(static_cast<scalar_t*>(p.out) + offset, pack, v);
}

// Visits this thread's packs q = first, first + stride, ... < count in that order: load(q, slot)
// reads pack q into a Slot, use(q, slot) consumes it. kUnroll packs are loaded before the first of
// them is used, so a thread keeps kUnroll independent loads in flight instead of one: a streamed
// plane is latency-bound when few blocks share an SM (B * C below a few times the SM count).
template <int kUnroll, typename Slot, typename Load, typename Use>
SA_DEVICE void unrolled_stream(int64_t first, int64_t stride, int64_t count, const Load& load,
                               const Use& use) {
  for (int64_t base = first; base < count; base += kUnroll * stride) {
    Slot slot[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < count) load(base + u * stride, slot[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride < count) use(base + u * stride, slot[u]);
    }
  }
}

// Values per 16-byte pack, the unit in which stage_chunk moves a chunk.
template <typename T>
constexpr int kChunkVec = static_cast<int>(16 / sizeof(T));

// The shared-memory packs stage_chunk needs for a chunk of up to `count` values.
template <typename T>
constexpr int64_t chunk_packs(int64_t count) {
  return (count + kChunkVec<T> - 1) / kChunkVec<T> + 1;
}

// Copies count consecutive values src[0, count) of global memory to shared memory, as
// dst[lead + i] = src[i] with lead = (src's offset from the 16-byte boundary below it) / sizeof(T),
// and returns lead: src's 16-byte packs then land on dst's 16-byte packs, and each moves as one
// 128-bit global load and one 128-bit shared store; the values before the first and after the
// last whole pack (at most kChunkVec - 1 each) move one by one. Every thread of the block takes
// part; the caller synchronizes the block before reading dst (chunk_packs(count) packs).
template <typename T>
SA_DEVICE int stage_chunk(const T* src, int64_t count, Pack<T, kChunkVec<T>>* dst) {
  constexpr int kVec = kChunkVec<T>;
  const int lead =
      static_cast<int>(reinterpret_cast<uintptr_t>(src) % (kVec * sizeof(T)) / sizeof(T));
  const int64_t end = lead + count;  // dst index one past the chunk
  // Whole packs [first_pack, last_pack) of dst; an empty range when the chunk lies inside one.
  const int64_t first_pack = (lead + kVec - 1) / kVec;
  const int64_t last_pack = end / kVec > first_pack ? end / kVec : first_pack;
  for (int64_t q = first_pack + threadIdx.x; q < last_pack; q += blockDim.x) {
    dst[q] = load_pack<T, kVec>(src + (q * kVec - lead));
  }
  T* values = reinterpret_cast<T*>(dst);
  const int64_t head_end = first_pack * kVec < end ? first_pack * kVec : end;
  if (lead + int64_t(threadIdx.x) < head_end) values[lead + threadIdx.x] = src[threadIdx.x];
  const int64_t tail = last_pack * kVec + threadIdx.x;
  if (tail >= head_end && tail < end) values[tail] = src[tail - lead];
  return lead;
}

}  // namespace sa_cuda::SA_GPU_NS
