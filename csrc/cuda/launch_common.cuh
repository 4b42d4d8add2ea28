// Launch shapes, chosen from the problem (included by the forward and backward launch files).
//
// Per-channel variant, one team per plane:
//   N <= 256              a warp per plane, 8 planes per 256-thread block, plane in registers
//   N <= 4096             a block per plane (32..512 threads, 8 elements each), plane in registers
//   larger                a block of 512 per plane, streamed twice (moments, then the gate)
// 1x1-conv variant: a block of 256 per (batch item, group, branch), tiles in shared memory.
// Per-channel variant: 16-byte packs when every plane pointer is 16-byte aligned, else scalar
// accesses; 1x1-conv variant: 16-, 8- or 4-byte packs, else scalar accesses.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "group_forward.cuh"
#include "plane_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

template <int V>
using int_c = std::integral_constant<int, V>;
template <bool V>
using bool_c = std::integral_constant<bool, V>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// pick(bool_c<warp team>, int_c<kVec>, int_c<kPacks>) returns the kernel to launch.
template <typename scalar_t, typename Params, typename Pick>
void launch_planes(const Params& params, const ForwardParams& f, bool pointers_aligned, const Pick& pick) {
  constexpr int kVecMax = 16 / sizeof(scalar_t);
  const int64_t planes = f.batch * f.channels, N = f.plane_size;
  auto go = [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    constexpr int kPacks = kPlaneItems / kVec;
    const Stream stream = current_stream();
    if (N <= kWarpSize * kPlaneItems) {
      const int64_t planes_per_block = kWarpTeamBlock / kWarpSize;
      launch(pick(bool_c<true>(), vec, int_c<kPacks>()), ceil_div(planes, planes_per_block), kWarpTeamBlock,
             0, stream, params);
    } else if (N <= kMaxPlaneTeam * kPlaneItems) {
      const int threads = static_cast<int>(ceil_div(ceil_div(N, kPlaneItems), kWarpSize) * kWarpSize);
      launch(pick(bool_c<false>(), vec, int_c<kPacks>()), planes, threads, 0, stream, params);
    } else {
      launch(pick(bool_c<false>(), vec, int_c<0>()), planes, kMaxPlaneTeam, 0, stream, params);
    }
  };
  if (pointers_aligned && N % kVecMax == 0) {
    go(int_c<kVecMax>());
  } else {
    go(int_c<1>());
  }
}

// pick(int_c<kVec>) returns the kernel to launch; `planes` are the base pointers of every tensor
// the kernel streams (plane k at base + k N). kVec: the widest access (16, 8 or 4 bytes, else one
// element) that every plane start is aligned to.
template <typename scalar_t, typename Params, typename Pick>
void launch_groups(const Params& params, const ForwardParams& f, bool backward,
                   std::initializer_list<const void*> planes, const Pick& pick) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = f.branch_channels, N = f.plane_size, tile = group_tile_pixels(m, N);
  const int64_t smem = GroupSmem{m, tile}.values(backward) * int64_t(sizeof(acc_t));
  TORCH_CHECK(smem <= max_dynamic_shared_bytes(), "sa_cuda: m = C / (2 * groups) = ", m,
              " needs ", smem, " bytes of shared memory per block in the CUDA ",
              backward ? "backward" : "forward", " of ShuffleAttention; the device allows ",
              max_dynamic_shared_bytes());
  auto aligned = [&](int64_t bytes) {
    if (N % (bytes / int64_t(sizeof(scalar_t))) != 0) return false;
    for (const void* base : planes) {
      if (reinterpret_cast<uintptr_t>(base) % bytes != 0) return false;
    }
    return true;
  };
  auto go = [&](auto vec) {
    launch(pick(vec), f.batch * f.groups * 2, kGroupThreads, size_t(smem), current_stream(), params, tile);
  };
  constexpr int kVecMax = 16 / sizeof(scalar_t);
  if (aligned(16)) return go(int_c<kVecMax>());
  if constexpr (kVecMax >= 4) {
    if (aligned(8)) return go(int_c<kVecMax / 2>());
  }
  if constexpr (kVecMax >= 8) {
    if (aligned(4)) return go(int_c<kVecMax / 4>());
  }
  go(int_c<1>());
}

}  // namespace sa_cuda::SA_GPU_NS
