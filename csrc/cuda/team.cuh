// Cooperative building blocks of the CUDA kernels: a "team" of threads owns one work unit (a warp
// for small planes, the whole block otherwise); its threads reduce with warp shuffles and, for a
// block team, one round through shared memory. Written in the portable subset (portable.cuh).
#pragma once

#include "portable.cuh"

namespace sa_cuda::SA_GPU_NS {

constexpr int kWarpSize = 32;

template <typename T>
SA_DEVICE T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sums K values over the team; every thread of the team gets the totals. A block team needs
// blockDim.x % 32 == 0 and `scratch` of 32 * K values in shared memory, and every thread of the
// block must call it (it synchronizes the block).
template <bool kWarpTeam, int K, typename T>
SA_DEVICE void team_sum(T (&v)[K], T* scratch) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if constexpr (!kWarpTeam) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    __syncthreads();  // a previous team_sum may still be reading scratch
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) scratch[k * kWarpSize + warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < warps ? scratch[k * kWarpSize + lane] : T(0));
  }
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

  // Adds a pack of values minus `shift`: its own exact two-pass moments, then one merge.
  template <int N>
  SA_DEVICE void add(const T (&v)[N], T shift) {
    T s = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) s += v[i] - shift;
    const T pack_mean = s / T(N);
    T q = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) q += (v[i] - shift - pack_mean) * (v[i] - shift - pack_mean);
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

// A plane of N elements, moved in packs of kVec elements (a 16-byte access when kVec > 1; the
// host picks kVec = 1 when a pointer or N is not aligned for it). Thread `rank` of a team of
// `team` threads owns packs rank, rank + team, rank + 2 * team, ... (coalesced).
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

}  // namespace sa_cuda::SA_GPU_NS
