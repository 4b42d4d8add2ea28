// Launch shapes, chosen from the problem (included by the forward and backward launch files).
//
// SALayer, one team per plane:
//   N <= 256              a team of lanes per plane (8 elements a lane: kSmallPlaneLanes = 8
//                         lanes for N <= 64, else the warp), 256 / lanes planes per 256-thread
//                         block, plane in registers (no per-plane pack wider than one element:
//                         the block's planes are read as one chunk through shared memory with
//                         16-byte loads)
//   N <= 4096             a block per plane (32..512 threads, block_team_packs packs each),
//                         plane in registers
//   larger                a block of 512 per plane, streamed twice (moments, then the gate)
// ShuffleAttention: a block of 256 per (batch item, group, branch), tiles in shared memory.
// Both move the widest pack (16, 8 or 4 bytes, else one element) that N and every plane pointer
// allow (plane_pack_elements).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "sa_layer_forward.cuh"
#include "shuffle_attention_forward.cuh"

namespace sa_cuda::SA_GPU_NS {

template <int V>
using int_c = std::integral_constant<int, V>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elements per pack of a per-plane access: the widest pack of 16, 8 or 4 bytes (or one element)
// such that every plane of every tensor starts aligned to it (base pointers aligned to its bytes,
// N a multiple of its elements).
template <typename scalar_t>
int plane_pack_elements(int64_t N, std::initializer_list<const void*> tensors) {
  for (int vec = 16 / int(sizeof(scalar_t)); vec > 1; vec /= 2) {
    bool fits = N % vec == 0;
    for (const void* t : tensors)
      fits = fits && reinterpret_cast<uintptr_t>(t) % (vec * sizeof(scalar_t)) == 0;
    if (fits) return vec;
  }
  return 1;
}

// Calls go(int_c<vec>()) for a runtime vec, a power of two <= kVec.
template <int kVec, typename Go>
void with_pack_elements(int vec, const Go& go) {
  if constexpr (kVec > 1) {
    if (vec < kVec) return with_pack_elements<kVec / 2>(vec, go);
  }
  go(int_c<kVec>());
}

// pick(int_c<kLanes>, int_c<kVec>, int_c<kPacks>) returns the kernel to launch (kLanes: a warp
// team's lanes, 0 for a block team); vec from
// plane_pack_elements over the kernel's plane tensors.
template <typename scalar_t, bool kBackward, typename Params, typename Pick>
void launch_sa_layer(const Params& params, const ForwardParams& f, int vec, const Pick& pick) {
  const int64_t planes = f.batch * f.channels, N = f.plane_size;
  with_pack_elements<16 / int(sizeof(scalar_t))>(vec, [&](auto vec_c) {
    constexpr int kVec = decltype(vec_c)::value;
    constexpr int kBlockPacks = block_team_packs<scalar_t, kBackward, kVec>();
    const Stream stream = current_stream();
    if (N <= kWarpSize * kWarpTeamItems) {
      const auto warp_teams = [&](auto lanes) {
        launch(pick(lanes, vec_c, int_c<kWarpTeamItems / kVec>()),
               ceil_div(planes, kWarpTeamBlock / decltype(lanes)::value), kWarpTeamBlock, 0, stream,
               params);
      };
      if (N <= kSmallPlaneLanes * kWarpTeamItems) {
        warp_teams(int_c<kSmallPlaneLanes>());
      } else {
        warp_teams(int_c<kWarpSize>());
      }
    } else if (N <= kMaxRegisterPlane) {
      const int threads =
          static_cast<int>(ceil_div(ceil_div(N, kBlockPacks * kVec), kWarpSize) * kWarpSize);
      launch(pick(int_c<0>(), vec_c, int_c<kBlockPacks>()), planes, threads, 0, stream, params);
    } else {
      launch(pick(int_c<0>(), vec_c, int_c<0>()), planes, kMaxPlaneTeam, 0, stream, params);
    }
  });
}

// pick(int_c<kVec>) returns the kernel to launch; `planes` are the base pointers of every tensor
// the kernel streams (plane k at base + k N). kVec: the widest access (16, 8 or 4 bytes, else one
// element) that every plane start is aligned to.
template <typename scalar_t, typename Params, typename Pick>
void launch_shuffle_attention(const Params& params, const ForwardParams& f, bool backward,
                              std::initializer_list<const void*> planes, const Pick& pick) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = f.branch_channels, N = f.plane_size, tile = group_tile_pixels(m, N);
  const int64_t smem = GroupSmem{m, tile}.values(backward) * int64_t(sizeof(acc_t));
  check_group_smem(m, smem, backward);
  with_pack_elements<16 / int(sizeof(scalar_t))>(
      plane_pack_elements<scalar_t>(N, planes), [&](auto vec) {
        launch(pick(vec), f.batch * f.groups * 2, kGroupThreads, size_t(smem), current_stream(),
               params, tile);
      });
}

}  // namespace sa_cuda::SA_GPU_NS
